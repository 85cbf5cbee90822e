//! Witnessing (DESIGN.md §7): each node sends its newest checkpoint to its
//! peers; a peer checks it is consistent with the last checkpoint it saw
//! from that node and cosigns it (C2SP `tlog-cosignature/v1`). A checkpoint
//! inconsistent with one already witnessed is a split view: flagged in the
//! metrics, the log and Admin status. Witnessing never blocks traffic.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::bytes::Bytes;
use prost::Message as _;

use antar_core::checkpoint::{cosign, origin, verify_cosignature, Checkpoint as Note};
use antar_core::merkle::{self, Hash};
use antar_core::wire::peer_client::PeerClient;
use antar_core::wire::{Checkpoint, Cosignature, WitnessRequest, WitnessResponse};
use antar_core::Identity;

use crate::error::NodeError;
use crate::state::Shared;

/// Metadata keys: the newest checkpoint witnessed per agency, the size last
/// cosigned per peer, split views found per agency, and what an
/// administrator cleared (per agency and time).
const SEEN: &[u8] = b"seen\0";
const COSIGNED: &[u8] = b"wit\0";
const SPLIT: &[u8] = b"split\0";
const CLEARED: &[u8] = b"cleared\0";

fn key(prefix: &[u8], agency: &str) -> Vec<u8> {
    [prefix, agency.as_bytes()].concat()
}

/// Agencies caught presenting a split view, with what was found.
pub(crate) fn split_views(shared: &Shared) -> Vec<(String, String)> {
    shared
        .store
        .audit_meta_prefix(SPLIT)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(&k[SPLIT.len()..]).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            )
        })
        .collect()
}

fn hashes(path: &[Bytes]) -> Result<Vec<Hash>, NodeError> {
    path.iter()
        .map(|h| Hash::try_from(&h[..]).map_err(|_| NodeError::invalid("proof", "hashes are 32 bytes")))
        .collect()
}

/// The size and root of the checkpoint of `agency` witnessed last, as its
/// note signs them (verified when it was witnessed): never the copy kept
/// beside the note, which a build from before this check kept as the
/// request said it. One that does not read is the store's failure, never
/// "none seen" (which would let the next checkpoint through unchecked).
fn seen_checkpoint(agency: &str, stored: &[u8]) -> Result<(u64, Hash), NodeError> {
    let corrupt = |detail: String| {
        NodeError::Store(antar_store::StoreError::Corrupt {
            tree: "audit_meta",
            detail: format!("the checkpoint of {agency} witnessed last: {detail}"),
        })
    };
    let cp = Checkpoint::decode(stored).map_err(|e| corrupt(e.to_string()))?;
    let note = Note::read(&cp.note).map_err(|e| corrupt(e.to_string()))?;
    Ok((note.size, note.root))
}

/// The size and root of `agency`'s checkpoint witnessed last, if any.
fn last_seen(shared: &Shared, agency: &str) -> Result<Option<(u64, Hash)>, NodeError> {
    match shared.store.audit_meta(&key(SEEN, agency))? {
        Some(b) => Ok(Some(seen_checkpoint(agency, &b)?)),
        None => Ok(None),
    }
}

/// The lock of `agency`'s witness state ([`Shared::witnessed`]).
async fn lock_of(shared: &Shared, agency: &str) -> tokio::sync::OwnedMutexGuard<()> {
    let lock = crate::state::lock(&shared.witnessed)
        .entry(agency.to_owned())
        .or_default()
        .clone();
    lock.lock_owned().await
}

/// What `Admin.ClearSplitView` forgot.
pub(crate) struct Cleared {
    /// What the witness had found.
    pub(crate) found: String,
    /// The checkpoint witnessed last: its size and root, and its signed
    /// note, as the peer sent it.
    pub(crate) forgotten: Option<(u64, Hash, String)>,
}

/// Forgets the split view of `agency`'s log flagged here and the
/// checkpoint of it witnessed last, at the word of the administrator `by`:
/// its next checkpoint is taken as it is. In the same synced batch, what
/// they held is recorded under `cleared\0<agency>\0<ms>` (what was found,
/// the signed note witnessed last, who cleared them), so the evidence
/// stays in the store.
pub(crate) async fn clear_split_view(
    shared: &Shared,
    agency: &str,
    by: &impl std::fmt::Display,
) -> Result<Cleared, NodeError> {
    let flagged = || -> Result<Vec<u8>, NodeError> {
        shared.store.audit_meta(&key(SPLIT, agency))?.ok_or_else(|| {
            NodeError::NotFound(format!("no split view of {agency}'s log is flagged on this node"))
        })
    };
    // Asked first outside the lock, so a name never flagged adds no lock.
    flagged()?;
    let _alone = lock_of(shared, agency).await;
    let found = String::from_utf8_lossy(&flagged()?).into_owned();
    // A checkpoint kept that does not read is cleared too (that is what
    // this is for), its bytes kept in the record.
    let seen = shared.store.audit_meta(&key(SEEN, agency))?;
    let forgotten = seen.as_deref().map(|b| match seen_checkpoint(agency, b) {
        Ok((size, root)) => {
            let note = Checkpoint::decode(b).map(|c| c.note).unwrap_or_default();
            (size, root, note)
        }
        Err(e) => {
            tracing::warn!(log = agency, error = %e, "the checkpoint witnessed last does not read");
            let note = format!(
                "(a record that does not read: {e}; its bytes: {})",
                hex::encode(b)
            );
            (0, [0; 32], note)
        }
    });
    let (size, root, note) = forgotten.as_ref().map_or((0, String::new(), ""), |(s, r, n)| {
        (*s, hex::encode(r), n.as_str())
    });
    // Said before it is done: a crash between the two leaves this line.
    tracing::warn!(
        log = agency,
        by = %by,
        %found,
        forgotten_size = size,
        forgotten_root = %root,
        forgotten_note = %note,
        "clearing a split view at an administrator's word: the next checkpoint of this log is taken as it is"
    );
    let mut at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let record = format!("cleared by {by}\nfound: {found}\nwitnessed last:\n{note}");
    let cleared_at = |at: u64| [key(CLEARED, agency), vec![0], at.to_be_bytes().to_vec()].concat();
    // Never over an earlier record (a clock stepped back): the next free
    // millisecond, past at most as many as this agency has records.
    while shared.store.audit_meta(&cleared_at(at))?.is_some() {
        at += 1;
    }
    let cleared = cleared_at(at);
    let (split, seen) = (key(SPLIT, agency), key(SEEN, agency));
    shared
        .store
        .update_audit_meta(&[(&cleared, Some(record.as_bytes())), (&split, None), (&seen, None)])
        .await?;
    Ok(Cleared { found, forgotten })
}

/// Serves `Peer.Witness` for the node `from`.
pub(crate) async fn serve(
    shared: &Shared,
    from: &Identity,
    r: WitnessRequest,
) -> Result<WitnessResponse, NodeError> {
    let cp = r
        .checkpoint
        .ok_or_else(|| NodeError::invalid("checkpoint", "missing"))?;
    let (signer, public_key) = shared
        .verifier
        .node_signing_key(&r.signer_cert)
        .map_err(|e| NodeError::invalid("signer_cert", e))?;
    if signer.agency != from.agency {
        return Err(NodeError::PermissionDenied(format!(
            "{} may only ask to witness its own log, not {}'s",
            from.agency, signer.agency
        )));
    }
    let note = Note::verify(&cp.note, &public_key).map_err(|e| NodeError::invalid("checkpoint.note", e))?;
    let agency = from.agency.as_str();
    if note.origin != origin(&shared.config.federation, agency) {
        return Err(NodeError::invalid(
            "checkpoint.note",
            format!("origin {:?}", note.origin),
        ));
    }
    // What is decided and kept below comes from the signed note, never
    // from the request's unsigned copy of it: a node that signed size 100
    // but said 0 beside it would otherwise have its next checkpoint, any
    // fork, checked against nothing.
    if cp.tree_size != note.size || &cp.root_hash[..] != note.root.as_slice() {
        return Err(NodeError::invalid(
            "checkpoint",
            format!(
                "tree_size {} and root_hash {} are not the size {} and root {} its note signs",
                cp.tree_size,
                hex::encode(&cp.root_hash),
                note.size,
                hex::encode(note.root)
            ),
        ));
    }
    let _alone = lock_of(shared, agency).await;
    let seen = last_seen(shared, agency)?;
    let known = seen.as_ref().map_or(0, |(size, _)| *size);
    if r.old_size != known {
        return Ok(WitnessResponse {
            cosignature: String::new(),
            known_size: known,
            witness_cert: shared.signer.cert_bytes(),
        });
    }
    if let Some((_, old_root)) = seen {
        let consistent =
            merkle::verify_consistency(known, note.size, &hashes(&r.proof)?, &old_root, &note.root);
        if let Err(e) = consistent {
            let what = format!(
                "checkpoint size {} root {} is not consistent with size {known} root {} witnessed before ({e})",
                note.size,
                hex::encode(note.root),
                hex::encode(old_root)
            );
            tracing::error!(log = agency, %what, "SPLIT VIEW: a peer's log was rewritten or forked");
            // The first finding is kept: later ones say the same of later
            // checkpoints.
            if shared.store.audit_meta(&key(SPLIT, agency))?.is_none() {
                shared
                    .store
                    .put_audit_meta(&key(SPLIT, agency), what.as_bytes())
                    .await?;
            }
            return Err(NodeError::FailedPrecondition(format!(
                "split view of {agency}'s log: {what}"
            )));
        }
    }
    // A checkpoint asked for again (its cosignature lost on the way back)
    // is witnessed already: nothing to write, nor to wait for.
    if seen != Some((note.size, note.root)) {
        let witnessed = Checkpoint {
            note: cp.note.clone(),
            tree_size: note.size,
            root_hash: Bytes::copy_from_slice(&note.root),
            cosignatures: Vec::new(),
            signer_cert: Bytes::new(),
        };
        shared
            .store
            .put_audit_meta(&key(SEEN, agency), &witnessed.encode_to_vec())
            .await?;
    } else {
        // Written before, though maybe not synced yet if that flush failed.
        shared.store.durable().await?;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let line = cosign(
        &note,
        &origin(&shared.config.federation, shared.agency.as_str()),
        &shared.signer,
        now,
    );
    tracing::debug!(log = agency, size = note.size, "witnessed a checkpoint");
    Ok(WitnessResponse {
        cosignature: line,
        known_size: note.size,
        witness_cert: shared.signer.cert_bytes(),
    })
}

/// Asks every peer that has not cosigned `cp` yet to witness it; stores the
/// cosignatures with the checkpoint and returns it. Failures are logged,
/// never fatal.
pub(crate) async fn request_all(shared: &Shared, mut cp: Checkpoint) -> Checkpoint {
    let peers: Vec<(String, String)> = shared
        .policy()
        .peers()
        .map(|(a, b)| (a.clone(), b.clone()))
        .collect();
    let mut changed = false;
    for (peer, addr) in peers {
        if cp.cosignatures.iter().any(|c| c.witness == peer) {
            continue;
        }
        match tokio::time::timeout(Duration::from_secs(5), request(shared, &peer, &addr, &cp)).await {
            Ok(Ok(c)) => {
                cp.cosignatures.push(c);
                changed = true;
            }
            Ok(Err(e)) => tracing::warn!(%peer, error = %e, "checkpoint not witnessed"),
            Err(_) => tracing::warn!(%peer, "checkpoint not witnessed: timed out"),
        }
    }
    if changed {
        // What is stored may have changed while the peers were asked (signed
        // again with a renewed key, over the same size and root): keep it,
        // with the cosignatures gathered here added, which cover the same
        // text.
        let _alone = shared.checkpoints.lock().await;
        if let Ok(Some(stored)) = crate::audit::latest_stored(shared) {
            if stored.tree_size == cp.tree_size && stored.root_hash == cp.root_hash {
                let gathered = std::mem::replace(&mut cp, stored).cosignatures;
                for c in gathered {
                    if !cp.cosignatures.iter().any(|s| s.witness == c.witness) {
                        cp.cosignatures.push(c);
                    }
                }
            }
        }
        if let Err(e) = shared
            .store
            .put_checkpoint(cp.tree_size, &cp.encode_to_vec())
            .await
        {
            tracing::error!(error = %e, "cannot store cosignatures");
        }
    }
    cp
}

async fn request(shared: &Shared, peer: &str, addr: &str, cp: &Checkpoint) -> Result<Cosignature, String> {
    let channel = crate::net::peer_channel(shared, peer, addr)?;
    let mut client = PeerClient::new(channel);
    let size = cp.tree_size;
    let mut old = shared
        .store
        .audit_meta(&key(COSIGNED, peer))
        .map_err(|e| e.to_string())?
        .map_or(0, |v| u64::from_be_bytes(v.try_into().unwrap_or_default()));
    // At most twice: once with what we believe the witness holds, once with what it says it holds.
    for _ in 0..2 {
        let proof = if old == 0 || old >= size {
            Vec::new()
        } else {
            let mut tree = shared.store.audit_tree(size).map_err(|e| e.to_string())?;
            let path = merkle::consistency_proof_of(&mut tree, old, size).map_err(|e| e.to_string())?;
            crate::audit::proof_hashes(path)
        };
        let resp = client
            .witness(WitnessRequest {
                checkpoint: Some(Checkpoint {
                    cosignatures: Vec::new(),
                    ..cp.clone()
                }),
                signer_cert: shared.signer.cert_bytes(),
                old_size: old,
                proof,
            })
            .await
            .map_err(|s| crate::status_chain(&s))?
            .into_inner();
        if resp.cosignature.is_empty() {
            old = resp.known_size;
            continue;
        }
        let note = Note {
            origin: origin(&shared.config.federation, shared.agency.as_str()),
            size,
            root: Hash::try_from(&cp.root_hash[..]).unwrap_or_default(),
        };
        let (witness, witness_key) = shared
            .verifier
            .node_signing_key(&resp.witness_cert)
            .map_err(|e| format!("witness certificate: {e}"))?;
        if witness.agency.as_str() != peer {
            return Err(format!(
                "the cosignature is {}'s, not {peer}'s: not recorded",
                witness.agency
            ));
        }
        verify_cosignature(
            &resp.cosignature,
            &note,
            &origin(&shared.config.federation, witness.agency.as_str()),
            &witness_key,
        )
        .map_err(|e| format!("cosignature: {e}"))?;
        shared
            .store
            .put_audit_meta(&key(COSIGNED, peer), &size.to_be_bytes())
            .await
            .map_err(|e| e.to_string())?;
        return Ok(Cosignature {
            witness: witness.agency.to_string(),
            line: resp.cosignature,
            cert: resp.witness_cert,
        });
    }
    Err(format!(
        "{peer} holds a checkpoint of size {old} this node cannot prove consistency from"
    ))
}
