//! `antar audit verify` on arbitrary bytes: refuses, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let _ = antar_core::audit::verify_bundle(data, common::verifier());
});
