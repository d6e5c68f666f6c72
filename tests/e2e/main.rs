//! End-to-end tests: each starts the real `wasmhook` binary with real compiled plugins
//! (built by `make plugins`) and talks HTTP to it. Fixtures live in `util`.

mod admin;
mod cli;
mod distributed;
mod ingest;
mod journal;
mod observability;
mod plugins;
mod reload;
mod sandbox;
mod senders;
mod services;
mod util;
