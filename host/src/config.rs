//! The host's configuration: a TOML file parsed into raw serde structs, checked as a whole by
//! [`load`] (every problem reported, not just the first), and turned into a typed [`Config`].
//!
//! Secrets are never in the file: the file names environment variables, read through the
//! [`Env`] trait so tests never touch the process environment.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::time::Duration;

use serde::Deserialize;

use crate::journal::sqlite::{Options as JournalOptions, Synchronous};
use crate::journal::{DEFAULT_DEDUP_WINDOW, DEFAULT_MAX_PENDING, DEFAULT_RETENTION};
use crate::retry::{RetryPolicy, RetrySettings, parse_duration};

/// Address of the webhook listener when neither the file nor a flag sets one.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Address of the admin listener (health, plugins, events): loopback unless told otherwise.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// Largest request body a source accepts unless it sets `max_body_bytes`.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// How many plugin calls run at once, across all plugins.
pub const DEFAULT_WORKERS: usize = 16;
/// Where plugins are loaded from when nothing else says.
pub const DEFAULT_PLUGINS_DIR: &str = "plugins";
/// Where the journal lives when nothing else says.
pub const DEFAULT_DATA_DIR: &str = "data";
/// How long running plugin calls may take to finish once shutdown begins.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The typed, checked configuration the host runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where webhooks are received.
    pub listen: SocketAddr,
    /// Where the admin API listens.
    pub admin_listen: SocketAddr,
    /// The folder of `*.wasm` plugins (and their `*.toml` manifests).
    pub plugins_dir: PathBuf,
    /// The folder of the journal.
    pub data_dir: PathBuf,
    /// Bearer token the admin API requires, when the operator sets one.
    pub admin_token: Option<Secret>,
    /// How many plugin calls run at once.
    pub workers: usize,
    /// How long running calls may take to finish once shutdown begins.
    pub shutdown_grace: Duration,
    /// How the embedded journal behaves.
    pub journal: JournalOptions,
    /// How failed deliveries are retried, unless a plugin's manifest says otherwise.
    pub retry: RetryPolicy,
    /// The webhook sources, by name.
    pub sources: BTreeMap<String, SourceConfig>,
}

/// One configured webhook source, served at `POST /hooks/{name}`.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// How its requests are authenticated.
    pub verify: Verify,
    /// Largest body it accepts.
    pub max_body_bytes: usize,
    /// How long a delivery id is remembered to refuse repeats.
    pub dedup_window: Duration,
}

/// How a source authenticates its requests.
#[derive(Debug, Clone)]
pub enum Verify {
    /// GitHub's `X-Hub-Signature-256`; any of the secrets may match (key rotation).
    Github {
        /// The webhook secrets, newest first.
        secrets: Vec<Secret>,
    },
    /// No authentication at all: an explicit opt-in.
    None,
}

/// A secret value: compared, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<Vec<u8>>) -> Self {
        Secret(value.into())
    }

    /// The secret's bytes, for signing and comparing only.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Values from the command line that win over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`
    pub listen: Option<SocketAddr>,
    /// `--admin-listen`
    pub admin_listen: Option<SocketAddr>,
    /// `--plugins`
    pub plugins_dir: Option<PathBuf>,
    /// `--data`
    pub data_dir: Option<PathBuf>,
}

/// Where environment variables come from: the process, or a map in tests.
pub trait Env {
    /// The value of variable `name`, if it is set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// Why a configuration could not be used. Its text names the file and every problem found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The file parsed but its values are not usable.
    #[error("{path}: {}", problems.join("; "))]
    Invalid {
        /// The file, or `command line` when there is none.
        path: String,
        /// Every problem found.
        problems: Vec<String>,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    admin_listen: Option<String>,
    plugins_dir: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    admin_token_env: Option<String>,
    workers: Option<usize>,
    shutdown_grace: Option<String>,
    #[serde(default)]
    journal: RawJournal,
    #[serde(default)]
    retry: RetrySettings,
    #[serde(default)]
    sources: BTreeMap<String, RawSource>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJournal {
    synchronous: Option<Synchronous>,
    max_pending: Option<u64>,
    retention: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    verify: RawVerify,
    secret_env: Option<OneOrMany>,
    max_body_bytes: Option<usize>,
    dedup_window: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum RawVerify {
    Github,
    None,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

/// Reads the file at `path` (if any), applies `overrides`, and checks everything.
///
/// Relative paths in the file are relative to the file's folder; relative paths on the
/// command line are relative to the working directory.
pub fn load(path: Option<&Path>, overrides: Overrides, env: &dyn Env) -> Result<Config, ConfigError> {
    let (raw, label, base) = match path {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
            let raw = parse(&text, &path.display().to_string())?;
            let base = path.parent().map(Path::to_owned).unwrap_or_default();
            (raw, path.display().to_string(), base)
        }
        None => (RawConfig::default(), "command line".to_owned(), PathBuf::new()),
    };
    validate(raw, overrides, env, &base).map_err(|problems| ConfigError::Invalid { path: label, problems })
}

fn parse(text: &str, label: &str) -> Result<RawConfig, ConfigError> {
    toml::from_str(text)
        .map_err(|err| ConfigError::Parse { path: label.to_owned(), message: err.to_string().trim_end().to_owned() })
}

fn validate(raw: RawConfig, overrides: Overrides, env: &dyn Env, base: &Path) -> Result<Config, Vec<String>> {
    let mut problems = Vec::new();
    let mut address = |field: &str, value: Option<String>, flag: Option<SocketAddr>, default: &str| {
        if let Some(flag) = flag {
            return flag;
        }
        let text = value.unwrap_or_else(|| default.to_owned());
        text.parse().unwrap_or_else(|_| {
            problems.push(format!("{field} = {text:?} is not an address like \"127.0.0.1:8080\""));
            default.parse().expect("default addresses parse")
        })
    };
    let listen = address("listen", raw.listen, overrides.listen, DEFAULT_LISTEN);
    let admin_listen = address("admin_listen", raw.admin_listen, overrides.admin_listen, DEFAULT_ADMIN_LISTEN);

    let in_file = |path: Option<PathBuf>, default: &str| base.join(path.unwrap_or_else(|| default.into()));
    let plugins_dir = overrides.plugins_dir.unwrap_or_else(|| in_file(raw.plugins_dir, DEFAULT_PLUGINS_DIR));
    let data_dir = overrides.data_dir.unwrap_or_else(|| in_file(raw.data_dir, DEFAULT_DATA_DIR));

    let admin_token = raw.admin_token_env.and_then(|var| secret_from(env, &var, "admin_token_env", &mut problems));

    let workers = raw.workers.unwrap_or(DEFAULT_WORKERS);
    if workers == 0 {
        problems.push("workers must be at least 1".to_owned());
    }
    let shutdown_grace =
        duration(raw.shutdown_grace.as_deref(), "shutdown_grace", DEFAULT_SHUTDOWN_GRACE, &mut problems);
    let journal = JournalOptions {
        synchronous: raw.journal.synchronous.unwrap_or(Synchronous::Full),
        max_pending: raw.journal.max_pending.unwrap_or(DEFAULT_MAX_PENDING),
        retention: duration(raw.journal.retention.as_deref(), "journal.retention", DEFAULT_RETENTION, &mut problems),
    };
    if journal.max_pending == 0 {
        problems.push("journal.max_pending must be at least 1".to_owned());
    }
    let retry = raw.retry.apply(&RetryPolicy::default()).unwrap_or_else(|found| {
        problems.extend(found);
        RetryPolicy::default()
    });

    let mut sources = BTreeMap::new();
    for (name, source) in raw.sources {
        if let Some(source) = validate_source(&name, source, env, &mut problems) {
            sources.insert(name, source);
        }
    }

    if problems.is_empty() {
        Ok(Config {
            listen,
            admin_listen,
            plugins_dir,
            data_dir,
            admin_token,
            workers,
            shutdown_grace,
            journal,
            retry,
            sources,
        })
    } else {
        Err(problems)
    }
}

fn validate_source(name: &str, raw: RawSource, env: &dyn Env, problems: &mut Vec<String>) -> Option<SourceConfig> {
    let before = problems.len();
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        problems.push(format!("source name {name:?} may only hold a-z, 0-9, '-' and '_'"));
    }
    let max_body_bytes = raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
    if max_body_bytes == 0 {
        problems.push(format!("sources.{name}.max_body_bytes must be at least 1"));
    }
    let dedup_window =
        duration(raw.dedup_window.as_deref(), &format!("sources.{name}.dedup_window"), DEFAULT_DEDUP_WINDOW, problems);
    let vars = raw.secret_env.map(OneOrMany::into_vec).unwrap_or_default();
    let verify = match raw.verify {
        RawVerify::Github => {
            if vars.is_empty() {
                problems.push(format!(
                    "sources.{name}: verify = \"github\" needs secret_env = \"VARIABLE\" naming the variable that holds the webhook secret"
                ));
            }
            let field = format!("sources.{name}.secret_env");
            let secrets = vars.iter().filter_map(|var| secret_from(env, var, &field, problems)).collect();
            Verify::Github { secrets }
        }
        RawVerify::None => {
            if !vars.is_empty() {
                problems.push(format!("sources.{name}: verify = \"none\" takes no secret_env"));
            }
            Verify::None
        }
    };
    (problems.len() == before).then_some(SourceConfig { verify, max_body_bytes, dedup_window })
}

fn duration(text: Option<&str>, field: &str, default: Duration, problems: &mut Vec<String>) -> Duration {
    match text.map(parse_duration) {
        None => default,
        Some(Ok(duration)) => duration,
        Some(Err(err)) => {
            problems.push(format!("{field}: {err}"));
            default
        }
    }
}

fn secret_from(env: &dyn Env, var: &str, field: &str, problems: &mut Vec<String>) -> Option<Secret> {
    match env.var(var) {
        Some(value) if !value.is_empty() => Some(Secret::new(value)),
        Some(_) => {
            problems.push(format!("{field}: environment variable {var} is empty"));
            None
        }
        None => {
            problems.push(format!("{field}: environment variable {var} is not set"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn check(text: &str, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let raw = parse(text, "test.toml")?;
        validate(raw, Overrides::default(), env, Path::new("/etc/wasmhook"))
            .map_err(|problems| ConfigError::Invalid { path: "test.toml".into(), problems })
    }

    #[test]
    fn github_source_reads_every_rotated_secret() {
        let config = check(
            "[sources.github]\nverify = \"github\"\nsecret_env = [\"NEW\", \"OLD\"]\n",
            &env(&[("NEW", "n"), ("OLD", "o")]),
        )
        .expect("valid config");
        match &config.sources["github"].verify {
            Verify::Github { secrets } => {
                assert_eq!(secrets, &[Secret::new("n"), Secret::new("o")])
            }
            other => panic!("expected github, got {other:?}"),
        }
        assert_eq!(config.sources["github"].max_body_bytes, DEFAULT_MAX_BODY_BYTES);
    }

    #[test]
    fn missing_secret_variable_is_named() {
        let err = check("[sources.github]\nverify = \"github\"\nsecret_env = \"GH_SECRET\"\n", &env(&[]))
            .expect_err("secret is missing");
        let text = err.to_string();
        assert!(text.contains("GH_SECRET") && text.contains("not set"), "{text}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = check(
            "listen = \"nowhere\"\nworkers = 0\n[sources.a]\nverify = \"github\"\n[sources.b]\nverify = \"none\"\nsecret_env = \"X\"\n",
            &env(&[]),
        )
        .expect_err("four problems");
        let ConfigError::Invalid { problems, .. } = err else { panic!("expected Invalid") };
        assert_eq!(problems.len(), 4, "{problems:?}");
    }

    #[test]
    fn unknown_key_is_rejected_with_its_line() {
        let err = check("listen = \"127.0.0.1:1\"\nlisten_port = 3\n", &env(&[])).expect_err("unknown key");
        let text = err.to_string();
        assert!(text.contains("listen_port") && text.contains("line 2"), "{text}");
    }

    #[test]
    fn paths_are_relative_to_the_file_and_flags_win() {
        let config = check("plugins_dir = \"p\"\n", &env(&[])).expect("valid");
        assert_eq!(config.plugins_dir, Path::new("/etc/wasmhook/p"));
        assert_eq!(config.data_dir, Path::new("/etc/wasmhook/data"));
        let overrides = Overrides { plugins_dir: Some("here".into()), ..Overrides::default() };
        let config =
            validate(parse("plugins_dir = \"p\"\n", "t").expect("toml"), overrides, &env(&[]), Path::new("/x"))
                .expect("valid");
        assert_eq!(config.plugins_dir, Path::new("here"));
    }

    #[test]
    fn journal_retry_and_dedup_settings_are_read() {
        let config = check(
            "shutdown_grace = \"5s\"\n[journal]\nsynchronous = \"normal\"\nmax_pending = 10\nretention = \"1d\"\n\
             [retry]\nmax_attempts = 2\nfirst_delay = \"100ms\"\n[sources.ci]\nverify = \"none\"\ndedup_window = \"1h\"\n",
            &env(&[]),
        )
        .expect("valid");
        assert_eq!(config.shutdown_grace, Duration::from_secs(5));
        assert_eq!(config.journal.synchronous, Synchronous::Normal);
        assert_eq!((config.journal.max_pending, config.journal.retention), (10, Duration::from_secs(86_400)));
        assert_eq!((config.retry.max_attempts, config.retry.first_delay), (2, Duration::from_millis(100)));
        assert_eq!(config.sources["ci"].dedup_window, Duration::from_secs(3600));
        let defaults = check("", &env(&[])).expect("valid");
        assert_eq!(defaults.retry, RetryPolicy::default());
        assert_eq!(defaults.journal.synchronous, Synchronous::Full);
    }

    #[test]
    fn bad_durations_are_named() {
        let err = check("[journal]\nretention = \"forever\"\n", &env(&[])).expect_err("bad duration");
        assert!(err.to_string().contains("journal.retention"), "{err}");
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let config = check("admin_token_env = \"T\"\n", &env(&[("T", "hunter2")])).expect("valid");
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
