//! Serde helpers for configuration values: humantime durations and fixed choices. A leaf, so
//! every module that owns settings (backends, logging, the service) parses the same way.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A humantime duration ("30s", "7d").
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
}

/// A string setting with a fixed set of values; the error lists them.
pub fn one_of<'de, D: Deserializer<'de>, T: Copy>(d: D, options: &[(&str, T)]) -> Result<T, D::Error> {
    let s = String::deserialize(d)?;
    options
        .iter()
        .find(|(name, _)| *name == s)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let valid: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
            serde::de::Error::custom(format!("{s:?} is not one of: {}", valid.join(", ")))
        })
}
