//! `antar.v1.Peer`: custody transfer from other nodes.
//!
//! Each batch is verified item by item, stored in one transaction (with the
//! batches already waiting behind it: `gather`), flushed, and only then
//! acked, one ack a batch: STORED (custody passed), DUPLICATE (it had passed
//! before; or a TRANSACTION key its sender used before, not delivered, the
//! reason naming the holder), or REJECTED with a reason code (and a signed
//! REJECTED receipt routed to the sender, once, when one can be built).
//!
//! What a node holds wins over what it would decide now: an envelope it
//! took is `DUPLICATE` whatever changed since (policy, limits, a
//! revocation), and one it refused by policy or limits is refused the same
//! way again. A copy refused before or without verification (altered bytes
//! or payload, hops a relay set, a signer revoked) does not stop the
//! genuine envelope, which may then be delivered: the same id can have a
//! REJECTED receipt about a copy and a DELIVERED about the envelope, and at
//! its sender the recipient's DELIVERED wins (`state::next_state`).

use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use antar_core::wire::peer_server::Peer;
use antar_core::wire::{
    transfer_item, CustodyStatus, Envelope, EnvelopeTransfer, ItemAck, Kind, MessageState, Outcome, Receipt,
    ReceiptStatus, SignedReceipt, TransferAck, TransferBatch, TransferItem,
};
use antar_core::{Identity, MessageId, VerifiedEnvelope};
use antar_store::{Held, MessageRecord, Tx, TxError};

use crate::auth;
use crate::error::NodeError;
use crate::state::{expires_ms, Issued, SeenReceipts, Shared};

pub(crate) struct PeerService {
    pub(crate) shared: Arc<Shared>,
}

/// What to do with one item, decided before the transaction. `R` is the
/// receipt it issues: a draft [`Receipt`] while the batch is planned, then
/// [`Issued`] once the drafts of the whole batch are signed together.
enum Plan<R = Issued> {
    Reject {
        reason: String,
        receipt: Option<R>,
        /// For a verified envelope to relay that the routes as they are
        /// now refuse (`loop`, `no_route`): its `envelope` seen key. One
        /// this node relayed before is answered as relayed before.
        relayed: Option<Vec<u8>>,
    },
    /// Delivered here: the envelope, the transfer, the sending node's
    /// identity and the DELIVERED receipt.
    Deliver(Box<VerifiedEnvelope>, EnvelopeTransfer, String, Box<R>),
    /// For this agency, but refused by this node's policy or limits as they
    /// are now (`reason`, with its REJECTED receipt) — unless the store
    /// holds it already: then it is answered as what it is, a duplicate
    /// (the policy or limits changed since it was delivered) or a conflict.
    RefuseUnlessHeld {
        verified: Box<VerifiedEnvelope>,
        transfer: EnvelopeTransfer,
        reason: &'static str,
        receipt: Option<R>,
    },
    Relay(Box<VerifiedEnvelope>, EnvelopeTransfer, String),
    Receipt(SignedReceipt, Receipt, Vec<String>),
}

impl Plan<Receipt> {
    /// The receipt this item would issue.
    fn draft(&self) -> Option<&Receipt> {
        match self {
            Self::Reject { receipt, .. } | Self::RefuseUnlessHeld { receipt, .. } => receipt.as_ref(),
            Self::Deliver(.., r) => Some(r),
            Self::Relay(..) | Self::Receipt(..) => None,
        }
    }

    /// This refusal, of an envelope to relay whose `envelope` seen key is
    /// `key` (`Plan::Reject::relayed`).
    fn of_relay(mut self, key: Vec<u8>) -> Self {
        if let Self::Reject { relayed, .. } = &mut self {
            *relayed = Some(key);
        }
        self
    }

    fn sign_with(self, mut sign: impl FnMut(Receipt) -> Issued) -> Plan {
        match self {
            Self::Reject {
                reason,
                receipt,
                relayed,
            } => Plan::Reject {
                reason,
                receipt: receipt.map(sign),
                relayed,
            },
            Self::Deliver(v, et, identity, r) => Plan::Deliver(v, et, identity, Box::new(sign(*r))),
            Self::RefuseUnlessHeld {
                verified,
                transfer,
                reason,
                receipt,
            } => Plan::RefuseUnlessHeld {
                verified,
                transfer,
                reason,
                receipt: receipt.map(sign),
            },
            Self::Relay(v, et, next) => Plan::Relay(v, et, next),
            Self::Receipt(signed, r, hops) => Plan::Receipt(signed, r, hops),
        }
    }
}

/// Plans every item of a batch, then signs the receipts they issue in one
/// go: one signature for all of them with `receipts.batch_signatures`.
fn plan_batch(shared: &Shared, from: &Identity, items: Vec<TransferItem>) -> Vec<(u64, Plan)> {
    let plans: Vec<(u64, Plan<Receipt>)> = items
        .into_iter()
        .map(|item| (item.seq, plan(shared, from, item)))
        .collect();
    let drafts: Vec<Receipt> = plans.iter().filter_map(|(_, p)| p.draft().cloned()).collect();
    let mut signed = shared.sign_receipts(drafts);
    plans
        .into_iter()
        .map(|(seq, p)| (seq, p.sign_with(|draft| signed.take(draft))))
        .collect()
}

/// How the transaction settled one item.
#[derive(Clone)]
enum Settled {
    Stored,
    Duplicate,
    /// A TRANSACTION whose sender used its key before: DUPLICATE, saying
    /// which message holds the key.
    Replayed(String),
    Rejected(String),
}

/// What one `Peer.Witness` call costs of its peer's
/// `limits.peer_items_per_sec`: as much as a full transfer batch.
const WITNESS_ITEMS: usize = 256;

#[tonic::async_trait]
impl Peer for PeerService {
    type TransferStream = Pin<Box<dyn Stream<Item = Result<TransferAck, Status>> + Send>>;

    async fn witness(
        &self,
        req: Request<antar_core::wire::WitnessRequest>,
    ) -> Result<Response<antar_core::wire::WitnessResponse>, Status> {
        let from = auth::peer(&self.shared, &req)?;
        // Under the peer's rate like its transfers, at the cost of a batch
        // (a verification and a synced write): a node asks once a
        // checkpoint interval, so only a flood meets it.
        peer_rate(&self.shared, from.agency.as_str(), WITNESS_ITEMS, "a Witness")?;
        Ok(Response::new(
            crate::witness::serve(&self.shared, &from, req.into_inner()).await?,
        ))
    }

    async fn transfer(
        &self,
        req: Request<Streaming<TransferBatch>>,
    ) -> Result<Response<Self::TransferStream>, Status> {
        let from = auth::peer(&self.shared, &req)?;
        let mut batches = req.into_inner();
        let (tx, rx) = mpsc::channel(8);
        let shared = self.shared.clone();
        crate::spawn_feed("Peer.Transfer", tx, |tx| async move {
            loop {
                let next = tokio::select! {
                    b = batches.next() => b,
                    _ = shared.shutdown.cancelled() => return,
                };
                let admit = |batch: &TransferBatch| {
                    peer_room(&shared, from.agency.as_str(), batch)
                        .and_then(|()| {
                            peer_rate(
                                &shared,
                                from.agency.as_str(),
                                batch.items.len(),
                                "a transfer batch",
                            )
                        })
                        .map_err(not_taken)
                };
                let (taken, end) = gather(from.agency.as_str(), &mut batches, next, admit);
                if !taken.is_empty() {
                    match handle_batches(&shared, &from, taken).await {
                        Ok(acks) => {
                            for ack in acks {
                                if tx.send(Ok(ack)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    }
                }
                match end {
                    None => {}
                    Some(Ok(())) => return,
                    Some(Err(status)) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Trailer of a `Transfer` refusal after which the sender knows what this
/// node holds of the batches still unacked: none of them. The refused
/// batch and every one behind it on the stream were not looked at; every
/// batch before it was answered first. So their envelopes are not in
/// doubt at the sender: they expire there as if never sent
/// (`forward::run`). Value `1`; a node that does not set it leaves them in
/// doubt, as before.
pub(crate) const NOT_TAKEN: &str = "antar-not-taken";

/// Marks `status` as [`NOT_TAKEN`].
fn not_taken(mut status: Status) -> Status {
    status
        .metadata_mut()
        .insert(NOT_TAKEN, tonic::metadata::MetadataValue::from_static("1"));
    status
}

/// Charges `items` to `peer`'s `limits.peer_items_per_sec`; over it, the
/// `RESOURCE_EXHAUSTED` that ends `what` (a transfer stream, a Witness).
fn peer_rate(shared: &Shared, peer: &str, items: usize, what: &str) -> Result<(), Status> {
    if shared.peer_rate.allow(peer, items) {
        return Ok(());
    }
    let key = "peer_items_per_sec";
    let most = shared.limits().peer_items_per_sec;
    let refusal = format!(
        "peer {peer} is over limits.{key} = {most} ({what} counts {items} items); retry with backoff"
    );
    Err(shared.limited(key, peer, refusal).into())
}

/// Refuses a batch holding envelopes once the store is past its ceiling
/// for peers' envelopes, twice `limits.max_queued_bytes`: the node's own
/// apps are refused at the quota, so envelopes already on their way
/// between agencies still land, but one peer's flood cannot fill the disk
/// (which would stop the node). What waits to go to `peer` itself is not
/// counted, up to the quota: taking the peer's envelopes is how its
/// receipts for those come back, so two nodes full of work for each other
/// never refuse each other for good, while about three times the quota
/// is a hard ceiling (nothing a peer sends is relayed back to it: `loop`).
/// A batch of receipts alone passes (they settle what this node sent); a
/// receipt queued behind a refused envelope waits with it. The refusal
/// ends the stream `RESOURCE_EXHAUSTED`; the peer keeps the envelopes
/// queued and retries with backoff.
fn peer_room(shared: &Shared, peer: &str, batch: &TransferBatch) -> Result<(), Status> {
    let quota = shared.limits().max_queued_bytes;
    let ceiling = quota.saturating_mul(2);
    // What waits for `peer` is left out up to the quota: past three times
    // it, nothing more is taken whatever it is for.
    let waiting = shared.store.outbox_bytes(peer).min(quota);
    let queued = shared.store.queued_bytes().saturating_sub(waiting);
    let envelopes = || {
        batch
            .items
            .iter()
            .any(|i| matches!(i.item, Some(transfer_item::Item::Envelope(_))))
    };
    if queued < ceiling || !envelopes() {
        return Ok(());
    }
    let full = NodeError::PeersFull { queued, ceiling };
    Err(shared.refused("max_queued_bytes", peer, full).into())
}

/// Bytes of batches handled together past which no more are taken (the
/// batch that passes it is the last; one batch alone is bounded by the
/// stream's message size).
const MAX_GATHERED_BYTES: usize = 8 << 20;

/// Takes `next` and every batch already waiting behind it on the stream
/// (the sender keeps a window of batches in flight) that `admit` lets in
/// (the peer's rate), until they pass [`MAX_GATHERED_BYTES`]: handled together, they cost one signature for
/// their receipts, one transaction and one sync however many there are,
/// and nothing waits for a batch not yet here. Also returns how the stream
/// ends, if it does here: `Ok` when the sender closed it, or the status to
/// answer (garbage on the stream; `admit`'s, a peer over its rate) once the
/// batches before it are answered.
fn gather<S>(
    peer: &str,
    batches: &mut S,
    mut next: Option<Result<TransferBatch, Status>>,
    mut admit: impl FnMut(&TransferBatch) -> Result<(), Status>,
) -> (Vec<TransferBatch>, Option<Result<(), Status>>)
where
    S: Stream<Item = Result<TransferBatch, Status>> + Unpin,
{
    let mut taken: Vec<TransferBatch> = Vec::new();
    let mut bytes = 0;
    loop {
        let batch = match next {
            None => return (taken, Some(Ok(()))),
            Some(Err(status)) => {
                // Garbage on the stream: say so (INVALID_ARGUMENT) and end it.
                let status = crate::unreadable_is_invalid_argument(status);
                tracing::warn!(peer, %status, "transfer stream refused");
                return (taken, Some(Err(status)));
            }
            Some(Ok(b)) => b,
        };
        if let Err(status) = admit(&batch) {
            return (taken, Some(Err(status)));
        }
        bytes += batch.encoded_len();
        taken.push(batch);
        if bytes > MAX_GATHERED_BYTES {
            return (taken, None);
        }
        // Only what is here already: polled once, never waited for.
        match crate::ready_now(batches) {
            Some(b) => next = b,
            None => return (taken, None),
        }
    }
}

/// Handles batches taken together (see [`gather`]); one ack a batch, in
/// their order.
async fn handle_batches(
    shared: &Shared,
    from: &Identity,
    batches: Vec<TransferBatch>,
) -> Result<Vec<TransferAck>, NodeError> {
    let sizes: Vec<usize> = batches.iter().map(|b| b.items.len()).collect();
    let items = batches.into_iter().flat_map(|b| b.items).collect();
    let mut acks = handle_batch(shared, from, items).await?.acks.into_iter();
    Ok(sizes
        .into_iter()
        .map(|n| TransferAck {
            acks: acks.by_ref().take(n).collect(),
        })
        .collect())
}

async fn handle_batch(
    shared: &Shared,
    from: &Identity,
    items: Vec<TransferItem>,
) -> Result<TransferAck, NodeError> {
    let plans = plan_batch(shared, from, items);
    let settled = shared
        .store
        .transact(|tx| {
            plans
                .iter()
                .map(|(_, p)| settle(shared, tx, p))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(NodeError::from)?;
    shared.store.durable().await?;
    let mut acks = Vec::with_capacity(plans.len());
    for ((seq, plan), result) in plans.iter().zip(settled) {
        let (status, reason) = match result {
            Settled::Stored => (CustodyStatus::Stored, String::new()),
            Settled::Duplicate => (CustodyStatus::Duplicate, String::new()),
            Settled::Replayed(r) => (CustodyStatus::Duplicate, r),
            Settled::Rejected(r) => (CustodyStatus::Rejected, r),
        };
        match (&status, plan) {
            (CustodyStatus::Stored, Plan::Deliver(v, et, ..)) => {
                shared.metrics.delivered.inc();
                if let Some(age) = v
                    .envelope
                    .created_at
                    .and_then(|t| SystemTime::try_from(t).ok())
                    .and_then(|t| t.elapsed().ok())
                {
                    shared.metrics.delivery_seconds.observe(age);
                }
                tracing::debug!(id = %v.id, trace_id = crate::trace::trace_id(&et.traceparent),
                    from = %from.agency, service = %v.envelope.service, "delivered to the inbox");
                if v.envelope.kind == Kind::Response as i32 {
                    shared.calls.arrived(&v.envelope.correlation_id, v.id);
                }
            }
            (CustodyStatus::Stored, Plan::Relay(v, et, next)) => {
                shared.metrics.relayed.inc();
                tracing::debug!(id = %v.id, trace_id = crate::trace::trace_id(&et.traceparent),
                    from = %from.agency, %next, "relaying");
            }
            (CustodyStatus::Duplicate, _) if !reason.is_empty() => {
                shared.metrics.rejected(DUPLICATE_TRANSACTION);
                tracing::warn!(peer = %from.agency, seq, %reason, "a transaction key used again; not delivered");
            }
            (CustodyStatus::Rejected, _) => {
                shared.metrics.rejected(&reason);
                tracing::warn!(peer = %from.agency, seq, %reason, "rejected a transferred item");
            }
            _ => {}
        }
        acks.push(ItemAck {
            seq: *seq,
            status: status as i32,
            reason,
        });
    }
    Ok(TransferAck { acks })
}

fn reject(shared: &Shared, reason: &str, env: Option<(&Envelope, &[u8])>) -> Plan<Receipt> {
    Plan::Reject {
        reason: reason.to_owned(),
        receipt: env.map(|(e, bytes)| rejected(shared, e, bytes, reason)),
        relayed: None,
    }
}

/// The draft of a REJECTED receipt for `envelope` (its signed bytes).
fn rejected(shared: &Shared, envelope: &Envelope, bytes: &[u8], reason: &str) -> Receipt {
    shared.draft_receipt(
        envelope,
        bytes,
        ReceiptStatus::Rejected,
        reason,
        Outcome::Unspecified,
        Vec::new(),
    )
}

/// Why this node would not take an envelope for its agency now: a service
/// it does not know, a sender without the access right, or over its own
/// limits for a send (another node's limits may be higher, or none: the
/// `Delivery` might not reach a stock client, and would be offered again
/// and again). `None`: it takes it.
fn refusal_here(
    shared: &Shared,
    from: &Identity,
    verified: &VerifiedEnvelope,
    payload: usize,
) -> Option<&'static str> {
    let policy = shared.policy();
    let e = &verified.envelope;
    if !policy.service_known(&e.service) {
        return Some("unknown_service");
    }
    if !policy.may_send(verified.sender.as_str(), &e.service) {
        return Some("no_access_right");
    }
    let over = over_limits(shared, e, payload)?;
    tracing::warn!(peer = %from.agency, id = %verified.id, %over, "envelope over this node's limits");
    Some("too_large")
}

/// What of envelope `e` with a payload of `payload` bytes is over this
/// node's limits for a send, if anything: such an envelope is neither
/// delivered nor relayed here (`too_large`).
fn over_limits(shared: &Shared, e: &Envelope, payload: usize) -> Option<String> {
    crate::agency::check_sizes(shared.limits(), payload, &e.headers, &e.content_type)
        .err()
        .map(|err| err.to_string())
        .or_else(|| {
            (e.correlation_id.len() > crate::agency::MAX_KEY_BYTES).then(|| {
                format!(
                    "correlation_id: {} bytes; at most {}",
                    e.correlation_id.len(),
                    crate::agency::MAX_KEY_BYTES
                )
            })
        })
}

/// Verifies one item and decides its fate; no store access.
fn plan(shared: &Shared, from: &Identity, item: TransferItem) -> Plan<Receipt> {
    let limits = shared.limits();
    match item.item {
        None => reject(shared, "malformed", None),
        Some(transfer_item::Item::Receipt(rt)) => {
            let Some(signed) = rt.receipt.clone() else {
                return reject(shared, "malformed", None);
            };
            if rt.hops.len() >= limits.max_hops as usize {
                return reject(shared, "hop_limit", None);
            }
            if rt.hops.iter().any(|h| h == shared.agency.as_str()) {
                return reject(shared, "loop", None);
            }
            match shared.verifier.verify_receipt(&signed) {
                Ok(v) => Plan::Receipt(signed, v.receipt, rt.hops),
                Err(e) => reject(shared, e.reason(), None),
            }
        }
        Some(transfer_item::Item::Envelope(et)) => {
            let Some(signed) = et.envelope.as_ref() else {
                return reject(shared, "malformed", None);
            };
            let verified = match shared.verifier.verify_envelope(signed) {
                Ok(v) => v,
                Err(e) => {
                    // Decoded without trust, only to address a REJECTED receipt to the claimed sender.
                    let claimed = Envelope::decode(signed.envelope.clone()).ok();
                    return reject(
                        shared,
                        e.reason(),
                        claimed.as_ref().map(|e| (e, &signed.envelope[..])),
                    );
                }
            };
            // From here on what it claims is verified.
            let claimed = Some((&verified.envelope, &signed.envelope[..]));
            let payload = et.payload.clone().unwrap_or_default();
            if let Err(e) = verified.check_payload(&payload) {
                return reject(shared, e.reason(), claimed);
            }
            if et.hops.first().map(String::as_str) != Some(verified.sender.as_str())
                || et.hops.last().map(String::as_str) != Some(from.agency.as_str())
            {
                return reject(shared, "bad_hops", claimed);
            }
            if et.hops.len() >= limits.max_hops as usize {
                return reject(shared, "hop_limit", claimed);
            }
            if et.hops.iter().any(|h| h == shared.agency.as_str()) {
                return reject(shared, "loop", claimed);
            }
            let identity = verified.signer.to_string();
            if verified.recipient == shared.agency {
                if let Some(reason) = refusal_here(shared, from, &verified, payload.data.len()) {
                    let receipt = claimed.map(|(e, bytes)| rejected(shared, e, bytes, reason));
                    return Plan::RefuseUnlessHeld {
                        verified: Box::new(verified),
                        transfer: et,
                        reason,
                        receipt,
                    };
                }
                let delivered = shared.delivered(&verified.envelope, &signed.envelope);
                Plan::Deliver(Box::new(verified), et, identity, Box::new(delivered))
            } else {
                let unroutable = |reason| {
                    reject(shared, reason, claimed).of_relay(seen_key(verified.sender.as_str(), &verified.id))
                };
                match shared.policy().next_hop(verified.recipient.as_str()) {
                    // Straight back where it came from: a loop (and work
                    // queued for the peer that sent it, which `peer_room`
                    // would not count).
                    Some(next) if next.as_str() == from.agency.as_str() => unroutable("loop"),
                    Some(next) => Plan::Relay(Box::new(verified), et, next),
                    None => unroutable("no_route"),
                }
            }
        }
    }
}

fn seen_key(sender: &str, id: &MessageId) -> Vec<u8> {
    let mut k = sender.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

/// True the first time the envelope (`sender`, `id`) is refused: its
/// REJECTED receipt goes to the sender once per message, however often
/// it is offered. Refusals of a verified envelope for this agency count
/// apart (`verified`) from those decided before or without verification
/// (a copy altered on the way, hops a relay set): a relay that got an
/// altered copy refused first does not silence the genuine envelope's own
/// refusal (and its `duplicate_of`). So an id gets at most two.
fn first_refusal(tx: &Tx<'_>, sender: &str, id: &MessageId, verified: bool) -> Result<bool, TxError> {
    let namespace = if verified { "rejected-verified" } else { "rejected" };
    Ok(!tx.mark_seen(namespace, &seen_key(sender, id))?)
}

/// The idempotency key of a TRANSACTION (its `correlation_id`).
fn transaction_key(envelope: &Envelope) -> Option<&str> {
    (envelope.kind == Kind::Transaction as i32 && !envelope.correlation_id.is_empty())
        .then_some(envelope.correlation_id.as_str())
}

/// The reason code of a replayed TRANSACTION key.
const DUPLICATE_TRANSACTION: &str = "duplicate_transaction";

/// `seen` namespace of the verified envelopes refused for good, for this
/// agency or to relay, by sender and id; the value is the reason.
const REFUSED: &str = "refused";

/// `seen` namespace of the messages whose receipts went to their sender
/// again, by sender and id; the value is when, ms since the epoch (u64 BE).
const RESENT: &str = "resent";

/// How often at most the receipts about one message go to its sender again
/// when it offers the message again ([`resend_receipts`]).
const RESEND_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// How an envelope for this agency settles when the store already holds
/// its id or, for a TRANSACTION, its sender's idempotency key; `None` when
/// it holds neither.
///
/// An id names one message here, so its record is the dedup key: the same
/// sender agency's envelope again (from its node, whatever certificate it
/// used) is `DUPLICATE`, and the receipts this node issued about it go to
/// the sender again ([`resend_receipts`]); one that reuses the id of
/// another agency's message, or of one this node sent, is refused `id_conflict` and never overwrites
/// it. A TRANSACTION whose key its sender used before, under another id, is
/// `DUPLICATE` too, naming the message that holds the key, and is not
/// delivered; a signed REJECTED `duplicate_transaction` receipt, whose
/// `duplicate_of` names that message, settles the new id at its sender.
fn already_held(
    shared: &Shared,
    tx: &Tx<'_>,
    v: &VerifiedEnvelope,
    et: &EnvelopeTransfer,
) -> Result<Option<Settled>, TxError> {
    let held = tx.peek_message(&v.id)?;
    if let Some(held) = held
        .as_ref()
        .filter(|held| received_from(held, v.sender.as_str()))
    {
        // Offered again: its sender may have lost what this node said of
        // it (restored from a backup taken while it was in flight).
        if resend_due(tx, &seen_key(v.sender.as_str(), &v.id))? {
            resend_receipts(shared, tx, v.sender.as_str(), &v.id, held)?;
        }
        return Ok(Some(Settled::Duplicate));
    }
    // Refused before by policy or limits, for good (its REJECTED receipt
    // went out): the same answer, whatever changed since — policy, limits,
    // a record or a key taken under that id since — so this node never
    // delivers what it refused so, and the ack never contradicts the
    // receipt.
    if let Some(reason) = tx.noted(REFUSED, &seen_key(v.sender.as_str(), &v.id))? {
        return Ok(Some(Settled::Rejected(
            String::from_utf8_lossy(&reason).into_owned(),
        )));
    }
    if held.is_some() {
        return refuse(shared, tx, v, et, "id_conflict", &[], None).map(Some);
    }
    if let Some(key) = transaction_key(&v.envelope) {
        if let Some(ids) = tx.tx_key(v.sender.as_str(), key)? {
            refuse(shared, tx, v, et, DUPLICATE_TRANSACTION, &ids, None)?;
            return Ok(Some(Settled::Replayed(format!(
                "{DUPLICATE_TRANSACTION}: idempotency key already used by message {}",
                id_list(&ids)
            ))));
        }
    }
    Ok(None)
}

/// Refuses a verified envelope for this agency. Its signed REJECTED
/// receipt — `signed` when planning drafted it, else signed here, under the
/// writer lock, with `duplicate_of` naming the messages that hold a
/// replayed key — goes to the sender once per envelope, however often it
/// is offered, and with it the receipts this node issued about each of
/// those messages (DELIVERED, and PROCESSED with the outcome), so a sender
/// that lost them (restored from a backup) learns their outcome (DESIGN.md
/// §9: "original result returned"). (An `id_conflict` or a replayed key is
/// refused again by what the store holds; a refusal by policy or limits is noted apart,
/// `Plan::RefuseUnlessHeld`.)
fn refuse(
    shared: &Shared,
    tx: &Tx<'_>,
    v: &VerifiedEnvelope,
    et: &EnvelopeTransfer,
    reason: &str,
    duplicate_of: &[MessageId],
    signed: Option<&Issued>,
) -> Result<Settled, TxError> {
    if first_refusal(tx, v.sender.as_str(), &v.id, true)? {
        match signed {
            Some(issued) => shared.route_issued(tx, issued)?,
            None => {
                let bytes = et.envelope.as_ref().map_or(&[][..], |s| &s.envelope[..]);
                let mut draft = rejected(shared, &v.envelope, bytes, reason);
                draft.duplicate_of = id_list(duplicate_of);
                shared.route_issued(tx, &shared.sign_receipt(draft))?
            }
        };
        for id in duplicate_of {
            if let Some(held) = tx.peek_message(id)? {
                resend_receipts(shared, tx, v.sender.as_str(), id, &held)?;
            }
        }
    }
    Ok(Settled::Rejected(reason.to_owned()))
}

/// Message ids as a receipt's `duplicate_of` and a custody ack's reason
/// name them: comma-separated.
fn id_list(ids: &[MessageId]) -> String {
    let ids: Vec<String> = ids.iter().map(MessageId::to_string).collect();
    ids.join(", ")
}

/// Whether the receipts about the message under `key` (sender and id) may
/// go to its sender again now, noting when they do: at most once a
/// [`RESEND_EVERY`], so a peer offering an envelope over and over cannot
/// fill this node's outbox. A clock set back since allows it.
fn resend_due(tx: &Tx<'_>, key: &[u8]) -> Result<bool, TxError> {
    let now = antar_core::time::unix_millis(std::time::SystemTime::now());
    let last = tx
        .noted(RESENT, key)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map(u64::from_be_bytes);
    let due = last.is_none_or(|last| now < last || now - last >= RESEND_EVERY.as_millis() as u64);
    if due {
        tx.note(RESENT, key, &now.to_be_bytes())?;
    }
    Ok(due)
}

/// Queues again, toward `sender`'s node, the receipts this node issued
/// about `held`, message `id` received from `sender`: its DELIVERED, and
/// its PROCESSED once its app acked, as the Merkle log holds them — the
/// same signed bytes, logged once. A sender that lost them (restored from
/// a backup) learns the message's fate; one that holds them knows them by
/// their digest and takes nothing twice. Nothing for a receipt issued by
/// a build that did not note where it went.
fn resend_receipts(
    shared: &Shared,
    tx: &Tx<'_>,
    sender: &str,
    id: &MessageId,
    held: &MessageRecord,
) -> Result<(), TxError> {
    if !received_from(held, sender) {
        return Ok(());
    }
    let issued = [
        (held.delivered_audit_index, ReceiptStatus::Delivered),
        (held.processed_audit_index, ReceiptStatus::Processed),
    ];
    for (index, status) in issued {
        let Some(index) = index else { continue };
        let Some(data) = tx.audit_data(index)? else {
            continue;
        };
        let signed = SignedReceipt::decode(data.as_slice()).unwrap_or_default();
        let receipt = Receipt::decode(&signed.receipt[..]).unwrap_or_default();
        if receipt.status != status as i32 || receipt.message_id != id.to_string() || receipt.sender != sender
        {
            tracing::error!(%id, index, ?status, "the log entry this message's record names is not its receipt; not sent again");
            continue;
        }
        let cert = antar_store::Held::Cert(&signed.signer_cert);
        shared.forward_receipt(tx, &signed, &receipt, Vec::new(), cert)?;
    }
    Ok(())
}

/// Whether `held` is a message this node received from agency `sender`
/// (from its node, whatever certificate it used).
fn received_from(held: &MessageRecord, sender: &str) -> bool {
    !held.outgoing && Identity::parse(&held.sender_identity).is_ok_and(|i| i.agency.as_str() == sender)
}

/// True when this node holds, as received from `sender`, the very envelope
/// (`message_id`, `envelope_sha256`) a refusal is about: it took it when
/// it verified, and what changed since (a revocation, `limits.max_hops`)
/// does not undo that.
fn holds_envelope(tx: &Tx<'_>, receipt: &Receipt) -> Result<bool, TxError> {
    let Ok(id) = MessageId::parse(&receipt.message_id) else {
        return Ok(false);
    };
    let from_sender = tx
        .peek_message(&id)?
        .is_some_and(|held| received_from(&held, &receipt.sender));
    // Only then the body (envelope and payload are stored together).
    Ok(from_sender
        && tx
            .message(&id)?
            .and_then(|held| held.envelope)
            .is_some_and(|e| antar_core::envelope::sha256(&e.envelope).as_slice() == receipt.envelope_sha256))
}

/// How an envelope to relay whose `envelope` seen key (`key`) is marked
/// settles: relayed before (a duplicate), or refused for good: the same
/// answer whatever the limits and routes are now.
fn relayed_before(tx: &Tx<'_>, key: &[u8]) -> Result<Settled, TxError> {
    Ok(match tx.noted(REFUSED, key)? {
        Some(reason) => Settled::Rejected(String::from_utf8_lossy(&reason).into_owned()),
        None => Settled::Duplicate,
    })
}

/// Applies one plan inside the batch's transaction.
fn settle(shared: &Shared, tx: &Tx<'_>, plan: &Plan) -> Result<Settled, TxError> {
    match plan {
        Plan::Reject {
            reason,
            receipt,
            relayed,
        } => {
            // Relayed before, under routes since changed: the answer it had.
            if let Some(key) = relayed {
                if tx.seen("envelope", key)? {
                    return relayed_before(tx, key);
                }
            }
            if let Some(issued) = receipt {
                if holds_envelope(tx, &issued.receipt)? {
                    return Ok(Settled::Duplicate);
                }
                let id = MessageId::parse(&issued.receipt.message_id).unwrap_or_default();
                if first_refusal(tx, &issued.receipt.sender, &id, false)? {
                    shared.route_issued(tx, issued)?;
                }
            }
            Ok(Settled::Rejected(reason.clone()))
        }
        Plan::Deliver(v, et, identity, delivered) => {
            if let Some(settled) = already_held(shared, tx, v, et)? {
                return Ok(settled);
            }
            let signed = et.envelope.clone().unwrap_or_default();
            let record = MessageRecord {
                envelope: Some(signed.clone()),
                payload: et.payload.clone(),
                state: MessageState::Inbox as i32,
                sender_identity: identity.clone(),
                outgoing: false,
                service: v.envelope.service.clone(),
                expires_at_ms: expires_ms(&v.envelope),
                ..Default::default()
            };
            shared.deliver_local(tx, &v.id, record, &v.envelope, &signed.envelope, delivered)?;
            if let Some(key) = transaction_key(&v.envelope) {
                tx.put_tx_key(v.sender.as_str(), key, &[v.id])?;
            }
            Ok(Settled::Stored)
        }
        Plan::RefuseUnlessHeld {
            verified,
            transfer,
            reason,
            receipt,
        } => {
            if let Some(settled) = already_held(shared, tx, verified, transfer)? {
                return Ok(settled);
            }
            // For good: offered again, it is refused the same way
            // (`already_held`), whatever the policy or limits are then.
            let key = seen_key(verified.sender.as_str(), &verified.id);
            tx.note(REFUSED, &key, reason.as_bytes())?;
            refuse(shared, tx, verified, transfer, reason, &[], receipt.as_ref())
        }
        Plan::Relay(v, et, next) => {
            let key = seen_key(v.sender.as_str(), &v.id);
            // Nothing over this node's own limits is carried on: grown by
            // a hop and a traceparent, it could pass no peer's frame limit
            // and would stop the link behind it. Refused for good, as a
            // recipient refuses (`Plan::RefuseUnlessHeld`), unless relayed
            // before the limits were lowered.
            // One lookup in the common case: a refused envelope is marked
            // seen too, and only a seen one is asked why.
            let payload = et.payload.as_ref().map_or(0, |p| p.data.len());
            let over = over_limits(shared, &v.envelope, payload);
            let seen = match over {
                Some(_) => tx.seen("envelope", &key)?,
                None => tx.mark_seen("envelope", &key)?,
            };
            if seen {
                return relayed_before(tx, &key);
            }
            if let Some(over) = over {
                tracing::warn!(id = %v.id, sender = %v.sender, %over, "envelope to relay over this node's limits");
                tx.mark_seen("envelope", &key)?;
                tx.note(REFUSED, &key, b"too_large")?;
                return refuse(shared, tx, v, et, "too_large", &[], None);
            }
            let mut et = et.clone();
            let held = match &et.envelope {
                Some(signed) => Held::Audited(crate::state::audit_envelope(tx, signed, &v.id.to_string())?),
                None => Held::Nothing,
            };
            et.hops.push(shared.agency.to_string());
            et.traceparent = crate::trace::child(&et.traceparent);
            let item = TransferItem {
                seq: 0,
                item: Some(transfer_item::Item::Envelope(et)),
            };
            tx.push_outbox(next, &item.encode_to_vec(), held, expires_ms(&v.envelope))?;
            Ok(Settled::Stored)
        }
        Plan::Receipt(signed, receipt, hops) => {
            if receipt.sender == shared.agency.as_str() {
                let new = shared.apply_receipt(tx, signed, receipt)?;
                return Ok(if new { Settled::Stored } else { Settled::Duplicate });
            }
            if shared.receipt_seen(tx, SeenReceipts::Relayed, signed, receipt)? {
                return Ok(Settled::Duplicate);
            }
            shared.route_receipt(tx, signed, receipt, hops.clone())?;
            Ok(Settled::Stored)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seqs: &[u64]) -> TransferBatch {
        TransferBatch {
            items: seqs
                .iter()
                .map(|&seq| TransferItem {
                    seq,
                    ..Default::default()
                })
                .collect(),
        }
    }

    fn seqs(taken: &[TransferBatch]) -> Vec<Vec<u64>> {
        taken
            .iter()
            .map(|b| b.items.iter().map(|i| i.seq).collect())
            .collect()
    }

    #[test]
    fn gather_takes_what_is_here_and_no_more() {
        // Two batches already behind the first; the stream stays open.
        let mut here =
            tokio_stream::iter(vec![Ok(batch(&[2, 3])), Ok(batch(&[4]))]).chain(tokio_stream::pending());
        let (taken, end) = gather("finance", &mut here, Some(Ok(batch(&[1]))), |_| Ok(()));
        assert_eq!(seqs(&taken), [vec![1], vec![2, 3], vec![4]]);
        assert!(end.is_none(), "an open stream does not end here");

        // The sender closed the stream behind them.
        let mut closing = tokio_stream::iter(vec![Ok(batch(&[2]))]);
        let (taken, end) = gather("finance", &mut closing, Some(Ok(batch(&[1]))), |_| Ok(()));
        assert_eq!(seqs(&taken), [vec![1], vec![2]]);
        assert!(matches!(end, Some(Ok(()))));
    }

    #[test]
    fn gather_answers_the_batches_before_a_refusal_then_the_refusal() {
        // Garbage after one good batch: the good one is handled, then the
        // stream ends with INVALID_ARGUMENT (tonic's decode error).
        let garbage = Status::internal("failed to decode Protobuf message: buffer underflow");
        let mut s = tokio_stream::iter(vec![Ok(batch(&[2])), Err(garbage), Ok(batch(&[3]))]);
        let (taken, end) = gather("finance", &mut s, Some(Ok(batch(&[1]))), |_| Ok(()));
        assert_eq!(seqs(&taken), [vec![1], vec![2]]);
        let status = end.expect("ends").expect_err("a refusal");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);

        // Over the peer's rate at the second batch: only the first is taken.
        let mut s = tokio_stream::iter(vec![Ok(batch(&[2, 3])), Ok(batch(&[4]))]);
        let mut allowed = 1;
        let admit = |b: &TransferBatch| {
            allowed -= 1;
            if allowed >= 0 {
                Ok(())
            } else {
                Err(Status::resource_exhausted(format!(
                    "over the rate with {} items",
                    b.items.len()
                )))
            }
        };
        let (taken, end) = gather("finance", &mut s, Some(Ok(batch(&[1]))), admit);
        assert_eq!(seqs(&taken), [vec![1]]);
        let status = end.expect("ends").expect_err("a refusal");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(status.message(), "over the rate with 2 items");
    }

    #[test]
    fn gather_stops_past_its_byte_bound() {
        let big = TransferBatch {
            items: vec![TransferItem {
                seq: 1,
                item: Some(transfer_item::Item::Envelope(EnvelopeTransfer {
                    traceparent: "x".repeat(MAX_GATHERED_BYTES),
                    ..Default::default()
                })),
            }],
        };
        let mut s = tokio_stream::iter(vec![Ok(batch(&[2]))]);
        let (taken, end) = gather("finance", &mut s, Some(Ok(big)), |_| Ok(()));
        assert_eq!(taken.len(), 1, "the batch behind waits for the next round");
        assert!(end.is_none());
        let (taken, _) = gather("finance", &mut s, None, |_| Ok(()));
        assert!(taken.is_empty());
    }
}
