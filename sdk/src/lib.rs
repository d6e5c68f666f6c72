//! Write a wasmhook plugin: implement [`Plugin`], call [`export_plugin!`].
//!
//! A plugin is a WebAssembly component built for `wasm32-wasip2`. The host calls it once per
//! event it subscribes to; verification, duplicates, retries, timeouts and logs are the host's
//! job. This crate hides the generated bindings of the `wasmhook:plugin` WIT world and adds a
//! few helpers: [`Event::json`] to parse the payload, the [`info!`] family to log, [`config`]
//! to read operator settings, [`emit`] to put a derived event into the journal, and [`http`]
//! for outbound requests the operator granted.
//!
//! ```no_run
//! use wasmhook_sdk::{Event, HandlerError, Metadata, Plugin, export_plugin, info};
//!
//! struct Hello;
//!
//! impl Plugin for Hello {
//!     fn metadata() -> Metadata {
//!         Metadata::new("hello", env!("CARGO_PKG_VERSION"), ["github.*"])
//!     }
//!
//!     fn handle(event: Event) -> Result<(), HandlerError> {
//!         info!("hello from {} ({} bytes)", event.event_type, event.data.len());
//!         Ok(())
//!     }
//! }
//!
//! export_plugin!(Hello);
//! ```
#![deny(missing_docs)]

pub mod http;

// The generated bindings name this crate by its path so that the export macro works from the
// plugin author's crate.
extern crate self as wasmhook_sdk;

#[doc(hidden)]
pub use wit_bindgen;

#[doc(hidden)]
pub mod bindings {
    //! The generated bindings of the `plugin` world. Not part of the stable API.
    #![allow(clippy::too_many_arguments, reason = "generated code mirrors the WIT signatures")]
    wit_bindgen::generate!({
        world: "plugin",
        path: "../wit",
        runtime_path: "::wasmhook_sdk::wit_bindgen::rt",
        default_bindings_module: "::wasmhook_sdk::bindings",
        pub_export_macro: true,
        export_macro_name: "__export_bindings",
    });
}

pub use bindings::wasmhook::plugin::host::Level;
pub use bindings::wasmhook::plugin::types::{Event, HandlerError, Metadata};

/// A plugin: say who you are, then handle events.
///
/// By default the host creates a fresh instance for each call. If the operator sets
/// `reuse = N` in the plugin's manifest, one instance serves up to N calls in a row, and its
/// memory (statics, caches, the previous event's data) persists between them. Do not rely on
/// memory being either kept or cleared between calls.
pub trait Plugin {
    /// Names the plugin and lists the event types it subscribes to. Called once at load time.
    fn metadata() -> Metadata;

    /// Handles one event. Return [`HandlerError::Retry`] for a passing failure (the host calls
    /// again later) and [`HandlerError::Permanent`] for an event that can never succeed.
    fn handle(event: Event) -> Result<(), HandlerError>;
}

/// Exports a type that implements [`Plugin`] as the component's entry points.
///
/// Call it once, at the top level of the plugin crate.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        const _: () = {
            struct __WasmhookExport;

            impl $crate::bindings::Guest for __WasmhookExport {
                fn metadata() -> $crate::Metadata {
                    <$plugin as $crate::Plugin>::metadata()
                }

                fn handle(event: $crate::Event) -> ::core::result::Result<(), $crate::HandlerError> {
                    <$plugin as $crate::Plugin>::handle(event)
                }
            }

    $crate::bindings::__export_bindings!(__WasmhookExport with_types_in $crate::bindings);
        };
    };
}

impl Metadata {
    /// Builds metadata from a name, a version and the subscribed event-type patterns.
    pub fn new<S: Into<String>>(name: &str, version: &str, subscriptions: impl IntoIterator<Item = S>) -> Self {
        Metadata {
            name: name.to_owned(),
            version: version.to_owned(),
            subscriptions: subscriptions.into_iter().map(Into::into).collect(),
        }
    }
}

impl Event {
    /// Parses the payload as JSON into `T`.
    ///
    /// A payload that does not parse can never succeed, so the error is
    /// [`HandlerError::Permanent`], naming the event type and serde's reason: return it with `?`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(&self.data).map_err(|err| {
            HandlerError::Permanent(format!("{} payload is not what this plugin expects: {err}", self.event_type))
        })
    }

    /// The value of attribute `name` (a selected request header or a CloudEvents extension).
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }
}

/// Writes one line to the host's log at `level`; the host adds the plugin name and event id.
/// The [`info!`] family of macros formats and calls this.
pub fn log(level: Level, message: &str) {
    bindings::wasmhook::plugin::host::log(level, message);
}

/// Reads a value the operator configured for this plugin, `None` if it is not set.
pub fn config(key: &str) -> Option<String> {
    bindings::wasmhook::plugin::host::config(key)
}

/// Puts a derived event of `event_type` into the journal (source `plugin.NAME`), for the
/// plugins subscribed to that type. Returns its id, or why the host refused it. It is committed
/// only if this call succeeds.
pub fn emit(event_type: &str, data: &[u8], content_type: &str) -> Result<String, String> {
    bindings::wasmhook::plugin::host::emit(event_type, data, content_type)
}

/// [`emit`] with `value` serialized as JSON.
pub fn emit_json<T: serde::Serialize>(event_type: &str, value: &T) -> Result<String, String> {
    let data = serde_json::to_vec(value).map_err(|err| format!("cannot serialize the event: {err}"))?;
    emit(event_type, &data, "application/json")
}

/// Logs a formatted line at trace level.
#[macro_export]
macro_rules! trace { ($($arg:tt)*) => { $crate::log($crate::Level::Trace, &::std::format!($($arg)*)) }; }
/// Logs a formatted line at debug level.
#[macro_export]
macro_rules! debug { ($($arg:tt)*) => { $crate::log($crate::Level::Debug, &::std::format!($($arg)*)) }; }
/// Logs a formatted line at info level.
#[macro_export]
macro_rules! info { ($($arg:tt)*) => { $crate::log($crate::Level::Info, &::std::format!($($arg)*)) }; }
/// Logs a formatted line at warn level.
#[macro_export]
macro_rules! warn { ($($arg:tt)*) => { $crate::log($crate::Level::Warn, &::std::format!($($arg)*)) }; }
/// Logs a formatted line at error level.
#[macro_export]
macro_rules! error { ($($arg:tt)*) => { $crate::log($crate::Level::Error, &::std::format!($($arg)*)) }; }

#[cfg(test)]
mod tests {
    use super::*;

    fn event(data: &str) -> Event {
        Event {
            id: "1".into(),
            source: "github".into(),
            event_type: "github.push".into(),
            time_ms: 0,
            content_type: "application/json".into(),
            data: data.as_bytes().to_vec(),
            attributes: vec![("subject".into(), "main".into())],
            attempt: 1,
        }
    }

    #[derive(Debug, serde::Deserialize)]
    struct Push {
        after: String,
    }

    #[test]
    fn json_parses_the_payload() {
        let push: Push = event(r#"{"after":"abc"}"#).json().expect("valid payload");
        assert_eq!(push.after, "abc");
    }

    #[test]
    fn json_error_is_permanent_and_names_the_type() {
        match event(r#"{"before":"abc"}"#).json::<Push>() {
            Err(HandlerError::Permanent(msg)) => {
                assert!(msg.contains("github.push"), "{msg}");
                assert!(msg.contains("after"), "{msg}");
            }
            other => panic!("expected a permanent error, got {other:?}"),
        }
    }

    #[test]
    fn attribute_finds_by_name() {
        let event = event("{}");
        assert_eq!(event.attribute("subject"), Some("main"));
        assert_eq!(event.attribute("missing"), None);
    }
}
