//! `antar bench`: the whole path measured on this machine — two real nodes
//! (finance -> health, peered directly) with mTLS, sled on disk, signatures
//! and receipts; concurrent senders, and an acking receiver at health.
//! Prints one `RESULT` line.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use prost::Message as _;
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;

use antar_client::wire::{self, Kind};
use antar_client::{Client, ClientRole};
use antar_node::dev::{Addrs, AgencySpec, DevLayout};
use antar_node::{Listeners, Node};

/// `antar bench` arguments.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  antar bench --messages 20000 --size 1024 --senders 32          # closed loop: maximum throughput\n  antar bench --rate 2000 --messages 20000                          # open loop: latency at a fixed offered rate\n  antar bench --via-hub --kind transaction --json report.json\n\nPrints: RESULT mode=… sent_per_s=… delivered_per_s=… p50_ms=… p99_ms=…\nLatency is from the send's (scheduled, in open loop) start to the delivery at the receiving app."
)]
pub struct BenchArgs {
    /// Envelopes to send in total.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Concurrent senders (each waits for its Send to be durable before the next).
    #[arg(long, default_value_t = 64)]
    senders: u64,
    /// Deliveries the receiver may hold unacked.
    #[arg(long, default_value_t = 512)]
    in_flight: u32,
    /// Directory for the nodes' certificates and stores (default: a temporary directory).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Open loop: offer this many sends per second on a fixed schedule (no
    /// coordinated omission); without it, closed loop with --senders.
    #[arg(long)]
    rate: Option<u64>,
    /// Route finance -> hub -> health (two hops) instead of finance -> health.
    #[arg(long)]
    via_hub: bool,
    /// notice, or transaction (each with its own idempotency key).
    #[arg(long, default_value = "notice", value_parser = ["notice", "transaction"])]
    kind: String,
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

async fn start_nodes(
    dir: &std::path::Path,
    via_hub: bool,
) -> anyhow::Result<(Vec<Node>, antar_pki::federation_file::FederationFile)> {
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
    for (spec, [api, peer, admin]) in topology.iter().zip(bound) {
        let mut config = layout.node_config(spec, &addrs);
        config.listen.metrics = None;
        config.limits.max_in_flight = 1024;
        nodes.push(
            Node::start(
                config,
                None,
                Listeners {
                    api,
                    peer,
                    admin: Some(admin),
                    metrics: None,
                },
            )
            .await?,
        );
    }
    Ok((nodes, layout.federation_file(&topology, &addrs)?))
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let tmp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let mut fed_file_dir = dir.clone();
    fed_file_dir.push("federation.json");
    let (nodes, fed) = start_nodes(&dir, args.via_hub)
        .await
        .context("cannot start the two bench nodes")?;
    fed.save(&fed_file_dir)?;
    let fed = antar_pki::federation_file::FederationFile::load(&fed_file_dir)?;
    let sender = Client::from_federation(&fed, "finance", ClientRole::App).await?;
    let receiver = Client::from_federation(&fed, "health", ClientRole::App).await?;

    let total = args.messages;
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(total as usize)));
    let delivered = Arc::new(AtomicU64::new(0));
    let recv_task = {
        let (latencies, delivered) = (latencies.clone(), delivered.clone());
        let mut agency = receiver.agency();
        let in_flight = args.in_flight;
        tokio::spawn(async move {
            let mut stream = agency
                .receive(wire::ReceiveRequest {
                    services: vec![],
                    max_in_flight: in_flight,
                })
                .await?
                .into_inner();
            let mut acks = tokio::task::JoinSet::new();
            while delivered.load(Ordering::Relaxed) < total {
                let Some(d) = stream.next().await else { break };
                let d = d?;
                let env = wire::Envelope::decode(d.envelope.unwrap_or_default().envelope.as_slice())?;
                if let Some(ts) = env.headers.get("bench-ts").and_then(|t| t.parse::<u64>().ok()) {
                    latencies
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(now_ns().saturating_sub(ts));
                }
                delivered.fetch_add(1, Ordering::Relaxed);
                let mut a = agency.clone();
                acks.spawn(async move {
                    let outcome = if env.kind == Kind::Transaction as i32 {
                        wire::Outcome::Committed as i32
                    } else {
                        0
                    };
                    a.ack(wire::AckRequest {
                        message_id: env.id,
                        outcome,
                        result: Vec::new(),
                    })
                    .await
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
            anyhow::Ok(())
        })
    };

    // Progress on stderr while it runs (hidden when stderr is not a terminal).
    let progress = indicatif::ProgressBar::new(total).with_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} delivered {pos}/{len} [{bar:40}] {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let ticker = {
        let (progress, delivered) = (progress.clone(), delivered.clone());
        tokio::spawn(async move {
            loop {
                progress.set_position(delivered.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let payload = vec![0x5au8; args.size];
    let transaction = args.kind == "transaction";
    let request = move |i: u64, ts: u64, payload: Vec<u8>| wire::SendRequest {
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
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    match args.rate {
        Some(rate) => {
            // Open loop: send i is due at start + i / rate whatever happened
            // before; its latency counts from then.
            let start_ns = now_ns();
            let agency = sender.agency();
            let interval = 1e9 / rate.max(1) as f64;
            senders.spawn(async move {
                let mut inflight = tokio::task::JoinSet::new();
                for i in 0..total {
                    let due = Duration::from_nanos((i as f64 * interval) as u64);
                    tokio::time::sleep_until((start + due).into()).await;
                    let mut agency = agency.clone();
                    let req = request(i, start_ns + due.as_nanos() as u64, payload.clone());
                    inflight.spawn(async move { agency.send(req).await.map(drop) });
                    while let Some(r) = inflight.try_join_next() {
                        r??;
                    }
                }
                while let Some(r) = inflight.join_next().await {
                    r??;
                }
                anyhow::Ok(())
            });
        }
        None => {
            for _ in 0..args.senders.max(1) {
                let (mut agency, next, payload) = (sender.agency(), next.clone(), payload.clone());
                senders.spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= total {
                            break;
                        }
                        agency.send(request(i, now_ns(), payload.clone())).await?;
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
    progress.println(format!("sent {total} in {sent_secs:.2}s; waiting for deliveries"));
    tokio::time::timeout(Duration::from_secs(300), recv_task)
        .await
        .context("deliveries did not finish within 300 s")???;
    let all_secs = start.elapsed().as_secs_f64();
    ticker.abort();
    progress.finish_and_clear();
    let mut lat = std::mem::take(&mut *latencies.lock().unwrap_or_else(|p| p.into_inner()));
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0) as f64
            / 1e6
    };
    let mode = match args.rate {
        Some(r) => format!("open rate={r}"),
        None => format!("closed senders={}", args.senders),
    };
    let hops = if args.via_hub { 2 } else { 1 };
    println!(
        "RESULT mode={mode} hops={hops} kind={} messages={total} size={} sent_per_s={:.0} delivered_per_s={:.0} p50_ms={:.2} p99_ms={:.2}",
        args.kind,
        args.size,
        total as f64 / sent_secs,
        total as f64 / all_secs,
        pct(0.50),
        pct(0.99)
    );
    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "mode": if args.rate.is_some() { "open" } else { "closed" },
            "offered_per_s": args.rate, "senders": args.senders, "hops": hops, "kind": args.kind,
            "messages": total, "size": args.size,
            "sent_per_s": total as f64 / sent_secs, "delivered_per_s": total as f64 / all_secs,
            "latency_ms": { "p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "p999": pct(0.999),
                            "max": pct(1.0) },
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    for n in nodes {
        n.stop().await?;
    }
    Ok(ExitCode::SUCCESS)
}
