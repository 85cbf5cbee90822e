//! Node config parsing and validation never panic, whatever the text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = antar_node::NodeConfig::from_toml(text) {
            let _ = c.validate();
            let _ = c.to_toml();
        }
    }
});
