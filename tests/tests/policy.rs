//! Which app owns which service, and which agencies may send to which
//! service: deliveries go only to their owner, and an envelope without the
//! access right is rejected at the recipient node with the reason recorded
//! (and signed) back at the sender.

#![allow(clippy::unwrap_used, clippy::expect_used)]

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
    for n in nodes {
        n.stop().await.unwrap();
    }
}
