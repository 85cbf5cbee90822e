//! The typed view of one transaction.
//!
//! A transaction runs alone (the store's writer lock is held), reading
//! through the layers of writes not yet in sled: its own, then the open
//! group's, then the group being applied. Its writes stay in its own layer
//! until it returns `Ok`; then they join the open group, which the applier
//! writes to sled through the redo journal (see `group.rs`).

use std::cell::{Cell, Ref, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prost::bytes::Bytes;
use prost::Message;
use sled::IVec;
use tokio::sync::Notify;

use antar_core::envelope::sha256;
use antar_core::wire::SignedReceipt;
use antar_core::MessageId;

use crate::keys::{
    self, AUDIT, AUDIT_META, BODIES, DEAD, INBOX, INBOX_INDEX, MESSAGES, META, NEXT_ID, OUTBOX, RECEIPT_LOG,
    SEEN, TX_KEYS,
};
use crate::records::{DeadLetter, InboxEntry, MessageRecord};
use crate::{certs, cuts, runs, StoreError};

/// Why a transaction closure gave up; nothing it wrote is kept.
#[derive(Debug)]
#[non_exhaustive]
pub enum Abort {
    /// A record did not decode.
    Corrupt(StoreError),
    /// The caller's own reason, returned as is.
    Refused(String),
}

/// The error a transaction closure returns: an abort, or a storage failure.
#[derive(Debug)]
pub struct TxError(pub(crate) Failed);

#[derive(Debug)]
pub(crate) enum Failed {
    Abort(Abort),
    Storage(sled::Error),
}

impl From<Abort> for TxError {
    fn from(a: Abort) -> Self {
        Self(Failed::Abort(a))
    }
}

impl From<sled::Error> for TxError {
    fn from(e: sled::Error) -> Self {
        Self(Failed::Storage(e))
    }
}

/// Writes not yet in sled, by tree then key; `None` removes the key. Kept in
/// (tree, key) order: the order they are applied in (`group.rs`), but for
/// `meta`, `receipt_log`, `audit` and `bodies`, applied first (see
/// [`Writes::iter`]).
#[derive(Debug, Default)]
pub(crate) struct Writes(BTreeMap<usize, BTreeMap<Vec<u8>, Option<IVec>>>);

impl Writes {
    /// The write to `key` of `tree`, if there is one.
    pub(crate) fn get(&self, tree: usize, key: &[u8]) -> Option<&Option<IVec>> {
        self.0.get(&tree)?.get(key)
    }

    pub(crate) fn set(&mut self, tree: usize, key: Vec<u8>, value: Option<IVec>) {
        self.0.entry(tree).or_default().insert(key, value);
    }

    /// Adds `later`'s writes; where both write a key, `later` wins.
    ///
    /// Key by key into the larger map: `BTreeMap::append` rebuilds both
    /// maps whole, which made joining each small transaction to a growing
    /// open group cost as much as the group (2 % of a message's CPU).
    pub(crate) fn append(&mut self, later: Writes) {
        for (tree, mut keys) in later.0 {
            let into = self.0.entry(tree).or_default();
            if into.len() < keys.len() {
                std::mem::swap(into, &mut keys);
                // `keys` now holds the earlier writes: `later`'s stay.
                for (k, v) in keys {
                    into.entry(k).or_insert(v);
                }
            } else {
                into.extend(keys);
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.values().all(BTreeMap::is_empty)
    }

    /// Every write, tree by tree in key order.
    ///
    /// The trees other values point into come first — `meta` (signer
    /// certificates), `receipt_log`, `audit`, `bodies` (in that order: a
    /// log entry may point into `receipt_log`, a body into `audit`) —: a reader outside a
    /// transaction sees sled while a group is being applied, and must never
    /// find a new record in `messages` (or its inbox entry) whose
    /// certificates, envelope and payload or receipts (`receipt_cursors`)
    /// are not in sled yet, nor an outbox item whose log entry is not.
    /// The log's size (`audit_meta`) still comes after its entries.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, &[u8], &Option<IVec>)> {
        const FIRST: [usize; 4] = [META, RECEIPT_LOG, AUDIT, BODIES];
        let first = FIRST.into_iter().filter_map(|t| self.0.get_key_value(&t));
        let rest = self.0.iter().filter(|(tree, _)| !FIRST.contains(tree));
        first
            .chain(rest)
            .flat_map(|(tree, keys)| keys.iter().map(|(k, v)| (*tree, k.as_slice(), v)))
    }
}

/// What committed transactions changed, to count, index and wake the
/// right waiters.
#[derive(Debug, Default)]
pub(crate) struct Effects {
    pub(crate) outboxes: BTreeSet<String>,
    pub(crate) inbox: bool,
    pub(crate) receipts: bool,
    pub(crate) queued_delta: i64,
    /// The part of `queued_delta` in each peer's outbox.
    pub(crate) outbox_delta: BTreeMap<String, i64>,
    /// Outbox items with an expiry queued and taken, in order.
    pub(crate) expiring: Vec<Expiring>,
}

impl Effects {
    /// Adds a later transaction's effects to these.
    pub(crate) fn merge(&mut self, later: Effects) {
        self.outboxes.extend(later.outboxes);
        self.inbox |= later.inbox;
        self.receipts |= later.receipts;
        self.queued_delta += later.queued_delta;
        for (peer, delta) in later.outbox_delta {
            *self.outbox_delta.entry(peer).or_default() += delta;
        }
        self.expiring.extend(later.expiring);
    }

    /// `bytes` more (or fewer) queued in `peer`'s outbox.
    fn outbox_bytes(&mut self, peer: &str, bytes: i64) {
        self.queued_delta += bytes;
        match self.outbox_delta.get_mut(peer) {
            Some(delta) => *delta += bytes,
            None => {
                self.outbox_delta.insert(peer.to_owned(), bytes);
            }
        }
    }
}

/// An outbox item with an expiry queued or taken by a transaction.
#[derive(Debug)]
pub(crate) enum Expiring {
    Queued(Due),
    Taken(Due),
}

/// An outbox item with an expiry.
#[derive(Debug, Clone)]
pub(crate) struct Due {
    /// When it expires, ms since the epoch.
    pub(crate) at_ms: u64,
    pub(crate) peer: Arc<str>,
    pub(crate) seq: u64,
}

/// The outbox items that expire, by when: an index kept in memory, not in
/// sled. It is derived whole from `outbox` when the store opens (each
/// item's value begins with its expiry), then follows what each group
/// queued and took once the applier publishes it — so it matches what
/// sled holds as soon as each group is published, also after a crash, and
/// costs no write. About 24 bytes and a share of a B-tree node per item:
/// 40-50 MB for a million queued.
#[derive(Debug, Default)]
pub(crate) struct Expiry {
    /// (expires_ms, seq, the peer's number in `names`).
    due: BTreeSet<(u64, u64, u32)>,
    /// Peer names by number: the configured peers and routes, a handful.
    names: Vec<Arc<str>>,
    numbers: HashMap<Arc<str>, u32>,
}

impl Expiry {
    /// Adds `item`.
    pub(crate) fn insert(&mut self, item: Due) {
        let n = self.number(&item.peer);
        self.due.insert((item.at_ms, item.seq, n));
    }

    /// Removes `item`, if it is here.
    fn remove(&mut self, item: &Due) {
        if let Some(n) = self.numbers.get(&*item.peer) {
            self.due.remove(&(item.at_ms, item.seq, *n));
        }
    }

    /// `peer`'s number, given it on first sight.
    fn number(&mut self, peer: &Arc<str>) -> u32 {
        if let Some(n) = self.numbers.get(&**peer) {
            return *n;
        }
        // Numbers are indexes into `names`, which only grows.
        let n = u32::try_from(self.names.len()).expect("fewer than 2^32 peers");
        self.names.push(peer.clone());
        self.numbers.insert(peer.clone(), n);
        n
    }

    /// Up to `max` items that expire at or before `now_ms`, soonest first,
    /// as (peer, seq), but none of a peer's at or before `spared(peer)`.
    /// (An item that expires at `u64::MAX` ms never is.)
    pub(crate) fn due(
        &self,
        now_ms: u64,
        max: usize,
        spared: impl Fn(&str) -> Option<u64>,
    ) -> Vec<(String, u64)> {
        self.due
            .range(..(now_ms.saturating_add(1), 0, 0))
            .map(|(_, seq, n)| (&self.names[*n as usize], *seq))
            .filter(|(peer, seq)| spared(peer).is_none_or(|upto| *seq > upto))
            .take(max)
            .map(|(peer, seq)| (peer.to_string(), seq))
            .collect()
    }
}

/// The queued-bytes count, the expiry index and the wake-ups that follow
/// applied writes. Published by the applier, so a caller that stops
/// waiting loses none.
#[derive(Debug, Default)]
pub(crate) struct Signals {
    pub(crate) queued_bytes: AtomicU64,
    /// Of `queued_bytes`, those in each peer's outbox.
    pub(crate) outbox_bytes: Mutex<HashMap<String, u64>>,
    pub(crate) outbox: Mutex<HashMap<String, Arc<Notify>>>,
    pub(crate) inbox: Arc<Notify>,
    pub(crate) receipts: Arc<Notify>,
    pub(crate) expiry: Mutex<Expiry>,
    /// Each group's journal write and sync, timed by the applier.
    pub(crate) journal_syncs: antar_core::Histogram,
}

impl Signals {
    /// Woken whenever an item is queued for `peer`.
    pub(crate) fn outbox(&self, peer: &str) -> Arc<Notify> {
        let mut map = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(peer.to_owned()).or_default().clone()
    }

    /// Counts and wakes for writes now in sled.
    pub(crate) fn publish(&self, effects: &Effects) {
        let delta = effects.queued_delta;
        if delta >= 0 {
            self.queued_bytes.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            // Saturating: a count that wrapped would refuse every send.
            let down = delta.unsigned_abs();
            let _ = self
                .queued_bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
                    Some(q.saturating_sub(down))
                });
        }
        if !effects.outbox_delta.is_empty() {
            let mut bytes = self.outbox_bytes.lock().unwrap_or_else(|p| p.into_inner());
            for (peer, delta) in &effects.outbox_delta {
                let now = match bytes.get(peer.as_str()) {
                    Some(b) => b.saturating_add_signed(*delta),
                    None => u64::try_from(*delta).unwrap_or(0),
                };
                if now == 0 {
                    bytes.remove(peer.as_str());
                } else {
                    bytes.insert(peer.clone(), now);
                }
            }
        }
        if !effects.expiring.is_empty() {
            let mut expiry = self.expiry.lock().unwrap_or_else(|p| p.into_inner());
            for change in &effects.expiring {
                match change {
                    Expiring::Queued(item) => expiry.insert(item.clone()),
                    Expiring::Taken(item) => expiry.remove(item),
                }
            }
        }
        for peer in &effects.outboxes {
            self.outbox(peer).notify_one();
        }
        if effects.inbox {
            self.inbox.notify_waiters();
        }
        if effects.receipts {
            self.receipts.notify_waiters();
        }
    }
}

/// One atomic change over every tree of the store.
pub struct Tx<'a> {
    trees: &'a [sled::Tree],
    /// Writes of earlier transactions not yet in sled, newest layer first.
    below: [Option<&'a Writes>; 2],
    own: RefCell<Writes>,
    effects: RefCell<Effects>,
    /// The next sequence number or cursor to hand out, and whether one was.
    next_id: Cell<u64>,
    ids_used: Cell<bool>,
    certs: &'a certs::Cache,
    /// The bodies of the records this transaction read or wrote, as read
    /// back: restored when stored as a cut (the certificate in place),
    /// else as stored (the certificate as a digest); so that writing a
    /// record rewrites its body only if it changed.
    bodies: RefCell<HashMap<MessageId, Bytes>>,
    /// The Merkle-log entries this transaction appended for messages'
    /// signed envelopes, by message id: a body written beside one is
    /// stored without the envelope ([`Tx::put_message`]).
    logged_envelopes: RefCell<HashMap<MessageId, u64>>,
    /// The whole data of the log values this transaction appended, by
    /// tree and cursor or index: what `Held::Logged` and `Held::Audited`
    /// name, found here without reading back what was just cut.
    appended: RefCell<HashMap<(usize, u64), Bytes>>,
    /// The last run this transaction read from sled, by tree (`runs::get_kept`).
    kept: RefCell<HashMap<usize, Option<runs::Kept>>>,
}

type R<T> = Result<T, TxError>;

/// A transaction reads the parts of cut values as it sees them.
impl cuts::Parts for Tx<'_> {
    type Error = TxError;

    fn cert(&self, digest: &[u8]) -> cuts::Lookup<TxError> {
        Tx::cert(self, digest)
    }

    fn receipt(&self, cursor: u64) -> cuts::Lookup<TxError> {
        self.get(RECEIPT_LOG, &cursor.to_be_bytes())
    }

    fn entry(&self, index: u64) -> cuts::Lookup<TxError> {
        self.get(AUDIT, &index.to_be_bytes())
    }
}

/// What of a value written to a log or an outbox the store holds already,
/// so it is stored without it and put back when read (`cuts.rs`).
#[derive(Debug, Clone, Copy)]
pub enum Held<'a> {
    /// Nothing: the value is stored whole.
    Nothing,
    /// The value holds this signer certificate (DER), stored once apart.
    Cert(&'a [u8]),
    /// The value holds the receipt this transaction logged at this cursor
    /// ([`Tx::log_receipt`]).
    Logged(u64),
    /// The value holds the data (signed envelope or receipt) of the
    /// Merkle-log entry this transaction appended at this index
    /// ([`Tx::audit_append`]).
    Audited(u64),
}

impl<'a> Tx<'a> {
    /// A transaction over `trees` reading through `below`, handing out
    /// sequence numbers from `next_id`.
    pub(crate) fn new(
        trees: &'a [sled::Tree],
        below: [Option<&'a Writes>; 2],
        next_id: u64,
        certs: &'a certs::Cache,
    ) -> Self {
        Self {
            trees,
            below,
            own: RefCell::default(),
            effects: RefCell::default(),
            next_id: Cell::new(next_id),
            ids_used: Cell::new(false),
            certs,
            bodies: RefCell::default(),
            logged_envelopes: RefCell::default(),
            appended: RefCell::default(),
            kept: RefCell::default(),
        }
    }

    /// Its writes (with the new `next_id` when it handed numbers out), its
    /// effects, and the next number to hand out after it.
    pub(crate) fn into_parts(self) -> (Writes, Effects, u64) {
        let next = self.next_id.get();
        let mut own = self.own.into_inner();
        if self.ids_used.get() {
            own.set(META, NEXT_ID.to_vec(), Some(IVec::from(&next.to_be_bytes()[..])));
        }
        (own, self.effects.into_inner(), next)
    }

    /// A number never handed out before, in this store's life, crashes
    /// included: outbox and inbox sequence numbers, receipt-log cursors.
    fn generate_id(&self) -> u64 {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        self.ids_used.set(true);
        id
    }

    /// The value of `key` in `tree` as this transaction sees it.
    fn get(&self, tree: usize, key: &[u8]) -> R<Option<IVec>> {
        match self.pending(tree, key) {
            Some(v) => Ok(v),
            None if runs::packs(tree) => {
                match runs::get_kept(
                    self.trees,
                    tree,
                    key,
                    self.kept.borrow_mut().entry(tree).or_default(),
                ) {
                    Ok(v) => Ok(v),
                    Err(StoreError::Sled(e)) => Err(e.into()),
                    Err(e) => Err(Abort::Corrupt(e).into()),
                }
            }
            None => Ok(self.trees[tree].get(key)?),
        }
    }

    /// What this transaction or a group not yet in sled wrote at `key`, if
    /// any did (`Some(None)`: removed).
    fn pending(&self, tree: usize, key: &[u8]) -> Option<Option<IVec>> {
        if let Some(v) = self.own.borrow().get(tree, key) {
            return Some(v.clone());
        }
        self.below
            .iter()
            .flatten()
            .find_map(|layer| layer.get(tree, key).cloned())
    }

    /// The signer certificate with SHA-256 `digest`, as this transaction sees it.
    fn cert(&self, digest: &[u8]) -> R<Option<IVec>> {
        match self.pending(META, &certs::key(digest)) {
            Some(v) => Ok(v),
            None => Ok(self.certs.lookup(&self.trees[META], digest)?),
        }
    }

    /// Sets `key` without reading what was there.
    fn put(&self, tree: usize, key: impl Into<Vec<u8>>, value: impl Into<IVec>) {
        self.own.borrow_mut().set(tree, key.into(), Some(value.into()));
    }

    /// Sets `key`; returns what was there.
    fn insert(&self, tree: usize, key: impl Into<Vec<u8>>, value: impl Into<IVec>) -> R<Option<IVec>> {
        let key = key.into();
        let old = self.get(tree, &key)?;
        self.put(tree, key, value);
        Ok(old)
    }

    /// Removes `key`; returns what was there.
    fn remove(&self, tree: usize, key: impl Into<Vec<u8>>) -> R<Option<IVec>> {
        let key = key.into();
        let old = self.get(tree, &key)?;
        if old.is_some() {
            self.own.borrow_mut().set(tree, key, None);
        }
        Ok(old)
    }

    /// The record of message `id`, to change and put back: receipts it
    /// keeps in the receipt log stay cursors (`receipt_cursors`), unlike
    /// [`crate::Store::message`].
    ///
    /// # Errors
    /// A storage failure, or [`Abort::Corrupt`].
    pub fn message(&self, id: &MessageId) -> R<Option<MessageRecord>> {
        let Some(v) = self.get(MESSAGES, id.as_bytes())? else {
            return Ok(None);
        };
        let (record, body) = crate::records::restore(
            &v,
            || {
                let key = id.as_bytes();
                self.get(BODIES, key)?
                    .map(|stored| self.restored(BODIES, key, stored))
                    .transpose()
            },
            |digest| self.cert(digest),
            |e| Abort::Corrupt(e).into(),
        )?;
        if let Some(body) = body {
            self.bodies.borrow_mut().insert(*id, body);
        }
        Ok(Some(record))
    }

    /// Writes the record of message `id`, replacing the stored one whole:
    /// to change a stored record, start from what [`Tx::message`] gives
    /// (or use [`Tx::update_message`]), which keeps what the store put in
    /// it — its inbox key and receipt digests.
    ///
    /// # Errors
    /// A storage failure.
    pub fn put_message(&self, id: &MessageId, record: &MessageRecord) -> R<()> {
        let mut record = record.clone();
        // The envelope and payload go apart: a record is rewritten with
        // every state change and receipt, its body almost never.
        let body = MessageRecord {
            envelope: record.envelope.take(),
            payload: record.payload.take(),
            ..Default::default()
        };
        self.detach_certs(&mut record)?;
        self.put_body(id, body)?;
        self.put(MESSAGES, id.as_bytes().as_slice(), record.encode_to_vec());
        Ok(())
    }

    /// Writes `body` (a record holding only an envelope and a payload) as
    /// message `id`'s, unless it is what this transaction read or wrote
    /// there last. When this transaction appended its signed envelope to
    /// the Merkle log, it is stored without it (ADR 0011); else with its
    /// signer certificate as a digest (`certs.rs`).
    fn put_body(&self, id: &MessageId, mut body: MessageRecord) -> R<()> {
        let unchanged = |bytes: &[u8]| {
            self.bodies
                .borrow()
                .get(id)
                .is_some_and(|read| read[..] == *bytes)
        };
        let whole = body.encode_to_vec();
        if unchanged(&whole) {
            return Ok(());
        }
        let logged = self.logged_envelopes.borrow().get(id).copied();
        let cut = logged.and_then(|index| {
            let entry = self.appended(AUDIT, index)?;
            cuts::cut(&whole, &entry, cuts::Part::Entry(index))
        });
        let (stored, read_back) = match cut {
            Some(cut) => (IVec::from(cut), Bytes::from(whole)),
            None => {
                self.detach_certs(&mut body)?;
                let detached = body.encode_to_vec();
                if unchanged(&detached) {
                    return Ok(());
                }
                let detached = IVec::from(detached);
                (detached.clone(), Bytes::from_owner(detached))
            }
        };
        self.bodies.borrow_mut().insert(*id, read_back);
        self.put(BODIES, id.as_bytes().as_slice(), stored);
        Ok(())
    }

    /// Changes the record of message `id` with `f`, neither reading nor
    /// writing its envelope and payload: for state changes and receipts,
    /// which are most of a record's rewrites and need no body. `f` sees the
    /// record without them (unless it keeps them inline, written by an
    /// older version). An envelope or payload `f` sets replaces the stored
    /// one, the other kept; `f` cannot remove either (a purge reads with
    /// [`Tx::message`] and writes with [`Tx::put_message`]). Returns false,
    /// calling nothing, when there is no record.
    ///
    /// # Errors
    /// A storage failure, or [`Abort::Corrupt`].
    pub fn update_message(&self, id: &MessageId, f: impl FnOnce(&mut MessageRecord)) -> R<bool> {
        let updated = self.update_message_if(id, |record| {
            f(record);
            Ok(true)
        })?;
        Ok(updated.is_some())
    }

    /// As [`Tx::update_message`], but `f` may fail, or leave the record as
    /// it was by returning false: then nothing is written. Returns what
    /// `f` returned, or `None`, calling nothing, when there is no record.
    ///
    /// # Errors
    /// A storage failure, [`Abort::Corrupt`], or what `f` returned.
    pub fn update_message_if(
        &self,
        id: &MessageId,
        f: impl FnOnce(&mut MessageRecord) -> R<bool>,
    ) -> R<Option<bool>> {
        let Some(v) = self.get(MESSAGES, id.as_bytes())? else {
            return Ok(None);
        };
        let (mut record, _) = crate::records::restore(
            &v,
            || Ok(None),
            |digest| self.cert(digest),
            |e| Abort::Corrupt(e).into(),
        )?;
        let inline = record.envelope.is_some() || record.payload.is_some();
        if !f(&mut record)? {
            return Ok(Some(false));
        }
        let given = record.envelope.is_some() || record.payload.is_some();
        if given && !inline {
            // Part of a body given: the rest as stored.
            if let Some(stored) = self.message(id)? {
                record.envelope = record.envelope.or(stored.envelope);
                record.payload = record.payload.or(stored.payload);
            }
        }
        if given || inline {
            self.put_message(id, &record)?;
        } else {
            self.detach_certs(&mut record)?;
            self.put(MESSAGES, id.as_bytes().as_slice(), record.encode_to_vec());
        }
        Ok(Some(true))
    }

    /// Whether `id`'s `record` (as this transaction read it) holds a
    /// receipt whose signed bytes have SHA-256 `digest`. A record from
    /// before `receipt_digests` has its receipts read and hashed, and the
    /// digests filled in, kept if the record is written back.
    ///
    /// # Errors
    /// A storage failure, or [`Abort::Corrupt`] when a receipt it refers
    /// to is not in the receipt log.
    pub fn holds_receipt(&self, id: &MessageId, record: &mut MessageRecord, digest: &[u8; 32]) -> R<bool> {
        let held = record.receipts.len() + record.receipt_cursors.len();
        if record.receipt_digests.len() != held * digest.len() {
            let mut digests = Vec::with_capacity(held * digest.len());
            for receipt in &record.receipts {
                digests.extend_from_slice(&sha256(&receipt.receipt));
            }
            for cursor in &record.receipt_cursors {
                let key = cursor.to_be_bytes();
                let Some(stored) = self.get(RECEIPT_LOG, &key)? else {
                    let e = format!("the record of message {id} refers to receipt log cursor {cursor}, which holds nothing");
                    return Err(Abort::Corrupt(crate::corrupt(MESSAGES, e)).into());
                };
                let receipt: SignedReceipt = decode(RECEIPT_LOG, &self.whole(RECEIPT_LOG, &key, &stored)?)?;
                digests.extend_from_slice(&sha256(&receipt.receipt));
            }
            record.receipt_digests = digests;
        }
        Ok(record
            .receipt_digests
            .chunks_exact(digest.len())
            .any(|d| d == digest))
    }

    /// Replaces `record`'s signer certificates by their digests, storing
    /// each certificate this store does not hold yet.
    fn detach_certs(&self, record: &mut MessageRecord) -> R<()> {
        for (digest, der) in certs::detach(record) {
            self.keep_cert(&digest, &der[..])?;
        }
        Ok(())
    }

    /// Stores certificate `der` (SHA-256 `digest`) unless this store holds it.
    fn keep_cert(&self, digest: &[u8], der: impl Into<IVec>) -> R<()> {
        if self.cert(digest)?.is_none() {
            self.put(META, certs::key(digest), der);
        }
        Ok(())
    }

    /// `value`, which holds `data`, as stored: without the part of `data`
    /// that `held` says the store holds already (`cuts.rs`), else whole.
    fn cut(&self, value: &[u8], data: &[u8], held: Held<'_>) -> R<Vec<u8>> {
        let stored = match held {
            Held::Nothing => None,
            Held::Cert(der) => {
                let digest = sha256(der);
                let stored = cuts::cut(value, der, cuts::Part::Cert(&digest));
                if stored.is_some() {
                    self.keep_cert(&digest, der)?;
                }
                stored
            }
            // Checked, not trusted: a wrong cursor would change bytes the
            // Merkle log hashes. A mismatch is a caller's bug: stored whole.
            Held::Logged(cursor) => {
                let logged = self.appended(RECEIPT_LOG, cursor);
                let same = logged.is_some_and(|logged| &logged[..] == data);
                debug_assert!(
                    same,
                    "Held::Logged({cursor}) must name the receipt this transaction logged"
                );
                same.then(|| cuts::cut(value, data, cuts::Part::Receipt(cursor)))
                    .flatten()
            }
            // The entry's data is found in the value, or the value is stored whole.
            Held::Audited(index) => {
                let entry = self.appended(AUDIT, index);
                debug_assert!(
                    entry.is_some(),
                    "Held::Audited({index}) must name an entry this transaction appended"
                );
                entry.and_then(|entry| cuts::cut(value, &entry, cuts::Part::Entry(index)))
            }
        };
        Ok(stored.unwrap_or_else(|| cuts::whole(value)))
    }

    /// The data this transaction appended to `tree` at `n` (`log_receipt`,
    /// `audit_append`), if it appended any there.
    fn appended(&self, tree: usize, n: u64) -> Option<Ref<'_, Bytes>> {
        Ref::filter_map(self.appended.borrow(), |a| a.get(&(tree, n))).ok()
    }

    /// As [`Tx::whole`], without a copy of a value stored whole.
    fn restored(&self, tree: usize, key: &[u8], stored: IVec) -> R<Bytes> {
        let restored = cuts::restore(&stored, self, &|e| {
            Abort::Corrupt(crate::corrupt_at(tree, key, e)).into()
        })?;
        Ok(cuts::restored_bytes(&stored, restored))
    }

    /// The value `stored` in `tree` stands for, with the parts it was cut
    /// of (`cuts.rs`) as this transaction sees them.
    fn whole(&self, tree: usize, key: &[u8], stored: &[u8]) -> R<Vec<u8>> {
        let whole = cuts::restore(stored, self, &|e| {
            Abort::Corrupt(crate::corrupt_at(tree, key, e)).into()
        })?;
        Ok(whole.into_owned())
    }

    /// Queues a serialized `TransferItem` for `peer`, stored without what
    /// `held` says the store holds already; returns its sequence number.
    /// `expires_ms` (0: never) is when the expiry sweeper takes it
    /// ([`crate::Store::expired`]).
    ///
    /// # Errors
    /// A storage failure.
    pub fn push_outbox(&self, peer: &str, item: &[u8], held: Held<'_>, expires_ms: u64) -> R<u64> {
        let seq = self.generate_id();
        let stored = self.cut(item, item, held)?;
        let mut value = Vec::with_capacity(8 + stored.len());
        value.extend_from_slice(&expires_ms.to_be_bytes());
        value.extend_from_slice(&stored);
        self.put(OUTBOX, keys::seq_key(peer, seq), value);
        let mut fx = self.effects.borrow_mut();
        if expires_ms != 0 {
            let peer = peer.into();
            fx.expiring.push(Expiring::Queued(Due {
                at_ms: expires_ms,
                peer,
                seq,
            }));
        }
        fx.outboxes.insert(peer.to_owned());
        fx.outbox_bytes(peer, item.len() as i64);
        Ok(seq)
    }

    /// Removes item `seq` from `peer`'s outbox; returns the `TransferItem`
    /// bytes, whole, if it was there.
    ///
    /// # Errors
    /// A storage failure, or [`Abort::Corrupt`].
    pub fn remove_outbox(&self, peer: &str, seq: u64) -> R<Option<Vec<u8>>> {
        let Some(stored) = self.take_outbox(peer, seq)? else {
            return Ok(None);
        };
        let item = self.whole(OUTBOX, &keys::seq_key(peer, seq), &stored)?;
        self.effects.borrow_mut().outbox_bytes(peer, -(item.len() as i64));
        Ok(Some(item))
    }

    /// Removes item `seq` from `peer`'s outbox without reading what it
    /// holds (a peer took custody of it); returns whether it was there.
    ///
    /// # Errors
    /// A storage failure, or [`Abort::Corrupt`].
    pub fn drop_outbox(&self, peer: &str, seq: u64) -> R<bool> {
        let Some(stored) = self.take_outbox(peer, seq)? else {
            return Ok(false);
        };
        let key = keys::seq_key(peer, seq);
        let len = cuts::whole_len(&stored, self, &|e| {
            Abort::Corrupt(crate::corrupt_at(OUTBOX, &key, e)).into()
        })?;
        self.effects.borrow_mut().outbox_bytes(peer, -(len as i64));
        Ok(true)
    }

    /// Removes item `seq` from `peer`'s outbox (and from the expiry index,
    /// once applied); returns the item as stored. The caller counts it off
    /// the quota.
    fn take_outbox(&self, peer: &str, seq: u64) -> R<Option<IVec>> {
        let Some(value) = self.remove(OUTBOX, keys::seq_key(peer, seq))? else {
            return Ok(None);
        };
        let expires_ms = keys::u64_of(&value);
        if expires_ms != 0 {
            let (at_ms, peer) = (expires_ms, peer.into());
            let taken = Expiring::Taken(Due { at_ms, peer, seq });
            self.effects.borrow_mut().expiring.push(taken);
        }
        let stored = value.len().saturating_sub(8);
        Ok(Some(value.subslice(value.len() - stored, stored)))
    }

    /// Puts message `id` in `service`'s inbox, counting `size` bytes against
    /// the quota. The entry's key is kept in `id`'s record when there is
    /// one (written by this transaction or before), else in `inbox_index`.
    ///
    /// # Errors
    /// A storage failure, or [`Abort::Corrupt`].
    pub fn push_inbox(&self, service: &str, id: &MessageId, size: u64) -> R<()> {
        let seq = self.generate_id();
        let key = keys::seq_key(service, seq);
        let entry = InboxEntry {
            message_id: id.as_bytes().to_vec(),
            size,
            service: service.to_owned(),
        };
        self.put(INBOX, key.clone(), entry.encode_to_vec());
        match self.peek_message(id)? {
            // Rewritten as stored: its certificates and body stay where they are.
            Some(mut record) => {
                record.inbox_key = key;
                self.put(MESSAGES, id.as_bytes().as_slice(), record.encode_to_vec());
            }
            None => self.put(INBOX_INDEX, id.as_bytes().as_slice(), key),
        }
        let mut fx = self.effects.borrow_mut();
        fx.inbox = true;
        fx.queued_delta += size as i64;
        Ok(())
    }

    /// Takes message `id` out of its inbox; false if it was not in one.
    ///
    /// # Errors
    /// A storage failure, or [`Abort::Corrupt`].
    pub fn remove_inbox(&self, id: &MessageId) -> R<bool> {
        let entry = match self.recorded_inbox_key(id)? {
            Some(key) => match self.remove(INBOX, key)? {
                Some(entry) => entry,
                None => return Ok(false),
            },
            // Queued by a build from before `inbox_key`, or without a record.
            None => match self.remove(INBOX_INDEX, id.as_bytes().as_slice())? {
                Some(key) => match self.remove(INBOX, key.to_vec())? {
                    Some(entry) => entry,
                    // Indexed, its entry gone: taken out all the same.
                    None => return Ok(true),
                },
                None => return Ok(false),
            },
        };
        let entry: InboxEntry = decode(INBOX, &entry)?;
        self.effects.borrow_mut().queued_delta -= entry.size as i64;
        Ok(true)
    }

    /// True when `id` is in an inbox.
    ///
    /// # Errors
    /// A storage failure, or [`Abort::Corrupt`].
    pub fn in_inbox(&self, id: &MessageId) -> R<bool> {
        Ok(match self.recorded_inbox_key(id)? {
            Some(key) => self.get(INBOX, &key)?.is_some(),
            None => self.get(INBOX_INDEX, id.as_bytes().as_slice())?.is_some(),
        })
    }

    /// The `inbox` key `id`'s record keeps, if it keeps one.
    fn recorded_inbox_key(&self, id: &MessageId) -> R<Option<Vec<u8>>> {
        Ok(self
            .peek_message(id)?
            .map(|r| r.inbox_key)
            .filter(|key| !key.is_empty()))
    }

    /// The record of `id` as stored, to look at, not to write back: without
    /// its envelope and payload (unless an older build stored them inline),
    /// its signer certificates as their digests, its receipts as cursors.
    /// Cheaper than [`Tx::message`], which reads and restores all of them.
    ///
    /// # Errors
    /// A storage failure, or [`Abort::Corrupt`].
    pub fn peek_message(&self, id: &MessageId) -> R<Option<MessageRecord>> {
        match self.get(MESSAGES, id.as_bytes())? {
            Some(v) => Ok(Some(decode(MESSAGES, &v)?)),
            None => Ok(None),
        }
    }

    /// Marks (`namespace`, `key`) as seen; returns true if it was seen before.
    /// The dedup of received envelopes (by sender and id) and receipts.
    ///
    /// # Errors
    /// A storage failure.
    pub fn mark_seen(&self, namespace: &str, key: &[u8]) -> R<bool> {
        let k = keys::pair_key(namespace, key);
        Ok(self.insert(SEEN, k, &[][..])?.is_some())
    }

    /// Notes (`namespace`, `key`) with a value, replacing any it had: what
    /// a node decided about it (a refusal's reason).
    ///
    /// # Errors
    /// A storage failure.
    pub fn note(&self, namespace: &str, key: &[u8], value: &[u8]) -> R<()> {
        self.put(SEEN, keys::pair_key(namespace, key), value.to_vec());
        Ok(())
    }

    /// Removes what [`Tx::note`] left for (`namespace`, `key`); returns
    /// whether there was one.
    ///
    /// # Errors
    /// A storage failure.
    pub fn unnote(&self, namespace: &str, key: &[u8]) -> R<bool> {
        Ok(self.remove(SEEN, keys::pair_key(namespace, key))?.is_some())
    }

    /// The value [`Tx::note`] left for (`namespace`, `key`), if any.
    ///
    /// # Errors
    /// A storage failure.
    pub fn noted(&self, namespace: &str, key: &[u8]) -> R<Option<Vec<u8>>> {
        Ok(self
            .get(SEEN, &keys::pair_key(namespace, key))?
            .map(|v| v.to_vec()))
    }

    /// True when (`namespace`, `key`) was seen.
    ///
    /// # Errors
    /// A storage failure.
    pub fn seen(&self, namespace: &str, key: &[u8]) -> R<bool> {
        Ok(self.get(SEEN, &keys::pair_key(namespace, key))?.is_some())
    }

    /// The message ids recorded for a sender's idempotency key.
    ///
    /// # Errors
    /// A storage failure.
    pub fn tx_key(&self, sender: &str, key: &str) -> R<Option<Vec<MessageId>>> {
        let v = self.get(TX_KEYS, &keys::pair_key(sender, key.as_bytes()))?;
        Ok(v.map(|v| ids_of(&v)))
    }

    /// Records the message ids of a sender's idempotency key.
    ///
    /// # Errors
    /// A storage failure.
    pub fn put_tx_key(&self, sender: &str, key: &str, ids: &[MessageId]) -> R<()> {
        let v: Vec<u8> = ids.iter().flat_map(|id| *id.as_bytes()).collect();
        self.put(TX_KEYS, keys::pair_key(sender, key.as_bytes()), v);
        Ok(())
    }

    /// Appends a serialized `SignedReceipt` to the receipt log; returns its
    /// cursor. `signer_cert` (the receipt's) is stored once, apart.
    ///
    /// # Errors
    /// A storage failure.
    pub fn log_receipt(&self, signed_receipt: Bytes, signer_cert: &[u8]) -> R<u64> {
        let cursor = self.generate_id() + 1;
        let stored = self.cut(&signed_receipt, &signed_receipt, Held::Cert(signer_cert))?;
        self.put(RECEIPT_LOG, cursor.to_be_bytes(), stored);
        self.appended
            .borrow_mut()
            .insert((RECEIPT_LOG, cursor), signed_receipt);
        self.effects.borrow_mut().receipts = true;
        Ok(cursor)
    }

    /// Appends an entry to the Merkle log in this transaction: the signed
    /// envelope or receipt bytes (never a payload), at the next dense index,
    /// stored without the bytes `held` says the store holds already.
    /// Returns the index.
    ///
    /// # Errors
    /// A storage failure.
    pub fn audit_append(
        &self,
        kind: antar_core::wire::EntryKind,
        data: Bytes,
        held: Held<'_>,
        message_id: &str,
    ) -> R<u64> {
        let index = self
            .get(AUDIT_META, keys::AUDIT_SIZE)?
            .map_or(0, |v| keys::u64_of(&v));
        let entry = antar_core::wire::LogEntry {
            index,
            kind: kind as i32,
            data: data.clone(),
            message_id: message_id.to_owned(),
            logged_at: Some(antar_core::time::to_timestamp(std::time::SystemTime::now())),
        }
        .encode_to_vec();
        let stored = self.cut(&entry, &data, held)?;
        self.put(AUDIT, index.to_be_bytes(), stored);
        if kind == antar_core::wire::EntryKind::Envelope {
            if let Ok(id) = MessageId::parse(message_id) {
                self.logged_envelopes.borrow_mut().insert(id, index);
            }
        }
        self.appended.borrow_mut().insert((AUDIT, index), data);
        self.put(AUDIT_META, keys::AUDIT_SIZE, &(index + 1).to_be_bytes());
        Ok(index)
    }

    /// The data (a signed envelope or receipt, as logged) of Merkle-log
    /// entry `index`, if the log has one there.
    ///
    /// # Errors
    /// A storage failure, or [`Abort::Corrupt`] for an entry that does not
    /// decode.
    pub fn audit_data(&self, index: u64) -> R<Option<Vec<u8>>> {
        let key = index.to_be_bytes();
        let Some(stored) = self.get(AUDIT, &key)? else {
            return Ok(None);
        };
        let entry = self.whole(AUDIT, &key, &stored)?;
        let entry = antar_core::wire::LogEntry::decode(entry.as_slice())
            .map_err(|e| Abort::Corrupt(crate::corrupt_at(AUDIT, &key, e.to_string())))?;
        if entry.index != index {
            let detail = format!("the entry says it is at index {}", entry.index);
            return Err(Abort::Corrupt(crate::corrupt_at(AUDIT, &key, detail)).into());
        }
        Ok(Some(entry.data.into()))
    }

    /// Stores a dead letter.
    ///
    /// # Errors
    /// A storage failure.
    pub fn put_dead(&self, id: &MessageId, dead: &DeadLetter) -> R<()> {
        self.put(DEAD, id.as_bytes().as_slice(), dead.encode_to_vec());
        Ok(())
    }

    /// Removes and returns a dead letter.
    ///
    /// # Errors
    /// A storage failure, or [`Abort::Corrupt`].
    pub fn take_dead(&self, id: &MessageId) -> R<Option<DeadLetter>> {
        match self.remove(DEAD, id.as_bytes().as_slice())? {
            Some(v) => Ok(Some(decode(DEAD, &v)?)),
            None => Ok(None),
        }
    }
}

pub(crate) fn ids_of(v: &[u8]) -> Vec<MessageId> {
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
