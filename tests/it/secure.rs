//! TLS and ACL users against real redis-servers: the bridge works through
//! `rediss://` with mutual TLS and as an ACL user that may touch only its own
//! keys and channels; a wrong password or certificate is one clear error.

use crate::support;

use std::time::Duration;

use support::certs::TestCa;
use support::{OptimusProcess, RedisServer, assert_exactly_once, free_port, run_optimus};

const STREAM: &str = "messages:processed";

/// A server with a plain port (the test's own checks) and a TLS port that
/// requires a client certificate signed by `ca`.
struct TlsServer {
    server: RedisServer,
    tls_port: u16,
    ca: TestCa,
    dir: tempfile::TempDir,
}

impl TlsServer {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = TestCa::new(dir.path(), "trusted");
        let cert = ca.server("server");
        let tls_port = free_port();
        let server = RedisServer::start_with(&[
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            cert.cert.to_str().unwrap(),
            "--tls-key-file",
            cert.key.to_str().unwrap(),
            "--tls-ca-cert-file",
            ca.cert_file.to_str().unwrap(),
            "--tls-auth-clients",
            "yes",
        ]);
        TlsServer {
            server,
            tls_port,
            ca,
            dir,
        }
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.tls_port)
    }
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// Waits for the stream to hold `n` entries and the process to settle.
fn entries(
    server: &RedisServer,
    consume: &OptimusProcess,
    n: usize,
) -> Vec<std::collections::BTreeMap<String, Vec<u8>>> {
    support::wait_for(
        &format!("{n} entries in {STREAM}"),
        Duration::from_secs(30),
        || (server.xlen(STREAM) >= n).then_some(()),
        || consume.describe(),
    );
    consume.wait_settled(Duration::from_secs(20));
    server.stream_entries(STREAM)
}

#[test]
fn mutual_tls_with_a_private_ca_delivers_exactly_once() {
    let tls = TlsServer::start();
    let client = tls.ca.client("bridge");
    let url = tls.url();
    let env = [
        ("REDIS_URL", url.as_str()),
        ("REDIS_TLS_CA_FILE", path(&tls.ca.cert_file)),
        ("REDIS_TLS_CERT_FILE", path(&client.cert)),
        ("REDIS_TLS_KEY_FILE", path(&client.key)),
    ];
    let mut all = env.to_vec();
    all.push(("CONSUMERS_COUNT", "3"));
    let consume = OptimusProcess::consume(&tls.server, &all);
    consume.wait_consumers(3);

    let summary = support::publish_with(&env, &["--count", "3000"]);
    assert_eq!(
        summary.num("no_subscriber"),
        0,
        "every PUBLISH reached the workers"
    );
    assert_exactly_once(&entries(&tls.server, &consume, 3000), 0..3000);

    // The management commands go through the same settings.
    let out = run_optimus(&["streams", "info", STREAM], &env, Duration::from_secs(20));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("3000"),
        "streams info shows the length:\n{stdout}"
    );
}

/// A certificate problem is not something retrying mends: one line saying
/// what is wrong, exit 1, and no "retrying" warnings before it.
#[test]
fn a_bad_certificate_is_one_error_and_exit_1() {
    let tls = TlsServer::start();
    let stranger = TestCa::new(tls.dir.path(), "stranger");
    let trusted_client = tls.ca.client("trusted-client");
    let untrusted_client = stranger.client("untrusted-client");
    let url = tls.url();
    let cases = [
        // The client does not trust the server's CA.
        (
            "server certificate from an unknown CA",
            path(&stranger.cert_file),
            &trusted_client,
        ),
        // The server does not trust the client's certificate.
        (
            "client certificate the server rejects",
            path(&tls.ca.cert_file),
            &untrusted_client,
        ),
    ];
    for (case, ca_file, client) in cases {
        for command in [&["consume"][..], &["publish", "--count", "1"][..]] {
            let out = run_optimus(
                command,
                &[
                    ("REDIS_URL", url.as_str()),
                    ("REDIS_TLS_CA_FILE", ca_file),
                    ("REDIS_TLS_CERT_FILE", path(&client.cert)),
                    ("REDIS_TLS_KEY_FILE", path(&client.key)),
                ],
                Duration::from_secs(30),
            );
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{case}, {command:?}: {stderr}");
            assert!(
                !stderr.contains("retrying"),
                "{case}, {command:?}: no retry loop:\n{stderr}"
            );
            let errors: Vec<&str> = stderr
                .lines()
                .filter(|l| l.starts_with("optimus: "))
                .collect();
            assert_eq!(
                errors.len(),
                1,
                "{case}, {command:?}: one error line:\n{stderr}"
            );
            assert!(
                errors[0].to_lowercase().contains("certificate")
                    || errors[0].to_lowercase().contains("tls"),
                "{case}, {command:?}: says it is about TLS: {stderr}"
            );
        }
    }
    // Nothing was written by anyone.
    assert_eq!(tls.server.xlen(STREAM), 0);
}

#[test]
fn tls_settings_that_cannot_work_are_bad_settings() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let client = ca.client("c");
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let missing = dir.path().join("missing.pem");
    type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![
                ("REDIS_URL", "rediss://127.0.0.1:1"),
                ("REDIS_TLS_CA_FILE", path(&missing)),
            ],
            "REDIS_TLS_CA_FILE",
        ),
        (
            vec![
                ("REDIS_URL", "rediss://127.0.0.1:1"),
                ("REDIS_TLS_CA_FILE", path(&not_pem)),
            ],
            "REDIS_TLS_CA_FILE",
        ),
        (
            vec![
                ("REDIS_URL", "redis://127.0.0.1:1"),
                ("REDIS_TLS_CA_FILE", path(&ca.cert_file)),
            ],
            "REDIS_TLS_CA_FILE",
        ),
        (
            vec![
                ("REDIS_URL", "rediss://127.0.0.1:1"),
                ("REDIS_TLS_CERT_FILE", path(&client.cert)),
            ],
            "REDIS_TLS_CERT_FILE",
        ),
        (
            vec![
                ("REDIS_PASSWORD", "a"),
                ("REDIS_PASSWORD_FILE", path(&missing)),
            ],
            "REDIS_PASSWORD_FILE",
        ),
        (
            vec![("REDIS_PASSWORD_FILE", path(&missing))],
            "REDIS_PASSWORD_FILE",
        ),
    ];
    for (env, var) in cases {
        for command in [
            &["consume"][..],
            &["publish"],
            &["health"],
            &["work", "--", "true"],
        ] {
            let out = run_optimus(command, &env, Duration::from_secs(10));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{env:?} {command:?}: {stderr}");
            assert_eq!(
                stderr.lines().count(),
                1,
                "{env:?} {command:?}: one line:\n{stderr}"
            );
            assert!(
                stderr.contains(var),
                "{env:?} {command:?}: names {var}: {stderr}"
            );
        }
    }
}

/// The ACL rule docs/cluster-and-tls.md gives for optimus (the line that starts with
/// `ACL SETUSER optimus`), with `>CHANGE-ME` as the password: the test uses
/// the documentation's own words, so the two cannot drift apart.
fn readme_acl_rule() -> Vec<String> {
    let readme = std::fs::read_to_string(support::crate_file("docs/cluster-and-tls.md"))
        .expect("docs/cluster-and-tls.md");
    let line = readme
        .lines()
        .find(|l| l.trim_start().starts_with("ACL SETUSER optimus "))
        .expect("docs/cluster-and-tls.md gives the ACL rule in a line starting with 'ACL SETUSER optimus'");
    assert!(line.contains(">CHANGE-ME"), "{line}");
    line.split_whitespace()
        .map(|w| w.replace(">CHANGE-ME", ">bridge-secret-7"))
        .collect()
}

#[test]
fn an_acl_user_with_only_the_bridge_rule_runs_the_bridge() {
    let server = RedisServer::start();
    let rule = readme_acl_rule();
    let _: String = server.command(&rule.iter().map(String::as_str).collect::<Vec<_>>());
    // The rule really is narrow: other keys and channels are refused.
    let mut conn = redis::Client::open(format!(
        "redis://optimus:bridge-secret-7@127.0.0.1:{}",
        server.port
    ))
    .unwrap()
    .get_connection()
    .unwrap();
    let refused = redis::cmd("SET")
        .arg("other:key")
        .arg(1)
        .query::<()>(&mut conn);
    assert!(refused.is_err(), "the user may not write other keys");
    let refused = redis::cmd("PUBLISH")
        .arg("other")
        .arg(1)
        .query::<i64>(&mut conn);
    assert!(refused.is_err(), "the user may not publish elsewhere");

    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, "bridge-secret-7\n").unwrap();
    let url = server.url();
    let env = [
        ("REDIS_URL", url.as_str()),
        ("REDIS_USERNAME", "optimus"),
        ("REDIS_PASSWORD_FILE", path(&password_file)),
    ];
    let mut all = env.to_vec();
    all.push(("CONSUMERS_COUNT", "2"));
    let consume = OptimusProcess::consume(&server, &all);
    consume.wait_consumers(2);
    support::publish_with(&env, &["--count", "2000"]);
    assert_exactly_once(&entries(&server, &consume, 2000), 0..2000);
    for (name, text) in [("stderr", consume.stderr()), ("stdout", consume.stdout())] {
        assert!(
            !text.to_lowercase().contains("noperm"),
            "no permission errors on {name}:\n{text}"
        );
        assert!(
            !text.contains("bridge-secret-7"),
            "no password on {name}:\n{text}"
        );
    }
    // The operator's commands work as that user too.
    for command in [
        &["health"][..],
        &["ctl", "status"],
        &["streams", "info", STREAM],
    ] {
        let out = run_optimus(command, &env, Duration::from_secs(20));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "{command:?} as the optimus user:\n{text}"
        );
        assert!(
            !text.to_lowercase().contains("noperm"),
            "{command:?}:\n{text}"
        );
    }
}

#[test]
fn a_wrong_password_is_one_error_exit_1_and_never_shown() {
    let server = RedisServer::start();
    let _: String = server.command(&[
        "ACL",
        "SETUSER",
        "bridge",
        "on",
        ">right-pass",
        "~*",
        "&*",
        "+@all",
    ]);
    let url = server.url();
    let with_url = format!("redis://bridge:wrong-pass-in-url@127.0.0.1:{}", server.port);
    let cases: [Vec<(&str, &str)>; 2] = [
        vec![
            ("REDIS_URL", url.as_str()),
            ("REDIS_USERNAME", "bridge"),
            ("REDIS_PASSWORD", "wrong-pass-in-var"),
        ],
        vec![("REDIS_URL", with_url.as_str())],
    ];
    for env in cases {
        for command in [
            &["consume"][..],
            &["publish", "--count", "1"][..],
            &["work", "--", "true"][..],
        ] {
            let out = run_optimus(command, &env, Duration::from_secs(30));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{command:?}: {stderr}");
            assert!(
                !stderr.contains("retrying"),
                "{command:?}: no retry loop:\n{stderr}"
            );
            assert!(
                !stderr.contains("wrong-pass"),
                "{command:?}: password masked:\n{stderr}"
            );
            assert!(
                stderr.contains("WRONGPASS") || stderr.contains("uthentication failed"),
                "{command:?}: says what is wrong:\n{stderr}"
            );
        }
    }
    // Help shows that REDIS_PASSWORD is read, never its value.
    let out = run_optimus(
        &["consume", "--help"],
        &[("REDIS_PASSWORD", "shown-secret")],
        Duration::from_secs(10),
    );
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("REDIS_PASSWORD"), "{help}");
    assert!(!help.contains("shown-secret"), "{help}");
}
