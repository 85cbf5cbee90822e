//! Store-and-forward between real nodes: direct, through the hub, and with
//! the recipient or the relay down for a while.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use antar_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_and_relayed_delivery_carry_the_exact_bytes_and_verified_sender() {
    let fed = Federation::standard();
    let mut nodes = Vec::new();
    for a in ["finance", "health", "registry", "hub"] {
        nodes.push(fed.start(a).await);
    }
    let finance = fed.app("finance").await;
    let payload: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
    let direct = send(&finance, notice("health", "tax.notice", &payload)).await;
    let relayed = send(&finance, notice("registry", "birth.lookup", b"via hub \x00\xff")).await;

    let verifier = fed.verifier();
    for (agency, id, body) in [
        ("health", &direct, payload.as_slice()),
        ("registry", &relayed, b"via hub \x00\xff".as_slice()),
    ] {
        let app = fed.app(agency).await;
        let got = receive(&app, 1, 10, true).await;
        assert_eq!(got.len(), 1, "{agency} got nothing");
        let d = &got[0];
        assert_eq!(d.payload.as_ref().unwrap().data, body);
        assert_eq!(d.sender_identity, "spiffe://gov.example/agency/finance");
        assert_eq!(d.attempt, 1);
        // Any holder of the federation root can check what the node checked.
        let v = verifier.verify_envelope(d.envelope.as_ref().unwrap()).unwrap();
        v.check_payload(d.payload.as_ref().unwrap()).unwrap();
        assert_eq!(&v.id.to_string(), id);
        assert_eq!(v.recipient.as_str(), agency);
    }

    // Both messages end PROCESSED at finance with receipts that verify.
    for id in [&direct, &relayed] {
        let track = until_state(&finance, id, wire::MessageState::Processed, 10).await;
        let statuses: Vec<i32> = track
            .receipts
            .iter()
            .map(|r| verifier.verify_receipt(r).unwrap().receipt.status)
            .collect();
        assert_eq!(
            statuses,
            vec![
                wire::ReceiptStatus::Accepted as i32,
                wire::ReceiptStatus::Delivered as i32,
                wire::ReceiptStatus::Processed as i32
            ]
        );
    }
    for n in nodes {
        n.stop().await.unwrap();
    }
}

async fn outage(down: &str, to: &str, service: &str) {
    let fed = Federation::standard();
    let mut nodes = std::collections::HashMap::new();
    for a in ["finance", "health", "registry", "hub"] {
        if a != down {
            nodes.insert(a, fed.start(a).await);
        }
    }
    let finance = fed.app("finance").await;
    let finance_admin = fed.admin("finance").await;
    let mut ids = Vec::new();
    for i in 0..50u32 {
        ids.push(send(&finance, notice(to, service, &i.to_be_bytes())).await);
    }
    // The node next to the outage holds the queue.
    let (holder_admin, next) = if down == "hub" {
        (finance_admin, "hub")
    } else {
        (finance_admin, down)
    };
    let depth = backlog(&holder_admin, next).await;
    assert!(
        depth >= 50,
        "queue toward {next} should hold the 50 envelopes, has {depth}"
    );

    nodes.insert(down, fed.start(down).await);
    let app = fed.app(to).await;
    let got = receive(&app, 50, 30, true).await;
    let mut got_ids: Vec<String> = got.iter().map(|d| envelope_of(d).id).collect();
    got_ids.sort();
    ids.sort();
    assert_eq!(
        got_ids, ids,
        "every accepted envelope arrives once the {down} node is back"
    );
    eventually(10, "outbox drained", || async {
        (backlog(&holder_admin, next).await == 0).then_some(())
    })
    .await;
    for (_, n) in nodes {
        n.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipient_down_queue_grows_then_drains() {
    outage("health", "health", "tax.notice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_down_queue_grows_then_drains() {
    outage("hub", "registry", "birth.lookup").await;
}

/// An app that takes one delivery at a time (`max_in_flight` 1) drains a
/// backlog at the pace of its acks: an ack frees its slot at once, not at
/// the receive loop's next timer tick (once a second) or next arrival.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_at_a_time_app_gets_the_next_delivery_when_it_acks() {
    let fed = Federation::standard();
    let nodes = finance_and_health(&fed).await;
    let mut ids = backlog_at_health(&fed, 6).await;

    let app = fed.app("health").await;
    let started = std::time::Instant::now();
    let mut got: Vec<String> = receive_at_most(&app, ids.len(), 10, true, 1)
        .await
        .iter()
        .map(|d| envelope_of(d).id)
        .collect();
    let took = started.elapsed();
    got.sort();
    ids.sort();
    assert_eq!(got, ids);
    // Six deliveries one after another: a timer tick each would be ≥ 5 s.
    assert!(
        took < std::time::Duration::from_secs(3),
        "six one-at-a-time deliveries took {took:?}"
    );
    for n in nodes {
        n.stop().await.unwrap();
    }
}

/// finance and health, started in this process.
async fn finance_and_health(fed: &Federation) -> Vec<antar_node::Node> {
    vec![fed.start("finance").await, fed.start("health").await]
}

/// Each of `ids` as delivered for the `attempt`th time, sorted as
/// [`next_deliveries`] gives them.
fn each_at<'a>(ids: impl IntoIterator<Item = &'a String>, attempt: u32) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = ids.into_iter().map(|id| (id.clone(), attempt)).collect();
    out.sort();
    out
}

/// Two streams' deliveries are `ids`, each once, first attempts all.
fn assert_split_between(first: &[(String, u32)], second: &[(String, u32)], ids: &[String]) {
    let mut got: Vec<(String, u32)> = first.iter().chain(second).cloned().collect();
    got.sort();
    assert_eq!(got, each_at(ids, 1));
}

/// Sends `n` notices finance → health and waits until health holds them all.
async fn backlog_at_health(fed: &Federation, n: usize) -> Vec<String> {
    let finance = fed.app("finance").await;
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(
            send(
                &finance,
                notice("health", "tax.notice", format!("backlog {i}").as_bytes()),
            )
            .await,
        );
    }
    for id in &ids {
        until_state(&finance, id, wire::MessageState::Delivered, 10).await;
    }
    ids
}

/// A `Receive` stream of health's app holding at most `max_in_flight` unacked.
async fn open_receive(app: &antar_client::Client, max_in_flight: u32) -> tonic::Streaming<wire::Delivery> {
    app.agency()
        .receive(wire::ReceiveRequest {
            services: vec![],
            max_in_flight,
        })
        .await
        .unwrap()
        .into_inner()
}

/// The next `n` deliveries of `stream` (id, attempt), each within `secs` seconds.
async fn next_deliveries(
    stream: &mut tonic::Streaming<wire::Delivery>,
    n: usize,
    secs: u64,
) -> Vec<(String, u32)> {
    use tokio_stream::StreamExt as _;
    let mut out = Vec::new();
    for _ in 0..n {
        let d = tokio::time::timeout(std::time::Duration::from_secs(secs), stream.next())
            .await
            .unwrap_or_else(|_| panic!("no delivery within {secs} s after {out:?}"))
            .expect("stream ended")
            .unwrap();
        out.push((envelope_of(&d).id, d.attempt));
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_streams_deliveries_go_at_once_to_a_stream_that_had_passed_them() {
    let fed = Federation::standard();
    let nodes = finance_and_health(&fed).await;
    let ids = backlog_at_health(&fed, 4).await;
    let app = fed.app("health").await;
    // B leases two and holds them; A gets the other two, passing B's.
    let mut b = open_receive(&app, 2).await;
    let held_by_b = next_deliveries(&mut b, 2, 10).await;
    let mut a = open_receive(&app, 10).await;
    let got_by_a = next_deliveries(&mut a, 2, 10).await;
    assert_split_between(&held_by_b, &got_by_a, &ids);

    // B goes away unacked: its two come to A as second attempts — at once,
    // not when their 30 s visibility timeout runs out.
    drop(b);
    let again = next_deliveries(&mut a, 2, 10).await;
    assert_eq!(again, each_at(held_by_b.iter().map(|(id, _)| id), 2));
    for n in nodes {
        n.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacked_delivery_comes_again_on_the_same_stream_after_the_visibility_timeout() {
    let fed = Federation::standard();
    let mut health = fed.config("health");
    health.limits.visibility_timeout_ms = 2_000;
    let mut nodes = vec![fed.start("finance").await, fed.start_with(health).await];
    let ids = backlog_at_health(&fed, 3).await;
    let app = fed.app("health").await;
    let mut stream = open_receive(&app, 10).await;
    let first = next_deliveries(&mut stream, 3, 10).await;
    assert_eq!(first, each_at(&ids, 1));

    // Nothing acked: after two seconds the same three come again on the
    // same stream, and one sent meanwhile comes once, as a first attempt.
    let later = send(
        &fed.app("finance").await,
        notice("health", "tax.notice", b"later"),
    )
    .await;
    let got = next_deliveries(&mut stream, 4, 10).await;
    let mut expected = each_at(&ids, 2);
    expected.push((later, 1));
    expected.sort();
    assert_eq!(got, expected);
    drop(stream);
    while let Some(n) = nodes.pop() {
        n.stop().await.unwrap();
    }
}

/// One app with a `Receive` stream on the API listener and one on the
/// admin listener (both serve `Agency`): each stream counts only its own
/// deliveries in flight, and closing one gives back only its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_on_the_api_and_the_admin_listener_keep_their_deliveries_apart() {
    let fed = Federation::standard();
    let nodes = finance_and_health(&fed).await;
    let ids = backlog_at_health(&fed, 4).await;
    let app = fed.app("health").await;
    let (_, creds) =
        antar_client::federation_credentials(&fed.file, "health", antar_client::ClientRole::App).unwrap();
    let via_admin = antar_client::Client::connect(&fed.addrs["health"].admin.to_string(), &creds)
        .await
        .unwrap();

    let mut on_api = open_receive(&app, 2).await;
    let first = next_deliveries(&mut on_api, 2, 10).await;
    let mut on_admin = open_receive(&via_admin, 2).await;
    let second = next_deliveries(&mut on_admin, 2, 10).await;
    assert_split_between(&first, &second, &ids);

    // The admin listener's stream closes: its two go to a new stream, the
    // API stream's two stay leased to it.
    drop(on_admin);
    let mut next = open_receive(&app, 10).await;
    let again = next_deliveries(&mut next, 2, 10).await;
    assert_eq!(again, each_at(second.iter().map(|(id, _)| id), 2));
    use tokio_stream::StreamExt as _;
    let extra = tokio::time::timeout(std::time::Duration::from_millis(1500), next.next()).await;
    assert!(
        extra.is_err(),
        "a delivery leased to the open API stream came again: {extra:?}"
    );
    drop(on_api);
    for n in nodes {
        n.stop().await.unwrap();
    }
}

/// `SendBatch` and `AckBatch` answer each item exactly as its own `Send` or
/// `Ack` would — the same code and message for a refused one — in order;
/// a refused item stores nothing and stops none of the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_batch_and_ack_batch_answer_each_item_as_its_unary_call_would() {
    use wire::{ack_result, send_result};

    let fed = Federation::standard();
    // No checkpoints (nor cosignatures) to sign while signatures are counted.
    let nodes = fed
        .start_all_with(&["finance", "health"], |_, c| {
            c.limits.checkpoint_interval_secs = 3600
        })
        .await;
    let finance = fed.app("finance").await;
    let transaction = |key: &str| transaction("health", "tax.payment", key, b"pay 10");
    let refused = [
        notice("nosuch", "tax.notice", b"to nobody"),
        notice("health", "Bad Service", b"bad name"),
        notice("health", "tax.notice", &vec![7; (4 << 20) + 1]),
    ];
    let requests = vec![
        notice("health", "tax.notice", b"first"),
        refused[0].clone(),
        transaction("k-1"),
        refused[1].clone(),
        transaction("k-1"),
        refused[2].clone(),
        notice("health", "tax.notice", b"last"),
    ];
    let results = finance
        .agency()
        .send_batch(wire::SendBatchRequest { requests })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 7);
    let sent = |i: usize| match &results[i].result {
        Some(send_result::Result::Sent(r)) => r.message_ids.clone(),
        other => panic!("request {i}: {other:?}"),
    };
    let (first, tx, last) = (sent(0), sent(2), sent(6));
    assert_eq!(
        sent(4),
        tx,
        "the repeated transaction key answers the original id"
    );
    // A later batch repeating the key gets the original ids, and sends
    // nothing (checked below: only three deliveries), nor signs anything.
    // The first batch signed its four envelopes and their four ACCEPTED
    // receipts (the key repeated within it settled by the storing
    // transaction, after signing).
    let signatures = get(&scrape(&fed, "finance").await, "antar_signatures_total");
    assert_eq!(signatures, 8.0);
    let again = finance
        .agency()
        .send_batch(wire::SendBatchRequest {
            requests: vec![transaction("k-1")],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(
        matches!(&again[..], [wire::SendResult { result: Some(send_result::Result::Sent(r)) }] if r.message_ids == tx),
        "{again:?}"
    );
    assert_eq!(
        get(&scrape(&fed, "finance").await, "antar_signatures_total"),
        signatures,
        "a batch that only repeats a stored key is answered without signing"
    );
    for (i, req) in [1, 3, 5].into_iter().zip(refused) {
        let unary = finance.agency().send(req).await.unwrap_err();
        match &results[i].result {
            Some(send_result::Result::Error(e)) => {
                assert_eq!(
                    (e.code, e.message.as_str()),
                    (unary.code() as i32, unary.message()),
                    "request {i}"
                )
            }
            other => panic!("request {i} was not refused: {other:?}"),
        }
    }

    let health = fed.app("health").await;
    let got = receive(&health, 3, 10, false).await;
    let mut ids: Vec<String> = got.iter().map(|d| envelope_of(d).id).collect();
    ids.sort();
    let mut want = [first.clone(), tx.clone(), last.clone()].concat();
    want.sort();
    assert_eq!(ids, want, "each accepted request delivered once, no refused one");

    let ack = |id: &String, outcome: wire::Outcome| wire::AckRequest {
        message_id: id.clone(),
        outcome: outcome as i32,
        result: Default::default(),
    };
    let unknown = antar_core::MessageId::new().to_string();
    let acks = vec![
        ack(&first[0], wire::Outcome::Unspecified),
        ack(&tx[0], wire::Outcome::Unspecified),
        ack(&"not-an-id".to_owned(), wire::Outcome::Unspecified),
        ack(&tx[0], wire::Outcome::Committed),
        ack(&unknown, wire::Outcome::Unspecified),
        ack(&last[0], wire::Outcome::Unspecified),
        ack(&last[0], wire::Outcome::Unspecified),
    ];
    let results = health
        .agency()
        .ack_batch(wire::AckBatchRequest { acks: acks.clone() })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 7);
    for (i, r) in results.iter().enumerate() {
        match (&r.result, [1, 2, 4].contains(&i)) {
            (Some(ack_result::Result::Acked(_)), false) => {}
            (Some(ack_result::Result::Error(e)), true) => {
                let unary = health.agency().ack(acks[i].clone()).await.unwrap_err();
                assert_eq!(
                    (e.code, e.message.as_str()),
                    (unary.code() as i32, unary.message()),
                    "ack {i}"
                );
            }
            other => panic!("ack {i}: {other:?}"),
        }
    }
    // One PROCESSED receipt each, signed by health: `last`, acked twice in
    // the batch, is processed once.
    for id in [&first[0], &tx[0], &last[0]] {
        let t = until_state(&finance, id, wire::MessageState::Processed, 15).await;
        let processed: Vec<_> = verified_statuses(&fed, &t)
            .into_iter()
            .filter(|(status, _)| *status == wire::ReceiptStatus::Processed as i32)
            .collect();
        assert_eq!(
            processed,
            [(wire::ReceiptStatus::Processed as i32, "health".to_owned())],
            "{id}"
        );
    }

    // Too many at once is refused whole, naming the field; none is a no-op.
    let over = finance
        .agency()
        .send_batch(wire::SendBatchRequest {
            requests: vec![notice("health", "tax.notice", b"x"); 1001],
        })
        .await
        .unwrap_err();
    assert_eq!(over.code(), tonic::Code::InvalidArgument);
    assert!(
        over.message().contains("requests") && over.message().contains("1000"),
        "{}",
        over.message()
    );
    let over = health
        .agency()
        .ack_batch(wire::AckBatchRequest {
            acks: vec![ack(&first[0], wire::Outcome::Unspecified); 1001],
        })
        .await
        .unwrap_err();
    assert_eq!(over.code(), tonic::Code::InvalidArgument);
    assert!(over.message().contains("acks"), "{}", over.message());
    let none = finance
        .agency()
        .send_batch(wire::SendBatchRequest::default())
        .await
        .unwrap();
    assert!(none.into_inner().results.is_empty());
    assert!(
        receive(&health, 1, 1, true).await.is_empty(),
        "nothing more was sent"
    );
    // Counted once each: not the repeated key, in the batch or after it.
    assert_eq!(get(&scrape(&fed, "finance").await, "antar_sent_total"), 3.0);
    for n in nodes {
        n.stop().await.unwrap();
    }
}
