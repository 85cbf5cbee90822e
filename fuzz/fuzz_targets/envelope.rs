//! Envelope decoding and verification never panic, whatever the bytes.
#![no_main]

use antar_core::wire::{Payload, SignedEnvelope};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if let Ok(signed) = SignedEnvelope::decode(data) {
        if let Ok(v) = common::verifier().verify_envelope(&signed) {
            let _ = v.check_payload(&Payload::default());
        }
    }
    // The signed bytes alone, as a node decodes them to address a REJECTED receipt.
    let _ = antar_core::wire::Envelope::decode(data);
});
