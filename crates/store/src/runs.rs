//! Runs: the values a group appends to a log tree, stored as one sled value.
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
//! Layout of a run: `0x00`, [`cuts::RUN`], then per value its key (u64 BE),
//! its length (u32 BE) and the value as it would be stored alone (possibly
//! a cut, `cuts.rs`). A run holds at least two values and at most
//! [`RUN_BYTES`] of items; a value that would be alone in its run is
//! stored alone, as before runs existed. No value stored alone begins like a run: a value that begins
//! with `0x00` is a cut of another kind, or stored behind `0x00 0x00`.
//!
//! Reading: the value at key `k` is in the last sled value at or before
//! `k`: stored alone under `k`, or in a run that holds it. A range starts
//! there. The journal keeps each value apart. A replayed group is packed
//! again, and the keys of each run past its first are removed: a build
//! from before runs (or one that packed otherwise) may have written them
//! alone before the crash, and a value must not stand both alone and in a
//! run. Replaying a group twice writes the same values.

use std::ops::Bound;

use sled::IVec;

use crate::keys::{self, AUDIT, RECEIPT_LOG};
use crate::{corrupt_at, cuts, StoreError};

/// Bytes past which a run is closed and the next value starts another.
/// Measured: 8 KiB ran as fast as 4 KiB and faster than 32 KiB (whose
/// larger sled nodes also raised the process's peak RSS while draining a
/// queue by ~100 MiB); see docs/benchmarks.md.
pub(crate) const RUN_BYTES: usize = 8 << 10;

/// Mark and kind.
const HEAD: usize = 2;
/// Key and length, before each value.
const ITEM_HEAD: usize = 12;

/// Whether consecutive puts to `tree` are stored as runs.
pub(crate) fn packs(tree: usize) -> bool {
    tree == RECEIPT_LOG || tree == AUDIT
}

fn is_run(stored: &[u8]) -> bool {
    stored.starts_with(&[cuts::MARK, cuts::RUN])
}

/// The sled values that store `values` (keys ascending): runs of items
/// up to [`RUN_BYTES`], a value alone where it would be alone in its run.
pub(crate) fn pack(values: &[(u64, IVec)]) -> Vec<(u64, IVec)> {
    let mut out = Vec::new();
    let mut rest = values;
    while let Some((first, _)) = rest.first() {
        let mut bytes = 0;
        let n = rest
            .iter()
            .take_while(|(_, v)| {
                let fits = bytes == 0 || bytes + ITEM_HEAD + v.len() <= RUN_BYTES;
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
            let mut v = Vec::with_capacity(HEAD + bytes);
            v.extend_from_slice(&[cuts::MARK, cuts::RUN]);
            for (key, value) in run {
                v.extend_from_slice(&key.to_be_bytes());
                v.extend_from_slice(&(value.len() as u32).to_be_bytes());
                v.extend_from_slice(value);
            }
            out.push((*first, IVec::from(v)));
        }
        rest = after;
    }
    out
}

/// The value stored for `key` in log tree `tree` of `trees`, alone or in
/// a run.
///
/// # Errors
/// A storage failure, or a run that does not parse (named with its key).
pub(crate) fn get(trees: &[sled::Tree], tree: usize, key: u64) -> Result<Option<IVec>, StoreError> {
    let Some(found) = trees[tree].range(..=key.to_be_bytes()).next_back() else {
        return Ok(None);
    };
    let (k, v) = found?;
    if is_run(&v) {
        return find(tree, &k, v, key);
    }
    Ok((keys::u64_of(&k) == key).then_some(v))
}

/// The values stored in log tree `tree` of `trees` with keys in `[from, to)`
/// (`to`: `None` for no end), in key order, each alone or out of its run.
///
/// sled's iterators are not snapshots, so the order of the two reads
/// matters: first the first value at or after `from`, then the last value
/// before it. A run that holds keys from `from` on and is written between
/// the two is then found by the second (a log's values are written in key
/// order: a run cannot appear below a value already seen).
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
    let end = to.map_or(Bound::Unbounded, |to| Bound::Excluded(to.to_be_bytes().to_vec()));
    let mut sled = trees[tree].range((Bound::Included(from.to_be_bytes().to_vec()), end));
    let first = sled.next().transpose()?;
    let run = match trees[tree].range(..from.to_be_bytes()).next_back().transpose()? {
        Some((k, v)) if is_run(&v) => Some((k, v, HEAD)),
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
            if is_run(&v) {
                self.run = Some((k, v, HEAD));
                continue;
            }
            let key = keys::u64_of(&k);
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

/// The value for `key` in the run `run` stored under `k`.
fn find(tree: usize, k: &[u8], run: IVec, key: u64) -> Result<Option<IVec>, StoreError> {
    let mut at = HEAD;
    while at < run.len() {
        let (found, start, len) = item(&run, at).ok_or_else(|| malformed(tree, k))?;
        if found == key {
            return Ok(Some(run.subslice(start, len)));
        }
        if found > key {
            break;
        }
        at = start + len;
    }
    Ok(None)
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
        let packed = pack(values);
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
}
