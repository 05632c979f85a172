//! The config loader: YAML parsing, `${env:…}` expansion, validation.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = bizsignal::config::Config::from_yaml(text, "fuzz.yaml");
    }
});
