//! One forwarder per peer: keeps a `Transfer` stream open, sends the peer's
//! outbox in batches with a bounded window in flight, and deletes an item
//! only after the peer's STORED or DUPLICATE. Failures back off
//! exponentially with full jitter, capped; a peer that is down only makes
//! its queue grow.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prost::bytes::Bytes;
use prost::Message;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use antar_core::time::unix_millis;
use antar_core::wire::peer_client::PeerClient;
use antar_core::wire::{
    transfer_item, CustodyStatus, Envelope, ItemAck, MessageState, Receipt, TransferAck, TransferBatch,
    TransferItem,
};
use antar_core::MessageId;
use antar_store::Queued;

use crate::error::NodeError;
use crate::state::{lock, Shared};

/// Most bytes in one batch, so a batch of large payloads stays well under the frame limit.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// Starts, on `runtime`, a forwarder for each peer of the policy that has
/// none. One whose peer left the policy ends by itself (`still_a_peer`);
/// what it had queued moves to a new route ([`rerouter`]).
pub(crate) fn start(shared: &Arc<Shared>, runtime: &tokio::runtime::Handle) {
    let policy = shared.policy();
    let mut running = lock(&shared.forwarders);
    for (peer, _) in policy.peers() {
        if !running.contains_key(peer) {
            let task = runtime.spawn(run(shared.clone(), peer.clone(), shared.shutdown.clone()));
            running.insert(peer.clone(), task);
        }
    }
}

/// Every forwarder's task, for a stopping node to await.
pub(crate) fn take_all(shared: &Shared) -> Vec<tokio::task::JoinHandle<()>> {
    lock(&shared.forwarders).drain().map(|(_, task)| task).collect()
}

/// `peer`'s address while it is in the policy; otherwise its forwarder
/// leaves the registry (under its lock, so a reload that brings the peer
/// back starts a new one, and never two at once).
fn still_a_peer(shared: &Shared, peer: &str) -> Option<String> {
    let mut running = lock(&shared.forwarders);
    let addr = shared.policy().peer_addr(peer);
    if addr.is_none() {
        running.remove(peer);
        lock(&shared.peer_health).remove(peer);
        tracing::info!(%peer, "peer no longer in the config; its forwarder stops");
    }
    addr
}

async fn run(shared: Arc<Shared>, peer: String, shutdown: CancellationToken) {
    let limits = shared.limits().clone();
    let initial = Duration::from_millis(limits.retry_initial_ms);
    let mut delay = initial;
    let notify = shared.store.outbox_notify(&peer);
    let mut reloads = shared.reloads.subscribe();
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let Some(addr) = still_a_peer(&shared, &peer) else {
            return;
        };
        // Sleep until there is work before dialing an idle peer.
        if shared.store.outbox_depth_is_zero(&peer) {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if shared.store.outbox_depth_is_zero(&peer) {
                tokio::select! {
                    _ = notified => {}
                    // Still a peer? (above)
                    _ = reloads.changed() => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        }
        let mut progressed = false;
        // What the peer may hold from before this stream.
        let before = shared.sent_upto(&peer);
        match session(&shared, &peer, &addr, &shutdown, &mut reloads, &mut progressed).await {
            // Stopping, or the peer left the policy or moved (see above).
            Ok(()) => continue,
            Err(e) => {
                if e.not_taken {
                    // Every batch it answered was settled; it took none of
                    // the others: what this stream sent unacked is not in
                    // doubt, and expires here past its TTL.
                    shared.not_taken(&peer, before);
                }
                shared.metrics.retries.inc();
                let mut health = lock(&shared.peer_health);
                let h = health.entry(peer.clone()).or_default();
                // A stream that had moved items failed: a new outage,
                // backed off from the start, not from where the last one
                // ended (a peer that answers and then refuses still
                // backs off).
                if progressed {
                    delay = initial;
                }
                h.connected = false;
                h.last_error = e.to_string();
                drop(health);
                tracing::warn!(%peer, %addr, error = %e, retry_in_ms = delay.as_millis() as u64, "transfer to peer failed");
            }
        }
        let wait = tokio::time::sleep(rand::rng().random_range(delay / 2..=delay));
        tokio::pin!(wait);
        let redial = loop {
            tokio::select! {
                _ = &mut wait => break false,
                // Removed, or at a new address: no need to wait out the old one.
                _ = reloads.changed() => {
                    if shared.policy().peer_addr(&peer).as_deref() != Some(addr.as_str()) {
                        break true;
                    }
                }
                _ = shutdown.cancelled() => return,
            }
        };
        delay = if redial {
            initial
        } else {
            (delay * 2).min(Duration::from_millis(limits.retry_max_ms))
        };
    }
}

/// One connected stream; returns Ok only on shutdown, or once the peer
/// left the policy or its address changed (after the acks in flight).
async fn session(
    shared: &Shared,
    peer: &str,
    addr: &str,
    shutdown: &CancellationToken,
    reloads: &mut tokio::sync::watch::Receiver<u64>,
    progressed: &mut bool,
) -> Result<(), SessionError> {
    let channel = crate::net::peer_channel(shared, peer, addr).map_err(SessionError::from)?;
    let mut client = PeerClient::new(channel).max_decoding_message_size(64 << 20);
    let limits = shared.limits();
    let ack_timeout = Duration::from_millis(limits.transfer_ack_timeout_ms);
    let (tx, rx) = mpsc::channel::<TransferBatch>(limits.transfer_window);
    // Opening the stream (dial, TLS, HTTP/2, response headers) on a stalled
    // link must not hang the forwarder either.
    let mut acks = tokio::time::timeout(ack_timeout, client.transfer(ReceiverStream::new(rx)))
        .await
        .map_err(|_| stall_error(ack_timeout))?
        .map_err(|s| SessionError::from(crate::status_chain(&s)))?
        .into_inner();
    {
        let mut health = shared.peer_health.lock().unwrap_or_else(|p| p.into_inner());
        let h = health.entry(peer.to_owned()).or_default();
        h.connected = true;
        h.last_contact = Some(SystemTime::now());
        h.last_error.clear();
    }
    tracing::info!(%peer, %addr, "transfer stream open");
    let notify = shared.store.outbox_notify(peer);
    let mut in_flight: VecDeque<(Instant, Vec<u64>)> = VecDeque::new();
    let mut cursor: Option<u64> = None;
    // The peer left the policy, or is dialled elsewhere now: what is in
    // flight is settled, and nothing more goes on this stream.
    let moved = || shared.policy().peer_addr(peer).as_deref() != Some(addr);
    loop {
        if moved() {
            return drain(shared, peer, &mut acks, &mut in_flight).await;
        }
        if in_flight.len() < limits.transfer_window {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Until what is read is marked sent (below): the sweeper and
            // the rerouter take nothing out meanwhile. Checked again under
            // it: a reload that removed the peer reroutes only after.
            let reading = shared.sending.read().await;
            if moved() {
                drop(reading);
                return drain(shared, peer, &mut acks, &mut in_flight).await;
            }
            let items = shared.store.outbox_queued(peer, cursor, limits.batch_size)?;
            // What is past its TTL is not sent: it expires here, now (an
            // EXPIRED receipt, a dead letter), not at the sweeper's next
            // tick, so a short TTL does not race the sweep to the peer. But
            // not an item sent before, on this stream or on one that
            // failed: the peer may hold it, and says so (DUPLICATE) when it
            // goes again (`Shared::sent_upto`).
            let now = unix_millis(SystemTime::now());
            let sent_upto = shared.sent_upto(peer);
            let (late, items): (Vec<Queued>, Vec<Queued>) = items.into_iter().partition(|q| {
                q.expires_ms != 0 && q.expires_ms <= now && !crate::sent::may_hold(sent_upto, q.seq)
            });
            if !late.is_empty() {
                // Durable and out of the outbox once this returns (as
                // every transaction), so not read again.
                let due: Vec<(String, u64)> = late.iter().map(|q| (peer.to_owned(), q.seq)).collect();
                crate::admin::expire(shared, &due).await?;
                if items.is_empty() {
                    continue;
                }
            }
            if !items.is_empty() {
                let mut batch = TransferBatch::default();
                let mut seqs = Vec::with_capacity(items.len());
                let mut bytes = 0;
                for Queued { seq, item: value, .. } in items {
                    if bytes > 0 && bytes + value.len() > MAX_BATCH_BYTES {
                        break;
                    }
                    bytes += value.len();
                    // Its bytes fields share `value`: nothing copied again.
                    let mut item = TransferItem::decode(Bytes::from(value)).unwrap_or_default();
                    item.seq = seq;
                    batch.items.push(item);
                    seqs.push(seq);
                    cursor = Some(seq);
                }
                // Spared from expiry from here on: sent, or about to be.
                // Across a restart too: the store's reservation covers
                // them before they go (`sent.rs`).
                let reserve = cursor.and_then(|last| shared.mark_sending(peer, last));
                drop(reading);
                if let Some(reserved) = reserve {
                    crate::sent::reserve(&shared.store, peer, reserved)
                        .await
                        .map_err(|e| {
                            SessionError::from(format!("recording what may be sent to {peer}: {e}"))
                        })?;
                    shared.reserved_sent(peer, reserved);
                }
                // Only durable items leave the node: an item committed but not
                // yet flushed could reach the peer and then vanish here in a
                // crash (a DELIVERED receipt issued twice, an envelope whose
                // Send the app saw fail delivered anyway).
                shared.store.durable().await?;
                if tx.send(batch).await.is_err() {
                    // The peer ended the stream (its answer ends the
                    // request body too): what it said is in the acks.
                    return Err(last_word(shared, peer, &mut acks, &mut in_flight, ack_timeout).await);
                }
                in_flight.push_back((Instant::now(), seqs));
                continue;
            }
            drop(reading);
            tokio::select! {
                _ = notified => continue,
                _ = reloads.changed() => continue,
                _ = shutdown.cancelled() => return drain(shared, peer, &mut acks, &mut in_flight).await,
                ack = acks.message() => {
                    settle(shared, peer, ack, &mut acks, &mut in_flight).await?;
                    *progressed = true;
                }
                () = stalled(in_flight.front().map(|(sent, _)| *sent + ack_timeout)) => return Err(stall_error(ack_timeout)),
            }
        } else {
            tokio::select! {
                _ = reloads.changed() => continue,
                _ = shutdown.cancelled() => return drain(shared, peer, &mut acks, &mut in_flight).await,
                ack = acks.message() => {
                    settle(shared, peer, ack, &mut acks, &mut in_flight).await?;
                    *progressed = true;
                }
                () = stalled(in_flight.front().map(|(sent, _)| *sent + ack_timeout)) => return Err(stall_error(ack_timeout)),
            }
        }
    }
}

/// Items read, and at most moved, in one transaction of [`reroute`].
const REROUTE_CHUNK: usize = 512;

/// What [`reroute`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Rerouted {
    /// Items moved to the outbox of their new next hop (by this pass: one
    /// running at the same time may have moved others).
    pub(crate) moved: u64,
    /// Items left where they are: no route leads where they go (or they
    /// do not decode).
    pub(crate) unroutable: u64,
    /// Items left with a peer that may hold them already.
    pub(crate) in_doubt: u64,
}

/// Keeps queued work on its route (DESIGN.md §6): at start and after a
/// reload that changed where any agency's messages go, every queue; after
/// other reloads, and every `limits.sweep_interval_ms`, the queues of
/// agencies that are no longer peers (a send that chose its hop before
/// the reload may land there after the pass). One task: passes never
/// overlap.
pub(crate) async fn rerouter(shared: Arc<Shared>, shutdown: CancellationToken) {
    let every = Duration::from_millis(shared.limits().sweep_interval_ms.max(10));
    let mut reloads = shared.reloads.subscribe();
    let mut why = "start";
    let mut routed_by = shared.policy();
    // Per queue, the last item looked at: until routes change, a pass
    // looks only at items queued since. A queue that failed is left alone
    // until then, so its error is logged once.
    let mut examined = HashMap::new();
    let mut failed = HashSet::new();
    loop {
        let every_queue = why == "start" || !routed_by.routes_as(&shared.policy());
        if every_queue {
            routed_by = shared.policy();
            examined.clear();
            failed.clear();
        }
        let done = reroute(&shared, every_queue, &mut examined, &mut failed, &shutdown).await;
        if done.moved > 0 || (every_queue && done != Rerouted::default()) {
            tracing::info!(
                moved = done.moved,
                unroutable = done.unroutable,
                in_doubt = done.in_doubt,
                why,
                "queued items moved to their next hop; unroutable ones wait for a route, in-doubt ones for the peer that may hold them"
            );
        }
        tokio::select! {
            _ = reloads.changed() => why = "reload",
            _ = tokio::time::sleep(every) => why = "tick",
            _ = shutdown.cancelled() => return,
        }
    }
}

/// One pass over every queue (`every_queue`) or over those of agencies
/// that are not peers, each from after the item `examined` names. A queue
/// that fails is logged, left as it is and named in `failed`.
async fn reroute(
    shared: &Shared,
    every_queue: bool,
    examined: &mut HashMap<String, u64>,
    failed: &mut HashSet<String>,
    shutdown: &CancellationToken,
) -> Rerouted {
    let mut done = Rerouted::default();
    let peers = match shared.store.outbox_peers() {
        Ok(peers) => peers,
        Err(e) => {
            tracing::error!(error = %e, "could not list the queues to keep them on their routes");
            return done;
        }
    };
    for peer in peers {
        if failed.contains(&peer) || (!every_queue && shared.policy().is_peer(&peer)) {
            continue;
        }
        let mut after = examined.get(&peer).copied();
        let result = reroute_queue(shared, &peer, &mut after, shutdown, &mut done).await;
        if let Some(last) = after {
            examined.insert(peer.clone(), last);
        }
        if let Err(e) = result {
            tracing::error!(%peer, error = %e, "could not move this queue's items to their next hop; they stay where they are until routes change or the node restarts");
            failed.insert(peer);
        }
    }
    done
}

/// Moves each item queued for `peer` after `after` (which it advances)
/// whose next hop under the current policy is another peer to that peer's
/// outbox, with its bytes and expiry. An item `peer` may hold already
/// (sent, its custody ack not back: `Shared::sent_upto`) stays: `peer`
/// answers for it — also a removed peer, once it is back — so the message
/// never has two copies in custody, nor two outcomes. Forwarders and the
/// sweeper take nothing meanwhile (`Shared::sending`).
async fn reroute_queue(
    shared: &Shared,
    peer: &str,
    after: &mut Option<u64>,
    shutdown: &CancellationToken,
    done: &mut Rerouted,
) -> Result<(), NodeError> {
    while !shutdown.is_cancelled() {
        let items = shared.store.outbox_queued(peer, *after, REROUTE_CHUNK)?;
        let Some(last) = items.last().map(|q| q.seq) else {
            break;
        };
        let policy = shared.policy();
        let mut moves = Vec::new();
        for q in &items {
            match destination(&q.item).and_then(|(dest, cert)| Some((policy.next_hop(&dest)?, cert))) {
                Some((next, _)) if next == peer => {}
                Some((next, cert)) => moves.push((q.seq, q.expires_ms, next, cert)),
                None => done.unroutable += 1,
            }
        }
        // What `peer` may hold stays (checked again under the lock: the
        // mark may have grown; it shrinks only by a release, `release`, or
        // a refusal that took nothing, `SentMarks::not_taken`: then this
        // keeps more than it must, for one pass).
        let in_doubt = |moves: &mut Vec<Move>| {
            let sent = shared.sent_upto(peer);
            let before = moves.len();
            moves.retain(|(seq, ..)| !crate::sent::may_hold(sent, *seq));
            (before - moves.len()) as u64
        };
        done.in_doubt += in_doubt(&mut moves);
        if !moves.is_empty() {
            let _alone = shared.sending.write().await;
            done.in_doubt += in_doubt(&mut moves);
            done.moved += move_items(shared, peer, &moves).await?;
        }
        *after = Some(last);
    }
    Ok(())
}

/// What [`release`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Released {
    /// Items the agency may have held, counted as never sent from now on.
    pub(crate) released: u64,
    /// Items moved to their next hop, and those left for want of a route.
    pub(crate) rerouted: Rerouted,
}

/// For an agency removed from the peers for good, by an administrator's
/// word (`Admin.ReleaseQueue`): counts none of the items queued for it as
/// held by it any more, synced, then moves each to its next hop like the
/// [`rerouter`] does. What no route leads from stays, and expires at its
/// TTL. If the agency did hold one after all, the recipient's duplicate
/// check delivers it once when it comes another way, but it may also end
/// EXPIRED here and DELIVERED there: hence an administrator's call, never
/// the node's.
///
/// # Errors
/// [`NodeError::FailedPrecondition`] while `peer` is a peer, its
/// forwarder still settles what it had in flight, or the node stops;
/// [`NodeError::NotFound`] when nothing is queued for it nor held by it;
/// a storage failure (the release may be recorded: a second call moves
/// the rest).
pub(crate) async fn release(
    shared: &Shared,
    peer: &str,
    by: &impl std::fmt::Display,
) -> Result<Released, NodeError> {
    let mut done = Released::default();
    {
        // No forwarder reads or marks meanwhile, nor does the sweeper or
        // the rerouter take out: a forwarder started by a reload that
        // brings `peer` back reads only after.
        let _alone = shared.sending.write().await;
        if shared.policy().is_peer(peer) {
            return Err(NodeError::FailedPrecondition(format!(
                "{peer} is a peer in the config: what it may hold is its own to answer for; remove it from \
                 [[peers]] and reload first"
            )));
        }
        if lock(&shared.forwarders).contains_key(peer) {
            return Err(NodeError::FailedPrecondition(format!(
                "the forwarder of {peer} is still settling what it sent before the reload that removed it \
                 (at most limits.transfer_ack_timeout_ms plus 5 s); try again then"
            )));
        }
        if shared.shutdown.is_cancelled() {
            // `Node::stop` records the marks it took: the release would
            // not hold.
            return Err(NodeError::FailedPrecondition(
                "the node is stopping; release the queue once it runs again".into(),
            ));
        }
        let marked = shared.sent_upto(peer).is_some();
        if !marked && shared.store.outbox_depth_is_zero(peer) {
            return Err(NodeError::NotFound(format!(
                "nothing is queued for {peer} here, and nothing it may hold (never sent to, or released \
                 already): nothing to release"
            )));
        }
        // No mark, no reservation in the store (`SentMarks::load`): no
        // synced write to forget one.
        if marked {
            done.released = shared.in_doubt(peer)?;
            crate::sent::forget(&shared.store, peer).await?;
            shared.forget_sent(peer);
        }
    }
    tracing::warn!(
        %peer,
        by = %by,
        released = done.released,
        "an administrator released the queue of a former peer: nothing in it counts as held by it any more"
    );
    if let Err(e) = reroute_queue(shared, peer, &mut None, &shared.shutdown, &mut done.rerouted).await {
        tracing::error!(%peer, error = %e, "the release is recorded, but moving the queue failed; release it again to move the rest");
        return Err(e);
    }
    if shared.shutdown.is_cancelled() {
        return Err(NodeError::FailedPrecondition(format!(
            "the release of {peer}'s queue is recorded, but the node is stopping: what was not moved yet moves \
             at its next start"
        )));
    }
    tracing::info!(
        %peer,
        moved = done.rerouted.moved,
        unroutable = done.rerouted.unroutable,
        "a released queue moved to its next hops"
    );
    Ok(done)
}

/// An item to move: its sequence number, expiry, next hop and signer
/// certificate.
type Move = (u64, u64, String, Bytes);

/// Moves `moves` out of `peer`'s outbox into their next hop's, in one
/// transaction; returns how many were still there.
async fn move_items(shared: &Shared, peer: &str, moves: &[Move]) -> Result<u64, NodeError> {
    if moves.is_empty() {
        return Ok(0);
    }
    shared
        .store
        .transact(|tx| {
            let mut n = 0;
            for (seq, expires_ms, next, cert) in moves {
                if let Some(item) = tx.remove_outbox(peer, *seq)? {
                    tx.push_outbox(next, &item, antar_store::Held::Cert(cert), *expires_ms)?;
                    n += 1;
                }
            }
            Ok(n)
        })
        .await
        .map_err(NodeError::from)
}

/// The agency an outbox item goes to — an envelope's recipient, a
/// receipt's sender — and its signer certificate.
fn destination(item: &[u8]) -> Option<(String, Bytes)> {
    match TransferItem::decode(item).ok()?.item? {
        transfer_item::Item::Envelope(e) => {
            let signed = e.envelope?;
            let recipient = Envelope::decode(&signed.envelope[..]).ok()?.recipient;
            Some((recipient, signed.signer_cert))
        }
        transfer_item::Item::Receipt(r) => {
            let signed = r.receipt?;
            let sender = Receipt::decode(&signed.receipt[..]).ok()?.sender;
            Some((sender, signed.signer_cert))
        }
    }
}

/// Resolves at `deadline`, the oldest batch in flight's send time plus the
/// ack timeout: by then the link is stalled (or the peer hung), and the
/// stream is dropped so the batch goes again on a fresh one, where the peer
/// answers DUPLICATE for what it had already stored. Pending while nothing
/// is in flight.
async fn stalled(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn stall_error(timeout: Duration) -> SessionError {
    SessionError::from(format!(
        "no answer within {} ms (limits.transfer_ack_timeout_ms): link stalled or peer unresponsive",
        timeout.as_millis()
    ))
}

/// The longest [`drain`] and [`last_word`] wait for what is left of a stream.
const LAST_WORD: Duration = Duration::from_secs(5);

/// On shutdown, waits briefly for the acks of batches already sent.
async fn drain(
    shared: &Shared,
    peer: &str,
    acks: &mut tonic::Streaming<TransferAck>,
    in_flight: &mut VecDeque<(Instant, Vec<u64>)>,
) -> Result<(), SessionError> {
    let deadline = tokio::time::Instant::now() + LAST_WORD;
    while !in_flight.is_empty() {
        match tokio::time::timeout_at(deadline, acks.message()).await {
            Ok(ack) => settle(shared, peer, ack, acks, in_flight).await?,
            Err(_) => break,
        }
    }
    Ok(())
}

/// The rest of a stream the peer ended: its acks settled, then how it
/// ended (its status, with [`crate::peer::NOT_TAKEN`] if it said so).
/// Already on its way, so read within [`LAST_WORD`] in all (as [`drain`]
/// does: a stop waits for the forwarder).
async fn last_word(
    shared: &Shared,
    peer: &str,
    acks: &mut tonic::Streaming<TransferAck>,
    in_flight: &mut VecDeque<(Instant, Vec<u64>)>,
    ack_timeout: Duration,
) -> SessionError {
    let wait = ack_timeout.min(LAST_WORD);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let Ok(ack) = tokio::time::timeout_at(deadline, acks.message()).await else {
            return stall_error(wait);
        };
        if let Err(end) = settle(shared, peer, ack, acks, in_flight).await {
            return end;
        }
    }
}

#[derive(Debug)]
struct SessionError {
    text: String,
    /// The peer refused a batch and said it took nothing of what is still
    /// unacked ([`crate::peer::NOT_TAKEN`]).
    not_taken: bool,
}

impl From<String> for SessionError {
    fn from(text: String) -> Self {
        Self {
            text,
            not_taken: false,
        }
    }
}

impl From<&str> for SessionError {
    fn from(text: &str) -> Self {
        Self::from(text.to_owned())
    }
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl From<antar_store::StoreError> for SessionError {
    fn from(e: antar_store::StoreError) -> Self {
        Self::from(e.to_string())
    }
}

impl From<NodeError> for SessionError {
    fn from(e: NodeError) -> Self {
        Self::from(e.to_string())
    }
}

/// Deletes what the peer took custody of; records what it refused. `ack`
/// is the answer to the oldest batch in flight; the answers already here
/// behind it (a peer answers the batches it took together at once) are
/// settled with it, in one transaction.
async fn settle(
    shared: &Shared,
    peer: &str,
    ack: Result<Option<TransferAck>, tonic::Status>,
    stream: &mut tonic::Streaming<TransferAck>,
    in_flight: &mut VecDeque<(Instant, Vec<u64>)>,
) -> Result<(), SessionError> {
    let mut taken: Vec<TransferAck> = Vec::new();
    let mut end = None;
    let mut next = Some(ack);
    while let Some(ack) = next.take() {
        let ack = match ack {
            Ok(Some(a)) => a,
            Ok(None) => {
                end = Some(SessionError::from("peer closed the stream"));
                break;
            }
            Err(s) => {
                end = Some(SessionError {
                    text: crate::status_chain(&s),
                    not_taken: s.code() == tonic::Code::ResourceExhausted
                        && s.metadata().get(crate::peer::NOT_TAKEN).is_some_and(|v| v == "1"),
                });
                break;
            }
        };
        let Some((started, sent)) = in_flight.pop_front() else {
            end = Some(SessionError::from("ack for a batch never sent"));
            break;
        };
        shared.metrics.transfer_seconds.observe(started.elapsed());
        if ack.acks.len() != sent.len() || ack.acks.iter().zip(&sent).any(|(a, s)| a.seq != *s) {
            end = Some(SessionError::from("acks do not match the batch"));
            break;
        }
        taken.push(ack);
        next = crate::ready_now(stream).map(Option::transpose);
    }
    if !taken.is_empty() {
        settle_acks(shared, peer, taken.iter().flat_map(|a| &a.acks)).await?;
    }
    end.map_or(Ok(()), Err)
}

/// One transaction for the item acks of [`settle`]; only one with a
/// refusal is waited for.
async fn settle_acks<'a>(
    shared: &Shared,
    peer: &str,
    acks: impl Iterator<Item = &'a ItemAck> + Clone,
) -> Result<(), SessionError> {
    if acks.clone().all(custody_passed) {
        // Custody passed for all: the items go, and nothing waits for that
        // to be synced. Lost in a crash, they go again and the peer
        // answers DUPLICATE.
        shared
            .store
            .transact_unsynced(|tx| {
                acks.clone()
                    .try_for_each(|a| tx.drop_outbox(peer, a.seq).map(drop))
            })
            .map_err(NodeError::from)?;
    } else {
        settle_refusals(shared, peer, acks.clone()).await?;
    }
    let mut health = shared.peer_health.lock().unwrap_or_else(|p| p.into_inner());
    health.entry(peer.to_owned()).or_default().last_contact = Some(SystemTime::now());
    shared.metrics.transferred.inc_by(acks.count() as u64);
    Ok(())
}

/// A plain STORED or DUPLICATE: custody passed, the item goes unread.
fn custody_passed(a: &ItemAck) -> bool {
    a.status != CustodyStatus::Rejected as i32 && a.reason.is_empty()
}

/// [`settle_acks`] when the peer refused some: waits for its transaction,
/// which records each refusal.
async fn settle_refusals<'a>(
    shared: &Shared,
    peer: &str,
    acks: impl Iterator<Item = &'a ItemAck> + Clone,
) -> Result<(), SessionError> {
    let sender = shared.agency.to_string();
    shared
        .store
        .transact(|tx| {
            for a in acks.clone() {
                if custody_passed(a) {
                    tx.drop_outbox(peer, a.seq)?;
                    continue;
                }
                let rejected = a.status == CustodyStatus::Rejected as i32;
                let Some(item) = tx.remove_outbox(peer, a.seq)? else {
                    continue;
                };
                let item_decoded = TransferItem::decode(item.as_slice()).unwrap_or_default();
                let et = match &item_decoded.item {
                    Some(transfer_item::Item::Envelope(et)) => et,
                    Some(transfer_item::Item::Receipt(rt)) => {
                        // No dead letter (those are envelopes, by message
                        // id); the receipt stays in this node's audit log.
                        let about = rt
                            .receipt
                            .as_ref()
                            .and_then(|r| Receipt::decode(&r.receipt[..]).ok())
                            .map(|r| r.message_id)
                            .unwrap_or_default();
                        tracing::warn!(%peer, message_id = %about, reason = %a.reason, rejected,
                            "the peer refused a receipt: it goes no further (it stays in this node's audit log)");
                        continue;
                    }
                    None => continue,
                };
                let env = Envelope::decode(et.envelope.clone().unwrap_or_default().envelope)
                    .unwrap_or_default();
                let id = MessageId::parse(&env.id).unwrap_or_default();
                if !rejected {
                    // A DUPLICATE that says why: a TRANSACTION key the
                    // recipient had taken under another message. Its signed
                    // REJECTED receipt settles the message.
                    tracing::warn!(%peer, %id, reason = %a.reason, "the peer did not take this envelope again");
                    continue;
                }
                // Refused for good: keep it as a dead letter with the reason.
                if env.sender == sender {
                    // Not a message the peer's side already settled (a
                    // signed receipt said DELIVERED or more).
                    tx.update_message(&id, |record| {
                        if record.state <= MessageState::Accepted as i32 {
                            record.state = MessageState::Rejected as i32;
                            record.reason = a.reason.clone();
                        }
                    })?;
                }
                tx.put_dead(
                    &id,
                    &antar_store::DeadLetter {
                        message_id: id.as_bytes().to_vec(),
                        item: item.clone(),
                        reason: a.reason.clone(),
                        at_ms: antar_core::time::unix_millis(SystemTime::now()),
                        peer: peer.to_owned(),
                    },
                )?;
            }
            Ok(())
        })
        .await
        .map_err(NodeError::from)?;
    Ok(())
}
