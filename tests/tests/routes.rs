//! Routing changed by a reload (DESIGN.md §6): queued work is not lost,
//! it moves to the new next hop; a peer added gets a forwarder, a peer
//! removed loses its own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;

use antar_node::config::Peer;
use antar_tests::*;

/// `agency`'s config with a direct peering to `peer`.
fn peering(fed: &Federation, agency: &str, peer: &str) -> antar_node::NodeConfig {
    let mut config = fed.config(agency);
    config.peers.push(Peer {
        agency: peer.to_owned(),
        addr: fed.addrs[peer].peer.to_string(),
    });
    config
}

/// Sends `n` notices from `app` to `to`'s `service`; returns their ids.
async fn send_n(app: &antar_client::Client, to: &str, service: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(send(app, notice(to, service, format!("queued {i}").as_bytes())).await);
    }
    ids
}

/// Receives and acks exactly `ids` at `app`, each once, and waits until
/// each is PROCESSED at the sender.
async fn each_arrives_once(app: &antar_client::Client, sender: &antar_client::Client, ids: &[String]) {
    let got: Vec<String> = receive(app, ids.len(), 20, true)
        .await
        .iter()
        .map(|d| envelope_of(d).id)
        .collect();
    let unique: HashSet<&String> = got.iter().collect();
    assert_eq!(got.len(), unique.len(), "a message arrived twice: {got:?}");
    assert_eq!(unique, ids.iter().collect::<HashSet<_>>());
    assert!(receive(app, 1, 1, false).await.is_empty(), "more arrived");
    for id in ids {
        until_state(sender, id, wire::MessageState::Processed, 15).await;
    }
}

/// finance reaches registry through the hub, which is down: what finance
/// sends waits in its outbox for the hub. A reload that peers finance with
/// registry directly moves it there, a new forwarder carries it, and the
/// receipts come back over the new link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_adds_a_direct_peer_moves_the_queued_work_to_it() {
    let fed = Federation::standard();
    let registry_node = fed.start_with(peering(&fed, "registry", "finance")).await;
    let finance_node = fed.start("finance").await;
    let finance = fed.app("finance").await;
    let admin = fed.admin("finance").await;
    let registry = fed.app("registry").await;

    let ids = send_n(&finance, "registry", "birth.lookup", 5).await;
    assert_eq!(backlog(&admin, "hub").await, 5);
    assert!(receive(&registry, 1, 1, false).await.is_empty());

    fed.reload_with(&finance_node, &peering(&fed, "finance", "registry"));
    each_arrives_once(&registry, &finance, &ids).await;
    assert_eq!(backlog(&admin, "hub").await, 0);
    assert_eq!(backlog(&admin, "registry").await, 0);
    for n in [finance_node, registry_node] {
        n.stop().await.unwrap();
    }
}

/// finance peers with health directly, and health is down: what finance
/// sends it waits for health. A reload that drops the peering sends health
/// through the hub (the default route): the queued items move to the
/// hub's outbox, and arrive through the hub once it and health (which
/// dropped the peering too) are up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_removes_a_peer_moves_its_queue_to_the_default_route() {
    let fed = Federation::standard();
    let finance_node = fed.start("finance").await;
    let finance = fed.app("finance").await;
    let admin = fed.admin("finance").await;

    let ids = send_n(&finance, "health", "tax.notice", 3).await;
    assert_eq!(backlog(&admin, "health").await, 3);

    fed.reload_with(&finance_node, &without_peer(fed.config("finance"), "health"));
    eventually(10, "the queue moves to the hub", || async {
        (backlog(&admin, "health").await == 0 && backlog(&admin, "hub").await == 3).then_some(())
    })
    .await;

    // health has dropped the peering too: its receipts go through the hub.
    let hub_node = fed.start("hub").await;
    let health_node = fed
        .start_with(without_peer(fed.config("health"), "finance"))
        .await;
    let health = fed.app("health").await;
    each_arrives_once(&health, &finance, &ids).await;
    for n in [finance_node, hub_node, health_node] {
        n.stop().await.unwrap();
    }
}

/// A reload that leaves queued items with no route loses none: they stay
/// in their queue, which `antar admin peers` still lists (its agency no
/// longer a peer, saying why nothing moves); a reload that brings the
/// peer back starts a forwarder that delivers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_left_without_a_route_stay_queued_until_the_peer_returns() {
    let fed = Federation::standard();
    let finance_node = fed.start("finance").await;
    let finance = fed.app("finance").await;
    let admin = fed.admin("finance").await;
    let ids = send_n(&finance, "health", "tax.notice", 3).await;

    let mut config = without_peer(fed.config("finance"), "health");
    config.default_route = None;
    fed.reload_with(&finance_node, &config);
    let health = peer_status(&admin, "health").await.unwrap();
    assert_eq!(health.backlog, 3);
    assert!(
        health.last_error.contains("not a peer in the config"),
        "{}",
        health.last_error
    );

    let health_node = fed.start("health").await;
    let health = fed.app("health").await;
    assert!(receive(&health, 1, 2, false).await.is_empty());
    fed.reload_with(&finance_node, &fed.config("finance"));
    each_arrives_once(&health, &finance, &ids).await;
    for n in [finance_node, health_node] {
        n.stop().await.unwrap();
    }
}
