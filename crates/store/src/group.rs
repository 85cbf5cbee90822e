//! Group transactions: many callers' transactions reach sled together,
//! atomic across a crash without a sled transaction.
//!
//! A sled transaction costs a fixed price whatever it writes: a
//! process-wide exclusive lock that stalls every sled read (on the async
//! runtime's worker threads) while it commits, and two forced writes of
//! sled's IO buffer, each handed to sled's IO threads and followed by
//! `sync_file_range`. With several transactions per message on each node,
//! that price was the throughput ceiling.
//!
//! So a transaction's closure runs alone under the writer lock, reading
//! through the writes not yet in sled, and on success adds its writes to the
//! *open group*; then the caller awaits its group. A dedicated applier
//! thread closes the open group, appends it to the redo journal and syncs
//! it (`journal.rs`: from then on the group survives a crash), then applies
//! it with plain inserts. While it does, the next group fills, and
//! transactions read the group being applied as a layer, so each sees every
//! transaction before it.
//!
//! Invariants:
//! - Transactions are serial: closures run one at a time, in group order.
//! - Write-ahead: nothing of a group reaches sled before its journal record
//!   is synced; groups are applied whole and in order. After a crash sled
//!   holds a prefix of the applied writes, never past the journal, and
//!   replaying the journal in order finishes every synced group.
//! - `transact` returns only after its group is synced and in sled: it is
//!   durable, and a reader outside a transaction sees its writes.
//! - `transact_unsynced` returns once its writes are in the open group:
//!   every later transaction reads them, and one that read them (even one
//!   writing nothing) waits for their group. Alone in the open group, they
//!   wait at most `UNSYNCED_MAX` for a transaction that waits, then go on
//!   their own; `Store::close` takes them along with a waiting transaction,
//!   and at drop they are written before the journal is emptied.
//! - A reader outside a transaction may see a group half applied. Writes go
//!   in (tree, key) order, `meta`, `receipt_log`, `audit` and `bodies` first, chosen
//!   so that what such a reader follows is there first: a message's signer
//!   certificates, envelope, payload and receipts before its record
//!   (`Store::message` follows certificate digests and `receipt_cursors`),
//!   a message record before its inbox entry, log entries before the log
//!   size, receipt-log cursors in ascending order, and the certificate,
//!   receipt or log entry a cut value refers to (`cuts.rs`) before the
//!   value. (So a log entry may be in sled before the record of its
//!   message: nothing reads the two together.)
//! - A failed append or apply fails the store for good (fail-stop), like a
//!   failed flush: every later `transact` and `durable` fails. Its outcome is
//!   unknown (the record may be on disk and replayed at restart), so callers
//!   answer `INTERNAL` and senders retry with an idempotency key.
//! - Effects (queued-bytes count, expiry index, wake-ups) are published by the applier
//!   once the group is in sled, so a caller that stops waiting (a cancelled
//!   request) loses none of them.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use sled::IVec;
use tokio::sync::watch;

use crate::commit::{spawn_worker, Progress, Watermark};
use crate::journal::Journal;
use crate::keys::{self, JOURNAL};
use crate::runs;
use crate::tx::{Effects, Signals, Writes};
use crate::StoreError;

/// The open group and the group being applied.
#[derive(Default)]
pub(crate) struct State {
    open: Writes,
    /// What the open group's transactions changed, published once it is applied.
    effects: Effects,
    /// A transaction that waits joined the open group (it may have no writes).
    joined: bool,
    /// The open group holds writes nobody waits for ([`Groups::run_unsynced`]).
    unsynced: bool,
    /// The group being applied, readable until it is in sled.
    applying: Option<Arc<Writes>>,
    /// Number of the open group; groups are numbered from 1.
    open_id: u64,
    /// The next sequence number or cursor a transaction hands out.
    next_id: u64,
    stop: bool,
}

impl State {
    /// The layers below a new transaction, newest first.
    pub(crate) fn layers(&self) -> [Option<&Writes>; 2] {
        [Some(&self.open), self.applying.as_deref()]
    }

    /// Adds a finished transaction's writes to the open group; returns the
    /// group to wait for. A transaction that wrote nothing still waits for
    /// the writes it may have read. `waits`: false for one that does not
    /// wait ([`Groups::run_unsynced`]).
    fn join(&mut self, writes: Writes, effects: Effects, next_id: u64, waits: bool) -> u64 {
        self.next_id = next_id;
        if writes.is_empty() && !self.joined && !self.unsynced {
            return self.open_id - 1;
        }
        if waits {
            self.joined = true;
        } else {
            self.unsynced = true;
        }
        self.effects.merge(effects);
        self.open.append(writes);
        self.open_id
    }
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The writer lock, the applier thread and the journal's checkpointer.
pub(crate) struct Groups {
    shared: Arc<Shared>,
    applied: Watermark,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The journal checkpointer's progress.
    checkpoints: Watermark,
}

impl Drop for Groups {
    fn drop(&mut self) {
        lock(&self.shared.state).stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // The applier closed and dropped the journal, which joined the
        // checkpointer: no thread holds the database any more.
    }
}

impl Groups {
    /// `trees`: every tree, by index; `journal`: opened (and replayed) on
    /// them; `next_id`: the first sequence number to hand out.
    pub(crate) fn start(
        db: sled::Db,
        trees: Vec<sled::Tree>,
        (journal, checkpoints): (Journal, Watermark),
        signals: Arc<Signals>,
        next_id: u64,
    ) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                open_id: 1,
                next_id,
                ..State::default()
            }),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let (applied, thread) = spawn_worker("antar-applier", move |tx| {
            applier(&s, &db, &trees, journal, &signals, &tx);
        });
        Self {
            shared,
            applied,
            thread,
            checkpoints,
        }
    }

    /// Runs `f` alone under the writer lock, with the layers below it and
    /// the next sequence number; on success its writes, effects and next
    /// sequence number (`Some`) join the open group. Returns `f`'s result
    /// and the group to wait for.
    pub(crate) fn run<T>(
        &self,
        f: impl FnOnce([Option<&Writes>; 2], u64) -> (T, Option<(Writes, Effects, u64)>),
    ) -> (T, u64) {
        self.join_with(f, true)
    }

    /// As [`Groups::run`], for a transaction that does not wait: its writes
    /// ride with the next group a waiting transaction starts, or are
    /// written [`UNSYNCED_MAX`] later; readers outside a transaction see
    /// them only then. For writes whose loss in a crash only costs work
    /// done again.
    pub(crate) fn run_unsynced<T>(
        &self,
        f: impl FnOnce([Option<&Writes>; 2], u64) -> (T, Option<(Writes, Effects, u64)>),
    ) -> T {
        self.join_with(f, false).0
    }

    fn join_with<T>(
        &self,
        f: impl FnOnce([Option<&Writes>; 2], u64) -> (T, Option<(Writes, Effects, u64)>),
        waits: bool,
    ) -> (T, u64) {
        let mut state = lock(&self.shared.state);
        let (out, done) = f(state.layers(), state.next_id);
        let Some((writes, effects, next_id)) = done else {
            return (out, 0);
        };
        let pending = state.joined || state.unsynced;
        let id = state.join(writes, effects, next_id, waits);
        // The applier waits without a timeout while nothing is pending: the
        // first write nobody waits for wakes it to start its timed wait.
        let first = !pending && state.unsynced;
        drop(state);
        if waits || first {
            self.shared.wake.notify_one();
        }
        (out, id)
    }

    /// Fails once an append, an apply or a checkpoint failed: nothing may be
    /// written or acknowledged after it.
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        self.applied.check()?;
        self.checkpoints.check()
    }

    /// Waits until group `id` is synced to the journal and in sled.
    pub(crate) async fn applied(&self, id: u64) -> Result<(), StoreError> {
        self.applied.reached(id).await
    }
}

/// Longest that writes nobody waits for stay in the open group alone.
pub(crate) const UNSYNCED_MAX: std::time::Duration = std::time::Duration::from_millis(100);

fn applier(
    shared: &Shared,
    db: &sled::Db,
    trees: &[sled::Tree],
    mut journal: Journal,
    signals: &Signals,
    tx: &watch::Sender<Progress>,
) {
    loop {
        let (group, effects, id) = {
            let mut state = lock(&shared.state);
            while !state.joined && !state.stop {
                if !state.unsynced {
                    state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
                    continue;
                }
                // Only writes nobody waits for: a waiting transaction takes
                // them along, or they go on their own after a while.
                let (s, waited) = shared
                    .wake
                    .wait_timeout(state, UNSYNCED_MAX)
                    .unwrap_or_else(|p| p.into_inner());
                state = s;
                if waited.timed_out() {
                    break;
                }
            }
            if !state.joined && !state.unsynced {
                if let Err(e) = journal.close(db) {
                    tracing::warn!(error = %e, "could not empty the journal at stop; the next open replays it");
                }
                return;
            }
            let group = Arc::new(std::mem::take(&mut state.open));
            let effects = std::mem::take(&mut state.effects);
            state.joined = false;
            state.unsynced = false;
            state.applying = Some(group.clone());
            let id = state.open_id;
            state.open_id += 1;
            (group, effects, id)
        };
        let result = apply(&mut journal, trees, &group, &signals.journal_syncs);
        lock(&shared.state).applying = None;
        match result {
            Ok(()) => {
                signals.publish(&effects);
                tx.send_replace(Progress::UpTo(id));
            }
            Err(e) => {
                tracing::error!(error = %e, "writing a group of transactions failed; refusing all further work");
                tx.send_replace(Progress::Failed(format!("writing a group failed: {e}")));
                return;
            }
        }
    }
}

/// Syncs `group` to the journal, then writes it into `trees` (see the
/// module docs).
fn apply(
    journal: &mut Journal,
    trees: &[sled::Tree],
    group: &Writes,
    syncs: &antar_core::Histogram,
) -> Result<(), StoreError> {
    if group.is_empty() {
        return Ok(());
    }
    journal.append(group, syncs)?;
    let writes = group.iter().map(|(tree, k, v)| (tree, k, v.clone()));
    write_all(trees, writes, Pass::First)?;
    journal.applied()
}

/// Whether a group is written for the first time, or replayed on open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    First,
    /// Some of the group may be in sled already — written alone, by a
    /// build from before runs, or packed otherwise — so each value that
    /// goes into a run is removed from where it could stand alone.
    Replay,
}

/// Writes a group into `trees`, in its order. Consecutive puts to a log
/// tree, or to one queue, go in as runs, and items taken out of a queue
/// come out of their runs (`runs.rs`); on a replay, the keys of a run past
/// its first are removed, so no value of the group is left standing alone
/// beside the run that holds it.
pub(crate) fn write_all<K: AsRef<[u8]>>(
    trees: &[sled::Tree],
    writes: impl IntoIterator<Item = (usize, K, Option<IVec>)>,
    pass: Pass,
) -> Result<(), sled::Error> {
    // Puts not written yet: to this tree, under this key prefix (a queue's
    // name; empty in a log), by number.
    let mut appends: Vec<(u64, IVec)> = Vec::new();
    let mut at: (usize, Vec<u8>) = (0, Vec::new());
    let mut taking = runs::Taking::default();
    let flush =
        |(tree, prefix): &(usize, Vec<u8>), appends: &mut Vec<(u64, IVec)>| -> Result<(), sled::Error> {
            let key = |n: u64| [prefix.as_slice(), &n.to_be_bytes()].concat();
            let packed = runs::pack(*tree, appends);
            for (n, value) in &packed {
                trees[*tree].insert(key(*n), value.clone())?;
            }
            if pass == Pass::Replay {
                let firsts: std::collections::HashSet<u64> = packed.iter().map(|(k, _)| *k).collect();
                for (n, _) in appends.iter().filter(|(k, _)| !firsts.contains(k)) {
                    trees[*tree].remove(key(*n))?;
                }
            }
            appends.clear();
            Ok(())
        };
    for (tree, key, value) in writes {
        let key = key.as_ref();
        let (prefix, n) = runs::split(key);
        // A log's keys are numbers; a queue's, a name, `\0` and a number.
        let keyed = if runs::queue(tree) {
            prefix.last() == Some(&0)
        } else {
            prefix.is_empty()
        };
        let appendable = runs::packs(tree) && keyed && key.len() >= 8 && value.is_some();
        // A run's keys ascend; a log's appends always do, as a queue's.
        let follows = at.0 == tree && at.1 == prefix && appends.last().is_none_or(|(last, _)| n > *last);
        if !appendable || !follows {
            flush(&at, &mut appends)?;
        }
        let takes = runs::queue(tree) && keyed && key.len() >= 8 && value.is_none();
        if !takes {
            taking.finish(trees)?;
        }
        match value {
            Some(v) if appendable => {
                if !follows {
                    at = (tree, prefix.to_vec());
                }
                appends.push((n, v));
            }
            Some(v) => {
                trees[tree].insert(key, v)?;
            }
            None if takes => taking.take(trees, tree, key)?,
            None => {
                trees[tree].remove(key)?;
            }
        }
    }
    flush(&at, &mut appends)?;
    taking.finish(trees)
}

/// Finishes every group a crash interrupted in a store written by Antar
/// before the journal moved out of sled (records in the `journal` tree);
/// returns how many. Runs on open, before anything reads the store.
pub(crate) fn replay(trees: &[sled::Tree]) -> Result<usize, StoreError> {
    let journal = &trees[JOURNAL];
    let mut n = 0;
    for record in journal.iter() {
        let (key, bytes) = record?;
        let group = decode(&bytes).ok_or_else(|| StoreError::Corrupt {
            tree: keys::TREES[JOURNAL],
            detail: format!(
                "journal record {} does not decode (layout version {JOURNAL_VERSION} expected)",
                keys::u64_of(&key)
            ),
        })?;
        write_all(trees, group, Pass::Replay)?;
        journal.remove(key)?;
        n += 1;
    }
    Ok(n)
}

/// Version of the journal record layout; a record of another version is
/// refused, never guessed at.
const JOURNAL_VERSION: u8 = 1;

/// A group as bytes, for tests that write a journal record themselves.
#[cfg(test)]
pub(crate) fn encode(group: &Writes) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(&mut out, group);
    out
}

/// Appends `group` as bytes to `out`: the version, then per write: tree
/// index (1 byte, as in `keys.rs`), key length (u32 BE), key, then 0
/// (remove) or 1, value length (u32 BE), value.
pub(crate) fn encode_into(out: &mut Vec<u8>, group: &Writes) {
    let size: usize = group
        .iter()
        .map(|(_, k, v)| 10 + k.len() + v.as_ref().map_or(0, |v| v.len()))
        .sum();
    out.reserve(1 + size);
    out.push(JOURNAL_VERSION);
    for (tree, key, value) in group.iter() {
        out.push(tree as u8);
        out.extend_from_slice(&(key.len() as u32).to_be_bytes());
        out.extend_from_slice(key);
        match value {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                out.extend_from_slice(v);
            }
        }
    }
}

/// One write of a decoded group: tree index, key, value (`None`: remove).
pub(crate) type Write = (usize, Vec<u8>, Option<IVec>);

/// The writes of an encoded group; `None` when the bytes are not one.
pub(crate) fn decode(mut bytes: &[u8]) -> Option<Vec<Write>> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = bytes.split_at_checked(n)?;
        *bytes = rest;
        Some(head)
    }
    fn len(bytes: &mut &[u8]) -> Option<usize> {
        Some(u32::from_be_bytes(take(bytes, 4)?.try_into().ok()?) as usize)
    }
    if take(&mut bytes, 1)? != [JOURNAL_VERSION] {
        return None;
    }
    let mut writes = Vec::new();
    while !bytes.is_empty() {
        let tree = usize::from(take(&mut bytes, 1)?[0]);
        if tree >= keys::TREES.len() || tree == JOURNAL {
            return None;
        }
        let n = len(&mut bytes)?;
        let key = take(&mut bytes, n)?.to_vec();
        let value = match take(&mut bytes, 1)?[0] {
            0 => None,
            1 => {
                let n = len(&mut bytes)?;
                Some(IVec::from(take(&mut bytes, n)?))
            }
            _ => return None,
        };
        writes.push((tree, key, value));
    }
    Some(writes)
}
