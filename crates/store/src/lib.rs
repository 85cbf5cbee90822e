//! Antar's durable store on sled: message records, per-peer outboxes,
//! per-service inboxes, dedup keys, the receipt log and dead letters.
//!
//! Every state change is one atomic transaction over all trees
//! ([`Store::transact`]); concurrent transactions reach sled together as one
//! group, synced to a write-ahead redo journal before sled sees any of it
//! (`group.rs`, `journal.rs`, ADRs 0004 and 0005), so a transaction is
//! durable when it returns. [`Store::durable`] covers the few writes outside
//! transactions, one flush serving every caller waiting at that moment
//! (group commit). Only this crate names sled.

#![warn(missing_docs)]

mod certs;
mod commit;
mod cuts;
mod group;
mod journal;
mod keys;
mod records;
mod runs;
mod tx;

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::Notify;

pub use journal::{
    DEFAULT_SEGMENT_BYTES as DEFAULT_JOURNAL_SEGMENT_BYTES, MAX_SEGMENT_BYTES as MAX_JOURNAL_SEGMENT_BYTES,
    MIN_SEGMENT_BYTES as MIN_JOURNAL_SEGMENT_BYTES,
};
pub use records::{DeadLetter, InboxEntry, MessageRecord};
pub use tx::{Abort, Held, Tx, TxError};

/// A raw key and value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

use antar_core::MessageId;
use commit::GroupCommit;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// sled reported an IO or corruption error.
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    /// A flush or an apply failed earlier: the store refuses all further
    /// work (fail-stop), because it can no longer tell what is on disk.
    #[error("store is poisoned ({0}); restart the node")]
    Poisoned(String),
    /// The redo journal could not be written or read (names the file).
    #[error("journal: {0}")]
    Journal(String),
    /// Another process holds the store's directory lock past
    /// [`LOCK_WAIT`]: most likely another node runs on the same data
    /// directory.
    #[error(
        "the store {} is in use by another process (is another antar node running on this data directory?)",
        .0.display()
    )]
    InUse(PathBuf),
    /// A stored record does not decode: the data directory is corrupt.
    #[error("corrupt record in tree {tree}: {detail}")]
    Corrupt {
        /// The tree holding the record.
        tree: &'static str,
        /// The decode error.
        detail: String,
    },
}

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The sled directory.
    pub path: PathBuf,
    /// Bytes of queued work (outboxes + inboxes) past which new sends are refused.
    pub max_queued_bytes: u64,
    /// sled's page cache, bytes.
    pub cache_capacity: u64,
    /// Size past which a write-ahead journal segment is retired and
    /// checkpointed ([`DEFAULT_JOURNAL_SEGMENT_BYTES`]; a value outside
    /// [`MIN_JOURNAL_SEGMENT_BYTES`]..=[`MAX_JOURNAL_SEGMENT_BYTES`] is
    /// taken as the nearer bound). Larger: fewer sled
    /// checkpoints, more to replay after a crash and more disk.
    pub journal_segment_bytes: u64,
}

/// An outbox item as [`Store::outbox_queued`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// Its sequence number in the peer's outbox.
    pub seq: u64,
    /// When it expires, ms since the epoch; 0: never (a receipt, or a
    /// dead letter an administrator retried).
    pub expires_ms: u64,
    /// The serialized `TransferItem`.
    pub item: Vec<u8>,
}

/// The node's durable state. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// The store's directory.
    path: PathBuf,
    db: sled::Db,
    trees: Vec<sled::Tree>,
    /// Before `commit`: the applier stops before the flusher's last flush.
    groups: group::Groups,
    commit: GroupCommit,
    max_queued_bytes: u64,
    /// The queued-bytes count and wake-ups, shared with the applier.
    signals: Arc<tx::Signals>,
    /// The checkpointer's timing of each journal checkpoint.
    journal_checkpoints: Arc<antar_core::Histogram>,
    /// One thread at a time extends `audit_node`.
    node_filler: Mutex<()>,
    /// Signer certificates of message records and cut values, as read from sled.
    certs: certs::Cache,
    /// The first sequence number this opening hands out ([`Store::first_seq`]).
    first_seq: u64,
}

/// Removes the files in sled's `blobs` directory of a store sled
/// recovered nothing from: no log points to them.
fn remove_orphan_blobs(path: &std::path::Path) -> Result<(), StoreError> {
    let io = |e: std::io::Error| StoreError::Sled(sled::Error::Io(e));
    let Ok(entries) = std::fs::read_dir(path.join("blobs")) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry.map_err(io)?.path();
        tracing::warn!(path = %path.display(), "removing a blob file no log points to (left by a crash before the store's first write)");
        std::fs::remove_file(&path).map_err(io)?;
    }
    Ok(())
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// How long [`Store::open`] waits for the directory lock: far longer than
/// sled's late release takes even on a loaded machine, short enough that a
/// second node on a busy data directory fails promptly.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Opens sled, waiting up to [`LOCK_WAIT`] for its directory lock. sled
/// 0.34 lets go of the lock from its IO threads a little after the last
/// handle is dropped (sled issues 1234, 1289), so a store closed and opened
/// again at once can find it still held for some milliseconds. A lock held
/// for longer belongs to another process: [`StoreError::InUse`].
fn open_sled(config: &StoreConfig) -> Result<sled::Db, StoreError> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        let opened = sled::Config::new()
            .path(&config.path)
            .cache_capacity(config.cache_capacity)
            // Durability comes from our own group-commit flushes, not a timer.
            .flush_every_ms(None)
            .open();
        match opened {
            Err(sled::Error::Io(e)) if e.to_string().starts_with("could not acquire lock") => {
                if Instant::now() >= deadline {
                    return Err(StoreError::InUse(config.path.clone()));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            opened => return Ok(opened?),
        }
    }
}

impl Store {
    /// Opens (or creates) the store and recovers from any crash: sled replays
    /// its log, groups of transactions a crash interrupted are finished from
    /// the journal, and the queued-bytes count is rebuilt from the queues,
    /// the expiry index from the outbox.
    ///
    /// # Errors
    /// [`StoreError::InUse`] when another process holds the directory,
    /// [`StoreError::Sled`] when it cannot be opened.
    pub fn open(config: &StoreConfig) -> Result<Self, StoreError> {
        let db = open_sled(config)?;
        Self::recover(config, &db).inspect_err(|_| {
            // The last handle's drop flushes, and after a failed write
            // sled's flush never returns: drop it on a thread of its own, so
            // the error reaches the operator instead of a hang at start.
            let _ = std::thread::Builder::new()
                .name("antar-sled-drop".into())
                .spawn(move || drop(db));
        })
    }

    fn recover(config: &StoreConfig, db: &sled::Db) -> Result<Self, StoreError> {
        let trees = keys::TREES
            .iter()
            .map(|name| db.open_tree(name))
            .collect::<Result<Vec<_>, _>>()?;
        if !db.was_recovered() {
            // A new store: put sled's first log segment on disk before any
            // value is written. sled keeps a large value in a blob file,
            // written when the value is, before the log that points to it;
            // its recovery deletes blob files past the last stable log
            // position, but a store killed before sled ever wrote its log
            // has no such position, and replaying the journal into it then
            // collides with the orphan blob file (`File exists`). A store
            // killed that way before this flush existed still holds such
            // files: nothing recovered, so nothing points to them.
            remove_orphan_blobs(&config.path)?;
            db.flush()?;
        }
        let mut replayed = group::replay(&trees)?;
        if replayed > 0 {
            db.flush()?;
        }
        let segment_bytes = config
            .journal_segment_bytes
            .clamp(journal::MIN_SEGMENT_BYTES, journal::MAX_SEGMENT_BYTES);
        let journal_checkpoints = Arc::new(antar_core::Histogram::default());
        let (journal, checkpoints, n) = journal::Journal::open(
            &config.path,
            db,
            &trees,
            segment_bytes,
            journal_checkpoints.clone(),
        )?;
        replayed += n;
        if replayed > 0 {
            tracing::info!(
                groups = replayed,
                "replayed the journal: finished transactions a crash interrupted"
            );
        }
        // Numbers are recorded with every group that hands one out; a store
        // from before that handed them out from sled's generator.
        let next_id = match trees[keys::META].get(keys::NEXT_ID)? {
            Some(v) => keys::u64_of(&v),
            // Not asked when recorded: each call at open moves sled's
            // generator by millions, for nothing.
            None => db.generate_id()? + 1,
        };
        let certs = certs::Cache::default();
        let parts = InSled::new(&trees, &certs);
        let mut queued = 0u64;
        let mut outbox_bytes: HashMap<String, u64> = HashMap::new();
        let mut expiry = tx::Expiry::default();
        for kv in trees[keys::OUTBOX].iter() {
            let (k, v) = kv?;
            let peer: Arc<str> = keys::name_of(&k).into();
            // Items alone or in a run (`runs.rs`); a run that does not parse
            // is named here, and again when read for sending.
            let stored_len = v.len() as u64;
            let items = match runs::values(keys::OUTBOX, &k, v) {
                Ok(items) => items,
                Err(e) => {
                    // Counted as stored, as an item that cannot be restored.
                    tracing::error!(error = %e, "an outbox run cannot be read");
                    queued += stored_len;
                    *outbox_bytes.entry(peer.to_string()).or_default() += stored_len;
                    continue;
                }
            };
            for (seq, v) in items {
                let expires_ms = keys::u64_of(&v);
                if expires_ms != 0 {
                    let peer = peer.clone();
                    expiry.insert(tx::Due {
                        at_ms: expires_ms,
                        peer,
                        seq,
                    });
                }
                // An item counts whole, as it was queued (`Tx::push_outbox`).
                let stored = v.get(8..).unwrap_or_default();
                let key = keys::seq_key(&peer, seq);
                let len = cuts::whole_len(stored, &parts, &|e| corrupt_at(keys::OUTBOX, &key, e));
                let len = match len {
                    Ok(len) => len as u64,
                    // Named here, and again when the item is read for sending;
                    // not a reason to keep every other queue from starting.
                    Err(e) => {
                        tracing::error!(error = %e, "an outbox item cannot be restored");
                        stored.len() as u64
                    }
                };
                queued += len;
                *outbox_bytes.entry(peer.to_string()).or_default() += len;
            }
        }
        for kv in trees[keys::INBOX].iter() {
            let (k, v) = kv?;
            for (_, v) in runs::values(keys::INBOX, &k, v)? {
                queued += decode::<InboxEntry>(keys::INBOX, &v)?.size;
            }
        }
        // Builds from before kept the expiry index in sled; it is derived
        // from the outbox, as above, and no longer written.
        if !trees[keys::EXPIRY].is_empty() {
            trees[keys::EXPIRY].clear()?;
        }
        let commit = GroupCommit::start(db.clone());
        let signals = Arc::new(tx::Signals {
            queued_bytes: AtomicU64::new(queued),
            outbox_bytes: Mutex::new(outbox_bytes),
            expiry: Mutex::new(expiry),
            ..tx::Signals::default()
        });
        Ok(Self {
            inner: Arc::new(Inner {
                groups: group::Groups::start(
                    db.clone(),
                    trees.clone(),
                    (journal, checkpoints),
                    signals.clone(),
                    next_id,
                ),
                commit,
                path: config.path.clone(),
                db: db.clone(),
                trees,
                max_queued_bytes: config.max_queued_bytes,
                signals,
                journal_checkpoints,
                node_filler: Mutex::default(),
                certs,
                first_seq: next_id,
            }),
        })
    }

    /// Runs `f` as one atomic transaction over every tree: alone, seeing
    /// every transaction before it; when this returns its writes are synced
    /// to the journal (durable) and in sled (visible to every reader).
    /// Concurrent transactions reach sled together (`group.rs`).
    ///
    /// # Errors
    /// `Err(Ok(abort))` when `f` aborted (nothing it wrote is kept),
    /// `Err(Err(store))` on a store failure.
    pub async fn transact<T>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<T, TxError>,
    ) -> Result<T, Result<Abort, StoreError>> {
        self.check().map_err(Err)?;
        let (out, group) = self
            .inner
            .groups
            .run(|layers, next_id| self.run_tx(f, layers, next_id));
        let out = out?;
        // The applier counts and wakes for it once it is in sled, even if
        // this future is dropped here.
        self.inner.groups.applied(group).await.map_err(Err)?;
        Ok(out)
    }

    /// Runs `f` as [`Store::transact`] does, but returns as soon as its
    /// writes are in line, without waiting for them to be synced: they
    /// reach the journal and sled with the next group a waiting transaction
    /// starts, or on their own at most 100 ms later (and at `close` or
    /// drop). Every
    /// transaction after it sees them; a reader outside a transaction only
    /// once they are written. For writes whose loss in a crash costs only
    /// work done again — an outbox item deleted after the peer took it
    /// goes again, and the peer answers `DUPLICATE`.
    ///
    /// # Errors
    /// As [`Store::transact`]; a failure to write them later fails the
    /// store (fail-stop) like any group's.
    pub fn transact_unsynced<T>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<T, TxError>,
    ) -> Result<T, Result<Abort, StoreError>> {
        self.check().map_err(Err)?;
        self.inner
            .groups
            .run_unsynced(|layers, next_id| self.run_tx(f, layers, next_id))
    }

    /// Runs a transaction's closure on the layers below it; its writes,
    /// effects and next sequence number on success.
    #[allow(clippy::type_complexity)]
    fn run_tx<T>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<T, TxError>,
        layers: [Option<&tx::Writes>; 2],
        next_id: u64,
    ) -> (
        Result<T, Result<Abort, StoreError>>,
        Option<(tx::Writes, tx::Effects, u64)>,
    ) {
        let tx = Tx::new(&self.inner.trees, layers, next_id, &self.inner.certs);
        match f(&tx) {
            Ok(out) => (Ok(out), Some(tx.into_parts())),
            Err(TxError(tx::Failed::Abort(a))) => (Err(Ok(a)), None),
            Err(TxError(tx::Failed::Storage(e))) => (Err(Err(e.into())), None),
        }
    }

    /// Waits until everything committed before this call is on disk.
    /// One flush serves every caller waiting at that moment.
    ///
    /// # Errors
    /// [`StoreError::Poisoned`] when a flush or an apply failed; the node must stop.
    pub async fn durable(&self) -> Result<(), StoreError> {
        self.inner.groups.check()?;
        self.inner.commit.durable().await
    }

    /// Fails once a flush or an apply failed (fail-stop).
    fn check(&self) -> Result<(), StoreError> {
        self.inner.commit.check()?;
        self.inner.groups.check()
    }

    /// True when queued bytes have passed the quota: new sends must be refused.
    pub fn over_quota(&self) -> bool {
        self.queued_bytes() >= self.inner.max_queued_bytes
    }

    /// How long each group of transactions took to be written and
    /// `fdatasync`ed to the journal: every `transact` waits for one, so a
    /// slow or stalling disk shows here first.
    pub fn journal_syncs(&self) -> &antar_core::Histogram {
        &self.inner.signals.journal_syncs
    }

    /// How long each checkpoint of full journal segments took (sled
    /// flushed, its files `fsync`ed, the segments deleted or recycled):
    /// one per retired segment, or fewer when they queue up. Their number
    /// and length are what smaller `journal_segment_bytes` cost.
    pub fn journal_checkpoints(&self) -> &antar_core::Histogram {
        &self.inner.journal_checkpoints
    }

    /// Bytes of queued work (outboxes + inboxes).
    pub fn queued_bytes(&self) -> u64 {
        self.inner.signals.queued_bytes.load(Ordering::Relaxed)
    }

    /// Of [`Store::queued_bytes`], those queued for `peer`.
    pub fn outbox_bytes(&self, peer: &str) -> u64 {
        let bytes = self.inner.signals.outbox_bytes.lock();
        let bytes = bytes.unwrap_or_else(|p| p.into_inner());
        bytes.get(peer).copied().unwrap_or(0)
    }

    /// Size of the store on disk: sled's files and the journal's segments.
    pub fn size_on_disk(&self) -> u64 {
        self.inner.db.size_on_disk().unwrap_or(0) + journal::bytes(&self.inner.path)
    }

    /// The message ids recorded for a sender's idempotency key
    /// ([`Tx::tx_key`]) by the groups already in sled, read without a
    /// transaction, so without waiting for one. sled holds only groups
    /// synced to the journal, so a key found is durable; one that a group
    /// not yet applied holds is not found (the transaction that stores
    /// finds it).
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure.
    pub fn tx_key(&self, sender: &str, key: &str) -> Result<Option<Vec<MessageId>>, StoreError> {
        self.check()?;
        let v = self.inner.trees[keys::TX_KEYS].get(keys::pair_key(sender, key.as_bytes()))?;
        Ok(v.map(|v| tx::ids_of(&v)))
    }

    /// The message record of `id`, if this node holds one, whole: with its
    /// body, signer certificates and every receipt (those it keeps in the
    /// receipt log put into `receipts`).
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure or a corrupt record.
    pub fn message(&self, id: &MessageId) -> Result<Option<MessageRecord>, StoreError> {
        self.messages().get(id)
    }

    /// Reads message records one after another, as [`Store::message`]
    /// does, each log run their bodies and receipts were cut against read
    /// once for them all (`runs::get_kept`): messages logged together,
    /// read together, share their runs.
    pub fn messages(&self) -> Messages<'_> {
        Messages {
            store: self,
            parts: self.parts(),
        }
    }

    /// A stored message record, with its body and signer certificates put back.
    fn record(&self, parts: &InSled<'_>, id: &[u8], bytes: &sled::IVec) -> Result<MessageRecord, StoreError> {
        let (record, _) = records::restore(
            bytes,
            || {
                let Some(stored) = self.inner.trees[keys::BODIES].get(id)? else {
                    return Ok(None);
                };
                Ok(Some(cuts::restored_bytes(
                    &stored,
                    parts.whole(keys::BODIES, id, &stored)?,
                )))
            },
            |digest| Ok(self.inner.certs.lookup(&self.inner.trees[keys::META], digest)?),
            |e| e,
        )?;
        Ok(record)
    }

    /// Moves the receipts `record` keeps in the receipt log into its
    /// `receipts`, after those it holds itself.
    fn put_receipts_back(&self, parts: &InSled<'_>, record: &mut MessageRecord) -> Result<(), StoreError> {
        for cursor in std::mem::take(&mut record.receipt_cursors) {
            let Some(bytes) = cuts::Parts::receipt(parts, cursor)? else {
                return Err(corrupt(
                    keys::MESSAGES,
                    format!("a record refers to receipt log cursor {cursor}, which holds nothing"),
                ));
            };
            record.receipts.push(decode(
                keys::RECEIPT_LOG,
                &parts.whole(keys::RECEIPT_LOG, &cursor.to_be_bytes(), &bytes)?,
            )?);
        }
        Ok(())
    }

    /// The value a value of `tree` (`receipt_log`, `audit`, `outbox` items)
    /// stored as `stored` stands for, byte for byte: whole, or a cut with
    /// its part put back (`cuts.rs`).
    fn whole<'s>(&self, tree: usize, key: &[u8], stored: &'s [u8]) -> Result<Cow<'s, [u8]>, StoreError> {
        self.parts().whole(tree, key, stored)
    }

    /// Where a cut's parts are read from (`cuts.rs`): one for all the
    /// values of a read, so that those logged together are read once.
    fn parts(&self) -> InSled<'_> {
        InSled::new(&self.inner.trees, &self.inner.certs)
    }

    /// Drops the payload of every message for which `purge` says so (it sees
    /// the record), in transactions of up to 256 messages; envelopes,
    /// receipts and the log are kept. Returns how many payloads were dropped.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure.
    pub async fn purge_payloads(&self, purge: impl Fn(&MessageRecord) -> bool) -> Result<u64, StoreError> {
        const CHUNK: usize = 256;
        let mut n = 0;
        let mut ids = Vec::with_capacity(CHUNK);
        let mut records = self.inner.trees[keys::MESSAGES].iter();
        let parts = self.parts();
        loop {
            let next = records.next().transpose()?;
            if let Some((k, v)) = &next {
                let record = self.record(&parts, k, v)?;
                if let (Some(_), true, Ok(bytes)) =
                    (&record.payload, purge(&record), <[u8; 16]>::try_from(k.as_ref()))
                {
                    ids.push(MessageId::from_bytes(bytes));
                }
            }
            if ids.len() < CHUNK && next.is_some() {
                continue;
            }
            n += self.drop_payloads(&ids).await?;
            ids.clear();
            if next.is_none() {
                return Ok(n);
            }
        }
    }

    /// Drops the payloads of `ids` in one transaction; returns how many were there.
    async fn drop_payloads(&self, ids: &[MessageId]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.transact(|tx| {
            let mut dropped = 0;
            for id in ids {
                let Some(mut r) = tx.message(id)? else { continue };
                if r.payload.take().is_some() {
                    tx.put_message(id, &r)?;
                    dropped += 1;
                }
            }
            Ok(dropped)
        })
        .await
        .map_err(|e| match e {
            Ok(abort) => StoreError::Corrupt {
                tree: keys::TREES[keys::MESSAGES],
                detail: format!("{abort:?}"),
            },
            Err(e) => e,
        })
    }

    /// Up to `max` outbox items (serialized `TransferItem`s) for `peer` with
    /// a sequence number above `after`.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure.
    pub fn outbox_batch(
        &self,
        peer: &str,
        after: Option<u64>,
        max: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .outbox_queued(peer, after, max)?
            .into_iter()
            .map(|q| (q.seq, q.item))
            .collect())
    }

    /// [`Store::outbox_batch`], each item with when it expires.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure.
    pub fn outbox_queued(
        &self,
        peer: &str,
        after: Option<u64>,
        max: usize,
    ) -> Result<Vec<Queued>, StoreError> {
        let from = after.map_or(0, |seq| seq.saturating_add(1));
        let items = runs::range_in(&self.inner.trees, keys::OUTBOX, &keys::prefixed(peer), from, None)?;
        let mut out = Vec::new();
        let parts = self.parts();
        for kv in items.take(max) {
            let (seq, v) = kv?;
            // The value is expires_ms (8 bytes) followed by the item as stored.
            let key = keys::seq_key(peer, seq);
            let item = parts.whole(keys::OUTBOX, &key, v.get(8..).unwrap_or_default())?;
            out.push(Queued {
                seq,
                expires_ms: keys::u64_of(&v),
                item: item.into_owned(),
            });
        }
        Ok(out)
    }

    /// How many of `peer`'s outbox items have a sequence number at or below
    /// `upto`, read without restoring them.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure, or a run that does not parse.
    pub fn outbox_count_through(&self, peer: &str, upto: u64) -> Result<u64, StoreError> {
        runs::range_in(
            &self.inner.trees,
            keys::OUTBOX,
            &keys::prefixed(peer),
            0,
            Some(upto.saturating_add(1)),
        )?
        .try_fold(0, |n, kv| kv.map(|_| n + 1))
    }

    /// Items waiting in `peer`'s outbox.
    pub fn outbox_depth(&self, peer: &str) -> u64 {
        self.inner.trees[keys::OUTBOX]
            .scan_prefix(keys::prefixed(peer))
            .flatten()
            .map(|(_, v)| runs::count(keys::OUTBOX, &v))
            .sum()
    }

    /// True when `peer`'s outbox is empty.
    pub fn outbox_depth_is_zero(&self, peer: &str) -> bool {
        // A run is removed with its last item.
        self.inner.trees[keys::OUTBOX]
            .scan_prefix(keys::prefixed(peer))
            .next()
            .is_none()
    }

    /// The names of the peers that have an outbox, reading one key of each.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure.
    pub fn outbox_peers(&self) -> Result<Vec<String>, StoreError> {
        let tree = &self.inner.trees[keys::OUTBOX];
        let mut peers = Vec::new();
        let mut from = Vec::new();
        while let Some(kv) = tree.range(from.as_slice()..).next() {
            let (key, _) = kv?;
            // Past every key of this peer: its name, then a byte above `\0`.
            let end = key.iter().position(|b| *b == 0).unwrap_or(key.len());
            from = [&key[..end], &[1]].concat();
            peers.push(keys::name_of(&key));
        }
        Ok(peers)
    }

    /// The peers that have an outbox, with their depth.
    pub fn outbox_depths(&self) -> Vec<(String, u64)> {
        prefix_counts(&self.inner.trees, keys::OUTBOX)
    }

    /// The services that have an inbox, with their depth.
    pub fn inbox_depths(&self) -> Vec<(String, u64)> {
        prefix_counts(&self.inner.trees, keys::INBOX)
    }

    /// Inbox entries in arrival order, of `service` or of every service.
    /// Returns the entry keys (for [`Tx::remove_inbox`]) with their entries.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure or a corrupt entry.
    pub fn inbox_scan(
        &self,
        service: Option<&str>,
    ) -> impl Iterator<Item = Result<InboxEntry, StoreError>> + '_ {
        let tree = &self.inner.trees[keys::INBOX];
        let iter = match service {
            Some(s) => tree.scan_prefix(keys::prefixed(s)),
            None => tree.iter(),
        };
        // Entries alone or in runs (`runs.rs`).
        iter.flat_map(|kv| {
            let values = kv
                .map_err(StoreError::from)
                .and_then(|(k, v)| runs::values(keys::INBOX, &k, v));
            match values {
                Ok(values) => values.into_iter().map(|(_, v)| decode(keys::INBOX, &v)).collect(),
                Err(e) => vec![Err(e)],
            }
        })
    }

    /// Inbox entries of `service` with a sequence number after `after`
    /// (all of them with `None`), in arrival order, with their sequence
    /// numbers. A number is never handed out twice and entries reach sled
    /// in order, so a reader that keeps the last number it saw finds
    /// every later arrival past it.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure or a corrupt entry.
    pub fn inbox_after(
        &self,
        service: &str,
        after: Option<u64>,
    ) -> impl Iterator<Item = Result<(u64, InboxEntry), StoreError>> + '_ {
        let from = after.map_or(0, |seq| seq.saturating_add(1));
        let entries = runs::range_in(
            &self.inner.trees,
            keys::INBOX,
            &keys::prefixed(service),
            from,
            None,
        );
        let (entries, failed) = match entries {
            Ok(entries) => (Some(entries), None),
            Err(e) => (None, Some(Err(e))),
        };
        failed.into_iter().chain(entries.into_iter().flatten().map(|kv| {
            let (seq, v) = kv?;
            Ok((seq, decode(keys::INBOX, &v)?))
        }))
    }

    /// The first service, in name order, after `service` (from the first
    /// with `None`) that has an entry in the inbox.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure.
    pub fn next_inbox_service(&self, service: Option<&str>) -> Result<Option<String>, StoreError> {
        let start = service.map(keys::prefix_end).unwrap_or_default();
        match self.inner.trees[keys::INBOX].range(start..).next() {
            Some(kv) => Ok(Some(keys::name_of(&kv?.0))),
            None => Ok(None),
        }
    }

    /// Receipts logged after `cursor`, up to `max`, with their cursors.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure.
    pub fn receipts_after(&self, cursor: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.log_values(keys::RECEIPT_LOG, cursor.saturating_add(1), max)
    }

    /// Number of entries in the Merkle log.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure.
    pub fn audit_size(&self) -> Result<u64, StoreError> {
        Ok(self.inner.trees[keys::AUDIT_META]
            .get(keys::AUDIT_SIZE)?
            .map_or(0, |v| keys::u64_of(&v)))
    }

    /// Log entries (index, exact `LogEntry` bytes as appended, restored from
    /// their cut) from `from`, up to `max`.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure.
    pub fn audit_entries(&self, from: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.log_values(keys::AUDIT, from, max)
    }

    /// The leaf hash of log entry `index`, read as `(key, stored value)`:
    /// the entry must be there, at its place, and say so itself.
    fn leaf(&self, index: u64, (key, stored): (u64, sled::IVec)) -> Result<Hash, StoreError> {
        let entry = self.whole(keys::AUDIT, &key.to_be_bytes(), &stored)?;
        let named = antar_core::wire::LogEntry::decode(entry.as_ref()).map_or(u64::MAX, |e| e.index);
        if key != index || named != index {
            return Err(corrupt_log(index));
        }
        Ok(antar_core::merkle::leaf_hash(&entry))
    }

    /// Up to `max` values of log tree `tree` from key `from`, restored.
    fn log_values(&self, tree: usize, from: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        let parts = self.parts();
        for kv in runs::range(&self.inner.trees, tree, from, None)?.take(max) {
            let (k, v) = kv?;
            out.push((k, parts.whole(tree, &k.to_be_bytes(), &v)?.into_owned()));
        }
        Ok(out)
    }

    /// The log's Merkle tree over its first `size` entries, for roots and
    /// proofs in O(log² n) reads (`antar_core::merkle::*_of`). First stores
    /// the hash of every perfect subtree completed by entries added since
    /// the last call, reading only those entries (and holding at most 16k of
    /// them in memory): a checkpoint or proof
    /// costs the same on a log of a billion entries as on a small one.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure, or a log with a hole (corrupt).
    pub fn audit_tree(&self, size: u64) -> Result<LogTree<'_>, StoreError> {
        self.fill_audit_nodes(size)?;
        Ok(LogTree { store: self, size })
    }

    fn fill_audit_nodes(&self, size: u64) -> Result<(), StoreError> {
        let _one_filler = self.inner.node_filler.lock().unwrap_or_else(|p| p.into_inner());
        let filled = self.inner.trees[keys::AUDIT_NODE]
            .get(keys::AUDIT_NODES)?
            .map_or(0, |v| keys::u64_of(&v));
        if filled >= size {
            return Ok(());
        }
        // The perfect subtrees that make up the first `filled` entries, left
        // to right (one per set bit of `filled`): new leaves merge into them.
        let mut frontier: Vec<(u32, Hash)> = Vec::new();
        let mut start = 0u64;
        for level in (0..64).rev() {
            if filled & (1 << level) != 0 {
                frontier.push((level, self.audit_subtree(level, start >> level)?));
                start += 1 << level;
            }
        }
        let mut nodes: Vec<([u8; 9], Hash)> = Vec::new();
        let mut n = filled;
        for kv in runs::range(&self.inner.trees, keys::AUDIT, filled, Some(size))? {
            let mut hash = self.leaf(n, kv?)?;
            n += 1;
            let mut level = 0;
            while let Some(&(l, left)) = frontier.last() {
                if l != level {
                    break;
                }
                frontier.pop();
                hash = antar_core::merkle::node_hash(&left, &hash);
                level += 1;
                if level >= keys::MIN_STORED_LEVEL {
                    nodes.push((keys::node_key(level, (n >> level) - 1), hash));
                }
            }
            frontier.push((level, hash));
            if nodes.len() >= 1 << 14 {
                self.put_audit_nodes(&mut nodes, n)?;
            }
        }
        if n != size {
            return Err(corrupt_log(n));
        }
        self.put_audit_nodes(&mut nodes, n)
    }

    /// Stores derived subtree hashes and how far they reach in one batch on
    /// their own tree: atomic (a crash loses both or neither; either way they
    /// are derived again), and no conflict with the appends, which never
    /// touch this tree.
    fn put_audit_nodes(&self, nodes: &mut Vec<([u8; 9], Hash)>, through: u64) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (k, h) in nodes.drain(..) {
            batch.insert(k.as_slice(), h.as_slice());
        }
        batch.insert(keys::AUDIT_NODES, &through.to_be_bytes());
        self.inner.commit.writes().begin();
        let done = self.inner.trees[keys::AUDIT_NODE].apply_batch(batch);
        self.inner.commit.writes().end();
        Ok(done?)
    }

    /// The MTH of the perfect subtree at `level` (0: a leaf hash) number
    /// `index`: stored from [`keys::MIN_STORED_LEVEL`] up, below it folded
    /// from its (at most 128) leaf hashes.
    fn audit_subtree(&self, level: u32, index: u64) -> Result<Hash, StoreError> {
        if level >= keys::MIN_STORED_LEVEL {
            let value = self.inner.trees[keys::AUDIT_NODE].get(keys::node_key(level, index))?;
            return value
                .and_then(|v| Hash::try_from(v.as_ref()).ok())
                .ok_or_else(|| StoreError::Corrupt {
                    tree: keys::TREES[keys::AUDIT_NODE],
                    detail: format!("subtree {level}/{index} is missing or malformed"),
                });
        }
        let (first, count) = (index << level, 1u64 << level);
        let mut leaves = Vec::with_capacity(count as usize);
        for kv in runs::range(&self.inner.trees, keys::AUDIT, first, Some(first + count))? {
            leaves.push(self.leaf(first + leaves.len() as u64, kv?)?);
        }
        if leaves.len() as u64 != count {
            return Err(corrupt_log(first + leaves.len() as u64));
        }
        Ok(antar_core::merkle::root(&leaves))
    }

    /// Stores a signed checkpoint (encoded `Checkpoint`) of the log at `size`, and flushes.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure.
    pub async fn put_checkpoint(&self, size: u64, checkpoint: &[u8]) -> Result<(), StoreError> {
        let mut key = keys::CHECKPOINT_PREFIX.to_vec();
        key.extend_from_slice(&size.to_be_bytes());
        self.inner.commit.writes().begin();
        let inserted = self.inner.trees[keys::AUDIT_META].insert(key, checkpoint);
        self.inner.commit.writes().end();
        inserted?;
        self.durable().await
    }

    /// The greatest message id the store holds a record of (ids sort by
    /// the time they were minted), if any.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure.
    pub fn newest_message_id(&self) -> Result<Option<MessageId>, StoreError> {
        let last = self.inner.trees[keys::MESSAGES].last()?;
        Ok(last.and_then(|(k, _)| <[u8; 16]>::try_from(k.as_ref()).ok().map(MessageId::from_bytes)))
    }

    /// The first key marked seen in `namespace` ([`Tx::mark_seen`]), if
    /// any: lets a caller that moved to another namespace know whether the
    /// old one still needs checking.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure.
    pub fn seen_first(&self, namespace: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let prefix = keys::prefixed(namespace);
        let first = self.inner.trees[keys::SEEN]
            .scan_prefix(&prefix)
            .next()
            .transpose()?;
        Ok(first.map(|(k, _)| k[prefix.len()..].to_vec()))
    }

    /// Every (key, value) noted in `namespace` ([`Tx::note`]).
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure.
    pub fn notes(&self, namespace: &str) -> Result<Vec<KeyValue>, StoreError> {
        let prefix = keys::prefixed(namespace);
        self.inner.trees[keys::SEEN]
            .scan_prefix(&prefix)
            .map(|kv| {
                let (k, v) = kv?;
                Ok((k[prefix.len()..].to_vec(), v.to_vec()))
            })
            .collect()
    }

    /// The first sequence number (of an outbox item, an inbox entry, a
    /// receipt-log cursor) handed out since this store was opened: every
    /// number of a group synced before — so every one a reader or a peer
    /// could have seen — is lower (a group a crash lost may have handed
    /// out numbers that are handed out again).
    pub fn first_seq(&self) -> u64 {
        self.inner.first_seq
    }

    /// A value of the log's metadata (witness state), by key.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure.
    pub fn audit_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.inner.trees[keys::AUDIT_META].get(key)?.map(|v| v.to_vec()))
    }

    /// Every (key, value) of the log's metadata under `prefix`.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure.
    pub fn audit_meta_prefix(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        self.inner.trees[keys::AUDIT_META]
            .scan_prefix(prefix)
            .map(|kv| {
                let (k, v) = kv?;
                Ok((k.to_vec(), v.to_vec()))
            })
            .collect()
    }

    /// Sets a value of the log's metadata and flushes.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure.
    pub async fn put_audit_meta(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.update_audit_meta(&[(key, Some(value))]).await
    }

    /// Sets (`Some`) and removes (`None`) values of the log's metadata,
    /// all or none, and flushes.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure.
    pub async fn update_audit_meta(&self, changes: &[(&[u8], Option<&[u8]>)]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (name, value) in changes {
            match value {
                Some(v) => batch.insert(*name, *v),
                None => batch.remove(*name),
            }
        }
        self.inner.commit.writes().begin();
        let applied = self.inner.trees[keys::AUDIT_META].apply_batch(batch);
        self.inner.commit.writes().end();
        applied?;
        self.durable().await
    }

    /// The newest stored checkpoint (encoded `Checkpoint`), if any.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure.
    pub fn latest_checkpoint(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.inner.trees[keys::AUDIT_META]
            .scan_prefix(keys::CHECKPOINT_PREFIX)
            .next_back()
            .transpose()?
            .map(|(_, v)| v.to_vec()))
    }

    /// Every stored checkpoint (encoded `Checkpoint`), oldest first.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure.
    pub fn checkpoints(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.inner.trees[keys::AUDIT_META]
            .scan_prefix(keys::CHECKPOINT_PREFIX)
            .map(|kv| Ok(kv?.1.to_vec()))
            .collect()
    }

    /// Dead letters in id order after `after`, up to `limit`.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure or a corrupt record.
    pub fn dead_letters(
        &self,
        after: Option<&MessageId>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let tree = &self.inner.trees[keys::DEAD];
        let iter = match after {
            Some(id) => {
                let mut start = id.as_bytes().to_vec();
                start.push(0);
                tree.range(start..)
            }
            None => tree.iter(),
        };
        iter.take(limit).map(|kv| decode(keys::DEAD, &kv?.1)).collect()
    }

    /// Number of dead letters.
    pub fn dead_letter_count(&self) -> u64 {
        self.inner.trees[keys::DEAD].len() as u64
    }

    /// Outbox entries whose envelope expires at or before `now_ms`, as
    /// (peer, seq) pairs, up to `max`.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure.
    pub fn expired(&self, now_ms: u64, max: usize) -> Result<Vec<(String, u64)>, StoreError> {
        self.expired_sparing(now_ms, max, |_| None)
    }

    /// [`Store::expired`], but none of a peer's entries at or before
    /// `spared(peer)`, a sequence number.
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure.
    pub fn expired_sparing(
        &self,
        now_ms: u64,
        max: usize,
        spared: impl Fn(&str) -> Option<u64>,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        self.check()?;
        let expiry = self
            .inner
            .signals
            .expiry
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Ok(expiry.due(now_ms, max, spared))
    }

    /// Woken whenever an item is queued for `peer`.
    pub fn outbox_notify(&self, peer: &str) -> Arc<Notify> {
        self.inner.signals.outbox(peer)
    }

    /// Woken whenever something enters an inbox (and, by the node, when an
    /// ack frees a delivery slot).
    pub fn inbox_notify(&self) -> Arc<Notify> {
        self.inner.signals.inbox.clone()
    }

    /// Woken whenever a receipt is logged.
    pub fn receipt_notify(&self) -> Arc<Notify> {
        self.inner.signals.receipts.clone()
    }

    /// Writes what is still in line (`transact_unsynced`), flushes and
    /// waits: for shutdown.
    ///
    /// # Errors
    /// [`StoreError`] when the write or the flush fails.
    pub async fn close(&self) -> Result<(), StoreError> {
        // A transaction that waits takes the open group along.
        self.transact(|_| Ok(())).await.map_err(|e| match e {
            Ok(abort) => StoreError::Poisoned(format!("closing: {abort:?}")),
            Err(e) => e,
        })?;
        self.durable().await
    }
}

/// The names in queue `tree` (of `trees`) with how many items each holds.
fn prefix_counts(trees: &[sled::Tree], tree: usize) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for (k, v) in trees[tree].iter().flatten() {
        let name = keys::name_of(&k);
        let n = runs::count(tree, &v);
        match out.last_mut() {
            Some((last, c)) if *last == name => *c += n,
            _ => out.push((name, n)),
        }
    }
    out
}

pub(crate) fn decode<M: Message + Default>(tree: usize, bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| corrupt(tree, e.to_string()))
}

/// [`decode`] of a value as sled holds it, without copying it: the
/// message's bytes fields are slices of the value (one allocation for
/// the whole message instead of one for each field).
pub(crate) fn decode_shared<M: Message + Default>(tree: usize, value: &sled::IVec) -> Result<M, StoreError> {
    M::decode(prost::bytes::Bytes::from_owner(value.clone())).map_err(|e| corrupt(tree, e.to_string()))
}

/// A record of `tree` that is not what was written.
pub(crate) fn corrupt(tree: usize, detail: String) -> StoreError {
    StoreError::Corrupt {
        tree: keys::TREES[tree],
        detail,
    }
}

/// Message records read one after another ([`Store::messages`]).
pub struct Messages<'a> {
    store: &'a Store,
    parts: InSled<'a>,
}

impl std::fmt::Debug for Messages<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Messages").finish_non_exhaustive()
    }
}

impl Messages<'_> {
    /// The record of message `id`, whole: see [`Store::message`].
    ///
    /// # Errors
    /// [`StoreError`] on a storage failure or a corrupt record.
    pub fn get(&self, id: &MessageId) -> Result<Option<MessageRecord>, StoreError> {
        let store = self.store;
        let Some(v) = store.inner.trees[keys::MESSAGES].get(id.as_bytes())? else {
            return Ok(None);
        };
        let mut record = store.record(&self.parts, id.as_bytes(), &v)?;
        store.put_receipts_back(&self.parts, &mut record)?;
        Ok(Some(record))
    }
}

/// The parts of cut values, read from sled (certificates through the cache).
struct InSled<'a> {
    trees: &'a [sled::Tree],
    certs: &'a certs::Cache,
    /// The last run read from the receipt log and from the audit log
    /// (`runs::get_kept`): the items of an outbox batch were mostly logged
    /// together, so their parts come out of a few runs, each read once
    /// rather than by a sled range per item. Logs are only appended to, so
    /// a kept run stays right.
    receipts: RefCell<Option<runs::Kept>>,
    entries: RefCell<Option<runs::Kept>>,
}

impl<'a> InSled<'a> {
    fn new(trees: &'a [sled::Tree], certs: &'a certs::Cache) -> Self {
        Self {
            trees,
            certs,
            receipts: RefCell::default(),
            entries: RefCell::default(),
        }
    }

    /// The bytes that the value of `key` in `tree`, stored as `stored`,
    /// stands for: whole, or a cut with its part put back (`cuts.rs`).
    fn whole<'s>(&self, tree: usize, key: &[u8], stored: &'s [u8]) -> Result<Cow<'s, [u8]>, StoreError> {
        cuts::restore(stored, self, &|e| corrupt_at(tree, key, e))
    }
}

impl cuts::Parts for InSled<'_> {
    type Error = StoreError;

    fn cert(&self, digest: &[u8]) -> cuts::Lookup<StoreError> {
        Ok(self.certs.lookup(&self.trees[keys::META], digest)?)
    }

    fn receipt(&self, cursor: u64) -> cuts::Lookup<StoreError> {
        let key = cursor.to_be_bytes();
        runs::get_kept(
            self.trees,
            keys::RECEIPT_LOG,
            &key,
            &mut self.receipts.borrow_mut(),
        )
    }

    fn entry(&self, index: u64) -> cuts::Lookup<StoreError> {
        let key = index.to_be_bytes();
        runs::get_kept(self.trees, keys::AUDIT, &key, &mut self.entries.borrow_mut())
    }
}

/// The value at `key` of `tree` is not what was written.
pub(crate) fn corrupt_at(tree: usize, key: &[u8], detail: String) -> StoreError {
    corrupt(tree, format!("{detail}, at {}", keys::describe(tree, key)))
}

#[cfg(test)]
mod tests;

type Hash = antar_core::merkle::Hash;

fn corrupt_log(index: u64) -> StoreError {
    StoreError::Corrupt {
        tree: keys::TREES[keys::AUDIT],
        detail: format!("log entry {index} is missing or malformed"),
    }
}

/// The log's Merkle tree as of `size` entries, read from the store: see
/// [`Store::audit_tree`].
#[derive(Debug)]
pub struct LogTree<'a> {
    store: &'a Store,
    size: u64,
}

impl LogTree<'_> {
    /// Entries in this tree.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl antar_core::merkle::Subtrees for LogTree<'_> {
    fn perfect(&mut self, level: u32, index: u64) -> Result<Hash, antar_core::merkle::ProofError> {
        if (index + 1) << level > self.size {
            return Err(antar_core::merkle::ProofError::OutOfRange(format!(
                "subtree {level}/{index} of a tree of {}",
                self.size
            )));
        }
        self.store
            .audit_subtree(level, index)
            .map_err(|e| antar_core::merkle::ProofError::Unavailable(e.to_string()))
    }
}
