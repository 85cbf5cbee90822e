//! The Peer.Transfer stream's messages: decoding a batch and every item in
//! it, as a node does before it plans custody, never panics.
#![no_main]

use antar_core::wire::{transfer_item, Envelope, Receipt, TransferBatch};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = TransferBatch::decode(data) else {
        return;
    };
    for item in batch.items {
        match item.item {
            Some(transfer_item::Item::Envelope(et)) => {
                if let Some(signed) = et.envelope {
                    let _ = Envelope::decode(&signed.envelope[..]);
                    if let Ok(v) = common::verifier().verify_envelope(&signed) {
                        let _ = v.check_payload(&et.payload.unwrap_or_default());
                    }
                }
            }
            Some(transfer_item::Item::Receipt(rt)) => {
                if let Some(signed) = rt.receipt {
                    let _ = Receipt::decode(&signed.receipt[..]);
                    let _ = common::verifier().verify_receipt(&signed);
                }
            }
            None => {}
        }
    }
});
