//! Hostile clients and peers (issue 7): silent connections on both
//! listeners, a peer streaming garbage, a flooding app, a peer filling the
//! store, connection floods, HTTP/2 stream floods and resets. Each is refused on
//! its own and the node keeps serving everyone else.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use antar_client::{Client, Credentials};
use antar_tests::*;
use tokio::io::AsyncReadExt as _;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_dropped_after_the_handshake_timeout() {
    let fed = Federation::standard();
    let mut config = fed.config("finance");
    config.limits.handshake_timeout_ms = 300;
    let node = fed.start_with(config).await;
    let app = fed.app("finance").await;
    let addrs = fed.addrs["finance"];
    // Twenty slow-loris connections per listener: TCP open, no TLS hello.
    let mut idle = Vec::new();
    for addr in [addrs.api, addrs.peer] {
        for _ in 0..20 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
    }
    // Everyone else is served meanwhile.
    send(&app, notice("health", "tax.notice", b"still served")).await;
    let started = Instant::now();
    for mut conn in idle {
        let mut buf = [0u8; 16];
        let closed = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "an idle connection was kept open: {closed:?}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    send(&app, notice("health", "tax.notice", b"and after")).await;
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_streaming_garbage_is_refused_and_real_peers_carry_on() {
    let fed = Federation::standard();
    let mut nodes = Vec::new();
    for a in ["finance", "registry", "hub"] {
        nodes.push(fed.start(a).await);
    }
    // The hub's real certificate, but garbage on Peer.Transfer.
    let hub = fed.certs("hub");
    let creds = Credentials::from_der(
        antar_pki::read_cert_der(&hub.federation_root()).unwrap(),
        antar_pki::read_certs_der(&hub.tls_cert()).unwrap(),
        antar_pki::read_key_der(&hub.tls_key()).unwrap(),
    );
    let channel = Client::connect(&fed.addrs["registry"].peer.to_string(), &creds)
        .await
        .unwrap()
        .channel();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/antar.v1.Peer/Transfer");
    let garbage = tokio_stream::iter(vec![vec![0x0a, 0xff, 0xff, 0xff, 0x7f], vec![0xde, 0xad]]);
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        use tokio_stream::StreamExt as _;
        match grpc.streaming(tonic::Request::new(garbage), path, RawCodec).await {
            Err(st) => st,
            Ok(resp) => resp
                .into_inner()
                .next()
                .await
                .expect("the stream must end with an error")
                .unwrap_err(),
        }
    })
    .await
    .expect("registry never answered the garbage");
    assert_eq!(outcome.code(), Code::InvalidArgument, "{outcome:?}");

    // Real traffic through the same hub to registry still flows.
    let finance = fed.app("finance").await;
    let id = send(&finance, notice("registry", "birth.lookup", b"after the garbage")).await;
    let got = receive(&fed.app("registry").await, 1, 10, true).await;
    assert_eq!(
        got.iter().map(|d| envelope_of(d).id).collect::<Vec<_>>(),
        vec![id]
    );
    for n in nodes {
        n.stop().await.unwrap();
    }
}

/// A flood of calls under `limits.app_calls_per_sec` (here `Track` and
/// `Ack`s of a message nobody holds) is cut at the limit with
/// `RESOURCE_EXHAUSTED` naming the key, while the same app's sends (their
/// own bucket) and another app's calls are served. Acks that settle a
/// message cost nothing; wasted ones are paid for, and every call under
/// the limit waits for the debt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_flooding_calls_is_limited_apart_from_its_sends_and_other_apps() {
    let fed = Federation::standard();
    let mut config = fed.config("finance");
    config.limits.app_calls_per_sec = 1;
    let nodes = vec![fed.start_with(config).await, fed.start("health").await];
    let from_health = fed.app("health").await;
    let mut delivered = Vec::new();
    for i in 0..3u8 {
        delivered.push(send(&from_health, notice("finance", "tax.notice", &[i])).await);
    }
    let flood = fed.app("finance").await;
    let unknown = "0190f3c2-5b1a-7c3e-9d2f-4a5b6c7d8e9f".to_owned();
    let track = |client: Client| {
        let id = unknown.clone();
        async move {
            let asked = wire::TrackRequest { message_id: id };
            client.agency().track(asked).await.map(|_| ())
        }
    };
    let ack = |client: Client, id: String| async move {
        let ack = wire::AckRequest {
            message_id: id,
            ..Default::default()
        };
        client.agency().ack(ack).await.map(|_| ())
    };
    let over = |st: &tonic::Status| {
        st.code() == Code::ResourceExhausted && st.message().contains("limits.app_calls_per_sec = 1;")
    };
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200u32 {
        if i % 2 == 0 {
            tasks.spawn(track(flood.clone()));
        } else {
            tasks.spawn(ack(flood.clone(), unknown.clone()));
        }
    }
    let (mut served, mut limited) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let st = r.unwrap().unwrap_err();
        if over(&st) {
            limited += 1;
        } else {
            assert_eq!(st.code(), Code::NotFound, "{st:?}");
            served += 1;
        }
    }
    assert!(limited >= 150, "only {limited} of 200 refused ({served} served)");
    assert!(served >= 1, "the first second's burst is served");
    // Each refusal is counted for the operator, by limit and app.
    let m = scrape(&fed, "finance").await;
    let series = r#"antar_limited_total{limit="app_calls_per_sec",caller="dev"}"#;
    assert_eq!(get(&m, series), f64::from(limited));

    // Its sends have their own bucket: ten in a row, a batch, and a Call
    // answered for its own fault.
    for i in 0..10u8 {
        send(&flood, notice("health", "tax.notice", &[i])).await;
    }
    let batch = wire::SendBatchRequest {
        requests: vec![notice("health", "tax.notice", b"batched")],
    };
    let sent = flood.agency().send_batch(batch).await.unwrap().into_inner();
    assert!(
        matches!(sent.results[0].result, Some(wire::send_result::Result::Sent(_))),
        "{sent:?}"
    );
    let call = notice("health", "tax.notice", b"a Call sends a REQUEST");
    let st = flood.agency().call(call).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    // Another app has its own bucket.
    let other = fed.named_app("finance", "payroll").await;
    let st = track(other).await.unwrap_err();
    assert_eq!(st.code(), Code::NotFound, "{st:?}");

    // Acks that settle their message give their token back: three in a
    // row pass a bucket of one.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let got = receive(&flood, 3, 20, false).await;
    let mut got: Vec<String> = got.iter().map(|d| envelope_of(d).id).collect();
    got.sort();
    delivered.sort();
    assert_eq!(got, delivered);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    for id in got {
        ack(flood.clone(), id).await.unwrap();
    }
    // An empty AckBatch costs its way in, as any call does.
    let empty = wire::AckBatchRequest::default();
    flood.agency().ack_batch(empty).await.unwrap();
    let st = track(flood.clone()).await.unwrap_err();
    assert!(over(&st), "{st:?}");
    // Wasted acks are paid for: once the bucket is back, an AckBatch of
    // five acks of nothing puts it four tokens in debt, so every call
    // under the limit is still refused 1.2 s later (a bucket merely empty
    // would have refilled).
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let acks = vec![
        wire::AckRequest {
            message_id: unknown.clone(),
            ..Default::default()
        };
        5
    ];
    let answered = flood.agency().ack_batch(wire::AckBatchRequest { acks }).await;
    assert_eq!(answered.unwrap().into_inner().results.len(), 5);
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let mut agency = flood.agency();
    let refused = [
        agency.receive(wire::ReceiveRequest::default()).await.map(|_| ()),
        agency.ack(wire::AckRequest::default()).await.map(|_| ()),
        agency
            .ack_batch(wire::AckBatchRequest::default())
            .await
            .map(|_| ()),
        agency.reply(wire::ReplyRequest::default()).await.map(|_| ()),
        agency.track(wire::TrackRequest::default()).await.map(|_| ()),
        agency
            .watch_receipts(wire::WatchReceiptsRequest::default())
            .await
            .map(|_| ()),
    ];
    for (i, r) in refused.into_iter().enumerate() {
        let st = r.unwrap_err();
        assert!(over(&st), "call {i}: {st:?}");
    }
    // The flooding app is served again once its bucket refills.
    let st = eventually(15, "the bucket to refill", || async {
        track(flood.clone()).await.err().filter(|st| !over(st))
    })
    .await;
    assert_eq!(st.code(), Code::NotFound, "{st:?}");
    for n in nodes {
        n.stop().await.unwrap();
    }
}

/// `WatchReceipts` streams are bounded per app like `Receive` streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_holds_a_bounded_number_of_watch_streams() {
    let fed = Federation::standard();
    let mut config = fed.config("finance");
    config.limits.max_watch_streams_per_app = 2;
    let node = fed.start_with(config).await;
    let app = fed.app("finance").await;
    let watch = |client: Client| async move {
        let asked = wire::WatchReceiptsRequest::default();
        client
            .agency()
            .watch_receipts(asked)
            .await
            .map(|r| r.into_inner())
    };
    let mut streams = vec![
        watch(app.clone()).await.unwrap(),
        watch(app.clone()).await.unwrap(),
    ];
    let st = watch(app.clone()).await.unwrap_err();
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    assert!(
        st.message()
            .contains("holds 2 WatchReceipts streams, limits.max_watch_streams_per_app = 2"),
        "{st:?}"
    );
    let m = scrape(&fed, "finance").await;
    let series = r#"antar_limited_total{limit="max_watch_streams_per_app",caller="dev"}"#;
    assert_eq!(get(&m, series), 1.0);
    // Another app has its own count; a closed stream gives its place back.
    let payroll = fed.named_app("finance", "payroll").await;
    watch(payroll).await.unwrap();
    drop(streams.pop());
    eventually(10, "a stream's place back", || async {
        watch(app.clone()).await.ok()
    })
    .await;
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_app_is_limited_and_other_apps_are_served() {
    let fed = Federation::standard();
    let mut config = fed.config("finance");
    config.limits.app_sends_per_sec = 20;
    let node = fed.start_with(config).await;
    let flood = fed.app("finance").await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200u32 {
        let flood = flood.clone();
        tasks.spawn(async move {
            flood
                .agency()
                .send(notice("health", "tax.notice", &i.to_be_bytes()))
                .await
        });
    }
    let (mut ok, mut limited) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Ok(_) => ok += 1,
            Err(st) => {
                assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
                assert!(st.message().contains("limits.app_sends_per_sec = 20"), "{st:?}");
                limited += 1;
            }
        }
    }
    assert!(limited >= 150, "only {limited} of 200 refused ({ok} accepted)");
    let m = scrape(&fed, "finance").await;
    let series = r#"antar_limited_total{limit="app_sends_per_sec",caller="dev"}"#;
    assert_eq!(get(&m, series), f64::from(limited));
    assert!(ok >= 20, "the first second's burst is served: {ok}");
    // Another app of the same agency has its own bucket.
    let other = fed.named_app("finance", "payroll").await;
    send(&other, notice("health", "tax.notice", b"payroll is not flooding")).await;
    // Every accepted send is really queued; refused ones stored nothing.
    let admin = fed.admin("finance").await;
    assert_eq!(backlog(&admin, "health").await, ok + 1);
    node.stop().await.unwrap();
}

/// A TCP connection to `addr` from the loopback address `from`.
async fn connect_from(from: [u8; 4], addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((from, 0).into()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// True when the node closed `conn` (end of stream or reset) within `wait`.
async fn closed_within(conn: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(wait, conn.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// Waits until the node reports `n` open connections on `listener`.
async fn until_open(fed: &Federation, listener: &str, n: f64) {
    let series = format!("antar_connections{{listener=\"{listener}\"}}");
    eventually(5, &format!("{series} == {n}"), || async {
        (get(&scrape(fed, "finance").await, &series) == n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_close_the_excess_and_the_node_keeps_serving() {
    let fed = Federation::standard();
    let mut config = fed.config("finance");
    config.limits.max_connections_per_ip = 3;
    config.limits.max_connections = 6;
    let node = fed.start_with(config).await;
    let addrs = fed.addrs["finance"];
    // The app (from 127.0.0.1) holds one HTTP/2 connection.
    let app = fed.app("finance").await;
    send(&app, notice("health", "tax.notice", b"before")).await;
    until_open(&fed, "api", 1.0).await;

    // 1. One address opens connections and says nothing (slow-loris): its
    //    first three are held, the fourth is closed at accept, long before
    //    the 10 s handshake timeout.
    let mut flood = Vec::new();
    for _ in 0..3 {
        flood.push(connect_from([127, 0, 0, 2], addrs.api).await);
    }
    until_open(&fed, "api", 4.0).await;
    let mut extra = connect_from([127, 0, 0, 2], addrs.api).await;
    assert!(closed_within(&mut extra, Duration::from_secs(2)).await);
    for conn in &mut flood {
        assert!(!closed_within(conn, Duration::from_millis(100)).await);
    }
    send(&app, notice("health", "tax.notice", b"served during the flood")).await;
    let m = scrape(&fed, "finance").await;
    assert_eq!(get(&m, r#"antar_connections_refused_total{listener="api"}"#), 1.0);
    assert_eq!(
        get(&m, r#"antar_connections_refused_total{listener="peer"}"#),
        0.0
    );

    // 2. A closed connection gives its place back.
    drop(flood.pop());
    until_open(&fed, "api", 3.0).await;
    flood.push(connect_from([127, 0, 0, 2], addrs.api).await);
    until_open(&fed, "api", 4.0).await;

    // 3. The listener's own limit: two more from another address fill it
    //    (1 + 3 + 2 = 6); a seventh from anywhere is closed, while the
    //    connections already open, the app's among them, carry on.
    for _ in 0..2 {
        flood.push(connect_from([127, 0, 0, 3], addrs.api).await);
    }
    until_open(&fed, "api", 6.0).await;
    let mut over = connect_from([127, 0, 0, 4], addrs.api).await;
    assert!(closed_within(&mut over, Duration::from_secs(2)).await);
    send(&app, notice("health", "tax.notice", b"served at the limit")).await;
    assert_eq!(
        get(
            &scrape(&fed, "finance").await,
            r#"antar_connections_refused_total{listener="api"}"#
        ),
        2.0
    );

    // 4. Each listener counts its own: the peer port is untouched by it.
    let mut peer_conns = Vec::new();
    for _ in 0..3 {
        peer_conns.push(connect_from([127, 0, 0, 2], addrs.peer).await);
    }
    until_open(&fed, "peer", 3.0).await;
    for conn in &mut peer_conns {
        assert!(!closed_within(conn, Duration::from_millis(100)).await);
    }
    drop(flood);
    until_open(&fed, "api", 1.0).await;
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_fill_a_store_past_twice_its_quota_and_nothing_is_lost() {
    let fed = Federation::standard();
    let quota = 64 * 1024;
    let nodes = fed
        .start_all_with(&["finance", "health"], |agency, config| {
            if agency == "health" {
                config.limits.max_queued_bytes = quota;
            } else {
                // Small batches, one in flight, quick retries: the ceiling
                // is met a batch at a time and the drain is quick.
                config.limits.batch_size = 4;
                config.limits.transfer_window = 1;
                config.limits.retry_initial_ms = 50;
                config.limits.retry_max_ms = 300;
            }
        })
        .await;
    let finance = fed.app("finance").await;
    let mut sent = Vec::new();
    for i in 0..64u32 {
        let mut body = vec![0u8; 4096];
        body[..4].copy_from_slice(&i.to_be_bytes());
        sent.push(send(&finance, notice("health", "tax.notice", &body)).await);
    }

    // Health takes peers' envelopes up to twice its quota, then refuses
    // the rest RESOURCE_EXHAUSTED; finance keeps them queued.
    let admin = fed.admin("finance").await;
    let refused = eventually(15, "health refuses past its ceiling", || async {
        peer_status(&admin, "health")
            .await
            .filter(|p| p.last_error.contains("ceiling") && p.backlog > 0)
    })
    .await;
    assert!(
        refused.last_error.contains("twice limits.max_queued_bytes"),
        "{}",
        refused.last_error
    );
    let queued = get(&scrape(&fed, "health").await, "antar_queued_bytes");
    assert!(
        queued >= (2 * quota) as f64 && queued < (2 * quota + 24 * 1024) as f64,
        "health holds {queued} bytes, ceiling {}",
        2 * quota
    );
    // Its own apps were refused from the quota on.
    let health = fed.app("health").await;
    let st = health
        .agency()
        .send(notice("finance", "tax.notice", b"no room"))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    assert!(st.message().contains("max_queued_bytes"), "{st:?}");

    // As health's app drains its inbox, the rest arrive: each once.
    receive_exactly(&health, &sent, 30).await;
    eventually(10, "finance's queue to health drained", || async {
        (backlog(&admin, "health").await == 0).then_some(())
    })
    .await;
    for n in nodes {
        n.stop().await.unwrap();
    }
}

/// Sends health one envelope that alone takes it past its ceiling for
/// peers' envelopes (twice a quota of 64 KiB) and waits for its delivery.
async fn fill_health(finance: &Client) -> String {
    let big = send(finance, notice("health", "tax.notice", &vec![1; 140 * 1024])).await;
    until_state(finance, &big, wire::MessageState::Delivered, 15).await;
    big
}

/// Sends health `n` small notices with a TTL of `secs`; their ids.
async fn notices_with_ttl(finance: &Client, n: u32, secs: i64) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let request = wire::SendRequest {
            ttl: Some(antar_proto::prost_types::Duration {
                seconds: secs,
                nanos: 0,
            }),
            ..notice("health", "tax.notice", &i.to_be_bytes())
        };
        ids.push(send(finance, request).await);
    }
    ids
}

/// A peer past its ceiling refuses a batch saying it took nothing of it
/// (`antar-not-taken`): so the envelopes are not in doubt at their sender,
/// and expire there at their TTL, each with an `EXPIRED` receipt, instead
/// of staying queued for as long as the peer refuses. Also with a backlog:
/// batches in flight behind the refused one, and more waiting to go. None
/// reaches the peer's app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_a_full_peer_keeps_refusing_expire_at_their_ttl() {
    let fed = Federation::standard();
    let nodes = fed
        .start_all_with(&["finance", "health"], |agency, config| {
            if agency == "health" {
                config.limits.max_queued_bytes = 64 * 1024;
            } else {
                config.limits.batch_size = 2;
                config.limits.transfer_window = 4;
                config.limits.retry_max_ms = 300;
                config.limits.sweep_interval_ms = 100;
            }
        })
        .await;
    let finance = fed.app("finance").await;
    let big = fill_health(&finance).await;
    // Long enough for each to be sent, and refused, before it expires, on
    // a slow host.
    let late = notices_with_ttl(&finance, 24, 4).await;
    let admin = fed.admin("finance").await;
    eventually(10, "health refuses them", || async {
        peer_status(&admin, "health")
            .await
            .filter(|p| p.last_error.contains("ceiling"))
    })
    .await;
    // Counted at health, by the refused peer.
    let m = scrape(&fed, "health").await;
    let series = r#"antar_limited_total{limit="max_queued_bytes",caller="finance"}"#;
    assert!(get(&m, series) >= 1.0, "{m:?}");

    for id in &late {
        let t = until_state(&finance, id, wire::MessageState::Expired, 15).await;
        let statuses: Vec<i32> = verified_statuses(&fed, &t).into_iter().map(|s| s.0).collect();
        assert_eq!(
            statuses,
            [
                wire::ReceiptStatus::Accepted as i32,
                wire::ReceiptStatus::Expired as i32
            ]
        );
    }
    assert_eq!(backlog(&admin, "health").await, 0);
    let status = peer_status(&admin, "health").await.unwrap();
    assert_eq!(status.in_doubt, 0, "{status:?}");

    // Health's app drains its inbox: the first arrives, the expired ones never.
    let health = fed.app("health").await;
    receive_exactly(&health, std::slice::from_ref(&big), 10).await;
    assert!(receive(&health, 1, 2, true).await.is_empty());
    for n in nodes {
        n.stop().await.unwrap();
    }
}

/// A refused stream's last word is read even when the forwarder was still
/// writing to it: 100 envelopes queued while the link is cut go out at
/// once, a batch each, 64 in flight, when it comes back; health refuses
/// the first, which ends the stream under the forwarder's writes. Each
/// still expires at its TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_refused_while_their_sender_still_writes_expire_at_their_ttl() {
    let fed = Federation::standard();
    let health_node = fed
        .start_with({
            let mut c = fed.config("health");
            c.limits.max_queued_bytes = 64 * 1024;
            c
        })
        .await;
    let proxy = LinkProxy::start(fed.addrs["health"].peer).await;
    let mut config = fed.config("finance");
    for p in &mut config.peers {
        if p.agency == "health" {
            p.addr = proxy.addr.to_string();
        }
    }
    config.limits.batch_size = 1;
    config.limits.transfer_window = 64;
    config.limits.retry_max_ms = 300;
    config.limits.sweep_interval_ms = 100;
    let finance_node = fed.start_with(config).await;
    let finance = fed.app("finance").await;
    fill_health(&finance).await;
    proxy.set(LinkMode::Cut);
    let late = notices_with_ttl(&finance, 100, 8).await;
    proxy.set(LinkMode::Up);
    for id in &late {
        until_state(&finance, id, wire::MessageState::Expired, 20).await;
    }
    finance_node.stop().await.unwrap();
    health_node.stop().await.unwrap();
}

/// What waits to go to a peer does not count against taking that peer's
/// envelopes: two nodes full of work for each other never refuse each
/// other for good. Health holds 150 KiB for finance, over its ceiling of
/// 128 KiB, with its link to finance cut; finance's envelopes still land
/// (what waits for the sender counts up to the quota, 64 KiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_waiting_for_a_peer_does_not_make_its_envelopes_refused() {
    let fed = Federation::standard();
    let finance_node = fed.start("finance").await;
    let proxy = LinkProxy::start(fed.addrs["finance"].peer).await;
    proxy.set(LinkMode::Cut);
    let mut config = fed.config("health");
    config.limits.max_queued_bytes = 64 * 1024;
    for p in &mut config.peers {
        if p.agency == "finance" {
            p.addr = proxy.addr.to_string();
        }
    }
    let health_node = fed.start_with(config).await;
    let health = fed.app("health").await;
    let big = send(&health, notice("finance", "tax.notice", &vec![7; 150 * 1024])).await;
    let queued = get(&scrape(&fed, "health").await, "antar_queued_bytes");
    assert!(queued > (150 * 1024) as f64, "{queued}");

    let finance = fed.app("finance").await;
    let mut sent = Vec::new();
    for i in 0..5u32 {
        sent.push(send(&finance, notice("health", "tax.notice", &i.to_be_bytes())).await);
    }
    receive_exactly(&health, &sent, 15).await;

    proxy.set(LinkMode::Up);
    let at_finance = receive(&finance, 1, 15, true).await;
    assert_eq!(envelope_of(&at_finance[0]).id, big);
    health_node.stop().await.unwrap();
    finance_node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_asking_for_witnesses_in_a_flood_is_limited_like_its_transfers() {
    let fed = Federation::standard();
    let mut config = fed.config("health");
    // 1,024 items a second: four Witness calls (256 items each).
    config.limits.peer_items_per_sec = 1024;
    let health = fed.start_with(config).await;
    let mut peer = fed.peer_as("finance", "health").await;
    let (mut answered, mut limited) = (0, 0);
    let started = Instant::now();
    for _ in 0..40 {
        // No checkpoint: answered INVALID_ARGUMENT when let through.
        match peer.witness(wire::WitnessRequest::default()).await.unwrap_err() {
            st if st.code() == Code::InvalidArgument => answered += 1,
            st => {
                assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
                assert!(
                    st.message().contains("limits.peer_items_per_sec = 1024"),
                    "{st:?}"
                );
                limited += 1;
            }
        }
    }
    // The first second's four, and four a second after.
    let refilled = (started.elapsed().as_secs_f64() * 4.0).ceil() as u32;
    assert!(
        (4..=5 + refilled).contains(&answered) && limited > 0,
        "{answered} let through, {limited} limited"
    );
    let m = scrape(&fed, "health").await;
    let series = r#"antar_limited_total{limit="peer_items_per_sec",caller="finance"}"#;
    assert_eq!(get(&m, series), f64::from(limited));
    // Another peer has its own bucket.
    let st = fed
        .peer_as("hub", "health")
        .await
        .witness(wire::WitnessRequest::default())
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    health.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_holds_a_bounded_number_of_receive_streams_each_a_bounded_number_of_bytes() {
    let fed = Federation::standard();
    let mut config = fed.config("health");
    config.limits.max_receive_streams_per_app = 3;
    // No lease runs out while the test looks at what a stream holds.
    config.limits.visibility_timeout_ms = 120_000;
    config.apps.push(antar_node::config::App {
        name: "payroll".into(),
        services: vec!["*".into()],
    });
    let nodes = vec![fed.start_with(config).await, fed.start("finance").await];
    let health = fed.app("health").await;
    let open = |max_in_flight: u32| {
        let health = health.clone();
        async move {
            health
                .agency()
                .receive(wire::ReceiveRequest {
                    services: vec![],
                    max_in_flight,
                })
                .await
        }
    };
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(open(1000).await.unwrap().into_inner());
    }
    let st = open(1000).await.unwrap_err();
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    assert!(
        st.message()
            .contains("holds 3 Receive streams, limits.max_receive_streams_per_app = 3"),
        "{st:?}"
    );
    let m = scrape(&fed, "health").await;
    let series = r#"antar_limited_total{limit="max_receive_streams_per_app",caller="dev"}"#;
    assert_eq!(get(&m, series), 1.0);
    // Another app has its own count.
    let payroll = fed.named_app("health", "payroll").await;
    drop(
        payroll
            .agency()
            .receive(wire::ReceiveRequest::default())
            .await
            .unwrap(),
    );

    // A closed stream gives its place back.
    drop(streams.pop());
    let mut reader = eventually(10, "a stream's place back", || async { open(1000).await.ok() })
        .await
        .into_inner();
    drop(streams);

    // 24 deliveries of 1 MiB, 1,000 allowed in flight: the stream holds
    // 16 MiB of them unacked (15: each is its payload and envelope), the
    // rest go to another reader, and once acked the first takes more.
    let finance = fed.app("finance").await;
    let mut sent = Vec::new();
    for i in 0..24u8 {
        sent.push(send(&finance, notice("health", "tax.notice", &vec![i; 1 << 20])).await);
    }
    let admin = fed.admin("finance").await;
    eventually(30, "all 24 stored at health", || async {
        (backlog(&admin, "health").await == 0).then_some(())
    })
    .await;
    let mut held = Vec::new();
    loop {
        use tokio_stream::StreamExt as _;
        match tokio::time::timeout(Duration::from_secs(3), reader.next()).await {
            Ok(d) => held.push(d.expect("the stream ended").unwrap()),
            Err(_) => break,
        }
    }
    assert_eq!(held.len(), 15, "unacked deliveries one stream held");
    let rest = receive(&payroll, 9, 10, true).await;
    for d in &held {
        health
            .agency()
            .ack(wire::AckRequest {
                message_id: envelope_of(d).id,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let mut got: Vec<String> = held.iter().chain(&rest).map(|d| envelope_of(d).id).collect();
    got.sort();
    sent.sort();
    assert_eq!(got, sent);
    for n in nodes {
        n.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_is_limited_like_the_others_and_ends_silent_scrapes() {
    let fed = Federation::standard();
    let mut config = fed.config("finance");
    config.limits.max_connections_per_ip = 2;
    let node = fed.start_with(config).await;
    let metrics = fed.addrs["finance"].metrics;
    let mut silent = vec![
        connect_from([127, 0, 0, 3], metrics).await,
        connect_from([127, 0, 0, 3], metrics).await,
    ];
    let mut third = connect_from([127, 0, 0, 3], metrics).await;
    assert!(closed_within(&mut third, Duration::from_secs(2)).await);
    // Scrapes from elsewhere are served, and count the refusal.
    let m = scrape(&fed, "finance").await;
    assert_eq!(
        get(&m, r#"antar_connections_refused_total{listener="metrics"}"#),
        1.0
    );
    // A scrape that never asks is closed within 5 s.
    let started = Instant::now();
    for conn in &mut silent {
        assert!(closed_within(conn, Duration::from_secs(8)).await);
    }
    assert!(started.elapsed() < Duration::from_secs(7));
    node.stop().await.unwrap();
}

/// A client that opens a stream and stops reading: its leases run out (1 s)
/// and go to another reader, and the stream holds no more copies in memory
/// than its bound (15 of 1 MiB, and the transport's flow-control window),
/// however often its leases run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_stops_reading_does_not_pile_up_copies() {
    let fed = Federation::standard();
    let nodes = fed
        .start_all_with(&["finance", "health"], |agency, config| {
            if agency == "health" {
                config.limits.visibility_timeout_ms = 1_000;
                config.apps.push(antar_node::config::App {
                    name: "payroll".into(),
                    services: vec!["*".into()],
                });
            }
        })
        .await;
    let health = fed.app("health").await;
    let mut stuck = health
        .agency()
        .receive(wire::ReceiveRequest {
            services: vec![],
            max_in_flight: 1000,
        })
        .await
        .unwrap()
        .into_inner();
    let finance = fed.app("finance").await;
    let mut sent = Vec::new();
    for i in 0..24u8 {
        sent.push(send(&finance, notice("health", "tax.notice", &vec![i; 1 << 20])).await);
    }
    // Several lease timeouts pass while the stuck stream reads nothing.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    // One at a time, so no lease of payroll's runs out before its ack.
    let payroll = fed.named_app("health", "payroll").await;
    let mut got: Vec<String> = receive_at_most(&payroll, sent.len(), 30, true, 1)
        .await
        .iter()
        .map(|d| envelope_of(d).id)
        .collect();
    got.sort();
    sent.sort();
    assert_eq!(got, sent);
    let mut copies = 0;
    loop {
        use tokio_stream::StreamExt as _;
        match tokio::time::timeout(Duration::from_millis(500), stuck.next()).await {
            Ok(Some(d)) => {
                d.unwrap();
                copies += 1;
            }
            _ => break,
        }
    }
    // 15 in the stream's bound, and what HTTP/2 flow control lets the
    // transport hold besides (the client's stream window, 2 MiB here);
    // without the bound, 15 more each time the leases ran out.
    assert!(copies <= 20, "the stuck stream held {copies} deliveries");
    for n in nodes {
        n.stop().await.unwrap();
    }
}

/// One connection holds at most 1,024 streams at once: the node sets
/// HTTP/2's `SETTINGS_MAX_CONCURRENT_STREAMS` on every listener (left
/// unset, tonic switches off hyper's own bound, and a connection could
/// open streams without end). Past it a client's further calls wait for
/// one of its streams to end, while another connection is served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_holds_at_most_1024_streams_and_another_is_served() {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    const LIMIT: usize = 1024;
    const OVER: usize = 40;
    let fed = Federation::standard();
    let node = fed.start("finance").await;
    let app = fed.app("finance").await;
    let asked = || HealthCheckRequest {
        service: "antar.v1.Agency".into(),
    };
    // Streams that stay open (`Health.Watch` answers the status, then
    // waits for a change), all on the app's one connection; each task
    // reports when its stream got its first answer and then holds it.
    let (served, mut answers) = tokio::sync::mpsc::unbounded_channel();
    let holders: Vec<_> = (0..LIMIT + OVER)
        .map(|i| {
            let (mut health, served) = (HealthClient::new(app.channel()), served.clone());
            tokio::spawn(async move {
                let mut stream = health.watch(asked()).await.unwrap().into_inner();
                stream.message().await.unwrap().unwrap();
                served.send(i).unwrap();
                std::future::pending::<()>().await;
            })
        })
        .collect();
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while held.len() < LIMIT {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, answers.recv()).await {
            Ok(Some(i)) => held.push(i),
            _ => panic!("only {} of {LIMIT} streams were answered in 60 s", held.len()),
        }
    }
    // The rest wait: none is answered while the first 1,024 stay open.
    let more = tokio::time::timeout(Duration::from_secs(2), answers.recv()).await;
    assert!(
        more.is_err(),
        "stream {more:?} was answered past {LIMIT} open ones"
    );
    // Another connection, even of the same app, is served meanwhile.
    let other = fed.app("finance").await;
    let status = HealthClient::new(other.channel())
        .check(asked())
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    send(&other, notice("health", "tax.notice", b"served")).await;
    // Streams that end give their places to the waiting ones.
    for i in &held[..OVER] {
        holders[*i].abort();
    }
    for n in 0..OVER {
        let next = tokio::time::timeout(Duration::from_secs(20), answers.recv()).await;
        assert!(
            matches!(next, Ok(Some(_))),
            "{n} of the {OVER} waiting streams were answered once {OVER} ended"
        );
    }
    holders.iter().for_each(tokio::task::JoinHandle::abort);
    node.stop().await.unwrap();
}

/// A connection that keeps making the node reset its streams is closed:
/// past 1,024 streams the node reset for the client's errors, GOAWAY with
/// ENHANCE_YOUR_CALM (hyper's guard of RUSTSEC-2024-0003, which tonic
/// switches off unless it is set). Each stream here is a request without
/// `:scheme` or `:path`, which HTTP/2 calls malformed. Another connection
/// is served afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_keeps_making_the_node_reset_streams_is_closed() {
    use tokio::io::AsyncWriteExt as _;
    const LIMIT: u32 = 1024;
    const BATCH: u32 = 64;
    let fed = Federation::standard();
    let node = fed.start("finance").await;
    let (mut tls, mut frames) = raw_h2(&fed, "finance").await;
    // HEADERS, END_STREAM | END_HEADERS: `:method: POST` alone (HPACK static
    // entry 3), on client stream `n` (odd ids from 1).
    let malformed = |n: u32| frame(HEADERS, 0x1 | 0x4, 2 * n + 1, &[0x80 | 3]);
    // A batch at a time, each reset read before the next batch goes: the
    // node writes its resets once it has read all there is, and until
    // then counts those streams as open, against the stream bound.
    let protocol_error = 1u32.to_be_bytes().to_vec();
    for batch in 0..LIMIT / BATCH {
        let streams = batch * BATCH..(batch + 1) * BATCH;
        tls.write_all(&streams.clone().flat_map(malformed).collect::<Vec<u8>>())
            .await
            .unwrap();
        for n in streams {
            let got = loop {
                let (kind, _, stream, payload) = frames
                    .next(&mut tls)
                    .await
                    .unwrap_or_else(|| panic!("no reset of stream {} in 10 s", 2 * n + 1));
                // Connection-level frames (WINDOW_UPDATE, PING, …) but GOAWAY
                // are not answers.
                if stream != 0 || kind == GOAWAY {
                    break (kind, stream, payload);
                }
            };
            assert_eq!(got, (RST_STREAM, 2 * n + 1, protocol_error.clone()));
        }
    }
    // One reset more is one too many: the node goes away, naming that
    // stream as the last it processed.
    tls.write_all(&malformed(LIMIT)).await.unwrap();
    let goaway = loop {
        match frames.next(&mut tls).await {
            Some((GOAWAY, _, _, payload)) => break Some(payload),
            Some(_) => {}
            None => break None,
        }
    };
    let goaway = goaway.map(|payload| {
        let word = |i: usize| u32::from_be_bytes(payload[i..i + 4].try_into().unwrap());
        (
            word(0),
            word(4),
            String::from_utf8_lossy(&payload[8..]).into_owned(),
        )
    });
    assert_eq!(
        goaway,
        Some((2 * LIMIT + 1, 0xb, "too_many_internal_resets".to_owned())),
        "GOAWAY (last stream, ENHANCE_YOUR_CALM) expected after {LIMIT} resets"
    );
    send(
        &fed.app("finance").await,
        notice("health", "tax.notice", b"served"),
    )
    .await;
    node.stop().await.unwrap();
}

/// An HTTP/2 connection spoken by hand to `agency`'s API listener, as its
/// app `dev`: TLS, the preface, empty SETTINGS, the node's SETTINGS read
/// and acknowledged; and the frames it sends next.
async fn raw_h2(
    fed: &Federation,
    agency: &str,
) -> (tokio_rustls::client::TlsStream<tokio::net::TcpStream>, Frames) {
    use tokio::io::AsyncWriteExt as _;
    use tokio_rustls::rustls::pki_types::ServerName;
    let certs = fed.certs(agency);
    let (cert, key) = certs.client_files(&antar_pki::Role::App("dev".into())).unwrap();
    let config = antar_pki::tls::api_client_config(
        &antar_pki::read_cert_der(&certs.local_ca_cert()).unwrap(),
        antar_pki::read_certs_der(&cert).unwrap(),
        antar_pki::read_key_der(&key).unwrap(),
    )
    .unwrap();
    let addr = fed.addrs[agency].api;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .unwrap();
    let mut frames = Frames::default();
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    tls.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    loop {
        let (kind, flags, ..) = frames.next(&mut tls).await.expect("no SETTINGS from the node");
        if kind == SETTINGS && flags & ACK == 0 {
            break;
        }
    }
    tls.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
    (tls, frames)
}

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;

/// An HTTP/2 frame: length, type, flags, stream, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = len[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// Frames read off a connection, each at most 10 s apart.
#[derive(Default)]
struct Frames {
    buf: Vec<u8>,
}

impl Frames {
    /// The next frame (type, flags, stream, payload); `None` once the
    /// connection ends, fails or says nothing for 10 s, alike (a caller
    /// that must tell them apart times the call).
    async fn next(
        &mut self,
        conn: &mut (impl tokio::io::AsyncRead + Unpin),
    ) -> Option<(u8, u8, u32, Vec<u8>)> {
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let head: Vec<u8> = self.buf.drain(..9).collect();
                    let payload = self.buf.drain(..len).collect();
                    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    return Some((head[3], head[4], stream, payload));
                }
            }
            let mut chunk = [0u8; 16 << 10];
            match tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }
}

/// A client or peer that vanished without closing (its connection open,
/// nothing answering) is found by the node's HTTP/2 keepalive: a PING
/// after `limits.keepalive_interval_ms` of silence, and the connection
/// closed once `limits.keepalive_timeout_ms` passes without the answer,
/// which frees its slot of `limits.max_connections`. A client that
/// answers, as every HTTP/2 client does, keeps its idle connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_stops_answering_pings_is_closed() {
    let fed = Federation::standard();
    let mut config = fed.config("finance");
    // A short interval; a timeout long enough for the app's idle
    // connection, pinged every 300 ms, to answer on a loaded host.
    config.limits.keepalive_interval_ms = 300;
    config.limits.keepalive_timeout_ms = 2_000;
    let node = fed.start_with(config).await;
    let app = fed.app("finance").await;
    send(&app, notice("health", "tax.notice", b"before")).await;
    let started = Instant::now();
    let (mut silent, mut frames) = raw_h2(&fed, "finance").await;
    until_open(&fed, "api", 2.0).await;
    let mut pings = 0;
    while let Some((kind, ..)) = frames.next(&mut silent).await {
        pings += usize::from(kind == PING);
    }
    let closed_after = started.elapsed();
    assert_eq!(pings, 1, "PINGs before the node closed the connection");
    assert!(
        closed_after < Duration::from_secs(8),
        "closed after {closed_after:?}, not within the keepalive's 2.3 s (and slack)"
    );
    until_open(&fed, "api", 1.0).await;
    // The app, idle meanwhile, answered its PINGs and is served as before.
    tokio::time::sleep(Duration::from_secs(1)).await;
    send(&app, notice("health", "tax.notice", b"after")).await;
    node.stop().await.unwrap();
}

/// `THP_enabled` of a process's /proc status: 0 once it has turned
/// transparent huge pages off for itself.
#[cfg(target_os = "linux")]
fn thp_enabled(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix("THP_enabled:"));
    line.expect("no THP_enabled line in /proc/PID/status")
        .trim()
        .to_owned()
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_turns_transparent_huge_pages_off_unless_its_operator_chose() {
    let fed = Federation::standard();
    let node = fed.spawn("finance");
    fed.admin("finance").await;
    assert_eq!(thp_enabled(node.pid()), "0", "the node left huge pages on");
    node.terminate();

    // mimalloc's own variable is the operator's choice, and the node keeps it:
    // here the same setting as this test's process.
    let ours = thp_enabled(std::process::id());
    let node = fed.spawn_env(fed.config("finance"), &[("MIMALLOC_ALLOW_THP", "1")]);
    fed.admin("finance").await;
    assert_eq!(
        thp_enabled(node.pid()),
        ours,
        "MIMALLOC_ALLOW_THP=1 was overridden"
    );
    node.terminate();
}
