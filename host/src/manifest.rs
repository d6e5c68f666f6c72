//! A plugin's operator manifest: the optional `NAME.toml` beside `NAME.wasm`, saying what the
//! operator grants that plugin. Unknown keys are refused with the file and line.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::retry::RetrySettings;

/// What the operator grants one plugin.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Values the plugin reads with `config(key)`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Overrides of the host's retry policy for this plugin.
    #[serde(default)]
    pub retry: RetrySettings,
}

impl Manifest {
    /// Reads the manifest beside `wasm` (same name, `.toml`); no file means nothing granted.
    pub fn beside(wasm: &Path) -> Result<Manifest, String> {
        let path = wasm.with_extension("toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => Manifest::parse(&text).map_err(|err| format!("{}: {err}", path.display())),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Manifest::default()),
            Err(err) => Err(format!("cannot read {}: {err}", path.display())),
        }
    }

    fn parse(text: &str) -> Result<Manifest, String> {
        toml::from_str(text).map_err(|err| err.to_string().trim_end().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_values_are_read() {
        let manifest = Manifest::parse("[config]\nchannel = \"#ops\"\n").expect("valid");
        assert_eq!(manifest.config["channel"], "#ops");
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let err = Manifest::parse("[config]\na = \"b\"\n\n[grants]\nall = true\n").expect_err("unknown table");
        assert!(err.contains("grants") && err.contains("line 4"), "{err}");
    }
}
