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

#[derive(Debug, Subcommand)]
enum SendScheme {
    /// A GitHub webhook, signed with X-Hub-Signature-256.
    Github {
        /// Where to post, such as http://127.0.0.1:8080/hooks/github.
        #[arg(long)]
        url: String,
        /// Environment variable holding the webhook secret.
        #[arg(long, value_name = "VAR")]
        secret_env: String,
        /// The X-GitHub-Event name, such as push or pull_request.
        #[arg(long)]
        event: String,
        /// The delivery id; a fresh UUID when not given.
        #[arg(long)]
        delivery: Option<String>,
        /// The JSON payload file.
        file: PathBuf,
    },
}

impl Cli {
    /// Runs the command. Errors carry a message for the operator; usage errors are clap's.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::Serve(args) => serve(args),
            Command::Send { scheme } => send(scheme, &ProcessEnv),
            Command::Dlq { admin, action } => dlq(&admin, action, &ProcessEnv),
            Command::Replay { admin, event_type, since, plugin } => {
                let body = serde_json::json!({ "type": event_type, "since": since, "plugin": plugin });
                let answer = call_admin(&admin, Method::POST, "/v1/replay", Some(body), &ProcessEnv)?;
                print_answer(&admin, &answer, |answer| format!("{} deliveries made due", answer["replayed"]));
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let overrides = Overrides {
        listen: args.listen,
        admin_listen: args.admin_listen,
        plugins_dir: args.plugins,
        data_dir: args.data,
    };
    // The whole configuration is checked before anything starts or binds.
    let config = config::load(args.config.as_deref(), overrides, &ProcessEnv)?;
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
    let SendScheme::Github { url, secret_env, event, delivery, file } = scheme;
    let secret = env.var(&secret_env).with_context(|| format!("environment variable {secret_env} is not set"))?;
    let body = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
    let delivery = delivery.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let outgoing = send::github(secret.as_bytes(), &event, &delivery, body);
    let (status, answer) = client::blocking_request(Method::POST, &url, &outgoing.headers, outgoing.body)?;
    println!("{} {answer}", status.as_u16());
    Ok(if status.is_success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn dlq(admin: &AdminArgs, action: DlqAction, env: &dyn Env) -> anyhow::Result<ExitCode> {
    match action {
        DlqAction::List { plugin, limit } => {
            let mut path = format!("/v1/dead-letters?limit={limit}");
            if let Some(plugin) = plugin {
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
            let answer = call_admin(admin, Method::POST, "/v1/dead-letters/replay", Some(selection.body()), env)?;
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
