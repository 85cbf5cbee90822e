//! Runs: the values a group puts to a log or a queue, stored as one sled value.
//!
//! `receipt_log` and `audit` only grow: each value is written once, at a
//! u64 key (cursor, index) above every key before it, and never rewritten.
//! A message appends several values to them on each node — its envelope
//! and its receipts to the Merkle log, the receipts about it to the
//! receipt log —, and sled's work per insert hardly depends on the value's
//! size (measured: seven inserts of ~200–500 bytes cost about as much as
//! the rest of a message's sled writes together). So when a group is
//! applied (`group.rs`), consecutive puts to one of these trees are stored
//! as a *run*: one value under the first key, holding each key and value
//! in order.
//!
//! The queues — `outbox` and `inbox`, keyed by name `\0` seq — are runs
//! too: a message put three items in outboxes (its envelope at the
//! sender, its DELIVERED and PROCESSED receipts at the recipient) and an
//! entry in an inbox, and took each out again when the peer took custody
//! or the app acked: eight inserts and removes of the ~15 a message cost
//! sled, and a queue's append-at-the-tail, take-at-the-head order also
//! made sled split and merge its nodes all the time. A group's consecutive puts to one
//! queue (one peer's or one service's) are stored as one run under the
//! first key, and taking items out rewrites the run without them, or
//! removes it once it is empty ([`Taking`]): a group that takes a whole
//! run (a peer's ack of the batch that was stored together, as usual)
//! removes one sled value. Sequence numbers only grow, so runs never
//! overlap.
//!
//! Layout of a run: `0x00`, [`cuts::RUN`], then per value its key (u64 BE;
//! in a queue the sequence number) and its length (u32 BE) and the value
//! as it would be stored alone (possibly a cut, `cuts.rs`; in the outbox
//! with its expiry before it). In the outbox the run itself comes after
//! eight zero bytes (an expiry of never, [`lead`]): there a value stored
//! alone begins with its expiry, which may hold any bytes, and then the
//! item as stored, which never begins like a run. A run holds at least
//! two values when written and at most [`RUN_BYTES`] of items (an
//! inbox's, less: see [`INBOX_RUN_BYTES`]); a value that would be alone
//! in its run is stored alone, as before runs existed. No value stored
//! alone begins like a run: a value that begins with `0x00` is a cut of
//! another kind, or stored behind `0x00 0x00`, and no queue entry or
//! `InboxEntry` begins with it (no protobuf field has number 0).
//!
//! Reading: the value at key `k` is in the last sled value at or before
//! `k` (under the same queue name): stored alone under `k`, or in a run
//! that holds it. A range starts there. The journal keeps each value
//! apart. A replayed group is packed again, and the keys of each run past
//! its first are removed: a build from before runs (or one that packed
//! otherwise) may have written them alone before the crash, and a value
//! must not stand both alone and in a run. Replaying a group twice writes
//! the same values; taking items out of a run again finds them gone.

use std::ops::Bound;

use sled::IVec;

use crate::keys::{self, AUDIT, INBOX, OUTBOX, RECEIPT_LOG};
use crate::{corrupt_at, cuts, StoreError};

/// Bytes past which a run is closed and the next value starts another.
/// Measured: 8 KiB ran as fast as 4 KiB and faster than 32 KiB (whose
/// larger sled nodes also raised the process's peak RSS while draining a
/// queue by ~100 MiB); see docs/benchmarks.md.
pub(crate) const RUN_BYTES: usize = 8 << 10;

/// Bytes past which an inbox run is closed. An app may ack one entry at a
/// time, each ack its own group, and each rewrites what is left of the
/// entry's run: with runs this small (~20 entries of ~50 bytes) that is
/// ~0.5 KiB an ack on average, where 8 KiB runs would rewrite ~4 KiB. A
/// peer takes outbox items by the batch it was sent (`limits.batch_size`,
/// 256 by default), whole runs as a rule.
const INBOX_RUN_BYTES: usize = 1 << 10;

/// Bytes past which a run of `tree` is closed.
fn run_bytes(tree: usize) -> usize {
    if tree == INBOX {
        INBOX_RUN_BYTES
    } else {
        RUN_BYTES
    }
}

/// Mark and kind.
const HEAD: usize = 2;
/// Key and length, before each value.
const ITEM_HEAD: usize = 12;

/// Whether consecutive puts to `tree` are stored as runs.
pub(crate) fn packs(tree: usize) -> bool {
    tree == RECEIPT_LOG || tree == AUDIT || queue(tree)
}

/// Whether `tree` is a queue: keyed by name `\0` seq, its items taken out.
pub(crate) fn queue(tree: usize) -> bool {
    tree == OUTBOX || tree == INBOX
}

/// Bytes before a run's mark in `tree`: in the outbox, an expiry of 0.
fn lead(tree: usize) -> usize {
    if tree == OUTBOX {
        8
    } else {
        0
    }
}

fn is_run(tree: usize, stored: &[u8]) -> bool {
    let lead = lead(tree);
    stored.len() >= lead + HEAD
        && stored[..lead].iter().all(|b| *b == 0)
        && stored[lead..].starts_with(&[cuts::MARK, cuts::RUN])
}

/// Key `key` of `tree` as its prefix (a queue's name and `\0`; empty in a
/// log) and its number (the last eight bytes).
pub(crate) fn split(key: &[u8]) -> (&[u8], u64) {
    let at = key.len().saturating_sub(8);
    (&key[..at], keys::u64_of(&key[at..]))
}

fn join(prefix: &[u8], n: u64) -> Vec<u8> {
    [prefix, &n.to_be_bytes()].concat()
}

/// The sled values that store `values` of `tree` (keys ascending): runs of
/// items up to [`RUN_BYTES`] (an inbox's: [`INBOX_RUN_BYTES`]), a value
/// alone where it would be alone in its run.
pub(crate) fn pack(tree: usize, values: &[(u64, IVec)]) -> Vec<(u64, IVec)> {
    let mut out = Vec::new();
    let mut rest = values;
    let most = run_bytes(tree);
    while let Some((first, _)) = rest.first() {
        let mut bytes = 0;
        let n = rest
            .iter()
            .take_while(|(_, v)| {
                let fits = bytes == 0 || bytes + ITEM_HEAD + v.len() <= most;
                if fits {
                    bytes += ITEM_HEAD + v.len();
                }
                fits
            })
            .count();
        let (run, after) = rest.split_at(n);
        if let [(key, value)] = run {
            out.push((*key, value.clone()));
        } else {
            let items = run.iter().map(|(k, v)| (*k, v.as_ref()));
            out.push((*first, IVec::from(encode(tree, items, bytes))));
        }
        rest = after;
    }
    out
}

/// A run of `tree` holding `items`, which take `bytes` with their heads.
fn encode<'v>(tree: usize, items: impl Iterator<Item = (u64, &'v [u8])>, bytes: usize) -> Vec<u8> {
    let lead = lead(tree);
    let mut v = Vec::with_capacity(lead + HEAD + bytes);
    v.resize(lead, 0);
    v.extend_from_slice(&[cuts::MARK, cuts::RUN]);
    for (key, value) in items {
        v.extend_from_slice(&key.to_be_bytes());
        v.extend_from_slice(&(value.len() as u32).to_be_bytes());
        v.extend_from_slice(value);
    }
    v
}

/// The value stored for `key` in log tree `tree` of `trees`, alone or in
/// a run, read with nothing kept (the store reads through [`get_kept`]).
///
/// # Errors
/// A storage failure, or a run that does not parse (named with its key).
#[cfg(test)]
pub(crate) fn get(trees: &[sled::Tree], tree: usize, key: u64) -> Result<Option<IVec>, StoreError> {
    get_at(trees, tree, &key.to_be_bytes())
}

/// The value stored at `key` (its bytes) in `tree`, a log or a queue,
/// alone or in a run, read with nothing kept.
///
/// # Errors
/// A storage failure, or a run that does not parse (named with its key).
#[cfg(test)]
pub(crate) fn get_at(trees: &[sled::Tree], tree: usize, key: &[u8]) -> Result<Option<IVec>, StoreError> {
    get_kept(trees, tree, key, &mut None)
}

/// A run read from sled, kept to answer for its other items
/// ([`get_kept`]): a transaction that takes a batch of items out of a
/// queue reads their run once, not once per item (a reverse range in
/// sled, which copies the node it lands in); so does a store-level read
/// of many values whose parts are in the logs (`InSled` in `lib.rs`).
///
/// Answers stay right while the run changes in sled under the
/// transaction: a transaction runs under the store's writer lock, so the
/// applier can neither finish the group it is applying nor start the next
/// one; what it writes meanwhile is that group, which the transaction
/// reads first, as a layer (`tx.rs`), and a run it rewrites loses only
/// items that layer names as taken. A reader outside any transaction
/// keeps runs of the logs only, which are written once and never changed
/// (numbers only grow, and groups are applied in order).
pub(crate) struct Kept {
    key: IVec,
    value: IVec,
    /// Its items: number, start, length (by number, ascending).
    items: Vec<(u64, usize, usize)>,
}

impl Kept {
    /// Run `value` of `tree` stored under `key`; `None` when it does not parse.
    fn parse(tree: usize, key: IVec, value: IVec) -> Option<Self> {
        let items = items(tree, &value)?;
        Some(Self { key, value, items })
    }

    /// Where number `n` of the queue (or log) under `prefix` is among its items.
    fn index(&self, prefix: &[u8], n: u64) -> Option<usize> {
        let same = split(&self.key).0 == prefix;
        same.then(|| self.items.binary_search_by_key(&n, |(found, ..)| *found).ok())
            .flatten()
    }

    /// The value for number `n` if this run is the one that would hold
    /// it (`None` when it is not).
    fn answer(&self, prefix: &[u8], n: u64) -> Option<Option<IVec>> {
        let (run_prefix, first) = split(&self.key);
        let last = self.items.last().map_or(first, |(last, ..)| *last);
        // Runs never overlap: nothing else of the queue lies within one.
        if run_prefix != prefix || !(first..=last).contains(&n) {
            return None;
        }
        Some(self.index(prefix, n).map(|i| {
            let (_, start, len) = self.items[i];
            self.value.subslice(start, len)
        }))
    }
}

/// The last sled value of `tree` at or before `key`, under the same
/// queue name (in a log, any): where the value at `key` is, if anywhere.
fn at_or_before(trees: &[sled::Tree], tree: usize, key: &[u8]) -> Result<Option<(IVec, IVec)>, sled::Error> {
    let prefix = split(key).0;
    trees[tree]
        .range(prefix.to_vec()..=key.to_vec())
        .next_back()
        .transpose()
}

/// The value stored at `key` (its bytes) in `tree`, as [`get_at`]:
/// answered from `kept` (the last run read from this tree) when that is
/// the run holding it; else read, and a run it is found in kept.
///
/// # Errors
/// A storage failure, or a run that does not parse (named with its key).
pub(crate) fn get_kept(
    trees: &[sled::Tree],
    tree: usize,
    key: &[u8],
    kept: &mut Option<Kept>,
) -> Result<Option<IVec>, StoreError> {
    let (prefix, n) = split(key);
    if let Some(answer) = kept.as_ref().and_then(|run| run.answer(prefix, n)) {
        return Ok(answer);
    }
    let Some((k, v)) = at_or_before(trees, tree, key)? else {
        return Ok(None);
    };
    if !is_run(tree, &v) {
        return Ok((k == key).then_some(v));
    }
    let run = Kept::parse(tree, k.clone(), v).ok_or_else(|| malformed(tree, &k))?;
    let answer = run.answer(prefix, n).flatten();
    *kept = Some(run);
    Ok(answer)
}

/// The values stored in log tree `tree` of `trees` with keys in `[from, to)`
/// (`to`: `None` for no end), in key order, each alone or out of its run.
///
/// # Errors
/// A storage failure reading where the range starts; later ones, and runs
/// that do not parse, are the iterator's items.
pub(crate) fn range(
    trees: &[sled::Tree],
    tree: usize,
    from: u64,
    to: Option<u64>,
) -> Result<Range, StoreError> {
    range_in(trees, tree, &[], from, to)
}

/// The values stored under `prefix` (a queue's name and `\0`; empty for a
/// log) of `tree` with numbers in `[from, to)` (`to`: `None` for no end),
/// in key order, each alone or out of its run.
///
/// sled's iterators are not snapshots, so the order of the two reads
/// matters: first the first value at or after `from`, then the last value
/// before it. A run that holds keys from `from` on and is written between
/// the two is then found by the second (values are written in key order:
/// a run cannot appear below a value already seen).
///
/// # Errors
/// A storage failure reading where the range starts; later ones, and runs
/// that do not parse, are the iterator's items.
pub(crate) fn range_in(
    trees: &[sled::Tree],
    tree: usize,
    prefix: &[u8],
    from: u64,
    to: Option<u64>,
) -> Result<Range, StoreError> {
    let end = match to {
        Some(to) => Bound::Excluded(join(prefix, to)),
        None => match prefix.split_last() {
            // Past every key under the prefix: names hold no `\0`.
            Some((_, name)) => Bound::Excluded([name, &[1]].concat()),
            None => Bound::Unbounded,
        },
    };
    let start = join(prefix, from);
    let mut sled = trees[tree].range((Bound::Included(start.clone()), end));
    let first = sled.next().transpose()?;
    let run = match trees[tree]
        .range(prefix.to_vec()..start)
        .next_back()
        .transpose()?
    {
        Some((k, v)) if is_run(tree, &v) => Some((k, v, lead(tree) + HEAD)),
        _ => None,
    };
    Ok(Range {
        tree,
        first,
        sled,
        from,
        to: to.unwrap_or(u64::MAX),
        run,
        ended: false,
    })
}

/// See [`range`].
pub(crate) struct Range {
    /// The tree's index, to name it in errors.
    tree: usize,
    /// The first sled value at or after `from`, read before `run` was.
    first: Option<(IVec, IVec)>,
    sled: sled::Iter,
    /// Keys returned are at least this: `from`, then past the last one.
    from: u64,
    /// Exclusive; `u64::MAX` when the range has no end.
    to: u64,
    /// The run being read: its key, its value and where the next item starts.
    run: Option<(IVec, IVec, usize)>,
    ended: bool,
}

impl Iterator for Range {
    type Item = Result<(u64, IVec), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.ended {
            if let Some((k, run, at)) = &mut self.run {
                if *at < run.len() {
                    let Some((key, start, len)) = item(run, *at) else {
                        self.ended = true;
                        return Some(Err(malformed(self.tree, k)));
                    };
                    *at = start + len;
                    if key < self.from {
                        continue;
                    }
                    if key >= self.to {
                        self.ended = true;
                        return None;
                    }
                    self.from = key.saturating_add(1);
                    return Some(Ok((key, run.subslice(start, len))));
                }
                self.run = None;
            }
            let next = match self.first.take() {
                Some(kv) => Some(Ok(kv)),
                None => self.sled.next(),
            };
            let (k, v) = match next? {
                Ok(kv) => kv,
                Err(e) => {
                    self.ended = true;
                    return Some(Err(e.into()));
                }
            };
            if is_run(self.tree, &v) {
                self.run = Some((k, v, lead(self.tree) + HEAD));
                continue;
            }
            let key = split(&k).1;
            if key < self.from {
                // Already returned from a run before it (a value written
                // alone and in a run by different builds): once is enough.
                continue;
            }
            self.from = key.saturating_add(1);
            return Some(Ok((key, v)));
        }
        None
    }
}

/// Each value one sled value of `tree` stored under `k` stands for, with
/// its number: itself, or the items of its run. For reading a whole queue.
pub(crate) fn values(tree: usize, k: &[u8], v: IVec) -> Result<Vec<(u64, IVec)>, StoreError> {
    if !is_run(tree, &v) {
        return Ok(vec![(split(k).1, v)]);
    }
    let items = items(tree, &v).ok_or_else(|| malformed(tree, k))?;
    Ok(items
        .into_iter()
        .map(|(n, start, len)| (n, v.subslice(start, len)))
        .collect())
}

/// How many values one sled value of `tree` stands for (a run that does
/// not parse counts as one: it is named when read).
pub(crate) fn count(tree: usize, v: &[u8]) -> u64 {
    if !is_run(tree, v) {
        return 1;
    }
    items(tree, v).map_or(1, |items| items.len() as u64)
}

/// The items of run `run` of `tree`: number, where the value starts, its
/// length; `None` when the run does not parse.
fn items(tree: usize, run: &[u8]) -> Option<Vec<(u64, usize, usize)>> {
    let mut out = Vec::new();
    let mut at = lead(tree) + HEAD;
    while at < run.len() {
        let (n, start, len) = item(run, at)?;
        out.push((n, start, len));
        at = start + len;
    }
    Some(out)
}

/// The item of `run` at `at`: its key, and where its value starts and its
/// length; `None` when it does not fit in the run.
fn item(run: &[u8], at: usize) -> Option<(u64, usize, usize)> {
    let head = run.get(at..at + ITEM_HEAD)?;
    let key = u64::from_be_bytes(head[..8].try_into().ok()?);
    let len = u32::from_be_bytes(head[8..].try_into().ok()?) as usize;
    let start = at + ITEM_HEAD;
    run.get(start..start + len)?;
    Some((key, start, len))
}

fn malformed(tree: usize, key: &[u8]) -> StoreError {
    corrupt_at(tree, key, "a run of values does not parse".into())
}

/// Queue items a group takes out, applied run by run: consecutive removes
/// of items of one run rewrite it once, without them, or remove it when
/// nothing is left. A key that is in no run is removed as it is.
#[derive(Default)]
pub(crate) struct Taking {
    run: Option<Taken>,
}

/// A run items are being taken from, and which of its items are taken.
struct Taken {
    tree: usize,
    run: Kept,
    taken: Vec<bool>,
}

impl Taken {
    /// Marks number `n` of the queue under `prefix` taken; false when the
    /// run does not hold it.
    fn take(&mut self, prefix: &[u8], n: u64) -> bool {
        let i = self.run.index(prefix, n);
        if let Some(i) = i {
            self.taken[i] = true;
        }
        i.is_some()
    }
}

impl Taking {
    /// Takes the item at `key` of queue `tree` out, now or with the rest
    /// of its run ([`Taking::finish`]).
    ///
    /// # Errors
    /// A storage failure.
    pub(crate) fn take(&mut self, trees: &[sled::Tree], tree: usize, key: &[u8]) -> Result<(), sled::Error> {
        let (prefix, n) = split(key);
        if let Some(run) = &mut self.run {
            if run.tree == tree && run.take(prefix, n) {
                return Ok(());
            }
        }
        self.finish(trees)?;
        let Some((k, v)) = at_or_before(trees, tree, key)? else {
            return Ok(());
        };
        if !is_run(tree, &v) {
            if k == key {
                trees[tree].remove(key)?;
            }
            return Ok(());
        }
        // A run that does not parse is left as it is, named when read.
        if let Some(run) = Kept::parse(tree, k, v) {
            let taken = vec![false; run.items.len()];
            let mut run = Taken { tree, run, taken };
            if run.take(prefix, n) {
                self.run = Some(run);
            }
        }
        Ok(())
    }

    /// Writes the run being taken from without the items taken.
    ///
    /// # Errors
    /// A storage failure.
    pub(crate) fn finish(&mut self, trees: &[sled::Tree]) -> Result<(), sled::Error> {
        let Some(run) = self.run.take() else {
            return Ok(());
        };
        let Taken { tree, run, taken } = run;
        let kept: Vec<(u64, &[u8])> = run
            .items
            .iter()
            .zip(&taken)
            .filter(|(_, taken)| !**taken)
            .map(|(&(n, start, len), _)| (n, &run.value[start..start + len]))
            .collect();
        if kept.is_empty() {
            trees[tree].remove(&run.key)?;
        } else {
            let bytes = kept.iter().map(|(_, v)| ITEM_HEAD + v.len()).sum();
            trees[tree].insert(&run.key, encode(tree, kept.into_iter(), bytes))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tree of a store, by index: the values here go to `audit`.
    fn trees() -> (tempfile::TempDir, Vec<sled::Tree>) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let trees = keys::TREES
            .iter()
            .map(|name| db.open_tree(name).unwrap())
            .collect();
        (dir, trees)
    }

    fn value(key: u64, len: usize) -> IVec {
        IVec::from(vec![key as u8; len])
    }

    fn store(trees: &[sled::Tree], values: &[(u64, IVec)]) -> Vec<(u64, IVec)> {
        let packed = pack(AUDIT, values);
        for (k, v) in &packed {
            trees[AUDIT].insert(k.to_be_bytes(), v.clone()).unwrap();
        }
        packed
    }

    fn read(trees: &[sled::Tree], from: u64, to: Option<u64>) -> Vec<(u64, IVec)> {
        range(trees, AUDIT, from, to)
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    /// Every value is read back byte for byte by key and by any range, from
    /// lone values and runs alike, across runs with gaps between keys.
    #[test]
    fn values_are_read_back_alone_and_from_runs() {
        let (_dir, trees) = trees();
        // A lone value (stored as before runs), a group of three with a gap
        // in its keys, one of 20 that splits into two runs.
        let lone = vec![(1, value(1, 10))];
        let three = vec![(2, value(2, 5)), (3, value(3, 0)), (7, value(7, 9))];
        let big: Vec<_> = (10..30).map(|k| (k, value(k, 700))).collect();
        assert_eq!(store(&trees, &lone), lone, "alone as it is");
        assert_eq!(store(&trees, &three).len(), 1);
        let packed = store(&trees, &big);
        assert_eq!(
            packed.len(),
            2,
            "{:?}",
            packed.iter().map(|(k, v)| (k, v.len())).collect::<Vec<_>>()
        );
        assert!(packed.iter().all(|(_, v)| v.len() <= HEAD + RUN_BYTES));
        assert_eq!(trees[AUDIT].len(), 4);

        let all: Vec<_> = [lone, three, big].concat();
        for (k, v) in &all {
            assert_eq!(get(&trees, AUDIT, *k).unwrap().as_ref(), Some(v), "key {k}");
        }
        for absent in [0, 4, 5, 6, 8, 9, 30, 1000] {
            assert_eq!(get(&trees, AUDIT, absent).unwrap(), None, "key {absent}");
        }
        assert_eq!(read(&trees, 0, None), all);
        for from in 0..32 {
            for to in from..32 {
                let want: Vec<_> = all
                    .iter()
                    .filter(|(k, _)| (from..to).contains(k))
                    .cloned()
                    .collect();
                assert_eq!(read(&trees, from, Some(to)), want, "[{from}, {to})");
            }
        }
    }

    /// A run that does not parse is named with its tree and key, by a
    /// lookup and by a range; what comes before it is still read.
    #[test]
    fn a_broken_run_is_named() {
        let (_dir, trees) = trees();
        store(&trees, &[(1, value(1, 4))]);
        let packed = store(&trees, &[(5, value(5, 4)), (6, value(6, 4))]);
        let run = &packed[0].1;
        trees[AUDIT]
            .insert(5u64.to_be_bytes(), &run[..run.len() - 1])
            .unwrap();
        let err = get(&trees, AUDIT, 6).unwrap_err().to_string();
        assert!(err.contains("tree audit") && err.contains("log entry 5"), "{err}");
        let mut r = range(&trees, AUDIT, 0, None).unwrap();
        assert_eq!(r.next().unwrap().unwrap().0, 1);
        assert_eq!(r.next().unwrap().unwrap().0, 5, "the items before the break");
        assert!(r.next().unwrap().is_err());
        assert!(r.next().is_none());
    }

    /// A value found both in a run and alone after it (as a replay by a
    /// build from before runs could have left it) is read once.
    #[test]
    fn a_value_in_a_run_and_alone_is_read_once() {
        let (_dir, trees) = trees();
        store(&trees, &[(5, value(5, 4)), (6, value(6, 4))]);
        store(&trees, &[(6, value(6, 4))]);
        store(&trees, &[(8, value(8, 4))]);
        let keys: Vec<u64> = read(&trees, 0, None).iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, [5, 6, 8]);
        let keys: Vec<u64> = read(&trees, 6, None).iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, [6, 8]);
    }

    /// Queue runs sit under their queue's name: read by key and by range
    /// within it, never across into a neighbour's; items taken come out of
    /// their run, which goes with its last; a replayed group leaves no
    /// item both alone and in a run.
    #[test]
    fn queue_runs_stay_within_their_name_and_are_taken_apart() {
        use crate::group::{write_all, Pass};
        let (_dir, trees) = trees();
        let key = |name: &str, n: u64| keys::seq_key(name, n);
        // "a" and "ab" sort next to each other; the outbox's values begin
        // with an expiry (0 here).
        let item = |n: u64| IVec::from([&[0u8; 8][..], &[0x0a, n as u8]].concat());
        let group: Vec<(usize, Vec<u8>, Option<IVec>)> = [("a", 1..6), ("ab", 3..5)]
            .into_iter()
            .flat_map(|(name, ns)| ns.map(move |n| (OUTBOX, key(name, n), Some(item(n)))))
            .collect();
        // As a build from before queue runs left it at a crash: some alone.
        trees[OUTBOX].insert(key("a", 2), item(2)).unwrap();
        write_all(&trees, group.clone(), Pass::Replay).unwrap();
        assert_eq!(trees[OUTBOX].len(), 2, "one run per name, nothing alone");
        write_all(&trees, group, Pass::Replay).unwrap();
        assert_eq!(trees[OUTBOX].len(), 2, "the same again");

        let read = |name: &str, from: u64| -> Vec<u64> {
            range_in(&trees, OUTBOX, &keys::prefixed(name), from, None)
                .unwrap()
                .map(|kv| kv.unwrap().0)
                .collect()
        };
        assert_eq!(read("a", 0), [1, 2, 3, 4, 5]);
        assert_eq!(read("a", 3), [3, 4, 5]);
        assert_eq!(read("ab", 0), [3, 4]);
        assert_eq!(read("ab", 4), [4]);
        assert_eq!(read("b", 0), Vec::<u64>::new());
        for n in 1..6 {
            assert_eq!(
                get_at(&trees, OUTBOX, &key("a", n)).unwrap(),
                Some(item(n)),
                "a {n}"
            );
        }
        assert_eq!(get_at(&trees, OUTBOX, &key("ab", 2)).unwrap(), None);
        assert_eq!(get_at(&trees, OUTBOX, &key("ab", 6)).unwrap(), None);

        // Taken: two of one run, one not there; then the rest of it.
        let take = |ns: &[(&str, u64)]| {
            let writes = ns.iter().map(|(name, n)| (OUTBOX, key(name, *n), None));
            write_all(&trees, writes, Pass::First).unwrap();
        };
        take(&[("a", 2), ("a", 4), ("a", 9), ("ab", 3)]);
        assert_eq!(read("a", 0), [1, 3, 5]);
        assert_eq!(read("a", 2), [3, 5], "from a number taken");
        assert_eq!(read("ab", 0), [4]);
        assert_eq!(get_at(&trees, OUTBOX, &key("a", 2)).unwrap(), None);
        assert_eq!(trees[OUTBOX].len(), 2);
        // One taken before, between two of the same run.
        take(&[("a", 1), ("a", 2), ("a", 3), ("a", 5)]);
        assert_eq!(trees[OUTBOX].len(), 1, "an empty run goes");
        assert_eq!(read("a", 0), Vec::<u64>::new());
        assert_eq!(read("ab", 0), [4]);

        // A group's puts and a later group's takes, replayed (twice) over
        // the store they left: the same store.
        let puts: Vec<_> = (10..15).map(|n| (OUTBOX, key("r", n), Some(item(n)))).collect();
        let takes: Vec<_> = [11, 12, 14].map(|n| (OUTBOX, key("r", n), None)).to_vec();
        write_all(&trees, puts.clone(), Pass::First).unwrap();
        write_all(&trees, takes.clone(), Pass::First).unwrap();
        let all = || -> Vec<(IVec, IVec)> { trees[OUTBOX].iter().map(Result::unwrap).collect() };
        let once = all();
        for _ in 0..2 {
            write_all(&trees, puts.clone(), Pass::Replay).unwrap();
            write_all(&trees, takes.clone(), Pass::Replay).unwrap();
            assert_eq!(all(), once);
        }
        assert_eq!(read("r", 0), [10, 13]);

        // A run that does not parse is left as it is, and named when read.
        let broken = [&[0u8; 8][..], &[cuts::MARK, cuts::RUN, 0, 0]].concat();
        trees[OUTBOX].insert(key("c", 1), broken.as_slice()).unwrap();
        take(&[("c", 1)]);
        assert_eq!(
            trees[OUTBOX].get(key("c", 1)).unwrap().as_deref(),
            Some(broken.as_slice())
        );
        assert!(range_in(&trees, OUTBOX, &keys::prefixed("c"), 0, None)
            .unwrap()
            .any(|kv| kv.is_err()));
    }
}
