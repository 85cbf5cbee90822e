//! The redo journal: each group of transactions, appended to a plain file
//! and synced before any of it reaches sled (write-ahead).
//!
//! A group is durable once its record is synced, so acknowledging it needs
//! one `fdatasync` of a file written in sequence, not a flush of sled. sled then
//! takes the writes at its own pace: it recovers a prefix of its log after a
//! crash, and since nothing reaches sled before its journal record is
//! synced, that prefix never runs ahead of the journal. Replaying the
//! journal's groups in order on open (each write a whole value, so a replay
//! is idempotent) brings sled to the last synced group.
//!
//! The journal is a directory of segment files (`<n>.log`, `n` ascending).
//! A segment past its size (32 MiB by default) is retired: the applier
//! starts the next one and the checkpointer thread flushes sled — covering
//! every group of the retired segment, all applied by then — and deletes
//! it, or, when there is no spare, keeps its file to be the next spare
//! (deleting a 32 MiB file stalled every concurrent `fdatasync`). So the
//! journal holds about two segments, more only while checkpoints lag
//! behind.
//!
//! A new segment is, when one is ready, a *spare*: a file of a segment's
//! size whose blocks are allocated and written, synced ahead of time by
//! the checkpointer (`spare.<k>`: checkpointed segment k's file cut to
//! size with its first page zeroed; or `spare.zero`, a new file of zeros
//! asked for once the segment being written is half full, so a node that
//! writes little never writes one), renamed into place. Records then overwrite blocks
//! the file system has already allocated and written, within the file's
//! size, so an `fdatasync` syncs the record and none of the file's
//! metadata — but for the record that crosses the segment's size, and in
//! a segment started without a spare (ADR 0005's amendment has the
//! measurements). A retired segment is records to its end (it was retired
//! past its size, which is the spare's).
//!
//! Record layout: length of the group bytes (u32 BE), CRC-32 of the
//! segment's number (u64 BE) followed by the group bytes (u32 BE), the
//! group bytes (`group::encode_into`). The number binds a record to its
//! segment: the older records a recycled file still holds past the new
//! ones fail the check in their new segment, so a recycled file needs no
//! zeros (ADR 0010). For that, `spare.<k>` only ever becomes a segment
//! numbered above k: a clean stop deletes every segment but keeps the
//! spare, and the next open numbers on from `k + 1`. In the last segment, the first place where no record
//! of the segment begins ends the journal: zeros (a new spare's tail, or a
//! tail the file system extended but never wrote), an older segment's
//! records, or a record torn by a crash. A record is only written after
//! the one before it was synced, so only the last record of the last
//! segment can be torn; that group was never acknowledged. A bad record
//! anywhere else is corruption and stops the open.
//!
//! Segments written before ADR 0010 have the CRC of the group bytes
//! alone; a segment whose first record checks so is read so to its end
//! (such a journal was replayed and emptied by the first open of a build
//! with ADR 0010, and never recycled unzeroed).

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use tokio::sync::watch;

use crate::commit::{spawn_worker, Progress, Watermark};
use crate::group::{self, Write as GroupWrite};
use crate::tx::Writes;
use crate::StoreError;

/// Size past which a segment is retired, unless the store is configured
/// otherwise ([`crate::StoreConfig::journal_segment_bytes`]).
pub const DEFAULT_SEGMENT_BYTES: u64 = 32 << 20;

/// Smallest segment size a store takes: a segment should hold many groups.
pub const MIN_SEGMENT_BYTES: u64 = 64 << 10;

/// Largest segment size a store takes: replay reads a segment whole.
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;

/// The journal's directory inside the store's directory.
pub(crate) fn dir(store: &Path) -> PathBuf {
    store.join("journal")
}

/// Bytes in the journal's segments now (0 when it cannot be listed).
pub(crate) fn bytes(store: &Path) -> u64 {
    fs::read_dir(dir(store)).map_or(0, |entries| {
        entries
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    })
}

/// The appending end, owned by the applier thread.
pub(crate) struct Journal {
    /// The store's directory, and the journal's inside it.
    store: PathBuf,
    dir: PathBuf,
    file: File,
    /// Number of the segment being written.
    segment: u64,
    /// Bytes in it.
    written: u64,
    /// Size past which a segment is retired, and a spare's size.
    segment_bytes: u64,
    /// Full segments, and requests for a spare, go to the checkpointer
    /// thread through this; dropping it ends the thread, which is then joined.
    retire: Option<mpsc::Sender<Chore>>,
    /// Set before the checkpointer is ended: a spare being written is
    /// abandoned rather than finished.
    stopping: Arc<AtomicBool>,
    /// A spare was asked for since this segment started.
    spare_asked: bool,
    checkpointer: Option<std::thread::JoinHandle<()>>,
    checkpoints: Watermark,
    /// The record being written, reused from group to group.
    record: Vec<u8>,
}

/// Largest record buffer kept between groups; a bigger group's is freed.
const RECORD_KEPT: usize = 4 << 20;

impl Drop for Journal {
    /// Ends the checkpointer after the segments already handed to it, so
    /// it holds the database no longer than the journal does.
    fn drop(&mut self) {
        self.end_checkpointer();
    }
}

fn io(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Journal(format!("{what} {}: {e}", path.display()))
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:016}.log"))
}

/// The next segment, written ahead of time (`prepare_spare`), and the name
/// it is written under until it is whole and synced. `spare.zero` is a new
/// file of zeros; a checkpointed segment's file is `spare.<k>` (see
/// [`Spare`]).
const SPARE: &str = "spare.zero";
const SPARE_PARTIAL: &str = "spare.zero.partial";

/// A whole spare in the journal's directory.
struct Spare {
    path: PathBuf,
    /// For a checkpointed segment's file (`spare.<k>`, `k` as segment
    /// names write it), its number: past its zeroed first page it holds
    /// segment k's records, which check in a segment numbered k, so it
    /// only ever becomes a segment numbered above k, and the journal's
    /// numbering goes on past k after a clean stop (which deletes every
    /// segment but keeps the spare). `None` for `spare.zero`.
    from: Option<u64>,
}

fn recycled_spare_path(dir: &Path, k: u64) -> PathBuf {
    dir.join(format!("spare.{k:016}"))
}

/// The spare, if there is one. While a node runs there is at most one
/// (a spare is only written when there is none); [`one_spare`] sees to
/// that at open.
fn find_spare(dir: &Path) -> Option<Spare> {
    spares(dir).next()
}

fn spares(dir: &Path) -> impl Iterator<Item = Spare> {
    let entries = fs::read_dir(dir).into_iter().flatten().flatten();
    entries.filter_map(|entry| {
        let path = entry.path();
        let name = path.file_name()?.to_str()?;
        let from = match name {
            SPARE => None,
            _ => Some(name.strip_prefix("spare.")?.parse::<u64>().ok()?),
        };
        Some(Spare { path, from })
    })
}

/// At open: keeps one spare, deleting any other (a power cut between
/// `prepare_spare` removing a spare of another size and renaming the new
/// one can leave two), and returns the number the journal's segments must
/// go past: the largest `k` of any `spare.<k>` seen, deleted or kept.
fn one_spare(dir: &Path) -> u64 {
    let mut after = 0;
    for (i, spare) in spares(dir).enumerate() {
        after = after.max(spare.from.map_or(0, |k| k + 1));
        if i > 0 {
            let _ = fs::remove_file(&spare.path);
        }
    }
    after
}

/// The number of segment file `<n>.log`.
fn segment_number(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_suffix(".log")?.parse().ok()
}

/// Starts segment `n`: the spare renamed into place when there is one,
/// else a new empty file; then makes its name durable, before any record
/// goes into it.
fn start_segment(dir: &Path, n: u64, size: u64) -> Result<File, StoreError> {
    let path = segment_path(dir, n);
    // A spare of another size (written before the segment size was
    // changed) is not used: a retired segment must be records to its end.
    // The checkpointer replaces it. Nor is a segment's file that could
    // become a segment of its own number (the journal numbers past it, so
    // only a bug would get here). A failed rename leaves the spare for the
    // next segment.
    if let Some(spare) = find_spare(dir) {
        let fits = fs::metadata(&spare.path).is_ok_and(|m| m.len() == size);
        if fits && spare.from.is_none_or(|k| k < n) {
            let _ = fs::rename(&spare.path, &path);
        }
    }
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io("creating", &path, e))?;
    sync_dir(dir)?;
    Ok(file)
}

/// Zeros a spare starts with: a page, so that where its first record
/// would begin no record of any segment does.
const SPARE_HEAD: u64 = 4096;

/// Writes the spare when there is none, synced, then renamed (so a spare
/// is always whole): segment `from`'s file, which the checkpoint left as
/// [`SPARE_PARTIAL`], cut to `size`, its first page zeroed and the rest
/// left as it is (segment `from`'s records, which no record of a later
/// segment can be mistaken for), renamed to `spare.<from>`; else, with
/// `from` None, a new file of `size` zeros renamed to [`SPARE`]. Either
/// way every block of it is allocated and written. A failure costs only
/// the speed-up: the next segment is then a new file.
fn prepare_spare(dir: &Path, size: u64, stopping: &AtomicBool, from: Option<u64>) {
    if stopping.load(Ordering::Relaxed) {
        // A checkpointed segment may wait here to be a spare: at a stop it
        // is only disk space.
        let _ = fs::remove_file(dir.join(SPARE_PARTIAL));
        return;
    }
    if let Some(Spare { path: spare, .. }) = find_spare(dir) {
        match fs::metadata(&spare) {
            Ok(m) if m.len() == size => return,
            Ok(_) => {
                if let Err(e) = fs::remove_file(&spare) {
                    tracing::warn!(path = %spare.display(), error = %e, "cannot remove a spare journal segment of another size; no spare is written");
                    return;
                }
            }
            Err(_) => {}
        }
    }
    let partial = dir.join(SPARE_PARTIAL);
    if from.is_none() {
        // Only a checkpoint leaves a segment's file here, with its number.
        let _ = fs::remove_file(&partial);
    }
    let spare = from.map_or_else(|| dir.join(SPARE), |k| recycled_spare_path(dir, k));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            // A new file is new even if a partial could not be removed.
            .truncate(from.is_none())
            .open(&partial)?;
        // Bytes of a checkpointed segment, written already (0 for a new file).
        let kept = f.metadata()?.len().min(size);
        f.set_len(size)?;
        let head = SPARE_HEAD.min(size);
        f.write_all(&vec![0u8; head as usize])?;
        if kept < size {
            f.seek(SeekFrom::Start(kept.max(head)))?;
            let zeros = vec![0u8; (1 << 20).min(size as usize)];
            let mut left = (size - kept.max(head)) as usize;
            // A megabyte at a time, each synced before the next: a whole
            // segment's writes at once would queue on the disk ahead of the
            // applier's syncs and stall every commit for tens of milliseconds.
            while left > 0 {
                if stopping.load(Ordering::Relaxed) {
                    return Err(std::io::Error::other("the store is stopping"));
                }
                let n = left.min(zeros.len());
                f.write_all(&zeros[..n])?;
                f.sync_data()?;
                left -= n;
            }
        }
        f.sync_all()?;
        fs::rename(&partial, &spare)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&partial);
        if stopping.load(Ordering::Relaxed) {
            return;
        }
        tracing::warn!(
            dir = %dir.display(),
            error = %e,
            "could not write a spare journal segment; the next segment starts as a new file (slower syncs)"
        );
    }
}

impl Journal {
    /// Replays every group the journal holds into `trees`, checkpoints the
    /// old segments and starts an empty journal with its checkpointer, whose
    /// segments are retired past `segment_bytes` (segments of any size
    /// replay, so the size may change from one open to the next) and which
    /// times each checkpoint into `timings`.
    /// Returns the journal, the checkpointer's progress (for the store's
    /// fail-stop check) and how many groups were replayed.
    pub(crate) fn open(
        store: &Path,
        db: &sled::Db,
        trees: &[sled::Tree],
        segment_bytes: u64,
        timings: Arc<antar_core::Histogram>,
    ) -> Result<(Self, Watermark, usize), StoreError> {
        let dir = dir(store);
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(|e| io("creating", &dir, e))?;
            sync_dir(store)?;
        }
        let segments = segments(&dir)?;
        let mut replayed = 0;
        for (i, (n, path)) in segments.iter().enumerate() {
            let bytes = fs::read(path).map_err(|e| io("reading", path, e))?;
            let last = i + 1 == segments.len();
            for writes in records(path, *n, &bytes, last)? {
                group::write_all(trees, writes, group::Pass::Replay)?;
                replayed += 1;
            }
        }
        if !segments.is_empty() {
            checkpoint_segments(db, store, segments.iter().map(|(_, p)| p), false)?;
        }
        // After a clean stop there is no segment, but there may be a spare
        // holding the records of the segment it was.
        let after_spare = one_spare(&dir);
        let segment = segments.last().map_or(0, |(n, _)| n + 1).max(after_spare);
        // Left by a crash while it was being written.
        let _ = fs::remove_file(dir.join(SPARE_PARTIAL));
        let (retire, retired) = mpsc::channel();
        let store = store.to_path_buf();
        let file = start_segment(&dir, segment, segment_bytes)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let (checkpoints, thread) = {
            let (store, db, stopping) = (store.clone(), db.clone(), stopping.clone());
            spawn_worker("antar-checkpoint", move |tx| {
                checkpoint(&store, &db, segment_bytes, &timings, &retired, &stopping, &tx)
            })
        };
        Ok((
            Self {
                store,
                dir,
                file,
                segment,
                written: 0,
                segment_bytes,
                retire: Some(retire),
                stopping,
                spare_asked: false,
                checkpointer: thread,
                checkpoints: checkpoints.clone(),
                record: Vec::new(),
            },
            checkpoints,
            replayed,
        ))
    }

    /// Appends `group` and syncs it: from here on it survives a crash.
    pub(crate) fn append(&mut self, group: &Writes, syncs: &antar_core::Histogram) -> Result<(), StoreError> {
        // The header is filled in once the body is encoded after it. The
        // buffer is kept: a fresh one per group had the kernel zero new
        // pages for it on every sync.
        let record = &mut self.record;
        record.clear();
        record.extend_from_slice(&[0; 8]);
        group::encode_into(record, group);
        let body = &record[8..];
        let header = [
            (body.len() as u32).to_be_bytes(),
            Crc::Bound(self.segment).of(body).to_be_bytes(),
        ];
        record[..8].copy_from_slice(&header.concat());
        let started = std::time::Instant::now();
        self.file
            .write_all(record)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io("writing", &segment_path(&self.dir, self.segment), e))?;
        syncs.observe(started.elapsed());
        self.written += record.len() as u64;
        if record.capacity() > RECORD_KEPT {
            *record = Vec::new();
        }
        Ok(())
    }

    /// Called once the groups appended so far are in sled: past the
    /// segment size, starts the next segment and hands this one to the
    /// checkpointer.
    pub(crate) fn applied(&mut self) -> Result<(), StoreError> {
        if self.written >= self.segment_bytes / 2 && !self.spare_asked {
            self.spare_asked = true;
            self.send(Chore::PrepareSpare)?;
        }
        if self.written < self.segment_bytes {
            return Ok(());
        }
        let old = segment_path(&self.dir, self.segment);
        self.file = start_segment(&self.dir, self.segment + 1, self.segment_bytes)?;
        self.segment += 1;
        self.written = 0;
        self.spare_asked = false;
        self.send(Chore::Checkpoint(old))
    }

    /// Ends the checkpointer after the segments already handed to it (a
    /// spare it is writing is abandoned), and waits for it.
    fn end_checkpointer(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        drop(self.retire.take());
        if let Some(t) = self.checkpointer.take() {
            let _ = t.join();
        }
    }

    fn send(&self, chore: Chore) -> Result<(), StoreError> {
        self.retire
            .as_ref()
            .and_then(|tx| tx.send(chore).ok())
            .ok_or_else(|| StoreError::Journal("the checkpointer has stopped".into()))
    }

    /// At a clean stop, with every group in sled: waits for the checkpointer
    /// to finish, flushes sled and empties the journal, oldest segment
    /// first, so the next open has nothing to replay. The segments on disk
    /// must always be the newest ones, in an unbroken run: replaying an
    /// older segment without the newer ones would roll the store back. So
    /// after a failed checkpoint nothing is deleted (the next open replays
    /// them all, in order).
    pub(crate) fn close(&mut self, db: &sled::Db) -> Result<(), StoreError> {
        self.end_checkpointer();
        self.checkpoints.check()?;
        let left = segments(&self.dir)?;
        checkpoint_segments(db, &self.store, left.iter().map(|(_, p)| p), false).map(drop)
    }
}

/// The segments in `dir`, oldest first.
fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io("listing", dir, e))? {
        let path = entry.map_err(|e| io("listing", dir, e))?.path();
        let spare = path
            .file_name()
            .and_then(|f| f.to_str())
            .is_some_and(|f| f.starts_with("spare."));
        match segment_number(&path) {
            Some(n) => segments.push((n, path)),
            None if spare => {}
            None => tracing::warn!(path = %path.display(), "ignoring a file that is not a journal segment"),
        }
    }
    segments.sort();
    Ok(segments)
}

/// Checkpoints segments whose groups are all in sled: flushes sled,
/// `fsync`s its files, then deletes the segments oldest first and makes the
/// deletions durable, so no crash or power cut leaves an older segment
/// without the newer ones.
///
/// With `recycle`, the newest of them is not deleted but renamed to
/// [`SPARE_PARTIAL`], for [`prepare_spare`] to make the next spare; returns
/// its number if it was. Deleting a 32 MiB file frees its blocks, and on this
/// project's ext4 test machine (mounted with `discard`) that stalled every
/// concurrent `fdatasync` for 20–27 ms; overwriting a file's blocks in
/// place frees and allocates nothing.
fn checkpoint_segments<'a>(
    db: &sled::Db,
    store: &Path,
    paths: impl IntoIterator<Item = &'a PathBuf>,
    recycle: bool,
) -> Result<Option<u64>, StoreError> {
    db.flush()?;
    sync_sled_files(store)?;
    let paths: Vec<&PathBuf> = paths.into_iter().collect();
    let (kept, deleted) = match paths.split_last() {
        Some((newest, older)) if recycle => match segment_number(newest) {
            Some(k) => (Some((*newest, k)), older),
            None => (None, &paths[..]),
        },
        _ => (None, &paths[..]),
    };
    for path in deleted {
        fs::remove_file(path).map_err(|e| io("removing", path, e))?;
    }
    if let Some((path, _)) = kept {
        let partial = dir(store).join(SPARE_PARTIAL);
        fs::rename(path, &partial).map_err(|e| io("recycling", path, e))?;
    }
    sync_dir(&dir(store))?;
    Ok(kept.map(|(_, k)| k))
}

/// Makes a created segment's name durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing", dir, e))
}

/// What a record's CRC-32 covers besides the group bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crc {
    /// The number of the segment it was written in, first (ADR 0010).
    Bound(u64),
    /// Nothing: a segment written before ADR 0010.
    Plain,
}

impl Crc {
    fn of(self, body: &[u8]) -> u32 {
        let mut h = crc32fast::Hasher::new();
        if let Crc::Bound(segment) = self {
            h.update(&segment.to_be_bytes());
        }
        h.update(body);
        h.finalize()
    }
}

/// The record at the start of `bytes` if its checksum is `crc`'s: its
/// group bytes and its whole length. Zeros are not a record: a record
/// holds at least the layout version.
fn record(bytes: &[u8], crc: Crc) -> Option<(&[u8], usize)> {
    let (head, rest) = bytes.split_at_checked(8)?;
    let len = u32::from_be_bytes(head[..4].try_into().ok()?) as usize;
    let sum = u32::from_be_bytes(head[4..].try_into().ok()?);
    (len > 0).then_some(())?;
    let body = rest.get(..len)?;
    (crc.of(body) == sum).then_some((body, 8 + len))
}

/// The groups of segment `n`, in order. Its records are bound to `n`,
/// unless its first record checks as written before ADR 0010: then it is
/// read so to its end. In the `last` segment the first place where no
/// record begins ends the journal; anywhere else a bad record is
/// corruption.
fn records(path: &Path, n: u64, mut bytes: &[u8], last: bool) -> Result<Vec<Vec<GroupWrite>>, StoreError> {
    let crc = match record(bytes, Crc::Bound(n)) {
        None if record(bytes, Crc::Plain).is_some() => Crc::Plain,
        _ => Crc::Bound(n),
    };
    let mut groups = Vec::new();
    let mut offset = 0usize;
    while !bytes.is_empty() {
        match record(bytes, crc).map(|(body, len)| (group::decode(body), len)) {
            Some((Some(writes), len)) => {
                groups.push(writes);
                bytes = &bytes[len..];
                offset += len;
            }
            Some((None, _)) => {
                return Err(StoreError::Journal(format!(
                    "{} at byte {offset}: a record with a valid checksum does not decode \
                     (written by another version of Antar?)",
                    path.display()
                )))
            }
            None if last && bytes.iter().all(|&b| b == 0) => break,
            None if last => {
                // Only ever after a crash: a clean stop leaves no segment.
                tracing::warn!(
                    path = %path.display(),
                    offset,
                    rest = bytes.len(),
                    "the journal ends here: what follows is not a record of this segment \
                     (a write a crash cut short, whose group was never acknowledged, or the \
                     older records of a recycled file)"
                );
                break;
            }
            None => {
                return Err(StoreError::Journal(format!(
                    "{} at byte {offset}: a bad record before the last segment; the journal is corrupt",
                    path.display()
                )))
            }
        }
    }
    Ok(groups)
}

/// `fsync`s sled's log and blob files. sled's flush ends in
/// `sync_file_range`, which leaves the file's size and the disk's cache
/// unsynced; before a journal segment is deleted, its groups must be on
/// disk for good.
fn sync_sled_files(store: &Path) -> Result<(), StoreError> {
    let mut files = vec![store.join("db")];
    if let Ok(blobs) = fs::read_dir(store.join("blobs")) {
        files.extend(blobs.flatten().map(|e| e.path()));
    }
    for path in &files {
        match File::open(path) {
            Ok(f) => f.sync_all().map_err(|e| io("syncing", path, e))?,
            // A blob sled collected meanwhile needs no sync.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("opening", path, e)),
        }
    }
    // And the names of new files (blobs) in their directories.
    if store.join("blobs").is_dir() {
        sync_dir(&store.join("blobs"))?;
    }
    sync_dir(store)
}

/// Work for the checkpointer thread.
enum Chore {
    /// A retired segment, every group of it applied.
    Checkpoint(PathBuf),
    /// Write the spare, if there is none.
    PrepareSpare,
}

fn checkpoint(
    store: &Path,
    db: &sled::Db,
    segment_bytes: u64,
    timings: &antar_core::Histogram,
    chores: &mpsc::Receiver<Chore>,
    stopping: &AtomicBool,
    tx: &watch::Sender<Progress>,
) {
    let mut done = 0;
    while let Ok(first) = chores.recv() {
        let mut paths = Vec::new();
        let mut spare = false;
        // The number of the segment recycled into the spare, if one was.
        let mut from = None;
        for chore in std::iter::once(first).chain(chores.try_iter()) {
            match chore {
                Chore::Checkpoint(path) => paths.push(path),
                Chore::PrepareSpare => spare = true,
            }
        }
        // Every group of these segments is applied: one flush puts them in
        // sled's files, and the segments are no longer needed.
        if !paths.is_empty() {
            // The newest becomes the next spare, unless there is one.
            let recycle = !stopping.load(Ordering::Relaxed) && find_spare(&dir(store)).is_none();
            let started = std::time::Instant::now();
            match checkpoint_segments(db, store, &paths, recycle) {
                Ok(recycled) => {
                    timings.observe(started.elapsed());
                    if recycled.is_some() {
                        (spare, from) = (true, recycled);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "a journal checkpoint failed; refusing all further work");
                    tx.send_replace(Progress::Failed(format!("a journal checkpoint failed: {e}")));
                    return;
                }
            }
            done += paths.len() as u64;
            tx.send_replace(Progress::UpTo(done));
        }
        if spare {
            prepare_spare(&dir(store), segment_bytes, stopping, from);
        }
    }
}
