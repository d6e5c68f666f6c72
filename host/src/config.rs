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

use crate::journal::nats::Options as NatsOptions;
use crate::journal::nats::subjects::RESERVED_SOURCES;
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
pub const DEFAULT_WORKERS: usize = 32;
/// The most `workers` a host may run: each call holds an instance from the runtime's fixed pool
/// (`runtime::POOL_INSTANCES`), and a component's instance takes several of its core instances
/// and tables (three and two for the example plugins), besides those `reuse` keeps warm.
pub const MAX_WORKERS: usize = 256;
/// Where plugins are loaded from when nothing else says.
pub const DEFAULT_PLUGINS_DIR: &str = "plugins";
/// Where the journal lives when nothing else says.
pub const DEFAULT_DATA_DIR: &str = "data";
/// How long running plugin calls may take to finish once shutdown begins.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// A delivery's lease is its plugin's timeout plus this, unless configured.
pub const DEFAULT_LEASE_MARGIN: Duration = Duration::from_secs(30);
/// How long a request waits for room in a full journal before it is refused, unless configured.
pub const DEFAULT_MAX_PENDING_WAIT: Duration = Duration::from_millis(100);
/// The longest `max_pending_wait`: webhook senders give up after a few seconds (Slack after 3).
pub const MAX_MAX_PENDING_WAIT: Duration = Duration::from_secs(10);
/// The NATS server when `backend = "nats"` names none.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// The Redis server when `[dedup] backend = "redis"` names none.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// How long JetStream itself refuses a repeated (source, id), unless configured.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(2 * 60);

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
    /// How the embedded journal behaves (`max_pending` and `retention` apply to both backends).
    pub journal: JournalOptions,
    /// Which journal: the embedded SQLite file, or NATS JetStream shared by several hosts.
    pub backend: Backend,
    /// A delivery's lease is its plugin's timeout plus this.
    pub lease_margin: Duration,
    /// How long a request waits for room while the journal is at `max_pending` before the
    /// `503`.
    pub max_pending_wait: Duration,
    /// How failed deliveries are retried, unless a plugin's manifest says otherwise.
    pub retry: RetryPolicy,
    /// The webhook sources, by name.
    pub sources: BTreeMap<String, SourceConfig>,
}

/// Where the journal lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// The embedded SQLite file in the data folder (the default).
    Sqlite,
    /// A NATS JetStream stream (and optionally Redis) shared by several hosts.
    Nats(NatsOptions),
}

/// One configured webhook source, served at `POST /hooks/{name}`.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// How its requests are authenticated.
    pub verify: Verify,
    /// Where the generic schemes (`hmac`, `token`, `none`) find the event's id and type.
    pub identity: IdentityRules,
    /// Plain JSON webhooks, or CloudEvents.
    pub format: Format,
    /// Largest body it accepts.
    pub max_body_bytes: usize,
    /// How long a delivery id is remembered to refuse repeats.
    pub dedup_window: Duration,
}

/// What a source's requests carry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A JSON body; id and type come from the signature scheme.
    #[default]
    Json,
    /// CloudEvents 1.0 over HTTP: binary, structured or batch mode.
    Cloudevents,
}

/// How a source authenticates its requests. Every scheme with secrets accepts several, any
/// of which may match, so secrets rotate without downtime.
#[derive(Debug, Clone)]
pub enum Verify {
    /// GitHub's `X-Hub-Signature-256`.
    Github {
        /// The webhook secrets.
        secrets: Vec<Secret>,
    },
    /// Stripe's `Stripe-Signature`.
    Stripe {
        /// The endpoint secrets (`whsec_…`, used as written).
        secrets: Vec<Secret>,
        /// How far the signed timestamp may be from now.
        tolerance: Duration,
    },
    /// Slack's `X-Slack-Signature`.
    Slack {
        /// The signing secrets.
        secrets: Vec<Secret>,
        /// How far the signed timestamp may be from now.
        tolerance: Duration,
    },
    /// Standard Webhooks' `webhook-signature`.
    StandardWebhooks {
        /// The decoded key bytes (from `whsec_<base64>`).
        keys: Vec<Secret>,
        /// How far the signed timestamp may be from now.
        tolerance: Duration,
    },
    /// A configurable HMAC in a header.
    Hmac(HmacScheme),
    /// A shared secret sent as-is in a header.
    Token {
        /// The accepted tokens.
        secrets: Vec<Secret>,
        /// The header carrying it (lower-case).
        header: String,
    },
    /// No authentication at all: an explicit opt-in.
    None,
}

impl Verify {
    /// How far a signed timestamp may be from now, for the schemes that sign one.
    pub fn tolerance(&self) -> Option<Duration> {
        match self {
            Verify::Stripe { tolerance, .. }
            | Verify::Slack { tolerance, .. }
            | Verify::StandardWebhooks { tolerance, .. } => Some(*tolerance),
            Verify::Hmac(scheme) => scheme.timestamp_header.as_ref().map(|_| scheme.tolerance),
            Verify::Github { .. } | Verify::Token { .. } | Verify::None => None,
        }
    }
}

/// The `hmac` scheme's settings.
#[derive(Debug, Clone)]
pub struct HmacScheme {
    /// The secrets.
    pub secrets: Vec<Secret>,
    /// The header carrying the signature (lower-case).
    pub header: String,
    /// The hash.
    pub algorithm: Algorithm,
    /// How the signature is written.
    pub encoding: Encoding,
    /// Text before the encoded signature, such as `sha256=`.
    pub prefix: String,
    /// The header carrying a Unix timestamp that is part of the signed content.
    pub timestamp_header: Option<String>,
    /// How far that timestamp may be from now.
    pub tolerance: Duration,
    /// What is signed.
    pub signed: SignedContent,
}

/// The hash of an `hmac` source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// HMAC-SHA256.
    #[default]
    Sha256,
    /// HMAC-SHA512.
    Sha512,
}

/// How an `hmac` source writes its signature.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Lower- or upper-case hexadecimal.
    #[default]
    Hex,
    /// Standard base64 with padding.
    Base64,
}

/// The signed content of an `hmac` source: a template such as `{timestamp}.{body}` holding
/// `{body}` exactly once, and `{timestamp}` at most wherever it likes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedContent {
    before: String,
    after: String,
}

impl SignedContent {
    /// Checks and splits a template around its `{body}`.
    pub fn parse(template: &str) -> Result<Self, String> {
        let (before, after) = template
            .split_once("{body}")
            .filter(|(_, after)| !after.contains("{body}"))
            .ok_or_else(|| format!("signed = {template:?} must hold {{body}} exactly once"))?;
        let stripped = template.replace("{body}", "").replace("{timestamp}", "");
        if stripped.contains('{') || stripped.contains('}') {
            return Err(format!("signed = {template:?} may only use {{body}} and {{timestamp}}"));
        }
        Ok(SignedContent { before: before.to_owned(), after: after.to_owned() })
    }

    /// Whether the template signs the timestamp.
    pub fn uses_timestamp(&self) -> bool {
        self.before.contains("{timestamp}") || self.after.contains("{timestamp}")
    }

    /// The text before and after the body, with `timestamp` filled in.
    pub fn around_body(&self, timestamp: &str) -> (String, String) {
        (self.before.replace("{timestamp}", timestamp), self.after.replace("{timestamp}", timestamp))
    }
}

/// Where a generic source finds the event's id and type. By default the id is the body's
/// SHA-256 and the type comes from the body's `/type`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityRules {
    /// A header holding the delivery id (lower-case).
    pub id_header: Option<String>,
    /// A JSON pointer to the delivery id in the body.
    pub id_pointer: Option<String>,
    /// A header holding the event type (lower-case).
    pub type_header: Option<String>,
    /// A JSON pointer to the event type in the body.
    pub type_pointer: Option<String>,
}

/// A secret value: compared, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<Vec<u8>>) -> Self {
        Secret(value.into())
    }

    /// The key bytes of a Standard Webhooks secret written as `whsec_<base64>` (the prefix is
    /// optional).
    pub fn from_standard_webhooks(text: &str) -> Result<Self, String> {
        use base64::Engine;
        let encoded = text.trim();
        match base64::engine::general_purpose::STANDARD.decode(encoded.strip_prefix("whsec_").unwrap_or(encoded)) {
            Ok(key) if key.is_empty() => Err("holds no key after whsec_ (an empty key signs nothing)".to_owned()),
            Ok(key) => Ok(Secret(key)),
            Err(_) => Err("is not a Standard Webhooks secret (whsec_ followed by base64)".to_owned()),
        }
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
    dedup: RawDedup,
    #[serde(default)]
    retry: RetrySettings,
    #[serde(default)]
    sources: BTreeMap<String, RawSource>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJournal {
    backend: Option<BackendKind>,
    synchronous: Option<Synchronous>,
    max_pending: Option<u64>,
    max_pending_wait: Option<String>,
    retention: Option<String>,
    lease_margin: Option<String>,
    url: Option<String>,
    url_env: Option<String>,
    stream: Option<String>,
    prefix: Option<String>,
    replicas: Option<usize>,
    duplicate_window: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum BackendKind {
    #[default]
    Sqlite,
    Nats,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDedup {
    backend: Option<DedupKind>,
    url: Option<String>,
    url_env: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum DedupKind {
    /// The journal's own dedup (SQLite's table, or JetStream's duplicate window).
    #[default]
    Journal,
    Redis,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    verify: RawVerify,
    secret_env: Option<OneOrMany>,
    max_body_bytes: Option<usize>,
    dedup_window: Option<String>,
    format: Option<Format>,
    tolerance: Option<String>,
    header: Option<String>,
    algorithm: Option<Algorithm>,
    encoding: Option<Encoding>,
    prefix: Option<String>,
    timestamp_header: Option<String>,
    signed: Option<String>,
    id_header: Option<String>,
    id_pointer: Option<String>,
    type_header: Option<String>,
    type_pointer: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum RawVerify {
    Github,
    Stripe,
    Slack,
    StandardWebhooks,
    Hmac,
    Token,
    None,
}

impl RawVerify {
    fn name(self) -> &'static str {
        match self {
            RawVerify::Github => "github",
            RawVerify::Stripe => "stripe",
            RawVerify::Slack => "slack",
            RawVerify::StandardWebhooks => "standard-webhooks",
            RawVerify::Hmac => "hmac",
            RawVerify::Token => "token",
            RawVerify::None => "none",
        }
    }

    /// The optional keys this scheme takes, beyond those every source takes.
    fn keys(self) -> &'static [&'static str] {
        const IDENTITY: [&str; 4] = ["id_header", "id_pointer", "type_header", "type_pointer"];
        match self {
            RawVerify::Github => &[],
            RawVerify::Stripe | RawVerify::Slack | RawVerify::StandardWebhooks => &["tolerance"],
            RawVerify::Hmac => &[
                "tolerance",
                "header",
                "algorithm",
                "encoding",
                "prefix",
                "timestamp_header",
                "signed",
                IDENTITY[0],
                IDENTITY[1],
                IDENTITY[2],
                IDENTITY[3],
            ],
            RawVerify::Token => &["header", IDENTITY[0], IDENTITY[1], IDENTITY[2], IDENTITY[3]],
            RawVerify::None => &IDENTITY,
        }
    }
}

/// How far a signed timestamp may be from now unless the source says otherwise.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

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

    if !is_loopback(admin_listen) && raw.admin_token_env.is_none() {
        problems.push(format!(
            "admin_listen {admin_listen} is beyond loopback, so admin_token_env must name the variable \
             holding its bearer token: the admin API replays and purges events"
        ));
    }
    let admin_token =
        raw.admin_token_env.and_then(|var| exact_secret_from(env, &var, "admin_token_env", &mut problems));

    let workers = raw.workers.unwrap_or(DEFAULT_WORKERS);
    if workers == 0 {
        problems.push("workers must be at least 1".to_owned());
    }
    if workers > MAX_WORKERS {
        problems.push(format!(
            "workers = {workers} is over {MAX_WORKERS}: the runtime's pool of plugin instances could not serve them"
        ));
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
    let lease_margin =
        duration(raw.journal.lease_margin.as_deref(), "journal.lease_margin", DEFAULT_LEASE_MARGIN, &mut problems);
    let max_pending_wait = duration(
        raw.journal.max_pending_wait.as_deref(),
        "journal.max_pending_wait",
        DEFAULT_MAX_PENDING_WAIT,
        &mut problems,
    );
    if max_pending_wait > MAX_MAX_PENDING_WAIT {
        problems.push(format!(
            "journal.max_pending_wait = {} is over {}: senders would give up before the answer",
            humantime::format_duration(max_pending_wait),
            humantime::format_duration(MAX_MAX_PENDING_WAIT)
        ));
    }
    let backend = validate_backend(&raw.journal, &raw.dedup, &journal, env, &mut problems);
    if matches!(backend, Backend::Nats(_)) {
        for name in raw.sources.keys().filter(|name| RESERVED_SOURCES.contains(&name.as_str())) {
            problems.push(format!("source name {name:?} is reserved by the nats backend's subjects"));
        }
    }
    let retry = raw.retry.apply(&RetryPolicy::default()).unwrap_or_else(|found| {
        problems.extend(found);
        RetryPolicy::default()
    });

    let mut sources = BTreeMap::new();
    for (name, source) in raw.sources {
        if let Some(source) = validate_source(&name, source, listen, env, &mut problems) {
            sources.insert(name, source);
        }
    }
    if matches!(backend, Backend::Sqlite) {
        check_retention_covers_dedup(journal.retention, &sources, &mut problems);
    }
    check_dedup_outlasts_tolerance(&backend, &sources, &mut problems);

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
            backend,
            lease_margin,
            max_pending_wait,
            retry,
            sources,
        })
    } else {
        Err(problems)
    }
}

/// The journal backend the `[journal]` and `[dedup]` sections choose, with each problem named.
fn validate_backend(
    raw: &RawJournal,
    dedup: &RawDedup,
    journal: &JournalOptions,
    env: &dyn Env,
    problems: &mut Vec<String>,
) -> Backend {
    let nats_keys = [
        ("url", raw.url.is_some()),
        ("url_env", raw.url_env.is_some()),
        ("stream", raw.stream.is_some()),
        ("prefix", raw.prefix.is_some()),
        ("replicas", raw.replicas.is_some()),
        ("duplicate_window", raw.duplicate_window.is_some()),
    ];
    let redis = dedup.backend.unwrap_or_default() == DedupKind::Redis;
    if !redis && (dedup.url.is_some() || dedup.url_env.is_some()) {
        problems.push("dedup.url and dedup.url_env are for backend = \"redis\"".to_owned());
    }
    if raw.backend.unwrap_or_default() == BackendKind::Sqlite {
        for (key, _) in nats_keys.iter().filter(|(_, given)| *given) {
            problems.push(format!("journal.{key} is for backend = \"nats\""));
        }
        if redis {
            problems.push("dedup backend = \"redis\" needs journal backend = \"nats\"".to_owned());
        }
        return Backend::Sqlite;
    }
    if raw.synchronous.is_some() {
        problems.push("journal.synchronous is for backend = \"sqlite\"".to_owned());
    }
    let url = url_from(raw.url.as_deref(), raw.url_env.as_deref(), "journal", DEFAULT_NATS_URL, env, problems);
    let redis_url = redis
        .then(|| url_from(dedup.url.as_deref(), dedup.url_env.as_deref(), "dedup", DEFAULT_REDIS_URL, env, problems));
    let stream = raw.stream.clone().unwrap_or_else(|| "WASMHOOK".to_owned());
    if !is_name(&stream) {
        problems.push(format!("journal.stream {stream:?} may only hold A-Z, a-z, 0-9, '-' and '_'"));
    }
    let prefix = raw.prefix.clone().unwrap_or_else(|| "wasmhook".to_owned());
    if !prefix.split('.').all(is_name) {
        problems.push(format!("journal.prefix {prefix:?} must be dot-separated tokens of A-Z, a-z, 0-9, '-' and '_'"));
    }
    let replicas = raw.replicas.unwrap_or(1);
    if !(1..=5).contains(&replicas) {
        problems.push(format!("journal.replicas must be 1 to 5, not {replicas}"));
    }
    let duplicate_window =
        duration(raw.duplicate_window.as_deref(), "journal.duplicate_window", DEFAULT_DUPLICATE_WINDOW, problems);
    if journal.retention < duplicate_window.max(Duration::from_secs(1)) {
        problems.push(format!(
            "journal.retention ({}) must be at least journal.duplicate_window ({}) with backend = \"nats\" \
             (JetStream refuses a shorter one, and reads 0 as keep for ever)",
            humantime::format_duration(journal.retention),
            humantime::format_duration(duplicate_window)
        ));
    }
    if redis_url.is_some() && duplicate_window < crate::journal::nats::dedup::CLAIM {
        problems.push(format!(
            "journal.duplicate_window must be at least {} s with Redis dedup (the claim a host holds while it stores)",
            crate::journal::nats::dedup::CLAIM.as_secs()
        ));
    }
    Backend::Nats(NatsOptions {
        url,
        stream,
        prefix,
        replicas,
        duplicate_window,
        retention: journal.retention,
        max_pending: journal.max_pending,
        redis_url,
    })
}

/// A server URL given as `url` or, when it holds credentials, as the variable `url_env`.
fn url_from(
    url: Option<&str>,
    url_env: Option<&str>,
    section: &str,
    default: &str,
    env: &dyn Env,
    problems: &mut Vec<String>,
) -> String {
    match (url, url_env) {
        (Some(_), Some(_)) => {
            problems.push(format!("{section}.url and {section}.url_env are exclusive; give one"));
            String::new()
        }
        (Some(url), None) => url.to_owned(),
        (None, Some(var)) => secret_from(env, var, &format!("{section}.url_env"), problems)
            .map(|secret| String::from_utf8_lossy(secret.expose()).into_owned())
            .unwrap_or_default(),
        (None, None) => default.to_owned(),
    }
}

fn is_name(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn validate_source(
    name: &str,
    raw: RawSource,
    listen: SocketAddr,
    env: &dyn Env,
    problems: &mut Vec<String>,
) -> Option<SourceConfig> {
    let before = problems.len();
    let field = |key: &str| format!("sources.{name}.{key}");
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        problems.push(format!("source name {name:?} may only hold a-z, 0-9, '-' and '_'"));
    }
    let scheme = raw.verify;
    let given = [
        ("tolerance", raw.tolerance.is_some()),
        ("header", raw.header.is_some()),
        ("algorithm", raw.algorithm.is_some()),
        ("encoding", raw.encoding.is_some()),
        ("prefix", raw.prefix.is_some()),
        ("timestamp_header", raw.timestamp_header.is_some()),
        ("signed", raw.signed.is_some()),
        ("id_header", raw.id_header.is_some()),
        ("id_pointer", raw.id_pointer.is_some()),
        ("type_header", raw.type_header.is_some()),
        ("type_pointer", raw.type_pointer.is_some()),
    ];
    for (key, present) in given {
        if present && !scheme.keys().contains(&key) {
            problems.push(format!("{} does not apply to verify = \"{}\"", field(key), scheme.name()));
        }
    }
    let max_body_bytes = raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
    if max_body_bytes == 0 {
        problems.push(format!("{} must be at least 1", field("max_body_bytes")));
    }
    let dedup_window = duration(raw.dedup_window.as_deref(), &field("dedup_window"), DEFAULT_DEDUP_WINDOW, problems);
    let tolerance = duration(raw.tolerance.as_deref(), &field("tolerance"), DEFAULT_TOLERANCE, problems);
    let format = raw.format.unwrap_or_default();

    let vars = raw.secret_env.map(OneOrMany::into_vec).unwrap_or_default();
    if scheme == RawVerify::None {
        if !vars.is_empty() {
            problems.push(format!("sources.{name}: verify = \"none\" takes no secret_env"));
        }
        if format == Format::Cloudevents && !is_loopback(listen) {
            problems.push(format!(
                "sources.{name}: unsigned CloudEvents (verify = \"none\") are only allowed while listen is on loopback"
            ));
        }
    } else if vars.is_empty() {
        problems.push(format!(
            "sources.{name}: verify = \"{}\" needs secret_env = \"VARIABLE\" naming the variable that holds the secret",
            scheme.name()
        ));
    }
    let secret_field = field("secret_env");
    let secrets: Vec<Secret> = if scheme == RawVerify::None {
        Vec::new()
    } else {
        vars.iter()
            .filter_map(|var| {
                if scheme != RawVerify::StandardWebhooks {
                    return exact_secret_from(env, var, &secret_field, problems);
                }
                let secret = secret_from(env, var, &secret_field, problems)?;
                Secret::from_standard_webhooks(&String::from_utf8_lossy(secret.expose()))
                    .map_err(|err| problems.push(format!("{secret_field}: the value of {var} {err}")))
                    .ok()
            })
            .collect()
    };
    let mut header_name = |key: &str, value: Option<String>| {
        let value = value?;
        match hyper::header::HeaderName::from_bytes(value.as_bytes()) {
            Ok(header) => Some(header.as_str().to_owned()),
            Err(_) => {
                problems.push(format!("{} = {value:?} is not a header name", field(key)));
                None
            }
        }
    };
    let header = header_name("header", raw.header);
    let timestamp_header = header_name("timestamp_header", raw.timestamp_header);
    let identity = IdentityRules {
        id_header: header_name("id_header", raw.id_header),
        id_pointer: raw.id_pointer,
        type_header: header_name("type_header", raw.type_header),
        type_pointer: raw.type_pointer,
    };
    for (key, pointer) in [("id_pointer", &identity.id_pointer), ("type_pointer", &identity.type_pointer)] {
        if pointer.as_ref().is_some_and(|pointer| !pointer.starts_with('/')) {
            problems.push(format!("{} must be a JSON pointer such as \"/id\"", field(key)));
        }
    }
    if identity.id_header.is_some() && identity.id_pointer.is_some() {
        problems.push(format!("sources.{name}: give id_header or id_pointer, not both"));
    }
    if identity.type_header.is_some() && identity.type_pointer.is_some() {
        problems.push(format!("sources.{name}: give type_header or type_pointer, not both"));
    }
    if matches!(scheme, RawVerify::Hmac | RawVerify::Token) && header.is_none() {
        problems.push(format!("sources.{name}: verify = \"{}\" needs header = \"…\"", scheme.name()));
    }

    let verify = match scheme {
        RawVerify::Github => Verify::Github { secrets },
        RawVerify::Stripe => Verify::Stripe { secrets, tolerance },
        RawVerify::Slack => Verify::Slack { secrets, tolerance },
        RawVerify::StandardWebhooks => Verify::StandardWebhooks { keys: secrets, tolerance },
        RawVerify::Token => Verify::Token { secrets, header: header.unwrap_or_default() },
        RawVerify::None => Verify::None,
        RawVerify::Hmac => {
            let default = if timestamp_header.is_some() { "{timestamp}.{body}" } else { "{body}" };
            let signed = SignedContent::parse(raw.signed.as_deref().unwrap_or(default)).unwrap_or_else(|err| {
                problems.push(format!("{}: {err}", field("signed")));
                SignedContent { before: String::new(), after: String::new() }
            });
            if signed.uses_timestamp() != timestamp_header.is_some() {
                problems
                    .push(format!("sources.{name}: signed uses {{timestamp}} exactly when timestamp_header is set"));
            }
            if raw.tolerance.is_some() && timestamp_header.is_none() {
                problems.push(format!("{} needs timestamp_header", field("tolerance")));
            }
            Verify::Hmac(HmacScheme {
                secrets,
                header: header.unwrap_or_default(),
                algorithm: raw.algorithm.unwrap_or_default(),
                encoding: raw.encoding.unwrap_or_default(),
                prefix: raw.prefix.unwrap_or_default(),
                timestamp_header,
                tolerance,
                signed,
            })
        }
    };
    (problems.len() == before).then_some(SourceConfig { verify, identity, format, max_body_bytes, dedup_window })
}

/// The embedded journal keeps each event as its own dedup key until its window ends, so a
/// retention shorter than a window would leave housekeeping re-reading, every round, events
/// it may not remove yet: the retention must cover every source's window and the one of the
/// events plugins emit.
fn check_retention_covers_dedup(
    retention: Duration,
    sources: &BTreeMap<String, SourceConfig>,
    problems: &mut Vec<String>,
) {
    let windows = sources
        .iter()
        .map(|(name, source)| (format!("sources.{name}.dedup_window"), source.dedup_window))
        .chain([("the events plugins emit".to_owned(), DEFAULT_DEDUP_WINDOW)]);
    if let Some((whose, window)) = windows.filter(|(_, window)| *window > retention).max_by_key(|(_, window)| *window) {
        problems.push(format!(
            "journal.retention = \"{}\" is shorter than the dedup window of {whose} ({}): with backend = \"sqlite\" \
             an event is its own dedup key, so it is kept at least that long; set retention to {} or more",
            humantime::format_duration(retention),
            humantime::format_duration(window),
            humantime::format_duration(window),
        ));
    }
}

/// A signed timestamp stops a replayed request only once it is too old, and until then only
/// dedup does: the id must be remembered for as long as the timestamp passes, which is up to
/// twice `tolerance` after the first acceptance (a timestamp may be ahead of the clock or behind
/// it). A source's own `dedup_window` is checked here; on NATS without Redis the window is the
/// stream's, which the host reads only once connected ([`short_replay_windows`]).
fn check_dedup_outlasts_tolerance(
    backend: &Backend,
    sources: &BTreeMap<String, SourceConfig>,
    problems: &mut Vec<String>,
) {
    if matches!(backend, Backend::Nats(nats) if nats.redis_url.is_none()) {
        return;
    }
    for (name, tolerance, window) in outlasting_timestamps(sources, |source| source.dedup_window) {
        problems.push(format!(
            "sources.{name}.tolerance ({}) needs sources.{name}.dedup_window of at least twice that, not {}: \
             a signed request replayed after its id is forgotten, while its timestamp still passes, would be \
             stored again; lower tolerance or lengthen the window",
            humantime::format_duration(tolerance),
            humantime::format_duration(window),
        ));
    }
}

/// The sources whose signed timestamps pass for longer than half their dedup window
/// (`window_of`), with their tolerance and that window.
fn outlasting_timestamps(
    sources: &BTreeMap<String, SourceConfig>,
    window_of: impl Fn(&SourceConfig) -> Duration,
) -> impl Iterator<Item = (&String, Duration, Duration)> {
    sources.iter().filter_map(move |(name, source)| {
        let (tolerance, window) = (source.verify.tolerance()?, window_of(source));
        (window < tolerance * 2).then_some((name, tolerance, window))
    })
}

/// The sources whose signed timestamps outlast `window`, the only dedup on NATS without Redis,
/// each with a sentence for the log: a request replayed after the window, while its timestamp
/// still passes, is stored again.
pub fn short_replay_windows(sources: &BTreeMap<String, SourceConfig>, window: Duration) -> Vec<String> {
    outlasting_timestamps(sources, |_| window)
        .map(|(name, tolerance, window)| {
            format!(
                "sources.{name}.tolerance ({}) is more than half of the stream's duplicate window ({}), the only \
                 dedup without [dedup] backend = \"redis\": a signed request replayed after the window, while its \
                 timestamp still passes, is stored again; use Redis, or a tolerance of at most half the window",
                humantime::format_duration(tolerance),
                humantime::format_duration(window),
            )
        })
        .collect()
}

/// Whether `address` is reachable from this machine only: `127.0.0.0/8`, `::1`, or an IPv4
/// loopback address mapped into IPv6 (`::ffff:127.0.0.1`).
pub fn is_loopback(address: SocketAddr) -> bool {
    address.ip().to_canonical().is_loopback()
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

/// [`secret_from`] for a secret used as written: one that starts or ends with white space (a
/// line break left by a file, most often) could never match what a sender signs or sends, so
/// it is refused rather than answering `401` to every request.
fn exact_secret_from(env: &dyn Env, var: &str, field: &str, problems: &mut Vec<String>) -> Option<Secret> {
    let secret = secret_from(env, var, field, problems)?;
    let text = secret.expose();
    if text.first().is_some_and(u8::is_ascii_whitespace) || text.last().is_some_and(u8::is_ascii_whitespace) {
        problems.push(format!(
            "{field}: the value of {var} starts or ends with white space (a line break from a file?); remove it"
        ));
        return None;
    }
    Some(secret)
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
    fn workers_beyond_what_the_instance_pool_serves_are_refused() {
        assert!(check(&format!("workers = {MAX_WORKERS}\n"), &env(&[])).is_ok());
        let err = check(&format!("workers = {}\n", MAX_WORKERS + 1), &env(&[])).expect_err("too many");
        assert!(err.to_string().contains("workers = 257 is over 256"), "{err}");
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
    fn every_scheme_reads_its_own_keys() {
        let config = check(
            "[sources.stripe]\nverify = \"stripe\"\nsecret_env = \"S\"\ntolerance = \"10m\"\n\
             [sources.svix]\nverify = \"standard-webhooks\"\nsecret_env = \"W\"\n\
             [sources.gitlab]\nverify = \"token\"\nsecret_env = \"T\"\nheader = \"X-Gitlab-Token\"\ntype_header = \"X-Gitlab-Event\"\n\
             [sources.custom]\nverify = \"hmac\"\nsecret_env = \"S\"\nheader = \"X-Sig\"\nalgorithm = \"sha512\"\nencoding = \"base64\"\n\
             timestamp_header = \"X-Ts\"\nid_pointer = \"/id\"\n",
            &env(&[("S", "s"), ("W", "whsec_Zm9v"), ("T", "t")]),
        )
        .expect("valid");
        assert!(
            matches!(config.sources["stripe"].verify, Verify::Stripe { tolerance, .. } if tolerance == Duration::from_secs(600))
        );
        assert!(
            matches!(&config.sources["svix"].verify, Verify::StandardWebhooks { keys, .. } if keys[0].expose() == b"foo")
        );
        assert!(matches!(&config.sources["gitlab"].verify, Verify::Token { header, .. } if header == "x-gitlab-token"));
        assert_eq!(config.sources["gitlab"].identity.type_header.as_deref(), Some("x-gitlab-event"));
        let Verify::Hmac(hmac) = &config.sources["custom"].verify else { panic!("hmac") };
        assert_eq!(
            (hmac.algorithm, hmac.encoding, hmac.header.as_str()),
            (Algorithm::Sha512, Encoding::Base64, "x-sig")
        );
        assert_eq!(hmac.signed.around_body("7"), ("7.".to_owned(), String::new()));
    }

    #[test]
    fn keys_of_another_scheme_and_incomplete_schemes_are_refused() {
        let err = check("[sources.gh]\nverify = \"github\"\nsecret_env = \"S\"\nheader = \"X\"\n", &env(&[("S", "s")]))
            .expect_err("header on github");
        assert!(err.to_string().contains("sources.gh.header does not apply to verify = \"github\""), "{err}");
        let err = check(
            "[sources.h]\nverify = \"hmac\"\nsecret_env = \"S\"\nsigned = \"{timestamp}{body}\"\n",
            &env(&[("S", "s")]),
        )
        .expect_err("no header, timestamp without header");
        let text = err.to_string();
        assert!(text.contains("needs header") && text.contains("timestamp_header"), "{text}");
        assert!(SignedContent::parse("{body}{body}").is_err());
        assert!(SignedContent::parse("{id}.{body}").is_err());
    }

    #[test]
    fn a_malformed_standard_webhooks_secret_names_its_variable_not_its_value() {
        let err = check(
            "[sources.w]\nverify = \"standard-webhooks\"\nsecret_env = \"W\"\n",
            &env(&[("W", "whsec_!!secret!!")]),
        )
        .expect_err("not base64");
        let text = err.to_string();
        assert!(text.contains("W ") && !text.contains("!!secret!!"), "{text}");
    }

    #[test]
    fn a_bad_standard_webhooks_secret_is_named_by_its_own_variable() {
        let source = "[sources.w]\nverify = \"standard-webhooks\"\nsecret_env = [\"A\", \"B\"]\n";
        let err = check(source, &env(&[("B", "whsec_!!")])).expect_err("A unset, B malformed");
        let text = err.to_string();
        assert!(text.contains("A is not set") || text.contains("variable A"), "{text}");
        assert!(text.contains("the value of B "), "{text}");
    }

    #[test]
    fn a_secret_with_a_trailing_line_break_is_refused_naming_its_variable() {
        let github = "[sources.gh]\nverify = \"github\"\nsecret_env = \"S\"\n";
        let err = check(github, &env(&[("S", "s3cret\n")])).expect_err("never matches");
        let text = err.to_string();
        assert!(text.contains("the value of S starts or ends with white space") && !text.contains("s3cret"), "{text}");
        assert!(check(github, &env(&[("S", "two words")])).is_ok(), "white space inside is the sender's business");
        let token = "admin_token_env = \"T\"\n";
        assert!(check(token, &env(&[("T", " t0ken")])).is_err());
    }

    #[test]
    fn the_dedup_window_must_outlast_a_signed_timestamps_tolerance_both_ways() {
        let stripe = "[sources.stripe]\nverify = \"stripe\"\nsecret_env = \"S\"\n";
        let secret = env(&[("S", "whsec_x")]);
        let err = check(&format!("{stripe}dedup_window = \"9m\"\n"), &secret).expect_err("9m < 2 x 5m");
        assert!(err.to_string().contains("sources.stripe.tolerance (5m) needs sources.stripe.dedup_window"), "{err}");
        assert!(check(&format!("{stripe}dedup_window = \"10m\"\n"), &secret).is_ok());
        assert!(check(&format!("{stripe}dedup_window = \"9m\"\ntolerance = \"4m\"\n"), &secret).is_ok());
        // GitHub signs no timestamp: nothing to outlast.
        let github = "[sources.gh]\nverify = \"github\"\nsecret_env = \"S\"\ndedup_window = \"1s\"\n";
        assert!(check(github, &secret).is_ok());
        // With Redis on NATS, the source's own window counts.
        let nats = "[journal]\nbackend = \"nats\"\n";
        let redis = format!("{nats}[dedup]\nbackend = \"redis\"\n{stripe}");
        assert!(check(&redis, &secret).is_ok());
        assert!(check(&format!("{redis}dedup_window = \"9m\"\n"), &secret).is_err());
        // Without Redis, JetStream's duplicate window is the only dedup: the host warns once it
        // has read the stream's own window, which may not be the configured one.
        let config = check(&format!("{nats}{stripe}"), &secret).expect("starts");
        let warnings = short_replay_windows(&config.sources, Duration::from_secs(120));
        assert!(warnings.len() == 1 && warnings[0].contains("sources.stripe.tolerance (5m)"), "{warnings:?}");
        assert!(short_replay_windows(&config.sources, Duration::from_secs(600)).is_empty());
    }

    #[test]
    fn a_standard_webhooks_secret_with_no_key_after_its_prefix_is_refused() {
        let source = "[sources.w]\nverify = \"standard-webhooks\"\nsecret_env = \"W\"\n";
        for empty in ["whsec_", " whsec_ "] {
            let err = check(source, &env(&[("W", empty)])).expect_err("an empty key would sign nothing");
            assert!(err.to_string().contains("W holds no key"), "{empty:?}: {err}");
        }
        assert!(check(source, &env(&[("W", "whsec_Zm9v")])).is_ok());
    }

    #[test]
    fn unsigned_cloudevents_are_refused_beyond_loopback() {
        let source = "[sources.ce]\nverify = \"none\"\nformat = \"cloudevents\"\n";
        assert!(check(source, &env(&[])).is_ok());
        let err = check(&format!("listen = \"0.0.0.0:8080\"\n{source}"), &env(&[])).expect_err("public");
        assert!(err.to_string().contains("loopback"), "{err}");
    }

    #[test]
    fn an_admin_api_beyond_loopback_needs_a_token() {
        let public = "admin_listen = \"0.0.0.0:9090\"\n";
        let err = check(public, &env(&[])).expect_err("public without a token");
        assert!(err.to_string().contains("admin_token_env"), "{err}");
        assert!(check(&format!("{public}admin_token_env = \"T\"\n"), &env(&[("T", "hunter2")])).is_ok());
        assert!(check("admin_listen = \"127.0.0.1:9090\"\n", &env(&[])).is_ok(), "loopback needs none");
        assert!(check("admin_listen = \"[::1]:9090\"\n", &env(&[])).is_ok(), "nor IPv6's");
        assert!(check("admin_listen = \"[::ffff:127.0.0.1]:9090\"\n", &env(&[])).is_ok(), "nor a mapped one");
    }

    #[test]
    fn the_embedded_journal_keeps_events_for_their_dedup_window_at_least() {
        let err = check("[journal]\nretention = \"1h\"\n", &env(&[])).expect_err("shorter than emitted events' window");
        assert!(err.to_string().contains("the events plugins emit (1day)"), "{err}");
        let long_source = "[journal]\nretention = \"2d\"\n[sources.ci]\nverify = \"none\"\ndedup_window = \"3d\"\n";
        let err = check(long_source, &env(&[])).expect_err("shorter than a source's window");
        assert!(err.to_string().contains("sources.ci.dedup_window (3days)"), "{err}");
        assert!(check("[journal]\nretention = \"1d\"\n", &env(&[])).is_ok(), "equal is enough");
    }

    #[test]
    fn bad_durations_are_named() {
        let err = check("[journal]\nretention = \"forever\"\n", &env(&[])).expect_err("bad duration");
        assert!(err.to_string().contains("journal.retention"), "{err}");
    }

    #[test]
    fn the_wait_for_room_defaults_to_a_tenth_of_a_second_and_stays_under_senders_timeouts() {
        assert_eq!(check("", &env(&[])).expect("valid").max_pending_wait, DEFAULT_MAX_PENDING_WAIT);
        let config = check("[journal]\nmax_pending_wait = \"0s\"\n", &env(&[])).expect("zero refuses at once");
        assert_eq!(config.max_pending_wait, Duration::ZERO);
        let err = check("[journal]\nmax_pending_wait = \"30s\"\n", &env(&[])).expect_err("longer than senders wait");
        assert!(err.to_string().contains("journal.max_pending_wait = 30s is over 10s"), "{err}");
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let config = check("admin_token_env = \"T\"\n", &env(&[("T", "hunter2")])).expect("valid");
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn the_nats_backend_has_defaults_and_reads_its_url_from_the_environment() {
        let config = check("[journal]\nbackend = \"nats\"\n", &env(&[])).expect("valid");
        let Backend::Nats(options) = &config.backend else { panic!("not nats: {:?}", config.backend) };
        assert_eq!((options.url.as_str(), options.stream.as_str()), (DEFAULT_NATS_URL, "WASMHOOK"));
        assert_eq!((options.prefix.as_str(), options.replicas, options.redis_url.as_deref()), ("wasmhook", 1, None));
        assert_eq!(config.lease_margin, DEFAULT_LEASE_MARGIN);

        let text = "[journal]\nbackend = \"nats\"\nurl_env = \"NATS_URL\"\nlease_margin = \"5s\"\n\
                    [dedup]\nbackend = \"redis\"\n";
        let config = check(text, &env(&[("NATS_URL", "nats://user:hunter2@nats.example:4222")])).expect("valid");
        let Backend::Nats(options) = &config.backend else { panic!("not nats") };
        assert_eq!(options.url, "nats://user:hunter2@nats.example:4222");
        assert_eq!(
            (options.redis_url.as_deref(), config.lease_margin),
            (Some(DEFAULT_REDIS_URL), Duration::from_secs(5))
        );
        assert!(!format!("{config:?}").contains("hunter2"), "credentials in debug output");
    }

    #[test]
    fn backend_settings_in_the_wrong_place_are_named() {
        let cases = [
            ("[journal]\nurl = \"nats://x\"\n", "journal.url is for backend = \"nats\""),
            ("[dedup]\nbackend = \"redis\"\n", "needs journal backend = \"nats\""),
            ("[dedup]\nurl = \"redis://x\"\n", "dedup.url and dedup.url_env are for backend = \"redis\""),
            ("[journal]\nbackend = \"nats\"\nsynchronous = \"normal\"\n", "journal.synchronous is for"),
            ("[journal]\nbackend = \"nats\"\nstream = \"a.b\"\n", "journal.stream \"a.b\""),
            ("[journal]\nbackend = \"nats\"\nprefix = \"a..b\"\n", "journal.prefix \"a..b\""),
            ("[journal]\nbackend = \"nats\"\nreplicas = 7\n", "journal.replicas must be 1 to 5"),
            ("[journal]\nbackend = \"nats\"\nurl = \"u\"\nurl_env = \"V\"\n", "are exclusive"),
            ("[journal]\nbackend = \"kafka\"\n", "kafka"),
            ("[journal]\nbackend = \"nats\"\n[sources.dlq]\nverify = \"none\"\n", "source name \"dlq\" is reserved"),
            ("[journal]\nbackend = \"nats\"\nretention = \"0s\"\n", "journal.retention (0s) must be at least"),
            ("[journal]\nbackend = \"nats\"\nretention = \"1m\"\n", "journal.duplicate_window (2m)"),
        ];
        for (text, expected) in cases {
            let err = check(text, &env(&[])).expect_err(text);
            assert!(err.to_string().contains(expected), "{text}: {err}");
        }
    }
}
