//! Logging set-up, in one place: `tracing` to stdout, filtered like `RUST_LOG` (default
//! `info`, the file watcher's own lines at `error`), as JSON lines (one object per line,
//! fields flattened) or as text for people.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The filter used when `RUST_LOG` is not set. notify's own lines are notes about watches the
/// system had already ended (a plugins folder replaced), not the operator's business.
pub const DEFAULT_FILTER: &str = "info,notify=error";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// JSON when stdout is not a terminal (a file, a pipe, a log collector), text otherwise.
    Auto,
    /// Text for people, coloured on a terminal.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. Call once, first thing.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let terminal = std::io::stdout().is_terminal();
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let json = match format {
        LogFormat::Auto => !terminal,
        LogFormat::Pretty => false,
        LogFormat::Json => true,
    };
    if json {
        builder.json().flatten_event(true).with_current_span(false).with_span_list(false).init();
    } else {
        builder.with_ansi(terminal).init();
    }
}
