//! The command line: clap types and what each command runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use hyper::Method;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Env, Overrides, ProcessEnv};
use crate::{client, send};

/// The admin API the operator commands talk to, unless `--admin` says otherwise.
pub const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:9090";
/// The variable the operator commands read the admin bearer token from.
pub const ADMIN_TOKEN_ENV: &str = "WASMHOOK_ADMIN_TOKEN";

/// A WebAssembly plugin host for webhooks and cloud-native events.
#[derive(Debug, Parser)]
#[command(name = "wasmhook", version, about)]
pub struct Cli {
    /// How log lines are written: json, pretty, or auto (json unless stdout is a terminal).
    #[arg(long, global = true, value_enum, default_value = "auto", env = "WASMHOOK_LOG_FORMAT")]
    pub log_format: crate::telemetry::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Receive webhooks and run plugins on them.
    Serve(ServeArgs),
    /// Sign a sample payload as a provider would and post it to a host.
    Send {
        #[command(subcommand)]
        scheme: SendScheme,
    },
    /// List, inspect, replay or purge dead letters (through the admin API).
    Dlq {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Run, check or scaffold a plugin (for plugin authors).
    Plugin {
        #[command(subcommand)]
        action: PluginAction,
    },
    /// Check a config file.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// One screen of a running host: events, deliveries, last-minute rates, plugins, dead letters.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Deliver stored events again to the plugins that subscribe to them now.
    Replay {
        #[command(flatten)]
        admin: AdminArgs,
        /// Event types to replay, as a glob pattern.
        #[arg(long = "type", value_name = "GLOB", default_value = "*")]
        event_type: String,
        /// Events accepted since this time (2026-11-25T08:00:00Z) or this long ago (2h).
        #[arg(long)]
        since: String,
        /// Only to this plugin.
        #[arg(long)]
        plugin: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum PluginAction {
    /// Call a plugin once on a sample event, under the server's limits and the manifest
    /// beside it; print its logs, emitted events, outcome and duration. Exit 1 unless done.
    Run {
        /// The component.
        file: PathBuf,
        /// The payload file.
        #[arg(long)]
        event: PathBuf,
        /// The event type.
        #[arg(long = "type", default_value = "sample.event")]
        event_type: String,
        /// A config value for the plugin (repeatable), over the manifest's.
        #[arg(long = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
    },
    /// Check a component implements the wasmhook:plugin world; print its metadata and grants.
    Check {
        /// The component.
        file: PathBuf,
    },
    /// Create a plugin crate that builds as is.
    New {
        /// The plugin's name (a-z, 0-9, '-').
        name: String,
        /// Where to create it.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The wasmhook sdk folder to depend on (default: the one this binary was built from).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigAction {
    /// Parse and check a config file (secret variables included), with the same overrides as
    /// `serve`; syntax, type and unknown-key errors name the file, line and column, other
    /// problems the file and the key.
    Check {
        /// The config file.
        file: PathBuf,
        #[command(flatten)]
        overrides: OverrideArgs,
    },
}

#[derive(Debug, clap::Args)]
struct AdminArgs {
    /// The host's admin API.
    #[arg(long, env = "WASMHOOK_ADMIN_URL", default_value = DEFAULT_ADMIN_URL, global = true)]
    admin: String,
    /// Print the admin API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum DlqAction {
    /// The newest dead letters.
    List {
        /// Only this plugin's.
        #[arg(long)]
        plugin: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One dead letter with every error and its payload.
    Show {
        /// The dead letter's id (from `dlq list`).
        id: i64,
    },
    /// Deliver dead letters again with a fresh attempt budget.
    Replay(DlqSelection),
    /// Delete dead letters for good.
    Purge(DlqSelection),
}

#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct DlqSelection {
    /// These dead letters.
    ids: Vec<i64>,
    /// Every dead letter of this plugin.
    #[arg(long)]
    plugin: Option<String>,
    /// Every dead letter.
    #[arg(long)]
    all: bool,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// The TOML config file.
    #[arg(long, env = "WASMHOOK_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: OverrideArgs,
}

/// What the command line and the environment set over the config file; `config check` reads
/// them as `serve` does, so that it checks what `serve` would run.
#[derive(Debug, clap::Args)]
struct OverrideArgs {
    /// Address for webhooks (overrides `listen`).
    #[arg(long, env = "WASMHOOK_LISTEN")]
    listen: Option<SocketAddr>,
    /// Address for the admin API (overrides `admin_listen`).
    #[arg(long, env = "WASMHOOK_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Folder of `*.wasm` plugins (overrides `plugins_dir`).
    #[arg(long, env = "WASMHOOK_PLUGINS")]
    plugins: Option<PathBuf>,
    /// Folder of the journal (overrides `data_dir`).
    #[arg(long, env = "WASMHOOK_DATA")]
    data: Option<PathBuf>,
}

impl From<OverrideArgs> for Overrides {
    fn from(args: OverrideArgs) -> Overrides {
        Overrides {
            listen: args.listen,
            admin_listen: args.admin_listen,
            plugins_dir: args.plugins,
            data_dir: args.data,
        }
    }
}

#[derive(Debug, Subcommand)]
enum SendScheme {
    /// A GitHub webhook, signed with X-Hub-Signature-256.
    Github {
        #[command(flatten)]
        common: SendArgs,
        /// The X-GitHub-Event name, such as push or pull_request.
        #[arg(long)]
        event: String,
    },
    /// A Stripe event (id and type from the file), signed with Stripe-Signature.
    Stripe {
        #[command(flatten)]
        common: SendArgs,
    },
    /// A Slack request, signed with X-Slack-Signature.
    Slack {
        #[command(flatten)]
        common: SendArgs,
    },
    /// A Standard Webhooks message, signed with webhook-signature (secret: whsec_…).
    StandardWebhooks {
        #[command(flatten)]
        common: SendArgs,
    },
    /// A request signed as a `verify = "hmac"` source expects.
    Hmac {
        #[command(flatten)]
        common: SendArgs,
        /// The signature header, as in the source's `header`.
        #[arg(long)]
        header: String,
        /// sha256 or sha512.
        #[arg(long, default_value = "sha256")]
        algorithm: String,
        /// hex or base64.
        #[arg(long, default_value = "hex")]
        encoding: String,
        /// Text before the signature, such as sha256=.
        #[arg(long, default_value = "")]
        prefix: String,
        /// The timestamp header, as in the source's `timestamp_header`.
        #[arg(long)]
        timestamp_header: Option<String>,
        /// The signed content, as in the source's `signed`.
        #[arg(long)]
        signed: Option<String>,
    },
    /// A request carrying the secret as-is in a header (`verify = "token"`).
    Token {
        #[command(flatten)]
        common: SendArgs,
        /// The header, as in the source's `header`.
        #[arg(long)]
        header: String,
    },
    /// An unsigned request (`verify = "none"`).
    None {
        #[command(flatten)]
        common: SendArgs,
    },
}

#[derive(Debug, clap::Args)]
struct SendArgs {
    /// Where to post, such as http://127.0.0.1:8080/hooks/github.
    #[arg(long)]
    url: String,
    /// Environment variable holding the secret (not needed for `none`).
    #[arg(long, value_name = "VAR")]
    secret_env: Option<String>,
    /// The delivery id (GitHub, Standard Webhooks); a fresh UUID when not given.
    #[arg(long)]
    delivery: Option<String>,
    /// Another header to send, as "Name: value" (repeatable).
    #[arg(short = 'H', long = "header-line", value_name = "NAME: VALUE")]
    extra: Vec<String>,
    /// The JSON payload file.
    file: PathBuf,
}

impl Cli {
    /// Runs the command. Errors carry a message for the operator; usage errors are clap's.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::Serve(args) => serve(args),
            Command::Send { scheme } => send(scheme, &ProcessEnv),
            Command::Dlq { admin, action } => dlq(&admin, action, &ProcessEnv),
            Command::Plugin { action } => plugin(action),
            Command::Config { action: ConfigAction::Check { file, overrides } } => {
                let config = config::load(Some(&file), overrides.into(), &ProcessEnv)?;
                let sources: Vec<&String> = config.sources.keys().collect();
                let journal = match &config.backend {
                    crate::config::Backend::Sqlite => format!("sqlite in {}", config.data_dir.display()),
                    crate::config::Backend::Nats(nats) => format!(
                        "nats stream {} ({} dedup)",
                        nats.stream,
                        if nats.redis_url.is_some() { "redis" } else { "JetStream" }
                    ),
                };
                println!("{}: ok ({} sources: {sources:?}; journal: {journal})", file.display(), sources.len());
                Ok(ExitCode::SUCCESS)
            }
            Command::Status { admin } => status(&admin, &ProcessEnv),
            Command::Replay { admin, event_type, since, plugin } => {
                let body = serde_json::json!({ "type": event_type, "since": since, "plugin": plugin });
                let answer = with_progress("replaying stored events…", || {
                    call_admin(&admin, Method::POST, "/v1/replay", Some(body), &ProcessEnv)
                })?;
                print_answer(&admin, &answer, |answer| format!("{} deliveries made due", answer["replayed"]));
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    // The whole configuration is checked before anything starts or binds.
    let config = config::load(args.config.as_deref(), args.overrides.into(), &ProcessEnv)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        crate::serve::serve(config, shutdown).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Fires `shutdown` on SIGTERM or Ctrl-C.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops the host");
                let _ = ctrl_c.await;
                shutdown.cancel();
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    shutdown.cancel();
}

fn send(scheme: SendScheme, env: &dyn Env) -> anyhow::Result<ExitCode> {
    let now = crate::event::now_ms() / 1000;
    let common = match &scheme {
        SendScheme::Github { common, .. }
        | SendScheme::Stripe { common }
        | SendScheme::Slack { common }
        | SendScheme::StandardWebhooks { common }
        | SendScheme::Hmac { common, .. }
        | SendScheme::Token { common, .. }
        | SendScheme::None { common } => common,
    };
    let body = std::fs::read(&common.file).with_context(|| format!("cannot read {}", common.file.display()))?;
    let secret = || -> anyhow::Result<String> {
        let var = common.secret_env.as_deref().context("--secret-env VAR is required for this scheme")?;
        env.var(var).with_context(|| format!("environment variable {var} is not set"))
    };
    let delivery = common.delivery.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut outgoing = match &scheme {
        SendScheme::Github { event, .. } => send::github(secret()?.as_bytes(), event, &delivery, body),
        SendScheme::Stripe { .. } => send::stripe(secret()?.as_bytes(), now, body),
        SendScheme::Slack { .. } => send::slack(secret()?.as_bytes(), now, body),
        SendScheme::StandardWebhooks { .. } => {
            let key = config::Secret::from_standard_webhooks(&secret()?)
                .map_err(|err| anyhow::anyhow!("the secret {err}"))?;
            send::standard_webhooks(key.expose(), &delivery, now, body)
        }
        SendScheme::Hmac { header, algorithm, encoding, prefix, timestamp_header, signed, .. } => {
            let scheme =
                hmac_scheme(header, algorithm, encoding, prefix, timestamp_header.as_deref(), signed.as_deref())?;
            send::hmac(&scheme, secret()?.as_bytes(), now, body)
        }
        SendScheme::Token { header, .. } => send::token(header, &secret()?, body),
        SendScheme::None { .. } => send::unsigned(body),
    };
    for line in &common.extra {
        let (name, value) = line.split_once(':').with_context(|| format!("-H {line:?}: expected \"Name: value\""))?;
        outgoing.headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let (status, answer) = client::blocking_request(Method::POST, &common.url, &outgoing.headers, outgoing.body)?;
    println!("{} {answer}", status.as_u16());
    Ok(if status.is_success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// An `hmac` scheme from `send hmac`'s flags, read the way the config file reads them.
fn hmac_scheme(
    header: &str,
    algorithm: &str,
    encoding: &str,
    prefix: &str,
    timestamp_header: Option<&str>,
    signed: Option<&str>,
) -> anyhow::Result<config::HmacScheme> {
    let parse = |key: &str, value: &str| -> anyhow::Result<toml::Value> {
        toml::Value::try_from(value).with_context(|| format!("--{key} {value:?}"))
    };
    let algorithm: config::Algorithm =
        parse("algorithm", algorithm)?.try_into().context("--algorithm takes sha256 or sha512")?;
    let encoding: config::Encoding =
        parse("encoding", encoding)?.try_into().context("--encoding takes hex or base64")?;
    let default = if timestamp_header.is_some() { "{timestamp}.{body}" } else { "{body}" };
    let signed = config::SignedContent::parse(signed.unwrap_or(default)).map_err(anyhow::Error::msg)?;
    if signed.uses_timestamp() != timestamp_header.is_some() {
        anyhow::bail!(
            "--signed uses {{timestamp}} exactly when --timestamp-header is given, as the config's signed does"
        );
    }
    Ok(config::HmacScheme {
        secrets: Vec::new(),
        header: header.to_ascii_lowercase(),
        algorithm,
        encoding,
        prefix: prefix.to_owned(),
        timestamp_header: timestamp_header.map(str::to_ascii_lowercase),
        tolerance: config::DEFAULT_TOLERANCE,
        signed,
    })
}

fn plugin(action: PluginAction) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match action {
        PluginAction::Run { file, event, event_type, config } => {
            let overrides = config
                .iter()
                .map(|pair| {
                    pair.split_once('=')
                        .map(|(key, value)| (key.to_owned(), value.to_owned()))
                        .with_context(|| format!("--config {pair:?}: expected KEY=VALUE"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let done = runtime.block_on(crate::authoring::run(&file, &event, &event_type, &overrides))?;
            Ok(if done { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        PluginAction::Check { file } => {
            runtime.block_on(crate::authoring::check(&file))?;
            Ok(ExitCode::SUCCESS)
        }
        PluginAction::New { name, dir, sdk } => {
            let root = crate::authoring::scaffold(&name, &dir, sdk.as_deref())?;
            println!("created {}; build it with: cd {} && cargo build --release", root.display(), root.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn status(admin: &AdminArgs, env: &dyn Env) -> anyhow::Result<ExitCode> {
    let stats = call_admin(admin, Method::GET, "/v1/stats", None, env)?;
    let plugins = call_admin(admin, Method::GET, "/v1/plugins", None, env)?;
    if admin.json {
        println!("{}", serde_json::json!({ "stats": stats, "plugins": plugins["plugins"] }));
        return Ok(ExitCode::SUCCESS);
    }
    let count = |key: &str| stats[key].as_u64().unwrap_or(0);
    println!("wasmhook at {}", admin.admin);
    println!(
        "events:     {} stored, {} unrouted, {} accepted in the last minute",
        count("events"),
        count("unrouted"),
        count("accepted_last_minute")
    );
    println!(
        "deliveries: {} pending, {} running, {} retrying, {} done ({} in the last minute), {} dead (limit {} unfinished)",
        count("pending"),
        count("running"),
        count("retrying"),
        count("done"),
        count("done_last_minute"),
        count("dead"),
        count("max_pending")
    );
    println!(
        "\n{:<20} {:<8} {:<9} {:<14} {:>8} {:>6}  LAST ERROR",
        "PLUGIN", "STATUS", "VERSION", "SHA256", "PENDING", "DEAD"
    );
    for plugin in plugins["plugins"].as_array().into_iter().flatten() {
        let name = plugin["name"].as_str().unwrap_or("");
        let text = |key: &str| plugin[key].as_str().unwrap_or("-").to_owned();
        println!(
            "{:<20} {:<8} {:<9} {:<14} {:>8} {:>6}  {}",
            name,
            text("status"),
            text("version"),
            text("sha256").chars().take(12).collect::<String>(),
            plugin["pending"].as_u64().unwrap_or(0),
            stats["dead_by_plugin"][name].as_u64().unwrap_or(0),
            plugin["last_error"].as_str().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `work` with a spinner saying `message` when stderr is a terminal; quietly otherwise.
fn with_progress<T>(message: &str, work: impl FnOnce() -> T) -> T {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return work();
    }
    let spinner = indicatif::ProgressBar::new_spinner().with_message(message.to_owned());
    spinner.enable_steady_tick(std::time::Duration::from_millis(100));
    let result = work();
    spinner.finish_and_clear();
    result
}

fn dlq(admin: &AdminArgs, action: DlqAction, env: &dyn Env) -> anyhow::Result<ExitCode> {
    match action {
        DlqAction::List { plugin, limit } => {
            let mut path = format!("/v1/dead-letters?limit={limit}");
            if let Some(plugin) = plugin {
                // RFC 3986's unreserved characters stay as they are, as every host reads them.
                const ESCAPED: &percent_encoding::AsciiSet =
                    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
                let plugin = percent_encoding::utf8_percent_encode(&plugin, ESCAPED);
                path.push_str(&format!("&plugin={plugin}"));
            }
            let answer = call_admin(admin, Method::GET, &path, None, env)?;
            print_answer(admin, &answer, dead_letter_table);
        }
        DlqAction::Show { id } => {
            let answer = call_admin(admin, Method::GET, &format!("/v1/dead-letters/{id}"), None, env)?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
        }
        DlqAction::Replay(selection) => {
            let answer = with_progress("replaying dead letters…", || {
                call_admin(admin, Method::POST, "/v1/dead-letters/replay", Some(selection.body()), env)
            })?;
            print_answer(admin, &answer, |answer| format!("{} dead letters replayed", answer["replayed"]));
        }
        DlqAction::Purge(selection) => {
            let answer = call_admin(admin, Method::POST, "/v1/dead-letters/purge", Some(selection.body()), env)?;
            print_answer(admin, &answer, |answer| format!("{} dead letters purged", answer["purged"]));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn dead_letter_table(answer: &serde_json::Value) -> String {
    let mut table =
        format!("{:<8} {:<16} {:<36} {:<28} {:>8}  LAST ERROR\n", "ID", "PLUGIN", "EVENT", "TYPE", "ATTEMPTS");
    for letter in answer["dead_letters"].as_array().into_iter().flatten() {
        let text = |field: &str| letter[field].as_str().unwrap_or("").to_owned();
        table.push_str(&format!(
            "{:<8} {:<16} {:<36} {:<28} {:>8}  {}\n",
            letter["delivery"],
            text("plugin"),
            text("event_id"),
            text("type"),
            letter["attempts"],
            text("last_error")
        ));
    }
    table.trim_end().to_owned()
}

impl DlqSelection {
    fn body(&self) -> serde_json::Value {
        if self.all {
            serde_json::json!({ "all": true })
        } else if let Some(plugin) = &self.plugin {
            serde_json::json!({ "plugin": plugin })
        } else {
            serde_json::json!({ "ids": self.ids })
        }
    }
}

/// Calls the admin API; a non-2xx answer becomes an error carrying the API's message.
fn call_admin(
    admin: &AdminArgs,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
    env: &dyn Env,
) -> anyhow::Result<serde_json::Value> {
    let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
    if let Some(token) = env.var(ADMIN_TOKEN_ENV) {
        headers.push(("authorization".to_owned(), format!("Bearer {token}")));
    }
    let body = body.map(|body| body.to_string().into_bytes()).unwrap_or_default();
    let url = format!("{}{path}", admin.admin.trim_end_matches('/'));
    let (status, text) = client::blocking_request(method, &url, &headers, body)?;
    let answer: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{url} answered {status} with no JSON: {text}"))?;
    if !status.is_success() {
        bail!("{url} answered {status}: {}", answer["error"].as_str().unwrap_or(&text));
    }
    Ok(answer)
}

fn print_answer(admin: &AdminArgs, answer: &serde_json::Value, human: impl FnOnce(&serde_json::Value) -> String) {
    if admin.json {
        println!("{answer}");
    } else {
        println!("{}", human(answer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_hmac_refuses_what_the_config_refuses() {
        let scheme = |timestamp: Option<&str>, signed: Option<&str>| {
            hmac_scheme("X-Signature", "sha256", "hex", "", timestamp, signed).map(|scheme| scheme.signed)
        };
        assert!(scheme(Some("X-Timestamp"), None).is_ok_and(|signed| signed.uses_timestamp()));
        assert!(scheme(None, None).is_ok_and(|signed| !signed.uses_timestamp()));
        let unsigned_time = scheme(Some("X-Timestamp"), Some("{body}")).expect_err("a timestamp sent but not signed");
        assert!(unsigned_time.to_string().contains("--timestamp-header"), "{unsigned_time}");
        assert!(scheme(None, Some("{timestamp}.{body}")).is_err(), "an empty timestamp signed");
    }
}
