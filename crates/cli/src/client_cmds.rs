//! Client commands: send, inbox, track, admin.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use prost::Message as _;
use serde_json::json;
use tokio_stream::StreamExt as _;

use antar_client::wire::{self, Kind, MessageState, Outcome, ReceiptStatus};
use antar_client::ClientRole;

use crate::conn::ConnArgs;

/// `antar send`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  antar send --federation .antar-dev/federation.json --agency finance \\\n      --to registry --service birth.lookup --data '{\"nik\":\"3171\"}'\n  antar send ... --kind transaction --idempotency-key pay-2026-0001 --to health --service claims.pay --file claim.json\n  antar send ... --kind notice --to health --to registry --service address.changed --data moved"
)]
pub struct SendArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Recipient agency (repeat for a NOTICE to several agencies).
    #[arg(long = "to", required = true)]
    to: Vec<String>,
    /// The recipient's service, e.g. birth.lookup.
    #[arg(long)]
    service: String,
    /// notice, request or transaction.
    #[arg(long, default_value = "notice")]
    kind: KindArg,
    /// Idempotency key: required for --kind transaction; with a notice or
    /// request, a send repeated with the same key is accepted once (the
    /// node answers the original ids).
    #[arg(long)]
    idempotency_key: Option<String>,
    #[command(flatten)]
    payload: PayloadArgs,
    /// Time to live in seconds (default: the node's).
    #[arg(long)]
    ttl: Option<u64>,
    /// A header NAME=VALUE (repeatable).
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
}

/// The payload of `send`, `call` and `reply`.
#[derive(Debug, clap::Args)]
pub(crate) struct PayloadArgs {
    /// Payload as text.
    #[arg(long, conflicts_with = "file")]
    data: Option<String>,
    /// Payload from a file ("-" for standard input).
    #[arg(long)]
    file: Option<PathBuf>,
    /// MIME type of the payload.
    #[arg(long, default_value = "application/octet-stream")]
    content_type: String,
}

impl PayloadArgs {
    /// The payload bytes (empty when neither --data nor --file is given).
    pub(crate) fn read(&self) -> anyhow::Result<Vec<u8>> {
        Ok(match (&self.data, &self.file) {
            (Some(d), _) => d.clone().into_bytes(),
            (None, Some(p)) if p.as_os_str() == "-" => {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
                buf
            }
            (None, Some(p)) => std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
            (None, None) => Vec::new(),
        })
    }

    pub(crate) fn content_type(&self) -> String {
        self.content_type.clone()
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum KindArg {
    Notice,
    Request,
    Transaction,
}

pub(crate) fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))
}

pub async fn send(args: SendArgs) -> anyhow::Result<ExitCode> {
    let payload = args.payload.read()?;
    let client = args.conn.connect(ClientRole::App).await?;
    let kind = match args.kind {
        KindArg::Notice => Kind::Notice,
        KindArg::Request => Kind::Request,
        KindArg::Transaction => Kind::Transaction,
    };
    let resp = client
        .agency()
        .send(wire::SendRequest {
            kind: kind as i32,
            recipients: args.to.clone(),
            service: args.service.clone(),
            payload: payload.into(),
            content_type: args.payload.content_type(),
            headers: args.headers.into_iter().collect(),
            idempotency_key: args.idempotency_key.unwrap_or_default(),
            ttl: args.ttl.map(|s| prost_types::Duration {
                seconds: s as i64,
                nanos: 0,
            }),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    if args.conn.json {
        println!("{}", json!({ "message_ids": resp.message_ids }));
    } else {
        for (to, id) in args.to.iter().zip(&resp.message_ids) {
            println!("accepted {id} -> {to}/{}", args.service);
        }
        if let Some(id) = resp.message_ids.first() {
            println!("track it: antar track {id} (with the same connection flags)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `antar inbox`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  antar inbox --federation .antar-dev/federation.json --agency registry --ack\n  antar inbox ... --service birth.lookup --count 10 --wait 30 --ack --outcome committed"
)]
pub struct InboxArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Only this service (repeatable; default: every service the app owns).
    #[arg(long)]
    service: Vec<String>,
    /// Acknowledge each delivery after printing it (it is then never delivered again).
    #[arg(long)]
    ack: bool,
    /// Outcome to ack TRANSACTIONs with.
    #[arg(long, default_value = "committed")]
    outcome: OutcomeArg,
    /// Stop after this many deliveries.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this many seconds without a delivery (0: wait forever).
    #[arg(long, default_value_t = 2)]
    wait: u64,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum OutcomeArg {
    Committed,
    Rejected,
}

pub async fn inbox(args: InboxArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.connect(ClientRole::App).await?;
    let mut agency = client.agency();
    let mut stream = agency
        .receive(wire::ReceiveRequest {
            services: args.service.clone(),
            max_in_flight: 16,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let mut n = 0u64;
    loop {
        if args.count.is_some_and(|c| n >= c) {
            break;
        }
        let next = if args.wait == 0 {
            stream.next().await
        } else {
            match tokio::time::timeout(Duration::from_secs(args.wait), stream.next()).await {
                Ok(x) => x,
                Err(_) => break,
            }
        };
        let Some(delivery) = next else { break };
        let delivery = delivery.map_err(status_err)?;
        let env = print_delivery(&delivery, args.conn.json);
        if args.ack {
            let outcome = if env.kind == Kind::Transaction as i32 {
                match args.outcome {
                    OutcomeArg::Committed => Outcome::Committed,
                    OutcomeArg::Rejected => Outcome::Rejected,
                }
            } else {
                Outcome::Unspecified
            };
            agency
                .ack(wire::AckRequest {
                    message_id: env.id.clone(),
                    outcome: outcome as i32,
                    result: Default::default(),
                })
                .await
                .map_err(status_err)?;
        }
        n += 1;
    }
    if !args.conn.json {
        eprintln!(
            "{n} deliveries{}",
            if args.ack {
                ", acked"
            } else {
                " (not acked: they will be delivered again)"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints one delivery (a line, or a JSON object with --json); returns its header.
pub(crate) fn print_delivery(delivery: &wire::Delivery, json: bool) -> wire::Envelope {
    let signed = delivery.envelope.clone().unwrap_or_default();
    let env = wire::Envelope::decode(&signed.envelope[..]).unwrap_or_default();
    let data = delivery.payload.clone().unwrap_or_default().data;
    if json {
        println!(
            "{}",
            json!({
                "id": env.id, "kind": kind_name(env.kind), "sender": env.sender,
                "sender_identity": delivery.sender_identity, "service": env.service,
                "correlation_id": env.correlation_id, "attempt": delivery.attempt,
                "content_type": env.content_type,
                // Text when it is UTF-8 (else null); always exactly, in base64.
                "payload": std::str::from_utf8(&data).ok(),
                "payload_base64": base64::engine::general_purpose::STANDARD.encode(&data),
            })
        );
    } else {
        let correlation = optional(" re ", &env.correlation_id, "");
        println!(
            "{} {} from {} ({}) to {}{} attempt {}: {}",
            env.id,
            kind_name(env.kind),
            env.sender,
            delivery.sender_identity,
            env.service,
            correlation,
            delivery.attempt,
            String::from_utf8_lossy(&data)
        );
    }
    env
}

/// `antar track`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  antar track 0190f3c2-5b1a-7c3e-9d2f-4a5b6c7d8e9f --federation .antar-dev/federation.json --agency finance"
)]
pub struct TrackArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The message id that `antar send` printed.
    id: String,
}

pub async fn track(args: TrackArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.connect(ClientRole::App).await?;
    let resp = client
        .agency()
        .track(wire::TrackRequest {
            message_id: args.id.clone(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let receipts: Vec<_> = resp
        .receipts
        .iter()
        .map(|r| wire::Receipt::decode(&r.receipt[..]).unwrap_or_default())
        .collect();
    let state = MessageState::try_from(resp.state).unwrap_or(MessageState::Unspecified);
    if args.conn.json {
        let list: Vec<_> = receipts
            .iter()
            .map(|r| {
                json!({ "status": status_name(r.status), "issuer": r.issuer, "reason": r.reason,
                             "at": r.at.map(|t| t.seconds), "outcome": outcome_name(r.outcome) })
            })
            .collect();
        println!(
            "{}",
            json!({ "id": args.id, "state": state.as_str_name(), "reason": resp.reason, "receipts": list })
        );
    } else {
        println!(
            "{} {}{}",
            args.id,
            state.as_str_name(),
            optional(" (", &resp.reason, ")")
        );
        for r in &receipts {
            println!(
                "  {} by {}{}{}",
                status_name(r.status),
                r.issuer,
                optional(" (", outcome_shown(r.outcome), ")"),
                optional(": ", &r.reason, "")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `antar admin`.
#[derive(Debug, clap::Subcommand)]
pub enum AdminCommand {
    /// Version, identity, uptime, peers, queues, store size.
    #[command(
        after_help = "Example:\n  antar admin status --federation .antar-dev/federation.json --agency hub"
    )]
    Status(ConnOnly),
    /// Peers with connection state, backlog and how much of it each may hold
    /// already; queues left for agencies that are no longer peers.
    #[command(
        after_help = "Example:\n  antar admin peers --federation .antar-dev/federation.json --agency finance"
    )]
    Peers(ConnOnly),
    /// Refuse new sends (UNAVAILABLE) for maintenance; --off resumes.
    #[command(
        after_help = "Example:\n  antar admin drain --federation f.json --agency finance\n  antar admin drain --off ..."
    )]
    Drain {
        #[command(flatten)]
        conn: ConnArgs,
        /// Resume accepting sends.
        #[arg(long)]
        off: bool,
    },
    /// Reload the config file and both revocation lists, the federation's
    /// and the agency-local one (same as SIGHUP); prints how many serials
    /// each revokes.
    #[command(after_help = "Example:\n  antar admin reload --federation f.json --agency finance")]
    Reload(ConnOnly),
    /// Release the queue of a peer removed for good: what it may hold moves on.
    ///
    /// After a reload removes a peer, what was queued for it moves to its
    /// new route, except what the peer may hold already (sent, its custody
    /// ack never back): that waits for the peer to come back, never expires,
    /// and shows in `antar admin peers`. If the agency will not come back,
    /// this releases it: it moves like the rest, or, with no route, waits
    /// for one and expires at its TTL. If the agency did hold one after
    /// all, the recipient still delivers it once if it comes another way,
    /// but the message may end both EXPIRED here and DELIVERED there. Prints
    /// how many items were released, moved, and left for want of a route.
    #[command(
        name = "release-queue",
        after_help = "Example (registry left finance's [[peers]] for good):\n  antar admin release-queue registry --federation f.json --agency finance"
    )]
    ReleaseQueue {
        /// The former peer: an agency id no longer in the node's [[peers]]
        /// (`--agency` names the node's own agency, as for every command).
        #[arg(value_name = "PEER")]
        former_peer: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Clear a split view this node flagged, once it is settled: the log's next checkpoint is taken as it is.
    ///
    /// This node, as a peer's witness, flagged that peer's log (`antar
    /// admin status`: SPLIT VIEW of …) for presenting a checkpoint that
    /// does not extend one it cosigned before, and since refuses to cosign
    /// any that does not. Once the operators concerned have settled why
    /// (a node restored from a backup forks from what it showed; a rewrite
    /// is a matter for the federation), this forgets the flag and the
    /// checkpoint witnessed last: the peer's next checkpoint is taken as it
    /// is, as its first one was, and witnessed from there. Prints what was
    /// found and the checkpoint forgotten (size, root and the peer's signed
    /// note: keep it); the node logs it (WARN, with the admin's name) and
    /// keeps a record in its store. Checkpoints cosigned before keep their
    /// cosignatures. Each witness clears its own flag.
    #[command(
        name = "clear-split-view",
        after_help = "Example (health flagged finance's log):\n  antar admin clear-split-view finance --federation f.json --agency health"
    )]
    ClearSplitView {
        /// The agency whose log was caught, as `antar admin status` lists it
        /// (`--agency` names the node's own agency, as for every command).
        #[arg(value_name = "LOG")]
        log: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Envelopes that expired or were refused: list, retry or purge them.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLetterCommand),
}

/// `antar admin dead-letters`.
#[derive(Debug, clap::Subcommand)]
pub enum DeadLetterCommand {
    /// List dead letters with their reason and time.
    #[command(
        after_help = "Example:\n  antar admin dead-letters list --federation .antar-dev/federation.json --agency finance"
    )]
    List {
        #[command(flatten)]
        conn: ConnArgs,
        /// At most this many (0: every one, fetched a page at a time).
        #[arg(long, default_value_t = 0)]
        limit: u32,
        /// Start after this message id (dead letters are listed in id order).
        #[arg(long)]
        after: Option<String>,
    },
    /// Queue dead letters for delivery again (no longer subject to their TTL at this node).
    #[command(
        after_help = "Examples:\n  antar admin dead-letters retry 0190f3c2-5b1a-7c3e-9d2f-4a5b6c7d8e9f --federation f.json --agency finance\n  antar admin dead-letters retry --all --federation f.json --agency finance"
    )]
    Retry(DeadLetterIds),
    /// Delete dead letters for good (their receipts stay).
    #[command(
        after_help = "Examples:\n  antar admin dead-letters purge 0190f3c2-5b1a-7c3e-9d2f-4a5b6c7d8e9f --federation f.json --agency finance\n  antar admin dead-letters purge --all ..."
    )]
    Purge(DeadLetterIds),
}

/// Which dead letters.
#[derive(Debug, clap::Args)]
pub struct DeadLetterIds {
    #[command(flatten)]
    conn: ConnArgs,
    /// Message ids.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    ids: Vec<String>,
    /// Every dead letter.
    #[arg(long)]
    all: bool,
}

/// Only connection flags.
#[derive(Debug, clap::Args)]
pub struct ConnOnly {
    #[command(flatten)]
    conn: ConnArgs,
}

pub async fn admin(cmd: AdminCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AdminCommand::Status(c) => {
            let s = c
                .conn
                .connect(ClientRole::Admin)
                .await?
                .admin()
                .status(wire::StatusRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            if c.conn.json {
                println!(
                    "{}",
                    json!({
                        "version": s.version, "identity": s.identity, "agency": s.agency, "uptime_seconds": s.uptime_seconds,
                        "store_bytes": s.store_bytes, "dead_letters": s.dead_letters, "draining": s.draining, "split_views": s.split_views,
                        "peers": s.peers.iter().map(peer_json).collect::<Vec<_>>(),
                        "inboxes": s.inboxes.iter().map(|q| json!({"service": q.name, "depth": q.depth})).collect::<Vec<_>>(),
                    })
                );
            } else {
                println!(
                    "{} ({}) antar {} up {}s, store {} bytes, {} dead letters{}",
                    s.agency,
                    s.identity,
                    s.version,
                    s.uptime_seconds,
                    s.store_bytes,
                    s.dead_letters,
                    if s.draining { ", DRAINING" } else { "" }
                );
                if !s.split_views.is_empty() {
                    println!(
                        "  SPLIT VIEW of: {} (their log contradicts a checkpoint this node witnessed; see docs/auditing.md)",
                        s.split_views.join(", ")
                    );
                }
                for p in &s.peers {
                    print_peer(p);
                }
                for q in &s.inboxes {
                    println!("  inbox {}: {}", q.name, q.depth);
                }
            }
        }
        AdminCommand::Peers(c) => {
            let r = c
                .conn
                .connect(ClientRole::Admin)
                .await?
                .admin()
                .list_peers(wire::ListPeersRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            if c.conn.json {
                println!("{}", json!(r.peers.iter().map(peer_json).collect::<Vec<_>>()));
            } else {
                r.peers.iter().for_each(print_peer);
            }
        }
        AdminCommand::Drain { conn, off } => {
            let r = conn
                .connect(ClientRole::Admin)
                .await?
                .admin()
                .drain(wire::DrainRequest { drain: !off })
                .await
                .map_err(status_err)?
                .into_inner();
            if conn.json {
                println!("{}", json!({ "draining": r.draining }));
            } else if r.draining {
                println!("draining: new sends are refused");
            } else {
                println!("accepting sends");
            }
        }
        AdminCommand::Reload(c) => {
            let r = c
                .conn
                .connect(ClientRole::Admin)
                .await?
                .admin()
                .reload(wire::ReloadRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            if c.conn.json {
                println!(
                    "{}",
                    json!({ "revoked_serials": r.revoked_serials, "local_revoked_serials": r.local_revoked_serials })
                );
            } else {
                println!(
                    "reloaded; {} serials revoked; {} by the agency-local list (tls.local_revocation_list)",
                    r.revoked_serials, r.local_revoked_serials
                );
            }
        }
        AdminCommand::ReleaseQueue {
            former_peer: peer,
            conn,
        } => {
            let r = conn
                .connect(ClientRole::Admin)
                .await?
                .admin()
                .release_queue(wire::ReleaseQueueRequest { agency: peer.clone() })
                .await
                .map_err(status_err)?
                .into_inner();
            if conn.json {
                println!(
                    "{}",
                    json!({ "agency": peer, "released": r.released, "moved": r.moved, "unroutable": r.unroutable })
                );
            } else {
                println!(
                    "{peer}: {} no longer counted as held by it; {} moved to their next hop by this call (the \
                     rerouter may move others); {} wait for a route (or expire at their TTL)",
                    items(r.released),
                    r.moved,
                    r.unroutable
                );
            }
        }
        AdminCommand::ClearSplitView { log, conn } => {
            let r = conn
                .connect(ClientRole::Admin)
                .await?
                .admin()
                .clear_split_view(wire::ClearSplitViewRequest { agency: log.clone() })
                .await
                .map_err(status_err)?
                .into_inner();
            let root = hex::encode(&r.forgotten_root);
            if conn.json {
                println!(
                    "{}",
                    json!({ "agency": log, "found": r.found, "forgotten_size": r.forgotten_size,
                            "forgotten_root": root, "forgotten_note": r.forgotten_note })
                );
            } else {
                let forgotten = if r.forgotten_note.is_empty() {
                    "no checkpoint of it was kept".to_owned()
                } else {
                    format!(
                        "the checkpoint of size {} root {root} witnessed last, whose signed note was:\n{}",
                        r.forgotten_size,
                        r.forgotten_note.trim_end()
                    )
                };
                println!(
                    "{log}: split view cleared; it was: {}. Its next checkpoint is taken as it is. Forgotten: {forgotten}",
                    r.found
                );
            }
        }
        AdminCommand::DeadLetters(cmd) => dead_letters(cmd).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn dead_letters(cmd: DeadLetterCommand) -> anyhow::Result<()> {
    match cmd {
        DeadLetterCommand::List { conn, limit, after } => {
            let mut admin = conn.connect(ClientRole::Admin).await?.admin();
            let mut after = after.unwrap_or_default();
            let mut listed: u64 = 0;
            // A page at a time (the node's page size), up to --limit.
            loop {
                let left = match limit {
                    0 => 0,
                    n => n.saturating_sub(u32::try_from(listed).unwrap_or(u32::MAX)),
                };
                if limit != 0 && left == 0 {
                    break;
                }
                let page = admin
                    .list_dead_letters(wire::ListDeadLettersRequest {
                        limit: left,
                        after: after.clone(),
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner()
                    .dead_letters;
                if page.is_empty() {
                    break;
                }
                for d in &page {
                    let env = wire::Envelope::decode(d.envelope.clone().unwrap_or_default().envelope)
                        .unwrap_or_default();
                    let at = d.at.map(|t| t.seconds).unwrap_or_default();
                    if conn.json {
                        println!(
                            "{}",
                            json!({ "id": env.id, "recipient": env.recipient, "service": env.service,
                                    "reason": d.reason, "at": at })
                        );
                    } else {
                        println!(
                            "{} -> {}/{}: {} (at {at})",
                            env.id, env.recipient, env.service, d.reason
                        );
                    }
                    after = env.id;
                    listed += 1;
                }
                if after.is_empty() {
                    // No id to go on from (an envelope that does not decode).
                    anyhow::bail!(
                        "a dead letter without a readable envelope id ends the listing after {listed}"
                    );
                }
            }
            if !conn.json {
                eprintln!("{listed} dead letters");
            }
        }
        DeadLetterCommand::Retry(ids) => {
            let mut admin = ids.conn.connect(ClientRole::Admin).await?.admin();
            let done = admin
                .retry_dead_letters(wire::RetryDeadLettersRequest {
                    message_ids: ids.ids.clone(),
                })
                .await
                .map_err(status_err)?
                .into_inner()
                .retried;
            report(&ids, "retried", &done);
        }
        DeadLetterCommand::Purge(ids) => {
            let mut admin = ids.conn.connect(ClientRole::Admin).await?.admin();
            let done = admin
                .purge_dead_letters(wire::PurgeDeadLettersRequest {
                    message_ids: ids.ids.clone(),
                })
                .await
                .map_err(status_err)?
                .into_inner()
                .purged;
            report(&ids, "purged", &done);
        }
    }
    Ok(())
}

fn report(ids: &DeadLetterIds, verb: &str, done: &[String]) {
    if ids.conn.json {
        println!("{}", json!({ verb: done }));
        return;
    }
    for id in done {
        println!("{verb} {id}");
    }
    let missing: Vec<_> = ids.ids.iter().filter(|id| !done.contains(id)).collect();
    for id in missing {
        eprintln!("not a dead letter: {id}");
    }
}

fn peer_json(p: &wire::PeerStatus) -> serde_json::Value {
    json!({ "agency": p.agency, "addr": p.addr, "connected": p.connected, "backlog": p.backlog,
            "in_doubt": p.in_doubt, "last_contact": p.last_contact.map(|t| t.seconds), "last_error": p.last_error })
}

/// `n item` or `n items`.
fn items(n: u64) -> String {
    format!("{n} item{}", if n == 1 { "" } else { "s" })
}

fn print_peer(p: &wire::PeerStatus) {
    println!(
        "  peer {} at {}: {}, backlog {}{}{}",
        p.agency,
        p.addr,
        if p.connected { "connected" } else { "not connected" },
        p.backlog,
        if p.in_doubt > 0 {
            format!(" ({} of them {} may hold already)", p.in_doubt, p.agency)
        } else {
            String::new()
        },
        optional(", last error: ", &p.last_error, "")
    );
}

pub(crate) fn kind_name(k: i32) -> &'static str {
    Kind::try_from(k)
        .map(|k| k.as_str_name())
        .unwrap_or("KIND_UNKNOWN")
}

pub(crate) fn status_name(s: i32) -> &'static str {
    ReceiptStatus::try_from(s)
        .map(|s| s.as_str_name())
        .unwrap_or("RECEIPT_STATUS_UNKNOWN")
}

/// A receipt's outcome by its proto name (`OUTCOME_COMMITTED`), as `--json`
/// prints it.
pub(crate) fn outcome_name(o: i32) -> &'static str {
    Outcome::try_from(o)
        .map(|o| o.as_str_name())
        .unwrap_or("OUTCOME_UNKNOWN")
}

/// [`outcome_name`] for text output: nothing when unspecified (every
/// receipt but a TRANSACTION's PROCESSED).
pub(crate) fn outcome_shown(o: i32) -> &'static str {
    match Outcome::try_from(o) {
        Ok(Outcome::Unspecified) => "",
        _ => outcome_name(o),
    }
}

/// `before value after`, or nothing when `value` is empty: optional parts of a line.
pub(crate) fn optional(before: &str, value: &str, after: &str) -> String {
    if value.is_empty() {
        String::new()
    } else {
        format!("{before}{value}{after}")
    }
}

/// A gRPC status as an error that says what the node answered.
pub(crate) fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("the node answered {:?}: {}", s.code(), s.message())
}
