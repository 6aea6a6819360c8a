//! `--config PATH` (or OPTIMUS_CONFIG): a TOML file of settings whose keys
//! are the environment variables' names in lower case (`consumers_count =
//! 3`, `input_channel = "orders"`; `routes` may be an array of tables).
//!
//! The file is the layer under the environment: before the command line is
//! parsed, each of its keys that the environment does not set is set from
//! it, so that clap keeps the one order it already has (flags, then the
//! environment, then the file, then the defaults) and every setting keeps
//! one parser, one check and one line of `--help`. An unknown key, or a
//! value that is no string, number, boolean or list of them, is a bad
//! setting naming the key and the file; a bad value is the setting's own
//! one line, with the file named (see [`origin`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::{Cli, Exit};

/// The file read, and the variables set from it.
struct Loaded {
    path: PathBuf,
    set: BTreeSet<String>,
}

static LOADED: OnceLock<Loaded> = OnceLock::new();

/// Reads the file `--config` or OPTIMUS_CONFIG names, if any, and sets the
/// variables it gives that the environment does not. Call it before the
/// command line is parsed, while the process has one thread (it sets
/// environment variables).
pub fn load(args: &[std::ffi::OsString]) -> Result<(), Exit> {
    let Some(path) = path_from(args) else {
        return Ok(());
    };
    let bad = |what: String| Exit::Refused(format!("config file {}: {what}", path.display()));
    let text =
        std::fs::read_to_string(&path).map_err(|err| bad(format!("cannot read it: {err}")))?;
    let table: toml::Table = text.parse().map_err(|err: toml::de::Error| {
        bad(err.message().to_string() + &line_of(&text, err.span()))
    })?;
    let known = known_variables();
    let mut set = BTreeSet::new();
    for (key, value) in &table {
        let var = key.to_ascii_uppercase();
        if key != &key.to_ascii_lowercase() || !known.contains(&var) {
            return Err(bad(format!(
                "unknown key `{key}` (keys are the settings' variables in lower case: `input_channel`, `consumers_count`, …)"
            )));
        }
        let value = as_setting(key, value).map_err(|why| bad(format!("`{key}`: {why}")))?;
        if value.contains('\0') {
            return Err(bad(format!("`{key}`: a NUL character cannot be a setting")));
        }
        if std::env::var_os(&var).is_none() {
            // SAFETY: called from `main` before any other thread exists.
            unsafe { std::env::set_var(&var, value) };
            set.insert(var);
        }
    }
    let _ = LOADED.set(Loaded { path, set });
    Ok(())
}

/// The file a variable's value came from, when it did.
pub fn origin(var: &str) -> Option<&'static Path> {
    LOADED
        .get()
        .filter(|loaded| loaded.set.contains(var))
        .map(|loaded| loaded.path.as_path())
}

/// The file read, if any.
pub fn path() -> Option<&'static Path> {
    LOADED.get().map(|loaded| loaded.path.as_path())
}

/// `--config PATH`, `--config=PATH`, else OPTIMUS_CONFIG (clap declares the
/// flag too, for `--help`; it is read here because the file must be loaded
/// before clap reads the environment). None for what describes the command
/// line itself (`--help`, `--version`, `completions`, `man`): a broken file
/// must not stop them.
fn path_from(args: &[std::ffi::OsString]) -> Option<PathBuf> {
    let describing = args.iter().skip(1).take_while(|a| *a != "--").any(|a| {
        matches!(
            a.to_str(),
            Some("--help" | "-h" | "--version" | "-V" | "completions" | "man" | "help")
        )
    });
    if describing {
        return None;
    }
    let mut args = args.iter().skip(1);
    while let Some(arg) = args.next() {
        let arg = arg.to_string_lossy();
        if arg == "--" {
            break;
        }
        if arg == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os("OPTIMUS_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Every variable some command reads.
fn known_variables() -> BTreeSet<String> {
    fn walk(command: &clap::Command, out: &mut BTreeSet<String>) {
        for arg in command.get_arguments() {
            if let Some(env) = arg.get_env() {
                out.insert(env.to_string_lossy().into_owned());
            }
        }
        for sub in command.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut out = BTreeSet::new();
    walk(&<Cli as clap::CommandFactory>::command(), &mut out);
    out.remove("OPTIMUS_CONFIG");
    out
}

/// A TOML value as the variable's text: strings as they are, numbers and
/// booleans written out, a list joined with commas; `routes` may be an
/// array of tables `{ source, target, maxlen, max_age, … }`.
fn as_setting(key: &str, value: &toml::Value) -> Result<String, String> {
    use toml::Value;
    Ok(match value {
        Value::String(s) => s.clone(),
        Value::Integer(n) => n.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Boolean(b) => b.to_string(),
        Value::Array(items) if key == "routes" && items.iter().all(Value::is_table) => items
            .iter()
            .map(route)
            .collect::<Result<Vec<_>, _>>()?
            .join(","),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::Array(_) | Value::Table(_) => {
                    Err("a list of strings, numbers or booleans".to_string())
                }
                item => as_setting(key, item),
            })
            .collect::<Result<Vec<_>, _>>()?
            .join(","),
        Value::Table(_) | Value::Datetime(_) => {
            return Err("expected a string, a number, a boolean or a list of them".into());
        }
    })
}

/// One route of `[[routes]]` as ROUTES writes it: `source=target;k=v…`.
fn route(item: &toml::Value) -> Result<String, String> {
    let table = item.as_table().expect("a table");
    let text = |name: &str| match table.get(name) {
        Some(toml::Value::String(s)) => Ok(s.clone()),
        _ => Err(format!("each route needs `{name}`, a string")),
    };
    let mut out = format!("{}={}", text("source")?, text("target")?);
    for (name, value) in table {
        if name != "source" && name != "target" {
            out += &format!(";{name}={}", as_setting(name, value)?);
        }
    }
    Ok(out)
}

/// ` (line N)` for a parse error's place.
fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    span.map(|span| {
        let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
        format!(" (line {line})")
    })
    .unwrap_or_default()
}

/// `optimus config`: the settings `optimus consume` would run with, as
/// TOML, each with where it came from; with `check`, only whether they are
/// good (exit 0, or 2 with the bad one's line).
pub fn show(check: bool) -> Result<(), Exit> {
    use clap::parser::ValueSource;
    let command = <Cli as clap::CommandFactory>::command();
    let matches = command
        .clone()
        .try_get_matches_from(["optimus", "consume"])
        .map_err(|err| Exit::Refused(super::usage_error(&err)))?;
    let from = match path() {
        Some(file) => format!("the environment and {}", file.display()),
        None => "the environment".to_string(),
    };
    if check {
        let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches)
            .map_err(|err| Exit::Refused(super::usage_error(&err)))?;
        cli.output()?;
        let super::Command::Consume(args) = &cli.command else {
            unreachable!("parsed as consume");
        };
        args.to_config(&cli.connect)?;
        super::controls::Controls::parse(&args.metrics_addr, &args.idle_timeout)?;
        println!("ok: the settings of optimus consume from {from}");
        return Ok(());
    }
    let consume = matches
        .subcommand_matches("consume")
        .expect("parsed as consume");
    let sub = command
        .find_subcommand("consume")
        .expect("a consume command");
    println!("# optimus consume's settings, from {from} and the defaults");
    let mut seen = BTreeSet::new();
    for arg in command.get_arguments().chain(sub.get_arguments()) {
        let Some(env) = arg.get_env().map(|e| e.to_string_lossy().into_owned()) else {
            continue;
        };
        if env == "OPTIMUS_CONFIG" || !seen.insert(env.clone()) {
            continue;
        }
        let id = arg.get_id().as_str();
        let found = [consume, &matches]
            .into_iter()
            .filter(|m| m.ids().any(|known| known.as_str() == id))
            .find_map(|m| Some((m.value_source(id)?, m.try_get_raw(id).ok()??)));
        let key = env.to_ascii_lowercase();
        let Some((source, raw)) = found else {
            println!("# {key} is not set");
            continue;
        };
        let value: Vec<String> = raw.map(|v| v.to_string_lossy().into_owned()).collect();
        let value = masked(&env, &value.join(","));
        let source = match source {
            ValueSource::DefaultValue => "default".to_string(),
            ValueSource::EnvVariable => match origin(&env) {
                Some(file) => format!("{}", file.display()),
                None => format!("environment ({env})"),
            },
            _ => "command line".to_string(),
        };
        println!("{key} = {}  # {source}", toml::Value::String(value));
    }
    Ok(())
}

/// A secret's value hidden: passwords, and the password in a URL (every
/// seed's, as the error lines mask them).
fn masked(var: &str, value: &str) -> String {
    if var.contains("PASSWORD") && !var.ends_with("_FILE") && !value.is_empty() {
        return "********".to_string();
    }
    match var {
        "REDIS_URL" => optimus::connect::mask_password(value),
        _ => value.to_string(),
    }
}
