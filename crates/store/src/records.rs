//! Records kept in the store, encoded with prost (forward compatible: new
//! fields get new tags).

use antar_core::wire::{Payload, SignedEnvelope, SignedReceipt};

/// What a node knows about one message it sent or holds for one of its services.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MessageRecord {
    /// The signed header.
    #[prost(message, optional, tag = "1")]
    pub envelope: Option<SignedEnvelope>,
    /// The payload; cleared by a retention purge.
    #[prost(message, optional, tag = "2")]
    pub payload: Option<Payload>,
    /// `antar.v1.MessageState` as i32.
    #[prost(int32, tag = "3")]
    pub state: i32,
    /// The last reason a hop gave for refusing it.
    #[prost(string, tag = "4")]
    pub reason: String,
    /// Every receipt about it this node holds, in arrival order.
    #[prost(message, repeated, tag = "5")]
    pub receipts: Vec<SignedReceipt>,
    /// The verified SPIFFE URI of the sender node (received messages).
    #[prost(string, tag = "6")]
    pub sender_identity: String,
    /// True when this node sent it.
    #[prost(bool, tag = "7")]
    pub outgoing: bool,
    /// The recipient's service.
    #[prost(string, tag = "8")]
    pub service: String,
    /// When the sender said it expires, ms since the epoch.
    #[prost(uint64, tag = "9")]
    pub expires_at_ms: u64,
    /// Receipts about it kept in the receipt log (a message this node
    /// sent), by cursor, in arrival order after those in `receipts`: each
    /// receipt is stored once, not again with every rewrite of the record.
    /// [`crate::Store::message`] puts them into `receipts` (and leaves this
    /// empty); `Tx::message` leaves them here, so a record read and written
    /// back in a transaction keeps them.
    #[prost(uint64, repeated, tag = "10")]
    pub receipt_cursors: Vec<u64>,
    /// Where [`crate::Tx::push_inbox`] queued it: its key in `inbox`, by
    /// which an ack finds the entry without an index (left as it is once
    /// the entry is taken out). Empty in records written before (their
    /// entries are found through `inbox_index`) and for messages never put
    /// in an inbox.
    #[prost(bytes = "vec", tag = "11")]
    pub inbox_key: Vec<u8>,
    /// SHA-256 of each receipt it holds (of `SignedReceipt::receipt`, the
    /// signed bytes), 32 bytes each, in the order of `receipts` then
    /// `receipt_cursors`: how a receipt handed over again is known without
    /// reading the others. Added with each receipt
    /// ([`MessageRecord::push_logged_receipt`]); records written before
    /// hold fewer, and [`crate::Tx::holds_receipt`] hashes their receipts.
    #[prost(bytes = "vec", tag = "12")]
    pub receipt_digests: Vec<u8>,
    /// Of a message this node sent: its recipient agency, so a receipt is
    /// matched to the envelope without reading the body. Empty in records
    /// written before it.
    #[prost(string, tag = "13")]
    pub recipient: String,
    /// Of a message this node sent: the SHA-256 of its signed envelope
    /// bytes (`SignedEnvelope::envelope`). Empty in records written before it.
    #[prost(bytes = "vec", tag = "14")]
    pub envelope_sha256: Vec<u8>,
    /// Of a message this node received and its app acked: the index in
    /// the Merkle log of the PROCESSED receipt this node issued about it,
    /// so that its sender, offering it again or replaying its TRANSACTION
    /// key, can be handed that receipt again. Unset in records written before it and where the
    /// receipt was not logged here (a message between two services of
    /// this node's own agency).
    #[prost(uint64, optional, tag = "15")]
    pub processed_audit_index: Option<u64>,
    /// Of a message this node received: the index in the Merkle log of the
    /// DELIVERED receipt this node issued about it, so that a sender
    /// offering it again (restored from a backup taken while it was in
    /// flight) can be handed that receipt again. Unset as
    /// `processed_audit_index` is.
    #[prost(uint64, optional, tag = "16")]
    pub delivered_audit_index: Option<u64>,
}

impl MessageRecord {
    /// Adds the receipt logged at `cursor` in the receipt log, whose signed
    /// bytes (`SignedReceipt::receipt`) have SHA-256 `digest`.
    pub fn push_logged_receipt(&mut self, cursor: u64, digest: &[u8; 32]) {
        self.receipt_cursors.push(cursor);
        self.receipt_digests.extend_from_slice(digest);
    }
}

/// One message waiting in a service's inbox.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InboxEntry {
    /// The message id, 16 bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub message_id: Vec<u8>,
    /// Bytes it counts against the quota.
    #[prost(uint64, tag = "2")]
    pub size: u64,
    /// The service's name.
    #[prost(string, tag = "3")]
    pub service: String,
}

/// An item that could not be delivered, kept until retried or purged.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeadLetter {
    /// The message id, 16 bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub message_id: Vec<u8>,
    /// The serialized `TransferItem` that was queued.
    #[prost(bytes = "vec", tag = "2")]
    pub item: Vec<u8>,
    /// Reason code, e.g. `expired`.
    #[prost(string, tag = "3")]
    pub reason: String,
    /// When it died, ms since the epoch.
    #[prost(uint64, tag = "4")]
    pub at_ms: u64,
    /// The peer whose outbox it was in.
    #[prost(string, tag = "5")]
    pub peer: String,
}

/// A stored message record made whole: its body (envelope and payload)
/// from `bodies` when it is not inline, its signer certificates put back.
/// Returns the record and the body bytes it was given, if any. `body`
/// reads the record's entry in `bodies`, whole (`cuts.rs`), `cert` a certificate by
/// its digest; `fail` turns a record that is not what was written into
/// the caller's error.
pub(crate) fn restore<E>(
    bytes: &sled::IVec,
    body: impl FnOnce() -> Result<Option<prost::bytes::Bytes>, E>,
    cert: impl FnMut(&[u8]) -> Result<Option<sled::IVec>, E>,
    fail: impl Fn(crate::StoreError) -> E,
) -> Result<(MessageRecord, Option<prost::bytes::Bytes>), E> {
    use crate::keys::{BODIES, MESSAGES};
    let mut record: MessageRecord = crate::decode_shared(MESSAGES, bytes).map_err(&fail)?;
    let mut stored = None;
    if record.envelope.is_none() && record.payload.is_none() {
        if let Some(b) = body()? {
            let MessageRecord {
                envelope, payload, ..
            } = prost::Message::decode(b.clone()).map_err(|e| fail(crate::corrupt(BODIES, e.to_string())))?;
            (record.envelope, record.payload) = (envelope, payload);
            stored = Some(b);
        }
    }
    crate::certs::attach(&mut record, cert, |detail| fail(crate::corrupt(MESSAGES, detail)))?;
    Ok((record, stored))
}
