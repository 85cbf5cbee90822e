//! Offline verification of a node's exported log (`AuditBundle`): what
//! `antar audit verify` runs, needing only the bundle and the federation
//! root. Stops at the first failure and names it: which entry, which
//! checkpoint, which check.

use prost::Message as _;

use crate::checkpoint::{origin, verify_cosignature, Checkpoint as Note};
use crate::merkle::{self, Hash};
use crate::wire::{AuditBundle, EntryKind, LogEntry, SignedEnvelope, SignedReceipt};
use crate::{AgencyId, Verifier};

/// The first thing wrong with a bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The bundle as a whole: encoding, federation, agency, certificates.
    #[error("bundle: {0}")]
    Bundle(String),
    /// One log entry.
    #[error("entry {index}: {detail}")]
    Entry {
        /// Its index in the log (its position in a whole export).
        index: usize,
        /// What failed.
        detail: String,
    },
    /// One checkpoint.
    #[error("checkpoint {index} (size {size}): {detail}")]
    Checkpoint {
        /// Its position in the bundle (0: oldest).
        index: usize,
        /// The tree size it claims.
        size: u64,
        /// What failed.
        detail: String,
    },
    /// The consistency of two successive checkpoints.
    #[error("checkpoints {from} -> {to} (sizes {old_size} -> {new_size}): {detail}")]
    Consistency {
        /// The older checkpoint's position.
        from: usize,
        /// The newer checkpoint's position.
        to: usize,
        /// The older size.
        old_size: u64,
        /// The newer size.
        new_size: u64,
        /// What failed.
        detail: String,
    },
    /// The log does not extend an earlier view of it: entries were
    /// dropped, altered or reordered since.
    #[error("does not extend the earlier log of size {size} (root {root}): {detail}")]
    Earlier {
        /// The earlier log's size.
        size: u64,
        /// Its root, hex.
        root: String,
        /// What differs.
        detail: String,
    },
}

/// What a verified bundle holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The node whose log it is.
    pub agency: String,
    /// The log index of the bundle's first entry: 0 for a whole export.
    /// A bundle that starts later proves only that the log extends an
    /// earlier view of it of at least this many entries ([`Log::extends`]).
    pub first: u64,
    /// Entries, each signature and certificate checked.
    pub entries: usize,
    /// Envelopes among them.
    pub envelopes: usize,
    /// Receipts among them.
    pub receipts: usize,
    /// Checkpoints, each signed by the node and consistent with the one before.
    pub checkpoints: usize,
    /// Size and root of the newest checkpoint.
    pub latest: (u64, Hash),
    /// Cosignatures by peer nodes (witnesses), each checked.
    pub cosignatures: usize,
}

fn bundle_err(s: impl Into<String>) -> AuditError {
    AuditError::Bundle(s.into())
}

/// Verifies an exported bundle against `verifier`'s federation root. A
/// bundle exported from an earlier size on (`first_index` > 0) is refused:
/// it proves something only against an earlier view of the log
/// ([`verify_bundle_extending`]).
///
/// # Errors
/// The first [`AuditError`] found.
pub fn verify_bundle(bytes: &[u8], verifier: &Verifier) -> Result<Verified, AuditError> {
    verify_bundle_extending(bytes, verifier, &[])
}

/// Verifies an exported bundle as [`verify_bundle`] does, and that its log
/// extends each `earlier` view of the same log ([`Log::extends`]).
///
/// # Errors
/// The first [`AuditError`] found; [`AuditError::Earlier`] for an earlier
/// view the log does not extend.
pub fn verify_bundle_extending(
    bytes: &[u8],
    verifier: &Verifier,
    earlier: &[(u64, Hash)],
) -> Result<Verified, AuditError> {
    let log = verify_log(bytes, verifier)?;
    for &view in earlier {
        log.extends(view)?;
    }
    // A view before its first entry failed above: any left reach it.
    let first = log.verified.first;
    if first > 0 && earlier.is_empty() {
        return Err(bundle_err(format!(
            "starts at entry {first}: the roots it stands on for the entries before are only the node's word until an earlier view of {first} entries or more vouches for them"
        )));
    }
    Ok(log.verified)
}

/// A verified bundle's log: what [`verify_bundle`] answers, and the leaf
/// hashes of its entries, to check earlier views of it against.
#[derive(Debug, Clone)]
pub struct Log {
    /// What the bundle holds.
    pub verified: Verified,
    /// The tree of the entries before the bundle's first, as its
    /// `AuditBundle.prefix` gives it.
    start: merkle::Frontier,
    leaves: Vec<Hash>,
}

impl Log {
    /// Checks that this log extends an earlier view of it: the newest size
    /// and root of an earlier export's verification ([`Verified::latest`]).
    /// The root of this log's first `size` entries must be that root, so
    /// every entry the earlier view held is still there, unchanged and in
    /// its place.
    ///
    /// # Errors
    /// [`AuditError::Earlier`], saying whether entries are missing or the
    /// history differs.
    pub fn extends(&self, (size, root): (u64, Hash)) -> Result<(), AuditError> {
        let err = |detail: String| AuditError::Earlier {
            size,
            root: hex::encode(root),
            detail,
        };
        let (first, end) = (
            self.verified.first,
            self.verified.first + self.leaves.len() as u64,
        );
        if size > end {
            return Err(err(format!(
                "this log holds {end} entries, fewer than the earlier {size}: entries were dropped since"
            )));
        }
        if size < first {
            return Err(err(format!(
                "this bundle starts at entry {first}, after the earlier view's end: export the log from entry {size} or before to check it"
            )));
        }
        let now = root_at(&self.start, &self.leaves, size);
        if now != root {
            return Err(err(format!(
                "the root of this log's first {size} entries is {}: entries were dropped, altered or reordered since (or that root is not of this node's log)",
                hex::encode(now)
            )));
        }
        Ok(())
    }
}

/// Verifies an exported bundle as [`verify_bundle`] does, keeping what
/// [`Log::extends`] needs, but takes a bundle exported from an earlier
/// size on as it is: the caller must then check it extends a view of
/// [`Verified::first`] entries or more, which alone vouches for the roots
/// it stands on (`prefix`).
///
/// # Errors
/// The first [`AuditError`] found.
pub fn verify_log(bytes: &[u8], verifier: &Verifier) -> Result<Log, AuditError> {
    let bundle = AuditBundle::decode(bytes)
        .map_err(|e| bundle_err(format!("does not decode as an AuditBundle: {e}")))?;
    if bundle.encode_to_vec() != bytes {
        return Err(bundle_err(
            "is not the exact encoding the node wrote (bytes altered, added or cut)",
        ));
    }
    let federation = verifier.anchor().federation();
    if bundle.federation != federation {
        return Err(bundle_err(format!(
            "is from federation {:?}, the root given is {federation:?}",
            bundle.federation
        )));
    }
    if bundle.root_ca != verifier.anchor().root_der() {
        return Err(bundle_err("names a federation root other than the one given"));
    }
    let agency = AgencyId::parse(&bundle.agency).map_err(|e| bundle_err(format!("agency: {e}")))?;

    // The node's checkpoint key: a signing certificate of this agency's node.
    let mut keys = Vec::new();
    for (i, der) in bundle.certificates.iter().enumerate() {
        let (identity, key) = verifier
            .node_signing_key(der)
            .map_err(|e| bundle_err(format!("certificate {i}: {e}")))?;
        if identity.agency != agency {
            return Err(bundle_err(format!(
                "certificate {i} belongs to {}, not {agency}",
                identity.agency
            )));
        }
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(bundle_err("holds no signing certificate of the node"));
    }

    // A bundle from entry `first` on stands on the roots of the subtrees
    // before it, which only an earlier view can vouch for.
    let first = bundle.first_index;
    if first.checked_add(bundle.entries.len() as u64).is_none() {
        return Err(bundle_err(format!(
            "starts at entry {first}, too large for its {} entries",
            bundle.entries.len()
        )));
    }
    let prefix = bundle
        .prefix
        .iter()
        .map(|h| Hash::try_from(&h[..]))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bundle_err("a prefix hash is not 32 bytes"))?;
    let start = merkle::Frontier::new(&prefix, first).map_err(|_| {
        bundle_err(format!(
            "starts at entry {first} with {} prefix hashes, where {} cover the entries before",
            prefix.len(),
            first.count_ones()
        ))
    })?;
    let (mut envelopes, mut receipts) = (0, 0);
    let mut leaves = Vec::with_capacity(bundle.entries.len());
    for (i, raw) in bundle.entries.iter().enumerate() {
        let at = first + i as u64;
        let entry_err = |detail: String| AuditError::Entry {
            index: at as usize,
            detail,
        };
        let entry = LogEntry::decode(&raw[..])
            .map_err(|e| entry_err(format!("does not decode as a LogEntry: {e}")))?;
        if entry.index != at {
            return Err(entry_err(format!(
                "says it is entry {}: entries were dropped, inserted or reordered",
                entry.index
            )));
        }
        let message_id = match EntryKind::try_from(entry.kind) {
            Ok(EntryKind::Envelope) => {
                let signed = SignedEnvelope::decode(&entry.data[..])
                    .map_err(|e| entry_err(format!("envelope does not decode: {e}")))?;
                envelopes += 1;
                verifier
                    .verify_envelope(&signed)
                    .map_err(|e| entry_err(format!("envelope check failed: {e}")))?
                    .id
            }
            Ok(EntryKind::Receipt) => {
                let signed = SignedReceipt::decode(&entry.data[..])
                    .map_err(|e| entry_err(format!("receipt does not decode: {e}")))?;
                receipts += 1;
                verifier
                    .verify_receipt(&signed)
                    .map_err(|e| entry_err(format!("receipt check failed: {e}")))?
                    .message_id
            }
            _ => return Err(entry_err(format!("unknown kind {}", entry.kind))),
        };
        if message_id.to_string() != entry.message_id {
            return Err(entry_err(format!(
                "is indexed under message {} but signs message {message_id}",
                entry.message_id
            )));
        }
        leaves.push(merkle::leaf_hash(raw));
    }

    // The root at every checkpoint's size, in one pass over the entries: a
    // root from scratch for each would cost entries × checkpoints.
    let end = first + leaves.len() as u64;
    let mut sizes: Vec<u64> = bundle
        .checkpoints
        .iter()
        .map(|c| c.tree_size)
        .filter(|s| (first..=end).contains(s))
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mut grown = start.clone();
    let mut roots = std::collections::HashMap::with_capacity(sizes.len());
    for size in sizes {
        grown.extend(&leaves[(grown.size() - first) as usize..(size - first) as usize]);
        roots.insert(size, grown.root());
    }

    let want_origin = origin(federation, agency.as_str());
    let mut previous: Option<(usize, u64, Hash)> = None;
    let mut cosignatures = 0;
    for (k, c) in bundle.checkpoints.iter().enumerate() {
        let cp_err = |detail: String| AuditError::Checkpoint {
            index: k,
            size: c.tree_size,
            detail,
        };
        let note = keys
            .iter()
            .find_map(|key| Note::verify(&c.note, key).ok())
            .ok_or_else(|| {
                let why = keys
                    .first()
                    .map(|key| {
                        Note::verify(&c.note, key)
                            .err()
                            .map(|e| e.to_string())
                            .unwrap_or_default()
                    })
                    .unwrap_or_default();
                cp_err(format!("signed note does not verify with the node's key: {why}"))
            })?;
        if note.origin != want_origin {
            return Err(cp_err(format!(
                "origin {:?}, expected {want_origin:?}",
                note.origin
            )));
        }
        if note.size != c.tree_size || note.root.as_slice() != &c.root_hash[..] {
            return Err(cp_err(
                "tree_size or root_hash differ from the signed note".into(),
            ));
        }
        for (j, cosig) in c.cosignatures.iter().enumerate() {
            // A witness vouches for another node's log, once: a node's
            // own cosignature, or one witness counted twice, would make
            // the log look more witnessed than it is.
            if cosig.witness == agency.as_str() {
                return Err(cp_err(format!(
                    "cosignature {j} is by {agency}, the log's own node: a node cannot witness its own log"
                )));
            }
            if c.cosignatures[..j].iter().any(|o| o.witness == cosig.witness) {
                return Err(cp_err(format!(
                    "cosignature {j} repeats witness {}",
                    cosig.witness
                )));
            }
            let (witness, key) = verifier
                .node_signing_key(&cosig.cert)
                .map_err(|e| cp_err(format!("cosignature {j} ({}): certificate: {e}", cosig.witness)))?;
            if witness.agency.as_str() != cosig.witness {
                return Err(cp_err(format!(
                    "cosignature {j} claims witness {} but its certificate is {}'s",
                    cosig.witness, witness.agency
                )));
            }
            verify_cosignature(&cosig.line, &note, &origin(federation, &cosig.witness), &key)
                .map_err(|e| cp_err(format!("cosignature {j} by {}: {e}", cosig.witness)))?;
            cosignatures += 1;
        }
        let size = note.size;
        if size > end {
            return Err(cp_err(format!("covers {size} entries, the bundle has {end}")));
        }
        if size < first {
            return Err(cp_err(format!(
                "covers {size} entries, before the bundle's first entry {first}"
            )));
        }
        if roots.get(&size) != Some(&note.root) {
            return Err(cp_err(format!(
                "root does not match entries 0..{size}: the log was rewritten or the checkpoint comes from another history"
            )));
        }
        if let Some((from, old_size, old_root)) = previous {
            let cons_err = |detail: String| AuditError::Consistency {
                from,
                to: k,
                old_size,
                new_size: note.size,
                detail,
            };
            let proof = bundle
                .consistency
                .get(from)
                .ok_or_else(|| cons_err("no consistency proof".into()))?;
            let path = proof
                .path
                .iter()
                .map(|h| Hash::try_from(&h[..]))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| cons_err("a proof hash is not 32 bytes".into()))?;
            merkle::verify_consistency(old_size, note.size, &path, &old_root, &note.root)
                .map_err(|e| cons_err(e.to_string()))?;
        }
        previous = Some((k, note.size, note.root));
    }
    let Some((_, size, root)) = previous else {
        return Err(bundle_err("holds no checkpoint"));
    };
    if bundle.consistency.len() + 1 != bundle.checkpoints.len() {
        return Err(bundle_err(
            "the number of consistency proofs does not match the checkpoints",
        ));
    }
    if size != end {
        return Err(bundle_err(format!(
            "{} entries are not covered by the newest checkpoint (size {size})",
            end - size.min(end)
        )));
    }
    let verified = Verified {
        agency: agency.to_string(),
        first,
        entries: leaves.len(),
        envelopes,
        receipts,
        checkpoints: bundle.checkpoints.len(),
        latest: (size, root),
        cosignatures,
    };
    Ok(Log {
        verified,
        start,
        leaves,
    })
}

/// The root of the log's first `size` entries, from the tree of those
/// before the bundle (`start`) and the hashes of the bundle's entries
/// (`start.size() <= size <= start.size() + leaves.len()`).
fn root_at(start: &merkle::Frontier, leaves: &[Hash], size: u64) -> Hash {
    let mut tree = start.clone();
    tree.extend(&leaves[..(size - start.size()) as usize]);
    tree.root()
}
