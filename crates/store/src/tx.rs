//! The typed view of one sled transaction.

use std::cell::RefCell;
use std::collections::BTreeSet;

use prost::Message;
use sled::transaction::{ConflictableTransactionError, TransactionalTree, UnabortableTransactionError};

use antar_core::MessageId;

use crate::keys::{
    self, AUDIT, AUDIT_HASH, AUDIT_META, DEAD, EXPIRY, INBOX, INBOX_INDEX, MESSAGES, OUTBOX, RECEIPT_LOG,
    SEEN, TX_KEYS,
};
use crate::records::{DeadLetter, InboxEntry, MessageRecord};
use crate::StoreError;

/// Why a transaction closure gave up; nothing it wrote is kept.
#[derive(Debug)]
#[non_exhaustive]
pub enum Abort {
    /// A record did not decode.
    Corrupt(StoreError),
    /// The caller's own reason, returned as is.
    Refused(String),
}

/// The error a transaction closure returns: a conflict (sled retries) or an abort.
#[derive(Debug)]
pub struct TxError(pub(crate) ConflictableTransactionError<Abort>);

impl From<Abort> for TxError {
    fn from(a: Abort) -> Self {
        Self(ConflictableTransactionError::Abort(a))
    }
}

impl From<sled::Error> for TxError {
    fn from(e: sled::Error) -> Self {
        Self(ConflictableTransactionError::Storage(e))
    }
}

impl From<UnabortableTransactionError> for TxError {
    fn from(e: UnabortableTransactionError) -> Self {
        Self(e.into())
    }
}

/// What a committed transaction changed, to wake the right waiters.
#[derive(Debug, Default)]
pub(crate) struct Effects {
    pub(crate) outboxes: BTreeSet<String>,
    pub(crate) inbox: bool,
    pub(crate) receipts: bool,
    pub(crate) queued_delta: i64,
}

/// One atomic change over every tree of the store.
pub struct Tx<'a> {
    trees: &'a [TransactionalTree],
    effects: RefCell<Effects>,
}

type R<T> = Result<T, TxError>;

impl<'a> Tx<'a> {
    pub(crate) fn new(trees: &'a [TransactionalTree]) -> Self {
        Self {
            trees,
            effects: RefCell::default(),
        }
    }

    pub(crate) fn into_effects(self) -> Effects {
        self.effects.into_inner()
    }

    /// The record of message `id`.
    ///
    /// # Errors
    /// A conflict, or [`Abort::Corrupt`].
    pub fn message(&self, id: &MessageId) -> R<Option<MessageRecord>> {
        match self.trees[MESSAGES].get(id.as_bytes())? {
            Some(v) => Ok(Some(decode(MESSAGES, &v)?)),
            None => Ok(None),
        }
    }

    /// Writes the record of message `id`.
    ///
    /// # Errors
    /// A conflict.
    pub fn put_message(&self, id: &MessageId, record: &MessageRecord) -> R<()> {
        self.trees[MESSAGES].insert(id.as_bytes().as_slice(), record.encode_to_vec())?;
        Ok(())
    }

    /// Queues a serialized `TransferItem` for `peer`; returns its sequence number.
    /// `expires_ms` (0: never) indexes it for the expiry sweeper.
    ///
    /// # Errors
    /// A conflict.
    pub fn push_outbox(&self, peer: &str, item: &[u8], expires_ms: u64) -> R<u64> {
        let seq = self.trees[OUTBOX].generate_id()?;
        let mut value = Vec::with_capacity(8 + item.len());
        value.extend_from_slice(&expires_ms.to_be_bytes());
        value.extend_from_slice(item);
        self.trees[OUTBOX].insert(keys::seq_key(peer, seq), value)?;
        if expires_ms != 0 {
            self.trees[EXPIRY].insert(keys::expiry_key(expires_ms, peer, seq), &[][..])?;
        }
        let mut fx = self.effects.borrow_mut();
        fx.outboxes.insert(peer.to_owned());
        fx.queued_delta += item.len() as i64;
        Ok(seq)
    }

    /// Removes item `seq` from `peer`'s outbox; returns the `TransferItem`
    /// bytes if it was there.
    ///
    /// # Errors
    /// A conflict.
    pub fn remove_outbox(&self, peer: &str, seq: u64) -> R<Option<Vec<u8>>> {
        let Some(value) = self.trees[OUTBOX].remove(keys::seq_key(peer, seq))? else {
            return Ok(None);
        };
        let expires_ms = keys::u64_of(&value);
        if expires_ms != 0 {
            self.trees[EXPIRY].remove(keys::expiry_key(expires_ms, peer, seq))?;
        }
        let item = value.get(8..).unwrap_or_default().to_vec();
        self.effects.borrow_mut().queued_delta -= item.len() as i64;
        Ok(Some(item))
    }

    /// Puts message `id` in `service`'s inbox, counting `size` bytes against the quota.
    ///
    /// # Errors
    /// A conflict.
    pub fn push_inbox(&self, service: &str, id: &MessageId, size: u64) -> R<()> {
        let seq = self.trees[INBOX].generate_id()?;
        let key = keys::seq_key(service, seq);
        let entry = InboxEntry {
            message_id: id.as_bytes().to_vec(),
            size,
            service: service.to_owned(),
        };
        self.trees[INBOX].insert(key.clone(), entry.encode_to_vec())?;
        self.trees[INBOX_INDEX].insert(id.as_bytes().as_slice(), key)?;
        let mut fx = self.effects.borrow_mut();
        fx.inbox = true;
        fx.queued_delta += size as i64;
        Ok(())
    }

    /// Takes message `id` out of its inbox; false if it was not in one.
    ///
    /// # Errors
    /// A conflict, or [`Abort::Corrupt`].
    pub fn remove_inbox(&self, id: &MessageId) -> R<bool> {
        let Some(key) = self.trees[INBOX_INDEX].remove(id.as_bytes().as_slice())? else {
            return Ok(false);
        };
        if let Some(v) = self.trees[INBOX].remove(key)? {
            let entry: InboxEntry = decode(INBOX, &v)?;
            self.effects.borrow_mut().queued_delta -= entry.size as i64;
        }
        Ok(true)
    }

    /// True when `id` is in an inbox.
    ///
    /// # Errors
    /// A conflict.
    pub fn in_inbox(&self, id: &MessageId) -> R<bool> {
        Ok(self.trees[INBOX_INDEX].get(id.as_bytes().as_slice())?.is_some())
    }

    /// Marks (`namespace`, `key`) as seen; returns true if it was seen before.
    /// The dedup of received envelopes (by sender and id) and receipts.
    ///
    /// # Errors
    /// A conflict.
    pub fn mark_seen(&self, namespace: &str, key: &[u8]) -> R<bool> {
        let k = keys::pair_key(namespace, key);
        Ok(self.trees[SEEN].insert(k, &[][..])?.is_some())
    }

    /// True when (`namespace`, `key`) was seen.
    ///
    /// # Errors
    /// A conflict.
    pub fn seen(&self, namespace: &str, key: &[u8]) -> R<bool> {
        Ok(self.trees[SEEN].get(keys::pair_key(namespace, key))?.is_some())
    }

    /// The message ids recorded for a sender's idempotency key.
    ///
    /// # Errors
    /// A conflict.
    pub fn tx_key(&self, sender: &str, key: &str) -> R<Option<Vec<MessageId>>> {
        let v = self.trees[TX_KEYS].get(keys::pair_key(sender, key.as_bytes()))?;
        Ok(v.map(|v| ids_of(&v)))
    }

    /// Records the message ids of a sender's idempotency key.
    ///
    /// # Errors
    /// A conflict.
    pub fn put_tx_key(&self, sender: &str, key: &str, ids: &[MessageId]) -> R<()> {
        let v: Vec<u8> = ids.iter().flat_map(|id| *id.as_bytes()).collect();
        self.trees[TX_KEYS].insert(keys::pair_key(sender, key.as_bytes()), v)?;
        Ok(())
    }

    /// Appends a serialized `SignedReceipt` to the receipt log; returns its cursor.
    ///
    /// # Errors
    /// A conflict.
    pub fn log_receipt(&self, signed_receipt: &[u8]) -> R<u64> {
        let cursor = self.trees[RECEIPT_LOG].generate_id()? + 1;
        self.trees[RECEIPT_LOG].insert(&cursor.to_be_bytes(), signed_receipt)?;
        self.effects.borrow_mut().receipts = true;
        Ok(cursor)
    }

    /// Appends an entry to the Merkle log in this transaction: the signed
    /// envelope or receipt bytes (never a payload), at the next dense index.
    /// Returns the index.
    ///
    /// # Errors
    /// A conflict or a storage failure.
    pub fn audit_append(&self, kind: antar_core::wire::EntryKind, data: &[u8], message_id: &str) -> R<u64> {
        let index = self.trees[AUDIT_META]
            .get(keys::AUDIT_SIZE)?
            .map_or(0, |v| keys::u64_of(&v));
        let entry = antar_core::wire::LogEntry {
            index,
            kind: kind as i32,
            data: data.to_vec(),
            message_id: message_id.to_owned(),
            logged_at: Some(antar_core::time::to_timestamp(std::time::SystemTime::now())),
        }
        .encode_to_vec();
        let key = index.to_be_bytes();
        self.trees[AUDIT_HASH].insert(&key, &antar_core::merkle::leaf_hash(&entry))?;
        self.trees[AUDIT].insert(&key, entry)?;
        self.trees[AUDIT_META].insert(keys::AUDIT_SIZE, &(index + 1).to_be_bytes())?;
        Ok(index)
    }

    /// Stores a dead letter.
    ///
    /// # Errors
    /// A conflict.
    pub fn put_dead(&self, id: &MessageId, dead: &DeadLetter) -> R<()> {
        self.trees[DEAD].insert(id.as_bytes().as_slice(), dead.encode_to_vec())?;
        Ok(())
    }

    /// Removes and returns a dead letter.
    ///
    /// # Errors
    /// A conflict, or [`Abort::Corrupt`].
    pub fn take_dead(&self, id: &MessageId) -> R<Option<DeadLetter>> {
        match self.trees[DEAD].remove(id.as_bytes().as_slice())? {
            Some(v) => Ok(Some(decode(DEAD, &v)?)),
            None => Ok(None),
        }
    }
}

fn ids_of(v: &[u8]) -> Vec<MessageId> {
    v.chunks_exact(16)
        .map(|c| {
            let mut b = [0u8; 16];
            b.copy_from_slice(c);
            MessageId::from_bytes(b)
        })
        .collect()
}

fn decode<M: Message + Default>(tree: usize, bytes: &[u8]) -> Result<M, Abort> {
    crate::decode(tree, bytes).map_err(Abort::Corrupt)
}

/// Bytes a queue value counts against the quota (used when rebuilding the count on open).
pub(crate) fn queued_size(tree: usize, value: &[u8]) -> Result<u64, StoreError> {
    match tree {
        OUTBOX => Ok(value.len().saturating_sub(8) as u64),
        _ => Ok(crate::decode::<InboxEntry>(tree, value)?.size),
    }
}
