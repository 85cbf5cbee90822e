//! `antar bench`: the whole path measured on this machine — two real nodes
//! (finance -> health, peered directly) with mTLS, sled on disk, signatures
//! and receipts; concurrent senders, and an acking receiver at health.
//! Prints one `RESULT` line.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use prost::bytes::Bytes;
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

use antar_client::wire::agency_client::AgencyClient;
use antar_client::wire::{self, Kind};
use antar_client::{Client, ClientRole};
use antar_node::dev::{Addrs, AgencySpec, DevLayout};
use antar_node::{Listeners, Node};

use crate::machine::CpuTimes;

/// `antar bench` arguments.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  antar bench --messages 20000 --size 1024 --senders 32          # closed loop: maximum throughput\n  antar bench --rate 2000 --duration 30                             # open loop: latency at a fixed offered rate\n  antar bench --rate 2000 --duration 30 --warmup 2                  # the same, latencies of a running node only\n  antar bench --via-hub --kind transaction --receipts processed --json report.json\n  antar bench --receipts delivered --batch-signatures                # receipts issued together share a signature\n  antar bench --senders 2 --batch 32 --receipts delivered           # SendBatch / AckBatch, 32 per call\n  antar bench --rate 2000 --duration 30 --ack-batch 32              # open loop, the app acks with AckBatch\n  antar bench --peer-down --messages 1000000                        # queue a million with the peer down, then drain\n\nPrints: RESULT mode=… sent_per_s=… delivered_per_s=… p50_ms=… p99_ms=… send_p50_ms=… send_p99_ms=… cpu_us_per_msg=… journal_syncs=… syncs_over_25ms=… signs_per_msg=… warmup_s=…\n  sign_per_s=… verify_per_s=… fsync_p50_ms=… iowait_pct=… steal_pct=… system_pct=… disk_kb_per_msg=… rss_peak_mb=…\n(with --peer-down: RESULT mode=queue … rss_queued_mb=… rss_peak_mb=… drain_per_s=… rss_drain_peak_mb=… signs_per_msg=…;\nrss_peak_mb is the high-water mark while queueing, rss_drain_peak_mb over the whole run)\nLatency runs from the send's start (its scheduled instant, in open loop) to the\ndelivery at the receiving app, or with --receipts to that receipt's arrival at\nthe sending node; recorded in an HdrHistogram (1 µs to 1 h, 3 digits),\nexcept for the sends started in the first --warmup seconds (warmup_s).\nsend_p50_ms/send_p99_ms: from the same start to the sending node's answer to\nSend, the wait of the agency system that sends (also without the warm-up).\ncpu_us_per_msg: CPU time (user + system) of the whole process — nodes and\nload generator — per message while it ran: steadier than throughput on a\nbusy machine.\njournal_syncs/syncs_over_25ms: the nodes' journal fdatasyncs, and those\nthat took over 25 ms (a stalling disk holds up every send meanwhile).\nsigns_per_msg: Ed25519 signatures all the nodes made per message\n(antar_signatures_total), checkpoints included: 4 without the batch switches\nwhen the app acks every message (--receipts none or processed; 3 to 4 with\ndelivered, whose run may end before the last acks); under load with both\n--batch-signatures and --batch-envelopes, below 1.\nsign_per_s/verify_per_s/fsync_p50_ms: the machine, measured before the nodes\nstart: Ed25519 signatures and verifications a second on one core (ring, as\nthe nodes sign), and the median fdatasync of a 4 KiB overwrite in the run's\ndirectory; DESIGN.md §10 budgets for 45,000 / 16,000 / 0.1 ms. Compare runs\nfrom two machines through these.\niowait_pct/steal_pct: of all the machine's CPU time while the run went on,\nthe share idle waiting for IO and the share the hypervisor gave to others.\nsystem_pct: the share of cpu_us_per_msg spent in the kernel.\ndisk_kb_per_msg: bytes the process caused to be written to storage per\nmessage, in KB (/proc/self/io write_bytes: journals, sled, checkpoints).\nrss_peak_mb: the process's resident-set high-water mark, MiB."
)]
pub struct BenchArgs {
    /// Envelopes to send in total (default 20000; with --duration, no limit).
    #[arg(long)]
    messages: Option<u64>,
    /// Stop sending after this many seconds (the run then waits for what was sent).
    #[arg(long)]
    duration: Option<u64>,
    /// Leave out of the latencies the sends started in the run's first
    /// this many seconds: a new node's first writes (new sled trees and
    /// files, its first journal segments, new connections) are slower
    /// than a running node's. Every figure but the latencies still counts
    /// every message. Must be shorter than --duration. Default: 0, every
    /// send's latency counts.
    #[arg(long, default_value_t = 0, conflicts_with = "peer_down")]
    warmup: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Concurrent senders, each waiting for its call to be durable before
    /// the next. Default: 64; in open loop with --batch, 2.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    senders: Option<u64>,
    /// Requests per call: above 1, senders send with `SendBatch` and the
    /// receiver acks with `AckBatch` (unless --ack-batch says otherwise),
    /// this many at most per call; 1: unary `Send` and `Ack`. Closed loop:
    /// each call carries this many. Open loop: a free sender takes the
    /// sends already due (at least one, this many at most), so calls grow
    /// only while the senders are busy, as a client that coalesces would.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    batch: u64,
    /// Acks per call of the receiving app, in either loop: above 1, it acks
    /// with `AckBatch` the deliveries it holds (those already arrived, up to
    /// this many; it never waits for more); 1: unary `Ack` each. Default:
    /// --batch.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1000))]
    ack_batch: Option<u64>,
    /// Deliveries the receiver may hold unacked.
    #[arg(long, default_value_t = 512)]
    in_flight: u32,
    /// Directory for the nodes' certificates and stores (default: a temporary directory).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Open loop: offer this many sends per second on a fixed schedule (no
    /// coordinated omission): with --batch 1 each is its own `Send`, sent
    /// at its instant; without --rate, closed loop with --senders.
    #[arg(long)]
    rate: Option<u64>,
    /// Route finance -> hub -> health (two hops) instead of finance -> health.
    #[arg(long)]
    via_hub: bool,
    /// notice, or transaction (each with its own idempotency key).
    #[arg(long, default_value = "notice", value_parser = ["notice", "transaction"])]
    kind: String,
    /// What completes a message: `none` — the receiving app got it; `delivered`
    /// or `processed` — that signed receipt is back at the sending node.
    #[arg(long, default_value = "none", value_parser = ["none", "delivered", "processed"])]
    receipts: String,
    /// Queue test: the recipient's node stays down while everything is sent,
    /// then starts; reports the process's peak RSS and the drain rate.
    #[arg(long)]
    peer_down: bool,
    /// Both nodes sign the receipts of each transfer batch with one
    /// signature (`receipts.batch_signatures = true`, see
    /// docs/configuration.md); default: one signature per receipt.
    #[arg(long)]
    batch_signatures: bool,
    /// The sending node signs the envelopes of the sends it serves at the
    /// same moment with one signature (`envelopes.batch_signatures = true`,
    /// see docs/configuration.md); default: one signature per envelope.
    #[arg(long)]
    batch_envelopes: bool,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn spec(id: &str, peers: &[&str], default_route: Option<&str>) -> AgencySpec {
    AgencySpec {
        id: id.into(),
        peers: peers.iter().map(|p| (*p).to_owned()).collect(),
        default_route: default_route.map(str::to_owned),
    }
}

/// A node configured and bound but not started (the recipient, with --peer-down).
struct HeldBack {
    config: antar_node::NodeConfig,
    listeners: Listeners,
}

impl HeldBack {
    async fn start(self) -> anyhow::Result<Node> {
        Ok(Node::start(self.config, None, self.listeners).await?)
    }
}

async fn start_nodes(
    dir: &std::path::Path,
    via_hub: bool,
    hold_back_recipient: bool,
    batch_signatures: bool,
    batch_envelopes: bool,
) -> anyhow::Result<(
    Vec<Node>,
    Option<HeldBack>,
    antar_pki::federation_file::FederationFile,
)> {
    let layout = DevLayout::new(dir);
    let topology = if via_hub {
        vec![
            spec("finance", &["hub"], Some("hub")),
            spec("hub", &["finance", "health"], None),
            spec("health", &["hub"], Some("hub")),
        ]
    } else {
        vec![
            spec("finance", &["health"], None),
            spec("health", &["finance"], None),
        ]
    };
    layout.ensure_pki(&topology)?;
    let mut addrs = BTreeMap::new();
    let mut bound = Vec::new();
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    for spec in &topology {
        let l = [
            TcpListener::bind(any).await?,
            TcpListener::bind(any).await?,
            TcpListener::bind(any).await?,
        ];
        addrs.insert(
            spec.id.clone(),
            Addrs {
                api: l[0].local_addr()?,
                peer: l[1].local_addr()?,
                admin: l[2].local_addr()?,
                metrics: l[2].local_addr()?,
            },
        );
        bound.push(l);
    }
    let mut nodes = Vec::new();
    let mut held = None;
    for (spec, [api, peer, admin]) in topology.iter().zip(bound) {
        let mut config = layout.node_config(spec, &addrs);
        config.listen.metrics = None;
        config.limits.max_in_flight = 1024;
        // A queue test holds far more than the default quota; sends must not be refused.
        config.limits.max_queued_bytes = u64::MAX;
        config.limits.app_sends_per_sec = 0;
        config.limits.app_calls_per_sec = 0;
        config.receipts.batch_signatures = batch_signatures;
        config.envelopes.batch_signatures = batch_envelopes;
        let listeners = Listeners {
            api,
            peer,
            admin: Some(admin),
            metrics: None,
        };
        if hold_back_recipient && spec.id == "health" {
            held = Some(HeldBack { config, listeners });
        } else {
            nodes.push(Node::start(config, None, listeners).await?);
        }
    }
    Ok((nodes, held, layout.federation_file(&topology, &addrs)?))
}

/// Latency histogram in microseconds, 1 µs to 1 h, 3 significant digits.
type Latencies = hdrhistogram::Histogram<u64>;

fn latencies() -> anyhow::Result<Latencies> {
    Latencies::new_with_bounds(1, 3_600_000_000, 3).context("latency histogram")
}

/// This process's resident set now and at its peak, MiB (Linux `/proc/self/status`).
fn rss_mib() -> Option<(f64, f64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// What this process has used so far: CPU seconds, user and system apart
/// (Linux `/proc/self/stat`, whose times are in USER_HZ = 100 ticks per
/// second), and bytes it caused to be written to storage (`write_bytes` of
/// `/proc/self/io`: the nodes' journals, sled's logs, the checkpoints).
/// Per message, steadier figures than throughput on a machine shared with
/// others.
#[derive(Debug, Clone, Copy)]
struct Used {
    user_s: f64,
    system_s: f64,
    /// `None` where the kernel does not count it.
    written: Option<u64>,
}

impl Used {
    fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
        let utime: u64 = rest.nth(11)?.parse().ok()?;
        let stime: u64 = rest.next()?.parse().ok()?;
        let written = std::fs::read_to_string("/proc/self/io").ok().and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        });
        Some(Self {
            user_s: utime as f64 / 100.0,
            system_s: stime as f64 / 100.0,
            written,
        })
    }

    /// Per message since `start`: CPU µs, the share of it in the kernel
    /// (%), and KB written to storage.
    fn per_message(start: Option<Self>, messages: u64) -> (f64, f64, f64) {
        let (Some(a), Some(b)) = (start, Self::now()) else {
            return (0.0, 0.0, 0.0);
        };
        if messages == 0 {
            return (0.0, 0.0, 0.0);
        }
        let (user, system) = (b.user_s - a.user_s, b.system_s - a.system_s);
        let system_pct = if user + system > 0.0 {
            system * 100.0 / (user + system)
        } else {
            0.0
        };
        let written = match (a.written, b.written) {
            (Some(a), Some(b)) => b.saturating_sub(a) as f64 / 1e3 / messages as f64,
            _ => 0.0,
        };
        ((user + system) * 1e6 / messages as f64, system_pct, written)
    }
}

/// Shared counters of one run.
#[derive(Default)]
struct Progress {
    /// Sends the node acknowledged.
    sent: AtomicU64,
    /// Messages complete (delivered to the app, or their receipt back).
    done: AtomicU64,
    /// How many must complete; `u64::MAX` until sending ends.
    target: AtomicU64,
    /// `SendBatch` calls made.
    batch_calls: AtomicU64,
    /// Sends started before this instant (ns since the epoch) are the
    /// warm-up: their latencies are not recorded.
    record_from_ns: AtomicU64,
}

impl Progress {
    fn finished(&self) -> bool {
        self.done.load(Ordering::Relaxed) >= self.target.load(Ordering::Relaxed)
    }

    /// Whether the latency of a send started at `start_ns` is recorded
    /// (it started after the warm-up).
    fn measured(&self, start_ns: u64) -> bool {
        start_ns >= self.record_from_ns.load(Ordering::Relaxed)
    }
}

/// A delivery's envelope; with `hist`, the delivery completes its message
/// and its latency is recorded from the `bench-ts` header.
fn delivered(
    d: wire::Delivery,
    progress: &Progress,
    hist: Option<&Mutex<Latencies>>,
) -> anyhow::Result<wire::Envelope> {
    let env = wire::Envelope::decode(d.envelope.unwrap_or_default().envelope)?;
    if let Some(hist) = hist {
        let ts = env.headers.get("bench-ts").and_then(|t| t.parse::<u64>().ok());
        if let Some(ts) = ts.filter(|&ts| progress.measured(ts)) {
            lock(hist).saturating_record(now_ns().saturating_sub(ts) / 1_000);
        }
        progress.done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(env)
}

fn ack_of(env: &wire::Envelope) -> wire::AckRequest {
    let outcome = if env.kind == Kind::Transaction as i32 {
        wire::Outcome::Committed as i32
    } else {
        0
    };
    wire::AckRequest {
        message_id: env.id.clone(),
        outcome,
        result: Default::default(),
    }
}

/// Receives at health and acks everything, up to `max_batch` per call;
/// with `hist`, see [`delivered`].
async fn receive_and_ack(
    receiver: Client,
    in_flight: u32,
    max_batch: usize,
    progress: Arc<Progress>,
    hist: Option<Arc<Mutex<Latencies>>>,
) -> anyhow::Result<()> {
    let mut agency = receiver.agency();
    let mut stream = agency
        .receive(wire::ReceiveRequest {
            services: vec![],
            max_in_flight: in_flight,
        })
        .await?
        .into_inner();
    let mut acks = tokio::task::JoinSet::new();
    while !progress.finished() {
        let d = match tokio::time::timeout(Duration::from_millis(200), stream.next()).await {
            Err(_) => continue,
            Ok(None) => anyhow::bail!("the receive stream ended"),
            Ok(Some(d)) => d?,
        };
        let env = delivered(d, &progress, hist.as_deref())?;
        let mut batch = vec![ack_of(&env)];
        // With --ack-batch (or --batch) above 1: the deliveries already
        // here join this one's call.
        while batch.len() < max_batch {
            match tokio::time::timeout(Duration::ZERO, stream.next()).await {
                Ok(Some(d)) => batch.push(ack_of(&delivered(d?, &progress, hist.as_deref())?)),
                _ => break,
            }
        }
        let mut a = agency.clone();
        acks.spawn(async move {
            if max_batch == 1 {
                return a
                    .ack(batch.remove(0))
                    .await
                    .map(drop)
                    .map_err(anyhow::Error::from);
            }
            let results = a
                .ack_batch(wire::AckBatchRequest { acks: batch })
                .await?
                .into_inner()
                .results;
            for r in results {
                if let Some(wire::ack_result::Result::Error(e)) = r.result {
                    anyhow::bail!("AckBatch refused an ack: code {}: {}", e.code, e.message);
                }
            }
            Ok(())
        });
        while acks.len() > 256 {
            if let Some(r) = acks.join_next().await {
                r??;
            }
        }
    }
    while let Some(r) = acks.join_next().await {
        r??;
    }
    Ok(())
}

/// Watches the sending node's receipts; each first receipt of `status`
/// completes its message. Returns (message id, arrival) pairs.
async fn watch_receipts(
    sender: Client,
    status: wire::ReceiptStatus,
    progress: Arc<Progress>,
) -> anyhow::Result<Vec<(String, u64)>> {
    let mut stream = sender
        .agency()
        .watch_receipts(wire::WatchReceiptsRequest { after_cursor: 0 })
        .await?
        .into_inner();
    let mut seen = std::collections::HashSet::new();
    let mut arrivals = Vec::new();
    while !progress.finished() {
        let event = match tokio::time::timeout(Duration::from_millis(200), stream.next()).await {
            Err(_) => continue,
            Ok(None) => anyhow::bail!("the receipt stream ended"),
            Ok(Some(e)) => e?,
        };
        let signed = event.receipt.unwrap_or_default();
        let receipt = wire::Receipt::decode(&signed.receipt[..])?;
        if receipt.status == status as i32 && seen.insert(receipt.message_id.clone()) {
            arrivals.push((receipt.message_id, now_ns()));
            progress.done.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(arrivals)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if let Some(duration) = args.duration.filter(|_| args.warmup > 0) {
        anyhow::ensure!(
            args.warmup < duration,
            "--warmup {}: must be shorter than --duration {duration}, or no send's latency is recorded",
            args.warmup
        );
    }
    let n_senders = args.senders.unwrap_or(if args.rate.is_some() && args.batch > 1 {
        2
    } else {
        64
    });
    let ack_batch = args.ack_batch.unwrap_or(args.batch);
    let tmp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Before any node runs, so the figures are the machine's own.
    let machine = crate::machine::calibrate(&dir)?;
    let fed_path = dir.join("federation.json");
    let (mut nodes, held, fed) = start_nodes(
        &dir,
        args.via_hub,
        args.peer_down,
        args.batch_signatures,
        args.batch_envelopes,
    )
    .await
    .context("cannot start the bench nodes")?;
    fed.save(&fed_path)?;
    let fed = antar_pki::federation_file::FederationFile::load(&fed_path)?;
    let sender = Client::from_federation(&fed, "finance", ClientRole::App).await?;
    let limit = args
        .messages
        .unwrap_or(if args.duration.is_some() { u64::MAX } else { 20_000 });
    let receipt_status = match args.receipts.as_str() {
        "delivered" => Some(wire::ReceiptStatus::Delivered),
        "processed" => Some(wire::ReceiptStatus::Processed),
        _ => None,
    };

    let progress = Arc::new(Progress {
        target: AtomicU64::new(u64::MAX),
        ..Progress::default()
    });
    let hist = Arc::new(Mutex::new(latencies()?));
    // With receipts, a message's start is kept by id until its receipt is back.
    let starts: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    // From a send's start to the node's answer: what the agency system waits.
    let accepted = Arc::new(Mutex::new(latencies()?));
    let watcher =
        receipt_status.map(|status| tokio::spawn(watch_receipts(sender.clone(), status, progress.clone())));
    let spawn_receiver = |progress: Arc<Progress>| {
        let hist = receipt_status.is_none().then(|| hist.clone());
        let (fed, in_flight, batch) = (fed.clone(), args.in_flight, ack_batch as usize);
        tokio::spawn(async move {
            let receiver = Client::from_federation(&fed, "health", ClientRole::App).await?;
            receive_and_ack(receiver, in_flight, batch, progress, hist).await
        })
    };
    let mut receiver = held.is_none().then(|| spawn_receiver(progress.clone()));

    // Progress on stderr while it runs (hidden when stderr is not a terminal).
    let bar = indicatif::ProgressBar::new(if limit == u64::MAX { 0 } else { limit }).with_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} {pos}/{len} [{bar:40}] {per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(if held.is_some() { "queued" } else { "done" });
    let ticker = {
        let (bar, progress) = (bar.clone(), progress.clone());
        let queueing = held.is_some();
        tokio::spawn(async move {
            loop {
                let counter = if queueing && progress.target.load(Ordering::Relaxed) == u64::MAX {
                    &progress.sent
                } else {
                    &progress.done
                };
                bar.set_position(counter.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // Shared by every request: the load generator copies no payload.
    let payload = Bytes::from(vec![0x5au8; args.size]);
    let transaction = args.kind == "transaction";
    let request = move |i: u64, ts: u64, payload: Bytes| wire::SendRequest {
        kind: if transaction {
            Kind::Transaction
        } else {
            Kind::Notice
        } as i32,
        recipients: vec!["health".into()],
        service: "bench.load".into(),
        payload,
        headers: [("bench-ts".to_owned(), ts.to_string())].into(),
        idempotency_key: if transaction {
            format!("bench-{i}")
        } else {
            String::new()
        },
        ..Default::default()
    };
    // A send is acknowledged: count it, and keep its start if receipts complete it.
    let sent = {
        let (progress, starts, accepted) = (progress.clone(), starts.clone(), accepted.clone());
        let keep = receipt_status.is_some();
        move |resp: wire::SendResponse, start_ns: u64| {
            progress.sent.fetch_add(1, Ordering::Relaxed);
            if progress.measured(start_ns) {
                lock(&accepted).saturating_record(now_ns().saturating_sub(start_ns) / 1_000);
            }
            if keep {
                if let Some(id) = resp.message_ids.into_iter().next() {
                    lock(&starts).insert(id, start_ns);
                }
            }
        }
    };
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let start_ns = now_ns();
    let warmup_ns = args.warmup.saturating_mul(1_000_000_000);
    progress
        .record_from_ns
        .store(start_ns.saturating_add(warmup_ns), Ordering::Relaxed);
    let used_start = Used::now();
    let machine_start = CpuTimes::now();
    let sending_for = args.duration.map(Duration::from_secs);
    let mut senders = tokio::task::JoinSet::new();
    let batch = args.batch as usize;
    // Sends `(i, start)` with one `SendBatch` (one or more) and counts
    // each answered one from its own start.
    let send_batch = {
        let (payload, sent, progress) = (payload.clone(), sent.clone(), progress.clone());
        move |mut agency: AgencyClient<Channel>, sends: Vec<(u64, u64)>| {
            let requests = sends
                .iter()
                .map(|&(i, ts)| request(i, ts, payload.clone()))
                .collect();
            let sent = sent.clone();
            progress.batch_calls.fetch_add(1, Ordering::Relaxed);
            async move {
                let results = agency
                    .send_batch(wire::SendBatchRequest { requests })
                    .await?
                    .into_inner()
                    .results;
                anyhow::ensure!(
                    results.len() == sends.len(),
                    "SendBatch answered {} results for {} requests",
                    results.len(),
                    sends.len()
                );
                for (r, (_, ts)) in results.into_iter().zip(sends) {
                    match r.result {
                        Some(wire::send_result::Result::Sent(resp)) => sent(resp, ts),
                        Some(wire::send_result::Result::Error(e)) => {
                            anyhow::bail!("SendBatch refused a request: code {}: {}", e.code, e.message)
                        }
                        None => anyhow::bail!("SendBatch answered an empty result"),
                    }
                }
                anyhow::Ok(agency)
            }
        }
    };
    match args.rate {
        Some(rate) => {
            // Open loop: send i is due at start + i / rate whatever happened
            // before; its latency counts from then. Unary: each is sent at
            // its instant. Batched: the due sends queue, and each of the
            // senders takes what has queued whenever it is free.
            let (due_tx, due_rx) = mpsc::unbounded_channel::<(u64, u64)>();
            let agency = sender.agency();
            let (payload, sent) = (payload.clone(), sent.clone());
            senders.spawn(async move {
                let mut inflight = tokio::task::JoinSet::new();
                for i in 0..limit {
                    // In integers: send `rate` is due at exactly one second.
                    let due = Duration::from_nanos(
                        (u128::from(i) * 1_000_000_000 / u128::from(rate.max(1))) as u64,
                    );
                    if sending_for.is_some_and(|d| due >= d) {
                        break;
                    }
                    tokio::time::sleep_until((start + due).into()).await;
                    let ts = start_ns + due.as_nanos() as u64;
                    if batch > 1 {
                        due_tx.send((i, ts))?;
                        continue;
                    }
                    let (mut agency, sent) = (agency.clone(), sent.clone());
                    let req = request(i, ts, payload.clone());
                    inflight.spawn(async move { agency.send(req).await.map(|r| sent(r.into_inner(), ts)) });
                    while let Some(r) = inflight.try_join_next() {
                        r??;
                    }
                }
                while let Some(r) = inflight.join_next().await {
                    r??;
                }
                anyhow::Ok(())
            });
            if batch > 1 {
                let due_rx = Arc::new(tokio::sync::Mutex::new(due_rx));
                for _ in 0..n_senders {
                    let (mut agency, due_rx, send_batch) =
                        (sender.agency(), due_rx.clone(), send_batch.clone());
                    senders.spawn(async move {
                        loop {
                            let mut sends = Vec::with_capacity(batch);
                            {
                                let mut due_rx = due_rx.lock().await;
                                if due_rx.recv_many(&mut sends, batch).await == 0 {
                                    break; // every send was scheduled and taken
                                }
                            }
                            agency = send_batch(agency, sends).await?;
                        }
                        anyhow::Ok(())
                    });
                }
            }
        }
        None => {
            for _ in 0..n_senders {
                let (mut agency, next, payload, sent, send_batch) = (
                    sender.agency(),
                    next.clone(),
                    payload.clone(),
                    sent.clone(),
                    send_batch.clone(),
                );
                senders.spawn(async move {
                    loop {
                        let i = next.fetch_add(batch as u64, Ordering::Relaxed);
                        if i >= limit || sending_for.is_some_and(|d| start.elapsed() >= d) {
                            break;
                        }
                        let ts = now_ns();
                        agency = if batch == 1 {
                            let resp = agency.send(request(i, ts, payload.clone())).await?;
                            sent(resp.into_inner(), ts);
                            agency
                        } else {
                            let end = limit.min(i + batch as u64);
                            send_batch(agency, (i..end).map(|i| (i, ts)).collect()).await?
                        };
                    }
                    anyhow::Ok(())
                });
            }
        }
    }
    while let Some(r) = senders.join_next().await {
        r??;
    }
    let sent_secs = start.elapsed().as_secs_f64();
    let total = progress.sent.load(Ordering::Relaxed);
    progress.target.store(total, Ordering::Relaxed);
    bar.set_length(total);
    bar.println(format!(
        "sent {total} in {sent_secs:.2}s; waiting for them to complete"
    ));

    // With the peer down, everything is queued now: measure, then let it drain.
    let queued_rss = rss_mib();
    let drain_start = Instant::now();
    if let Some(held) = held {
        nodes.push(held.start().await.context("cannot start the recipient's node")?);
        receiver = Some(spawn_receiver(progress.clone()));
        bar.set_message("drained");
    }
    // A long drain is fine; no progress for two minutes is not.
    let mut last = (progress.done.load(Ordering::Relaxed), Instant::now());
    while !progress.finished() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let done = progress.done.load(Ordering::Relaxed);
        if done > last.0 {
            last = (done, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(120) {
            anyhow::bail!("stalled: {done} of {total} complete, none for 120 s");
        }
        if receiver.as_ref().is_some_and(|r| r.is_finished()) && !progress.finished() {
            break; // it failed: its error is reported below
        }
    }
    let all_secs = start.elapsed().as_secs_f64();
    let (cpu_us_per_msg, system_pct, disk_kb_per_msg) = Used::per_message(used_start, total);
    let drain_secs = drain_start.elapsed().as_secs_f64();
    let (iowait_pct, steal_pct) = match (machine_start, CpuTimes::now()) {
        (Some(a), Some(b)) => b.since(a),
        _ => (0.0, 0.0),
    };
    if let Some(r) = receiver {
        r.await??;
    }
    if let Some(w) = watcher {
        let arrivals = w.await??;
        let starts = lock(&starts);
        let mut hist = lock(&hist);
        for (id, at) in arrivals {
            if let Some(s) = starts.get(&id).filter(|&&s| progress.measured(s)) {
                hist.saturating_record(at.saturating_sub(*s) / 1_000);
            }
        }
    }
    // Journal syncs of every node, and how many stalled: each send and
    // delivery waits for one, so a stalling disk explains a tail.
    let syncs = |over: Option<f64>| -> u64 {
        nodes
            .iter()
            .map(|n| over.map_or(n.journal_syncs().count(), |s| n.journal_syncs().over(s)))
            .sum()
    };
    let (journal_syncs, syncs_over_25ms, syncs_over_100ms) =
        (syncs(None), syncs(Some(0.025)), syncs(Some(0.1)));
    // What the run cost in signatures, all nodes: with the machine's
    // sign_per_s, the share of the CPU that went to signing.
    let signatures: u64 = nodes.iter().map(|n| n.signatures()).sum();
    let signs_per_msg = signatures as f64 / total.max(1) as f64;
    ticker.abort();
    bar.finish_and_clear();

    let hist = lock(&hist).clone();
    if args.warmup > 0 {
        anyhow::ensure!(
            !hist.is_empty(),
            "--warmup {}: every send started in the warm-up, so no latency was recorded; send for longer (--messages, --duration) or shorten --warmup",
            args.warmup
        );
    }
    let pct = |q: f64| hist.value_at_quantile(q) as f64 / 1e3;
    let accepted = lock(&accepted).clone();
    let send_pct = |q: f64| accepted.value_at_quantile(q) as f64 / 1e3;
    let hops = if args.via_hub { 2 } else { 1 };
    let (rss_now, rss_peak) = queued_rss.unwrap_or((0.0, 0.0));
    // The high-water mark at the end covers the drain as well (with
    // --peer-down), or the whole run.
    let rss_drain_peak = rss_mib().map_or(0.0, |(_, peak)| peak);
    let mut mode = match (args.peer_down, args.rate) {
        (true, _) => "queue".to_owned(),
        (false, Some(r)) if args.batch > 1 => {
            format!("open rate={r} senders={n_senders} batch={}", args.batch)
        }
        (false, Some(r)) => format!("open rate={r}"),
        (false, None) if args.batch > 1 => format!("closed senders={n_senders} batch={}", args.batch),
        (false, None) => format!("closed senders={n_senders}"),
    };
    if ack_batch != args.batch {
        mode.push_str(&format!(" ack_batch={ack_batch}"));
    }
    let machine_fields = format!(
        "sign_per_s={:.0} verify_per_s={:.0} fsync_p50_ms={:.2} iowait_pct={iowait_pct:.1} steal_pct={steal_pct:.1}",
        machine.sign_per_s, machine.verify_per_s, machine.fsync_p50_ms
    );
    if args.peer_down {
        println!(
            "RESULT mode={mode} hops={hops} kind={} messages={total} size={} receipts={} batch_signatures={} batch_envelopes={} sent_per_s={:.0} rss_queued_mb={rss_now:.0} rss_peak_mb={rss_peak:.0} drain_per_s={:.0} drain_s={drain_secs:.1} rss_drain_peak_mb={rss_drain_peak:.0} signs_per_msg={signs_per_msg:.2} {machine_fields}",
            args.kind,
            args.size,
            args.receipts,
            args.batch_signatures,
            args.batch_envelopes,
            total as f64 / sent_secs,
            total as f64 / drain_secs,
        );
    } else {
        println!(
            "RESULT mode={mode} hops={hops} kind={} messages={total} size={} receipts={} batch_signatures={} batch_envelopes={} sent_per_s={:.0} delivered_per_s={:.0} p50_ms={:.2} p99_ms={:.2} send_p50_ms={:.2} send_p99_ms={:.2} cpu_us_per_msg={cpu_us_per_msg:.0} journal_syncs={journal_syncs} syncs_over_25ms={syncs_over_25ms} signs_per_msg={signs_per_msg:.2} warmup_s={} {machine_fields} system_pct={system_pct:.1} disk_kb_per_msg={disk_kb_per_msg:.1} rss_peak_mb={rss_drain_peak:.0}",
            args.kind,
            args.size,
            args.receipts,
            args.batch_signatures,
            args.batch_envelopes,
            total as f64 / sent_secs,
            total as f64 / all_secs,
            pct(0.50),
            pct(0.99),
            send_pct(0.50),
            send_pct(0.99),
            args.warmup
        );
    }
    if let Some(path) = &args.json {
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        let report = serde_json::json!({
            "mode": if args.peer_down { "queue" } else if args.rate.is_some() { "open" } else { "closed" },
            "offered_per_s": args.rate, "senders": n_senders, "batch": args.batch, "ack_batch": ack_batch, "hops": hops, "kind": args.kind,
            "receipts": args.receipts, "batch_signatures": args.batch_signatures,
            "batch_envelopes": args.batch_envelopes,
            "messages": total, "size": args.size, "warmup_s": args.warmup,
            "calls": if args.batch > 1 { progress.batch_calls.load(Ordering::Relaxed) } else { total },
            "sent_per_s": total as f64 / sent_secs, "completed_per_s": total as f64 / all_secs,
            "cpu_us_per_msg": cpu_us_per_msg, "system_pct": system_pct,
            "disk_kb_per_msg": disk_kb_per_msg, "rss_peak_mb": rss_drain_peak,
            "journal_syncs": { "count": journal_syncs, "over_25ms": syncs_over_25ms, "over_100ms": syncs_over_100ms },
            "signatures": { "count": signatures, "per_message": signs_per_msg },
            "latency_ms": { "p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "p999": pct(0.999),
                            "max": hist.max() as f64 / 1e3, "mean": hist.mean() / 1e3,
                            "samples": hist.len() },
            "send_latency_ms": { "p50": send_pct(0.50), "p90": send_pct(0.90), "p99": send_pct(0.99),
                                 "p999": send_pct(0.999), "max": accepted.max() as f64 / 1e3,
                                 "mean": accepted.mean() / 1e3, "samples": accepted.len() },
            "queue": args.peer_down.then(|| serde_json::json!({
                "rss_queued_mb": rss_now, "rss_peak_mb": rss_peak, "rss_drain_peak_mb": rss_drain_peak,
                "drain_s": drain_secs, "drain_per_s": total as f64 / drain_secs })),
            "cpus": cpus,
            "machine": {
                "cpu": machine.cpu, "cpus": cpus,
                "ed25519_sign_per_s": machine.sign_per_s, "ed25519_verify_per_s": machine.verify_per_s,
                "fsync_ms": { "p50": machine.fsync_p50_ms, "p99": machine.fsync_p99_ms, "samples": machine.fsync_samples },
                "during_run": { "iowait_pct": iowait_pct, "steal_pct": steal_pct },
            },
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    for n in nodes {
        n.stop().await?;
    }
    Ok(ExitCode::SUCCESS)
}
