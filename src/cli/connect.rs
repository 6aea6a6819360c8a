//! The connection flags every command shares (REDIS_URL and friends, TLS
//! files, credentials), turned into one checked [`Endpoint`].

use clap::Args;
use optimus::settings::{ConfigError, given, limits, parse_choice, parse_whole};
use optimus::{Endpoint, PubSubMode, TlsFiles, mask_password};

/// Where Redis is and how to log in. Shared by every subcommand.
#[derive(Debug, Clone, Args)]
// `-h` shows REDIS_URL alone; `--help` shows every connection setting.
#[command(next_help_heading = "Connection and logging")]
pub struct ConnectArgs {
    /// Redis URL (`redis://[user:pass@]host:port/db`, `rediss://…` for TLS, or `unix:///path`); overrides REDIS_HOST and REDIS_PORT. Several, comma-separated: the seed nodes of a Redis Cluster.
    #[arg(
        long,
        env = "REDIS_URL",
        value_name = "URL",
        global = true,
        hide_env_values = true
    )]
    pub redis_url: Option<String>,
    /// Redis host, used when REDIS_URL is unset.
    #[arg(
        long,
        env = "REDIS_HOST",
        default_value = "localhost",
        global = true,
        hide_short_help = true
    )]
    pub redis_host: String,
    /// Redis port, used when REDIS_URL is unset.
    #[arg(
        long,
        env = "REDIS_PORT",
        default_value = "6379",
        global = true,
        hide_short_help = true
    )]
    pub redis_port: String,
    /// ACL user name (overrides one in REDIS_URL).
    #[arg(
        long,
        env = "REDIS_USERNAME",
        value_name = "USER",
        global = true,
        hide_short_help = true
    )]
    pub redis_username: Option<String>,
    /// Password (overrides one in REDIS_URL). Never printed; prefer REDIS_PASSWORD_FILE.
    #[arg(
        long,
        env = "REDIS_PASSWORD",
        value_name = "PASSWORD",
        global = true,
        hide_short_help = true,
        hide_env_values = true
    )]
    pub redis_password: Option<String>,
    /// File holding the password (one line; a trailing newline is ignored).
    #[arg(
        long,
        env = "REDIS_PASSWORD_FILE",
        value_name = "PATH",
        global = true,
        hide_short_help = true
    )]
    pub redis_password_file: Option<String>,
    /// Redis Cluster mode (1/true/yes), with REDIS_URL (or host and port) as a seed node. Implied by several URLs in REDIS_URL.
    #[arg(
        long,
        env = "REDIS_CLUSTER",
        value_name = "BOOL",
        global = true,
        hide_short_help = true,
        default_value = "0"
    )]
    pub redis_cluster: String,
    /// Pub/Sub flavour: `classic` (SUBSCRIBE/PUBLISH; a cluster broadcasts it to every node) or `sharded` (SSUBSCRIBE/SPUBLISH, Redis 7: only the channel's shard carries it).
    #[arg(
        long,
        env = "PUBSUB_MODE",
        value_name = "MODE",
        global = true,
        hide_short_help = true,
        default_value = "classic"
    )]
    pub pubsub_mode: String,
    /// PEM file of the CA to trust for `rediss://` instead of the system's.
    #[arg(
        long,
        env = "REDIS_TLS_CA_FILE",
        value_name = "PATH",
        global = true,
        hide_short_help = true
    )]
    pub redis_tls_ca_file: Option<String>,
    /// PEM client certificate for mutual TLS (with REDIS_TLS_KEY_FILE).
    #[arg(
        long,
        env = "REDIS_TLS_CERT_FILE",
        value_name = "PATH",
        global = true,
        hide_short_help = true
    )]
    pub redis_tls_cert_file: Option<String>,
    /// PEM private key of the client certificate.
    #[arg(
        long,
        env = "REDIS_TLS_KEY_FILE",
        value_name = "PATH",
        global = true,
        hide_short_help = true
    )]
    pub redis_tls_key_file: Option<String>,
    /// Redis Sentinel: the sentinels' `host:port`, comma-separated; the primary is asked of them (with REDIS_SENTINEL_MASTER) and followed through failovers. Instead of REDIS_URL, REDIS_HOST and REDIS_PORT.
    #[arg(
        long,
        env = "REDIS_SENTINELS",
        value_name = "HOST:PORT,…",
        global = true,
        hide_short_help = true
    )]
    pub redis_sentinels: Option<String>,
    /// The primary's name among the sentinels (`sentinel monitor <name> …`).
    #[arg(
        long,
        env = "REDIS_SENTINEL_MASTER",
        value_name = "NAME",
        global = true,
        hide_short_help = true
    )]
    pub redis_sentinel_master: Option<String>,
    /// The sentinels' own ACL user, when they ask for one (REDIS_USERNAME is the primary's).
    #[arg(
        long,
        env = "REDIS_SENTINEL_USERNAME",
        value_name = "USER",
        global = true,
        hide_short_help = true
    )]
    pub redis_sentinel_username: Option<String>,
    /// The sentinels' own password, when they ask for one (REDIS_PASSWORD is the primary's). Never printed.
    #[arg(
        long,
        env = "REDIS_SENTINEL_PASSWORD",
        value_name = "PASSWORD",
        global = true,
        hide_short_help = true,
        hide_env_values = true
    )]
    pub redis_sentinel_password: Option<String>,
}

/// `host:port` of each sentinel in REDIS_SENTINELS, checked.
fn sentinel_addrs(list: &str) -> Result<Vec<String>, ConfigError> {
    let bad = |why: &str| ConfigError::new("REDIS_SENTINELS", list, why.to_string());
    let mut addrs = Vec::new();
    for addr in list.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| bad("expected host:port of each sentinel, comma-separated"))?;
        if host.is_empty() || host.contains(['/', '@', ' ']) {
            return Err(bad("expected host:port of each sentinel, comma-separated"));
        }
        parse_whole::<u16>("REDIS_SENTINELS", port, limits::PORT)?;
        addrs.push(addr.to_string());
    }
    if addrs.is_empty() {
        return Err(bad(
            "names no sentinel; expected host:port, comma-separated",
        ));
    }
    Ok(addrs)
}

/// Why `url` cannot name a Redis server, in words a user can act on; `None`
/// when it can.
fn url_problem(url: &str) -> Option<String> {
    const FORMS: &str = "redis://[user:pass@]host:port[/db], rediss://… (TLS) or unix:///path";
    let parsed = match url::Url::parse(url) {
        Ok(parsed) => parsed,
        Err(url::ParseError::RelativeUrlWithoutBase) => {
            return Some(format!("not a URL; expected {FORMS}"));
        }
        Err(url::ParseError::InvalidPort) => {
            return Some("the port must be a number from 1 to 65535".into());
        }
        Err(url::ParseError::EmptyHost) => {
            return Some(format!("no host in it; expected {FORMS}"));
        }
        Err(err) => return Some(format!("not a URL ({err}); expected {FORMS}")),
    };
    match parsed.scheme() {
        "redis" | "rediss" => {
            if parsed.host_str().is_none_or(str::is_empty) {
                return Some(format!("no host in it; expected {FORMS}"));
            }
            if parsed.port() == Some(0) {
                return Some("the port must be a number from 1 to 65535".into());
            }
            let db = parsed.path().trim_start_matches('/');
            if !db.is_empty() && db.parse::<u32>().is_err() {
                return Some(format!(
                    "the database after the host must be a number, like /0 (not {db:?})"
                ));
            }
        }
        "unix" | "redis+unix" => {
            if parsed.path().is_empty() {
                return Some("no socket path in it; expected unix:///path/to/redis.sock".into());
            }
        }
        other => {
            return Some(format!(
                "{other}:// is not a Redis scheme; expected {FORMS}"
            ));
        }
    }
    // Whatever else the client library refuses, in its words.
    redis::Client::open(url).err().map(|e| e.to_string())
}

/// The bytes of the file a setting names, or one line saying why not.
fn read_setting_file(var: &'static str, path: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError::new(var, path, format!("cannot read it: {e}")))
}

/// PEM bytes from the file a setting names, checked for at least one PEM block.
fn read_pem(var: &'static str, path: &str) -> Result<Vec<u8>, ConfigError> {
    let bytes = read_setting_file(var, path)?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(ConfigError::new(var, path, "not a PEM file"));
    }
    Ok(bytes)
}

impl ConnectArgs {
    /// The URL to connect to, checked for form (not for reachability).
    pub fn url(&self) -> Result<String, ConfigError> {
        let tls_files = [&self.redis_tls_ca_file, &self.redis_tls_cert_file]
            .iter()
            .any(|f| given(f).is_some());
        let url = match &self.redis_url {
            Some(urls) => {
                for url in urls.split(',') {
                    if let Some(why) = url_problem(url.trim()) {
                        return Err(ConfigError::new("REDIS_URL", mask_password(urls), why));
                    }
                }
                return Ok(urls.trim().to_string());
            }
            None => {
                let port: u16 = parse_whole("REDIS_PORT", &self.redis_port, limits::PORT)?;
                let host = self.redis_host.trim();
                if host.is_empty() || host.contains(['/', '@', ' ']) {
                    return Err(ConfigError::new(
                        "REDIS_HOST",
                        host,
                        "must be a host name or address",
                    ));
                }
                let scheme = if tls_files { "rediss" } else { "redis" };
                format!("{scheme}://{host}:{port}")
            }
        };
        redis::Client::open(url.as_str())
            .map_err(|e| ConfigError::new("REDIS_HOST", &self.redis_host, e.to_string()))?;
        Ok(url)
    }

    /// The server with its credentials and certificates, every file read and
    /// checked: a missing or malformed one is a [`ConfigError`] naming it.
    pub fn endpoint(&self) -> Result<Endpoint, ConfigError> {
        if let Some(sentinels) = given(&self.redis_sentinels) {
            return self.sentinel_endpoint(sentinels);
        }
        if let Some(master) = given(&self.redis_sentinel_master) {
            return Err(ConfigError::new(
                "REDIS_SENTINEL_MASTER",
                master,
                "needs REDIS_SENTINELS (the sentinels' host:port)",
            ));
        }
        let url = self.url()?;
        let seeds: Vec<&str> = url.split(',').map(str::trim).collect();
        let cluster = match self.redis_cluster.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => true,
            "0" | "false" | "no" | "off" | "" => seeds.len() > 1,
            _ => {
                return Err(ConfigError::new(
                    "REDIS_CLUSTER",
                    &self.redis_cluster,
                    "expected 1 or 0 (true/false, yes/no)",
                ));
            }
        };
        let sharded =
            parse_choice::<PubSubMode>("PUBSUB_MODE", &self.pubsub_mode)? == PubSubMode::Sharded;
        if sharded && !cluster {
            return Err(ConfigError::new(
                "PUBSUB_MODE",
                &self.pubsub_mode,
                "sharded Pub/Sub needs a cluster (REDIS_CLUSTER=1)",
            ));
        }
        let endpoint = if cluster {
            if seeds.iter().any(|s| s.starts_with("unix:")) {
                return Err(ConfigError::new(
                    "REDIS_URL",
                    mask_password(&url),
                    "a cluster is reached over TCP, not a unix socket",
                ));
            }
            Endpoint::cluster(seeds.iter().copied())
        } else {
            Endpoint::new(url.clone())
        }
        .sharded_pubsub(sharded);
        let endpoint = self.with_credentials(endpoint)?;
        self.with_tls(endpoint, &url)
    }

    /// The primary the sentinels name, with credentials and TLS as for one
    /// server.
    fn sentinel_endpoint(&self, sentinels: &str) -> Result<Endpoint, ConfigError> {
        let addrs = sentinel_addrs(sentinels)?;
        let master = given(&self.redis_sentinel_master).ok_or_else(|| {
            ConfigError::new(
                "REDIS_SENTINEL_MASTER",
                "",
                "must name the primary (sentinel monitor <name> …) when REDIS_SENTINELS is set",
            )
        })?;
        // The server comes from the sentinels: another way of naming it is
        // a contradiction.
        let url = self.redis_url.as_deref().map(mask_password);
        let host_set = std::env::var_os("REDIS_HOST").is_some() || self.redis_host != "localhost";
        let port_set = std::env::var_os("REDIS_PORT").is_some() || self.redis_port != "6379";
        let named = [
            ("REDIS_URL", url.filter(|u| !u.trim().is_empty())),
            ("REDIS_HOST", host_set.then(|| self.redis_host.clone())),
            ("REDIS_PORT", port_set.then(|| self.redis_port.clone())),
        ];
        if let Some((var, Some(value))) = named.iter().find(|(_, set)| set.is_some()) {
            return Err(ConfigError::new(
                var,
                value,
                "REDIS_SENTINELS is set too: the sentinels name the server; set one of them",
            ));
        }
        if !matches!(self.redis_cluster.trim(), "" | "0" | "false" | "no" | "off") {
            return Err(ConfigError::new(
                "REDIS_CLUSTER",
                &self.redis_cluster,
                "a cluster does its own failover; REDIS_SENTINELS is for a primary with replicas",
            ));
        }
        if parse_choice::<PubSubMode>("PUBSUB_MODE", &self.pubsub_mode)? == PubSubMode::Sharded {
            return Err(ConfigError::new(
                "PUBSUB_MODE",
                &self.pubsub_mode,
                "sharded Pub/Sub needs a cluster (REDIS_CLUSTER=1)",
            ));
        }
        let tls = [&self.redis_tls_ca_file, &self.redis_tls_cert_file]
            .iter()
            .any(|f| given(f).is_some());
        let endpoint = Endpoint::sentinel(addrs, master, 0, tls).sentinel_auth(
            given(&self.redis_sentinel_username).map(String::from),
            given(&self.redis_sentinel_password).map(String::from),
        );
        let endpoint = self.with_credentials(endpoint)?;
        let shown = endpoint.to_string();
        self.with_tls(endpoint, &shown)
    }

    /// REDIS_USERNAME, and REDIS_PASSWORD or the password file.
    fn with_credentials(&self, mut endpoint: Endpoint) -> Result<Endpoint, ConfigError> {
        if let Some(user) = given(&self.redis_username) {
            endpoint = endpoint.username(user);
        }
        match (
            given(&self.redis_password),
            given(&self.redis_password_file),
        ) {
            (Some(_), Some(path)) => {
                return Err(ConfigError::new(
                    "REDIS_PASSWORD_FILE",
                    path,
                    "REDIS_PASSWORD is set too: set one of them",
                ));
            }
            (Some(password), None) => endpoint = endpoint.password(password),
            (None, Some(path)) => {
                let bytes = read_setting_file("REDIS_PASSWORD_FILE", path)?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| ConfigError::new("REDIS_PASSWORD_FILE", path, "not UTF-8 text"))?;
                let password = text.trim_end_matches(['\n', '\r']);
                if password.is_empty() {
                    return Err(ConfigError::new("REDIS_PASSWORD_FILE", path, "is empty"));
                }
                endpoint = endpoint.password(password);
            }
            (None, None) => {}
        }
        Ok(endpoint)
    }

    /// The TLS files, read and checked (they need a rediss:// `url`).
    fn with_tls(&self, endpoint: Endpoint, url: &str) -> Result<Endpoint, ConfigError> {
        let ca = given(&self.redis_tls_ca_file);
        let cert = given(&self.redis_tls_cert_file);
        let key = given(&self.redis_tls_key_file);
        if ca.is_none() && cert.is_none() && key.is_none() {
            return Ok(endpoint);
        }
        if !endpoint.is_tls() {
            let var = if ca.is_some() {
                "REDIS_TLS_CA_FILE"
            } else if cert.is_some() {
                "REDIS_TLS_CERT_FILE"
            } else {
                "REDIS_TLS_KEY_FILE"
            };
            let path = ca.or(cert).or(key).unwrap_or_default();
            return Err(ConfigError::new(
                var,
                path,
                format!(
                    "TLS files need a rediss:// server, but REDIS_URL is {}",
                    mask_password(url)
                ),
            ));
        }
        let mut files = TlsFiles::default();
        if let Some(path) = ca {
            files.ca = Some(read_pem("REDIS_TLS_CA_FILE", path)?);
            endpoint
                .clone()
                .tls(files.clone())
                .check()
                .map_err(|e| ConfigError::new("REDIS_TLS_CA_FILE", path, e.to_string()))?;
        }
        match (cert, key) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                files.client_cert_and_key = Some((
                    read_pem("REDIS_TLS_CERT_FILE", cert)?,
                    read_pem("REDIS_TLS_KEY_FILE", key)?,
                ));
                endpoint
                    .clone()
                    .tls(files.clone())
                    .check()
                    .map_err(|e| ConfigError::new("REDIS_TLS_CERT_FILE", cert, e.to_string()))?;
            }
            (Some(cert), None) => {
                return Err(ConfigError::new(
                    "REDIS_TLS_CERT_FILE",
                    cert,
                    "needs REDIS_TLS_KEY_FILE too",
                ));
            }
            (None, Some(key)) => {
                return Err(ConfigError::new(
                    "REDIS_TLS_KEY_FILE",
                    key,
                    "needs REDIS_TLS_CERT_FILE too",
                ));
            }
        }
        Ok(endpoint.tls(files))
    }
}
