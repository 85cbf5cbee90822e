//! Antar's core: identifiers, envelopes, receipts, and the signing and
//! verification rules every node and auditor applies. No IO happens here.
//!
//! Signed things are the exact serialized protobuf bytes that were signed
//! (DESIGN.md §4), so nothing is ever canonicalized: [`sign`] signs
//! `domain || bytes`, [`verify`] checks that signature before it decodes.

#![warn(missing_docs)]

pub mod audit;
pub mod checkpoint;
pub mod envelope;
pub mod histogram;
pub mod id;
pub mod merkle;
pub mod sign;
pub mod time;
pub mod verify;

pub use envelope::{payload_digest, Draft, Prepared, Sealed};
pub use histogram::Histogram;
pub use id::{AgencyId, IdError, Identity, MessageId, Role, ServiceName};
pub use sign::{
    SignError, Signer, ENVELOPE_BATCH_DOMAIN, ENVELOPE_DOMAIN, RECEIPT_BATCH_DOMAIN, RECEIPT_DOMAIN,
};
pub use verify::{Revocations, TrustAnchor, VerifiedEnvelope, VerifiedReceipt, Verifier, VerifyError};

/// Re-export of the wire types, so users of the core need not name the proto crate.
pub use antar_proto::v1 as wire;
