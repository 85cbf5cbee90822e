//! DESIGN.md §9 from the outside: every bad input gets its listed gRPC code
//! (or a TLS failure), nothing is stored for it, and the node keeps serving.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use antar_client::{Client, ClientRole, Credentials};
use antar_tests::*;
use tonic::Code;

async fn raw_send(client: &Client, bytes: Vec<u8>) -> tonic::Status {
    raw_call(client, "/antar.v1.Agency/Send", bytes).await
}

/// `bytes` as the message of the unary method `path`; its refusal.
async fn raw_call(client: &Client, path: &'static str, bytes: Vec<u8>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(client.channel());
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    grpc.unary(tonic::Request::new(bytes), path, RawCodec)
        .await
        .expect_err("a malformed message must be refused")
}

async fn send_err(client: &Client, req: wire::SendRequest) -> tonic::Status {
    client.agency().send(req).await.expect_err("must be refused")
}

/// `body`, sent as the HTTP/2 body of a `Send` as it is — no gRPC framing
/// added — and the status of the (trailers-only) answer.
async fn raw_body(client: &Client, body: &str) -> tonic::Status {
    use tonic::codegen::{http, Service as _};
    let mut channel = client.channel();
    let request = http::Request::builder()
        .method("POST")
        .uri("/antar.v1.Agency/Send")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(body.to_owned()))
        .unwrap();
    std::future::poll_fn(|cx| channel.poll_ready(cx)).await.unwrap();
    let response = channel.call(request).await.unwrap();
    tonic::Status::from_header_map(response.headers()).expect("an answer with its status in the headers")
}

/// A good send on the same client still works: the node and the connection survive.
async fn still_serving(client: &Client) {
    send(client, notice("health", "tax.notice", b"still here")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_code_and_store_nothing() {
    let fed = Federation::standard();
    let mut config = fed.config("finance");
    config.limits.max_payload_bytes = 64 * 1024;
    let finance = fed.start_with(config).await;
    let app = fed.app("finance").await;
    let admin = fed.admin("finance").await;

    let cases: Vec<(wire::SendRequest, Code, &str)> = vec![
        (notice("atlantis", "tax.notice", b"x"), Code::NotFound, "atlantis"),
        (
            notice("Not An Agency", "tax.notice", b"x"),
            Code::InvalidArgument,
            "recipients",
        ),
        (
            notice("health", "no spaces allowed", b"x"),
            Code::InvalidArgument,
            "service",
        ),
        (
            notice("health", "tax.notice", &vec![7; 64 * 1024 + 1]),
            Code::InvalidArgument,
            "max_payload_bytes = 65536",
        ),
        (
            wire::SendRequest {
                kind: wire::Kind::Unspecified as i32,
                ..notice("health", "tax.notice", b"x")
            },
            Code::InvalidArgument,
            "kind",
        ),
        (
            wire::SendRequest {
                kind: wire::Kind::Transaction as i32,
                ..notice("health", "tax.notice", b"x")
            },
            Code::InvalidArgument,
            "idempotency_key",
        ),
        (
            wire::SendRequest {
                recipients: vec![],
                ..notice("health", "tax.notice", b"x")
            },
            Code::InvalidArgument,
            "recipients",
        ),
        (
            wire::SendRequest {
                recipients: vec!["health".into(), "registry".into(), "health".into()],
                ..notice("health", "tax.notice", b"x")
            },
            Code::InvalidArgument,
            "recipients: health is listed twice (recipients[2])",
        ),
        (
            wire::SendRequest {
                recipients: (0..65).map(|i| format!("agency-{i}")).collect(),
                ..notice("health", "tax.notice", b"x")
            },
            Code::InvalidArgument,
            "recipients: 65 listed, at most 64 a Send",
        ),
    ];
    for (req, code, names) in cases {
        let st = send_err(&app, req).await;
        assert_eq!(st.code(), code, "{st:?}");
        assert!(
            st.message().contains(names),
            "{:?} should name {names}",
            st.message()
        );
        // Nothing was queued for any of them (health is not running).
        assert_eq!(backlog(&admin, "health").await, 0);
        assert_eq!(backlog(&admin, "hub").await, 0);
    }

    // Bytes that are not a SendRequest: INVALID_ARGUMENT, and the same connection serves on.
    let st = raw_send(&app, vec![0x0a, 0xff, 0xff, 0xff]).await;
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("malformed"), "{st:?}");
    still_serving(&app).await;
    // The same to the health service beside it (tonic's stock codec).
    let st = raw_call(&app, "/grpc.health.v1.Health/Check", vec![0x0a, 0xff, 0xff, 0xff]).await;
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("decode"), "{st:?}");
    still_serving(&app).await;

    // A frame far over the payload limit: INVALID_ARGUMENT naming the limit, connection survives.
    let st = raw_send(&app, vec![0u8; 3 << 20]).await;
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("limit"), "{st:?}");
    still_serving(&app).await;

    // gRPC framing that cannot be read — a message cut short, none at all,
    // a compressed-flag of 2, one of 1 with no grpc-encoding — is
    // INVALID_ARGUMENT as well, saying what was wrong; the node serves on.
    let framings = [
        ("\0\0\0\0\x0a\x0a\x01", "EOF"),
        ("", "Missing request message"),
        ("\x02\0\0\0\x01\x0a", "compression flag"),
        ("\x01\0\0\0\x01\x0a", "compressed-flag"),
    ];
    for (body, says) in framings {
        let st = raw_body(&app, body).await;
        assert_eq!(st.code(), Code::InvalidArgument, "{body:?}: {st:?}");
        assert!(st.message().contains(says), "{body:?}: {st:?}");
        still_serving(&app).await;
    }
    assert_eq!(
        backlog(&admin, "health").await,
        7,
        "exactly the good sends are queued"
    );
    finance.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_certificates_fail_the_handshake() {
    let fed = Federation::standard();
    let other = Federation::standard();
    let finance = fed.start("finance").await;
    let addrs = fed.addrs["finance"];
    let root_der = antar_pki::read_cert_der(&fed.file.root_ca).unwrap();
    let certs = fed.certs("finance");
    let (_, app_creds) = antar_client::federation_credentials(&fed.file, "finance", ClientRole::App).unwrap();
    let (app_cert, app_key) = certs.client_files(&antar_core::Role::App("dev".into())).unwrap();

    // An app certificate (local CA) on the peer port.
    let app_on_peer = Credentials::from_der(
        root_der.clone(),
        antar_pki::read_certs_der(&app_cert).unwrap(),
        antar_pki::read_key_der(&app_key).unwrap(),
    );
    refused(addrs.peer, app_on_peer, "app certificate on the peer port").await;

    // A node certificate (federation root) on the API port.
    let node_on_api = Credentials::load(&certs.local_ca_cert(), &certs.tls_cert(), &certs.tls_key()).unwrap();
    refused(addrs.api, node_on_api, "node certificate on the API port").await;

    // An app certificate of the same name from another federation's CA.
    let foreign = Credentials::from_der(
        antar_pki::read_cert_der(&certs.local_ca_cert()).unwrap(),
        foreign_chain(&other),
        foreign_key(&other),
    );
    refused(addrs.api, foreign, "certificate from another CA").await;

    // The node keeps serving the right certificate.
    let app = Client::connect(&addrs.api.to_string(), &app_creds).await.unwrap();
    let st = app
        .agency()
        .track(wire::TrackRequest {
            message_id: "0190a0a0-0000-7000-8000-000000000000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
    finance.stop().await.unwrap();
}

/// Asserts that `creds` cannot reach any service at `addr`: the handshake
/// (or the first request on it) fails.
async fn refused(addr: std::net::SocketAddr, creds: Credentials, what: &str) {
    let Ok(client) = Client::connect(&addr.to_string(), &creds).await else {
        return;
    };
    // TLS 1.3 reports a refused client certificate on first use.
    let reached = match client
        .agency()
        .track(wire::TrackRequest {
            message_id: "0190a0a0-0000-7000-8000-000000000000".into(),
        })
        .await
    {
        Ok(_) => true,
        Err(st) => matches!(st.code(), Code::NotFound | Code::Unimplemented),
    };
    assert!(!reached, "{what} must be refused");
}

fn foreign_chain(fed: &Federation) -> Vec<Vec<u8>> {
    let (cert, _) = fed
        .certs("finance")
        .client_files(&antar_core::Role::App("dev".into()))
        .unwrap();
    antar_pki::read_certs_der(&cert).unwrap()
}

fn foreign_key(fed: &Federation) -> Vec<u8> {
    let (_, key) = fed
        .certs("finance")
        .client_files(&antar_core::Role::App("dev".into()))
        .unwrap();
    antar_pki::read_key_der(&key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_refuses_new_sends_and_keeps_accepted_work() {
    let fed = Federation::standard();
    let mut config = fed.config("finance");
    config.limits.max_queued_bytes = 256 * 1024;
    let finance = fed.start_with(config).await;
    let app = fed.app("finance").await;

    let mut accepted = Vec::new();
    let mut refusal = None;
    for i in 0..200u32 {
        let mut body = vec![0u8; 16 * 1024];
        body[..4].copy_from_slice(&i.to_be_bytes());
        match app.agency().send(notice("health", "tax.notice", &body)).await {
            Ok(r) => accepted.push(r.into_inner().message_ids.remove(0)),
            Err(st) => {
                refusal = Some(st);
                break;
            }
        }
    }
    let st = refusal.expect("a 256 KiB quota must fill within 200 sends of 16 KiB");
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    assert!(st.message().contains("max_queued_bytes"), "{st:?}");
    assert!(accepted.len() >= 10, "only {} sends fit", accepted.len());
    let m = scrape(&fed, "finance").await;
    let series = r#"antar_limited_total{limit="max_queued_bytes",caller="dev"}"#;
    assert_eq!(get(&m, series), 1.0);

    // Every accepted envelope is still delivered once health comes up.
    let health = fed.start("health").await;
    let health_app = fed.app("health").await;
    let got = receive(&health_app, accepted.len(), 30, true).await;
    let mut got: Vec<String> = got.iter().map(|d| envelope_of(d).id).collect();
    got.sort();
    accepted.sort();
    assert_eq!(got, accepted);
    // And once the queue drains, sends are accepted again.
    eventually(10, "quota freed", || async {
        app.agency()
            .send(notice("health", "tax.notice", b"room again"))
            .await
            .ok()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    health.stop().await.unwrap();
    finance.stop().await.unwrap();
}

/// With the default limits, the largest payload the node takes, sent with
/// the most header bytes it takes, reaches an app whose client keeps
/// gRPC's stock 4 MiB receive limit; one byte more of either is
/// INVALID_ARGUMENT naming what is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_send_by_default_reaches_a_stock_client() {
    use antar_client::wire::agency_client::AgencyClient;
    use antar_node::config::{DEFAULT_MAX_PAYLOAD_BYTES, MAX_HEADERS, MAX_HEADER_BYTES};
    use prost::Message as _;
    use tokio_stream::StreamExt as _;
    let fed = Federation::standard();
    let nodes = fed.start_all_with(&["finance", "health"], |_, _| {}).await;
    let finance = fed.app("finance").await;
    let max = usize::try_from(DEFAULT_MAX_PAYLOAD_BYTES).unwrap();
    // The most headers, MAX_HEADER_BYTES in all, and the longest content type.
    let name = |i: usize| format!("h{i:02}");
    let value = |i: usize| "v".repeat(MAX_HEADER_BYTES / MAX_HEADERS - name(i).len());
    let largest = wire::SendRequest {
        headers: (0..MAX_HEADERS).map(|i| (name(i), value(i))).collect(),
        content_type: "t".repeat(256),
        payload: vec![7u8; max].into(),
        ..notice("health", "tax.notice", b"")
    };
    assert_eq!(
        largest
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>(),
        MAX_HEADER_BYTES
    );

    let mut over = largest.clone();
    over.payload = vec![7u8; max + 1].into();
    let st = send_err(&finance, over).await;
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("max_payload_bytes"), "{st:?}");
    // Past what the node reads at all (the limit plus 1 MiB): refused
    // before it is read, naming the limit all the same.
    let mut far = largest.clone();
    far.payload = vec![7u8; max + (1 << 20)].into();
    let st = send_err(&finance, far).await;
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(
        st.message()
            .starts_with(&format!("payload: the request is over max_payload_bytes = {max}")),
        "{st:?}"
    );
    let mut over = largest.clone();
    over.headers.insert(name(0), value(0) + "v");
    let st = send_err(&finance, over).await;
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("headers"), "{st:?}");
    let mut over = largest.clone();
    over.headers.remove(&name(0));
    over.headers.insert("a".into(), String::new());
    over.headers.insert("b".into(), String::new());
    let st = send_err(&finance, over).await;
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("at most 64"), "{st:?}");
    let mut over = largest.clone();
    over.content_type.push('t');
    let st = send_err(&finance, over).await;
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("content_type"), "{st:?}");

    let id = send(&finance, largest).await;
    let mut stock = AgencyClient::new(fed.app("health").await.channel());
    let mut stream = stock
        .receive(wire::ReceiveRequest {
            services: vec![],
            max_in_flight: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let d = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("the delivery arrives")
        .expect("the stream is open")
        .expect("a stock client takes it");
    assert_eq!(envelope_of(&d).id, id);
    assert!(d.encoded_len() <= 4 << 20, "{} bytes", d.encoded_len());
    assert_eq!(d.payload.unwrap().data.len(), max);
    for n in nodes {
        n.stop().await.unwrap();
    }
}

/// `id` tracked by `app` once `issuer`'s signed REJECTED receipt is in.
async fn rejected_by(fed: &Federation, app: &Client, id: &str, issuer: &str) -> wire::TrackResponse {
    let rejected = (wire::ReceiptStatus::Rejected as i32, issuer.to_owned());
    eventually(30, &format!("{issuer}'s signed REJECTED receipt"), || async {
        let t = track(app, id).await;
        verified_statuses(fed, &t).contains(&rejected).then_some(t)
    })
    .await
}

/// An envelope over the recipient node's own limits — here a sender whose
/// `max_payload_bytes` is higher — is refused `too_large` with a signed
/// REJECTED receipt, not put in an inbox a stock client could not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_over_the_recipients_limits_is_rejected_too_large() {
    let fed = Federation::standard();
    let nodes = fed
        .start_all_with(&["finance", "health"], |agency, config| {
            if agency == "finance" {
                config.limits.max_payload_bytes = 8 << 20;
            }
        })
        .await;
    let finance = fed.app("finance").await;
    let id = send(
        &finance,
        wire::SendRequest {
            payload: vec![1u8; 5 << 20].into(),
            ..notice("health", "tax.notice", b"")
        },
    )
    .await;
    // The custody ack marks it REJECTED at once; health's signed receipt
    // follows on its own transfer.
    let t = rejected_by(&fed, &finance, &id, "health").await;
    assert_eq!(t.state, wire::MessageState::Rejected as i32);
    assert_eq!(t.reason, "too_large");
    assert!(receive(&fed.app("health").await, 1, 1, false).await.is_empty());
    for n in nodes {
        n.stop().await.unwrap();
    }
}

/// A relay carries nothing over its own limits: the hub, whose
/// `max_payload_bytes` is lower than finance's, refuses finance's envelope
/// to registry `too_large` with its signed REJECTED receipt, instead of
/// queueing an item the next hop might never take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_over_a_relays_limits_is_rejected_too_large_by_the_relay() {
    let fed = Federation::standard();
    let nodes = fed
        .start_all_with(&["finance", "hub", "registry"], |agency, config| {
            if agency == "hub" {
                config.limits.max_payload_bytes = 64 << 10;
            }
        })
        .await;
    let finance = fed.app("finance").await;
    let id = send(
        &finance,
        wire::SendRequest {
            payload: vec![1u8; 128 << 10].into(),
            ..notice("registry", "birth.notice", b"")
        },
    )
    .await;
    let t = rejected_by(&fed, &finance, &id, "hub").await;
    assert_eq!(t.state, wire::MessageState::Rejected as i32);
    assert_eq!(t.reason, "too_large");
    assert!(receive(&fed.app("registry").await, 1, 1, false).await.is_empty());
    // Smaller ones still go through the hub.
    let small = send(&finance, notice("registry", "birth.notice", b"small")).await;
    until_state(&finance, &small, wire::MessageState::Delivered, 30).await;
    for n in nodes {
        n.stop().await.unwrap();
    }
}

/// Size limits and policy are for an envelope the node does not hold: one
/// it took before its limits were lowered, or before the sender lost its
/// access right, offered again (its sender never saw the ack), is
/// `DUPLICATE`, not `too_large` or `no_access_right`, and stays delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_held_before_the_limits_or_policy_changed_is_a_duplicate() {
    let fed = Federation::standard();
    let finance_node = fed.start("finance").await;
    let health_node = fed.start("health").await;
    let finance = fed.app("finance").await;
    let id = send(
        &finance,
        wire::SendRequest {
            payload: vec![2u8; 2 << 20].into(),
            ..notice("health", "tax.notice", b"")
        },
    )
    .await;
    until_state(&finance, &id, wire::MessageState::Delivered, 15).await;
    let got = receive(&fed.app("health").await, 1, 5, false).await;
    assert_eq!(envelope_of(&got[0]).id, id);
    health_node.stop().await.unwrap();
    finance_node.stop().await.unwrap();

    let again = wire::TransferItem {
        seq: 3,
        item: Some(wire::transfer_item::Item::Envelope(wire::EnvelopeTransfer {
            envelope: got[0].envelope.clone(),
            payload: got[0].payload.clone(),
            hops: vec!["finance".into()],
            traceparent: String::new(),
        })),
    };
    let lowered = |config: &mut antar_node::NodeConfig| config.limits.max_payload_bytes = 1 << 20;
    let no_finance = |config: &mut antar_node::NodeConfig| {
        config.access = vec![antar_node::config::Access {
            service: "*".into(),
            allow: vec!["registry".into()],
        }]
    };
    for change in [&lowered as &dyn Fn(&mut antar_node::NodeConfig), &no_finance] {
        let mut config = fed.config("health");
        change(&mut config);
        let health_node = fed.start_with(config).await;
        let ack = transfer(&mut fed.peer_as("finance", "health").await, vec![again.clone()]).await;
        assert_eq!(
            (ack.acks[0].seq, ack.acks[0].status(), ack.acks[0].reason.as_str()),
            (3, wire::CustodyStatus::Duplicate, "")
        );
        health_node.stop().await.unwrap();
    }
    let health_node = fed.start("health").await;
    // Still in the inbox, once.
    let got = receive(&fed.app("health").await, 2, 3, true).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(envelope_of(&got[0]).id, id);
    health_node.stop().await.unwrap();
}
