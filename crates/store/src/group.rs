//! Group transactions: many callers' transactions reach sled as one sled
//! transaction.
//!
//! Every sled transaction costs the same fixed price whatever it writes: a
//! process-wide exclusive lock, and two writes of sled's IO buffer, each
//! handed to sled's IO threads and followed by `sync_file_range`. With
//! several transactions per message on each node, that price, paid on the
//! async runtime's two worker threads, was the throughput ceiling.
//!
//! So a transaction's closure runs alone under the writer lock, reading
//! through the writes not yet in sled, and on success adds its writes to the
//! *open group*; then the caller awaits its group. A dedicated applier
//! thread closes the open group, applies it as one sled transaction of blind
//! writes, and publishes its number. While it applies, the next group fills,
//! and transactions read the group being applied as a layer, so each sees
//! every transaction before it.
//!
//! Invariants:
//! - Transactions are serial: closures run one at a time, in group order.
//! - A group is applied atomically (one sled transaction), groups in order,
//!   so after a crash sled holds a prefix of whole groups, hence a prefix of
//!   whole transactions.
//! - `transact` returns only after its group is in sled: a reader outside a
//!   transaction then sees its writes.
//! - A failed apply fails the store for good (fail-stop), like a failed flush.
//! - Applying is bracketed by the group commit's `begin`/`end`, so the
//!   flusher's "nothing in flight" fast path stays exact.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use tokio::sync::watch;

use crate::commit::WriteCounter;
use crate::tx::Writes;
use crate::StoreError;

/// The open group and the group being applied.
#[derive(Default)]
pub(crate) struct State {
    open: Writes,
    /// A transaction joined the open group (it may have no writes).
    joined: bool,
    /// The group being applied, readable until it is in sled.
    applying: Option<Arc<Writes>>,
    /// Number of the open group; groups are numbered from 1.
    open_id: u64,
    stop: bool,
}

impl State {
    /// The layers below a new transaction, newest first.
    pub(crate) fn layers(&self) -> [Option<&Writes>; 2] {
        [Some(&self.open), self.applying.as_deref()]
    }

    /// Adds a finished transaction's writes to the open group; returns the
    /// group to wait for. A transaction that wrote nothing still waits for
    /// the writes it may have read.
    fn join(&mut self, writes: Writes) -> u64 {
        if writes.is_empty() && !self.joined {
            return self.open_id - 1;
        }
        self.joined = true;
        if self.open.is_empty() {
            self.open = writes;
        } else {
            self.open.extend(writes);
        }
        self.open_id
    }
}

#[derive(Debug, Clone)]
enum Applied {
    UpTo(u64),
    Failed(String),
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The writer lock and the applier thread.
pub(crate) struct Groups {
    shared: Arc<Shared>,
    applied: watch::Receiver<Applied>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Groups {
    fn drop(&mut self) {
        lock(&self.shared.state).stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Groups {
    pub(crate) fn start(trees: Vec<sled::Tree>, writes: WriteCounter) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                open_id: 1,
                ..State::default()
            }),
            wake: Condvar::new(),
        });
        let (tx, rx) = watch::channel(Applied::UpTo(0));
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("antar-applier".into())
            .spawn(move || applier(&s, &trees, &writes, &tx));
        let (applied, thread) = match spawned {
            Ok(t) => (rx, Some(t)),
            Err(e) => (
                watch::channel(Applied::Failed(format!("cannot start applier: {e}"))).1,
                None,
            ),
        };
        Self {
            shared,
            applied,
            thread,
        }
    }

    /// Runs `f` alone under the writer lock, with the layers below it; on
    /// success its writes (`Some`) join the open group. Returns `f`'s result
    /// and the group to wait for.
    pub(crate) fn run<T>(&self, f: impl FnOnce([Option<&Writes>; 2]) -> (T, Option<Writes>)) -> (T, u64) {
        let mut state = lock(&self.shared.state);
        let (out, writes) = f(state.layers());
        let Some(writes) = writes else {
            return (out, 0);
        };
        let id = state.join(writes);
        drop(state);
        self.shared.wake.notify_one();
        (out, id)
    }

    /// Waits until group `id` is in sled.
    pub(crate) async fn applied(&self, id: u64) -> Result<(), StoreError> {
        let mut rx = self.applied.clone();
        let result = rx
            .wait_for(|a| matches!(a, Applied::Failed(_)) || matches!(a, Applied::UpTo(n) if *n >= id))
            .await;
        match result.as_deref() {
            Ok(Applied::UpTo(_)) => Ok(()),
            Ok(Applied::Failed(e)) => Err(StoreError::Poisoned(e.clone())),
            Err(_) => Err(StoreError::Poisoned("applier stopped".into())),
        }
    }
}

fn applier(shared: &Shared, trees: &[sled::Tree], writes: &WriteCounter, tx: &watch::Sender<Applied>) {
    loop {
        let (group, id) = {
            let mut state = lock(&shared.state);
            while !state.joined && !state.stop {
                state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            if !state.joined {
                return;
            }
            let group = Arc::new(std::mem::take(&mut state.open));
            state.joined = false;
            state.applying = Some(group.clone());
            let id = state.open_id;
            state.open_id += 1;
            (group, id)
        };
        writes.begin();
        let result = apply(trees, &group);
        writes.end();
        lock(&shared.state).applying = None;
        match result {
            Ok(()) => {
                tx.send_replace(Applied::UpTo(id));
            }
            Err(e) => {
                tracing::error!(error = %e, "applying a group of transactions failed; refusing all further work");
                tx.send_replace(Applied::Failed(e.to_string()));
                return;
            }
        }
    }
}

/// Writes `group` into `trees` as one sled transaction.
fn apply(trees: &[sled::Tree], group: &Writes) -> Result<(), sled::Error> {
    if group.is_empty() {
        return Ok(());
    }
    let result = trees.transaction(|t| {
        for ((tree, key), value) in group {
            match value {
                Some(v) => t[*tree].insert(key.as_slice(), v.clone())?,
                None => t[*tree].remove(key.as_slice())?,
            };
        }
        Ok::<_, ConflictableTransactionError<()>>(())
    });
    match result {
        Ok(()) => Ok(()),
        Err(TransactionError::Storage(e)) => Err(e),
        Err(TransactionError::Abort(())) => {
            Err(sled::Error::ReportableBug("a group transaction aborted".into()))
        }
    }
}
