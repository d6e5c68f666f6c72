//! The command line: clap types and what each command runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{self, Env, Overrides, ProcessEnv};
use crate::send;

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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
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
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
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
    let SendScheme::Github {
        url,
        secret_env,
        event,
        delivery,
        file,
    } = scheme;
    let secret = env
        .var(&secret_env)
        .with_context(|| format!("environment variable {secret_env} is not set"))?;
    let body = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
    let delivery = delivery.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let outgoing = send::github(secret.as_bytes(), &event, &delivery, body);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, answer) = runtime.block_on(send::post(&url, outgoing))?;
    println!("{} {answer}", status.as_u16());
    Ok(if status.is_success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
