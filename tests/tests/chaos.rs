//! Chaos, short variant (issue 7): finance -> hub -> registry as three
//! `antar node run` processes, each link through a loopback proxy; while an
//! app sends (`Send`, and every third call a `SendBatch`) and another
//! receives and acks (`AckBatch` for what has arrived together, else
//! `Ack`), a seeded random schedule
//! SIGKILLs and restarts any node, or cuts or stalls a link for a while. The
//! checker then proves: every send the node acknowledged reached the app
//! and was acked; nothing was delivered again after its ack succeeded; every
//! receipt chain is complete and verifies; every node's log export verifies,
//! and extends each export an auditor took of it at any point of the run:
//! no kill lost or rewrote an entry a node had exported.
//!
//! `ANTAR_CHAOS_SECS` (default 12) and `ANTAR_CHAOS_SEED` lengthen or replay
//! a run; the long run and its result are in docs/reliability.md.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use antar_client::ClientRole;
use antar_core::merkle;
use antar_node::dev::AgencySpec;
use antar_tests::*;
use rand::{Rng as _, SeedableRng as _};
use tokio_stream::StreamExt as _;

/// `agency`'s log as an auditor exports it mid-run: the size and root of
/// the bundle's newest checkpoint, which must be the root of all its
/// entries; `None` when the node did not answer it whole (killed before or
/// during the export, or still starting) or `stop` came first. Signatures
/// are not checked here: the final export is verified in full and must
/// extend this view, so every entry this one held is checked there,
/// unchanged and in its place.
async fn view(
    fed: &Federation,
    agency: &str,
    stop: &tokio_util::sync::CancellationToken,
) -> Option<(u64, merkle::Hash)> {
    let export = async {
        let auditor = antar_client::Client::from_federation(&fed.file, agency, ClientRole::Auditor)
            .await
            .ok()?;
        let mut stream = auditor
            .audit()
            .export(wire::ExportRequest::default())
            .await
            .ok()?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk.ok()?.data);
        }
        Some(out)
    };
    let bundle = tokio::select! {
        b = tokio::time::timeout(Duration::from_secs(5), export) => b.ok()??,
        () = stop.cancelled() => return None,
    };
    let bundle: wire::AuditBundle = prost::Message::decode(bundle.as_slice())
        .unwrap_or_else(|e| panic!("{agency}'s export during the run does not decode: {e}"));
    let newest = bundle
        .checkpoints
        .last()
        .unwrap_or_else(|| panic!("{agency}'s export during the run holds no checkpoint"));
    let leaves: Vec<_> = bundle.entries.iter().map(|e| merkle::leaf_hash(e)).collect();
    let root = merkle::root(&leaves);
    assert_eq!(
        (newest.tree_size, &newest.root_hash[..]),
        (leaves.len() as u64, root.as_slice()),
        "{agency}'s export during the run: its newest checkpoint is not of all its entries"
    );
    Some((newest.tree_size, root))
}

/// Journal segment size of the nodes (`limits.journal_segment_bytes`).
const SEGMENT_BYTES: u64 = 256 << 10;

fn line() -> Federation {
    let spec = |id: &str, peers: &[&str], default_route: Option<&str>| AgencySpec {
        id: id.into(),
        peers: peers.iter().map(|p| (*p).to_owned()).collect(),
        default_route: default_route.map(str::to_owned),
    };
    Federation::new(vec![
        spec("finance", &["hub"], Some("hub")),
        spec("hub", &["finance", "registry"], None),
        spec("registry", &["hub"], Some("hub")),
    ])
}

#[derive(Default)]
struct Seen {
    /// Delivered to the app at least once.
    delivered: HashSet<String>,
    /// Ack returned OK for these.
    acked: HashSet<String>,
    /// Delivered again after an acknowledged ack: must stay empty.
    violations: Vec<String>,
    deliveries: u64,
    /// Acks an `AckBatch` of several answered `Acked`.
    batch_acks: u64,
}

async fn receiver(fed: Arc<Federation>, seen: Arc<Mutex<Seen>>, stop: tokio_util::sync::CancellationToken) {
    while !stop.is_cancelled() {
        let Ok(Ok(app)) = tokio::time::timeout(
            Duration::from_secs(2),
            antar_client::Client::from_federation(&fed.file, "registry", ClientRole::App),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut agency = app.agency();
        let Ok(stream) = agency
            .receive(wire::ReceiveRequest {
                services: vec![],
                max_in_flight: 64,
            })
            .await
        else {
            continue;
        };
        let mut stream = stream.into_inner();
        loop {
            let next = tokio::select! {
                n = tokio::time::timeout(Duration::from_secs(2), stream.next()) => n,
                _ = stop.cancelled() => return,
            };
            let d = match next {
                Ok(Some(Ok(d))) => d,
                Err(_) => continue,
                _ => break,
            };
            // With what else has arrived already (up to 8): several are
            // acked with one AckBatch, one alone with Ack.
            let mut ids = vec![envelope_of(&d).id];
            while ids.len() < 8 {
                match tokio::time::timeout(Duration::ZERO, stream.next()).await {
                    Ok(Some(Ok(d))) => ids.push(envelope_of(&d).id),
                    _ => break,
                }
            }
            {
                let mut s = seen.lock().unwrap();
                for id in &ids {
                    s.deliveries += 1;
                    s.delivered.insert(id.clone());
                    if s.acked.contains(id) {
                        s.violations.push(id.clone());
                    }
                }
            }
            let ack = |id: &String| wire::AckRequest {
                message_id: id.clone(),
                ..Default::default()
            };
            let ids_len = ids.len();
            let acked: Vec<String> = if let [id] = &ids[..] {
                match agency.ack(ack(id)).await {
                    Ok(_) => ids,
                    Err(_) => Vec::new(),
                }
            } else {
                match agency
                    .ack_batch(wire::AckBatchRequest {
                        acks: ids.iter().map(ack).collect(),
                    })
                    .await
                {
                    Ok(r) => ids
                        .into_iter()
                        .zip(r.into_inner().results)
                        .filter(|(_, r)| matches!(r.result, Some(wire::ack_result::Result::Acked(_))))
                        .map(|(id, _)| id)
                        .collect(),
                    Err(_) => Vec::new(),
                }
            };
            let mut s = seen.lock().unwrap();
            if ids_len > 1 {
                s.batch_acks += acked.len() as u64;
            }
            s.acked.extend(acked);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kills_lose_nothing_and_deliver_nothing_twice() {
    let secs: u64 = std::env::var("ANTAR_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let seed: u64 = std::env::var("ANTAR_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("chaos: {secs}s, seed {seed} (replay with ANTAR_CHAOS_SEED={seed})");
    let fed = Arc::new(line());
    let agencies = ["finance", "hub", "registry"];
    // Both links of the line, as the dialing side sees them, go through a proxy.
    let links = [
        ("finance", "hub", LinkProxy::start(fed.addrs["hub"].peer).await),
        (
            "hub",
            "registry",
            LinkProxy::start(fed.addrs["registry"].peer).await,
        ),
    ];
    let spawn = |agency: &str| {
        let mut config = fed.config(agency);
        for (from, to, proxy) in &links {
            if *from == agency {
                for p in config.peers.iter_mut().filter(|p| p.agency == *to) {
                    p.addr = proxy.addr.to_string();
                }
            }
        }
        config.limits.transfer_ack_timeout_ms = 1_000;
        config.limits.handshake_timeout_ms = 1_000;
        // Small journal segments, so the kills also land while segments are
        // retired, checkpointed, recycled into spares and zeroed (32 MiB
        // ones would not fill up in a short run).
        config.limits.journal_segment_bytes = SEGMENT_BYTES;
        fed.spawn_with(config)
    };
    let mut children: HashMap<&str, ChildNode> = agencies.iter().map(|a| (*a, spawn(a))).collect();

    let stop = tokio_util::sync::CancellationToken::new();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let recv = tokio::spawn(receiver(fed.clone(), seen.clone(), stop.clone()));
    let sent = Arc::new(Mutex::new(Vec::<String>::new()));
    let sender = {
        let (fed, sent, stop) = (fed.clone(), sent.clone(), stop.clone());
        tokio::spawn(async move {
            let app = antar_client::federation_credentials(&fed.file, "finance", ClientRole::App).unwrap();
            let client = antar_client::Client::lazy(&app.0, &app.1).unwrap();
            // Every third call a SendBatch of four; the ids of the items it
            // answered Sent count as acknowledged, each Sent exactly one id.
            let (mut call, mut n, mut batch_sent) = (0u64, 0u64, 0u64);
            while !stop.is_cancelled() {
                let note = |n: u64| notice("registry", "birth.lookup", &n.to_be_bytes());
                let batch = call % 3 == 2;
                let ids = if batch {
                    let mut req = tonic::Request::new(wire::SendBatchRequest {
                        requests: (n..n + 4).map(note).collect(),
                    });
                    req.set_timeout(Duration::from_secs(2));
                    client.agency().send_batch(req).await.map(|r| {
                        let results = r.into_inner().results;
                        assert_eq!(results.len(), 4, "one result per request");
                        let ids: Vec<String> = results
                            .into_iter()
                            .filter_map(|r| match r.result {
                                Some(wire::send_result::Result::Sent(s)) => Some(s.message_ids),
                                _ => None,
                            })
                            .inspect(|ids| assert_eq!(ids.len(), 1, "one id per notice"))
                            .flatten()
                            .collect();
                        batch_sent += ids.len() as u64;
                        ids
                    })
                } else {
                    let mut req = tonic::Request::new(note(n));
                    req.set_timeout(Duration::from_secs(2));
                    client.agency().send(req).await.map(|r| {
                        let ids = r.into_inner().message_ids;
                        assert_eq!(ids.len(), 1, "one id per notice");
                        ids
                    })
                };
                match ids {
                    Ok(ids) => sent.lock().unwrap().extend(ids),
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
                call += 1;
                n += if batch { 4 } else { 1 };
            }
            batch_sent
        })
    };

    // The schedule: two faults in three kill a node at random, keep it down
    // a moment and restart it; the third cuts or stalls a link, then
    // restores it.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let (mut kills, mut link_faults) = (0, 0);
    let mut starts: HashMap<&str, u64> = agencies.iter().map(|a| (*a, 1)).collect();
    // An auditor exports each node's log once before the first fault, and
    // then in turn all along, whatever the schedule does (a kill may land
    // during an export): so every node killed had been exported before.
    let mut views = Vec::new();
    for agency in agencies {
        let exported = eventually(30, "a first export", || async {
            view(&fed, agency, &stop)
                .await
                .map(|v| (agency, tokio::time::Instant::now(), v))
        });
        views.push(exported.await);
    }
    let exporter = {
        let (fed, stop) = (fed.clone(), stop.clone());
        tokio::spawn(async move {
            let mut views = Vec::new();
            for agency in agencies.iter().cycle() {
                if stop.is_cancelled() {
                    break;
                }
                if let Some(v) = view(&fed, agency, &stop).await {
                    views.push((*agency, tokio::time::Instant::now(), v));
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            views
        })
    };
    let mut killed = Vec::new();
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..1500))).await;
        let down_for = Duration::from_millis(rng.random_range(100..1500));
        if rng.random_range(0..3) < 2 {
            let victim = agencies[rng.random_range(0..agencies.len())];
            children.remove(victim).unwrap().kill9();
            killed.push((victim, tokio::time::Instant::now()));
            kills += 1;
            tokio::time::sleep(down_for).await;
            children.insert(victim, spawn(victim));
            *starts.get_mut(victim).unwrap() += 1;
        } else {
            let (_, _, proxy) = &links[rng.random_range(0..links.len())];
            proxy.set(if rng.random_bool(0.5) {
                LinkMode::Cut
            } else {
                LinkMode::Stall
            });
            link_faults += 1;
            tokio::time::sleep(down_for).await;
            proxy.set(LinkMode::Up);
        }
    }
    stop.cancel();
    views.extend(exporter.await.unwrap());
    let batch_sent = sender.await.unwrap();
    let sent: Vec<String> = sent.lock().unwrap().clone();
    assert_eq!(
        sent.iter().collect::<HashSet<_>>().len(),
        sent.len(),
        "every acknowledged send has its own id"
    );
    assert!(batch_sent > 0, "no SendBatch item was acknowledged");
    assert!(
        sent.len() > 50,
        "too few sends got through to make a point: {}; finance's log:\n{}",
        sent.len(),
        fed.log("finance")
    );

    // Drain: every acknowledged send reaches the app. (An ack whose answer
    // was lost in a kill may have taken effect: PROCESSED below proves it.)
    recv.await.unwrap();
    let drain = tokio_util::sync::CancellationToken::new();
    let recv = tokio::spawn(receiver(fed.clone(), seen.clone(), drain.clone()));
    // A backlog drains at its own pace; what fails is no progress for 30 s.
    let mut last = (usize::MAX, tokio::time::Instant::now());
    loop {
        let missing: Vec<String> = {
            let s = seen.lock().unwrap();
            sent.iter()
                .filter(|id| !s.delivered.contains(*id))
                .cloned()
                .collect()
        };
        if missing.is_empty() {
            break;
        }
        if missing.len() < last.0 {
            last = (missing.len(), tokio::time::Instant::now());
        }
        if last.1.elapsed() > Duration::from_secs(30) {
            let finance = fed.app("finance").await;
            let mut states = Vec::new();
            for id in missing.iter().take(5) {
                let t = finance
                    .agency()
                    .track(wire::TrackRequest {
                        message_id: id.clone(),
                    })
                    .await;
                states.push(format!("{id}: {:?}", t.map(|t| (t.into_inner().state,))));
            }
            panic!(
                "{} of {} acknowledged sends never reached the app: {states:?}",
                missing.len(),
                sent.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drain.cancel();
    recv.await.unwrap();
    {
        let s = seen.lock().unwrap();
        assert!(
            s.violations.is_empty(),
            "delivered again after an acked ack: {:?}",
            s.violations
        );
        eprintln!(
            "chaos: {kills} kills, {link_faults} link cuts or stalls, {} sends acknowledged ({batch_sent} by SendBatch), {} deliveries, {} acked ({} by AckBatch)",
            sent.len(),
            s.deliveries,
            s.acked.len(),
            s.batch_acks
        );
        assert!(s.batch_acks > 0, "no AckBatch item was acked");
    }

    // Every receipt chain complete and verifying, seen from finance.
    let finance = fed.app("finance").await;
    let verifier = fed.verifier();
    for id in &sent {
        let t = eventually(60, "PROCESSED at finance", || async {
            let t = finance
                .agency()
                .track(wire::TrackRequest {
                    message_id: id.clone(),
                })
                .await
                .ok()?
                .into_inner();
            (t.state == wire::MessageState::Processed as i32).then_some(t)
        })
        .await;
        let statuses: Vec<i32> = t
            .receipts
            .iter()
            .map(|r| verifier.verify_receipt(r).unwrap().receipt.status)
            .collect();
        assert_eq!(
            statuses,
            [
                wire::ReceiptStatus::Accepted as i32,
                wire::ReceiptStatus::Delivered as i32,
                wire::ReceiptStatus::Processed as i32
            ],
            "{id}"
        );
    }

    // And every node's log still verifies after all the kills, and holds
    // every entry it had exported before them, unchanged and in place.
    for a in agencies {
        let auditor = fed.client(a, ClientRole::Auditor).await;
        let bundle = export(&auditor).await;
        let earlier: Vec<_> = views.iter().filter(|(v, ..)| *v == a).map(|(.., v)| *v).collect();
        antar_core::audit::verify_bundle_extending(&bundle, &verifier, &earlier)
            .unwrap_or_else(|e| panic!("{a}: {e}"));
    }
    let exported: Vec<usize> = agencies
        .iter()
        .map(|a| views.iter().filter(|(v, ..)| v == a).count())
        .collect();
    // Views a kill of their node came after: what the check above is for.
    let before_kills = views
        .iter()
        .filter(|(a, at, _)| killed.iter().any(|(k, when)| k == a && when > at))
        .count();
    eprintln!(
        "chaos: exports taken during the run, by node {agencies:?}: {exported:?}; {before_kills} of them before a kill of their node"
    );
    // True by the first round of exports above; this keeps it so.
    assert_eq!(
        before_kills > 0,
        kills > 0,
        "every node is exported before the first fault, so each kill comes after an export"
    );
    // The journals went through segments. A node numbers its first segment
    // 0 and each next one, at a rollover or a start after a kill, one past
    // the newest on disk; so the newest number, less the starts after the
    // first, counts the rollovers (at least: a node killed before it opened
    // its store did not number a segment), read before the clean stop
    // empties the journal.
    let rollovers: Vec<(&str, u64)> = agencies
        .iter()
        .map(|a| {
            let newest = std::fs::read_dir(fed.layout.data_dir(a).join("journal"))
                .unwrap()
                .filter_map(|e| {
                    e.unwrap()
                        .file_name()
                        .to_str()?
                        .strip_suffix(".log")?
                        .parse::<u64>()
                        .ok()
                })
                .max()
                .unwrap();
            (*a, (newest + 1).saturating_sub(starts[a]))
        })
        .collect();
    eprintln!("chaos: journal segments retired at {SEGMENT_BYTES} bytes, by node: {rollovers:?}");
    assert!(
        rollovers.iter().any(|(_, n)| *n >= 2),
        "no node's journal went past its second segment: {rollovers:?}"
    );
    for (_, c) in children {
        assert!(c.terminate().success());
    }
}
