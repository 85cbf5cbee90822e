//! Faults of the link between two nodes rather than of the nodes (issue 7):
//! finance reaches the hub through a loopback proxy that cuts or stalls the
//! connection. A cut link and a stalled one both only delay: everything
//! acknowledged arrives, once, when the link is back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use antar_tests::*;

/// Sends `n` notices to registry and returns their ids.
async fn send_batch(app: &antar_client::Client, what: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let body = format!("{what} {i}");
        ids.push(send(app, notice("registry", "birth.lookup", body.as_bytes())).await);
    }
    ids
}

/// A proxy in front of `peer`'s peer port, and finance's config that
/// reaches `peer` through it, giving up on a silent stream or handshake
/// after a second.
async fn finance_through_proxy(fed: &Federation, peer: &str) -> (LinkProxy, antar_node::NodeConfig) {
    let proxy = LinkProxy::start(fed.addrs[peer].peer).await;
    let mut config = fed.config("finance");
    for p in &mut config.peers {
        if p.agency == peer {
            p.addr = proxy.addr.to_string();
        }
    }
    config.limits.transfer_ack_timeout_ms = 1_000;
    config.limits.handshake_timeout_ms = 1_000;
    (proxy, config)
}

/// `config` with `peer` at its own peer address (no proxy).
fn direct_to(mut config: antar_node::NodeConfig, fed: &Federation, peer: &str) -> antar_node::NodeConfig {
    for p in &mut config.peers {
        if p.agency == peer {
            p.addr = fed.addrs[peer].peer.to_string();
        }
    }
    config
}

/// Sends health a notice that opens the stream and waits for its delivery,
/// sets the link to `mode`, then sends one with a TTL of `ttl_secs`;
/// returns both ids. A link cut is first seen by finance (its stream to
/// health ends), so that the second is never sent: sent into the stream
/// that was open, before finance noticed, it would rightly be in doubt.
async fn delivered_then_with_ttl(
    fed: &Federation,
    finance: &antar_client::Client,
    proxy: &LinkProxy,
    mode: LinkMode,
    ttl_secs: i64,
) -> (String, String) {
    let first = send(finance, notice("health", "tax.notice", b"opens the stream")).await;
    until_state(finance, &first, wire::MessageState::Delivered, 10).await;
    proxy.set(mode);
    if mode == LinkMode::Cut {
        let admin = fed.admin("finance").await;
        eventually(10, "finance sees its link to health cut", || async {
            let status = peer_status(&admin, "health").await?;
            (!status.connected).then_some(())
        })
        .await;
    }
    let second = send(
        finance,
        wire::SendRequest {
            ttl: Some(antar_proto::prost_types::Duration {
                seconds: ttl_secs,
                nanos: 0,
            }),
            ..notice("health", "tax.notice", b"sent with a TTL")
        },
    )
    .await;
    (first, second)
}

/// Asserts that finance still holds `id` queued for `peer`, in doubt past
/// its TTL: `ACCEPTED`, the only item in the outbox.
async fn still_in_doubt(finance: &antar_client::Client, admin: &antar_client::Client, id: &str, peer: &str) {
    let t = track(finance, id).await;
    assert_eq!(
        t.state,
        wire::MessageState::Accepted as i32,
        "reason {:?}",
        t.reason
    );
    assert_eq!(backlog(admin, peer).await, 1);
}

/// Once the link is back: `first` and `doubtful` reach health's app, each
/// once, and `doubtful` ends `PROCESSED` without any `EXPIRED` receipt.
async fn arrives_once_unexpired(
    fed: &Federation,
    finance: &antar_client::Client,
    first: String,
    doubtful: &str,
) {
    let health = fed.app("health").await;
    receive_exactly(&health, &[first, doubtful.to_owned()], 20).await;
    let t = until_state(finance, doubtful, wire::MessageState::Processed, 15).await;
    let statuses: Vec<i32> = verified_statuses(fed, &t).into_iter().map(|s| s.0).collect();
    assert!(
        !statuses.contains(&(wire::ReceiptStatus::Expired as i32)),
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_or_stalled_link_delays_delivery_and_loses_nothing() {
    let fed = Federation::standard();
    let (proxy, config) = finance_through_proxy(&fed, "hub").await;
    let mut nodes = vec![fed.start_with(config).await];
    for a in ["hub", "registry"] {
        nodes.push(fed.start(a).await);
    }
    let finance = fed.app("finance").await;
    let finance_admin = fed.admin("finance").await;
    let registry = fed.app("registry").await;

    // Up: through the proxy like any link.
    let ids = send_batch(&finance, "up", 5).await;
    receive_exactly(&registry, &ids, 15).await;

    // Stalled: the stream stays open but nothing moves. Sends are still
    // accepted; nothing arrives; the forwarder gives up on the stream after
    // limits.transfer_ack_timeout_ms instead of waiting for TCP or HTTP/2
    // keepalives, and keeps retrying.
    proxy.set(LinkMode::Stall);
    let stalled_at = Instant::now();
    let ids = send_batch(&finance, "stalled", 20).await;
    assert!(receive(&registry, 1, 2, false).await.is_empty());
    let retries = r#"antar_transfer_retries_total"#;
    eventually(10, "the forwarder drops the stalled stream", || async {
        (get(&scrape(&fed, "finance").await, retries) >= 1.0).then_some(())
    })
    .await;
    assert!(stalled_at.elapsed() >= Duration::from_millis(1_000));
    assert_eq!(backlog(&finance_admin, "hub").await, 20);
    // Back up: everything arrives, once.
    proxy.set(LinkMode::Up);
    receive_exactly(&registry, &ids, 20).await;

    // Cut: connections closed, new ones refused. The queue holds.
    proxy.set(LinkMode::Cut);
    let ids = send_batch(&finance, "cut", 20).await;
    assert!(receive(&registry, 1, 1, false).await.is_empty());
    assert_eq!(backlog(&finance_admin, "hub").await, 20);
    proxy.set(LinkMode::Up);
    receive_exactly(&registry, &ids, 20).await;

    // Nothing more is waiting anywhere, and every receipt chain completed.
    assert!(receive(&registry, 1, 1, false).await.is_empty());
    for id in &ids {
        until_state(&finance, id, wire::MessageState::Processed, 15).await;
    }
    for n in nodes {
        n.stop().await.unwrap();
    }
}

/// An envelope the forwarder has sent but whose custody ack the link lost
/// is in doubt: the peer may hold it. Past its TTL it is still not
/// expired — neither by the sweeper nor by the forwarder — but goes again
/// once the link is back, and arrives once: never both a DELIVERED and an
/// EXPIRED receipt for one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_in_flight_when_its_link_stalls_is_not_expired_but_goes_again() {
    let fed = Federation::standard();
    let (proxy, config) = finance_through_proxy(&fed, "health").await;
    let nodes = vec![fed.start_with(config).await, fed.start("health").await];
    let finance = fed.app("finance").await;
    let admin = fed.admin("finance").await;

    // The stream to health is open, then the link stalls under it.
    let (first, doubtful) = delivered_then_with_ttl(&fed, &finance, &proxy, LinkMode::Stall, 1).await;
    // Its TTL passes, the stream times out, reconnections stall: the
    // sweeper (every 200 ms here) has had many chances.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    assert!(get(&scrape(&fed, "finance").await, "antar_transfer_retries_total") >= 1.0);
    still_in_doubt(&finance, &admin, &doubtful, "health").await;

    proxy.set(LinkMode::Up);
    arrives_once_unexpired(&fed, &finance, first, &doubtful).await;
    let dead = admin
        .admin()
        .list_dead_letters(wire::ListDeadLettersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .dead_letters;
    assert!(dead.is_empty(), "{dead:?}");
    for n in nodes {
        n.stop().await.unwrap();
    }
}

/// The same across a crash. What the forwarder sent before a `kill -9`
/// stays in doubt after the restart (the store holds a reservation at or
/// above every item sent to a peer), so past its TTL it is still not
/// expired, and goes again once the link is back. An envelope queued after
/// the restart and never sent expires as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_in_doubt_when_its_node_crashes_is_not_expired_after_the_restart() {
    let fed = Federation::standard();
    let (proxy, config) = finance_through_proxy(&fed, "health").await;
    let crashed = fed.spawn_with(config.clone());
    let health_node = fed.start("health").await;
    let finance = fed.app("finance").await;
    let (first, doubtful) = delivered_then_with_ttl(&fed, &finance, &proxy, LinkMode::Stall, 1).await;
    // Sent into the open stream, or about to be: either way the store's
    // reservation (taken when `first` went) covers it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    crashed.kill9();

    // Back with the link cut: nothing it sends from now on leaves.
    proxy.set(LinkMode::Cut);
    let finance_node = fed.spawn_with(config);
    let finance = fed.app("finance").await;
    let admin = fed.admin("finance").await;
    let fresh = send(
        &finance,
        wire::SendRequest {
            ttl: Some(antar_proto::prost_types::Duration { seconds: 1, nanos: 0 }),
            ..notice("health", "tax.notice", b"queued after the restart")
        },
    )
    .await;
    // Both TTLs pass; the sweeper (every 200 ms here) has many chances.
    until_state(&finance, &fresh, wire::MessageState::Expired, 10).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    still_in_doubt(&finance, &admin, &doubtful, "health").await;

    proxy.set(LinkMode::Up);
    arrives_once_unexpired(&fed, &finance, first, &doubtful).await;
    assert!(finance_node.terminate().success());
    health_node.stop().await.unwrap();
}

/// After a clean stop the node knows exactly what it sent: an envelope
/// queued before the stop and never sent (the link was cut) expires at its
/// TTL after the restart, although the reservation taken when an earlier
/// message went covers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_clean_stop_an_envelope_never_sent_still_expires() {
    let fed = Federation::standard();
    let (proxy, config) = finance_through_proxy(&fed, "health").await;
    let node = fed.start_with(config.clone()).await;
    let health_node = fed.start("health").await;
    let finance = fed.app("finance").await;

    let (_, queued) = delivered_then_with_ttl(&fed, &finance, &proxy, LinkMode::Cut, 4).await;
    node.stop().await.unwrap();

    let node = fed.start_with(config).await;
    let finance = fed.app("finance").await;
    // Still queued after the restart (the TTL outlives the stop), then expired.
    assert_eq!(
        track(&finance, &queued).await.state,
        wire::MessageState::Accepted as i32
    );
    let t = until_state(&finance, &queued, wire::MessageState::Expired, 15).await;
    assert_eq!(t.reason, "expired");
    node.stop().await.unwrap();
    health_node.stop().await.unwrap();
}

/// finance with one envelope in doubt at health: sent into a stalled
/// link whose stream then timed out.
struct InDoubt {
    proxy: LinkProxy,
    config: antar_node::NodeConfig,
    finance_node: antar_node::Node,
    health_node: antar_node::Node,
    finance: antar_client::Client,
    admin: antar_client::Client,
    /// Delivered before the stall, not yet received by health's app.
    first: String,
    doubtful: String,
}

async fn in_doubt_at_health(fed: &Federation) -> InDoubt {
    let (proxy, config) = finance_through_proxy(fed, "health").await;
    let finance_node = fed.start_with(config.clone()).await;
    let health_node = fed.start("health").await;
    let finance = fed.app("finance").await;
    let admin = fed.admin("finance").await;
    let (first, doubtful) = delivered_then_with_ttl(fed, &finance, &proxy, LinkMode::Stall, 3_600).await;
    // The stream it went into timed out: it was in flight. What is sent
    // from now on stalls in the handshake, so is never in doubt.
    eventually(10, "the stalled stream is dropped", || async {
        (get(&scrape(fed, "finance").await, "antar_transfer_retries_total") >= 1.0).then_some(())
    })
    .await;
    InDoubt {
        proxy,
        config,
        finance_node,
        health_node,
        finance,
        admin,
        first,
        doubtful,
    }
}

/// An envelope a peer may hold stays in that peer's queue when a reload
/// removes the peer, though another route now leads to its recipient:
/// moving it would put two copies in custody, which could end in two
/// outcomes. It waits, listed, and goes to the peer once a reload brings
/// it back. (What the peer was never sent moves: `routes.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_peer_keeps_what_it_may_hold_until_it_is_back() {
    let fed = Federation::standard();
    let d = in_doubt_at_health(&fed).await;
    let never_sent = send(&d.finance, notice("health", "tax.notice", b"never sent")).await;

    // health leaves finance's config; the hub (the default route, down
    // here) is the way to it now.
    fed.reload_with(&d.finance_node, &without_peer(d.config.clone(), "health"));
    eventually(10, "what was never sent moves to the hub", || async {
        (backlog(&d.admin, "hub").await == 1).then_some(())
    })
    .await;
    // The one in doubt stays, listed though health is no longer a peer.
    let listed = peer_status(&d.admin, "health").await.unwrap();
    assert_eq!((listed.backlog, listed.in_doubt), (1, 1));
    assert_eq!(
        track(&d.finance, &never_sent).await.state,
        wire::MessageState::Accepted as i32
    );

    d.proxy.set(LinkMode::Up);
    fed.reload_with(&d.finance_node, &d.config);
    arrives_once_unexpired(&fed, &d.finance, d.first, &d.doubtful).await;
    for n in [d.finance_node, d.health_node] {
        n.stop().await.unwrap();
    }
}

/// An administrator's release of a removed peer's queue lets what it
/// may hold move too: the item in doubt goes to health through the hub,
/// and arrives once. Refused while the agency is still a peer, for an
/// agency never queued for, and for a malformed id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_queue_moves_what_its_removed_peer_may_hold() {
    let fed = Federation::standard();
    let d = in_doubt_at_health(&fed).await;
    let release = |agency: &str| {
        let mut admin = d.admin.admin();
        let agency = agency.to_owned();
        async move {
            admin
                .release_queue(wire::ReleaseQueueRequest { agency })
                .await
                .map(|r| r.into_inner())
        }
    };
    assert_eq!(
        release("health").await.unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(
        release("tax-office").await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    let bad = release("Not An Id!").await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().starts_with("agency"), "{}", bad.message());
    let by_app = d
        .finance
        .admin()
        .release_queue(wire::ReleaseQueueRequest {
            agency: "health".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(by_app.code(), tonic::Code::PermissionDenied);

    fed.reload_with(&d.finance_node, &without_peer(d.config, "health"));
    // Its forwarder settles what it had in flight first.
    let done = eventually(15, "the queue is released", || async {
        match release("health").await {
            Ok(done) => Some(done),
            Err(s) if s.code() == tonic::Code::FailedPrecondition => None,
            Err(s) => panic!("{s:?}"),
        }
    })
    .await;
    // The rerouter may move it first, once the release is recorded.
    assert_eq!((done.released, done.unroutable), (1, 0));
    assert_eq!(backlog(&d.admin, "hub").await, 1);
    assert!(peer_status(&d.admin, "health").await.is_none());

    let hub_node = fed.start("hub").await;
    arrives_once_unexpired(&fed, &d.finance, d.first, &d.doubtful).await;
    for n in [d.finance_node, d.health_node, hub_node] {
        n.stop().await.unwrap();
    }
}

/// A peer's new address takes effect on a reload: finance reaches health
/// through a proxy that is then cut; the reload that gives health's own
/// address lets what waits go at once, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_peer_address_is_dialled_without_a_restart() {
    let fed = Federation::standard();
    let (proxy, config) = finance_through_proxy(&fed, "health").await;
    let finance_node = fed.start_with(config.clone()).await;
    let health_node = fed.start("health").await;
    let finance = fed.app("finance").await;
    let health = fed.app("health").await;

    let first = send(&finance, notice("health", "tax.notice", b"through the proxy")).await;
    receive_exactly(&health, &[first], 10).await;
    proxy.set(LinkMode::Cut);
    let second = send(
        &finance,
        notice("health", "tax.notice", b"waits for the new address"),
    )
    .await;
    assert!(receive(&health, 1, 1, false).await.is_empty());

    fed.reload_with(&finance_node, &direct_to(config, &fed, "health"));
    receive_exactly(&health, &[second], 10).await;
    for n in [finance_node, health_node] {
        n.stop().await.unwrap();
    }
}

/// A reload that gives a peer a new address moves an open stream there
/// too: once the reload is in, what is sent goes to the new address at
/// once, though the old stream was healthy and is stalled only now, and
/// its ack timeout (30 s) would not end it within the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_peer_address_moves_an_open_stream() {
    let fed = Federation::standard();
    let (proxy, mut config) = finance_through_proxy(&fed, "health").await;
    config.limits.transfer_ack_timeout_ms = 30_000;
    let finance_node = fed.start_with(config.clone()).await;
    let health_node = fed.start("health").await;
    let finance = fed.app("finance").await;
    let health = fed.app("health").await;

    let admin = fed.admin("finance").await;
    let first = send(&finance, notice("health", "tax.notice", b"opens the stream")).await;
    receive_exactly(&health, &[first], 10).await;
    // Nothing in flight: the old stream ends at once on the reload.
    eventually(10, "the custody ack of the first is back", || async {
        (backlog(&admin, "health").await == 0).then_some(())
    })
    .await;
    fed.reload_with(&finance_node, &direct_to(config, &fed, "health"));
    proxy.set(LinkMode::Stall);
    let second = send(&finance, notice("health", "tax.notice", b"after the reload")).await;
    receive_exactly(&health, &[second], 5).await;
    // Stopping does not wait for the stalled connection.
    proxy.set(LinkMode::Cut);
    for n in [finance_node, health_node] {
        n.stop().await.unwrap();
    }
}

/// The retry backoff starts over with each outage: after a long cut has
/// backed the forwarder off to `limits.retry_max_ms`, a link that comes
/// back, then blinks, is retried within the initial delay, not the
/// longest one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_outage_backs_off_from_the_initial_delay() {
    let fed = Federation::standard();
    let (proxy, mut config) = finance_through_proxy(&fed, "health").await;
    config.limits.retry_initial_ms = 50;
    config.limits.retry_max_ms = 6_000;
    let finance_node = fed.start_with(config).await;
    let health_node = fed.start("health").await;
    let finance = fed.app("finance").await;
    let health = fed.app("health").await;

    // A long outage: 50, 100, … ms, up to the 6 s cap.
    proxy.set(LinkMode::Cut);
    let first = send(&finance, notice("health", "tax.notice", b"after the long cut")).await;
    tokio::time::sleep(Duration::from_millis(7_000)).await;
    proxy.set(LinkMode::Up);
    receive_exactly(&health, &[first], 10).await;

    // A short one.
    proxy.set(LinkMode::Cut);
    let second = send(&finance, notice("health", "tax.notice", b"after the blink")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set(LinkMode::Up);
    let back = Instant::now();
    receive_exactly(&health, &[second], 10).await;
    // Backed off from 6 s, the first retry would come 3 to 6 s later.
    assert!(
        back.elapsed() < Duration::from_millis(2_900),
        "{:?}",
        back.elapsed()
    );
    for n in [finance_node, health_node] {
        n.stop().await.unwrap();
    }
}
