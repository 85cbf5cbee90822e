//! Building envelopes with a detached, salted payload.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use prost::bytes::Bytes;
use prost::Message;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::id::{AgencyId, MessageId, ServiceName};
use crate::sign::Signer;
use crate::time::to_timestamp;
use crate::wire::{Envelope, Kind, Payload, SignedEnvelope};

/// `SHA-256(salt || payload)`: what the signed header commits to.
pub fn payload_digest(salt: &[u8], data: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(data);
    h.finalize().into()
}

/// `SHA-256(bytes)`, e.g. of a `SignedEnvelope.envelope` for a receipt.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Everything a sender node knows about a message before it signs it.
#[derive(Debug, Clone)]
pub struct Draft {
    /// What the envelope is for.
    pub kind: Kind,
    /// The sender agency: always the node's own, never the app's say.
    pub sender: AgencyId,
    /// The recipient agency.
    pub recipient: AgencyId,
    /// The recipient's service.
    pub service: ServiceName,
    /// RESPONSE: the request id; TRANSACTION: the idempotency key.
    pub correlation_id: String,
    /// When the sender node accepted the message.
    pub created_at: SystemTime,
    /// How long the message may wait for delivery.
    pub ttl: Duration,
    /// App headers, signed with the envelope.
    pub headers: HashMap<String, String>,
    /// MIME type of the payload.
    pub content_type: String,
}

/// A signed envelope with its payload, ready to store and send.
#[derive(Debug, Clone)]
pub struct Sealed {
    /// The id the sender node gave the message.
    pub id: MessageId,
    /// The header as built: what `envelope.envelope` decodes to.
    pub header: Envelope,
    /// The signed header.
    pub envelope: SignedEnvelope,
    /// The salted payload, carried beside the header.
    pub payload: Payload,
}

/// An envelope built and serialized but not yet signed: what
/// [`Signer::sign_envelopes`] signs several of at once.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The id the sender node gave the message.
    pub id: MessageId,
    /// The header as built: what `envelope` decodes to.
    pub header: Envelope,
    /// The serialized `Envelope`: the bytes to sign.
    pub envelope: Bytes,
    /// The envelope's `created_at`.
    pub created_at: SystemTime,
    /// The salted payload, carried beside the header.
    pub payload: Payload,
}

impl Prepared {
    /// Signs this envelope alone.
    pub fn sign(self, signer: &Signer) -> Sealed {
        Sealed {
            id: self.id,
            header: self.header,
            envelope: signer.sign_envelope_bytes(self.envelope),
            payload: self.payload,
        }
    }
}

impl Draft {
    /// Builds the envelope with a fresh id and a fresh 32-byte salt, and signs it.
    pub fn seal(self, data: impl Into<Bytes>, signer: &Signer) -> Sealed {
        self.prepare(data).sign(signer)
    }

    /// Builds the envelope with a fresh id and a fresh 32-byte salt, unsigned.
    pub fn prepare(self, data: impl Into<Bytes>) -> Prepared {
        let mut salt = vec![0u8; 32];
        rand::rng().fill_bytes(&mut salt);
        self.prepare_with(MessageId::new(), salt, data.into())
    }

    /// Like [`Draft::seal`], with the id and salt given (test vectors, replays).
    pub fn seal_with(self, id: MessageId, salt: Vec<u8>, data: impl Into<Bytes>, signer: &Signer) -> Sealed {
        self.prepare_with(id, salt, data.into()).sign(signer)
    }

    fn prepare_with(self, id: MessageId, salt: Vec<u8>, data: Bytes) -> Prepared {
        let envelope = Envelope {
            id: id.to_string(),
            kind: self.kind as i32,
            sender: self.sender.to_string(),
            recipient: self.recipient.to_string(),
            service: self.service.to_string(),
            correlation_id: self.correlation_id,
            created_at: Some(to_timestamp(self.created_at)),
            expires_at: Some(to_timestamp(self.created_at + self.ttl)),
            headers: self.headers,
            content_type: self.content_type,
            payload_digest: Bytes::copy_from_slice(&payload_digest(&salt, &data)),
            payload_size: data.len() as u64,
            salt_sha256: Bytes::copy_from_slice(&sha256(&salt)),
        };
        Prepared {
            id,
            envelope: envelope.encode_to_vec().into(),
            header: envelope,
            created_at: self.created_at,
            payload: Payload {
                salt: salt.into(),
                data,
            },
        }
    }
}
