//! `antar.v1.Audit` (auditor certificates only): the node's Merkle log —
//! queries, signed checkpoints, inclusion and consistency proofs, and a
//! self-contained export that `antar audit verify` checks without the node.

use std::pin::Pin;
use std::sync::Arc;

use prost::bytes::Bytes;
use prost::Message as _;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use antar_core::checkpoint::{origin, Checkpoint as Note};
use antar_core::merkle;
use antar_core::time::from_timestamp;
use antar_core::wire::audit_server::Audit;
use antar_core::wire::{
    AuditBundle, Checkpoint, ConsistencyProofRequest, ConsistencyProofResponse, EntryKind, Envelope,
    ExportChunk, ExportRequest, InclusionProofRequest, InclusionProofResponse, LatestCheckpointRequest,
    LogEntry, MessageState, QueryRequest, Receipt, ReceiptStatus, SignedEnvelope, SignedReceipt,
};

use crate::auth;
use crate::error::NodeError;
use crate::state::Shared;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Entries a `Query` returns when it names no limit, and at most.
const QUERY_PAGE: usize = 1_000;
const QUERY_MAX: usize = 100_000;
/// Export stream chunk size.
const CHUNK: usize = 1 << 20;

pub(crate) struct AuditService {
    pub(crate) shared: Arc<Shared>,
}

/// The newest checkpoint; a new one is signed and stored first when the log
/// grew since the last, or when the last was signed with a key the node no
/// longer holds (its signing certificate was renewed): the newest
/// checkpoint always verifies with the certificate the node hands out.
pub(crate) async fn checkpoint_now(shared: &Shared) -> Result<Checkpoint, NodeError> {
    let _alone = shared.checkpoints.lock().await;
    // Recorded before any checkpoint it signs, and by the first one after
    // an upgrade, so that a later renewal cannot lose it.
    remember_signing_cert(shared).await?;
    let size = shared.store.audit_size()?;
    let last = latest_stored(shared)?.filter(|c| c.tree_size == size);
    let current = |c: &Checkpoint| Note::verify(&c.note, shared.signer.public_key()).is_ok();
    if let Some(c) = last.as_ref().filter(|c| current(c)) {
        return Ok(c.clone());
    }
    let root = merkle::root_of(&mut shared.store.audit_tree(size)?, size).map_err(proof_failure)?;
    let note = Note {
        origin: origin(&shared.config.federation, shared.agency.as_str()),
        size,
        root,
    }
    .sign(&shared.signer);
    let c = Checkpoint {
        note,
        tree_size: size,
        root_hash: Bytes::copy_from_slice(&root),
        // Signed again over the same size and root (a renewed key): the
        // witnesses' cosignatures cover the note's text, not the node's
        // signature, so they hold for this one too.
        cosignatures: last.map(|c| c.cosignatures).unwrap_or_default(),
        signer_cert: Bytes::new(),
    };
    shared.store.put_checkpoint(size, &c.encode_to_vec()).await?;
    tracing::debug!(size, "log checkpoint signed");
    Ok(c)
}

/// `audit_meta` keys of the signing certificates checkpoints were signed
/// with, `signer\0` ‖ SHA-256 of the DER: a renewed key leaves older
/// checkpoints signed with the old one, and an export must carry its
/// certificate for them to verify.
const SIGNING_CERT: &[u8] = b"signer\0";

/// Records the node's current signing certificate (once) before it signs a
/// checkpoint with it.
async fn remember_signing_cert(shared: &Shared) -> Result<(), NodeError> {
    let der = shared.signer.cert_der();
    let key = [SIGNING_CERT, &antar_core::envelope::sha256(der)[..]].concat();
    if shared.store.audit_meta(&key)?.is_none() {
        shared.store.put_audit_meta(&key, der).await?;
    }
    Ok(())
}

/// The certificates of every key this node signed checkpoints with: the
/// current one first, then those recorded before a renewal.
fn signing_certs(shared: &Shared) -> Result<Vec<Bytes>, NodeError> {
    let current = shared.signer.cert_der();
    let mut certs = vec![Bytes::copy_from_slice(current)];
    for (_, der) in shared.store.audit_meta_prefix(SIGNING_CERT)? {
        if der != current {
            certs.push(der.into());
        }
    }
    Ok(certs)
}

fn decode_checkpoint(bytes: &[u8]) -> Result<Checkpoint, NodeError> {
    Checkpoint::decode(bytes).map_err(|e| {
        NodeError::Store(antar_store::StoreError::Corrupt {
            tree: "audit_meta",
            detail: e.to_string(),
        })
    })
}

fn stored_checkpoints(shared: &Shared) -> Result<Vec<Checkpoint>, NodeError> {
    shared
        .store
        .checkpoints()?
        .iter()
        .map(|b| decode_checkpoint(b))
        .collect()
}

pub(crate) fn latest_stored(shared: &Shared) -> Result<Option<Checkpoint>, NodeError> {
    shared
        .store
        .latest_checkpoint()?
        .map(|b| decode_checkpoint(&b))
        .transpose()
}

/// Runs until shutdown: every `limits.checkpoint_interval_secs`, a checkpoint
/// when the log grew (or the newest is under a renewed key, `checkpoint_now`).
pub(crate) async fn checkpointer(shared: Arc<Shared>, token: tokio_util::sync::CancellationToken) {
    let every = std::time::Duration::from_secs(shared.limits().checkpoint_interval_secs.max(1));
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        purge_payloads(&shared).await;
        match checkpoint_now(&shared).await {
            Ok(cp) => {
                let cp = crate::witness::request_all(&shared, cp).await;
                shared.metrics.checkpoint_signed(&cp);
            }
            Err(e) => tracing::error!(error = %e, "log checkpoint failed"),
        }
    }
}

/// Retention: drops the payloads of finished messages older than
/// `limits.payload_retention_secs`. The log holds no payload, so every
/// signature and proof stays verifiable.
async fn purge_payloads(shared: &Shared) {
    let secs = shared.limits().payload_retention_secs;
    if secs == 0 {
        return;
    }
    let Some(cutoff) = std::time::SystemTime::now().checked_sub(std::time::Duration::from_secs(secs)) else {
        return;
    };
    let finished = [
        MessageState::Processed,
        MessageState::Rejected,
        MessageState::Expired,
    ]
    .map(|s| s as i32);
    let purged = shared
        .store
        .purge_payloads(|r| {
            let created = r
                .envelope
                .as_ref()
                .and_then(|s| Envelope::decode(&s.envelope[..]).ok())
                .and_then(|e| e.created_at)
                .map(|t| from_timestamp(&t));
            finished.contains(&r.state) && created.is_some_and(|c| c < cutoff)
        })
        .await;
    match purged {
        Ok(0) => {}
        Ok(n) => {
            shared.metrics.payloads_purged.inc_by(n);
            tracing::info!(purged = n, "payloads past their retention deleted");
        }
        Err(e) => tracing::error!(error = %e, "payload retention purge failed"),
    }
}

/// What an entry is about, for query filters.
struct About {
    agencies: Vec<String>,
    status: Option<i32>,
    kind: Option<i32>,
}

fn about(entry: &LogEntry) -> About {
    match EntryKind::try_from(entry.kind) {
        Ok(EntryKind::Envelope) => {
            let e = SignedEnvelope::decode(&entry.data[..])
                .ok()
                .and_then(|s| Envelope::decode(&s.envelope[..]).ok())
                .unwrap_or_default();
            About {
                agencies: vec![e.sender, e.recipient],
                status: None,
                kind: Some(e.kind),
            }
        }
        _ => {
            let r = SignedReceipt::decode(&entry.data[..])
                .ok()
                .and_then(|s| Receipt::decode(&s.receipt[..]).ok())
                .unwrap_or_default();
            About {
                agencies: vec![r.sender, r.recipient, r.issuer],
                status: Some(r.status),
                kind: None,
            }
        }
    }
}

fn matches(q: &QueryRequest, entry: &LogEntry) -> bool {
    if !q.message_id.is_empty() && entry.message_id != q.message_id {
        return false;
    }
    let at = entry.logged_at.as_ref().map(from_timestamp);
    let before = |t: &antar_proto::prost_types::Timestamp| at.is_some_and(|a| a < from_timestamp(t));
    if q.from.as_ref().is_some_and(before) {
        return false;
    }
    let after = |t: &antar_proto::prost_types::Timestamp| at.is_some_and(|a| a > from_timestamp(t));
    if q.until.as_ref().is_some_and(after) {
        return false;
    }
    if q.agency.is_empty() && q.status == 0 && q.kind == 0 {
        return true;
    }
    let a = about(entry);
    (q.agency.is_empty() || a.agencies.contains(&q.agency))
        && (q.status == ReceiptStatus::Unspecified as i32 || a.status == Some(q.status))
        && (q.kind == 0 || a.kind == Some(q.kind))
}

/// A Merkle proof's hashes as message fields (audit proofs, a witness request).
pub(crate) fn proof_hashes(path: Vec<merkle::Hash>) -> Vec<Bytes> {
    path.into_iter().map(|h| Bytes::copy_from_slice(&h)).collect()
}

/// A proof the caller asked for that cannot exist names its size; a
/// subtree the store cannot read is the node's failure.
fn proof_err(e: merkle::ProofError) -> NodeError {
    match e {
        merkle::ProofError::Unavailable(_) => proof_failure(e),
        e => NodeError::invalid("tree_size", e),
    }
}

fn proof_failure(e: merkle::ProofError) -> NodeError {
    NodeError::Store(antar_store::StoreError::Corrupt {
        tree: "audit_node",
        detail: e.to_string(),
    })
}

#[tonic::async_trait]
impl Audit for AuditService {
    type QueryStream = BoxStream<LogEntry>;

    async fn query(&self, req: Request<QueryRequest>) -> Result<Response<Self::QueryStream>, Status> {
        auth::auditor(&self.shared, &req)?;
        let q = req.into_inner();
        let limit = match q.limit as usize {
            0 => QUERY_PAGE,
            n => n.min(QUERY_MAX),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let shared = self.shared.clone();
        crate::spawn_feed("Audit.Query", tx, |tx| async move {
            let mut next = q.after_index;
            let mut sent = 0;
            loop {
                let page = match shared.store.audit_entries(next, 512) {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(NodeError::from(e).into())).await;
                        return;
                    }
                };
                if page.is_empty() {
                    return;
                }
                for (index, bytes) in page {
                    next = index + 1;
                    let Ok(entry) = LogEntry::decode(bytes.as_slice()) else {
                        continue;
                    };
                    if matches(&q, &entry) {
                        if tx.send(Ok(entry)).await.is_err() {
                            return;
                        }
                        sent += 1;
                        if sent >= limit {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn latest_checkpoint(
        &self,
        req: Request<LatestCheckpointRequest>,
    ) -> Result<Response<Checkpoint>, Status> {
        auth::auditor(&self.shared, &req)?;
        let mut checkpoint = checkpoint_now(&self.shared).await?;
        checkpoint.signer_cert = self.shared.signer.cert_bytes();
        Ok(Response::new(checkpoint))
    }

    async fn inclusion_proof(
        &self,
        req: Request<InclusionProofRequest>,
    ) -> Result<Response<InclusionProofResponse>, Status> {
        auth::auditor(&self.shared, &req)?;
        let r = req.into_inner();
        let size = self.shared.store.audit_size().map_err(NodeError::from)?;
        if r.tree_size == 0 || r.tree_size > size {
            return Err(NodeError::invalid("tree_size", format!("must be 1..={size}")).into());
        }
        let mut tree = self
            .shared
            .store
            .audit_tree(r.tree_size)
            .map_err(NodeError::from)?;
        let path = merkle::inclusion_proof_of(&mut tree, r.index, r.tree_size).map_err(|e| match e {
            merkle::ProofError::OutOfRange(_) => NodeError::invalid("index", e),
            e => proof_failure(e),
        })?;
        Ok(Response::new(InclusionProofResponse {
            path: proof_hashes(path),
        }))
    }

    async fn consistency_proof(
        &self,
        req: Request<ConsistencyProofRequest>,
    ) -> Result<Response<ConsistencyProofResponse>, Status> {
        auth::auditor(&self.shared, &req)?;
        let r = req.into_inner();
        let size = self.shared.store.audit_size().map_err(NodeError::from)?;
        if r.new_size == 0 || r.new_size > size {
            return Err(NodeError::invalid("new_size", format!("must be 1..={size}, the log's size")).into());
        }
        if r.old_size == 0 || r.old_size > r.new_size {
            let new_size = r.new_size;
            return Err(
                NodeError::invalid("old_size", format!("must be 1..={new_size}, the new_size")).into(),
            );
        }
        let mut tree = self
            .shared
            .store
            .audit_tree(r.new_size)
            .map_err(NodeError::from)?;
        let path = merkle::consistency_proof_of(&mut tree, r.old_size, r.new_size).map_err(proof_err)?;
        Ok(Response::new(ConsistencyProofResponse {
            path: proof_hashes(path),
        }))
    }

    type ExportStream = BoxStream<ExportChunk>;

    async fn export(&self, req: Request<ExportRequest>) -> Result<Response<Self::ExportStream>, Status> {
        auth::auditor(&self.shared, &req)?;
        let from = req.get_ref().from_size;
        let (bundle, size) = export_bundle(&self.shared, from).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let shared = self.shared.clone();
        crate::spawn_feed("Audit.Export", tx, |tx| async move {
            let sent = stream_bundle(&shared, bundle, size, &tx).await;
            match sent {
                Ok(Some(bytes)) => tracing::info!(bytes, from, entries = size - from, "audit export"),
                Ok(None) => tracing::info!(
                    from,
                    entries = size - from,
                    "audit export: the auditor went away before its end"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "audit export cut short");
                    let _ = tx.send(Err(e.into())).await;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Log entries read from the store at a time for an export.
const EXPORT_PAGE: usize = 1_024;

/// Sends `bundle` with the log entries from its `first_index` up to `size` as its `entries`, in
/// chunks of [`CHUNK`] bytes: byte for byte what `encode_to_vec` of the
/// whole would give (fields in number order), but read and encoded a page
/// of entries at a time, so a log of any length costs a few pages of
/// memory, not three copies of itself. Returns the bytes sent, `None` when
/// the auditor went away first.
async fn stream_bundle(
    shared: &Shared,
    mut bundle: AuditBundle,
    size: u64,
    tx: &tokio::sync::mpsc::Sender<Result<ExportChunk, Status>>,
) -> Result<Option<u64>, NodeError> {
    let mut sent = 0u64;
    // Fields 1 to 3, then 4 (entries) a page at a time, then 5 to 9.
    let tail = AuditBundle {
        checkpoints: std::mem::take(&mut bundle.checkpoints),
        consistency: std::mem::take(&mut bundle.consistency),
        root_ca: std::mem::take(&mut bundle.root_ca),
        first_index: std::mem::take(&mut bundle.first_index),
        prefix: std::mem::take(&mut bundle.prefix),
        ..AuditBundle::default()
    };
    let mut from = tail.first_index;
    let mut buf = bundle.encode_to_vec();
    while from < size {
        let want = (size - from).min(EXPORT_PAGE as u64) as usize;
        let page = shared.store.audit_entries(from, want)?;
        if page.len() != want {
            return Err(NodeError::Store(antar_store::StoreError::Corrupt {
                tree: "audit",
                detail: format!(
                    "the log holds {} entries from {from}, {want} expected",
                    page.len()
                ),
            }));
        }
        for (_, entry) in &page {
            prost::encoding::bytes::encode(4, entry, &mut buf);
        }
        from += want as u64;
        if !send_chunks(tx, &mut buf, false, &mut sent).await {
            return Ok(None);
        }
    }
    buf.extend_from_slice(&tail.encode_to_vec());
    Ok(send_chunks(tx, &mut buf, true, &mut sent).await.then_some(sent))
}

/// Sends the whole [`CHUNK`]s off the front of `buf` (and with `all` the
/// rest too), leaving the rest for the next page and counting what went
/// in `sent`; false when the auditor went away.
async fn send_chunks(
    tx: &tokio::sync::mpsc::Sender<Result<ExportChunk, Status>>,
    buf: &mut Vec<u8>,
    all: bool,
    sent: &mut u64,
) -> bool {
    let cut = if all {
        buf.len()
    } else {
        buf.len() - buf.len() % CHUNK
    };
    for data in buf[..cut].chunks(CHUNK) {
        *sent += data.len() as u64;
        let data = Bytes::copy_from_slice(data);
        if tx.send(Ok(ExportChunk { data })).await.is_err() {
            return false;
        }
    }
    buf.drain(..cut);
    true
}

/// Everything an auditor needs to verify this node's log offline from
/// entry `from` on, but those entries (see [`stream_bundle`]), and the log
/// size it covers.
pub(crate) async fn export_bundle(shared: &Shared, from: u64) -> Result<(AuditBundle, u64), NodeError> {
    let latest = checkpoint_now(shared).await?;
    let size = latest.tree_size;
    if from > size {
        return Err(NodeError::invalid(
            "from_size",
            format!("{from} is past the log's {size} entries"),
        ));
    }
    // The checkpointer may store a newer one meanwhile: export up to `latest`.
    let checkpoints: Vec<Checkpoint> = stored_checkpoints(shared)?
        .into_iter()
        .filter(|c| (from..=size).contains(&c.tree_size))
        .collect();
    let mut tree = shared.store.audit_tree(size)?;
    let prefix = merkle::frontier_of(&mut tree, from).map_err(proof_failure)?;
    let mut consistency = Vec::new();
    for pair in checkpoints.windows(2) {
        let old = pair[0].tree_size;
        let path = if old == 0 {
            Vec::new()
        } else {
            merkle::consistency_proof_of(&mut tree, old, pair[1].tree_size).map_err(proof_err)?
        };
        consistency.push(ConsistencyProofResponse {
            path: proof_hashes(path),
        });
    }
    let bundle = AuditBundle {
        federation: shared.config.federation.clone(),
        agency: shared.agency.to_string(),
        certificates: signing_certs(shared)?,
        entries: Vec::new(),
        checkpoints,
        consistency,
        root_ca: Bytes::copy_from_slice(shared.verifier.anchor().root_der()),
        first_index: from,
        prefix: proof_hashes(prefix),
    };
    Ok((bundle, size))
}
