//! What an operator's Prometheus sees after traffic: counters, queue and
//! inbox depths, rejections by reason, latency histograms, store size.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use antar_node::config::Access;
use antar_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_traffic_that_happened() {
    let fed = Federation::standard();
    let mut health_config = fed.config("health");
    health_config.access = vec![Access {
        service: "tax.notice".into(),
        allow: vec!["finance".into()],
    }];
    let health_node = fed.start_with(health_config).await;
    let finance_node = fed.start("finance").await; // hub stays down
    let finance = fed.app("finance").await;
    for i in 0..6u8 {
        send(&finance, notice("health", "tax.notice", &[i])).await;
    }
    send(&finance, notice("health", "secret.register", b"no right")).await;
    send(&finance, notice("registry", "birth.lookup", b"waits for the hub")).await;
    let health = fed.app("health").await;
    assert_eq!(receive(&health, 5, 10, true).await.len(), 5);
    // The sixth is delivered and left unacked.
    assert_eq!(receive(&health, 1, 10, false).await.len(), 1);

    let f = eventually(10, "finance's receipts settle", || async {
        let m = scrape(&fed, "finance").await;
        (m.get("antar_outbox_depth{peer=\"health\"}")
            .copied()
            .unwrap_or(0.0)
            == 0.0
            && get(&m, "antar_transfer_retries_total") >= 1.0)
            .then_some(m)
    })
    .await;
    assert_eq!(get(&f, "antar_sent_total"), 8.0);
    assert_eq!(get(&f, "antar_send_duration_seconds_count"), 8.0);
    assert_eq!(get(&f, "antar_send_duration_seconds_bucket{le=\"+Inf\"}"), 8.0);
    assert!(get(&f, "antar_send_duration_seconds_sum") > 0.0);
    assert!(get(&f, "antar_transfer_duration_seconds_count") >= 1.0);
    assert_eq!(
        get(&f, "antar_outbox_depth{peer=\"hub\"}"),
        1.0,
        "the registry envelope waits for the hub"
    );
    assert!(get(&f, "antar_store_bytes") > 0.0);
    // Every accepted send waited for a journal sync; a group may hold several.
    let syncs = get(&f, "antar_journal_sync_duration_seconds_count");
    assert!((1.0..=1000.0).contains(&syncs), "{syncs}");
    assert_eq!(
        get(&f, "antar_journal_sync_duration_seconds_bucket{le=\"+Inf\"}"),
        syncs
    );
    assert!(get(&f, "antar_journal_sync_duration_seconds_sum") > 0.0);
    // Eight sends fill no 32 MiB segment: no checkpoint yet, but the
    // histogram is there for a scraper to find.
    assert_eq!(get(&f, "antar_journal_checkpoint_duration_seconds_count"), 0.0);
    assert!(get(&f, "antar_queued_bytes") > 0.0);

    let h = scrape(&fed, "health").await;
    assert_eq!(get(&h, "antar_delivered_total"), 6.0);
    assert_eq!(get(&h, "antar_processed_total"), 5.0);
    assert_eq!(get(&h, "antar_rejected_total{reason=\"no_access_right\"}"), 1.0);
    assert_eq!(get(&h, "antar_inbox_depth{service=\"tax.notice\"}"), 1.0);
    assert_eq!(get(&h, "antar_delivery_latency_seconds_count"), 6.0);
    assert_eq!(get(&h, "antar_dead_letters"), 0.0);
    for n in [finance_node, health_node] {
        n.stop().await.unwrap();
    }
}

/// Server reflection answers in both versions clients speak — v1, and
/// v1alpha, all that Python's grpcio-reflection and grpcurl before 1.8.8
/// ask — and lists every service, so other stacks need only the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_every_service_in_v1_and_v1alpha() {
    use tokio_stream::StreamExt as _;
    let fed = Federation::standard();
    let node = fed.start("finance").await;
    let app = fed.app("finance").await;
    macro_rules! services {
        ($version:ident) => {{
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            use tonic_reflection::pb::$version::ServerReflectionRequest;
            let ask = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut answers = ServerReflectionClient::new(app.channel())
                .server_reflection_info(tokio_stream::iter([ask]))
                .await
                .unwrap()
                .into_inner();
            match answers.next().await.unwrap().unwrap().message_response {
                Some(MessageResponse::ListServicesResponse(list)) => {
                    list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
                }
                other => panic!("not a list of services: {other:?}"),
            }
        }};
    }
    for (version, names) in [("v1", services!(v1)), ("v1alpha", services!(v1alpha))] {
        for service in [
            "antar.v1.Agency",
            "antar.v1.Admin",
            "antar.v1.Audit",
            "antar.v1.Peer",
            "grpc.health.v1.Health",
        ] {
            assert!(
                names.iter().any(|n| n == service),
                "{version}: {service} not in {names:?}"
            );
        }
    }
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_refuses_sends_and_turns_health_to_not_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let fed = Federation::standard();
    let node = fed.start("finance").await;
    let app = fed.app("finance").await;
    let admin = fed.admin("finance").await;
    let health = || async {
        HealthClient::new(app.channel())
            .check(HealthCheckRequest {
                service: "antar.v1.Agency".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
    };
    assert_eq!(health().await, ServingStatus::Serving as i32);
    let drain = |on: bool| {
        let admin = admin.clone();
        async move {
            admin
                .admin()
                .drain(wire::DrainRequest { drain: on })
                .await
                .unwrap();
        }
    };
    drain(true).await;
    assert_eq!(health().await, ServingStatus::NotServing as i32);
    let st = app
        .agency()
        .send(notice("health", "tax.notice", b"x"))
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::Unavailable, "{st:?}");
    assert!(st.message().contains("draining"), "{st:?}");
    drain(false).await;
    assert_eq!(health().await, ServingStatus::Serving as i32);
    send(&app, notice("health", "tax.notice", b"accepted again")).await;
    node.stop().await.unwrap();
}
