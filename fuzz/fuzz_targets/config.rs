//! The config file parser on arbitrary text: an error naming a field, or
//! a config, never a panic; the same text always gives the same config.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use xlb::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("fuzz.toml");
    match Config::parse(text, path) {
        Ok(config) => assert_eq!(Config::parse(text, path).ok(), Some(config)),
        Err(e) => assert!(e.to_string().starts_with("fuzz.toml"), "{e}"),
    }
});
