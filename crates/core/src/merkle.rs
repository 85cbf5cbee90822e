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

/// The largest power of two smaller than `n` (n >= 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// MTH over leaf hashes: the root of a tree of `leaves.len()` entries.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => sha256(b""),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The inclusion proof of leaf `index` in the tree of `leaves` (PATH).
///
/// # Errors
/// [`ProofError::OutOfRange`] when `index` is not in the tree.
pub fn inclusion_proof(index: usize, leaves: &[Hash]) -> Result<Vec<Hash>, ProofError> {
    if index >= leaves.len() {
        return Err(ProofError::OutOfRange(format!(
            "leaf {index} of a tree of {}",
            leaves.len()
        )));
    }
    let mut path = Vec::new();
    path_into(index, leaves, &mut path);
    Ok(path)
}

fn path_into(m: usize, d: &[Hash], out: &mut Vec<Hash>) {
    if d.len() <= 1 {
        return;
    }
    let k = split(d.len());
    if m < k {
        path_into(m, &d[..k], out);
        out.push(root(&d[k..]));
    } else {
        path_into(m - k, &d[k..], out);
        out.push(root(&d[..k]));
    }
}

/// The consistency proof between the first `old_size` leaves and all of
/// `leaves` (PROOF).
///
/// # Errors
/// [`ProofError::OutOfRange`] unless `0 < old_size <= leaves.len()`.
pub fn consistency_proof(old_size: usize, leaves: &[Hash]) -> Result<Vec<Hash>, ProofError> {
    if old_size == 0 || old_size > leaves.len() {
        return Err(ProofError::OutOfRange(format!(
            "old size {old_size} against a tree of {}",
            leaves.len()
        )));
    }
    let mut out = Vec::new();
    subproof(old_size, leaves, true, &mut out);
    Ok(out)
}

fn subproof(m: usize, d: &[Hash], complete: bool, out: &mut Vec<Hash>) {
    let n = d.len();
    if m == n {
        if !complete {
            out.push(root(d));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(m, &d[..k], complete, out);
        out.push(root(&d[k..]));
    } else {
        subproof(m - k, &d[k..], false, out);
        out.push(root(&d[..k]));
    }
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
}
