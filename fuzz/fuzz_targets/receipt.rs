//! Receipt decoding and verification never panic, whatever the bytes.
#![no_main]

use antar_core::wire::SignedReceipt;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if let Ok(signed) = SignedReceipt::decode(data) {
        let _ = common::verifier().verify_receipt(&signed);
    }
});
