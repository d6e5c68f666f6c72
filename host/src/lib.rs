//! wasmhook: receives webhooks and events, verifies them, stores them durably, and calls
//! sandboxed WebAssembly plugins on them.
//!
//! Data flows one way, and each module has one job:
//!
//! - [`ingest`]: `POST /hooks/{source}` → checks and signature ([`ingest::verify`]) → [`event::Event`]
//! - [`journal`]: durable store of events and their per-plugin deliveries (SQLite by default)
//! - [`dispatch`]: workers lease due deliveries and record each outcome
//! - [`runtime`]: the only door to wasmtime; compiles plugins and calls them under limits
//!
//! Beside that flow: [`registry`] (loaded plugins and their subscriptions, with
//! [`manifest`] for what an operator grants each, and [`watch`] to reload them), [`admin`] (health, plugins, events),
//! [`authoring`] (plugin run/check/new), [`metrics`] (Prometheus), [`retry`] (the backoff policy), [`config`], [`cli`], [`serve`] (wiring), [`send`] (a signing
//! client), [`client`], [`clock`], [`http`] and [`telemetry`] (plumbing). Start reading at [`serve::serve`].
#![forbid(unsafe_code)]

pub mod admin;
pub mod authoring;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod dispatch;
pub mod event;
pub mod http;
pub mod ingest;
pub mod journal;
pub mod manifest;
pub mod metrics;
pub mod registry;
pub mod retry;
pub mod runtime;
pub mod send;
pub mod serve;
pub mod subscription;
pub mod telemetry;
pub mod watch;
