//! Prometheus metrics: counters kept in atomics, gauges read from the store
//! when scraped, served as text on `listen.metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use antar_core::Histogram;

use crate::state::Shared;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    pub(crate) fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// How often a refusal by one limit of one caller is logged at most.
const LIMITED_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The refusals of one caller by one limit.
#[derive(Debug, Default)]
struct Limited {
    refused: u64,
    logged: Option<std::time::Instant>,
    quiet: u64,
}

/// Every counter the node keeps.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) sent: Counter,
    pub(crate) delivered: Counter,
    pub(crate) relayed: Counter,
    pub(crate) processed: Counter,
    pub(crate) transferred: Counter,
    pub(crate) retries: Counter,
    pub(crate) expired: Counter,
    pub(crate) payloads_purged: Counter,
    /// `Send` (and `Reply`) from request to durable acceptance.
    pub(crate) send_seconds: Histogram,
    /// A transfer batch from sending to the peer's acknowledgement.
    pub(crate) transfer_seconds: Histogram,
    /// An envelope's `created_at` to its storage in this node's inbox.
    pub(crate) delivery_seconds: Histogram,
    rejections: Mutex<BTreeMap<String, u64>>,
    /// Calls refused by a per-caller limit, by the limit's key and the
    /// caller: how many, when a refusal was last logged, and how many
    /// since.
    limited: Mutex<BTreeMap<(&'static str, String), Limited>>,
    /// The connection counts of every TLS listener.
    pub(crate) listeners: Mutex<Vec<Arc<crate::net::ConnLimit>>>,
    /// Unix seconds of the newest checkpoint seen by the checkpointer, and its cosignature count.
    checkpoint_at: AtomicU64,
    checkpoint_cosignatures: AtomicU64,
}

impl Metrics {
    pub(crate) fn checkpoint_signed(&self, cp: &antar_core::wire::Checkpoint) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.checkpoint_at.store(now, Ordering::Relaxed);
        self.checkpoint_cosignatures
            .store(cp.cosignatures.len() as u64, Ordering::Relaxed);
    }

    /// A refusal of `caller` (an app's name, a peer agency) by
    /// `limits.<limit>`, answered with `refusal`: counted, and logged with
    /// that answer at most every [`LIMITED_LOG_EVERY`] for each limit and
    /// caller, with how many were refused since the last line for them.
    /// (Names of apps and agencies are `[a-z0-9._-]` by their parsers, so
    /// they need no escaping as label values.)
    pub(crate) fn limited(&self, limit: &'static str, caller: &str, refusal: &str) {
        let (quiet, since) = {
            let mut limited = self.limited.lock().unwrap_or_else(|p| p.into_inner());
            let key = (limit, caller.to_owned());
            let l = limited.entry(key).or_default();
            l.refused += 1;
            if l.logged.is_some_and(|at| at.elapsed() < LIMITED_LOG_EVERY) {
                l.quiet += 1;
                return;
            }
            let since = l.logged.map(|at| at.elapsed().as_secs());
            let quiet = std::mem::take(&mut l.quiet);
            l.logged = Some(std::time::Instant::now());
            (quiet, since)
        };
        tracing::warn!(
            limit,
            caller,
            also_refused = quiet,
            since_last_line_s = since,
            "refused: {refusal} (logged at most every 10 s for each limit and caller; antar_limited_total counts every refusal)"
        );
    }

    pub(crate) fn rejected(&self, reason: &str) {
        *self
            .rejections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(reason.to_owned())
            .or_default() += 1;
    }

    /// The Prometheus text exposition of the node.
    pub(crate) fn render(&self, shared: &Shared) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n");
        };
        counter(
            "antar_sent_total",
            "Envelopes accepted from apps.",
            self.sent.get(),
        );
        counter(
            "antar_delivered_total",
            "Envelopes stored in this node's inboxes from peers.",
            self.delivered.get(),
        );
        counter(
            "antar_relayed_total",
            "Envelopes taken into custody to relay.",
            self.relayed.get(),
        );
        counter(
            "antar_processed_total",
            "Deliveries acked by apps.",
            self.processed.get(),
        );
        counter(
            "antar_transferred_total",
            "Items peers took custody of.",
            self.transferred.get(),
        );
        counter(
            "antar_transfer_retries_total",
            "Failed transfer sessions, retried with backoff.",
            self.retries.get(),
        );
        counter(
            "antar_payloads_purged_total",
            "Payloads deleted after limits.payload_retention_secs.",
            self.payloads_purged.get(),
        );
        counter(
            "antar_expired_total",
            "Envelopes that expired before delivery.",
            self.expired.get(),
        );
        counter(
            "antar_signatures_total",
            "Ed25519 signatures this node made: envelopes, receipts, batches of them, checkpoints, cosignatures.",
            shared.signer.signatures(),
        );
        self.send_seconds.render(
            &mut out,
            "antar_send_duration_seconds",
            "Send and Reply calls and SendBatch items, from request to durable acceptance.",
        );
        self.transfer_seconds.render(
            &mut out,
            "antar_transfer_duration_seconds",
            "Transfer batches, from sending to the peer's custody acknowledgement.",
        );
        self.delivery_seconds.render(
            &mut out,
            "antar_delivery_latency_seconds",
            "Envelopes from created_at at the sender to stored in this node's inbox.",
        );
        shared.store.journal_syncs().render(
            &mut out,
            "antar_journal_sync_duration_seconds",
            "Groups of transactions written and fdatasynced to the store's journal: the disk's share of every durable write.",
        );
        shared.store.journal_checkpoints().render(
            &mut out,
            "antar_journal_checkpoint_duration_seconds",
            "Checkpoints of full journal segments (sled flushed and fsynced, the segments deleted or recycled), one per limits.journal_segment_bytes written or fewer.",
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let at = self.checkpoint_at.load(Ordering::Relaxed);
        if at > 0 {
            let _ = write!(
                out,
                "# HELP antar_checkpoint_age_seconds Seconds since the checkpointer last checked the log.\n# TYPE antar_checkpoint_age_seconds gauge\nantar_checkpoint_age_seconds {}\n",
                now.saturating_sub(at)
            );
        }
        let _ = write!(
            out,
            "# HELP antar_checkpoint_cosignatures Peer cosignatures on the newest checkpoint when last checked.\n# TYPE antar_checkpoint_cosignatures gauge\nantar_checkpoint_cosignatures {}\n",
            self.checkpoint_cosignatures.load(Ordering::Relaxed)
        );
        out.push_str("# HELP antar_split_view Logs of peers caught presenting a split view (1 per log).\n# TYPE antar_split_view gauge\n");
        for (log, _) in crate::witness::split_views(shared) {
            let _ = writeln!(out, "antar_split_view{{log=\"{log}\"}} 1");
        }
        let listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner()).clone();
        out.push_str("# HELP antar_connections Connections open on a listener, TLS handshakes included.\n# TYPE antar_connections gauge\n");
        for l in &listeners {
            let _ = writeln!(
                out,
                "antar_connections{{listener=\"{}\"}} {}",
                l.listener(),
                l.open()
            );
        }
        out.push_str("# HELP antar_connections_refused_total Connections closed at accept by limits.max_connections or limits.max_connections_per_ip.\n# TYPE antar_connections_refused_total counter\n");
        for l in &listeners {
            let _ = writeln!(
                out,
                "antar_connections_refused_total{{listener=\"{}\"}} {}",
                l.listener(),
                l.refused()
            );
        }
        out.push_str("# HELP antar_rejected_total Items this node refused, by reason.\n# TYPE antar_rejected_total counter\n");
        for (reason, n) in self.rejections.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "antar_rejected_total{{reason=\"{reason}\"}} {n}");
        }
        out.push_str("# HELP antar_limited_total Refusals by a limit (limits.<limit>): sends, SendBatch items and calls of an app (caller: its name), transfer streams and Witness calls of a peer (caller: its agency); max_queued_bytes: sends refused at the store's quota, transfer streams at its ceiling for peers' envelopes.\n# TYPE antar_limited_total counter\n");
        for ((limit, caller), l) in self.limited.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(
                out,
                "antar_limited_total{{limit=\"{limit}\",caller=\"{caller}\"}} {}",
                l.refused
            );
        }
        out.push_str(
            "# HELP antar_outbox_depth Items waiting for a peer.\n# TYPE antar_outbox_depth gauge\n",
        );
        for (peer, n) in shared.store.outbox_depths() {
            let _ = writeln!(out, "antar_outbox_depth{{peer=\"{peer}\"}} {n}");
        }
        out.push_str(
            "# HELP antar_inbox_depth Messages waiting for an app's ack.\n# TYPE antar_inbox_depth gauge\n",
        );
        for (service, n) in shared.store.inbox_depths() {
            let _ = writeln!(out, "antar_inbox_depth{{service=\"{service}\"}} {n}");
        }
        let _ = write!(
            out,
            "# HELP antar_dead_letters Dead letters kept.\n# TYPE antar_dead_letters gauge\nantar_dead_letters {}\n\
             # HELP antar_queued_bytes Bytes queued in outboxes and inboxes.\n# TYPE antar_queued_bytes gauge\nantar_queued_bytes {}\n\
             # HELP antar_store_bytes Size of the store on disk.\n# TYPE antar_store_bytes gauge\nantar_store_bytes {}\n",
            shared.store.dead_letter_count(),
            shared.store.queued_bytes(),
            shared.store.size_on_disk()
        );
        out
    }
}

/// Serves `GET /metrics` (any path, in fact) over plain HTTP/1.1.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    limit: Arc<crate::net::ConnLimit>,
    shutdown: CancellationToken,
) {
    loop {
        let (mut conn, _, slot) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = crate::net::accept_admitted(&listener, &limit) => a,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            // A scrape, start to end, within 5 s; its place is held till then.
            let _slot = slot;
            let scrape = async {
                let mut buf = [0u8; 2048];
                if !matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {
                    return;
                }
                let body = shared.metrics.render(&shared);
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(body.as_bytes()).await;
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), scrape).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_all_counted_and_logged_once_in_a_while_for_each_caller() {
        let m = Metrics::default();
        for _ in 0..5 {
            m.limited("app_calls_per_sec", "dev", "over");
        }
        m.limited("app_calls_per_sec", "payroll", "over");
        let dev = ("app_calls_per_sec", "dev".to_owned());
        {
            let mut limited = m.limited.lock().unwrap();
            let l = &limited[&dev];
            assert_eq!((l.refused, l.quiet), (5, 4), "logged once, four held back");
            let payroll = &limited[&("app_calls_per_sec", "payroll".to_owned())];
            assert_eq!(
                (payroll.refused, payroll.quiet),
                (1, 0),
                "another caller is logged apart"
            );
            // Ten seconds on, the next refusal is logged, with the four.
            let l = limited.get_mut(&dev).unwrap();
            l.logged = Some(std::time::Instant::now() - LIMITED_LOG_EVERY);
        }
        m.limited("app_calls_per_sec", "dev", "over");
        let limited = m.limited.lock().unwrap();
        let l = &limited[&dev];
        assert_eq!((l.refused, l.quiet), (6, 0));
        assert!(l.logged.unwrap().elapsed() < LIMITED_LOG_EVERY);
    }
}
