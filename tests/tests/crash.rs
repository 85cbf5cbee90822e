//! SIGKILL with envelopes in flight: nothing acknowledged is lost, nothing
//! acked is delivered again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use antar_node::dev::AgencySpec;
use antar_tests::*;
use tokio_stream::StreamExt as _;

fn pair() -> Federation {
    Federation::new(vec![
        AgencySpec {
            id: "finance".into(),
            peers: vec!["health".into()],
            default_route: None,
        },
        AgencySpec {
            id: "health".into(),
            peers: vec!["finance".into()],
            default_route: None,
        },
    ])
}

/// Sends until `target` sends succeeded; returns the ids of the successful ones.
async fn send_many(fed: &Federation, target: usize, kill_after: Option<usize>) -> (Vec<String>, bool) {
    let client = fed.app("finance").await;
    let ok = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..32u32 {
        let (client, ok) = (client.clone(), ok.clone());
        tasks.spawn(async move {
            let mut failures = 0;
            for i in 0.. {
                if ok.lock().unwrap().len() >= target || failures > 0 {
                    return;
                }
                let payload = format!("{t}-{i}").into_bytes();
                match client
                    .agency()
                    .send(notice("health", "tax.notice", &payload))
                    .await
                {
                    Ok(r) => ok.lock().unwrap().push(r.into_inner().message_ids[0].clone()),
                    Err(_) => failures += 1,
                }
            }
        });
    }
    let mut killed = false;
    if let Some(n) = kill_after {
        eventually(60, "sends to succeed", || async {
            (ok.lock().unwrap().len() >= n).then_some(())
        })
        .await;
        killed = true;
    }
    if !killed {
        while tasks.join_next().await.is_some() {}
    }
    let ids = ok.lock().unwrap().clone();
    (ids, killed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_envelope_and_redelivers_nothing_acked() {
    let fed = pair();

    // Phase 1: health is down, so everything finance accepts stays in flight there.
    let finance = fed.spawn("finance");
    let (mut accepted, _) = send_many(&fed, 700, Some(700)).await;
    finance.kill9();
    let finance = fed.spawn("finance");
    let (more, _) = send_many(&fed, 500, None).await;
    accepted.extend(more);
    assert!(accepted.len() >= 1_000, "{} accepted", accepted.len());

    // Phase 2: health comes up; its app acks; health is killed mid-way and restarted.
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let redelivered_after_ack: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut health = Some(fed.spawn("health"));
    let want: HashSet<String> = accepted.iter().cloned().collect();
    let mut restarted = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while !want.iter().all(|id| acked.lock().unwrap().contains(id)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not everything arrived: log:\n{}",
            fed.log("health")
        );
        let app = fed.app("health").await;
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
            let next = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
            let Ok(Some(Ok(d))) = next else { break };
            let id = envelope_of(&d).id;
            if acked.lock().unwrap().contains(&id) {
                redelivered_after_ack.lock().unwrap().push(id.clone());
            }
            *seen.lock().unwrap().entry(id.clone()).or_default() += 1;
            let ack = agency
                .ack(wire::AckRequest {
                    message_id: id.clone(),
                    ..Default::default()
                })
                .await;
            if ack.is_ok() {
                acked.lock().unwrap().insert(id);
            }
            if want.iter().all(|id| acked.lock().unwrap().contains(id)) {
                break;
            }
            if !restarted && acked.lock().unwrap().len() >= 300 {
                restarted = true;
                health.take().unwrap().kill9();
                health = Some(fed.spawn("health"));
                break;
            }
        }
    }
    assert!(restarted, "health was never killed");
    assert_eq!(
        redelivered_after_ack.lock().unwrap().clone(),
        Vec::<String>::new(),
        "delivered again after the app's ack returned OK"
    );
    for id in &accepted {
        assert!(
            acked.lock().unwrap().contains(id),
            "accepted {id} never delivered"
        );
    }
    drop(finance);
    drop(health);
}

/// A second SIGTERM while a stop waits for a stalled peer's custody acks
/// ends the process at once, exit status 130, saying so; like a `kill -9`,
/// it loses nothing acknowledged: after a restart every envelope is
/// delivered, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_a_slow_stop_at_once_and_loses_nothing() {
    let fed = pair();
    let health = fed.start("health").await;
    let proxy = LinkProxy::start(fed.addrs["health"].peer).await;
    let mut config = fed.config("finance");
    for p in &mut config.peers {
        p.addr = proxy.addr.to_string();
    }
    let mut finance = fed.spawn_with(config.clone());
    let app = fed.app("finance").await;
    let inbox = fed.app("health").await;
    let first = send(&app, notice("health", "tax.notice", b"before the stall")).await;
    receive_exactly(&inbox, std::slice::from_ref(&first), 20).await;
    let admin = fed.admin("finance").await;
    eventually(20, "its custody ack", || async {
        (peer_status(&admin, "health").await?.backlog == 0).then_some(())
    })
    .await;

    // Batches on their way (as many as the transfer window holds) that the
    // peer never answers: the stop waits up to 5 s for their acks.
    proxy.set(LinkMode::Stall);
    let mut ids = Vec::new();
    for i in 0..20u32 {
        ids.push(send(&app, notice("health", "tax.notice", &i.to_be_bytes())).await);
    }
    eventually(10, "the envelopes to be on their way", || async {
        let status = peer_status(&admin, "health").await?;
        (status.backlog == 20 && status.in_doubt > 0).then_some(())
    })
    .await;
    drop((app, admin));

    finance.signal("TERM");
    assert!(
        finance.exited_within(Duration::from_millis(1_000)).is_none(),
        "the stop should wait for the stalled acks"
    );
    let asked = std::time::Instant::now();
    finance.signal("TERM");
    let status = finance
        .exited_within(Duration::from_secs(2))
        .expect("a second SIGTERM ends the stop at once");
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(asked.elapsed() < Duration::from_secs(2));
    let log = fed.log("finance");
    assert!(
        log.contains("second signal during the stop: exiting now"),
        "{log}"
    );

    // Nothing acknowledged was lost, nothing comes twice.
    proxy.set(LinkMode::Up);
    let finance = fed.spawn_with(config);
    receive_exactly(&inbox, &ids, 30).await;
    assert!(
        receive(&inbox, 1, 2, true).await.is_empty(),
        "a message came twice"
    );
    assert_eq!(finance.terminate().code(), Some(0));
    health.stop().await.unwrap();
}
