//! Request/response and receipts from the command line: `antar call`,
//! `antar reply`, `antar receipts`.

use std::process::ExitCode;
use std::time::Duration;

use prost::Message as _;
use serde_json::json;
use tokio_stream::StreamExt as _;

use antar_client::wire;
use antar_client::ClientRole;

use crate::client_cmds::{
    optional, outcome_name, outcome_shown, parse_header, print_delivery, status_err, status_name, PayloadArgs,
};
use crate::conn::ConnArgs;

/// `antar call`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  antar call --federation .antar-dev/federation.json --agency finance \\\n      --to registry --service birth.lookup --data '{\"nik\":\"3171\"}' --timeout 10\n\nOn timeout the exit code is 4 (DEADLINE_EXCEEDED): the request stays tracked\n(antar track ID) and a late response goes to the caller's inbox (antar inbox)."
)]
pub struct CallArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The agency that answers.
    #[arg(long)]
    to: String,
    /// Its service, e.g. birth.lookup.
    #[arg(long)]
    service: String,
    #[command(flatten)]
    payload: PayloadArgs,
    /// A header NAME=VALUE (repeatable).
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Seconds to wait for the response.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

/// Exit code when a Call's deadline passed (gRPC DEADLINE_EXCEEDED is 4).
const EXIT_DEADLINE: u8 = 4;

pub async fn call(args: CallArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.connect(ClientRole::App).await?;
    let mut req = tonic::Request::new(wire::SendRequest {
        kind: wire::Kind::Request as i32,
        recipients: vec![args.to.clone()],
        service: args.service.clone(),
        payload: args.payload.read()?.into(),
        content_type: args.payload.content_type(),
        headers: args.headers.into_iter().collect(),
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(args.timeout.max(1)));
    match client.agency().call(req).await {
        Ok(resp) => {
            print_delivery(&resp.into_inner(), args.conn.json);
            Ok(ExitCode::SUCCESS)
        }
        Err(s) if s.code() == tonic::Code::DeadlineExceeded => {
            eprintln!(
                "no response from {} within {}s; the request stays tracked and a late response \
                 will wait in this agency's inbox (antar inbox)",
                args.to, args.timeout
            );
            Ok(ExitCode::from(EXIT_DEADLINE))
        }
        Err(s) => Err(status_err(s)),
    }
}

/// `antar reply`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  antar inbox --federation .antar-dev/federation.json --agency registry   # shows REQUEST ids\n  antar reply 0190f3c2-5b1a-7c3e-9d2f-4a5b6c7d8e9f --federation .antar-dev/federation.json \\\n      --agency registry --data '{\"born\":\"2001-02-03\"}'\n\nReplying acks the request too (its PROCESSED receipt goes back); replying again answers the first reply's id."
)]
pub struct ReplyArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The id of the REQUEST being answered.
    request_id: String,
    #[command(flatten)]
    payload: PayloadArgs,
    /// A header NAME=VALUE (repeatable).
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
}

pub async fn reply(args: ReplyArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.connect(ClientRole::App).await?;
    let resp = client
        .agency()
        .reply(wire::ReplyRequest {
            request_id: args.request_id.clone(),
            payload: args.payload.read()?.into(),
            content_type: args.payload.content_type(),
            headers: args.headers.into_iter().collect(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let id = resp.message_ids.first().cloned().unwrap_or_default();
    if args.conn.json {
        println!("{}", json!({ "message_id": id, "request_id": args.request_id }));
    } else {
        println!("accepted response {id} to {}", args.request_id);
    }
    Ok(ExitCode::SUCCESS)
}

/// `antar receipts`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  antar receipts --federation .antar-dev/federation.json --agency finance\n  antar receipts --follow --after 120 ...    # resume after the last cursor seen\n\nEach line starts with its cursor; pass the last one to --after to miss nothing."
)]
pub struct ReceiptsArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Keep the stream open and print receipts as they arrive.
    #[arg(long)]
    follow: bool,
    /// Start after this cursor (0: from the first receipt).
    #[arg(long, default_value_t = 0)]
    after: u64,
}

pub async fn receipts(args: ReceiptsArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.connect(ClientRole::App).await?;
    let mut stream = client
        .agency()
        .watch_receipts(wire::WatchReceiptsRequest {
            after_cursor: args.after,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    loop {
        // Without --follow: what is stored now, i.e. until the stream goes quiet.
        let next = if args.follow {
            stream.next().await
        } else {
            match tokio::time::timeout(Duration::from_millis(500), stream.next()).await {
                Ok(x) => x,
                Err(_) => break,
            }
        };
        let Some(event) = next else { break };
        let event = event.map_err(status_err)?;
        let r = wire::Receipt::decode(event.receipt.unwrap_or_default().receipt).unwrap_or_default();
        if args.conn.json {
            println!(
                "{}",
                json!({ "cursor": event.cursor, "message_id": r.message_id, "status": status_name(r.status),
                        "issuer": r.issuer, "sender": r.sender, "recipient": r.recipient,
                        "reason": r.reason, "outcome": outcome_name(r.outcome), "at": r.at.map(|t| t.seconds) })
            );
        } else {
            println!(
                "{:>6} {} {} by {} ({} -> {}){}{}",
                event.cursor,
                r.message_id,
                status_name(r.status),
                r.issuer,
                r.sender,
                r.recipient,
                optional(" ", outcome_shown(r.outcome), ""),
                optional(": ", &r.reason, "")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
