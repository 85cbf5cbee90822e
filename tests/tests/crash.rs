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
