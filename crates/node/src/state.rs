//! The node's shared state and the store changes every service builds on:
//! local delivery, receipt issue and routing, receipt application.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime};

use prost::bytes::Bytes;
use prost::Message;

use antar_core::envelope::sha256;
use antar_core::time::{to_timestamp, unix_millis};
use antar_core::wire::{
    transfer_item, EntryKind, Envelope, MessageState, Outcome, Receipt, ReceiptStatus, ReceiptTransfer,
    SignedEnvelope, SignedReceipt, TransferItem,
};
use antar_core::{AgencyId, Identity, MessageId, Prepared, Sealed, Signer, Verifier};
use antar_store::{MessageRecord, Store, Tx, TxError};

use crate::config::{Limits, NodeConfig};

/// Who may do what, and where envelopes go: the reloadable part of the config.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    peers: HashMap<String, String>,
    routes: HashMap<String, String>,
    default_route: Option<String>,
    directory: HashSet<String>,
    apps: HashMap<String, Services>,
    access: Vec<(String, HashSet<String>)>,
}

/// The services an app owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Services {
    All,
    Some(HashSet<String>),
}

impl Services {
    pub(crate) fn contains(&self, service: &str) -> bool {
        match self {
            Self::All => true,
            Self::Some(s) => s.contains(service),
        }
    }
}

impl Policy {
    pub(crate) fn from_config(c: &NodeConfig) -> Self {
        let apps = c
            .apps
            .iter()
            .map(|a| {
                let s = if a.services.iter().any(|s| s == "*") {
                    Services::All
                } else {
                    Services::Some(a.services.iter().cloned().collect())
                };
                (a.name.clone(), s)
            })
            .collect();
        Self {
            peers: c
                .peers
                .iter()
                .map(|p| (p.agency.clone(), p.addr.clone()))
                .collect(),
            routes: c.routes.clone().into_iter().collect(),
            default_route: c.default_route.clone(),
            directory: c.directory.iter().cloned().collect(),
            apps,
            access: c
                .access
                .iter()
                .map(|a| (a.service.clone(), a.allow.iter().cloned().collect()))
                .collect(),
        }
    }

    /// Whether apps may address `dest`: it is in the directory, or there is none.
    pub(crate) fn in_directory(&self, dest: &str) -> bool {
        self.directory.is_empty() || self.directory.contains(dest)
    }

    /// The peer that is the next hop toward `dest`.
    pub(crate) fn next_hop(&self, dest: &str) -> Option<String> {
        if self.peers.contains_key(dest) {
            return Some(dest.to_owned());
        }
        self.routes.get(dest).or(self.default_route.as_ref()).cloned()
    }

    pub(crate) fn is_peer(&self, agency: &str) -> bool {
        self.peers.contains_key(agency)
    }

    /// The address of `peer`'s node, if it is a peer.
    pub(crate) fn peer_addr(&self, peer: &str) -> Option<String> {
        self.peers.get(peer).cloned()
    }

    /// Whether `other` sends every agency to the same next hop.
    pub(crate) fn routes_as(&self, other: &Policy) -> bool {
        self.peers.len() == other.peers.len()
            && self.peers.keys().all(|p| other.peers.contains_key(p))
            && self.routes == other.routes
            && self.default_route == other.default_route
    }

    pub(crate) fn peers(&self) -> impl Iterator<Item = (&String, &String)> {
        self.peers.iter()
    }

    pub(crate) fn app(&self, name: &str) -> Option<&Services> {
        self.apps.get(name)
    }

    /// True when some app of this node owns `service`.
    pub(crate) fn service_known(&self, service: &str) -> bool {
        self.apps.values().any(|s| s.contains(service))
    }

    /// True when `sender` holds an access right to `service`.
    pub(crate) fn may_send(&self, sender: &str, service: &str) -> bool {
        self.access
            .iter()
            .any(|(s, allow)| (s == "*" || s == service) && (allow.contains("*") || allow.contains(sender)))
    }
}

/// A delivery leased to a receiver, in memory only: after a crash every
/// lease is gone, so every unacked message is delivered again.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lease {
    pub(crate) until: Instant,
    pub(crate) attempt: u32,
    pub(crate) stream: u64,
    /// Its payload and envelope bytes, as the inbox counts them (at most
    /// `agency::MAX_IN_FLIGHT_BYTES`).
    pub(crate) bytes: u64,
}

/// The deliveries leased to `Receive` streams.
#[derive(Debug, Default)]
pub(crate) struct Leases {
    pub(crate) held: HashMap<MessageId, Lease>,
    /// How many times a closed stream gave its leases back early: a
    /// stream's scan marks (`agency::Resume`) are stale once it moves.
    pub(crate) returned: u64,
    /// The last stream id handed out: one count per node, whichever
    /// listener (API or admin) the stream came in on.
    pub(crate) last_stream: u64,
}

impl Leases {
    /// A new lease stream id, unique in this node's life (a `Receive`
    /// stream's or a `Call`'s).
    pub(crate) fn next_stream(&mut self) -> u64 {
        self.last_stream += 1;
        self.last_stream
    }
}

/// Streams of one kind each app holds open (`Receive`:
/// `limits.max_receive_streams_per_app`; `WatchReceipts`:
/// `limits.max_watch_streams_per_app`), over all its connections.
#[derive(Debug, Default)]
pub(crate) struct StreamCounts(Arc<Mutex<HashMap<String, u32>>>);

impl StreamCounts {
    /// Counts one more of `app`'s streams until the [`OpenStream`] drops;
    /// `Err` with the count when `app` holds `most` already.
    pub(crate) fn open(&self, app: &str, most: u32) -> Result<OpenStream, u32> {
        let mut counts = lock(&self.0);
        let open = counts.entry(app.to_owned()).or_default();
        if *open >= most {
            return Err(*open);
        }
        *open += 1;
        Ok(OpenStream {
            counts: self.0.clone(),
            app: app.to_owned(),
        })
    }
}

/// One of an app's open streams, counted until dropped.
#[derive(Debug)]
pub(crate) struct OpenStream {
    counts: Arc<Mutex<HashMap<String, u32>>>,
    app: String,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        if let Some(open) = counts.get_mut(&self.app) {
            *open -= 1;
            if *open == 0 {
                counts.remove(&self.app);
            }
        }
    }
}

/// What the API listener presents and trusts (DER).
pub(crate) struct ApiIdentity {
    pub(crate) local_ca: Vec<u8>,
    pub(crate) chain: Vec<Vec<u8>>,
    pub(crate) key: Vec<u8>,
}

impl ApiIdentity {
    /// The API listener's TLS configuration for (`federation`, `agency`) —
    /// those the node started with; a reload does not change them —
    /// refusing the client certificates `local_crl` (the config's
    /// `tls.local_revocation_list`) revokes; with how many it revokes.
    pub(crate) fn tls(
        &self,
        federation: &str,
        agency: &AgencyId,
        local_crl: Option<&std::path::Path>,
    ) -> Result<(Arc<rustls::ServerConfig>, u32), String> {
        let named = |e: &dyn std::fmt::Display| match local_crl {
            Some(p) => format!("tls.local_revocation_list {}: {e}", p.display()),
            None => e.to_string(),
        };
        let crls = match local_crl {
            None => Vec::new(),
            Some(p) => vec![antar_pki::read_crl_der(p).map_err(|e| named(&e))?],
        };
        let revoked = match crls.first() {
            None => 0,
            Some(der) => antar_pki::CrlInfo::from_der(der)
                .map_err(|e| named(&e))?
                .revoked_serials
                .len() as u32,
        };
        let config = antar_pki::tls::api_server_config_with_crls(
            &self.local_ca,
            self.chain.clone(),
            self.key.clone(),
            federation,
            agency,
            crls,
        )
        .map_err(|e| named(&e))?;
        Ok((config, revoked))
    }
}

/// `Call`s waiting for the RESPONSE to their REQUEST, by request id.
///
/// An entry lives as long as its `Call` (`agency::CallGuard`), also after
/// the RESPONSE arrived: until the `Call` has acked it, a `Receive` stream
/// that comes across it hands its lease to the `Call`'s own stream id
/// ([`Calls::withhold`]) rather than deliver it, so the RESPONSE goes to its
/// `Call` alone. Should the `Call` end first (its deadline, a cancel), the
/// RESPONSE stays in the inbox for `Receive`.
#[derive(Debug, Default)]
pub(crate) struct Calls(Mutex<HashMap<String, Caller>>);

#[derive(Debug)]
struct Caller {
    /// The lease stream id of this `Call` (from [`Leases::next_stream`]).
    stream: u64,
    /// Taken when the RESPONSE arrives.
    wake: Option<tokio::sync::oneshot::Sender<MessageId>>,
}

impl Calls {
    /// Registers a `Call` for the RESPONSE to `request_id`, under lease
    /// stream id `stream`; the receiver gets the RESPONSE's id.
    pub(crate) fn wait(&self, request_id: &str, stream: u64) -> tokio::sync::oneshot::Receiver<MessageId> {
        let (wake, rx) = tokio::sync::oneshot::channel();
        lock(&self.0).insert(
            request_id.to_owned(),
            Caller {
                stream,
                wake: Some(wake),
            },
        );
        rx
    }

    /// The `Call` for `request_id` ended: its lease stream id, if it was
    /// still registered.
    pub(crate) fn end(&self, request_id: &str) -> Option<u64> {
        lock(&self.0).remove(request_id).map(|w| w.stream)
    }

    /// RESPONSE `id` to `request_id` is durable in this node's inbox: wakes
    /// the `Call` waiting for it, if any.
    pub(crate) fn arrived(&self, request_id: &str, id: MessageId) {
        let wake = lock(&self.0).get_mut(request_id).and_then(|w| w.wake.take());
        if let Some(wake) = wake {
            let _ = wake.send(id);
        }
    }

    /// Whether a `Receive` stream must not deliver `record` (message `id`),
    /// which it leased to `stream`: because the lease is no longer the
    /// stream's (acked meanwhile — by the `Call` it answers, say — or run
    /// out while the stream waited, free for any stream to take), or
    /// because it is the RESPONSE a
    /// `Call` waits for: then the lease moves to that `Call`, and the
    /// stream's slot is free again. Locks the calls, then `leases`;
    /// nothing locks them the other way round.
    pub(crate) fn withhold(
        &self,
        record: &MessageRecord,
        id: &MessageId,
        stream: u64,
        leases: &Mutex<Leases>,
    ) -> bool {
        // Decoded outside the lock, and only while a `Call` waits: one
        // registers before its REQUEST exists, so before any RESPONSE.
        let request = if lock(&self.0).is_empty() {
            None
        } else {
            record
                .envelope
                .as_ref()
                .and_then(|s| Envelope::decode(s.envelope.clone()).ok())
                .filter(|e| e.kind == antar_core::wire::Kind::Response as i32)
                .map(|e| e.correlation_id)
        };
        let calls = lock(&self.0);
        let mut leases = lock(leases);
        let Some(lease) = leases.held.get_mut(id).filter(|l| l.stream == stream) else {
            return true;
        };
        if lease.until <= Instant::now() {
            // Ran out while the stream waited: free for any stream, and
            // this was no attempt.
            lease.attempt = lease.attempt.saturating_sub(1);
            return true;
        }
        match request.and_then(|r| calls.get(&r)) {
            Some(call) => {
                lease.stream = call.stream;
                // Not delivered on this stream: not an attempt.
                lease.attempt = lease.attempt.saturating_sub(1);
                true
            }
            None => false,
        }
    }
}

/// Per-peer health, for Admin.
#[derive(Debug, Clone, Default)]
pub(crate) struct PeerHealth {
    pub(crate) connected: bool,
    pub(crate) last_contact: Option<SystemTime>,
    pub(crate) last_error: String,
}

/// The receipts `seen` remembers, each kind in its own namespace.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SeenReceipts {
    /// Receipts about this node's own messages.
    Own,
    /// Receipts this node relayed toward another agency.
    Relayed,
}

impl SeenReceipts {
    /// The namespace, and the one builds before 2026-11-30 wrote the digest
    /// alone into.
    fn namespaces(self) -> (&'static str, &'static str) {
        match self {
            Self::Own => ("receipt-of", "receipt"),
            Self::Relayed => ("relayed-receipt-of", "relayed-receipt"),
        }
    }

    /// When `store` holds receipts an older build marked seen by their
    /// digest alone: the time (ms) before which a message id must have been
    /// minted for a receipt about it to be among them — the first start of
    /// a build that keys receipts by message id, or the newest message held
    /// then if later (kept in `seen` under [`SINCE`]), plus [`SKEW_MS`].
    /// Receipts about messages minted later are never looked up under the
    /// old keys, so that cost ends with the messages from before the
    /// upgrade.
    ///
    /// # Errors
    /// A storage failure.
    pub(crate) async fn legacy(store: &Store) -> Result<Option<u64>, antar_store::StoreError> {
        let old = |kind: Self| store.seen_first(kind.namespaces().1).map(|k| k.is_some());
        if !old(Self::Own)? && !old(Self::Relayed)? {
            return Ok(None);
        }
        let since = match store.seen_first(SINCE)? {
            // Unreadable: check every receipt, as before.
            Some(key) => <[u8; 8]>::try_from(key.as_slice()).map_or(u64::MAX, u64::from_be_bytes),
            None => {
                // Not before the newest message the store holds: a clock
                // that is behind at this first start must not hide them.
                let newest = store.newest_message_id()?.and_then(|id| id.minted_ms());
                let now = unix_millis(SystemTime::now()).max(newest.unwrap_or(0));
                let key = now.to_be_bytes();
                store
                    .transact(|tx| tx.mark_seen(SINCE, &key))
                    .await
                    .map_err(crate::error::store_failure)?;
                now
            }
        };
        Ok(Some(since.saturating_add(SKEW_MS)))
    }
}

/// The `seen` namespace whose one key is when this node first ran a build
/// that keys receipts by message id (ms, u64 BE).
const SINCE: &str = "receipts-by-id-since";

/// How far ahead of this node's clock the clock that minted a message id
/// may have been.
const SKEW_MS: u64 = 24 * 3600 * 1000;

pub(crate) struct Shared {
    pub(crate) config: NodeConfig,
    pub(crate) agency: AgencyId,
    pub(crate) identity: Identity,
    pub(crate) signer: Signer,
    pub(crate) verifier: Verifier,
    pub(crate) store: Store,
    pub(crate) policy: RwLock<Arc<Policy>>,
    pub(crate) leases: Mutex<Leases>,
    /// `Receive` and `WatchReceipts` streams open per app.
    pub(crate) receive_streams: StreamCounts,
    pub(crate) watch_streams: StreamCounts,
    pub(crate) peer_health: Mutex<HashMap<String, PeerHealth>>,
    pub(crate) draining: AtomicBool,
    pub(crate) started: Instant,
    pub(crate) metrics: crate::metrics::Metrics,
    /// This node's TLS certificate chain and key, for dialing peers.
    pub(crate) tls_chain: Vec<Vec<u8>>,
    pub(crate) tls_key: Vec<u8>,
    /// The federation's revocation lists (DER), as last loaded.
    pub(crate) crls: RwLock<Vec<Vec<u8>>>,
    /// The peer listener's TLS configuration; replaced on reload.
    pub(crate) peer_tls: RwLock<Arc<rustls::ServerConfig>>,
    /// The API and admin listeners' TLS configuration; replaced on reload
    /// (`tls.local_revocation_list`).
    pub(crate) api_tls: RwLock<Arc<rustls::ServerConfig>>,
    /// What the API listener presents and trusts: the local CA, its
    /// certificate chain and key (DER), to build `api_tls` again.
    pub(crate) api_identity: ApiIdentity,
    /// Held by a reload from reading the file to its last swap.
    pub(crate) reloading: Mutex<()>,
    /// Per-app and per-peer rate limits: an app's envelopes, its other
    /// calls, a peer's items.
    pub(crate) app_rate: crate::rate::RateLimiter,
    pub(crate) app_calls: crate::rate::RateLimiter,
    pub(crate) peer_rate: crate::rate::RateLimiter,
    /// Cancelled at shutdown: ends streams so connections can close.
    pub(crate) shutdown: tokio_util::sync::CancellationToken,
    /// Receipts of concurrent requests waiting to share a signature.
    pub(crate) receipt_queue: Together<Receipt, Issued>,
    /// Envelopes of concurrent requests waiting to share a signature:
    /// their bytes and `created_at`.
    pub(crate) envelope_queue: Together<(Bytes, SystemTime), SignedEnvelope>,
    /// `Call`s waiting for their RESPONSE.
    pub(crate) calls: Calls,
    /// Per peer, the outbox items its forwarder may have sent
    /// ([`Shared::sent_upto`]).
    pub(crate) sent: Mutex<crate::sent::SentMarks>,
    /// Held (shared) by a forwarder from reading its outbox until it has
    /// marked what it read as sent, and (alone) by the sweeper while it
    /// expires items, the rerouter while it moves them, a release of a
    /// former peer's queue while it forgets its mark, and a stopping node
    /// while it records the marks: so the sweeper never expires an item a
    /// forwarder has read to send, and a forwarder never reads one the
    /// sweeper is expiring but has not yet removed from sled.
    pub(crate) sending: tokio::sync::RwLock<()>,
    /// Held while the newest checkpoint is read and stored again: by
    /// `audit::checkpoint_now` (which may sign one) and by witnessing as it
    /// stores the cosignatures it gathered, so neither overwrites the
    /// other's with a copy read before it.
    pub(crate) checkpoints: tokio::sync::Mutex<()>,
    /// One lock per agency whose log this node witnesses, held while its
    /// witness state (the checkpoint witnessed last, a split view flagged)
    /// is read and written: by `Peer.Witness` and by
    /// `Admin.ClearSplitView`, so a clearing cannot be undone by a request
    /// checked against what it cleared, and a peer that keeps asking holds
    /// up only its own (`witness::lock_of`).
    pub(crate) witnessed: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The forwarder of each peer (`forward::start`); one removes itself
    /// when its peer leaves the policy.
    pub(crate) forwarders: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// Counts reloads: forwarders and the rerouter wake on it (`forward.rs`).
    pub(crate) reloads: tokio::sync::watch::Sender<u64>,
    /// Callers' identities by their certificate (`auth.rs`).
    pub(crate) identities: antar_pki::tls::IdentityCache,
    /// When the store holds receipts an older build marked seen by their
    /// digest alone: receipts about messages minted before this time (ms)
    /// are checked under those keys too ([`SeenReceipts::legacy`]).
    pub(crate) legacy_seen_until: Option<u64>,
}

impl Shared {
    /// Every peer's [`Shared::sent_upto`], as they are now.
    pub(crate) fn sent_snapshot(&self) -> HashMap<String, u64> {
        lock(&self.sent).snapshot()
    }

    /// The last of `peer`'s outbox items that may have been sent to it
    /// ([`crate::sent::SentMarks`]). One at or before it is never expired (neither by
    /// the sweeper nor by the forwarder): the peer may hold it already, so
    /// it goes again, and the peer answers DUPLICATE or takes it.
    pub(crate) fn sent_upto(&self, peer: &str) -> Option<u64> {
        lock(&self.sent).upto(peer)
    }

    /// Marks `peer`'s items up to `seq` sent
    /// ([`crate::sent::SentMarks::mark_sending`]).
    pub(crate) fn mark_sending(&self, peer: &str, seq: u64) -> Option<u64> {
        lock(&self.sent).mark_sending(peer, seq)
    }

    /// `peer` took none of the items sent to it since its mark was
    /// `before` and not acked ([`crate::sent::SentMarks::not_taken`]).
    pub(crate) fn not_taken(&self, peer: &str, before: Option<u64>) {
        lock(&self.sent).not_taken(peer, before);
    }

    /// The store holds `reserved` for `peer`
    /// ([`crate::sent::SentMarks::reserved`]).
    pub(crate) fn reserved_sent(&self, peer: &str, reserved: u64) {
        lock(&self.sent).reserved(peer, reserved);
    }

    /// How many of `peer`'s queued items it may hold already
    /// ([`Shared::sent_upto`]), counted without restoring them.
    ///
    /// # Errors
    /// A storage failure.
    pub(crate) fn in_doubt(&self, peer: &str) -> Result<u64, antar_store::StoreError> {
        self.sent_upto(peer)
            .map_or(Ok(0), |upto| self.store.outbox_count_through(peer, upto))
    }

    /// None of `peer`'s items count as sent any more
    /// ([`crate::sent::SentMarks::forget`]).
    pub(crate) fn forget_sent(&self, peer: &str) {
        lock(&self.sent).forget(peer);
    }

    /// The refusal of `caller` by `limits.<key>`, saying `refusal`:
    /// counted and logged ([`crate::metrics::Metrics::limited`]).
    pub(crate) fn limited(
        &self,
        key: &'static str,
        caller: &str,
        refusal: String,
    ) -> crate::error::NodeError {
        self.refused(key, caller, crate::error::NodeError::RateLimited(refusal))
    }

    /// `refusal` of `caller` by `limits.<key>`, counted and logged as
    /// [`Shared::limited`] does.
    pub(crate) fn refused(
        &self,
        key: &'static str,
        caller: &str,
        refusal: crate::error::NodeError,
    ) -> crate::error::NodeError {
        self.metrics.limited(key, caller, &refusal.to_string());
        refusal
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.config.limits
    }

    pub(crate) fn policy(&self) -> Arc<Policy> {
        self.policy.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Signs one receipt, alone.
    pub(crate) fn sign_receipt(&self, receipt: Receipt) -> Issued {
        Issued {
            signed: self.signer.sign_receipt(&receipt),
            receipt,
        }
    }

    /// Signs receipts issued together: with one signature over the lot
    /// when `receipts.batch_signatures` is on, else one each.
    pub(crate) fn sign_receipts(&self, drafts: Vec<Receipt>) -> SignedReceipts<'_> {
        let signed = if self.config.receipts.batch_signatures {
            self.signer.sign_receipts(&drafts)
        } else {
            drafts.iter().map(|r| self.signer.sign_receipt(r)).collect()
        };
        SignedReceipts {
            shared: self,
            issued: signed
                .into_iter()
                .zip(drafts)
                .map(|(signed, receipt)| Issued { signed, receipt })
                .collect::<Vec<_>>()
                .into_iter(),
        }
    }

    /// Signs the receipts of one request together with those of other
    /// requests ready at the same moment (`Send`s, `Ack`s), with
    /// `receipts.batch_signatures` (see [`Together::sign`]); else one each.
    pub(crate) async fn sign_together(&self, drafts: Vec<Receipt>) -> SignedReceipts<'_> {
        if !self.config.receipts.batch_signatures || drafts.is_empty() {
            return self.sign_receipts(drafts);
        }
        let signed = self
            .receipt_queue
            .sign(drafts.clone(), |all| self.sign_receipts(all).issued.collect())
            .await;
        match signed {
            Some(issued) => SignedReceipts {
                shared: self,
                issued: issued.into_iter(),
            },
            None => self.sign_receipts(drafts),
        }
    }

    /// Signs the envelopes of one request (`Send`, `Call`, `Reply`, an item
    /// of a `SendBatch`): with `envelopes.batch_signatures`, together with
    /// those of other requests ready at the same moment, one signature over
    /// the lot (see [`Together::sign`]); else one each.
    pub(crate) async fn seal_together(&self, prepared: Vec<Prepared>) -> Vec<Sealed> {
        if !self.config.envelopes.batch_signatures || prepared.is_empty() {
            return prepared.into_iter().map(|p| p.sign(&self.signer)).collect();
        }
        let unsigned = prepared
            .iter()
            .map(|p| (p.envelope.clone(), p.created_at))
            .collect();
        let signed = self
            .envelope_queue
            .sign(unsigned, |all: Vec<(Bytes, SystemTime)>| {
                let at = all.iter().map(|(_, t)| *t).max().unwrap_or_else(SystemTime::now);
                let bytes = all.into_iter().map(|(b, _)| b).collect();
                self.signer
                    .sign_envelopes(bytes, self.agency.as_str(), to_timestamp(at))
            })
            .await;
        let mut signed = signed.unwrap_or_default().into_iter();
        prepared
            .into_iter()
            .map(|p| match signed.next() {
                // Shares come back in the order queued; should one not be
                // this envelope's bytes (or the signer panicked: none), it
                // is signed alone rather than paired with another's.
                Some(envelope) if envelope.envelope == p.envelope => Sealed {
                    id: p.id,
                    header: p.header,
                    envelope,
                    payload: p.payload,
                },
                _ => p.sign(&self.signer),
            })
            .collect()
    }

    /// The receipt about `envelope` (whose signed bytes are
    /// `envelope_bytes`) that this node issues, unsigned.
    ///
    /// Sign it before the transaction that records it: signing is the
    /// costly part, and inside a transaction it would run under the
    /// store's writer lock, one at a time for the whole node.
    pub(crate) fn draft_receipt(
        &self,
        envelope: &Envelope,
        envelope_bytes: &[u8],
        status: ReceiptStatus,
        reason: &str,
        outcome: Outcome,
        result_digest: Vec<u8>,
    ) -> Receipt {
        Receipt {
            message_id: envelope.id.clone(),
            envelope_sha256: Bytes::copy_from_slice(&sha256(envelope_bytes)),
            sender: envelope.sender.clone(),
            recipient: envelope.recipient.clone(),
            status: status as i32,
            reason: reason.to_owned(),
            at: Some(to_timestamp(SystemTime::now())),
            issuer: self.agency.to_string(),
            outcome: outcome as i32,
            result_digest: result_digest.into(),
            duplicate_of: String::new(),
        }
    }

    /// Routes a receipt issued here ([`Shared::route_receipt`]); returns
    /// its index in the Merkle log when it was logged there.
    pub(crate) fn route_issued(&self, tx: &Tx<'_>, issued: &Issued) -> Result<Option<u64>, TxError> {
        self.route_receipt(tx, &issued.signed, &issued.receipt, Vec::new())
    }

    /// Sends a receipt toward the node of its `sender` (or applies it here),
    /// logging it in the Merkle log on the way; returns its index there
    /// (none when it was applied here instead).
    pub(crate) fn route_receipt(
        &self,
        tx: &Tx<'_>,
        signed: &SignedReceipt,
        receipt: &Receipt,
        hops: Vec<String>,
    ) -> Result<Option<u64>, TxError> {
        if receipt.sender == self.agency.as_str() {
            return self.apply_receipt(tx, signed, receipt).map(|_| None);
        }
        // Issued here for another agency's message, or relayed through here.
        let logged = audit_receipt(tx, signed, &receipt.message_id)?;
        self.forward_receipt(tx, signed, receipt, hops, antar_store::Held::Audited(logged))?;
        Ok(Some(logged))
    }

    /// Queues a receipt, logged already, for the next hop toward its
    /// `sender`'s node, stored without what `held` says the store holds. A
    /// receipt this node issued with no route waits in a queue under the
    /// sender's name, which no forwarder serves: the rerouter moves it once
    /// a route leads there (a reload), as it does the items of a removed
    /// peer. Its sender is one this node verified, by the envelope's
    /// signature. One relayed for another issuer with no route is logged
    /// and goes no further (it is in the audit log): any issuer could
    /// name any sender, and each name would be a queue that never drains.
    pub(crate) fn forward_receipt(
        &self,
        tx: &Tx<'_>,
        signed: &SignedReceipt,
        receipt: &Receipt,
        mut hops: Vec<String>,
        held: antar_store::Held<'_>,
    ) -> Result<(), TxError> {
        let queue = match self.policy().next_hop(&receipt.sender) {
            Some(peer) => peer,
            None => match AgencyId::parse(&receipt.sender) {
                Ok(sender) if receipt.issuer == self.agency.as_str() => {
                    tracing::warn!(
                        message_id = %receipt.message_id,
                        %sender,
                        "no route back to the sender; the receipt waits in a queue under its name until a route leads there"
                    );
                    sender.to_string()
                }
                _ => {
                    tracing::warn!(
                        message_id = %receipt.message_id,
                        sender = %receipt.sender,
                        issuer = %receipt.issuer,
                        "no route back to the sender of a relayed receipt; it goes no further (kept in the audit log)"
                    );
                    return Ok(());
                }
            },
        };
        hops.push(self.agency.to_string());
        let item = TransferItem {
            seq: 0,
            item: Some(transfer_item::Item::Receipt(ReceiptTransfer {
                receipt: Some(signed.clone()),
                hops,
            })),
        };
        tx.push_outbox(&queue, &item.encode_to_vec(), held, 0)?;
        Ok(())
    }

    /// Marks a receipt seen; returns whether it was seen before. A receipt
    /// is known by its SHA-256, keyed after its message id: ids are UUIDv7,
    /// ordered by time, so the keys written in one period sit together in
    /// sled. (Keyed by the digest alone, each check read and rewrote a page
    /// anywhere in the tree: 4.7 % of the CPU of a closed-loop benchmark.)
    /// A store an older build wrote such digests into is checked under the
    /// old key as well, for messages from before the upgrade
    /// ([`SeenReceipts::legacy`]).
    pub(crate) fn receipt_seen(
        &self,
        tx: &Tx<'_>,
        kind: SeenReceipts,
        signed: &SignedReceipt,
        receipt: &Receipt,
    ) -> Result<bool, TxError> {
        let digest = sha256(&signed.receipt);
        let (namespace, old) = kind.namespaces();
        let mut key = receipt.message_id.as_bytes().to_vec();
        key.extend_from_slice(&digest);
        if tx.mark_seen(namespace, &key)? {
            return Ok(true);
        }
        let Some(until) = self.legacy_seen_until else {
            return Ok(false);
        };
        let minted = MessageId::parse(&receipt.message_id)
            .ok()
            .and_then(|id| id.minted_ms());
        if minted.is_some_and(|ms| ms >= until) {
            return Ok(false);
        }
        tx.seen(old, &digest)
    }

    /// Records a receipt about a message this node sent: on its record, in
    /// the receipt log. A receipt seen before is ignored; returns whether
    /// this one was new. Its record knows the receipts it holds
    /// (`Tx::holds_receipt`); one about a message without a record here is
    /// known by its key in `seen` ([`Shared::receipt_seen`]). One about a
    /// message this node received (so naming it the sender in error) goes
    /// to the Merkle log only, as evidence, not to the receipt log.
    pub(crate) fn apply_receipt(
        &self,
        tx: &Tx<'_>,
        signed: &SignedReceipt,
        receipt: &Receipt,
    ) -> Result<bool, TxError> {
        let status = ReceiptStatus::try_from(receipt.status).unwrap_or(ReceiptStatus::Unspecified);
        let mut received = false;
        if let Ok(id) = MessageId::parse(&receipt.message_id) {
            let digest = sha256(&signed.receipt);
            let applied = tx.update_message_if(&id, |record| {
                if !record.outgoing {
                    // A message this node received: a receipt naming this
                    // node its sender says nothing of it.
                    received = true;
                    return Ok(false);
                }
                if tx.holds_receipt(&id, record, &digest)? {
                    return Ok(false);
                }
                let cursor = log_own_receipt(tx, signed, &receipt.message_id)?;
                record.push_logged_receipt(cursor, &digest);
                let before = record.state;
                let delivery = matches!(status, ReceiptStatus::Delivered | ReceiptStatus::Processed);
                let from_recipient = delivery && from_its_recipient(tx, &id, record, receipt)?;
                record.state = next_state(before, status, from_recipient);
                let refusal = matches!(status, ReceiptStatus::Rejected | ReceiptStatus::Expired);
                if refusal && record.state != before {
                    record.reason = receipt.reason.clone();
                } else if delivery && record.state != before {
                    // Delivered after all: a refusal said of a copy is no
                    // longer the message's reason (its receipt stays).
                    record.reason.clear();
                } else if delivery && !from_recipient {
                    tracing::warn!(%id, issuer = %receipt.issuer, status = ?status,
                        "a delivery receipt not from the envelope's recipient, or about other bytes; its state is unchanged");
                } else if refusal {
                    // Kept as evidence: a relay's altered copy refused
                    // downstream, or a relay's own word against the
                    // recipient's.
                    tracing::warn!(%id, issuer = %receipt.issuer, status = ?status, reason = %receipt.reason,
                        state = ?MessageState::try_from(before).unwrap_or(MessageState::Unspecified),
                        "a refusal of a message already settled; its state is unchanged");
                }
                Ok(true)
            })?;
            if let Some(applied) = applied.filter(|_| !received) {
                return Ok(applied);
            }
        }
        if self.receipt_seen(tx, SeenReceipts::Own, signed, receipt)? {
            return Ok(false);
        }
        if received {
            // Not news for this node's apps (`WatchReceipts`): evidence of
            // a peer's error or forgery, for auditors.
            tracing::warn!(message = %receipt.message_id, issuer = %receipt.issuer, status = ?status,
                "a receipt names this node the sender of a message it received; kept in the audit log only");
            audit_receipt(tx, signed, &receipt.message_id)?;
        } else {
            log_own_receipt(tx, signed, &receipt.message_id)?;
        }
        Ok(true)
    }

    /// Puts a verified envelope addressed to this node into its service's
    /// inbox and routes its DELIVERED receipt, signed beforehand, to the sender.
    pub(crate) fn deliver_local(
        &self,
        tx: &Tx<'_>,
        id: &MessageId,
        record: MessageRecord,
        envelope: &Envelope,
        envelope_bytes: &[u8],
        delivered: &Issued,
    ) -> Result<(), TxError> {
        let size = record.payload.as_ref().map_or(0, |p| p.data.len() as u64) + envelope_bytes.len() as u64;
        let mut record = record;
        if !record.outgoing {
            if let Some(signed) = &record.envelope {
                audit_envelope(tx, signed, &id.to_string())?;
            }
        }
        if record.state == MessageState::Unspecified as i32 || !record.outgoing {
            record.state = MessageState::Inbox as i32;
        }
        if record.outgoing {
            // Sent to this node's own agency: the DELIVERED receipt is
            // applied to the sender's record, which must be there first.
            tx.put_message(id, &record)?;
            self.route_issued(tx, delivered)?;
        } else {
            record.delivered_audit_index = self.route_issued(tx, delivered)?;
            tx.put_message(id, &record)?;
        }
        tx.push_inbox(&envelope.service, id, size)?;
        Ok(())
    }

    /// The DELIVERED receipt for an envelope about to be delivered here.
    pub(crate) fn delivered(&self, envelope: &Envelope, envelope_bytes: &[u8]) -> Receipt {
        self.draft_receipt(
            envelope,
            envelope_bytes,
            ReceiptStatus::Delivered,
            "",
            Outcome::Unspecified,
            Vec::new(),
        )
    }
}

/// A receipt this node signed, with the fields it signed.
pub(crate) struct Issued {
    pub(crate) signed: SignedReceipt,
    pub(crate) receipt: Receipt,
}

/// Receipts drafted together and signed, handed back in draft order.
pub(crate) struct SignedReceipts<'a> {
    shared: &'a Shared,
    issued: std::vec::IntoIter<Issued>,
}

/// What requests being served at the same moment queue to share one
/// signature (receipt drafts, envelope bytes), each request's items with
/// where its signed items go.
pub(crate) struct Together<T, U>(Mutex<Vec<Waiting<T, U>>>);

type Waiting<T, U> = (Vec<T>, tokio::sync::oneshot::Sender<Vec<U>>);

impl<T, U> Default for Together<T, U> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

impl<T, U> Together<T, U> {
    /// Queues `items` and yields once, so that the requests that are ready
    /// run and queue theirs; then whichever comes back first signs
    /// everything queued with one call of `sign_all` and hands each request
    /// its share, in order. No timer: a request alone is signed at once. A
    /// request cancelled meanwhile only leaves items signed for nobody.
    /// `None` when the request that took this one's items panicked signing
    /// them: the caller signs alone.
    pub(crate) async fn sign(
        &self,
        items: Vec<T>,
        sign_all: impl FnOnce(Vec<T>) -> Vec<U>,
    ) -> Option<Vec<U>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock(&self.0).push((items, tx));
        tokio::task::yield_now().await;
        let queued = std::mem::take(&mut *lock(&self.0));
        if !queued.is_empty() {
            let mut all = Vec::new();
            let mut shares = Vec::with_capacity(queued.len());
            for (items, tx) in queued {
                shares.push((items.len(), tx));
                all.extend(items);
            }
            let mut signed = sign_all(all).into_iter();
            for (n, tx) in shares {
                let _ = tx.send(signed.by_ref().take(n).collect());
            }
        }
        rx.await.ok()
    }
}

impl SignedReceipts<'_> {
    /// The signed form of `draft`, the next one drafted. Drafts are taken
    /// in the order they were given; should one not match, it is signed
    /// alone rather than paired with another's signature.
    pub(crate) fn take(&mut self, draft: Receipt) -> Issued {
        match self.issued.next() {
            Some(i) if i.receipt == draft => i,
            _ => self.shared.sign_receipt(draft),
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether a DELIVERED or PROCESSED `receipt` is the word of the recipient
/// of the envelope `record` (a message this node sent) holds, about its
/// bytes: the issuer (checked against the signer) is that recipient, not
/// just the recipient the receipt names, and the digest is the envelope's.
/// A record written before it kept these gets them from its body, once:
/// the caller writes the record back.
fn from_its_recipient(
    tx: &Tx<'_>,
    id: &MessageId,
    record: &mut MessageRecord,
    receipt: &Receipt,
) -> Result<bool, TxError> {
    if record.envelope_sha256.is_empty() {
        let signed = match &record.envelope {
            Some(inline) => Some(inline.clone()),
            None => tx.message(id)?.and_then(|m| m.envelope),
        };
        let Some(signed) = signed else {
            return Ok(false);
        };
        record.recipient = Envelope::decode(&signed.envelope[..])
            .map(|e| e.recipient)
            .unwrap_or_default();
        record.envelope_sha256 = sha256(&signed.envelope).to_vec();
    }
    Ok(receipt.issuer == record.recipient && receipt.envelope_sha256 == record.envelope_sha256)
}

/// The state a message this node sent moves to on a signed receipt.
///
/// The recipient's word that it took the envelope (DELIVERED, PROCESSED,
/// issued by the recipient itself) is final: it moves a message on from
/// anything, even from REJECTED or EXPIRED, which another node may have
/// said of a copy (a relay's altered one refused downstream, a relay's own
/// queue expired). A refusal (REJECTED, EXPIRED) settles only a message not
/// yet settled, so nothing undoes a delivery. DELIVERED or PROCESSED from
/// anyone else, or about other bytes (`from_its_recipient`), changes
/// nothing.
fn next_state(current: i32, status: ReceiptStatus, from_recipient: bool) -> i32 {
    use MessageState as S;
    let cur = S::try_from(current).unwrap_or(S::Unspecified);
    let new = match (status, cur) {
        (ReceiptStatus::Accepted, S::Unspecified) => S::Accepted,
        (ReceiptStatus::Delivered, S::Unspecified | S::Accepted | S::Rejected | S::Expired)
            if from_recipient =>
        {
            S::Delivered
        }
        (ReceiptStatus::Processed, _) if from_recipient => S::Processed,
        (ReceiptStatus::Rejected, S::Unspecified | S::Accepted) => S::Rejected,
        (ReceiptStatus::Expired, S::Unspecified | S::Accepted) => S::Expired,
        _ => cur,
    };
    new as i32
}

/// The reason an item past its `expires_at` is buried with.
pub(crate) const EXPIRED: &str = "expired";

/// Milliseconds since the epoch of an envelope's `expires_at` (0: never).
pub(crate) fn expires_ms(envelope: &Envelope) -> u64 {
    envelope
        .expires_at
        .as_ref()
        .map_or(0, |t| unix_millis(antar_core::time::from_timestamp(t)))
}

/// Logs a signed envelope (header and signature; never the payload) in the
/// node's Merkle log, in the caller's transaction. Returns its index, by
/// which an outbox item can hold it (`Held::Audited`).
pub(crate) fn audit_envelope(tx: &Tx<'_>, signed: &SignedEnvelope, message_id: &str) -> Result<u64, TxError> {
    let cert = antar_store::Held::Cert(&signed.signer_cert);
    tx.audit_append(
        EntryKind::Envelope,
        signed.encode_to_vec().into(),
        cert,
        message_id,
    )
}

/// A receipt about one of this node's own messages, encoded once: into the
/// `WatchReceipts` feed and the Merkle log, in the caller's transaction.
/// Returns its cursor in the receipt log, which the message's record keeps
/// (`MessageRecord::receipt_cursors`) instead of a second copy.
pub(crate) fn log_own_receipt(tx: &Tx<'_>, signed: &SignedReceipt, message_id: &str) -> Result<u64, TxError> {
    let bytes = Bytes::from(signed.encode_to_vec());
    let cursor = tx.log_receipt(bytes.clone(), &signed.signer_cert)?;
    tx.audit_append(
        EntryKind::Receipt,
        bytes,
        antar_store::Held::Logged(cursor),
        message_id,
    )?;
    Ok(cursor)
}

/// Logs a signed receipt in the node's Merkle log, in the caller's
/// transaction. Returns its index, as `audit_envelope`.
pub(crate) fn audit_receipt(tx: &Tx<'_>, signed: &SignedReceipt, message_id: &str) -> Result<u64, TxError> {
    let cert = antar_store::Held::Cert(&signed.signer_cert);
    tx.audit_append(
        EntryKind::Receipt,
        signed.encode_to_vec().into(),
        cert,
        message_id,
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::{next_state, Together};
    use antar_core::wire::{MessageState as S, ReceiptStatus as R};

    /// What the tests sign: each item tagged with the size of the call that signed it.
    fn tag(all: Vec<u32>) -> Vec<(u32, usize)> {
        let n = all.len();
        all.into_iter().map(|i| (i, n)).collect()
    }

    /// Requests ready at the same moment are signed by one call, and each
    /// gets back its own items, in its order; a request alone is signed alone.
    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_requests_share_one_call_and_get_their_own_items_back() {
        let together = Arc::new(Together::<u32, (u32, usize)>::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..4u32)
            .map(|r| {
                let (together, calls) = (together.clone(), calls.clone());
                tokio::spawn(async move {
                    let items: Vec<u32> = (0..=r).map(|i| r * 10 + i).collect();
                    together
                        .sign(items, |all| {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tag(all)
                        })
                        .await
                })
            })
            .collect();
        for (r, task) in (0..4u32).zip(tasks) {
            let got = task.await.unwrap().unwrap();
            let want: Vec<(u32, usize)> = (0..=r).map(|i| (r * 10 + i, 10)).collect();
            assert_eq!(got, want, "request {r}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one call signed all four");

        let alone = together.sign(vec![7, 8], tag).await.unwrap();
        assert_eq!(alone, [(7, 2), (8, 2)]);
    }

    /// A request dropped while queued leaves its items to be signed for
    /// nobody; the other still gets its own. Polled by hand, so that the
    /// first request is dropped exactly while it waits in the queue.
    #[tokio::test(flavor = "current_thread")]
    async fn a_request_cancelled_while_queued_does_not_hold_up_the_others() {
        use std::future::Future as _;
        use std::task::{Context, Poll, Waker};
        let together = Together::<u32, (u32, usize)>::default();
        let mut cx = Context::from_waker(Waker::noop());
        let mut cancelled = Box::pin(together.sign(vec![1], tag));
        let mut kept = Box::pin(together.sign(vec![2, 3], tag));
        assert!(cancelled.as_mut().poll(&mut cx).is_pending(), "queued, yielding");
        assert!(kept.as_mut().poll(&mut cx).is_pending(), "queued, yielding");
        drop(cancelled);
        match kept.as_mut().poll(&mut cx) {
            // Signed in one call with the cancelled request's item.
            Poll::Ready(got) => assert_eq!(got, Some(vec![(2, 3), (3, 3)])),
            Poll::Pending => panic!("the last one back signs at once"),
        }
    }

    /// The recipient's DELIVERED or PROCESSED is final, and moves a message
    /// on even from a refusal another node said of a copy; a refusal
    /// settles only what is not settled yet, the first one staying; no one
    /// but the recipient delivers.
    #[test]
    fn the_recipients_word_on_delivery_is_final_and_refusals_settle_only_the_unsettled() {
        let next = |cur: S, status: R, from_recipient: bool| {
            S::try_from(next_state(cur as i32, status, from_recipient)).unwrap()
        };
        assert_eq!(next(S::Unspecified, R::Accepted, false), S::Accepted);
        assert_eq!(next(S::Accepted, R::Delivered, true), S::Delivered);
        assert_eq!(next(S::Accepted, R::Processed, true), S::Processed);
        assert_eq!(next(S::Processed, R::Delivered, true), S::Processed);
        assert_eq!(next(S::Rejected, R::Delivered, true), S::Delivered);
        assert_eq!(next(S::Expired, R::Processed, true), S::Processed);
        assert_eq!(next(S::Accepted, R::Delivered, false), S::Accepted);
        assert_eq!(next(S::Accepted, R::Rejected, true), S::Rejected);
        assert_eq!(next(S::Accepted, R::Expired, false), S::Expired);
        assert_eq!(next(S::Delivered, R::Rejected, false), S::Delivered);
        assert_eq!(next(S::Delivered, R::Rejected, true), S::Delivered);
        assert_eq!(next(S::Processed, R::Expired, false), S::Processed);
        assert_eq!(next(S::Rejected, R::Expired, false), S::Rejected);
        assert_eq!(next(S::Delivered, R::Accepted, false), S::Delivered);
    }
}
