//! `antar.v1.Peer`: custody transfer from other nodes.
//!
//! Each batch is verified item by item, stored in one transaction, flushed,
//! and only then acked: STORED (custody passed), DUPLICATE (it had passed
//! before), or REJECTED with a reason code (and a signed REJECTED receipt
//! routed to the sender when one can be built).

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
    },
    /// Delivered here: the envelope, the transfer, the sending node's
    /// identity and the DELIVERED receipt.
    Deliver(Box<VerifiedEnvelope>, EnvelopeTransfer, String, Box<R>),
    Relay(Box<VerifiedEnvelope>, EnvelopeTransfer, String),
    Receipt(SignedReceipt, Receipt, Vec<String>),
}

impl Plan<Receipt> {
    /// The receipt this item would issue.
    fn draft(&self) -> Option<&Receipt> {
        match self {
            Self::Reject { receipt, .. } => receipt.as_ref(),
            Self::Deliver(.., r) => Some(r),
            Self::Relay(..) | Self::Receipt(..) => None,
        }
    }

    fn sign_with(self, mut sign: impl FnMut(Receipt) -> Issued) -> Plan {
        match self {
            Self::Reject { reason, receipt } => Plan::Reject {
                reason,
                receipt: receipt.map(sign),
            },
            Self::Deliver(v, et, identity, r) => Plan::Deliver(v, et, identity, Box::new(sign(*r))),
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
    Rejected(String),
}

#[tonic::async_trait]
impl Peer for PeerService {
    type TransferStream = Pin<Box<dyn Stream<Item = Result<TransferAck, Status>> + Send>>;

    async fn witness(
        &self,
        req: Request<antar_core::wire::WitnessRequest>,
    ) -> Result<Response<antar_core::wire::WitnessResponse>, Status> {
        let from = auth::peer(&self.shared, &req)?;
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
        tokio::spawn(async move {
            loop {
                let batch = tokio::select! {
                    b = batches.next() => b,
                    _ = shared.shutdown.cancelled() => return,
                };
                let Some(batch) = batch else { return };
                let batch = match batch {
                    Ok(b) => b,
                    Err(status) => {
                        // Garbage on the stream: say so (INVALID_ARGUMENT) and end it.
                        let status = crate::unreadable_is_invalid_argument(status);
                        tracing::warn!(peer = %from.agency, %status, "transfer stream refused");
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                if !shared.peer_rate.allow(from.agency.as_str(), batch.items.len()) {
                    let limit = shared.limits().peer_items_per_sec;
                    tracing::warn!(peer = %from.agency, limit, "peer over its transfer rate; stream ended");
                    let _ = tx
                        .send(Err(NodeError::RateLimited(format!(
                            "peer {} is over limits.peer_items_per_sec = {limit}; retry with backoff",
                            from.agency
                        ))
                        .into()))
                        .await;
                    return;
                }
                let result = handle_batch(&shared, &from, batch).await;
                let failed = result.is_err();
                if tx.send(result.map_err(Status::from)).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn handle_batch(
    shared: &Shared,
    from: &Identity,
    batch: TransferBatch,
) -> Result<TransferAck, NodeError> {
    let plans = plan_batch(shared, from, batch.items);
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
    let receipt = env.map(|(e, bytes)| {
        shared.draft_receipt(
            e,
            bytes,
            ReceiptStatus::Rejected,
            reason,
            Outcome::Unspecified,
            Vec::new(),
        )
    });
    Plan::Reject {
        reason: reason.to_owned(),
        receipt,
    }
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
            // Decoded without trust, only to address a REJECTED receipt to the claimed sender.
            let claimed = Envelope::decode(signed.envelope.as_slice()).ok();
            let claimed = claimed.as_ref().map(|e| (e, signed.envelope.as_slice()));
            let verified = match shared.verifier.verify_envelope(signed) {
                Ok(v) => v,
                Err(e) => return reject(shared, e.reason(), claimed),
            };
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
                let policy = shared.policy();
                let service = &verified.envelope.service;
                if !policy.service_known(service) {
                    return reject(shared, "unknown_service", claimed);
                }
                if !policy.may_send(verified.sender.as_str(), service) {
                    return reject(shared, "no_access_right", claimed);
                }
                // Over what this node's own apps may send (another node's
                // limits, or none): its Delivery might not reach a stock
                // client, and would be offered again and again.
                let e = &verified.envelope;
                if let Err(over) =
                    crate::agency::check_sizes(limits, payload.data.len(), &e.headers, &e.content_type)
                {
                    tracing::warn!(peer = %from.agency, id = %verified.id, %over, "envelope over this node's limits");
                    return reject(shared, "too_large", claimed);
                }
                let delivered = shared.delivered(&verified.envelope, &signed.envelope);
                Plan::Deliver(Box::new(verified), et, identity, Box::new(delivered))
            } else {
                match shared.policy().next_hop(verified.recipient.as_str()) {
                    Some(next) => Plan::Relay(Box::new(verified), et, next),
                    None => reject(shared, "no_route", claimed),
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
/// it is offered.
fn first_refusal(tx: &Tx<'_>, sender: &str, id: &MessageId) -> Result<bool, TxError> {
    Ok(!tx.mark_seen("rejected", &seen_key(sender, id))?)
}

/// Applies one plan inside the batch's transaction.
fn settle(shared: &Shared, tx: &Tx<'_>, plan: &Plan) -> Result<Settled, TxError> {
    match plan {
        Plan::Reject { reason, receipt } => {
            if let Some(issued) = receipt {
                let id = MessageId::parse(&issued.receipt.message_id).unwrap_or_default();
                if first_refusal(tx, &issued.receipt.sender, &id)? {
                    shared.route_issued(tx, issued)?;
                }
            }
            Ok(Settled::Rejected(reason.clone()))
        }
        Plan::Deliver(v, et, identity, delivered) => {
            // An id names one message here: its record is the dedup key.
            if let Some(held) = tx.peek_message(&v.id)? {
                // The same agency's: its node, whatever certificate it used.
                let same = Identity::parse(&held.sender_identity).is_ok_and(|i| i.agency == v.sender);
                if !held.outgoing && same {
                    return Ok(Settled::Duplicate);
                }
                // Another agency's message holds the id, or one this node
                // sent: never overwritten. The receipt is signed here,
                // under the writer lock, as planning does not read the
                // store; once per envelope, however often it is offered.
                let reason = "id_conflict";
                if first_refusal(tx, v.sender.as_str(), &v.id)? {
                    let bytes = et.envelope.as_ref().map_or(&[][..], |s| s.envelope.as_slice());
                    let draft = shared.draft_receipt(
                        &v.envelope,
                        bytes,
                        ReceiptStatus::Rejected,
                        reason,
                        Outcome::Unspecified,
                        Vec::new(),
                    );
                    shared.route_issued(tx, &shared.sign_receipt(draft))?;
                }
                return Ok(Settled::Rejected(reason.to_owned()));
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
            Ok(Settled::Stored)
        }
        Plan::Relay(v, et, next) => {
            if tx.mark_seen("envelope", &seen_key(v.sender.as_str(), &v.id))? {
                return Ok(Settled::Duplicate);
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
