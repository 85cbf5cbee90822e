//! A hostile peer with a valid node certificate: it takes custody of
//! finance's envelopes, then hands registry tampered ones. Registry refuses
//! each with its reason, the signed REJECTED receipt travels back to
//! finance, and registry's app never sees a tampered envelope.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::pin::Pin;
use std::time::Duration;

use antar_tests::wire::peer_server::{Peer, PeerServer};
use antar_tests::wire::{
    transfer_item, CustodyStatus, EnvelopeTransfer, ItemAck, TransferAck, TransferBatch, TransferItem,
};
use antar_tests::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

/// Stands in for the hub: acknowledges every envelope as STORED and keeps it.
struct Capture(mpsc::UnboundedSender<EnvelopeTransfer>);

#[tonic::async_trait]
impl Peer for Capture {
    type TransferStream = Pin<Box<dyn Stream<Item = Result<TransferAck, Status>> + Send>>;

    /// The hostile hub witnesses nothing.
    async fn witness(
        &self,
        _: Request<wire::WitnessRequest>,
    ) -> Result<Response<wire::WitnessResponse>, Status> {
        Err(Status::unimplemented("not a witness"))
    }

    async fn transfer(
        &self,
        req: Request<Streaming<TransferBatch>>,
    ) -> Result<Response<Self::TransferStream>, Status> {
        let mut inbound = req.into_inner();
        let (acks, rx) = mpsc::channel(16);
        let captured = self.0.clone();
        tokio::spawn(async move {
            while let Some(Ok(batch)) = inbound.next().await {
                let mut out = Vec::new();
                for item in batch.items {
                    if let Some(transfer_item::Item::Envelope(e)) = item.item {
                        let _ = captured.send(e);
                    }
                    out.push(ItemAck {
                        seq: item.seq,
                        status: CustodyStatus::Stored as i32,
                        reason: String::new(),
                    });
                }
                if acks.send(Ok(TransferAck { acks: out })).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_envelopes_are_rejected_with_their_reason_back_to_the_sender() {
    let fed = Federation::standard();
    let hub_certs = fed.certs("hub");
    let finance_node = fed.start("finance").await;
    let registry_node = fed.start("registry").await;

    // 1. The hostile hub takes custody of five genuine envelopes from finance.
    let (captured_tx, mut captured) = mpsc::unbounded_channel();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            std::fs::read(hub_certs.tls_cert()).unwrap(),
            std::fs::read(hub_certs.tls_key()).unwrap(),
        ))
        .client_ca_root(Certificate::from_pem(
            std::fs::read(hub_certs.federation_root()).unwrap(),
        ));
    let listener = tokio::net::TcpListener::bind(fed.addrs["hub"].peer)
        .await
        .unwrap();
    let fake = tokio::spawn(
        Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(PeerServer::new(Capture(captured_tx)))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let finance = fed.app("finance").await;
    let mut ids = Vec::new();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    for body in [
        b"altered payload".as_slice(),
        b"altered salt",
        b"re-signed by hub",
        b"altered header bytes",
        b"altered signature",
    ] {
        // The app's W3C trace context travels with the envelope to the next hop.
        let mut req = tonic::Request::new(notice("registry", "birth.lookup", body));
        req.metadata_mut().insert(
            "traceparent",
            format!("00-{trace}-00f067aa0ba902b7-01").parse().unwrap(),
        );
        ids.push(
            finance
                .agency()
                .send(req)
                .await
                .unwrap()
                .into_inner()
                .message_ids
                .remove(0),
        );
    }
    let mut envelopes = Vec::new();
    while envelopes.len() < ids.len() {
        let e = tokio::time::timeout(Duration::from_secs(10), captured.recv())
            .await
            .expect("finance never transferred to the hub")
            .unwrap();
        assert_eq!(&e.traceparent[3..35], trace, "{}", e.traceparent);
        envelopes.push(e);
    }
    // Dropping the server frees the hub's port; finance's open connection
    // to it is never used again once finance holds no more for the hub.
    fake.abort();
    let _ = fake.await;

    // 2. The real hub comes up (to carry receipts back); the hostile one
    //    uses the hub's certificate to hand registry tampered versions.
    let hub_node = fed.start("hub").await;
    envelopes.sort_by_key(|e| ids.iter().position(|id| *id == envelope_id(e)).unwrap());
    let [mut payload_altered, mut salt_altered, mut resigned, mut bytes_altered, mut sig_altered] =
        <[EnvelopeTransfer; 5]>::try_from(envelopes).unwrap();

    flip(&mut payload_altered.payload.as_mut().unwrap().data, 0, 1);
    flip(&mut salt_altered.payload.as_mut().unwrap().salt, 31, 0x80);
    flip(&mut sig_altered.envelope.as_mut().unwrap().signature, 10, 4);

    let hub_signer = antar_core::Signer::from_pkcs8(
        &antar_pki::read_key_der(&hub_certs.signing_key()).unwrap(),
        antar_pki::read_cert_der(&hub_certs.signing_cert()).unwrap(),
    )
    .unwrap();
    let genuine = resigned.envelope.clone().unwrap();
    resigned.envelope = Some(hub_signer.sign_envelope_bytes(genuine.envelope.to_vec()));

    // An unknown field appended: decodes to the same header, but not the signed bytes.
    let signed = bytes_altered.envelope.as_mut().unwrap();
    signed.envelope = [&signed.envelope[..], &[0x98, 0x06, 0x01]].concat().into();

    let items = [
        payload_altered,
        salt_altered,
        resigned,
        bytes_altered,
        sig_altered,
    ]
    .into_iter()
    .enumerate()
    .map(|(seq, mut e)| {
        e.hops.push("hub".into());
        TransferItem {
            seq: seq as u64,
            item: Some(transfer_item::Item::Envelope(e)),
        }
    })
    .collect();
    let ack = transfer(&mut fed.peer_as("hub", "registry").await, items).await;
    let expected = [
        "payload_digest",
        "salt_digest",
        "wrong_signer",
        "bytes_altered",
        "bad_signature",
    ];
    for (i, reason) in expected.iter().enumerate() {
        let a = &ack.acks[i];
        assert_eq!(a.seq, i as u64);
        assert_eq!(a.status, CustodyStatus::Rejected as i32, "{a:?}");
        assert_eq!(a.reason, *reason);
    }

    // 3. Each reason reaches finance in a REJECTED receipt signed by registry.
    let verifier = fed.verifier();
    for (id, reason) in ids.iter().zip(expected) {
        let t = until_state(&finance, id, wire::MessageState::Rejected, 15).await;
        assert_eq!(t.reason, reason);
        let r = verifier
            .verify_receipt(t.receipts.last().unwrap())
            .unwrap()
            .receipt;
        assert_eq!(
            (r.status, r.issuer.as_str()),
            (wire::ReceiptStatus::Rejected as i32, "registry")
        );
        assert_eq!(r.reason, reason);
    }

    // 4. Registry's app never sees any of them.
    let registry = fed.app("registry").await;
    assert!(receive(&registry, 1, 1, false).await.is_empty());
    for n in [hub_node, registry_node, finance_node] {
        n.stop().await.unwrap();
    }
}

fn envelope_id(e: &EnvelopeTransfer) -> String {
    use prost::Message as _;
    wire::Envelope::decode(e.envelope.as_ref().unwrap().envelope.clone())
        .unwrap()
        .id
}

/// A peer with a valid node certificate cannot take over a message id. At
/// health, an envelope signed by registry's node whose id a message from
/// finance already holds — or a message health sent — is refused
/// `id_conflict`, and the message holding the id stays as it was; the
/// holder's own envelope offered again is `DUPLICATE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_reusing_a_message_id_is_refused_not_overwritten() {
    use antar_core::MessageId;

    let fed = Federation::standard();
    let finance_node = fed.start("finance").await;
    let health_node = fed.start("health").await;
    let (finance, health) = (fed.app("finance").await, fed.app("health").await);
    let genuine = send(&finance, notice("health", "lab.results", b"genuine")).await;
    until_state(&finance, &genuine, wire::MessageState::Delivered, 15).await;
    // Health's own message; finance receives it.
    let own = send(&health, notice("finance", "tax.filing", b"health's own")).await;
    until_state(&health, &own, wire::MessageState::Delivered, 15).await;

    // Registry's node signs envelopes to health with those ids; the hub hands them over.
    let forged = |id: &str| {
        let id = MessageId::parse(id).unwrap();
        signed_to_health(&fed, "registry", wire::Kind::Notice, "", id, &["registry", "hub"])
    };
    let forged: Vec<EnvelopeTransfer> = [&genuine, &own].map(|id| forged(id)).into();
    let items = |round: u64| {
        (0..)
            .zip(&forged)
            .map(|(seq, e)| TransferItem {
                seq: round * 10 + seq,
                item: Some(transfer_item::Item::Envelope(e.clone())),
            })
            .collect()
    };
    // Offered twice: refused each time.
    for round in 0..2 {
        let ack = transfer(&mut fed.peer_as("hub", "health").await, items(round)).await;
        assert_eq!(ack.acks.len(), 2);
        for (seq, a) in (round * 10..).zip(&ack.acks) {
            assert_eq!(
                (a.seq, a.status(), a.reason.as_str()),
                (seq, CustodyStatus::Rejected, "id_conflict")
            );
        }
    }

    // Health's app gets finance's message, once, as finance sent it.
    let got = receive(&health, 2, 3, true).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let (envelope, payload) = (envelope_of(&got[0]), got[0].payload.clone().unwrap());
    assert_eq!(
        (envelope.id.as_str(), envelope.sender.as_str(), &payload.data[..]),
        (genuine.as_str(), "finance", b"genuine".as_slice())
    );
    // Finance's envelope again, from finance: a duplicate, not a second delivery.
    let again = TransferItem {
        seq: 9,
        item: Some(transfer_item::Item::Envelope(EnvelopeTransfer {
            envelope: got[0].envelope.clone(),
            payload: got[0].payload.clone(),
            hops: vec!["finance".into()],
            traceparent: String::new(),
        })),
    };
    let ack = transfer(&mut fed.peer_as("finance", "health").await, vec![again]).await;
    assert_eq!(ack.acks[0].status(), CustodyStatus::Duplicate);
    assert!(receive(&health, 1, 1, false).await.is_empty());
    // Health's own message is still its own.
    let t = track(&health, &own).await;
    let envelope: wire::Envelope =
        prost::Message::decode(t.envelope.as_ref().unwrap().envelope.clone()).unwrap();
    assert_eq!(
        (envelope.sender.as_str(), envelope.recipient.as_str()),
        ("health", "finance")
    );
    assert_eq!(t.state(), wire::MessageState::Delivered);

    // One signed REJECTED receipt for each forged envelope, not one per
    // offer, queued for registry (through the hub, which is down).
    health_node.stop().await.unwrap();
    let refusals = queued_receipts(&fed, "health", "hub");
    assert_eq!(refusals.len(), 2, "{refusals:?}");
    for (r, (f, id)) in refusals.iter().zip(forged.iter().zip([&genuine, &own])) {
        let bytes = &f.envelope.as_ref().unwrap().envelope;
        assert_eq!(
            (
                r.status(),
                r.reason.as_str(),
                r.sender.as_str(),
                r.issuer.as_str(),
                r.message_id.as_str()
            ),
            (
                wire::ReceiptStatus::Rejected,
                "id_conflict",
                "registry",
                "health",
                id.as_str()
            )
        );
        assert_eq!(r.envelope_sha256, &antar_core::envelope::sha256(bytes)[..]);
    }
    finance_node.stop().await.unwrap();
}

/// A TRANSACTION's idempotency key holds at its recipient too (DESIGN §5.3).
/// Finance's node, as if restored from a backup that lost the send, signs
/// the key again under a new id: health answers `DUPLICATE`, naming the
/// message that holds the key, delivers nothing, and sends finance one
/// signed REJECTED `duplicate_transaction` receipt for the new id, however
/// often it is offered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_key_replayed_under_a_new_id_is_a_duplicate_at_the_recipient() {
    let fed = Federation::standard();
    let finance_node = fed.start("finance").await;
    let health_node = fed.start("health").await;
    let (finance, health) = (fed.app("finance").await, fed.app("health").await);
    let original = send(&finance, transaction("health", "lab.results", "pay-7", b"pay 7")).await;
    until_state(&finance, &original, wire::MessageState::Delivered, 15).await;
    // Receipts to finance now wait in health's outbox.
    finance_node.stop().await.unwrap();

    let replay_id = antar_core::MessageId::new();
    let replay = signed_to_health(
        &fed,
        "finance",
        wire::Kind::Transaction,
        "pay-7",
        replay_id,
        &["finance"],
    );
    for seq in [1, 2] {
        let item = TransferItem {
            seq,
            item: Some(transfer_item::Item::Envelope(replay.clone())),
        };
        let ack = transfer(&mut fed.peer_as("finance", "health").await, vec![item]).await;
        assert_eq!(
            (ack.acks[0].seq, ack.acks[0].status(), ack.acks[0].reason.as_str()),
            (
                seq,
                CustodyStatus::Duplicate,
                format!("duplicate_transaction: idempotency key already used by message {original}").as_str()
            )
        );
    }

    // Health's app gets the transaction once: the original.
    let got = receive(&health, 2, 3, false).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(envelope_of(&got[0]).id, original);

    // One signed REJECTED receipt for the new id, queued for finance.
    health_node.stop().await.unwrap();
    let about_replay: Vec<_> = queued_receipts(&fed, "health", "finance")
        .into_iter()
        .filter(|r| r.message_id == replay_id.to_string())
        .collect();
    assert_eq!(about_replay.len(), 1, "{about_replay:?}");
    let r = &about_replay[0];
    assert_eq!(
        (
            r.status(),
            r.reason.as_str(),
            r.sender.as_str(),
            r.issuer.as_str()
        ),
        (
            wire::ReceiptStatus::Rejected,
            "duplicate_transaction",
            "finance",
            "health"
        )
    );
    assert_eq!(r.duplicate_of, original);
    assert_eq!(
        r.envelope_sha256,
        &antar_core::envelope::sha256(&replay.envelope.as_ref().unwrap().envelope)[..]
    );
}

/// An envelope offered again and again is `DUPLICATE` every time, and the
/// receipts health issued about it go back to finance again at most once
/// a minute (a sender restored from a backup learns its message's fate
/// from them): a peer repeating an envelope cannot fill health's outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_offered_over_and_over_sends_its_receipts_again_once() {
    let fed = Federation::standard();
    // Finance's node is not running: what health queues for it stays.
    let health_node = fed.start("health").await;
    let id = antar_core::MessageId::new();
    let envelope = signed_to_health(&fed, "finance", wire::Kind::Notice, "", id, &["finance"]);
    let offer = |seqs: std::ops::Range<u64>| -> Vec<TransferItem> {
        seqs.map(|seq| TransferItem {
            seq,
            item: Some(transfer_item::Item::Envelope(envelope.clone())),
        })
        .collect()
    };
    let ack = transfer(&mut fed.peer_as("finance", "health").await, offer(1..2)).await;
    assert_eq!(ack.acks[0].status(), CustodyStatus::Stored, "{ack:?}");
    for round in 0..3 {
        let seqs = 2 + round * 4..6 + round * 4;
        let ack = transfer(&mut fed.peer_as("finance", "health").await, offer(seqs)).await;
        assert_eq!(ack.acks.len(), 4, "{ack:?}");
        assert!(
            ack.acks.iter().all(|a| a.status() == CustodyStatus::Duplicate),
            "{ack:?}"
        );
    }
    health_node.stop().await.unwrap();
    let about: Vec<_> = queued_receipts(&fed, "health", "finance")
        .into_iter()
        .filter(|r| r.message_id == id.to_string())
        .collect();
    assert_eq!(about.len(), 2, "its DELIVERED receipt and one copy: {about:?}");
    assert_eq!(about[0].status(), wire::ReceiptStatus::Delivered);
    assert_eq!(about[0], about[1]);
}

/// A refusal is for good. An envelope health refused `no_access_right` is
/// refused the same way when offered again after the access right was
/// granted (its sender, holding the REJECTED receipt, never saw the ack):
/// no id ends both REJECTED and DELIVERED, and the receipt goes out once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_envelope_stays_refused_after_the_policy_changes() {
    let fed = Federation::standard();
    let mut config = fed.config("health");
    config.access = vec![antar_node::config::Access {
        service: "*".into(),
        allow: vec!["registry".into()],
    }];
    let health_node = fed.start_with(config).await;
    let id = antar_core::MessageId::new();
    let item = TransferItem {
        seq: 1,
        item: Some(transfer_item::Item::Envelope(signed_to_health(
            &fed,
            "finance",
            wire::Kind::Notice,
            "",
            id,
            &["finance"],
        ))),
    };
    let offer = || async {
        let ack = transfer(&mut fed.peer_as("finance", "health").await, vec![item.clone()]).await;
        (ack.acks[0].status(), ack.acks[0].reason.clone())
    };
    assert_eq!(
        offer().await,
        (CustodyStatus::Rejected, "no_access_right".to_owned())
    );
    health_node.stop().await.unwrap();

    let health_node = fed.start("health").await;
    assert_eq!(
        offer().await,
        (CustodyStatus::Rejected, "no_access_right".to_owned())
    );
    assert!(receive(&fed.app("health").await, 1, 2, false).await.is_empty());
    health_node.stop().await.unwrap();
    let refusals = queued_receipts(&fed, "health", "finance");
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(
        (refusals[0].message_id.clone(), refusals[0].reason.as_str()),
        (id.to_string(), "no_access_right")
    );
}

/// A relay cannot turn a delivered message into a refused one: the hub
/// hands registry an altered copy of an envelope registry already took.
/// Registry refuses it `bytes_altered` and tells finance with a signed
/// receipt, which finance keeps as evidence — but its message stays
/// DELIVERED, since the refusal is about other bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_of_an_altered_copy_does_not_undo_a_delivery() {
    let fed = Federation::standard();
    let nodes = fed
        .start_all_with(&["finance", "registry", "hub"], |_, _| {})
        .await;
    let finance = fed.app("finance").await;
    let id = send(&finance, notice("registry", "birth.lookup", b"genuine")).await;
    until_state(&finance, &id, wire::MessageState::Delivered, 15).await;
    let got = receive(&fed.app("registry").await, 1, 5, false).await;
    let mut altered = got[0].envelope.clone().unwrap();
    altered.envelope = [&altered.envelope[..], &[0x98, 0x06, 0x01]].concat().into();
    let item = TransferItem {
        seq: 1,
        item: Some(transfer_item::Item::Envelope(EnvelopeTransfer {
            envelope: Some(altered),
            payload: got[0].payload.clone(),
            hops: vec!["finance".into(), "hub".into()],
            traceparent: String::new(),
        })),
    };
    let ack = transfer(&mut fed.peer_as("hub", "registry").await, vec![item]).await;
    assert_eq!(
        (ack.acks[0].status(), ack.acks[0].reason.as_str()),
        (CustodyStatus::Rejected, "bytes_altered")
    );
    let verifier = fed.verifier();
    let t = eventually(15, "registry's REJECTED receipt at finance", || async {
        let t = track(&finance, &id).await;
        t.receipts
            .iter()
            .any(|r| {
                verifier.verify_receipt(r).unwrap().receipt.status == wire::ReceiptStatus::Rejected as i32
            })
            .then_some(t)
    })
    .await;
    assert_eq!(
        (t.state(), t.reason.as_str()),
        (wire::MessageState::Delivered, "")
    );
    for n in nodes {
        n.stop().await.unwrap();
    }
}

/// The other order: the hub hands registry a copy with another payload
/// before the genuine envelope, which registry refuses (a signed REJECTED
/// receipt about the genuine header bytes); then the genuine one arrives
/// and is delivered. Whichever receipt reaches finance first, its message
/// ends DELIVERED: the recipient's word that it took the envelope is final.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_refused_before_the_genuine_envelope_arrives_does_not_hide_its_delivery() {
    let fed = Federation::standard();
    let finance_node = fed.start("finance").await;
    let registry_node = fed.start("registry").await;
    let finance = fed.app("finance").await;
    // The hub is down: the genuine envelope waits in finance's outbox.
    let id = send(&finance, notice("registry", "birth.lookup", b"genuine")).await;
    let genuine = track(&finance, &id).await.envelope.unwrap();
    let item = TransferItem {
        seq: 1,
        item: Some(transfer_item::Item::Envelope(EnvelopeTransfer {
            envelope: Some(genuine),
            payload: Some(wire::Payload {
                data: b"forged".to_vec().into(),
                salt: vec![0; 32].into(),
            }),
            hops: vec!["finance".into(), "hub".into()],
            traceparent: String::new(),
        })),
    };
    let ack = transfer(&mut fed.peer_as("hub", "registry").await, vec![item]).await;
    assert_eq!(ack.acks[0].status(), CustodyStatus::Rejected, "{:?}", ack.acks[0]);

    let hub_node = fed.start("hub").await;
    let verifier = fed.verifier();
    let t = eventually(
        20,
        "registry's REJECTED and DELIVERED receipts at finance",
        || async {
            let t = track(&finance, &id).await;
            let statuses: Vec<i32> = t
                .receipts
                .iter()
                .map(|r| verifier.verify_receipt(r).unwrap().receipt.status)
                .collect();
            (statuses.contains(&(wire::ReceiptStatus::Rejected as i32))
                && statuses.contains(&(wire::ReceiptStatus::Delivered as i32)))
            .then_some(t)
        },
    )
    .await;
    assert_eq!(t.state(), wire::MessageState::Delivered);
    let got = receive(&fed.app("registry").await, 2, 3, false).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload.as_ref().unwrap().data, &b"genuine"[..]);
    for n in [hub_node, registry_node, finance_node] {
        n.stop().await.unwrap();
    }
}

/// A relay cannot fake a delivery either: the hub, holding finance's
/// envelope, signs a DELIVERED of its own naming itself the recipient (the
/// issuer its certificate proves). Finance keeps it as evidence, but only
/// the envelope's own recipient, about the envelope's own bytes, can say
/// DELIVERED: the message stays ACCEPTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_receipt_from_anyone_but_the_recipient_changes_nothing() {
    let fed = Federation::standard();
    let finance_node = fed.start("finance").await;
    let finance = fed.app("finance").await;
    // The hub is down: the envelope waits in finance's outbox.
    let id = send(&finance, notice("registry", "birth.lookup", b"genuine")).await;
    let genuine = track(&finance, &id).await.envelope.unwrap();
    let fake = |recipient: &str| wire::Receipt {
        message_id: id.clone(),
        envelope_sha256: antar_core::envelope::sha256(&genuine.envelope).to_vec().into(),
        sender: "finance".into(),
        recipient: recipient.into(),
        status: wire::ReceiptStatus::Delivered as i32,
        at: Some(antar_core::time::to_timestamp(std::time::SystemTime::now())),
        issuer: "hub".into(),
        ..Default::default()
    };
    let items = (1..)
        .zip([fake("hub"), fake("registry")])
        .map(|(seq, r)| TransferItem {
            seq,
            item: Some(transfer_item::Item::Receipt(wire::ReceiptTransfer {
                receipt: Some(fed.signer("hub").sign_receipt(&r)),
                hops: vec!["hub".into()],
            })),
        })
        .collect();
    let ack = transfer(&mut fed.peer_as("hub", "finance").await, items).await;
    assert!(
        ack.acks.iter().all(|a| a.status() == CustodyStatus::Stored),
        "{ack:?}"
    );
    let t = track(&finance, &id).await;
    assert_eq!(t.receipts.len(), 3, "ACCEPTED and the two kept as evidence");
    assert_eq!(t.state(), wire::MessageState::Accepted);
    finance_node.stop().await.unwrap();
}

/// An envelope to health's `lab.results` signed by `sender`'s node, as it
/// would be handed over along `hops`.
fn signed_to_health(
    fed: &Federation,
    sender: &str,
    kind: wire::Kind,
    correlation_id: &str,
    id: antar_core::MessageId,
    hops: &[&str],
) -> EnvelopeTransfer {
    signed_to(fed, (sender, "health"), kind, correlation_id, id, hops)
}

/// An envelope from `sender` to `recipient`'s `lab.results`, signed by the
/// sender's node, as it would be handed over along `hops`.
fn signed_to(
    fed: &Federation,
    (sender, recipient): (&str, &str),
    kind: wire::Kind,
    correlation_id: &str,
    id: antar_core::MessageId,
    hops: &[&str],
) -> EnvelopeTransfer {
    use antar_core::{AgencyId, ServiceName};
    let draft = antar_core::envelope::Draft {
        kind,
        sender: AgencyId::parse(sender).unwrap(),
        recipient: AgencyId::parse(recipient).unwrap(),
        service: ServiceName::parse("lab.results").unwrap(),
        correlation_id: correlation_id.to_owned(),
        created_at: std::time::SystemTime::now(),
        ttl: Duration::from_secs(600),
        headers: Default::default(),
        content_type: String::new(),
    };
    let sealed = draft.seal_with(id, vec![9; 32], b"signed again".to_vec(), &fed.signer(sender));
    EnvelopeTransfer {
        envelope: Some(sealed.envelope),
        payload: Some(sealed.payload),
        hops: hops.iter().map(|h| (*h).to_owned()).collect(),
        traceparent: String::new(),
    }
}

/// The receipts `agency`'s stopped node holds queued for `peer`, verified.
fn queued_receipts(fed: &Federation, agency: &str, peer: &str) -> Vec<wire::Receipt> {
    use prost::Message as _;
    let queued = fed.open_store(agency).outbox_batch(peer, None, 100).unwrap();
    queued
        .iter()
        .map(|(_, item)| {
            let Some(transfer_item::Item::Receipt(r)) = TransferItem::decode(item.as_slice()).unwrap().item
            else {
                panic!("not a receipt");
            };
            fed.verifier()
                .verify_receipt(r.receipt.as_ref().unwrap())
                .unwrap()
                .receipt
        })
        .collect()
}

/// A batch of one NOTICE `id` from finance to registry, handed over along
/// `hops`.
fn notice_to_registry(fed: &Federation, id: antar_core::MessageId, hops: &[&str]) -> Vec<TransferItem> {
    let et = signed_to(fed, ("finance", "registry"), wire::Kind::Notice, "", id, hops);
    vec![TransferItem {
        seq: 1,
        item: Some(transfer_item::Item::Envelope(et)),
    }]
}

/// A peer handing over an envelope this node would relay straight back to
/// it (health reaches registry through the hub): refused `loop`, never
/// queued for the peer that sent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_that_would_go_straight_back_to_its_peer_is_refused_as_a_loop() {
    let fed = Federation::standard();
    let health = fed.start("health").await;
    let mut hub = fed.peer_as("hub", "health").await;
    let items = notice_to_registry(&fed, antar_core::MessageId::new(), &["finance", "hub"]);
    let ack = transfer(&mut hub, items).await;
    assert_eq!(
        (ack.acks[0].status, ack.acks[0].reason.as_str()),
        (wire::CustodyStatus::Rejected as i32, "loop")
    );
    let admin = fed.admin("health").await;
    let queued = peer_status(&admin, "hub").await.map_or(0, |p| p.backlog);
    assert!(
        queued <= 1,
        "only the REJECTED receipt is queued for the hub: {queued}"
    );
    health.stop().await.unwrap();
}

/// An envelope health relayed before, offered again by the peer it came
/// from (its custody ack lost) after a reload turned its route back toward
/// that peer: the answer it had, `DUPLICATE`, not `loop`. A new envelope on
/// that route is a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_relayed_before_is_a_duplicate_after_its_route_turns_back() {
    let fed = Federation::standard();
    let config = fed.config("health");
    let health = fed.start_with(config.clone()).await;
    let mut finance = fed.peer_as("finance", "health").await;
    let to_registry = |id| notice_to_registry(&fed, id, &["finance"]);
    let id = antar_core::MessageId::new();
    let ack = transfer(&mut finance, to_registry(id)).await;
    assert_eq!(ack.acks[0].status, wire::CustodyStatus::Stored as i32, "{ack:?}");

    let mut turned = config;
    turned.routes.insert("registry".into(), "finance".into());
    fed.reload_with(&health, &turned);
    let ack = transfer(&mut finance, to_registry(id)).await;
    assert_eq!(
        (ack.acks[0].status, ack.acks[0].reason.as_str()),
        (wire::CustodyStatus::Duplicate as i32, ""),
        "{ack:?}"
    );
    let ack = transfer(&mut finance, to_registry(antar_core::MessageId::new())).await;
    assert_eq!(
        (ack.acks[0].status, ack.acks[0].reason.as_str()),
        (wire::CustodyStatus::Rejected as i32, "loop")
    );
    health.stop().await.unwrap();
}
