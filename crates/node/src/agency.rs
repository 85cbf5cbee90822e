//! `antar.v1.Agency`: what agency systems call on their own node.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prost::bytes::Bytes;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Code, Request, Response, Status};

use antar_core::envelope::sha256;
use antar_core::wire::agency_server::Agency;
use antar_core::wire::{
    ack_result, send_result, transfer_item, AckBatchRequest, AckBatchResponse, AckRequest, AckResponse,
    AckResult, Delivery, Envelope, EnvelopeTransfer, ItemError, Kind, MessageState, Outcome, Receipt,
    ReceiptEvent, ReceiptStatus, ReceiveRequest, ReplyRequest, SendBatchRequest, SendBatchResponse,
    SendRequest, SendResponse, SendResult, SignedReceipt, TrackRequest, TrackResponse, TransferItem,
    WatchReceiptsRequest,
};
use antar_core::{AgencyId, Draft, MessageId, Sealed, ServiceName};
use antar_store::{MessageRecord, Tx, TxError};

use crate::error::NodeError;
use crate::state::{expires_ms, Issued, Lease, Leases, OpenStream, Services, Shared};
use crate::{auth, trace};

/// The Agency service of one node.
pub(crate) struct AgencyService {
    pub(crate) shared: Arc<Shared>,
}

impl AgencyService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A send that has been validated: what to seal, for whom.
struct Validated {
    drafts: Vec<Draft>,
    /// Shared by every recipient's envelope: a slice of the request.
    payload: Bytes,
    idempotency_key: Option<String>,
    /// W3C trace context the envelopes travel with.
    traceparent: String,
}

fn validate_send(
    shared: &Shared,
    app: &str,
    req: SendRequest,
    correlation: Option<String>,
    traceparent: String,
) -> Result<Validated, NodeError> {
    if shared.draining() {
        return Err(NodeError::Draining);
    }
    // Each recipient gets its own envelope and copy of the payload, made in
    // memory before anything is stored: their number is bounded, and an
    // agency listed twice would only be sent the same notice twice.
    if req.recipients.len() > MAX_RECIPIENTS {
        return Err(NodeError::invalid(
            "recipients",
            format!(
                "{} listed, at most {MAX_RECIPIENTS} a Send; send several",
                req.recipients.len()
            ),
        ));
    }
    if let Some((i, r)) = req
        .recipients
        .iter()
        .enumerate()
        .find(|(i, r)| req.recipients[..*i].contains(r))
    {
        return Err(NodeError::invalid(
            "recipients",
            format!("{r} is listed twice (recipients[{i}])"),
        ));
    }
    if !shared.app_rate.allow(app, req.recipients.len().max(1)) {
        let key = "app_sends_per_sec";
        let most = shared.limits().app_sends_per_sec;
        let refusal = format!("app {app} is over limits.{key} = {most}; slow down and retry");
        return Err(shared.limited(key, app, refusal));
    }
    let kind = Kind::try_from(req.kind).unwrap_or(Kind::Unspecified);
    match (kind, &correlation) {
        (Kind::Unspecified, _) => {
            return Err(NodeError::invalid(
                "kind",
                "must be KIND_REQUEST, KIND_NOTICE or KIND_TRANSACTION",
            ))
        }
        (Kind::Response, None) => return Err(NodeError::invalid("kind", "a RESPONSE is sent with Reply")),
        _ => {}
    }
    if req.recipients.is_empty() {
        return Err(NodeError::invalid(
            "recipients",
            "at least one recipient agency is required",
        ));
    }
    if req.recipients.len() > 1 && kind != Kind::Notice {
        return Err(NodeError::invalid(
            "recipients",
            "only a NOTICE may have several recipients",
        ));
    }
    let service = ServiceName::parse(&req.service).map_err(|e| NodeError::invalid("service", e))?;
    let limits = shared.limits();
    let ttl = match req.ttl {
        None => Duration::from_secs(limits.default_ttl_secs),
        Some(d) if d.seconds < 0 || d.nanos < 0 || (d.seconds == 0 && d.nanos == 0) => {
            return Err(NodeError::invalid("ttl", "must be positive"))
        }
        Some(d) => Duration::new(d.seconds as u64, d.nanos as u32),
    };
    if ttl > Duration::from_secs(limits.max_ttl_secs) {
        return Err(NodeError::invalid(
            "ttl",
            format!("is over max_ttl_secs = {}", limits.max_ttl_secs),
        ));
    }
    let idempotency_key = match (kind, req.idempotency_key.is_empty()) {
        (Kind::Transaction, true) => {
            return Err(NodeError::invalid(
                "idempotency_key",
                "required for KIND_TRANSACTION",
            ))
        }
        (_, false) if req.idempotency_key.len() > MAX_KEY_BYTES => {
            return Err(NodeError::invalid(
                "idempotency_key",
                format!("at most {MAX_KEY_BYTES} bytes"),
            ))
        }
        // Any kind may carry one, so a retried Send is accepted once: the
        // node answers a key it has seen with the original ids. Only a
        // TRANSACTION's travels, as its envelope's correlation_id.
        (_, false) => Some(req.idempotency_key.clone()),
        (_, true) => None,
    };
    check_sizes(limits, req.payload.len(), &req.headers, &req.content_type)?;
    let policy = shared.policy();
    let now = SystemTime::now();
    let mut drafts = Vec::with_capacity(req.recipients.len());
    for r in &req.recipients {
        let recipient = AgencyId::parse(r).map_err(|e| NodeError::invalid("recipients", e))?;
        if !policy.in_directory(recipient.as_str()) {
            return Err(NodeError::NotFound(format!(
                "recipient {recipient}: not an agency in this node's directory"
            )));
        }
        if recipient != shared.agency && policy.next_hop(recipient.as_str()).is_none() {
            return Err(NodeError::NotFound(format!(
                "recipient {recipient}: no peer, route or default_route reaches it from {}",
                shared.agency
            )));
        }
        // A new send to this node's own agency (not a RESPONSE, which
        // answers a REQUEST held here): a service no app owns is refused
        // at once, as another node would refuse it `unknown_service`,
        // before an inbox no app can receive from fills the quota.
        if recipient == shared.agency && correlation.is_none() && !policy.service_known(service.as_str()) {
            return Err(NodeError::NotFound(format!(
                "service {service}: no app of {recipient} owns it (apps[].services)"
            )));
        }
        drafts.push(Draft {
            kind,
            sender: shared.agency.clone(),
            recipient,
            service: service.clone(),
            correlation_id: correlation
                .clone()
                .or_else(|| idempotency_key.clone().filter(|_| kind == Kind::Transaction))
                .unwrap_or_default(),
            created_at: now,
            ttl,
            headers: req.headers.clone(),
            content_type: req.content_type.clone(),
        });
    }
    if shared.store.over_quota() {
        let full = NodeError::StoreFull {
            queued: shared.store.queued_bytes(),
            quota: limits.max_queued_bytes,
        };
        return Err(shared.refused("max_queued_bytes", app, full));
    }
    Ok(Validated {
        drafts,
        payload: req.payload,
        idempotency_key,
        traceparent,
    })
}

/// The receipts one send's transaction records, signed: per envelope, its
/// ACCEPTED receipt and, sent to this node's own agency, its DELIVERED
/// receipt.
type SendReceipts = Vec<(Issued, Option<Issued>)>;

/// Drafts the receipts of `sealed` (unsigned; see `Shared::draft_receipt`).
fn draft_send_receipts(shared: &Shared, sealed: &[Sealed]) -> Vec<(Receipt, Option<Receipt>)> {
    let sender = shared.agency.as_str();
    sealed
        .iter()
        .map(|s| {
            let env = &s.header;
            let accepted = shared.draft_receipt(
                env,
                &s.envelope.envelope,
                ReceiptStatus::Accepted,
                "",
                Outcome::Unspecified,
                Vec::new(),
            );
            let delivered = (env.recipient == sender).then(|| shared.delivered(env, &s.envelope.envelope));
            (accepted, delivered)
        })
        .collect()
}

/// Signs the receipts drafted for several sends (`draft_send_receipts`)
/// in one go (`Shared::sign_together`); each send's come back in order.
async fn sign_send_receipts(
    shared: &Shared,
    drafts: Vec<Vec<(Receipt, Option<Receipt>)>>,
) -> Vec<SendReceipts> {
    let all = drafts
        .iter()
        .flatten()
        .flat_map(|(a, d)| std::iter::once(a).chain(d))
        .cloned()
        .collect();
    let mut signed = shared.sign_together(all).await;
    drafts
        .into_iter()
        .map(|one| {
            one.into_iter()
                .map(|(a, d)| (signed.take(a), d.map(|d| signed.take(d))))
                .collect()
        })
        .collect()
}

/// What `store_send` did with one send.
enum Stored {
    /// Wrote it: its new ids.
    New(Vec<MessageId>),
    /// A TRANSACTION whose key was seen: the original ids, nothing written.
    Seen(Vec<MessageId>),
    /// A recipient no route reaches any more (a reload since the check):
    /// the refusal, nothing written.
    NoRoute(String),
}

/// Where `store_send` puts one envelope.
enum Dest<'a> {
    /// Delivered to this node's own agency, with its DELIVERED receipt.
    Here(&'a Issued),
    /// Queued for the peer on its route.
    Peer(String),
}

/// The writes of one send (records, outbox or inbox, ACCEPTED receipts,
/// the idempotency key). For a TRANSACTION whose key was seen — also by an
/// earlier send in the same transaction — or a recipient no route reaches,
/// writes nothing; so a batch's other sends go on in the same transaction.
fn store_send(
    shared: &Shared,
    tx: &Tx<'_>,
    v: &Validated,
    sealed: &[Sealed],
    receipts: &SendReceipts,
) -> Result<Stored, TxError> {
    let sender = shared.agency.to_string();
    let key = v.idempotency_key.as_deref();
    let key_owner = key_space(shared, v);
    if let Some(key) = key {
        if let Some(ids) = tx.tx_key(&key_owner, key)? {
            return Ok(Stored::Seen(ids));
        }
    }
    // Where each goes, first, so a send refused for one writes nothing.
    let policy = shared.policy();
    let mut dests = Vec::with_capacity(sealed.len());
    for (s, (_, delivered)) in sealed.iter().zip(receipts) {
        let env = &s.header;
        dests.push(match delivered {
            Some(delivered) => Dest::Here(delivered),
            None => match policy.next_hop(&env.recipient) {
                Some(peer) => Dest::Peer(peer),
                None => return Ok(Stored::NoRoute(format!("no route to {}", env.recipient))),
            },
        });
    }
    let mut ids = Vec::with_capacity(sealed.len());
    for ((s, (accepted, _)), dest) in sealed.iter().zip(receipts).zip(dests) {
        let (id, env) = (s.id.to_string(), &s.header);
        let logged = crate::state::audit_envelope(tx, &s.envelope, &id)?;
        let cursor = crate::state::log_own_receipt(tx, &accepted.signed, &id)?;
        let mut record = MessageRecord {
            envelope: Some(s.envelope.clone()),
            payload: Some(s.payload.clone()),
            state: MessageState::Accepted as i32,
            sender_identity: shared.identity.to_string(),
            outgoing: true,
            service: env.service.clone(),
            recipient: env.recipient.clone(),
            // Hashed once, for the ACCEPTED receipt, outside the transaction.
            envelope_sha256: accepted.receipt.envelope_sha256.to_vec(),
            expires_at_ms: expires_ms(env),
            ..Default::default()
        };
        record.push_logged_receipt(cursor, &sha256(&accepted.signed.receipt));
        match dest {
            Dest::Here(delivered) => {
                shared.deliver_local(tx, &s.id, record, env, &s.envelope.envelope, delivered)?;
            }
            Dest::Peer(peer) => {
                tx.put_message(&s.id, &record)?;
                let item = TransferItem {
                    seq: 0,
                    item: Some(transfer_item::Item::Envelope(EnvelopeTransfer {
                        envelope: Some(s.envelope.clone()),
                        payload: Some(s.payload.clone()),
                        hops: vec![sender.clone()],
                        traceparent: v.traceparent.clone(),
                    })),
                };
                let held = antar_store::Held::Audited(logged);
                tx.push_outbox(&peer, &item.encode_to_vec(), held, expires_ms(env))?;
            }
        }
        ids.push(s.id);
    }
    if let Some(key) = key {
        tx.put_tx_key(&key_owner, key, &ids)?;
    }
    Ok(Stored::New(ids))
}

/// After sends are durable: counted, and logged with their trace.
fn sent(shared: &Shared, v: &Validated, ids: &[MessageId]) {
    shared.metrics.sent.inc_by(ids.len() as u64);
    let trace_id = trace::trace_id(&v.traceparent);
    for (draft, id) in v.drafts.iter().zip(ids) {
        tracing::debug!(%id, trace_id, "accepted");
        // A RESPONSE to this node's own agency is in its inbox now.
        if draft.kind == Kind::Response && draft.recipient == shared.agency {
            shared.calls.arrived(&draft.correlation_id, *id);
        }
    }
}

/// The sizes a message may have here, which keep its `Delivery` within a
/// stock gRPC client's 4 MiB (see `config::DEFAULT_MAX_PAYLOAD_BYTES`): of
/// an app's send, and of an envelope a peer transfers for this node's
/// inbox (refused `too_large` if over).
pub(crate) fn check_sizes(
    limits: &crate::config::Limits,
    payload: usize,
    headers: &HashMap<String, String>,
    content_type: &str,
) -> Result<(), NodeError> {
    if payload as u64 > limits.max_payload_bytes {
        return Err(NodeError::invalid(
            "payload",
            format!(
                "{payload} bytes is over max_payload_bytes = {}",
                limits.max_payload_bytes
            ),
        ));
    }
    for (k, v) in headers {
        if k.is_empty() || k.len() > 256 || v.len() > 8192 {
            return Err(NodeError::invalid(
                "headers",
                format!("header {k:?}: names 1..256 bytes, values up to 8 KiB"),
            ));
        }
    }
    if headers.len() > crate::config::MAX_HEADERS {
        return Err(NodeError::invalid(
            "headers",
            format!(
                "{} headers; at most {}",
                headers.len(),
                crate::config::MAX_HEADERS
            ),
        ));
    }
    let header_bytes: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    if header_bytes > crate::config::MAX_HEADER_BYTES {
        return Err(NodeError::invalid(
            "headers",
            format!(
                "{header_bytes} bytes of names and values; at most {} in all",
                crate::config::MAX_HEADER_BYTES
            ),
        ));
    }
    if content_type.len() > 256 {
        return Err(NodeError::invalid(
            "content_type",
            format!("{} bytes; at most 256", content_type.len()),
        ));
    }
    Ok(())
}

/// The longest idempotency key (a TRANSACTION's `correlation_id`).
pub(crate) const MAX_KEY_BYTES: usize = 256;

/// Most recipients of one NOTICE (each an envelope and a payload copy).
pub(crate) const MAX_RECIPIENTS: usize = 64;

/// Where a send's idempotency key is remembered: a TRANSACTION's under the
/// agency, as ever; a NOTICE's or a REQUEST's under `<agency>/notice` or
/// `<agency>/request`, and a `Reply`'s (the REQUEST's id) under
/// `<agency>/reply` (no agency id holds a `/`), so a key of one kind
/// never answers for another.
fn key_space(shared: &Shared, v: &Validated) -> String {
    match v.drafts.first().map(|d| d.kind) {
        Some(Kind::Transaction) | None => shared.agency.to_string(),
        Some(Kind::Request) => format!("{}/request", shared.agency),
        Some(Kind::Response) => format!("{}/reply", shared.agency),
        Some(_) => format!("{}/notice", shared.agency),
    }
}

/// Seals, stores in one transaction (`store_send`) and waits for the flush.
/// For a TRANSACTION whose key was seen, returns the original ids and
/// stores nothing; a recipient no route reaches any more (a reload since
/// the check) is refused with FAILED_PRECONDITION, nothing stored.
async fn accept(shared: &Shared, v: Validated, sealed: Vec<Sealed>) -> Result<Vec<MessageId>, NodeError> {
    accept_acking(shared, v, sealed, None).await
}

/// [`accept`], and in the same transaction, when the send is stored, the
/// ack of `ack` (a message id and its drafted PROCESSED receipt): how
/// `Reply` settles the REQUEST it answers.
async fn accept_acking(
    shared: &Shared,
    v: Validated,
    sealed: Vec<Sealed>,
    ack: Option<(MessageId, Receipt)>,
) -> Result<Vec<MessageId>, NodeError> {
    // Receipts are signed here, outside the transaction (see `Shared::draft_receipt`).
    let drafts = draft_send_receipts(shared, &sealed);
    let receipts = sign_send_receipts(shared, vec![drafts])
        .await
        .pop()
        .unwrap_or_default();
    let processed = match ack {
        Some((id, draft)) => Some((id, shared.sign_together(vec![draft.clone()]).await.take(draft))),
        None => None,
    };
    let stored = shared
        .store
        .transact(|tx| {
            let stored = store_send(shared, tx, &v, &sealed, &receipts)?;
            let new = match (&stored, &processed) {
                (Stored::New(_), Some((id, issued))) => apply_ack(shared, tx, id, issued)?,
                _ => false,
            };
            Ok((stored, new))
        })
        .await
        .map_err(NodeError::from)?;
    let (stored, new) = stored;
    shared.store.durable().await?;
    if let (Stored::New(_), Some((id, _))) = (&stored, &processed) {
        acked(shared, std::slice::from_ref(id), usize::from(new));
    }
    match stored {
        Stored::New(ids) => {
            sent(shared, &v, &ids);
            Ok(ids)
        }
        Stored::Seen(ids) => Ok(ids),
        Stored::NoRoute(refusal) => Err(NodeError::FailedPrecondition(refusal)),
    }
}

/// The sends of one `SendBatch`: each validated apart (a refused one is
/// refused alone, as its unary `Send` would be), then all sealed together,
/// their receipts signed together, and stored by `write_all` (where a
/// TRANSACTION whose key was seen answers its original ids).
async fn send_all(
    shared: &Shared,
    app: &str,
    requests: Vec<SendRequest>,
    traceparent: &str,
) -> Vec<Result<Vec<MessageId>, ItemError>> {
    let mut results: Vec<Result<Vec<MessageId>, ItemError>> = Vec::with_capacity(requests.len());
    let mut valid = Vec::new();
    for (i, r) in requests.into_iter().enumerate() {
        match validate_send(shared, app, r, None, traceparent.to_owned()) {
            Ok(v) => {
                valid.push((i, v));
                results.push(Ok(Vec::new()));
            }
            Err(e) => results.push(Err(item_error(e))),
        }
    }
    // A key an earlier call stored answers its ids, unsigned; a key
    // repeated within this batch is settled by `write_all`.
    match answered(shared, valid.iter().map(|(_, v)| v)) {
        Ok(seen) => {
            let mut kept = Vec::with_capacity(valid.len());
            for ((i, v), seen) in valid.into_iter().zip(seen) {
                match seen {
                    Some(ids) => results[i] = Ok(ids),
                    None => kept.push((i, v)),
                }
            }
            valid = kept;
        }
        Err(e) => {
            let e = item_error(e);
            for (i, _) in valid {
                results[i] = Err(e.clone());
            }
            return results;
        }
    }
    if valid.is_empty() {
        return results;
    }
    // One call to seal them all: split back by each send's number of envelopes.
    let mut sealed = seal_all(shared, valid.iter().map(|(_, v)| v)).await.into_iter();
    let mut ready = Vec::with_capacity(valid.len());
    let mut drafts = Vec::with_capacity(valid.len());
    for (i, v) in valid {
        let own: Vec<Sealed> = sealed.by_ref().take(v.drafts.len()).collect();
        drafts.push(draft_send_receipts(shared, &own));
        ready.push((i, v, own));
    }
    let ready: Vec<(usize, Validated, Vec<Sealed>, SendReceipts)> = ready
        .into_iter()
        .zip(sign_send_receipts(shared, drafts).await)
        .map(|((i, v, own), receipts)| (i, v, own, receipts))
        .collect();
    let stored = write_all(shared, &ready, |tx, (_, v, own, receipts)| {
        store_send(shared, tx, v, own, receipts)
    })
    .await;
    for ((i, v, _, _), stored) in ready.iter().zip(stored) {
        results[*i] = match stored {
            Ok(Stored::New(ids)) => {
                sent(shared, v, &ids);
                Ok(ids)
            }
            Ok(Stored::Seen(ids)) => Ok(ids),
            Ok(Stored::NoRoute(refusal)) => Err(item_error(NodeError::FailedPrecondition(refusal))),
            Err(e) => Err(e),
        };
    }
    results
}

/// Seals the envelopes of `sends` in one go (`Shared::seal_together`), in order.
async fn seal_all<'a>(shared: &Shared, sends: impl IntoIterator<Item = &'a Validated>) -> Vec<Sealed> {
    let prepared = sends
        .into_iter()
        .flat_map(|v| v.drafts.iter().map(|d| d.clone().prepare(v.payload.clone())))
        .collect();
    shared.seal_together(prepared).await
}

async fn send(
    shared: &Shared,
    app: &str,
    req: SendRequest,
    traceparent: String,
) -> Result<Vec<MessageId>, NodeError> {
    let v = validate_send(shared, app, req, None, traceparent)?;
    if let Some(ids) = answered(shared, [&v])?.pop().flatten() {
        return Ok(ids);
    }
    let sealed = seal_all(shared, [&v]).await;
    accept(shared, v, sealed).await
}

/// For each send, the ids its idempotency key already answers (a
/// TRANSACTION's key, a REQUEST's or a `Reply`'s), read before anything
/// is signed and without a transaction (`Store::tx_key`): an app
/// retrying, or a whole `SendBatch` retried, costs the node no signature,
/// and a new key costs no wait. Sends without a key get `None`. A key
/// repeated within one `SendBatch`, or two calls racing with one new key,
/// are settled (and signed) in the transaction that stores (`store_send`).
fn answered<'a>(
    shared: &Shared,
    sends: impl IntoIterator<Item = &'a Validated>,
) -> Result<Vec<Option<Vec<MessageId>>>, NodeError> {
    sends
        .into_iter()
        .map(|v| match v.idempotency_key.as_deref() {
            Some(key) => Ok(shared.store.tx_key(&key_space(shared, v), key)?),
            None => Ok(None),
        })
        .collect()
}

fn delivery(record: &MessageRecord, attempt: u32) -> Delivery {
    Delivery {
        envelope: record.envelope.clone(),
        payload: record.payload.clone(),
        sender_identity: record.sender_identity.clone(),
        attempt,
    }
}

fn parse_id(field: &'static str, s: &str) -> Result<MessageId, NodeError> {
    MessageId::parse(s).map_err(|e| NodeError::invalid(field, e))
}

/// Most items one `SendBatch` or `AckBatch` call may carry.
pub(crate) const MAX_BATCH: usize = 1_000;

fn check_batch(field: &'static str, n: usize) -> Result<(), NodeError> {
    if n > MAX_BATCH {
        return Err(NodeError::invalid(
            field,
            format!("{n} items; at most {MAX_BATCH} per call"),
        ));
    }
    Ok(())
}

/// Writes the items of a batch call with `write`, all in one transaction,
/// then waits for the flush. Should that transaction abort (a record that
/// does not decode), each is written in a transaction of its own instead,
/// so only the item at fault fails, as its unary call would; a store
/// failure fails every item.
async fn write_all<I, T>(
    shared: &Shared,
    items: &[I],
    write: impl Fn(&Tx<'_>, &I) -> Result<T, TxError>,
) -> Vec<Result<T, ItemError>> {
    let together = shared
        .store
        .transact(|tx| {
            items
                .iter()
                .map(|item| write(tx, item))
                .collect::<Result<Vec<_>, _>>()
        })
        .await;
    let written: Vec<Result<T, ItemError>> = match together {
        Ok(all) => all.into_iter().map(Ok).collect(),
        Err(Ok(_abort)) if items.len() > 1 => {
            let mut apart = Vec::with_capacity(items.len());
            for item in items {
                let one = shared.store.transact(|tx| write(tx, item)).await;
                apart.push(one.map_err(|e| item_error(e.into())));
            }
            apart
        }
        Err(e) => {
            let e = item_error(e.into());
            return items.iter().map(|_| Err(e.clone())).collect();
        }
    };
    match shared.store.durable().await {
        Ok(()) => written,
        Err(e) => {
            let e = item_error(e.into());
            written.into_iter().map(|w| w.and(Err(e.clone()))).collect()
        }
    }
}

/// What a batch answers for an item its unary call would have failed.
fn item_error(e: NodeError) -> ItemError {
    let status = Status::from(e);
    ItemError {
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
}

/// One `AckRequest`, checked and applied.
/// An `Ack`; true when it settled the message (not acked before).
async fn ack_request(shared: &Shared, services: &Services, r: AckRequest) -> Result<bool, NodeError> {
    let (id, outcome) = parse_ack(&r)?;
    ack(shared, services, id, outcome, &r.result).await
}

fn parse_ack(r: &AckRequest) -> Result<(MessageId, Outcome), NodeError> {
    let id = parse_id("message_id", &r.message_id)?;
    let outcome = Outcome::try_from(r.outcome).map_err(|_| NodeError::invalid("outcome", "unknown value"))?;
    Ok((id, outcome))
}

/// Takes `id` out of the inbox for good and routes a PROCESSED receipt;
/// true. Acking again is a no-op: false.
async fn ack(
    shared: &Shared,
    services: &Services,
    id: MessageId,
    outcome: Outcome,
    result: &[u8],
) -> Result<bool, NodeError> {
    let Some(draft) = check_ack(shared, services, &id, outcome, result)? else {
        return Ok(false);
    };
    let processed = shared.sign_together(vec![draft.clone()]).await.take(draft);
    let new = shared
        .store
        .transact(|tx| apply_ack(shared, tx, &id, &processed))
        .await
        .map_err(NodeError::from)?;
    shared.store.durable().await?;
    acked(shared, std::slice::from_ref(&id), usize::from(new));
    Ok(new)
}

/// Checks an ack of `id` by an app owning `services` and drafts its
/// PROCESSED receipt (unsigned): everything before the transaction.
/// `None` when `id` was acked already: nothing to sign or write, the ack
/// is a no-op (so acking one message over and over costs a read).
fn check_ack(
    shared: &Shared,
    services: &Services,
    id: &MessageId,
    outcome: Outcome,
    result: &[u8],
) -> Result<Option<Receipt>, NodeError> {
    let record = shared
        .store
        .message(id)?
        .ok_or_else(|| NodeError::NotFound(format!("message {id} is not held by this node")))?;
    if !services.contains(&record.service) {
        return Err(NodeError::PermissionDenied(format!(
            "message {id} is for service {} which this app does not own",
            record.service
        )));
    }
    let signed = record.envelope.unwrap_or_default();
    let env = Envelope::decode(signed.envelope.clone()).unwrap_or_default();
    let outcome = match (Kind::try_from(env.kind), outcome) {
        (Ok(Kind::Transaction), Outcome::Unspecified) => {
            return Err(NodeError::invalid(
                "outcome",
                "a TRANSACTION is acked with OUTCOME_COMMITTED or OUTCOME_REJECTED",
            ))
        }
        (Ok(Kind::Transaction), o) => o,
        (_, Outcome::Unspecified) => Outcome::Unspecified,
        (_, o) => o,
    };
    // Checked after the request itself, so an ack refused before is
    // refused the same way after the message was acked. Nothing to ack: a
    // message acked already, or one this node sent to another agency
    // (never in an inbox here).
    let elsewhere =
        record.outgoing && !record.recipient.is_empty() && record.recipient != shared.agency.as_str();
    if record.state == MessageState::Processed as i32 || elsewhere {
        return Ok(None);
    }
    let result_digest = if result.is_empty() {
        Vec::new()
    } else {
        sha256(result).to_vec()
    };
    // Signed outside the transaction (see `Shared::draft_receipt`); wasted only
    // when another ack of it commits first.
    Ok(Some(shared.draft_receipt(
        &env,
        &signed.envelope,
        ReceiptStatus::Processed,
        "",
        outcome,
        result_digest,
    )))
}

/// The writes of one ack: `id` out of its inbox, its record PROCESSED, the
/// signed receipt on its way. Nothing when `id` was acked already.
/// Whether it acked `id` now.
fn apply_ack(shared: &Shared, tx: &Tx<'_>, id: &MessageId, processed: &Issued) -> Result<bool, TxError> {
    if !tx.remove_inbox(id)? {
        return Ok(false);
    }
    let logged = shared.route_issued(tx, processed)?;
    tx.update_message(id, |record| {
        if !record.outgoing {
            record.state = MessageState::Processed as i32;
            record.processed_audit_index = logged;
        }
    })?;
    Ok(true)
}

/// After acks of `ids` are durable: their leases end, and the receive loops
/// wake now (an ack frees a slot of its stream's `max_in_flight`), not at
/// their next tick or arrival. `new` of them were acked now (the rest
/// before): what `antar_processed_total` counts.
fn acked(shared: &Shared, ids: &[MessageId], new: usize) {
    let mut leases = shared.leases.lock().unwrap_or_else(|p| p.into_inner());
    for id in ids {
        leases.held.remove(id);
    }
    drop(leases);
    shared.store.inbox_notify().notify_waiters();
    shared.metrics.processed.inc_by(new as u64);
}

/// The acks of one `AckBatch`: each checked apart (an item refused is
/// refused alone, as its unary `Ack` would be), their receipts signed
/// together, and all the others written by `write_all`.
/// An `AckBatch`: each ack's result, `Ok(true)` when it settled its
/// message, `Ok(false)` when the message was acked before.
async fn ack_all(
    shared: &Shared,
    services: &Services,
    acks: Vec<AckRequest>,
) -> Vec<Result<bool, ItemError>> {
    let mut results = Vec::with_capacity(acks.len());
    let mut ready = Vec::new();
    for (i, r) in acks.into_iter().enumerate() {
        let checked = parse_ack(&r).and_then(|(id, outcome)| {
            let draft = check_ack(shared, services, &id, outcome, &r.result)?;
            Ok(draft.map(|draft| (i, id, draft)))
        });
        match checked {
            Ok(item) => {
                results.push(Ok(item.is_some()));
                ready.extend(item);
            }
            Err(e) => results.push(Err(item_error(e))),
        }
    }
    if ready.is_empty() {
        return results;
    }
    let drafts = ready.iter().map(|(_, _, draft)| draft.clone()).collect();
    let mut signed = shared.sign_together(drafts).await;
    let ready: Vec<(usize, MessageId, Issued)> = ready
        .into_iter()
        .map(|(i, id, draft)| (i, id, signed.take(draft)))
        .collect();
    let written = write_all(shared, &ready, |tx, (_, id, processed)| {
        apply_ack(shared, tx, id, processed)
    })
    .await;
    let mut done = Vec::with_capacity(ready.len());
    let mut new = 0;
    for ((i, id, _), written) in ready.into_iter().zip(written) {
        match written {
            Ok(now) => {
                new += usize::from(now);
                done.push(id);
                results[i] = Ok(now);
            }
            Err(e) => results[i] = Err(e),
        }
    }
    acked(shared, &done, new);
    results
}

/// Whether a call that failed with `code` failed by the caller's doing
/// (what it asked for), not the node's (a storage failure, a stop).
fn app_fault(code: Code) -> bool {
    !matches!(
        code,
        Code::Internal | Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled
    )
}

/// The streams an app holds a bounded number of.
#[derive(Debug, Clone, Copy)]
enum StreamKind {
    Receive,
    WatchReceipts,
}

impl AgencyService {
    /// The app making a call under `limits.app_calls_per_sec` (`Receive`,
    /// `Ack`, `AckBatch`, `Reply`, `Track`, `WatchReceipts`), charged one
    /// token of its bucket; refused while the bucket is empty. Acks and
    /// replies are settled once answered ([`Self::settled`]): one that
    /// settles a message gets its token back (a message is settled once,
    /// so those are bounded by what the node delivered, and a RESPONSE is
    /// charged to the sends). Sends have their own bucket,
    /// `limits.app_sends_per_sec`, so a flood of these calls does not take
    /// the app's sends away, nor another app's calls.
    fn calling_app<T>(&self, req: &Request<T>) -> Result<String, NodeError> {
        let app = auth::app(&self.shared, req)?;
        if !self.shared.app_calls.allow(&app, 1) {
            let key = "app_calls_per_sec";
            let most = self.shared.limits().app_calls_per_sec;
            let refusal = format!("app {app} is over limits.{key} = {most}; slow down and retry");
            return Err(self.shared.limited(key, &app, refusal));
        }
        Ok(app)
    }

    /// Settles the calls bucket once a call of acks or replies is
    /// answered, having paid `paid` tokens: it costs one for each of them
    /// that did nothing by the app's fault (`wasted`: refused, or acked or
    /// answered before), and at least one when none settled a message (a
    /// node fault is not the app's, but the call still costs its entry).
    /// The difference goes back, or is taken into debt.
    fn settled(&self, app: &str, paid: usize, wasted: usize, settled: usize) {
        let cost = if settled == 0 { wasted.max(1) } else { wasted };
        self.shared.app_calls.settle(app, cost as i64 - paid as i64);
    }

    /// A `Reply` from `app`, and whether it sent a RESPONSE (false: the
    /// REQUEST was answered before, and the first answer's id comes back).
    async fn answer(
        &self,
        app: &str,
        req: Request<ReplyRequest>,
    ) -> Result<(Response<SendResponse>, bool), Status> {
        let services = self.services_of(app)?;
        let started = Instant::now();
        let traceparent = trace::from_metadata(req.metadata());
        let r = req.into_inner();
        let request_id = parse_id("request_id", &r.request_id)?;
        let record = self
            .shared
            .store
            .message(&request_id)
            .map_err(NodeError::from)?
            .ok_or_else(|| NodeError::NotFound(format!("request {request_id} is not held by this node")))?;
        let env = Envelope::decode(record.envelope.unwrap_or_default().envelope).unwrap_or_default();
        if env.kind != Kind::Request as i32 || env.recipient != self.shared.agency.as_str() {
            return Err(NodeError::FailedPrecondition(format!(
                "{request_id} is not a REQUEST received by this node"
            ))
            .into());
        }
        if !services.contains(&env.service) {
            return Err(NodeError::PermissionDenied(format!(
                "app {app} does not own service {}",
                env.service
            ))
            .into());
        }
        // The REQUEST is settled with its answer, as an Ack would: the
        // RESPONSE and the REQUEST's PROCESSED receipt are one transaction.
        // No result digest: an unsalted hash of a short answer could be
        // guessed from the log (the RESPONSE's own envelope links them).
        let processed = check_ack(&self.shared, &services, &request_id, Outcome::Unspecified, &[])?;
        let send_req = SendRequest {
            kind: Kind::Response as i32,
            recipients: vec![env.sender.clone()],
            service: env.service.clone(),
            payload: r.payload,
            content_type: r.content_type,
            headers: r.headers,
            idempotency_key: String::new(),
            ttl: None,
        };
        let mut v = validate_send(
            &self.shared,
            app,
            send_req,
            Some(request_id.to_string()),
            traceparent,
        )?;
        // One answer per REQUEST: a Reply repeated (a retry after a lost
        // answer, two racing) answers the first RESPONSE's id, sends none.
        v.idempotency_key = Some(request_id.to_string());
        let (ids, sent) = match answered(&self.shared, [&v])?.pop().flatten() {
            Some(ids) => (ids, false),
            None => {
                let sealed = seal_all(&self.shared, [&v]).await;
                // An acked REQUEST has nothing left to settle.
                let ack = processed.map(|draft| (request_id, draft));
                (accept_acking(&self.shared, v, sealed, ack).await?, true)
            }
        };
        self.shared.metrics.send_seconds.observe(started.elapsed());
        let response = Response::new(SendResponse {
            message_ids: ids.iter().map(ToString::to_string).collect(),
        });
        Ok((response, sent))
    }

    /// Counts a new stream of `app` until the slot drops; refused past
    /// its limit, naming the key.
    fn open_stream(&self, app: &str, kind: StreamKind) -> Result<OpenStream, NodeError> {
        let limits = self.shared.limits();
        let (counts, most, what, key) = match kind {
            StreamKind::Receive => (
                &self.shared.receive_streams,
                limits.max_receive_streams_per_app,
                "Receive",
                "max_receive_streams_per_app",
            ),
            StreamKind::WatchReceipts => (
                &self.shared.watch_streams,
                limits.max_watch_streams_per_app,
                "WatchReceipts",
                "max_watch_streams_per_app",
            ),
        };
        counts.open(app, most).map_err(|open| {
            let refusal = format!(
                "app {app} holds {open} {what} streams, limits.{key} = {most}; close one or read from one stream"
            );
            self.shared.limited(key, app, refusal)
        })
    }

    fn services_of(&self, app: &str) -> Result<Services, NodeError> {
        self.shared.policy().app(app).cloned().ok_or_else(|| {
            NodeError::PermissionDenied(format!("app {app} is not configured on this node ([[apps]])"))
        })
    }
}

#[tonic::async_trait]
impl Agency for AgencyService {
    async fn send(&self, req: Request<SendRequest>) -> Result<Response<SendResponse>, Status> {
        let app = auth::app(&self.shared, &req)?;
        let started = Instant::now();
        let traceparent = trace::from_metadata(req.metadata());
        let ids = send(&self.shared, &app, req.into_inner(), traceparent).await?;
        self.shared.metrics.send_seconds.observe(started.elapsed());
        Ok(Response::new(SendResponse {
            message_ids: ids.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn call(&self, req: Request<SendRequest>) -> Result<Response<Delivery>, Status> {
        // The caller's deadline runs from now, as tonic's does: the time
        // sealing and accepting take is part of it.
        let entered = tokio::time::Instant::now();
        let app = auth::app(&self.shared, &req)?;
        let services = self.services_of(&app)?;
        let traceparent = trace::from_metadata(req.metadata());
        let deadline = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let mut r = req.into_inner();
        if r.kind == Kind::Unspecified as i32 {
            r.kind = Kind::Request as i32;
        }
        if r.kind != Kind::Request as i32 {
            return Err(NodeError::invalid("kind", "Call sends a KIND_REQUEST").into());
        }
        if !r.idempotency_key.is_empty() {
            return Err(NodeError::invalid(
                "idempotency_key",
                "Call takes none; to retry safely, Send a KIND_REQUEST with an idempotency_key and Receive its RESPONSE",
            )
            .into());
        }
        let v = validate_send(&self.shared, &app, r, None, traceparent)?;
        if v.drafts.len() != 1 {
            return Err(NodeError::invalid("recipients", "Call takes exactly one recipient").into());
        }
        let sealed = seal_all(&self.shared, [&v]).await;
        let request_id = sealed[0].id.to_string();
        let stream = self
            .shared
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next_stream();
        let rx = self.shared.calls.wait(&request_id, stream);
        let _guard = CallGuard {
            shared: &self.shared,
            request_id: request_id.clone(),
        };
        accept(&self.shared, v, sealed).await?;
        let wait = async {
            match rx.await {
                Ok(id) => Ok(id),
                Err(_) => Err(NodeError::FailedPrecondition("node is shutting down".into())),
            }
        };
        let response_id = match deadline {
            // Stop waiting a little before the caller's own timer (and
            // tonic's, which would drop this call) fires: the caller gets
            // our DEADLINE_EXCEEDED, with the RESPONSE not acked and so
            // still to come in the inbox, and a RESPONSE that came in time
            // has that margin to be acked and returned.
            Some(d) => tokio::time::timeout_at(entered + d - (d / 20).min(Duration::from_millis(100)), wait).await.map_err(|_| {
                NodeError::DeadlineExceeded(format!(
                    "no RESPONSE to request {request_id} before the deadline; it stays tracked and a late response goes to the inbox"
                ))
            })??,
            None => wait.await?,
        };
        let record = self
            .shared
            .store
            .message(&response_id)
            .map_err(NodeError::from)?
            .ok_or_else(|| NodeError::NotFound(format!("response {response_id} vanished")))?;
        ack(&self.shared, &services, response_id, Outcome::Unspecified, &[]).await?;
        Ok(Response::new(delivery(&record, 1)))
    }

    type ReceiveStream = BoxStream<Delivery>;

    async fn receive(&self, req: Request<ReceiveRequest>) -> Result<Response<Self::ReceiveStream>, Status> {
        let app = self.calling_app(&req)?;
        let owned = self.services_of(&app)?;
        let r = req.into_inner();
        let mut wanted = Vec::new();
        for s in &r.services {
            let name = ServiceName::parse(s).map_err(|e| NodeError::invalid("services", e))?;
            if !owned.contains(name.as_str()) {
                return Err(
                    NodeError::PermissionDenied(format!("app {app} does not own service {name}")).into(),
                );
            }
            wanted.push(name.to_string());
        }
        let scope = if wanted.is_empty() {
            owned
        } else {
            Services::Some(wanted.into_iter().collect())
        };
        let max = if r.max_in_flight == 0 {
            self.shared.limits().max_in_flight
        } else {
            r.max_in_flight.min(10_000)
        };
        let slot = self.open_stream(&app, StreamKind::Receive)?;
        let stream = self
            .shared
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next_stream();
        let (tx, rx) = mpsc::channel(max as usize);
        let unread = Arc::new(Unread::default());
        let shared = self.shared.clone();
        let sent = Sent {
            tx,
            unread: unread.clone(),
        };
        tokio::spawn(async move {
            receive_loop(shared, scope, max, stream, sent).await;
            drop(slot);
        });
        let deliveries = ReceiverStream::new(rx).map(move |(delivery, bytes)| {
            unread.taken(bytes);
            delivery
        });
        Ok(Response::new(Box::pin(deliveries)))
    }

    async fn ack(&self, req: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        let app = self.calling_app(&req)?;
        let services = self.services_of(&app)?;
        let acked = ack_request(&self.shared, &services, req.into_inner()).await;
        let (wasted, settled) = match &acked {
            Ok(settled) => (usize::from(!settled), usize::from(*settled)),
            Err(e) => (usize::from(app_fault(e.code())), 0),
        };
        self.settled(&app, 1, wasted, settled);
        acked?;
        Ok(Response::new(AckResponse {}))
    }

    async fn send_batch(
        &self,
        req: Request<SendBatchRequest>,
    ) -> Result<Response<SendBatchResponse>, Status> {
        let app = auth::app(&self.shared, &req)?;
        let traceparent = trace::from_metadata(req.metadata());
        let requests = req.into_inner().requests;
        check_batch("requests", requests.len())?;
        let started = Instant::now();
        let results = send_all(&self.shared, &app, requests, &traceparent).await;
        for _ in results.iter().filter(|r| r.is_ok()) {
            self.shared.metrics.send_seconds.observe(started.elapsed());
        }
        let results = results
            .into_iter()
            .map(|r| SendResult {
                result: Some(match r {
                    Ok(ids) => send_result::Result::Sent(SendResponse {
                        message_ids: ids.iter().map(ToString::to_string).collect(),
                    }),
                    Err(e) => send_result::Result::Error(e),
                }),
            })
            .collect();
        Ok(Response::new(SendBatchResponse { results }))
    }

    async fn ack_batch(&self, req: Request<AckBatchRequest>) -> Result<Response<AckBatchResponse>, Status> {
        let app = self.calling_app(&req)?;
        let services = self.services_of(&app)?;
        let acks = req.into_inner().acks;
        check_batch("acks", acks.len())?;
        // Paid for in full before any of it runs, as if every ack were
        // wasted: a call cancelled midway keeps what it cost.
        let paid = acks.len().max(1);
        self.shared.app_calls.settle(&app, paid as i64 - 1);
        let results = ack_all(&self.shared, &services, acks).await;
        let settled = results.iter().filter(|r| matches!(r, Ok(true))).count();
        let wasted = results
            .iter()
            .filter(|r| match r {
                Ok(settled) => !settled,
                Err(e) => app_fault(Code::from(e.code)),
            })
            .count();
        self.settled(&app, paid, wasted, settled);
        let results = results
            .into_iter()
            .map(|r| AckResult {
                result: Some(match r {
                    Ok(_) => ack_result::Result::Acked(AckResponse {}),
                    Err(e) => ack_result::Result::Error(e),
                }),
            })
            .collect();
        Ok(Response::new(AckBatchResponse { results }))
    }

    async fn reply(&self, req: Request<ReplyRequest>) -> Result<Response<SendResponse>, Status> {
        let app = self.calling_app(&req)?;
        let answered = self.answer(&app, req).await;
        let (wasted, settled) = match &answered {
            Ok((_, sent)) => (usize::from(!sent), usize::from(*sent)),
            Err(st) => (usize::from(app_fault(st.code())), 0),
        };
        self.settled(&app, 1, wasted, settled);
        answered.map(|(response, _)| response)
    }

    async fn track(&self, req: Request<TrackRequest>) -> Result<Response<TrackResponse>, Status> {
        self.calling_app(&req)?;
        let id = parse_id("message_id", &req.get_ref().message_id)?;
        let record = self
            .shared
            .store
            .message(&id)
            .map_err(NodeError::from)?
            .ok_or_else(|| NodeError::NotFound(format!("message {id} is not known to this node")))?;
        Ok(Response::new(TrackResponse {
            state: record.state,
            envelope: record.envelope,
            receipts: record.receipts,
            reason: record.reason,
        }))
    }

    type WatchReceiptsStream = BoxStream<ReceiptEvent>;

    async fn watch_receipts(
        &self,
        req: Request<WatchReceiptsRequest>,
    ) -> Result<Response<Self::WatchReceiptsStream>, Status> {
        let app = self.calling_app(&req)?;
        let slot = self.open_stream(&app, StreamKind::WatchReceipts)?;
        let mut cursor = req.get_ref().after_cursor;
        let shared = self.shared.clone();
        let (tx, rx) = mpsc::channel(256);
        crate::spawn_feed("Agency.WatchReceipts", tx, |tx| async move {
            let _slot = slot;
            let notify = shared.store.receipt_notify();
            loop {
                let notified = notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let batch = match shared.store.receipts_after(cursor, 256) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(NodeError::from(e).into())).await;
                        return;
                    }
                };
                let empty = batch.is_empty();
                for (c, bytes) in batch {
                    cursor = c;
                    let receipt = SignedReceipt::decode(Bytes::from(bytes)).unwrap_or_default();
                    if tx
                        .send(Ok(ReceiptEvent {
                            cursor: c,
                            receipt: Some(receipt),
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                if empty {
                    tokio::select! {
                        _ = notified => {}
                        _ = tx.closed() => return,
                        _ = shared.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Bytes of unacked deliveries (payload and envelope, as the inbox counts
/// them) a `Receive` stream holds leased at once, besides `max_in_flight`
/// (one larger delivery is leased alone): a prefetch size, as AMQP has.
/// The same bound holds for what the stream holds unread in memory
/// ([`Unread`], copies whose lease ran out included): with `max_in_flight`
/// up to 10,000 and payloads up to 4 MiB, the count alone would let one
/// slow reader pin gigabytes.
const MAX_IN_FLIGHT_BYTES: u64 = 16 << 20;

/// Deliveries a `Receive` stream has handed to its channel that tonic has
/// not taken yet: what the node holds in memory for a client that reads
/// slowly or not at all, copies of deliveries whose lease ran out included.
#[derive(Default)]
struct Unread {
    items: std::sync::atomic::AtomicU32,
    bytes: std::sync::atomic::AtomicU64,
}

impl Unread {
    fn now(&self) -> (u32, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.items.load(Relaxed), self.bytes.load(Relaxed))
    }

    fn taken(&self, bytes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.items.fetch_sub(1, Relaxed);
        self.bytes.fetch_sub(bytes, Relaxed);
    }
}

/// A `Receive` stream's sending side: every delivery counted in `unread`
/// until tonic takes it.
struct Sent {
    tx: mpsc::Sender<(Result<Delivery, Status>, u64)>,
    unread: Arc<Unread>,
}

impl Sent {
    /// Hands `delivery` on, counted as `bytes` (its lease's, as the inbox
    /// sized it); false when the client has gone. Never waits: the loop
    /// leases no more than the channel has room for.
    async fn send(&self, delivery: Delivery, bytes: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.unread.items.fetch_add(1, Relaxed);
        self.unread.bytes.fetch_add(bytes, Relaxed);
        self.tx.send((Ok(delivery), bytes)).await.is_ok()
    }
}

/// Ends a `Call`'s wait however the call ends; a RESPONSE it was handed
/// but did not ack (a cancel) goes back to the `Receive` streams.
struct CallGuard<'a> {
    shared: &'a Shared,
    request_id: String,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        if let Some(stream) = self.shared.calls.end(&self.request_id) {
            release(self.shared, stream);
        }
    }
}

/// `grpc-timeout` header value, e.g. `1500m`, as a duration.
/// At most 8 digits, as the gRPC spec has it (so no product overflows);
/// anything else is no timeout.
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    if num.is_empty() || num.len() > 8 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Leases deliveries to one `Receive` stream: at most `max` unacked at a
/// time; a lease that times out makes the message visible again.
async fn receive_loop(shared: Arc<Shared>, scope: Services, max: u32, stream: u64, sent: Sent) {
    let tx = &sent.tx;
    let notify = shared.store.inbox_notify();
    let visibility = shared.config.visibility_timeout();
    // Services named: scanned in name order; all: as the inbox holds them.
    let listed: Option<Vec<String>> = match &scope {
        Services::All => None,
        Services::Some(set) => {
            let mut names: Vec<String> = set.iter().cloned().collect();
            names.sort();
            Some(names)
        }
    };
    let mut resume = Resume::default();
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let now = Instant::now();
        let mut to_send = Vec::new();
        let wake_by;
        {
            let mut leases = shared.leases.lock().unwrap_or_else(|p| p.into_inner());
            resume.check(&leases, now);
            // Deliveries in flight on this stream, and the earliest any
            // lease runs out.
            let (mut in_flight, mut in_flight_bytes) = (0u32, 0u64);
            let mut earliest: Option<Instant> = None;
            for l in leases.held.values().filter(|l| l.until > now) {
                if l.stream == stream {
                    in_flight += 1;
                    in_flight_bytes += l.bytes;
                }
                earliest = sooner(earliest, l.until);
            }
            // What this stream holds unread (in memory), stale copies
            // included: bounded like what it holds leased.
            let (unread, unread_bytes) = sent.unread.now();
            let (mut leased_now, mut leased_bytes) = (0u32, 0u64);
            let mut service: Option<String> = None;
            let mut listed_at = 0;
            let mut full = false;
            while in_flight < max && unread + leased_now < max && !full {
                let next = match &listed {
                    Some(names) => names.get(listed_at).cloned(),
                    None => shared.store.next_inbox_service(service.as_deref()).ok().flatten(),
                };
                let Some(name) = next else { break };
                listed_at += 1;
                let mut mark = resume.after.get(&name).copied();
                for entry in shared.store.inbox_after(&name, mark) {
                    if in_flight >= max || unread + leased_now >= max {
                        break;
                    }
                    let Ok((seq, entry)) = entry else { continue };
                    let Ok(bytes) = <[u8; 16]>::try_from(entry.message_id.as_slice()) else {
                        continue;
                    };
                    let id = MessageId::from_bytes(bytes);
                    // Leased now, to this stream or another, or leased
                    // here: either way the next scan starts after it.
                    let attempt = match leases.held.get(&id) {
                        Some(l) if l.until > now => {
                            mark = Some(seq);
                            continue;
                        }
                        Some(l) => l.attempt + 1,
                        None => 1,
                    };
                    let size = entry.size.min(MAX_IN_FLIGHT_BYTES);
                    let over = in_flight_bytes + size > MAX_IN_FLIGHT_BYTES
                        || unread_bytes + leased_bytes + size > MAX_IN_FLIGHT_BYTES;
                    if over && (in_flight > 0 || unread > 0) {
                        // Taken by the scan after an ack or a read frees room.
                        full = true;
                        break;
                    }
                    mark = Some(seq);
                    leases.held.insert(
                        id,
                        Lease {
                            until: now + visibility,
                            attempt,
                            stream,
                            bytes: size,
                        },
                    );
                    earliest = sooner(earliest, now + visibility);
                    in_flight += 1;
                    in_flight_bytes += size;
                    leased_now += 1;
                    leased_bytes += size;
                    to_send.push((id, attempt, size));
                }
                if let Some(seq) = mark {
                    resume.after.insert(name.clone(), seq);
                }
                service = Some(name);
            }
            resume.valid_until = earliest;
            wake_by = earliest.map_or(now + TICK, |e| e.min(now + TICK));
        }
        // One reader for the batch: messages delivered together were
        // logged together, and their bodies are read out of the same runs.
        let records = shared.store.messages();
        for (id, attempt, size) in to_send {
            let record = match records.get(&id) {
                Ok(Some(r)) => r,
                failed => {
                    // Not delivered: set aside on no stream for a few
                    // seconds — taking none of this stream's slots, not
                    // tried on every wake-up — then tried again, with the
                    // operator told which message cannot be read.
                    let error = match failed {
                        Err(e) => e.to_string(),
                        _ => "no message record".to_owned(),
                    };
                    tracing::warn!(%id, %error, retry_in_s = UNREADABLE_RETRY.as_secs(),
                        "an inbox entry's message cannot be read; not delivered");
                    let until = Instant::now() + UNREADABLE_RETRY;
                    let mut leases = shared.leases.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(l) = leases.held.get_mut(&id).filter(|l| l.stream == stream) {
                        l.stream = NO_STREAM;
                        l.until = until;
                        l.attempt = l.attempt.saturating_sub(1);
                    }
                    resume.valid_until = sooner(resume.valid_until, until);
                    continue;
                }
            };
            if shared.calls.withhold(&record, &id, stream, &shared.leases) {
                continue;
            }
            if !sent.send(delivery(&record, attempt), size).await {
                release(&shared, stream);
                return;
            }
        }
        // Not held through the wait, with the log runs it keeps.
        drop(records);
        tokio::select! {
            _ = notified => {}
            _ = tx.closed() => {
                release(&shared, stream);
                return;
            }
            _ = tokio::time::sleep_until(wake_by.into()) => {}
            _ = shared.shutdown.cancelled() => {
                release(&shared, stream);
                return;
            }
        }
    }
}

/// The earlier of `at` and `then`, if there is an `at`.
fn sooner(at: Option<Instant>, then: Instant) -> Option<Instant> {
    Some(at.map_or(then, |at| at.min(then)))
}

/// The longest a `Receive` stream waits between scans with nothing to wake it.
const TICK: Duration = Duration::from_secs(1);

/// How long a leased delivery whose message cannot be read is set aside
/// before a stream tries it again.
const UNREADABLE_RETRY: Duration = Duration::from_secs(5);

/// The stream of a lease that belongs to none (stream ids start at 1).
const NO_STREAM: u64 = 0;

/// Where a `Receive` stream's next scan of the inbox starts: per service,
/// after the last entry it found leased (to itself or to another stream).
/// Every entry up to there is leased or gone, so a wake-up (an arrival, an
/// ack) reads only what came after, not every delivery in flight again.
/// The marks are dropped once a lease may have gone back: a stream closed
/// ([`Leases::returned`] moved on) or a lease ran out (`valid_until`).
#[derive(Default)]
struct Resume {
    after: HashMap<String, u64>,
    returned: u64,
    /// The earliest a lease held at the last scan runs out.
    valid_until: Option<Instant>,
}

impl Resume {
    fn check(&mut self, leases: &Leases, now: Instant) {
        if leases.returned != self.returned || self.valid_until.is_some_and(|t| now >= t) {
            self.after.clear();
            self.returned = leases.returned;
        }
    }
}

/// A closed stream gives its leases back, so its deliveries go to the next receiver at once.
fn release(shared: &Shared, stream: u64) {
    let now = Instant::now();
    let mut leases = shared.leases.lock().unwrap_or_else(|p| p.into_inner());
    let mut gave_back = false;
    for lease in leases
        .held
        .values_mut()
        .filter(|l| l.stream == stream && l.until > now)
    {
        lease.until = now;
        gave_back = true;
    }
    // Other streams' scan marks may have passed these: they start over.
    // A stream that held nothing leaves them be.
    leases.returned += u64::from(gave_back);
    drop(leases);
    if gave_back {
        shared.store.inbox_notify().notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_spec_has_them() {
        assert_eq!(parse_grpc_timeout("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_grpc_timeout("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        // Over 8 digits (this one overflowed u64 seconds before), signs,
        // fractions, no digits or no unit: no timeout, no panic.
        for bad in [
            "",
            "m",
            "123456789S",
            "9999999999999999H",
            "12x",
            "-1S",
            "+1S",
            "1.5S",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}
