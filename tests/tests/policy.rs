//! Which app owns which service, and which agencies may send to which
//! service: deliveries go only to their owner, and an envelope without the
//! access right is rejected at the recipient node with the reason recorded
//! (and signed) back at the sender.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use antar_client::ClientRole;
use antar_node::config::{Access, App};
use antar_tests::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_reach_only_their_owner_and_senders_with_the_right() {
    let fed = Federation::standard();
    let mut registry = fed.config("registry");
    registry.apps = vec![
        App {
            name: "births".into(),
            services: vec!["birth.lookup".into()],
        },
        App {
            name: "dev".into(),
            services: vec!["tax.notice".into()],
        },
    ];
    registry.access = vec![
        Access {
            service: "birth.lookup".into(),
            allow: vec!["health".into()],
        },
        Access {
            service: "tax.notice".into(),
            allow: vec!["*".into()],
        },
    ];
    let mut nodes = vec![fed.start_with(registry).await];
    for a in ["finance", "health", "hub"] {
        nodes.push(fed.start(a).await);
    }
    let finance = fed.app("finance").await;
    let health = fed.app("health").await;

    let refused = send(
        &finance,
        notice("registry", "birth.lookup", b"finance may not ask"),
    )
    .await;
    let allowed = send(&health, notice("registry", "birth.lookup", b"health may ask")).await;
    let taxes = send(&finance, notice("registry", "tax.notice", b"for the dev app")).await;
    let unknown = send(&finance, notice("registry", "no.such.service", b"nobody owns it")).await;

    // The owner of birth.lookup gets exactly the permitted envelope.
    let births = fed.named_app("registry", "births").await;
    let got = receive(&births, 2, 3, true).await;
    assert_eq!(
        got.iter().map(|d| envelope_of(d).id).collect::<Vec<_>>(),
        vec![allowed]
    );
    assert_eq!(got[0].sender_identity, "spiffe://gov.example/agency/health");

    // The dev app owns tax.notice only: it never sees birth.lookup deliveries.
    let dev = fed.app("registry").await;
    let got = receive(&dev, 3, 2, true).await;
    assert_eq!(
        got.iter().map(|d| envelope_of(d).id).collect::<Vec<_>>(),
        vec![taxes]
    );
    let st = dev
        .agency()
        .receive(wire::ReceiveRequest {
            services: vec!["birth.lookup".into()],
            max_in_flight: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    assert!(st.message().contains("birth.lookup"), "{st:?}");

    // The sender learns why, in a receipt signed by registry.
    let verifier = fed.verifier();
    for (id, reason) in [(&refused, "no_access_right"), (&unknown, "unknown_service")] {
        let t = until_state(&finance, id, wire::MessageState::Rejected, 10).await;
        assert_eq!(t.reason, reason);
        let last = verifier
            .verify_receipt(t.receipts.last().unwrap())
            .unwrap()
            .receipt;
        assert_eq!(last.status, wire::ReceiptStatus::Rejected as i32);
        assert_eq!(last.reason, reason);
        assert_eq!(last.issuer, "registry");
    }

    // To registry's own agency, a service no app owns is refused at once,
    // nothing stored ([[access]] is for other agencies' envelopes only).
    let st = dev
        .agency()
        .send(notice("registry", "no.such.service", b"to ourselves"))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound, "{st:?}");
    assert!(
        st.message()
            .contains("service no.such.service: no app of registry owns it"),
        "{st:?}"
    );
    let ours = send(&dev, notice("registry", "tax.notice", b"to ourselves")).await;
    assert_eq!(
        receive(&dev, 1, 5, true)
            .await
            .iter()
            .map(|d| envelope_of(d).id)
            .collect::<Vec<_>>(),
        vec![ours]
    );
    for n in nodes {
        n.stop().await.unwrap();
    }
}

/// A revocation list installed by a reload takes effect for new peer
/// connections without a restart: once finance's list revokes health's node
/// TLS certificate, health — restarted, so it must connect anew — cannot
/// deliver to finance, while finance still delivers through the hub; when a
/// reload removes the list, what health queued arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_revocation_list_refuses_a_revoked_peers_new_connections() {
    let fed = Federation::standard();
    let finance_node = fed.start("finance").await;
    let hub_node = fed.start("hub").await;
    let health_node = fed.start("health").await;
    let (finance, health, hub) = (
        fed.app("finance").await,
        fed.app("health").await,
        fed.app("hub").await,
    );
    send(&health, notice("finance", "tax.notice", b"before")).await;
    assert_eq!(
        receive(&finance, 1, 10, true).await.len(),
        1,
        "delivered before the revocation"
    );

    let tls_cert = antar_pki::read_cert_der(&fed.layout.node_dir("health").tls_cert()).unwrap();
    let serial = antar_pki::serial_of(&tls_cert).unwrap();
    let revoked = antar_pki::layout::revoke(&fed.layout.federation_dir(), &[serial], 30).unwrap();
    let mut config = fed.config("finance");
    config.tls.revocation_list = Some(revoked.crl.clone());
    std::fs::write(fed.layout.config_path("finance"), config.to_toml()).unwrap();
    assert_eq!(
        finance_node.reload().unwrap().revoked_serials,
        1,
        "one serial revoked"
    );

    health_node.stop().await.unwrap();
    let health_node = fed.start("health").await;
    let health = fed.app("health").await;
    let id = send(&health, notice("finance", "tax.notice", b"after")).await;
    assert!(
        receive(&finance, 1, 3, true).await.is_empty(),
        "a revoked peer delivered over a new connection"
    );
    let health_admin = fed.admin("health").await;
    assert_eq!(
        backlog(&health_admin, "finance").await,
        1,
        "still queued at health"
    );
    // Everyone else is still served: finance to the hub.
    send(&finance, notice("hub", "tax.notice", b"to the hub")).await;
    assert_eq!(receive(&hub, 1, 10, true).await.len(), 1);

    // Without the list, health's next attempt gets through.
    std::fs::write(fed.layout.config_path("finance"), fed.config("finance").to_toml()).unwrap();
    assert_eq!(finance_node.reload().unwrap().revoked_serials, 0);
    let got = receive(&finance, 1, 15, true).await;
    assert_eq!(got.len(), 1, "queued delivery after the list was removed");
    assert_eq!(envelope_of(&got[0]).id, id);
    for n in [finance_node, hub_node, health_node] {
        n.stop().await.unwrap();
    }
}

/// An app certificate the agency-local CA revoked (`antar pki revoke
/// --node-dir`, named as `tls.local_revocation_list`) is refused at the
/// API listener's handshake once the node reloads; the agency's other
/// certificates go on working, and a connection already open stays. A
/// list the local CA did not sign is refused at the reload, naming the
/// key, and the node keeps what it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locally_revoked_app_certificate_is_refused_after_a_reload() {
    let fed = Federation::standard();
    let finance_node = fed.start("finance").await;
    let app = fed.app("finance").await;
    send(&app, notice("finance", "tax.notice", b"before")).await;

    let node_dir = fed.layout.node_dir("finance");
    let (app_cert, _) = node_dir
        .client_files(&antar_core::Role::App("dev".into()))
        .unwrap();
    let serial = antar_pki::serial_of(&antar_pki::read_cert_der(&app_cert).unwrap()).unwrap();

    // The federation's CRL is no local list: refused, nothing changes.
    let federation_crl = antar_pki::layout::revoke(&fed.layout.federation_dir(), &[], 30).unwrap();
    let mut config = fed.config("finance");
    config.tls.local_revocation_list = Some(federation_crl.crl);
    std::fs::write(fed.layout.config_path("finance"), config.to_toml()).unwrap();
    let err = finance_node.reload().unwrap_err().to_string();
    assert!(err.contains("tls.local_revocation_list"), "{err}");
    send(
        &fed.app("finance").await,
        notice("finance", "tax.notice", b"still"),
    )
    .await;

    let revoked = antar_pki::layout::revoke_local(&node_dir, &[serial], 30).unwrap();
    assert_eq!(revoked.crl, node_dir.local_crl());
    let mut config = fed.config("finance");
    config.tls.local_revocation_list = Some(revoked.crl);
    std::fs::write(fed.layout.config_path("finance"), config.to_toml()).unwrap();
    let reloaded = finance_node.reload().unwrap();
    assert_eq!((reloaded.revoked_serials, reloaded.local_revoked_serials), (0, 1));

    // A new connection with the revoked certificate fails the handshake.
    let (_, app_creds) =
        antar_client::federation_credentials(&fed.file, "finance", antar_client::ClientRole::App).unwrap();
    let refused = match antar_client::Client::connect(&fed.addrs["finance"].api.to_string(), &app_creds).await
    {
        Err(_) => true,
        Ok(fresh) => fresh
            .agency()
            .track(wire::TrackRequest {
                message_id: "x".into(),
            })
            .await
            .is_err_and(|st| !matches!(st.code(), tonic::Code::InvalidArgument | tonic::Code::NotFound)),
    };
    assert!(refused, "a revoked app certificate was served");
    // The admin certificate, from the same CA, is served; the connection
    // opened before the revocation too.
    let admin = fed.admin("finance").await;
    admin
        .admin()
        .status(wire::StatusRequest {})
        .await
        .expect("the admin certificate is not revoked");
    send(&app, notice("finance", "tax.notice", b"on the open connection")).await;
    finance_node.stop().await.unwrap();
}

/// A receipt with no route back to its sender is not dropped: registry,
/// with no route to finance, delivers finance's envelope and keeps its
/// DELIVERED and PROCESSED receipts queued under finance's name; once a
/// reload gives it a route, they reach finance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_with_no_route_back_waits_for_one() {
    let fed = Federation::standard();
    let nodes = fed
        .start_all_with(&["finance", "hub", "registry"], |agency, c| {
            if agency == "registry" {
                c.default_route = None;
            }
        })
        .await;
    let finance = fed.app("finance").await;
    let id = send(&finance, notice("registry", "birth.notice", b"x")).await;
    assert_eq!(receive(&fed.app("registry").await, 1, 10, true).await.len(), 1);
    let registry = &nodes[2];
    let admin = fed.client("registry", ClientRole::Admin).await;
    let waiting = eventually(10, "both receipts queued under finance", || async {
        let status = admin
            .admin()
            .status(wire::StatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        let queued = status
            .peers
            .iter()
            .find(|p| p.agency == "finance")
            .map_or(0, |p| p.backlog);
        (queued == 2).then_some(queued)
    })
    .await;
    assert_eq!(waiting, 2);
    assert_eq!(
        track(&finance, &id).await.state,
        wire::MessageState::Accepted as i32,
        "nothing has come back yet"
    );
    let mut config = fed.config("registry");
    config.default_route = Some("hub".to_owned());
    fed.reload_with(registry, &config);
    until_state(&finance, &id, wire::MessageState::Processed, 15).await;
    for n in nodes {
        n.stop().await.unwrap();
    }
}
