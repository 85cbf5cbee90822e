//! The Merkle tree of a node's log, as RFC 9162 (Certificate Transparency
//! 2.0, §2.1) defines it: leaf hash `SHA-256(0x00 || entry)`, interior node
//! `SHA-256(0x01 || left || right)`, inclusion and consistency proofs and
//! their verification. Any RFC 6962 / 9162 implementation computes the same
//! roots and checks the same proofs.

use crate::envelope::sha256;

/// A 32-byte SHA-256 hash.
pub type Hash = [u8; 32];

/// Why a proof did not verify, or could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProofError {
    /// The index or sizes are outside the tree.
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// The path does not lead to the expected root.
    #[error("the proof does not lead to the expected root")]
    Mismatch,
    /// The path has the wrong number of hashes.
    #[error("the proof has the wrong length")]
    BadLength,
    /// A subtree hash could not be read from where the log keeps them.
    #[error("a subtree hash is unavailable: {0}")]
    Unavailable(String),
}

/// The hash of a leaf: `SHA-256(0x00 || entry)`.
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut b = Vec::with_capacity(entry.len() + 1);
    b.push(0);
    b.extend_from_slice(entry);
    sha256(&b)
}

/// The hash of an interior node: `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut b = [0u8; 65];
    b[0] = 1;
    b[1..33].copy_from_slice(left);
    b[33..].copy_from_slice(right);
    sha256(&b)
}

/// Where a proof's hashes come from: the MTH of each *perfect* subtree, the
/// `2^level` leaves `[index·2^level, (index+1)·2^level)`. Every root and
/// proof of RFC 9162 splits a range at the largest power of two below its
/// size, so each is assembled from O(log n) perfect subtrees, O(log² n) for
/// a proof: a log that stores them ([`Subtrees`] over the store) answers in
/// O(log² n) reads however long it grows; a slice of leaf hashes computes
/// them.
pub trait Subtrees {
    /// The MTH of the perfect subtree at `level` (0: a leaf) number `index`.
    ///
    /// # Errors
    /// [`ProofError::Unavailable`] when it cannot be read.
    fn perfect(&mut self, level: u32, index: u64) -> Result<Hash, ProofError>;
}

/// Leaf hashes in memory: perfect subtrees computed from them.
struct Leaves<'a>(&'a [Hash]);

impl Subtrees for Leaves<'_> {
    fn perfect(&mut self, level: u32, index: u64) -> Result<Hash, ProofError> {
        if level == 0 {
            return self
                .0
                .get(index as usize)
                .copied()
                .ok_or_else(|| ProofError::OutOfRange(format!("leaf {index}")));
        }
        let left = self.perfect(level - 1, 2 * index)?;
        Ok(node_hash(&left, &self.perfect(level - 1, 2 * index + 1)?))
    }
}

/// The largest power of two smaller than `n` (n >= 2).
fn split(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

/// MTH of the `n` leaves from `start` (a multiple of the largest power of two
/// not above `n`, as every range of the RFC's recursion is).
fn range_root(t: &mut impl Subtrees, start: u64, n: u64) -> Result<Hash, ProofError> {
    match n {
        0 => Ok(sha256(b"")),
        n if n.is_power_of_two() => t.perfect(n.trailing_zeros(), start >> n.trailing_zeros()),
        n => {
            let k = split(n);
            let left = range_root(t, start, k)?;
            Ok(node_hash(&left, &range_root(t, start + k, n - k)?))
        }
    }
}

/// MTH over leaf hashes: the root of a tree of `leaves.len()` entries.
pub fn root(leaves: &[Hash]) -> Hash {
    match range_root(&mut Leaves(leaves), 0, leaves.len() as u64) {
        Ok(h) => h,
        // Every index asked for is below `leaves.len()`.
        Err(_) => unreachable!("a slice has every leaf of its own tree"),
    }
}

/// The root of the tree of `leaves` and the inclusion proof of every leaf,
/// in O(n) hashing: what one signature over a batch needs.
///
/// Built level by level, pairing nodes left to right and carrying an odd
/// last node up unchanged: for RFC 9162 trees this gives the same root and
/// the same PATH of every leaf as [`root`] and [`inclusion_proof`], which
/// cost O(n) each.
pub fn root_and_proofs(leaves: &[Hash]) -> (Hash, Vec<Vec<Hash>>) {
    if leaves.is_empty() {
        return (root(leaves), Vec::new());
    }
    let mut proofs = vec![Vec::new(); leaves.len()];
    let mut level = leaves.to_vec();
    // Each node of the current level covers `width` leaves.
    let mut width = 1usize;
    while level.len() > 1 {
        for (leaf, proof) in proofs.iter_mut().enumerate() {
            let i = leaf / width;
            let sibling = i ^ 1;
            if sibling < level.len() {
                proof.push(level[sibling]);
            }
        }
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [l, r] => node_hash(l, r),
                [only] => *only,
                _ => unreachable!("chunks(2) yields one or two"),
            })
            .collect();
        width *= 2;
    }
    (level[0], proofs)
}

/// The MTH of each perfect subtree that together cover the first `size`
/// leaves of `t`, largest first: one for each bit set in `size`. With
/// them, the leaves after give the root of every larger tree
/// ([`root_after`]), so a log can be continued from a size without the
/// leaves before it.
///
/// # Errors
/// [`ProofError::Unavailable`] when a subtree cannot be read.
pub fn frontier_of(t: &mut impl Subtrees, size: u64) -> Result<Vec<Hash>, ProofError> {
    let mut start = 0;
    let mut out = Vec::with_capacity(size.count_ones() as usize);
    for level in levels(size) {
        out.push(t.perfect(level, start >> level)?);
        start += 1 << level;
    }
    Ok(out)
}

/// The levels of the perfect subtrees that cover `size` leaves, largest
/// first: the bits set in `size`.
fn levels(size: u64) -> impl Iterator<Item = u32> {
    (0..64u32).rev().filter(move |l| size >> l & 1 == 1)
}

/// [`frontier_of`] the tree of `leaves`.
pub fn frontier(leaves: &[Hash]) -> Vec<Hash> {
    match frontier_of(&mut Leaves(leaves), leaves.len() as u64) {
        Ok(f) => f,
        // Every subtree asked for lies within `leaves`.
        Err(_) => unreachable!("a slice has every leaf of its own tree"),
    }
}

/// The root of the tree of `size + leaves.len()` leaves, from the
/// [`frontier_of`] its first `size` leaves and the hashes of the leaves
/// after them.
///
/// # Errors
/// [`ProofError::OutOfRange`] when `frontier` does not hold one hash for
/// each bit set in `size`.
pub fn root_after(frontier: &[Hash], size: u64, leaves: &[Hash]) -> Result<Hash, ProofError> {
    let mut f = Frontier::new(frontier, size)?;
    f.extend(leaves);
    Ok(f.root())
}

/// A tree being grown a leaf at a time: the perfect subtrees that cover
/// it, so its root at every size costs O(log n), and the roots at many
/// sizes one pass over the leaves.
#[derive(Debug, Clone)]
pub struct Frontier {
    /// (level, MTH) of the perfect subtrees, left to right, levels
    /// strictly decreasing.
    stack: Vec<(u32, Hash)>,
    size: u64,
}

impl Frontier {
    /// The tree of `size` leaves whose [`frontier_of`] is `frontier`.
    ///
    /// # Errors
    /// [`ProofError::OutOfRange`] when `frontier` does not hold one hash
    /// for each bit set in `size`.
    pub fn new(frontier: &[Hash], size: u64) -> Result<Self, ProofError> {
        if frontier.len() != size.count_ones() as usize {
            return Err(ProofError::OutOfRange(format!(
                "{} frontier hashes for a tree of {size} leaves, which has {}",
                frontier.len(),
                size.count_ones()
            )));
        }
        let stack = levels(size).zip(frontier.iter().copied()).collect();
        Ok(Frontier { stack, size })
    }

    /// Its size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Adds a leaf: two subtrees of a level make one of the next, as a
    /// binary counter adds one.
    pub fn push(&mut self, leaf: &Hash) {
        self.stack.push((0, *leaf));
        self.size += 1;
        while let [.., (a, left), (b, right)] = self.stack[..] {
            if a != b {
                break;
            }
            self.stack.truncate(self.stack.len() - 2);
            self.stack.push((a + 1, node_hash(&left, &right)));
        }
    }

    /// Adds `leaves`, in order.
    pub fn extend(&mut self, leaves: &[Hash]) {
        leaves.iter().for_each(|l| self.push(l));
    }

    /// The root now. RFC 9162 splits at the largest power of two: the
    /// subtrees fold from the right.
    pub fn root(&self) -> Hash {
        let mut hashes = self.stack.iter().rev().map(|(_, h)| *h);
        let Some(last) = hashes.next() else {
            return sha256(b"");
        };
        hashes.fold(last, |right, left| node_hash(&left, &right))
    }
}

/// The root of the tree of the first `size` leaves of `t`.
///
/// # Errors
/// [`ProofError::Unavailable`] when a subtree cannot be read.
pub fn root_of(t: &mut impl Subtrees, size: u64) -> Result<Hash, ProofError> {
    range_root(t, 0, size)
}

/// The inclusion proof of leaf `index` in the tree of `leaves` (PATH).
///
/// # Errors
/// [`ProofError::OutOfRange`] when `index` is not in the tree.
pub fn inclusion_proof(index: usize, leaves: &[Hash]) -> Result<Vec<Hash>, ProofError> {
    inclusion_proof_of(&mut Leaves(leaves), index as u64, leaves.len() as u64)
}

/// The inclusion proof of leaf `index` in the tree of the first `size`
/// leaves of `t` (PATH).
///
/// # Errors
/// [`ProofError::OutOfRange`] when `index` is not in the tree;
/// [`ProofError::Unavailable`] when a subtree cannot be read.
pub fn inclusion_proof_of(t: &mut impl Subtrees, index: u64, size: u64) -> Result<Vec<Hash>, ProofError> {
    if index >= size {
        return Err(ProofError::OutOfRange(format!(
            "leaf {index} of a tree of {size}"
        )));
    }
    let mut path = Vec::new();
    path_into(t, index, 0, size, &mut path)?;
    Ok(path)
}

/// PATH(m, D[start..start + n]), appended to `out` leaf-side first.
fn path_into(
    t: &mut impl Subtrees,
    m: u64,
    start: u64,
    n: u64,
    out: &mut Vec<Hash>,
) -> Result<(), ProofError> {
    if n <= 1 {
        return Ok(());
    }
    let k = split(n);
    if m < k {
        path_into(t, m, start, k, out)?;
        out.push(range_root(t, start + k, n - k)?);
    } else {
        path_into(t, m - k, start + k, n - k, out)?;
        out.push(range_root(t, start, k)?);
    }
    Ok(())
}

/// The consistency proof between the first `old_size` leaves and all of
/// `leaves` (PROOF).
///
/// # Errors
/// [`ProofError::OutOfRange`] unless `0 < old_size <= leaves.len()`.
pub fn consistency_proof(old_size: usize, leaves: &[Hash]) -> Result<Vec<Hash>, ProofError> {
    consistency_proof_of(&mut Leaves(leaves), old_size as u64, leaves.len() as u64)
}

/// The consistency proof between the trees of the first `old_size` and the
/// first `size` leaves of `t` (PROOF).
///
/// # Errors
/// [`ProofError::OutOfRange`] unless `0 < old_size <= size`;
/// [`ProofError::Unavailable`] when a subtree cannot be read.
pub fn consistency_proof_of(
    t: &mut impl Subtrees,
    old_size: u64,
    size: u64,
) -> Result<Vec<Hash>, ProofError> {
    if old_size == 0 || old_size > size {
        return Err(ProofError::OutOfRange(format!(
            "old size {old_size} against a tree of {size}"
        )));
    }
    let mut out = Vec::new();
    subproof(t, old_size, 0, size, true, &mut out)?;
    Ok(out)
}

/// SUBPROOF(m, D[start..start + n], complete), appended to `out`.
fn subproof(
    t: &mut impl Subtrees,
    m: u64,
    start: u64,
    n: u64,
    complete: bool,
    out: &mut Vec<Hash>,
) -> Result<(), ProofError> {
    if m == n {
        if !complete {
            out.push(range_root(t, start, n)?);
        }
        return Ok(());
    }
    let k = split(n);
    if m <= k {
        subproof(t, m, start, k, complete, out)?;
        out.push(range_root(t, start + k, n - k)?);
    } else {
        subproof(t, m - k, start + k, n - k, false, out)?;
        out.push(range_root(t, start, k)?);
    }
    Ok(())
}

/// Verifies that `leaf` is entry `index` of the tree of `size` with `root`
/// (RFC 9162 §2.1.3.2).
///
/// # Errors
/// [`ProofError`] naming what failed.
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    path: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::OutOfRange(format!(
            "leaf {index} of a tree of {size}"
        )));
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in path {
        if snode == 0 {
            return Err(ProofError::BadLength);
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(ProofError::BadLength);
    }
    if r != *root {
        return Err(ProofError::Mismatch);
    }
    Ok(())
}

/// Verifies that the tree of `old_size` with `old_root` is a prefix of the
/// tree of `new_size` with `new_root` (RFC 9162 §2.1.4.2).
///
/// # Errors
/// [`ProofError`] naming what failed.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    path: &[Hash],
    old_root: &Hash,
    new_root: &Hash,
) -> Result<(), ProofError> {
    if old_size > new_size {
        return Err(ProofError::OutOfRange(format!(
            "old size {old_size} > new size {new_size}"
        )));
    }
    if old_size == new_size {
        return if !path.is_empty() {
            Err(ProofError::BadLength)
        } else if old_root == new_root {
            Ok(())
        } else {
            Err(ProofError::Mismatch)
        };
    }
    if old_size == 0 {
        return if path.is_empty() {
            Ok(())
        } else {
            Err(ProofError::BadLength)
        };
    }
    if path.is_empty() {
        return Err(ProofError::BadLength);
    }
    let mut path: Vec<Hash> = path.to_vec();
    if old_size.is_power_of_two() {
        path.insert(0, *old_root);
    }
    let (mut fnode, mut snode) = (old_size - 1, new_size - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if snode == 0 {
            return Err(ProofError::BadLength);
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(ProofError::BadLength);
    }
    if fr != *old_root || sr != *new_root {
        return Err(ProofError::Mismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(format!("entry {i}").as_bytes()))
            .collect()
    }

    #[test]
    fn all_proofs_at_once_match_the_rfc_proofs() {
        for n in 0..=70 {
            let l = leaves(n);
            let (r, proofs) = root_and_proofs(&l);
            assert_eq!(r, root(&l), "root of {n}");
            assert_eq!(proofs.len(), n);
            for (i, p) in proofs.iter().enumerate() {
                assert_eq!(p, &inclusion_proof(i, &l).unwrap(), "leaf {i} of {n}");
                verify_inclusion(&l[i], i as u64, n as u64, p, &r).unwrap();
            }
        }
    }

    #[test]
    fn a_tree_continued_from_its_frontier_has_the_roots_of_the_whole() {
        let l = leaves(70);
        for n in 0..=l.len() {
            let frontier = frontier(&l[..n]);
            assert_eq!(frontier, frontier_of(&mut Leaves(&l), n as u64).unwrap());
            assert_eq!(frontier.len(), (n as u64).count_ones() as usize);
            for m in n..=l.len() {
                assert_eq!(
                    root_after(&frontier, n as u64, &l[n..m]).unwrap(),
                    root(&l[..m]),
                    "{n} then to {m}"
                );
            }
        }
        let frontier = frontier_of(&mut Leaves(&l), 12).unwrap();
        assert!(
            root_after(&frontier, 13, &[]).is_err(),
            "12 has two bits set, 13 three"
        );
        let mut wrong = frontier.clone();
        wrong[0][0] ^= 1;
        assert_ne!(root_after(&wrong, 12, &l[12..20]).unwrap(), root(&l[..20]));
    }

    #[test]
    fn empty_and_single_trees_follow_the_rfc() {
        assert_eq!(
            hex::encode(root(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // RFC 6962 test vector: the empty leaf.
        assert_eq!(
            hex::encode(leaf_hash(b"")),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        );
    }

    #[test]
    fn every_inclusion_and_consistency_proof_verifies_and_a_wrong_one_does_not() {
        for n in 1..=33 {
            let l = leaves(n);
            let r = root(&l);
            for i in 0..n {
                let p = inclusion_proof(i, &l).unwrap();
                verify_inclusion(&l[i], i as u64, n as u64, &p, &r).unwrap();
                let other = leaf_hash(b"not in the log");
                assert!(verify_inclusion(&other, i as u64, n as u64, &p, &r).is_err());
                if n > 1 {
                    let wrong = (i + 1) % n;
                    assert!(verify_inclusion(&l[i], wrong as u64, n as u64, &p, &r).is_err());
                }
            }
            for m in 1..=n {
                let p = consistency_proof(m, &l).unwrap();
                let old = root(&l[..m]);
                verify_consistency(m as u64, n as u64, &p, &old, &r).unwrap();
                if m < n {
                    let forked = root(&leaves(m + 1)[1..]);
                    assert!(verify_consistency(m as u64, n as u64, &p, &forked, &r).is_err());
                }
            }
        }
    }

    /// Perfect subtrees precomputed, as a store keeps them; counts reads.
    struct Stored {
        nodes: std::collections::HashMap<(u32, u64), Hash>,
        reads: usize,
    }

    impl Stored {
        fn of(leaves: &[Hash]) -> Self {
            let mut nodes = std::collections::HashMap::new();
            let mut level: Vec<Hash> = leaves.to_vec();
            for l in 0.. {
                for (i, h) in level.iter().enumerate() {
                    nodes.insert((l, i as u64), *h);
                }
                if level.len() < 2 {
                    break;
                }
                level = level.chunks_exact(2).map(|p| node_hash(&p[0], &p[1])).collect();
            }
            Self { nodes, reads: 0 }
        }
    }

    impl Subtrees for Stored {
        fn perfect(&mut self, level: u32, index: u64) -> Result<Hash, ProofError> {
            self.reads += 1;
            self.nodes
                .get(&(level, index))
                .copied()
                .ok_or_else(|| ProofError::Unavailable(format!("{level}/{index}")))
        }
    }

    #[test]
    fn stored_subtrees_give_the_same_roots_and_proofs_in_few_reads() {
        for n in 1..=40 {
            let l = leaves(n);
            let mut t = Stored::of(&l);
            for size in 1..=n {
                assert_eq!(root_of(&mut t, size as u64).unwrap(), root(&l[..size]));
                for i in 0..size {
                    assert_eq!(
                        inclusion_proof_of(&mut t, i as u64, size as u64).unwrap(),
                        inclusion_proof(i, &l[..size]).unwrap()
                    );
                }
                for m in 1..=size {
                    assert_eq!(
                        consistency_proof_of(&mut t, m as u64, size as u64).unwrap(),
                        consistency_proof(m, &l[..size]).unwrap()
                    );
                }
            }
        }
        // A large log: a proof costs O(log² n) reads, not O(n).
        let n = 100_003u64;
        let mut t = Stored::of(&leaves(n as usize));
        t.reads = 0;
        let p = inclusion_proof_of(&mut t, 77_777, n).unwrap();
        let r = root_of(&mut t, n).unwrap();
        let leaf = leaf_hash(b"entry 77777");
        verify_inclusion(&leaf, 77_777, n, &p, &r).unwrap();
        assert!(t.reads < 17 * 17, "{} reads", t.reads);
        assert!(matches!(
            root_of(&mut Stored::of(&leaves(3)), 5),
            Err(ProofError::Unavailable(_))
        ));
    }
}
