//! Signed-note checkpoint and cosignature parsing never panic, and Merkle
//! proof verification never panics on arbitrary paths and sizes.
#![no_main]

use antar_core::checkpoint::{origin, verify_cosignature, Checkpoint};
use antar_core::merkle;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let (signer, witness) = common::node_keys();
    if let Ok(text) = std::str::from_utf8(data) {
        // A note that verifies is then checked against each cosignature
        // line after it, as a witness's line over that very checkpoint.
        let cp = Checkpoint::verify(text, signer).unwrap_or(Checkpoint {
            origin: origin(common::FED, "finance"),
            size: 1,
            root: [0; 32],
        });
        for line in text.lines() {
            let _ = verify_cosignature(line, &cp, &origin(common::FED, "health"), witness);
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
