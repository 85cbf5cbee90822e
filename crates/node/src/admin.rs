//! `antar.v1.Admin`: status, peers, dead letters, reload and drain.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use prost::Message;
use tonic::{Request, Response, Status};

use antar_core::time::{to_timestamp, unix_millis};
use antar_core::wire::admin_server::Admin;
use antar_core::wire::{
    transfer_item, ClearSplitViewRequest, ClearSplitViewResponse, DeadLetter as WireDeadLetter, DrainRequest,
    DrainResponse, Envelope, ListDeadLettersRequest, ListDeadLettersResponse, ListPeersRequest,
    ListPeersResponse, Outcome, PeerStatus, PurgeDeadLettersRequest, PurgeDeadLettersResponse, QueueDepth,
    ReceiptStatus, ReleaseQueueRequest, ReleaseQueueResponse, ReloadRequest, ReloadResponse,
    RetryDeadLettersRequest, RetryDeadLettersResponse, StatusRequest, StatusResponse, TransferItem,
};
use antar_core::{AgencyId, MessageId};
use antar_store::{DeadLetter, Tx, TxError};

use crate::auth;
use crate::error::NodeError;
use crate::state::Shared;

pub(crate) struct AdminService {
    pub(crate) shared: Arc<Shared>,
    pub(crate) reload: crate::Reload,
    /// `grpc.health.v1`: `antar.v1.Agency` is NOT_SERVING while draining,
    /// so load balancers and readiness probes move apps elsewhere.
    pub(crate) health: tonic_health::server::HealthReporter,
}

pub(crate) fn peer_statuses(shared: &Shared) -> Vec<PeerStatus> {
    let policy = shared.policy();
    let in_doubt = |agency: &str| {
        shared.in_doubt(agency).unwrap_or_else(|e| {
            tracing::warn!(peer = %agency, error = %e, "could not count the items this peer may hold");
            0
        })
    };
    let health = shared
        .peer_health
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut peers: Vec<PeerStatus> = policy
        .peers()
        .map(|(agency, addr)| {
            let h = health.get(agency).cloned().unwrap_or_default();
            PeerStatus {
                agency: agency.clone(),
                addr: addr.clone(),
                connected: h.connected,
                last_contact: h.last_contact.map(to_timestamp),
                backlog: shared.store.outbox_depth(agency),
                last_error: h.last_error,
                in_doubt: in_doubt(agency),
            }
        })
        .collect();
    // A queue left for an agency that is no longer a peer: no forwarder
    // takes from it; the rerouter moves what a route leads away from it.
    for agency in shared.store.outbox_peers().unwrap_or_default() {
        if !policy.is_peer(&agency) {
            let backlog = shared.store.outbox_depth(&agency);
            peers.push(PeerStatus {
                in_doubt: in_doubt(&agency),
                last_error: format!(
                    "{agency} is not a peer in the config, and these items stay here: those with no route to where \
                     they go until a reload gives them one, those {agency} may hold already (sent, custody ack \
                     lost) until it is a peer again, or until an administrator releases them (antar admin \
                     release-queue {agency}) if it is gone for good"
                ),
                agency,
                backlog,
                ..PeerStatus::default()
            });
        }
    }
    peers.sort_by(|a, b| a.agency.cmp(&b.agency));
    peers
}

fn ids(field: &'static str, list: &[String]) -> Result<Vec<MessageId>, NodeError> {
    list.iter()
        .map(|s| MessageId::parse(s).map_err(|e| NodeError::invalid(field, e)))
        .collect()
}

fn all_or(shared: &Shared, given: Vec<MessageId>) -> Result<Vec<MessageId>, NodeError> {
    if !given.is_empty() {
        return Ok(given);
    }
    Ok(shared
        .store
        .dead_letters(None, usize::MAX)?
        .iter()
        .filter_map(|d| <[u8; 16]>::try_from(d.message_id.as_slice()).ok())
        .map(MessageId::from_bytes)
        .collect())
}

/// Moves an expired or refused item to the dead letters; for an envelope,
/// routes a signed receipt with `status` to its sender.
pub(crate) fn bury(
    shared: &Shared,
    tx: &Tx<'_>,
    peer: &str,
    item: &[u8],
    status: ReceiptStatus,
    reason: &str,
) -> Result<(), TxError> {
    let decoded = TransferItem::decode(item).unwrap_or_default();
    let Some(transfer_item::Item::Envelope(et)) = &decoded.item else {
        return Ok(());
    };
    let signed = et.envelope.clone().unwrap_or_default();
    let env = Envelope::decode(&signed.envelope[..]).unwrap_or_default();
    let id = MessageId::parse(&env.id).unwrap_or_default();
    tx.put_dead(
        &id,
        &DeadLetter {
            message_id: id.as_bytes().to_vec(),
            item: item.to_vec(),
            reason: reason.to_owned(),
            at_ms: unix_millis(SystemTime::now()),
            peer: peer.to_owned(),
        },
    )?;
    let receipt = shared.sign_receipt(shared.draft_receipt(
        &env,
        &signed.envelope,
        status,
        reason,
        Outcome::Unspecified,
        Vec::new(),
    ));
    shared.route_issued(tx, &receipt).map(drop)
}

/// Moves every outbox item past its TTL to the dead letters with an EXPIRED receipt.
pub(crate) async fn sweep_expired(shared: &Shared) -> Result<usize, NodeError> {
    let now = unix_millis(SystemTime::now());
    let sent = shared.sent_snapshot();
    let due = shared
        .store
        .expired_sparing(now, 512, |peer| sent.get(peer).copied())?;
    if due.is_empty() {
        return Ok(0);
    }
    // No forwarder reads its outbox meanwhile (`Shared::sending`).
    let _alone = shared.sending.write().await;
    expire(shared, &due).await
}

/// Moves the outbox items `due` (peer, sequence number) to the dead
/// letters with an EXPIRED receipt; one already gone is passed over.
pub(crate) async fn expire(shared: &Shared, due: &[(String, u64)]) -> Result<usize, NodeError> {
    if due.is_empty() {
        return Ok(0);
    }
    let n = shared
        .store
        .transact(|tx| {
            let mut n = 0;
            for (peer, seq) in due {
                // Sent since `due` was read: the peer's to take or refuse.
                if crate::sent::may_hold(shared.sent_upto(peer), *seq) {
                    continue;
                }
                if let Some(item) = tx.remove_outbox(peer, *seq)? {
                    bury(
                        shared,
                        tx,
                        peer,
                        &item,
                        ReceiptStatus::Expired,
                        crate::state::EXPIRED,
                    )?;
                    n += 1;
                }
            }
            Ok(n)
        })
        .await
        .map_err(NodeError::from)?;
    shared.metrics.expired.inc_by(n as u64);
    Ok(n)
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        auth::admin(&self.shared, &req)?;
        let s = &self.shared;
        Ok(Response::new(StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            identity: s.identity.to_string(),
            agency: s.agency.to_string(),
            uptime_seconds: s.started.elapsed().as_secs(),
            store_bytes: s.store.size_on_disk(),
            peers: peer_statuses(s),
            inboxes: s
                .store
                .inbox_depths()
                .into_iter()
                .map(|(name, depth)| QueueDepth { name, depth })
                .collect(),
            dead_letters: s.store.dead_letter_count(),
            draining: s.draining(),
            split_views: crate::witness::split_views(s)
                .into_iter()
                .map(|(a, _)| a)
                .collect(),
        }))
    }

    async fn list_peers(
        &self,
        req: Request<ListPeersRequest>,
    ) -> Result<Response<ListPeersResponse>, Status> {
        auth::admin(&self.shared, &req)?;
        Ok(Response::new(ListPeersResponse {
            peers: peer_statuses(&self.shared),
        }))
    }

    async fn list_dead_letters(
        &self,
        req: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        auth::admin(&self.shared, &req)?;
        let r = req.into_inner();
        let after = if r.after.is_empty() {
            None
        } else {
            Some(MessageId::parse(&r.after).map_err(|e| NodeError::invalid("after", e))?)
        };
        let limit = if r.limit == 0 { 100 } else { r.limit.min(10_000) } as usize;
        let list = self
            .shared
            .store
            .dead_letters(after.as_ref(), limit)
            .map_err(NodeError::from)?;
        let dead_letters = list
            .into_iter()
            .map(|d| {
                let item = TransferItem::decode(d.item.as_slice()).unwrap_or_default();
                let envelope = match item.item {
                    Some(transfer_item::Item::Envelope(et)) => et.envelope,
                    _ => None,
                };
                WireDeadLetter {
                    envelope,
                    reason: d.reason,
                    at: Some(to_timestamp(
                        std::time::UNIX_EPOCH + std::time::Duration::from_millis(d.at_ms),
                    )),
                }
            })
            .collect();
        Ok(Response::new(ListDeadLettersResponse { dead_letters }))
    }

    async fn retry_dead_letters(
        &self,
        req: Request<RetryDeadLettersRequest>,
    ) -> Result<Response<RetryDeadLettersResponse>, Status> {
        auth::admin(&self.shared, &req)?;
        let wanted = all_or(&self.shared, ids("message_ids", &req.get_ref().message_ids)?)?;
        let shared = &self.shared;
        let retried = shared
            .store
            .transact(|tx| {
                let mut retried = Vec::new();
                for id in &wanted {
                    let Some(dead) = tx.take_dead(id)? else { continue };
                    let item = TransferItem::decode(dead.item.as_slice()).unwrap_or_default();
                    let Some(transfer_item::Item::Envelope(et)) = &item.item else {
                        continue;
                    };
                    let signed = et.envelope.clone().unwrap_or_default();
                    let recipient = Envelope::decode(&signed.envelope[..])
                        .unwrap_or_default()
                        .recipient;
                    let peer = shared.policy().next_hop(&recipient).unwrap_or(dead.peer.clone());
                    // Retried by an administrator: no longer subject to its TTL here.
                    let cert = antar_store::Held::Cert(&signed.signer_cert);
                    tx.push_outbox(&peer, &dead.item, cert, 0)?;
                    retried.push(id.to_string());
                }
                Ok(retried)
            })
            .await
            .map_err(NodeError::from)?;
        shared.store.durable().await.map_err(NodeError::from)?;
        Ok(Response::new(RetryDeadLettersResponse { retried }))
    }

    async fn purge_dead_letters(
        &self,
        req: Request<PurgeDeadLettersRequest>,
    ) -> Result<Response<PurgeDeadLettersResponse>, Status> {
        auth::admin(&self.shared, &req)?;
        let wanted = all_or(&self.shared, ids("message_ids", &req.get_ref().message_ids)?)?;
        let purged = self
            .shared
            .store
            .transact(|tx| {
                let mut purged = Vec::new();
                for id in &wanted {
                    if tx.take_dead(id)?.is_some() {
                        purged.push(id.to_string());
                    }
                }
                Ok(purged)
            })
            .await
            .map_err(NodeError::from)?;
        self.shared.store.durable().await.map_err(NodeError::from)?;
        Ok(Response::new(PurgeDeadLettersResponse { purged }))
    }

    async fn reload(&self, req: Request<ReloadRequest>) -> Result<Response<ReloadResponse>, Status> {
        auth::admin(&self.shared, &req)?;
        Ok(Response::new((self.reload)()?))
    }

    async fn release_queue(
        &self,
        req: Request<ReleaseQueueRequest>,
    ) -> Result<Response<ReleaseQueueResponse>, Status> {
        let by = auth::admin(&self.shared, &req)?;
        let agency = AgencyId::parse(&req.get_ref().agency).map_err(|e| NodeError::invalid("agency", e))?;
        let done = crate::forward::release(&self.shared, agency.as_str(), &by).await?;
        Ok(Response::new(ReleaseQueueResponse {
            released: done.released,
            moved: done.rerouted.moved,
            unroutable: done.rerouted.unroutable,
        }))
    }

    async fn clear_split_view(
        &self,
        req: Request<ClearSplitViewRequest>,
    ) -> Result<Response<ClearSplitViewResponse>, Status> {
        let by = auth::admin(&self.shared, &req)?;
        let agency = AgencyId::parse(&req.get_ref().agency).map_err(|e| NodeError::invalid("agency", e))?;
        let cleared = crate::witness::clear_split_view(&self.shared, agency.as_str(), &by).await?;
        let (forgotten_size, forgotten_root, forgotten_note) = cleared
            .forgotten
            .map_or((0, Vec::new(), String::new()), |(s, r, n)| (s, r.to_vec(), n));
        Ok(Response::new(ClearSplitViewResponse {
            found: cleared.found,
            forgotten_size,
            forgotten_root: forgotten_root.into(),
            forgotten_note,
        }))
    }

    async fn drain(&self, req: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
        auth::admin(&self.shared, &req)?;
        let drain = req.get_ref().drain;
        self.shared.draining.store(drain, Ordering::Relaxed);
        let status = if drain {
            tonic_health::ServingStatus::NotServing
        } else {
            tonic_health::ServingStatus::Serving
        };
        self.health.set_service_status("antar.v1.Agency", status).await;
        tracing::info!(drain, "drain mode changed by an administrator");
        Ok(Response::new(DrainResponse { draining: drain }))
    }
}
