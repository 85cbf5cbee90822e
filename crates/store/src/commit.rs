//! Group commit: one fsync serves every caller waiting when it starts.
//!
//! Callers' writes reach sled (`group.rs`), then they take a ticket and wait. A
//! dedicated flusher thread reads the newest ticket, flushes, and publishes
//! that ticket as flushed; every waiter whose ticket is at or below it is
//! released. A ticket is only taken after its transaction committed, so a
//! flush that starts after the ticket covers it. A failed flush poisons the
//! store for good (fail-stop): nothing may be acknowledged after it.
//!
//! Every write is bracketed by [`WriteCounter::begin`] and
//! [`WriteCounter::end`], which count writes in flight and writes done; the
//! flusher records how many were done when it started. `durable` returns at
//! once when no write is in flight and a finished flush covers every done
//! write, so a caller that merely needs "what I read is on disk" (the
//! forwarder) costs no extra flush.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::watch;

use crate::StoreError;

/// How far a background thread (the flusher, the applier) got: everything
/// up to `UpTo(n)` is done, or it failed for good (fail-stop).
#[derive(Debug, Clone)]
pub(crate) enum Progress {
    UpTo(u64),
    Failed(String),
}

/// The reading side of a background thread's [`Progress`].
#[derive(Clone)]
pub(crate) struct Watermark(watch::Receiver<Progress>);

impl Watermark {
    /// Fails once the thread failed.
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        match &*self.0.borrow() {
            Progress::Failed(e) => Err(StoreError::Poisoned(e.clone())),
            Progress::UpTo(_) => Ok(()),
        }
    }

    /// Waits until the thread has done everything up to `n`.
    pub(crate) async fn reached(&self, n: u64) -> Result<(), StoreError> {
        let mut rx = self.0.clone();
        let result = rx
            .wait_for(|p| matches!(p, Progress::Failed(_)) || matches!(p, Progress::UpTo(m) if *m >= n))
            .await;
        match result.as_deref() {
            Ok(Progress::UpTo(_)) => Ok(()),
            Ok(Progress::Failed(e)) => Err(StoreError::Poisoned(e.clone())),
            Err(_) => Err(StoreError::Poisoned("a store thread stopped".into())),
        }
    }
}

/// Starts the named thread running `work`, which reports its progress; a
/// thread that cannot start is a failure from the outset (fail-stop).
pub(crate) fn spawn_worker(
    name: &str,
    work: impl FnOnce(watch::Sender<Progress>) + Send + 'static,
) -> (Watermark, Option<std::thread::JoinHandle<()>>) {
    let (tx, rx) = watch::channel(Progress::UpTo(0));
    match std::thread::Builder::new()
        .name(name.into())
        .spawn(move || work(tx))
    {
        Ok(thread) => (Watermark(rx), Some(thread)),
        Err(e) => {
            let failed = Progress::Failed(format!("cannot start {name}: {e}"));
            (Watermark(watch::channel(failed).1), None)
        }
    }
}

/// Counts writes in flight and writes done; cloned to whoever writes to sled.
#[derive(Clone, Default)]
pub(crate) struct WriteCounter {
    inflight: Arc<AtomicU64>,
    commits: Arc<AtomicU64>,
}

impl WriteCounter {
    /// A write starts (before sled commits anything).
    pub(crate) fn begin(&self) {
        self.inflight.fetch_add(1, Ordering::SeqCst);
    }

    /// The write started by [`WriteCounter::begin`] is over, committed or not.
    pub(crate) fn end(&self) {
        self.commits.fetch_add(1, Ordering::SeqCst);
        self.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(crate) struct GroupCommit {
    tickets: Arc<AtomicU64>,
    /// Writes in flight and done; how many done writes a finished flush covers.
    writes: WriteCounter,
    covered: Arc<AtomicU64>,
    wake: Arc<(Mutex<Wake>, Condvar)>,
    flushed: Watermark,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Wake {
    pending: bool,
    stop: bool,
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        {
            let (lock, cvar) = &*self.wake;
            lock.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
            cvar.notify_one();
        }
        // Joining releases the flusher's handle on the database, so the
        // directory can be opened again as soon as the store is dropped.
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl GroupCommit {
    pub(crate) fn start(db: sled::Db) -> Self {
        let tickets = Arc::new(AtomicU64::new(0));
        let writes = WriteCounter::default();
        let covered = Arc::new(AtomicU64::new(0));
        let wake = Arc::new((Mutex::new(Wake::default()), Condvar::new()));
        let (t, w) = (tickets.clone(), wake.clone());
        let counts = (writes.commits.clone(), covered.clone());
        let (flushed, thread) = spawn_worker("antar-flusher", move |tx| flusher(db, t, counts, w, tx));
        Self {
            tickets,
            writes,
            covered,
            wake,
            flushed,
            thread,
        }
    }

    pub(crate) fn check(&self) -> Result<(), StoreError> {
        self.flushed.check()
    }

    /// The counter every write to sled is bracketed by.
    pub(crate) fn writes(&self) -> &WriteCounter {
        &self.writes
    }

    pub(crate) async fn durable(&self) -> Result<(), StoreError> {
        if self.writes.inflight.load(Ordering::SeqCst) == 0
            && self.covered.load(Ordering::SeqCst) >= self.writes.commits.load(Ordering::SeqCst)
        {
            return self.check();
        }
        let ticket = self.tickets.fetch_add(1, Ordering::SeqCst) + 1;
        {
            let (lock, cvar) = &*self.wake;
            lock.lock().unwrap_or_else(|p| p.into_inner()).pending = true;
            cvar.notify_one();
        }
        self.flushed.reached(ticket).await
    }
}

fn flusher(
    db: sled::Db,
    tickets: Arc<AtomicU64>,
    (commits, covered): (Arc<AtomicU64>, Arc<AtomicU64>),
    wake: Arc<(Mutex<Wake>, Condvar)>,
    tx: watch::Sender<Progress>,
) {
    let mut done = 0u64;
    loop {
        {
            let (lock, cvar) = &*wake;
            let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
            while !state.pending && !state.stop {
                state = cvar.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            if state.stop && !state.pending {
                // Dropped with nothing pending: flush what is there and end.
                let _ = db.flush();
                return;
            }
            state.pending = false;
        }
        let target = tickets.load(Ordering::SeqCst);
        if target == done {
            continue;
        }
        let writes = commits.load(Ordering::SeqCst);
        match db.flush() {
            Ok(_) => {
                covered.fetch_max(writes, Ordering::SeqCst);
                done = target;
                tx.send_replace(Progress::UpTo(target));
            }
            Err(e) => {
                tracing::error!(error = %e, "store flush failed; refusing all further work");
                tx.send_replace(Progress::Failed(format!("a flush failed: {e}")));
                return;
            }
        }
    }
}
