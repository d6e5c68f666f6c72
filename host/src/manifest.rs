//! A plugin's operator manifest: the optional `NAME.toml` beside `NAME.wasm`, saying what the
//! operator grants that plugin and how it is run. Unknown keys are refused with the file and
//! line. Nothing is granted by default.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{Env, MAX_WORKERS};
use crate::retry::{RetryPolicy, RetrySettings, parse_duration};
use crate::runtime::{DEFAULT_MEMORY_BYTES, DEFAULT_REUSE_IDLE, DEFAULT_TIMEOUT, HttpAllow, Limits, MAX_MEMORY_BYTES};

/// Calls of one plugin that may run at once unless its manifest says otherwise.
pub const DEFAULT_CONCURRENCY: usize = 16;
/// The longest call timeout a manifest may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// The longest wait a manifest may ask for.
pub const MAX_REUSE_IDLE: Duration = Duration::from_secs(24 * 60 * 60);

/// A manifest as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Event-type patterns that replace the plugin's own subscriptions.
    pub subscriptions: Option<Vec<String>>,
    /// Wall-clock time per call, such as `"5s"`.
    pub timeout: Option<String>,
    /// Linear memory per call: bytes, or `"64MiB"`.
    pub memory: Option<Size>,
    /// Calls of this plugin that may run at once.
    pub concurrency: Option<usize>,
    /// Values the plugin reads with `config(key)`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Values the plugin reads with `config(key)`, taken from these environment variables.
    #[serde(default)]
    pub config_env: BTreeMap<String, String>,
    /// Hosts the plugin may call over HTTP: `"hooks.slack.com"`, `"*.example.com"`,
    /// `"127.0.0.1:*"`, `"api.example.com:8443"`.
    #[serde(default)]
    pub http_allow: Vec<String>,
    /// Overrides of the host's retry policy.
    #[serde(default)]
    pub retry: RetrySettings,
    /// Calls one instance may serve in a row; memory then persists between those calls.
    pub reuse: Option<u32>,
    /// How long a reused instance may wait for its next call before it is dropped, such as
    /// `"60s"`.
    pub reuse_idle: Option<String>,
}

/// A size: a number of bytes, or text such as `"512KiB"`, `"64MiB"`, `"1GiB"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Size {
    /// Bytes.
    Bytes(usize),
    /// With a unit.
    Text(String),
}

impl Size {
    fn bytes(&self) -> Result<usize, String> {
        let text = match self {
            Size::Bytes(bytes) => return Ok(*bytes),
            Size::Text(text) => text.trim(),
        };
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let scale = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => return Err(format!("{text:?} is not a size like \"64MiB\" (units: B, KiB, MiB, GiB)")),
        };
        number
            .parse::<usize>()
            .ok()
            .and_then(|n| n.checked_mul(scale))
            .ok_or_else(|| format!("{text:?} is not a size like \"64MiB\""))
    }
}

/// What a manifest grants, checked and typed. No `Debug`: `config` holds secrets.
#[derive(Clone)]
pub struct Grants {
    /// Replacement subscriptions, if any.
    pub subscriptions: Option<Vec<String>>,
    /// Wall-clock time per call.
    pub timeout: Duration,
    /// Linear memory per call.
    pub memory_bytes: usize,
    /// Calls that may run at once.
    pub concurrency: usize,
    /// Every `config` value, `config_env` ones included.
    pub config: BTreeMap<String, String>,
    /// Where outbound HTTP may go.
    pub http_allow: HttpAllow,
    /// How failures are retried.
    pub retry: RetryPolicy,
    /// Calls one instance may serve in a row (0: fresh each call).
    pub reuse: u32,
    /// How long a reused instance may wait for its next call.
    pub reuse_idle: Duration,
}

impl Grants {
    /// What each call runs under.
    pub fn limits(&self) -> Limits {
        Limits {
            timeout: self.timeout,
            memory_bytes: self.memory_bytes,
            config: Arc::new(self.config.clone()),
            http_allow: Arc::new(self.http_allow.clone()),
            reuse: self.reuse,
            reuse_idle: self.reuse_idle,
        }
    }
}

impl Manifest {
    /// Parses manifest text; the error is one line naming the line and column.
    pub fn parse(text: &str) -> Result<Manifest, String> {
        toml::from_str(text).map_err(|err: toml::de::Error| {
            let message = err.message().trim_end().replace('\n', " ");
            match err.span() {
                Some(span) => {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.len() - before.rfind('\n').map_or(0, |newline| newline + 1) + 1;
                    format!("line {line}, column {column}: {message}")
                }
                None => message,
            }
        })
    }

    /// Checks every value, reads `config_env` variables from `env`, and applies the retry
    /// overrides to `retry`. Every problem is reported at once.
    pub fn grants(&self, env: &dyn Env, retry: &RetryPolicy) -> Result<Grants, Vec<String>> {
        let mut problems = Vec::new();
        let timeout = bounded_duration(
            self.timeout.as_deref(),
            ("timeout", DEFAULT_TIMEOUT),
            (MAX_TIMEOUT, format!("{} min", MAX_TIMEOUT.as_secs() / 60)),
            &mut problems,
        );
        let memory_bytes = match self.memory.as_ref().map(Size::bytes) {
            None => DEFAULT_MEMORY_BYTES,
            Some(Ok(bytes)) if (64 * 1024..=MAX_MEMORY_BYTES).contains(&bytes) => bytes,
            Some(Ok(_)) => {
                problems.push(format!("memory must be between 64KiB and {}MiB", MAX_MEMORY_BYTES >> 20));
                DEFAULT_MEMORY_BYTES
            }
            Some(Err(err)) => {
                problems.push(format!("memory: {err}"));
                DEFAULT_MEMORY_BYTES
            }
        };
        let reuse_idle = bounded_duration(
            self.reuse_idle.as_deref(),
            ("reuse_idle", DEFAULT_REUSE_IDLE),
            (MAX_REUSE_IDLE, format!("{} h", MAX_REUSE_IDLE.as_secs() / 3600)),
            &mut problems,
        );
        let concurrency = self.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
        if !(1..=MAX_WORKERS).contains(&concurrency) {
            // More could never run: no more than `workers` calls run at once, 256 at most.
            problems.push(format!("concurrency must be between 1 and {MAX_WORKERS}"));
        }
        let mut config = self.config.clone();
        for (key, var) in &self.config_env {
            if config.contains_key(key) {
                problems.push(format!("config_env.{key}: {key} is also in [config]"));
            }
            match env.var(var) {
                Some(value) => {
                    config.insert(key.clone(), value);
                }
                None => problems.push(format!("config_env.{key}: environment variable {var} is not set")),
            }
        }
        let http_allow = HttpAllow::parse(&self.http_allow).unwrap_or_else(|err| {
            problems.push(format!("http_allow: {err}"));
            HttpAllow::default()
        });
        let retry = self.retry.apply(retry).unwrap_or_else(|found| {
            problems.extend(found);
            retry.clone()
        });
        if problems.is_empty() {
            Ok(Grants {
                subscriptions: self.subscriptions.clone(),
                timeout,
                memory_bytes,
                concurrency,
                config,
                http_allow,
                retry,
                reuse: self.reuse.unwrap_or(0),
                reuse_idle,
            })
        } else {
            Err(problems)
        }
    }
}

/// The duration `key` as written (`default` when it is not), from 1 ms to `max` (written out
/// as `max_text`); a problem otherwise, and the default in its place.
fn bounded_duration(
    text: Option<&str>,
    (key, default): (&str, Duration),
    (max, max_text): (Duration, String),
    problems: &mut Vec<String>,
) -> Duration {
    match text.map(parse_duration) {
        None => default,
        Some(Ok(duration)) if !duration.is_zero() && duration <= max => duration,
        Some(Ok(_)) => {
            problems.push(format!("{key} must be between 1 ms and {max_text}"));
            default
        }
        Some(Err(err)) => {
            problems.push(format!("{key}: {err}"));
            default
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn nothing_is_granted_by_default() {
        let grants = Manifest::default().grants(&env(&[]), &RetryPolicy::default()).expect("valid");
        assert_eq!(
            (grants.timeout, grants.memory_bytes, grants.concurrency),
            (DEFAULT_TIMEOUT, DEFAULT_MEMORY_BYTES, DEFAULT_CONCURRENCY)
        );
        assert!(grants.config.is_empty() && grants.http_allow.is_empty() && grants.subscriptions.is_none());
    }

    #[test]
    fn every_key_is_read() {
        let manifest = Manifest::parse(
            "reuse = 50\nreuse_idle = \"2s\"\nsubscriptions = [\"github.push\"]\ntimeout = \"250ms\"\nmemory = \"16MiB\"\nconcurrency = 2\n\
             http_allow = [\"hooks.slack.com\"]\n[config]\nchannel = \"#ops\"\n[config_env]\nwebhook_url = \"SLACK_URL\"\n\
             [retry]\nmax_attempts = 6\n",
        )
        .expect("valid");
        let grants = manifest
            .grants(&env(&[("SLACK_URL", "https://hooks.slack.com/x")]), &RetryPolicy::default())
            .expect("valid");
        assert_eq!(grants.subscriptions.as_deref(), Some(&["github.push".to_owned()][..]));
        assert_eq!(
            (grants.timeout, grants.memory_bytes, grants.concurrency),
            (Duration::from_millis(250), 16 << 20, 2)
        );
        assert_eq!(grants.config["webhook_url"], "https://hooks.slack.com/x");
        assert_eq!(grants.config["channel"], "#ops");
        assert_eq!((grants.retry.max_attempts, grants.reuse, grants.reuse_idle), (6, 50, Duration::from_secs(2)));
        assert!(!grants.http_allow.is_empty());
    }

    #[test]
    fn every_problem_is_reported_and_secrets_are_named_not_shown() {
        let manifest = Manifest::parse(
            "timeout = \"soon\"\nmemory = \"2TiB\"\nconcurrency = 0\nhttp_allow = [\"a b\"]\nreuse_idle = \"0s\"\n\
             [config_env]\nkey = \"MISSING\"\n",
        )
        .expect("valid toml");
        let Err(problems) = manifest.grants(&env(&[]), &RetryPolicy::default()) else { panic!("six problems") };
        assert_eq!(problems.len(), 6, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("MISSING")), "{problems:?}");
    }

    #[test]
    fn a_concurrency_no_host_could_run_is_refused_not_a_panic() {
        for too_many in ["257", "3000000000000000000"] {
            let manifest = Manifest::parse(&format!("concurrency = {too_many}\n")).expect("valid toml");
            let Err(problems) = manifest.grants(&env(&[]), &RetryPolicy::default()) else { panic!("refused") };
            assert!(problems.iter().any(|p| p.contains("between 1 and 256")), "{too_many}: {problems:?}");
        }
        let most = Manifest::parse("concurrency = 256\n").expect("valid toml");
        assert_eq!(most.grants(&env(&[]), &RetryPolicy::default()).expect("granted").concurrency, 256);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let err = Manifest::parse("[config]\na = \"b\"\n\n[grants]\nall = true\n").expect_err("unknown table");
        assert!(err.contains("grants") && err.contains("line 4"), "{err}");
    }

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(Size::Text("64MiB".into()).bytes(), Ok(64 << 20));
        assert_eq!(Size::Text("512 KiB".into()).bytes(), Ok(512 << 10));
        assert_eq!(Size::Bytes(4096).bytes(), Ok(4096));
        assert!(Size::Text("64MB".into()).bytes().is_err());
    }
}
