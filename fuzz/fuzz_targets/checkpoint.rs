//! Signed-note checkpoint and cosignature parsing never panic, and Merkle
//! proof verification never panics on arbitrary paths and sizes.
#![no_main]

use antar_core::checkpoint::{verify_cosignature, Checkpoint};
use antar_core::merkle;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = [7u8; 32];
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Checkpoint::verify(text, &key);
        let cp = Checkpoint {
            origin: "fuzz.example/antar/a".into(),
            size: 1,
            root: [0; 32],
        };
        for line in text.lines() {
            let _ = verify_cosignature(line, &cp, "fuzz.example/antar/b", &key);
        }
    }
    if data.len() >= 16 {
        let a = u64::from_le_bytes(data[..8].try_into().unwrap_or_default());
        let b = u64::from_le_bytes(data[8..16].try_into().unwrap_or_default());
        let path: Vec<merkle::Hash> = data[16..]
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap_or_default())
            .collect();
        let leaf = merkle::leaf_hash(data);
        let _ = merkle::verify_inclusion(&leaf, a % 1_000_000, b % 1_000_000, &path, &leaf);
        let _ = merkle::verify_consistency(a % 1_000_000, b % 1_000_000, &path, &leaf, &leaf);
    }
});
