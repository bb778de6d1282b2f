//! Fuzzes the configuration parser: any text must give settings or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = kms_plugin::settings::Settings::from_toml(text);
    }
});
