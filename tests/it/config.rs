//! The config file (`--config PATH`, OPTIMUS_CONFIG): TOML keyed by the
//! variables' names in lower case, under the environment and the flags;
//! `optimus config` shows each setting and where it came from, `--check`
//! checks them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::{self, OptimusProcess, RedisServer, run_optimus};

fn write(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("optimus.toml");
    std::fs::write(&path, text).expect("write the config file");
    path
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A consume process configured by a file alone bridges the file's channel
/// into the file's stream.
#[test]
fn a_pool_configured_by_a_file_bridges_the_file_s_channel() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        &format!(
            "redis_url = \"{}\"\ninput_channel = \"orders\"\noutput_stream = \"orders:out\"\nconsumers_count = 2\nmonitoring_interval = 0.2\n",
            server.url()
        ),
    );
    let file = file.to_string_lossy().into_owned();
    let consume = OptimusProcess::spawn(&["consume"], &[("OPTIMUS_CONFIG", file.as_str())]);
    consume.wait_consumers(2);
    let url = server.url();
    let published = support::publish_with(
        &[("REDIS_URL", url.as_str()), ("OUTPUT_STREAM", "orders:out")],
        &["--channel", "orders", "--count", "200"],
    );
    assert_eq!(published.num("no_subscriber"), 0, "{}", published.line);
    support::wait_for(
        "the file's stream to hold the 200 messages",
        Duration::from_secs(20),
        || (server.xlen("orders:out") == 200).then_some(()),
        || consume.describe(),
    );
    assert_eq!(
        server.xlen("messages:processed"),
        0,
        "the default stream is untouched"
    );
}

/// The environment wins over the file, the file over the defaults (flags
/// win over both, as clap has it); `optimus config` says which gave each
/// value, and hides the passwords.
#[test]
fn the_environment_then_the_file_then_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "input_channel = \"orders\"\nconsumers_count = 3\nredis_password = \"s3cret\"\n",
    );
    let path = file.to_string_lossy().into_owned();
    let out = run_optimus(
        &["config", "--config", &path],
        &[
            ("CONSUMERS_COUNT", "5"),
            ("REDIS_URL", "redis://u:hunter2@127.0.0.1:1"),
        ],
        Duration::from_secs(10),
    );
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        shown.contains(&format!("input_channel = \"orders\"  # {path}")),
        "from the file: {shown}"
    );
    assert!(
        shown.contains("consumers_count = \"5\"  # environment (CONSUMERS_COUNT)"),
        "the environment wins over the file: {shown}"
    );
    assert!(
        shown.contains("processing_batch_size = \"100\"  # default"),
        "{shown}"
    );
    assert!(
        !shown.contains("s3cret") && !shown.contains("hunter2"),
        "{shown}"
    );
    assert!(shown.contains("redis_password = \"********\""), "{shown}");

    // And the same settings check out.
    let out = run_optimus(
        &["config", "--check", "--config", &path],
        &[("CONSUMERS_COUNT", "5")],
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).starts_with("ok:"), "{out:?}");
}

/// An unknown key, a file that does not parse, a bad value: each is one
/// line naming the key (or variable) and the file, exit 2.
#[test]
fn bad_files_are_one_line_naming_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for (content, says) in [
        ("consumer_count = 3\n", "unknown key `consumer_count`"),
        ("INPUT_CHANNEL = \"x\"\n", "unknown key `INPUT_CHANNEL`"),
        ("consumers_count = \n", "line 1"),
        ("input_channel = { a = 1 }\n", "`input_channel`"),
        ("consumers_count = \"many\"\n", "CONSUMERS_COUNT"),
        ("[[routes]]\ntarget = \"x\"\n", "`source`"),
        ("metrics_addr = \"nowhere\"\n", "METRICS_ADDR"),
        ("input_channel = \"a\\u0000b\"\n", "NUL"),
    ] {
        let file = write(dir.path(), content);
        let path = file.to_string_lossy().into_owned();
        for args in [vec!["config", "--check"], vec!["consume"]] {
            let out = run_optimus(
                &args,
                &[("OPTIMUS_CONFIG", path.as_str())],
                Duration::from_secs(10),
            );
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{content:?} {args:?}: {out:?}");
            assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
            assert!(stderr.contains(says), "{content:?} says {says}: {stderr}");
            assert!(
                stderr.contains(&path),
                "{content:?} names the file: {stderr}"
            );
        }
    }
    // What describes the command line works whatever the file.
    let file = write(dir.path(), "not toml at all = = =\n");
    let path = file.to_string_lossy().into_owned();
    for args in [
        &["--version"][..],
        &["consume", "--help"],
        &["completions", "bash"],
    ] {
        let out = run_optimus(
            args,
            &[("OPTIMUS_CONFIG", path.as_str())],
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "{args:?}: {out:?}");
    }
    let missing = dir.path().join("missing.toml");
    let out = run_optimus(
        &["consume", "--config", &missing.to_string_lossy()],
        &[],
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("cannot read it"), "{out:?}");
}

/// `routes` may be an array of tables: it is the packed ROUTES string.
#[test]
fn routes_may_be_an_array_of_tables() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "[[routes]]\nsource = \"orders\"\ntarget = \"orders:out\"\n\n[[routes]]\nsource = \"payments\"\ntarget = \"payments:out\"\nmaxlen = 1000\n",
    );
    let path = file.to_string_lossy().into_owned();
    let out = run_optimus(
        &["config"],
        &[("OPTIMUS_CONFIG", path.as_str())],
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        text(&out.stdout)
            .contains("routes = \"orders=orders:out,payments=payments:out;maxlen=1000\""),
        "{out:?}"
    );
    let out = run_optimus(
        &["config", "--check"],
        &[("OPTIMUS_CONFIG", path.as_str())],
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "{out:?}");
}

/// The example config the package installs checks out as it is.
#[test]
fn the_example_config_checks_out() {
    let example = support::crate_file("packaging/optimus.toml.example");
    let out = run_optimus(
        &["config", "--check", "--config", &example.to_string_lossy()],
        &[],
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "{out:?}");
}

/// `systemd-analyze verify` accepts the template units (an instance of
/// each, with this build's binary in place of /usr/bin/optimus). Where
/// systemd is not installed there is nothing to ask, and the test says so.
#[test]
fn systemd_accepts_the_units() {
    let Ok(found) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("systemd-analyze is not installed: the units are not verified here");
        return;
    };
    assert!(found.status.success(), "{found:?}");
    let dir = tempfile::tempdir().unwrap();
    let binary = support::optimus_binary();
    let mut instances = Vec::new();
    for unit in ["optimus-consume@.service", "optimus-work@.service"] {
        let text =
            std::fs::read_to_string(support::crate_file(&format!("packaging/systemd/{unit}")))
                .expect("the unit");
        assert!(
            text.contains("ExecStart=/usr/bin/optimus "),
            "{unit}: {text}"
        );
        let text = text.replace("/usr/bin/optimus", &binary.to_string_lossy());
        std::fs::write(dir.path().join(unit), text).unwrap();
        instances.push(dir.path().join(unit.replace("@.", "@check.")));
    }
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&instances)
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display()))
        .output()
        .expect("systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "systemd-analyze verify: {said}");
    let ours: Vec<&str> = said.lines().filter(|l| l.contains("optimus-")).collect();
    assert!(ours.is_empty(), "warnings about the units: {said}");
}

/// `optimus bench` empties the server it is given: a REDIS_URL from a
/// service's config file is refused (exit 2, one line), before anything
/// connects.
#[test]
fn bench_refuses_a_server_named_by_the_config_file() {
    let server = RedisServer::start();
    server.command::<redis::Value>(&["SET", "precious", "1"]);
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), &format!("redis_url = \"{}\"\n", server.url()));
    let path = file.to_string_lossy().into_owned();
    let out = run_optimus(
        &["bench", "--messages", "1000"],
        &[("OPTIMUS_CONFIG", path.as_str())],
        Duration::from_secs(30),
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("FLUSHALL") && stderr.contains(&path),
        "{stderr}"
    );
    assert_eq!(
        server
            .command::<Option<String>>(&["GET", "precious"])
            .as_deref(),
        Some("1")
    );
}

/// `packaging/deb.sh` builds a Debian package of this build's binary with
/// what the issue lists: the binary (which runs), the man page, the three
/// completions, the two systemd templates as they are in the repository,
/// the example config and the license, a control file naming the package
/// and its version, and maintainer scripts that make the `optimus` user.
#[test]
fn the_debian_package_holds_the_binary_units_man_page_and_completions() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("bash")
        .arg(support::crate_file("packaging/deb.sh"))
        .arg("--binary")
        .arg(support::optimus_binary())
        .arg("--out")
        .arg(dir.path())
        .output()
        .expect("bash packaging/deb.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "packaging/deb.sh: {stderr}");
    let deb = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        deb.ends_with(&format!("optimus_{version}_amd64.deb"))
            || deb.contains(&format!("optimus_{version}_")),
        "{deb}"
    );
    let dpkg = |args: &[&str]| {
        let out = std::process::Command::new("dpkg-deb")
            .args(args)
            .output()
            .expect("dpkg-deb (Debian's dpkg package)");
        assert!(out.status.success(), "dpkg-deb {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let fields = dpkg(&["-f", &deb, "Package", "Version", "Depends"]);
    assert!(fields.contains("Package: optimus"), "{fields}");
    assert!(fields.contains(&format!("Version: {version}")), "{fields}");

    let root = dir.path().join("root");
    dpkg(&["-x", &deb, &root.to_string_lossy()]);
    let installed = |path: &str| root.join(path.trim_start_matches('/'));
    for path in [
        "/usr/bin/optimus",
        "/usr/share/man/man1/optimus.1.gz",
        "/usr/share/bash-completion/completions/optimus",
        "/usr/share/zsh/vendor-completions/_optimus",
        "/usr/share/fish/vendor_completions.d/optimus.fish",
        "/usr/share/doc/optimus/examples/optimus.toml",
        "/usr/share/doc/optimus/copyright",
    ] {
        let meta = std::fs::metadata(installed(path))
            .unwrap_or_else(|e| panic!("{path} in the package: {e}"));
        assert!(meta.len() > 0, "{path} is empty");
    }
    let runs = std::process::Command::new(installed("/usr/bin/optimus"))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&runs.stdout).trim(),
        format!("optimus {version}"),
        "{runs:?}"
    );
    for unit in ["optimus-consume@.service", "optimus-work@.service"] {
        let packaged = std::fs::read(installed(&format!("/lib/systemd/system/{unit}"))).unwrap();
        let ours =
            std::fs::read(support::crate_file(&format!("packaging/systemd/{unit}"))).unwrap();
        assert_eq!(packaged, ours, "{unit} as in packaging/systemd");
    }
    let man = std::process::Command::new("gzip")
        .args(["-dc"])
        .arg(installed("/usr/share/man/man1/optimus.1.gz"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&man.stdout).contains(".TH optimus"),
        "a man page: {man:?}"
    );
    let bash = std::fs::read_to_string(installed("/usr/share/bash-completion/completions/optimus"))
        .unwrap();
    assert!(
        bash.contains("consume"),
        "bash completion knows the commands"
    );

    let control = root.join("control");
    dpkg(&["-e", &deb, &control.to_string_lossy()]);
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("adduser --system"), "{postinst}");
    for script in ["postinst", "postrm"] {
        let checked = std::process::Command::new("sh")
            .arg("-n")
            .arg(control.join(script))
            .status()
            .unwrap();
        assert!(checked.success(), "{script} is valid sh");
    }
}
