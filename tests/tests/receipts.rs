//! Signed receipts and the four kinds of traffic end to end (issue 4):
//! receipts across a hub restart, Call with and without a responder,
//! transactions exactly once across repeats and a sender restart, and TTL
//! expiry into dead letters and back out.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use antar_client::wire::agency_client::AgencyClient;
use antar_client::Client;
use antar_tests::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_come_back_signed_across_a_hub_restart() {
    let fed = Federation::standard();
    let finance_node = fed.start("finance").await;
    let registry_node = fed.start("registry").await;
    let hub = fed.start("hub").await;
    let finance = fed.app("finance").await;
    let registry = fed.app("registry").await;

    // Delivered through the hub; then the hub goes away before the app acks,
    // so the PROCESSED receipt waits at registry until the hub is back.
    let first = send(
        &finance,
        notice("registry", "birth.lookup", b"before the restart"),
    )
    .await;
    until_state(&finance, &first, wire::MessageState::Delivered, 10).await;
    hub.stop().await.unwrap();
    let second = send(
        &finance,
        notice("registry", "birth.lookup", b"while the hub is down"),
    )
    .await;
    assert_eq!(receive(&registry, 1, 5, true).await.len(), 1);
    let hub = fed.start("hub").await;
    assert_eq!(receive(&registry, 1, 10, true).await.len(), 1);

    for id in [&first, &second] {
        let t = until_state(&finance, id, wire::MessageState::Processed, 15).await;
        assert_eq!(verified_statuses(&fed, &t), finance_to_registry_chain());
    }

    // WatchReceipts resumes from a cursor: what comes after the first three
    // events is exactly what a reconnecting app would have missed.
    use tokio_stream::StreamExt as _;
    let mut all = finance
        .agency()
        .watch_receipts(wire::WatchReceiptsRequest { after_cursor: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while events.len() < 6 {
        let e = tokio::time::timeout(Duration::from_secs(5), all.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        events.push(e);
    }
    let cursor = events[2].cursor;
    let mut resumed = finance
        .agency()
        .watch_receipts(wire::WatchReceiptsRequest { after_cursor: cursor })
        .await
        .unwrap()
        .into_inner();
    let next = tokio::time::timeout(Duration::from_secs(5), resumed.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.cursor, events[3].cursor);
    assert_eq!(next.receipt, events[3].receipt);
    for n in [hub, registry_node, finance_node] {
        n.stop().await.unwrap();
    }
}

/// Registry's responder: replies to `n` REQUESTs with their payload reversed.
/// The receipts of a message from finance to registry, processed.
fn finance_to_registry_chain() -> Vec<(i32, String)> {
    vec![
        (wire::ReceiptStatus::Accepted as i32, "finance".to_owned()),
        (wire::ReceiptStatus::Delivered as i32, "registry".to_owned()),
        (wire::ReceiptStatus::Processed as i32, "registry".to_owned()),
    ]
}

async fn respond(app: Client, n: usize) {
    Responder::open(app).await.answer(n).await;
}

/// An app's `Receive` stream (8 in flight) that answers REQUESTs.
struct Responder {
    agency: AgencyClient<tonic::transport::Channel>,
    stream: tonic::Streaming<wire::Delivery>,
}

impl Responder {
    async fn open(app: Client) -> Self {
        let mut agency = app.agency();
        let stream = agency
            .receive(wire::ReceiveRequest {
                services: vec![],
                max_in_flight: 8,
            })
            .await
            .unwrap()
            .into_inner();
        Self { agency, stream }
    }

    /// Answers the next `n` deliveries, each a REQUEST, with its payload
    /// reversed, and acks each; returns the requests.
    async fn answer(&mut self, n: usize) -> Vec<wire::Envelope> {
        use tokio_stream::StreamExt as _;
        let mut answered = Vec::with_capacity(n);
        for _ in 0..n {
            let d = tokio::time::timeout(Duration::from_secs(15), self.stream.next())
                .await
                .expect("no request reached the responder")
                .unwrap()
                .unwrap();
            let e = envelope_of(&d);
            assert_eq!(e.kind, wire::Kind::Request as i32);
            let mut answer = d.payload.unwrap().data.to_vec();
            answer.reverse();
            self.agency
                .reply(wire::ReplyRequest {
                    request_id: e.id.clone(),
                    payload: answer.into(),
                    ..Default::default()
                })
                .await
                .unwrap();
            self.agency
                .ack(wire::AckRequest {
                    message_id: e.id.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
            answered.push(e);
        }
        answered
    }
}

fn request(payload: &[u8]) -> wire::SendRequest {
    wire::SendRequest {
        kind: wire::Kind::Request as i32,
        ..notice("registry", "birth.lookup", payload)
    }
}

/// Run with `envelopes.batch_signatures` on at both ends, so the `Call`
/// and the `Reply` go through the batching path (each alone here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_answers_within_its_deadline_or_fails_and_the_late_response_still_arrives() {
    let fed = Federation::standard();
    let mut nodes = Vec::new();
    for a in ["finance", "registry", "hub"] {
        let mut config = fed.config(a);
        config.envelopes.batch_signatures = true;
        nodes.push(fed.start_with(config).await);
    }
    let finance = fed.app("finance").await;

    // With a responder: the RESPONSE comes back as the Call's Delivery.
    let responder = tokio::spawn(respond(fed.app("registry").await, 1));
    let mut req = tonic::Request::new(request(b"1234"));
    req.set_timeout(Duration::from_secs(10));
    let answer = finance.agency().call(req).await.unwrap().into_inner();
    responder.await.unwrap();
    let e = envelope_of(&answer);
    assert_eq!(e.kind, wire::Kind::Response as i32);
    assert_eq!(answer.payload.unwrap().data, &b"4321"[..]);
    let request_id = e.correlation_id.clone();
    assert_eq!(
        until_state(&finance, &request_id, wire::MessageState::Processed, 10)
            .await
            .state,
        wire::MessageState::Processed as i32
    );

    // Without one: DEADLINE_EXCEEDED; the request stays tracked.
    let mut req = tonic::Request::new(request(b"abc"));
    req.set_timeout(Duration::from_millis(700));
    let st = finance.agency().call(req).await.unwrap_err();
    assert_eq!(st.code(), Code::DeadlineExceeded, "{st:?}");
    // The responder comes late; its RESPONSE lands in finance's inbox.
    respond(fed.app("registry").await, 1).await;
    let late = receive(&finance, 1, 15, true).await;
    assert_eq!(late.len(), 1, "the late response must reach the inbox");
    let e = envelope_of(&late[0]);
    assert_eq!(e.kind, wire::Kind::Response as i32);
    assert_eq!(late[0].payload.as_ref().unwrap().data, &b"cba"[..]);
    // The timed-out request is still tracked to the end: its PROCESSED
    // receipt (registry acked it after replying) follows the response.
    until_state(&finance, &e.correlation_id, wire::MessageState::Processed, 15).await;
    for n in nodes {
        n.stop().await.unwrap();
    }
}

/// A `Call` to a service of the caller's own agency is answered like any
/// other, and its RESPONSE goes to the `Call` alone: the responder's
/// `Receive` stream, open on the same node when the RESPONSE lands in its
/// inbox, never gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_its_own_agency_is_answered_and_no_receive_stream_gets_the_response() {
    use tokio_stream::StreamExt as _;
    let fed = Federation::standard();
    let node = fed.start("finance").await;
    let caller = fed.app("finance").await;
    let mut responder = Responder::open(fed.app("finance").await).await;
    let call = {
        let caller = caller.clone();
        tokio::spawn(async move {
            let mut req = tonic::Request::new(wire::SendRequest {
                kind: wire::Kind::Request as i32,
                ..notice("finance", "tax.echo", b"ping")
            });
            req.set_timeout(Duration::from_secs(10));
            caller.agency().call(req).await
        })
    };
    let request = responder.answer(1).await.remove(0);
    assert_eq!(
        (request.sender.as_str(), request.recipient.as_str()),
        ("finance", "finance")
    );

    let answer = call.await.unwrap().expect("the Call is answered").into_inner();
    let response = envelope_of(&answer);
    assert_eq!(response.kind, wire::Kind::Response as i32);
    assert_eq!(response.correlation_id, request.id);
    assert_eq!(answer.payload.unwrap().data, &b"gnip"[..]);
    let more = tokio::time::timeout(Duration::from_secs(1), responder.stream.next()).await;
    assert!(
        more.is_err(),
        "the RESPONSE went to a Receive stream too: {more:?}"
    );
    // The Call acked its RESPONSE, the responder its REQUEST.
    for id in [&request.id, &response.id] {
        until_state(&caller, id, wire::MessageState::Processed, 10).await;
    }
    node.stop().await.unwrap();
}

/// A NOTICE to a service of the sender's own agency has the whole receipt
/// chain on its record, as one to another agency: DELIVERED as soon as it
/// is in the inbox, then PROCESSED once acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_to_its_own_agency_is_tracked_delivered_then_processed() {
    use wire::ReceiptStatus::{Accepted, Delivered, Processed};
    let fed = Federation::standard();
    let node = fed.start("finance").await;
    let app = fed.app("finance").await;
    let id = send(&app, notice("finance", "tax.notice", b"to ourselves")).await;
    let statuses = |t: &wire::TrackResponse| -> Vec<i32> {
        verified_statuses(&fed, t).into_iter().map(|(s, _)| s).collect()
    };
    let t = track(&app, &id).await;
    assert_eq!(
        t.state,
        wire::MessageState::Delivered as i32,
        "DELIVERED on the record"
    );
    assert_eq!(statuses(&t), [Accepted as i32, Delivered as i32]);
    assert_eq!(receive(&app, 1, 10, true).await.len(), 1);
    let t = until_state(&app, &id, wire::MessageState::Processed, 10).await;
    assert_eq!(
        statuses(&t),
        [Accepted as i32, Delivered as i32, Processed as i32]
    );
    node.stop().await.unwrap();
}

/// An idempotency key is not only a TRANSACTION's: a NOTICE (to two
/// agencies) or a REQUEST sent again with its key is accepted once — the
/// original ids come back, nothing more is delivered — and travels in no
/// envelope. `Call`, which waits for its own REQUEST's answer, takes none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_or_request_sent_again_with_its_idempotency_key_is_accepted_once() {
    let fed = Federation::standard();
    let nodes = fed
        .start_all_with(&["finance", "health", "registry", "hub"], |_, _| {})
        .await;
    let finance = fed.app("finance").await;
    let notice_twice = wire::SendRequest {
        recipients: vec!["health".into(), "registry".into()],
        idempotency_key: "moved-3171".into(),
        ..notice("health", "address.changed", b"citizen 3171 moved")
    };
    let request_twice = wire::SendRequest {
        kind: wire::Kind::Request as i32,
        idempotency_key: "lookup-3171".into(),
        ..notice("health", "record.lookup", b"3171")
    };
    let mut firsts = Vec::new();
    for req in [notice_twice, request_twice] {
        let first = finance
            .agency()
            .send(req.clone())
            .await
            .unwrap()
            .into_inner()
            .message_ids;
        let again = finance.agency().send(req).await.unwrap().into_inner().message_ids;
        assert_eq!(again, first);
        firsts.extend(first);
    }
    assert_eq!(firsts.len(), 3);
    // Waiting for one more than was sent, to see no copy arrive.
    let at_health = receive(&fed.app("health").await, 3, 3, true).await;
    let at_registry = receive(&fed.app("registry").await, 2, 3, true).await;
    let mut got: Vec<String> = at_health
        .iter()
        .chain(&at_registry)
        .map(|d| envelope_of(d).id)
        .collect();
    got.sort();
    firsts.sort();
    assert_eq!(got, firsts, "each once, no copy");
    for d in at_health.iter().chain(&at_registry) {
        assert_eq!(
            envelope_of(d).correlation_id,
            "",
            "a NOTICE's or REQUEST's key stays at its node"
        );
    }

    // A key is the kind's own: a TRANSACTION with the NOTICE's key is new.
    let payment = wire::SendRequest {
        kind: wire::Kind::Transaction as i32,
        idempotency_key: "moved-3171".into(),
        ..notice("health", "fee.payment", b"EUR 5")
    };
    let paid = send(&finance, payment).await;
    assert!(
        !firsts.contains(&paid),
        "a TRANSACTION answered with a NOTICE's ids"
    );

    let mut call = tonic::Request::new(wire::SendRequest {
        kind: wire::Kind::Request as i32,
        idempotency_key: "call-3171".into(),
        ..notice("health", "record.lookup", b"3171")
    });
    call.set_timeout(Duration::from_secs(5));
    let st = finance.agency().call(call).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("idempotency_key"), "{st:?}");
    for n in nodes {
        n.stop().await.unwrap();
    }
}

/// A `Reply` settles the REQUEST it answers, as an `Ack` would: the
/// requester sees PROCESSED and gets the RESPONSE, and the REQUEST is not
/// delivered again — though the responder never acked it and closed its
/// stream, which hands an unacked delivery on at once. An `Ack` after the
/// `Reply` is a no-op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_settles_the_request_it_answers() {
    use tokio_stream::StreamExt as _;
    let fed = Federation::standard();
    // No checkpoints (nor cosignatures) to sign while signatures are counted.
    let nodes = fed
        .start_all_with(&["finance", "registry", "hub"], |_, c| {
            c.limits.checkpoint_interval_secs = 3600
        })
        .await;
    let finance = fed.app("finance").await;
    let request = send(
        &finance,
        wire::SendRequest {
            kind: wire::Kind::Request as i32,
            ..notice("registry", "birth.lookup", b"3171")
        },
    )
    .await;
    {
        let mut responder = Responder::open(fed.app("registry").await).await;
        let d = tokio::time::timeout(Duration::from_secs(15), responder.stream.next())
            .await
            .expect("the request arrives")
            .unwrap()
            .unwrap();
        assert_eq!(envelope_of(&d).id, request);
        let answer = wire::ReplyRequest {
            request_id: request.clone(),
            payload: b"born 2001".to_vec().into(),
            ..Default::default()
        };
        let first = responder.agency.reply(answer.clone()).await.unwrap().into_inner();
        // Repeated (a retry after a lost answer): the same RESPONSE, no
        // other, and no signature spent on one.
        let signatures = get(&scrape(&fed, "registry").await, "antar_signatures_total");
        let again = responder.agency.reply(answer).await.unwrap().into_inner();
        assert_eq!(again.message_ids, first.message_ids);
        assert_eq!(
            get(&scrape(&fed, "registry").await, "antar_signatures_total"),
            signatures,
            "a repeated Reply is answered without signing"
        );
    }
    let again = receive(&fed.app("registry").await, 1, 2, false).await;
    assert!(again.is_empty(), "the answered REQUEST was delivered again");
    let t = until_state(&finance, &request, wire::MessageState::Processed, 15).await;
    // Its PROCESSED receipt carries no digest of the answer: an unsalted
    // hash of a short answer could be guessed from the log.
    let verifier = fed.verifier();
    let processed: Vec<_> = t
        .receipts
        .iter()
        .map(|r| verifier.verify_receipt(r).unwrap().receipt)
        .filter(|r| r.status == wire::ReceiptStatus::Processed as i32)
        .collect();
    assert_eq!(processed.len(), 1);
    assert!(processed[0].result_digest.is_empty());
    let response = receive(&finance, 2, 5, true).await;
    assert_eq!(response.len(), 1, "one RESPONSE for one REQUEST");
    assert_eq!(envelope_of(&response[0]).correlation_id, request);
    fed.app("registry")
        .await
        .agency()
        .ack(wire::AckRequest {
            message_id: request.clone(),
            ..Default::default()
        })
        .await
        .expect("an ack after the reply is a no-op");
    let counted = get(&scrape(&fed, "registry").await, "antar_processed_total");
    assert_eq!(
        counted, 1.0,
        "the REQUEST is processed once, not again by the ack"
    );
    for n in nodes {
        n.stop().await.unwrap();
    }
}

/// An app may `Ack` a REQUEST when it takes the work and `Reply` when it
/// is done: the RESPONSE goes out, and the REQUEST keeps the one PROCESSED
/// receipt its ack issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_acked_first_is_still_answered_and_processed_once() {
    let fed = Federation::standard();
    let nodes = fed
        .start_all_with(&["finance", "registry", "hub"], |_, _| {})
        .await;
    let (finance, registry) = (fed.app("finance").await, fed.app("registry").await);
    let request = send(
        &finance,
        wire::SendRequest {
            kind: wire::Kind::Request as i32,
            ..notice("registry", "birth.lookup", b"3171")
        },
    )
    .await;
    let got = receive(&registry, 1, 15, true).await;
    assert_eq!(envelope_of(&got[0]).id, request);
    until_state(&finance, &request, wire::MessageState::Processed, 15).await;

    // Acking it again, alone or in a batch, is a no-op that signs nothing
    // (only the checkpoints of the second may sign meanwhile).
    let signatures = || async { get(&scrape(&fed, "registry").await, "antar_signatures_total") };
    let before = signatures().await;
    let again = wire::AckRequest {
        message_id: request.clone(),
        ..Default::default()
    };
    for _ in 0..25 {
        registry.agency().ack(again.clone()).await.unwrap();
        let batch = registry
            .agency()
            .ack_batch(wire::AckBatchRequest {
                acks: vec![again.clone()],
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            matches!(
                batch.results.as_slice(),
                [wire::AckResult {
                    result: Some(wire::ack_result::Result::Acked(_))
                }]
            ),
            "{batch:?}"
        );
    }
    let signed = signatures().await - before;
    assert!(
        signed < 10.0,
        "50 acks of an acked message made {signed} signatures"
    );
    // Nor does acking a message an app sent to another agency (it owns
    // every service, so the ack passes the ownership check), 25 times.
    let unread = send(&finance, notice("registry", "birth.lookup", b"unread")).await;
    until_state(&finance, &unread, wire::MessageState::Delivered, 15).await;
    let at_finance = || async { get(&scrape(&fed, "finance").await, "antar_signatures_total") };
    let before = at_finance().await;
    for _ in 0..25 {
        finance
            .agency()
            .ack(wire::AckRequest {
                message_id: unread.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let signed = at_finance().await - before;
    assert!(
        signed < 10.0,
        "25 acks of a message sent elsewhere made {signed} signatures"
    );

    let answered = registry
        .agency()
        .reply(wire::ReplyRequest {
            request_id: request.clone(),
            payload: b"born 2001".to_vec().into(),
            ..Default::default()
        })
        .await
        .expect("a REQUEST acked already can still be answered")
        .into_inner();
    assert_eq!(answered.message_ids.len(), 1);
    let response = receive(&finance, 1, 15, true).await;
    let envelope = envelope_of(&response[0]);
    assert_eq!(
        (
            envelope.id.as_str(),
            envelope.correlation_id.as_str(),
            &response[0].payload.as_ref().unwrap().data[..]
        ),
        (
            answered.message_ids[0].as_str(),
            request.as_str(),
            b"born 2001".as_slice()
        )
    );
    let t = track(&finance, &request).await;
    let verifier = fed.verifier();
    let processed = t
        .receipts
        .iter()
        .filter(|r| {
            verifier.verify_receipt(r).unwrap().receipt.status == wire::ReceiptStatus::Processed as i32
        })
        .count();
    assert_eq!(processed, 1, "the ack's PROCESSED receipt alone");
    assert_eq!(get(&scrape(&fed, "registry").await, "antar_processed_total"), 1.0);
    for n in nodes {
        n.stop().await.unwrap();
    }
}

/// A node's data directory copied whole, as a backup is (the node stopped).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A backup taken while an envelope was in flight: finance's node, restored
/// from it, offers the envelope again under the same id. Health delivers
/// nothing again (`DUPLICATE`), and hands finance the DELIVERED and
/// PROCESSED receipts it issued the first time, so the restored record
/// ends PROCESSED, with health's receipts as they were signed, instead of
/// waiting at ACCEPTED for receipts that went to the node before the
/// restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_restored_with_an_envelope_in_flight_learns_its_fate() {
    let fed = Federation::standard();
    let data = fed.layout.data_dir("finance");
    let backup = fed.layout.dir().join("finance-backup");

    // Health is down: the notice waits in finance's outbox, and the backup
    // is taken then.
    let finance_node = fed.start("finance").await;
    let finance = fed.app("finance").await;
    let id = send(&finance, notice("health", "tax.notice", b"in flight")).await;
    finance_node.stop().await.unwrap();
    copy_dir(&data, &backup);

    let finance_node = fed.start("finance").await;
    let health_node = fed.start("health").await;
    let health = fed.app("health").await;
    assert_eq!(receive(&health, 1, 15, true).await.len(), 1);
    let finance = fed.app("finance").await;
    let first = until_state(&finance, &id, wire::MessageState::Processed, 15).await;

    // The disk is lost; finance comes back from the backup, its record
    // ACCEPTED and the envelope in its outbox again.
    finance_node.stop().await.unwrap();
    std::fs::remove_dir_all(&data).unwrap();
    copy_dir(&backup, &data);
    let finance_node = fed.start("finance").await;
    let finance = fed.app("finance").await;
    let restored = until_state(&finance, &id, wire::MessageState::Processed, 15).await;
    let health_signed = |t: &wire::TrackResponse| -> Vec<wire::SignedReceipt> {
        let verifier = fed.verifier();
        t.receipts
            .iter()
            .filter(|r| verifier.verify_receipt(r).unwrap().receipt.issuer == "health")
            .cloned()
            .collect()
    };
    assert_eq!(health_signed(&restored), health_signed(&first));
    assert_eq!(health_signed(&first).len(), 2, "DELIVERED and PROCESSED");
    assert!(
        receive(&health, 1, 2, false).await.is_empty(),
        "the notice was delivered twice"
    );
    finance_node.stop().await.unwrap();
    health_node.stop().await.unwrap();
}

/// What the recipient's own key check is for: finance's node restored from
/// a backup taken before a TRANSACTION went out. Its app sends the key
/// again; finance's node no longer knows it and mints a new id, but health
/// delivers nothing new: finance's message ends REJECTED
/// `duplicate_transaction`, health's signed receipt naming the original in
/// `duplicate_of`; and health hands finance the original's PROCESSED
/// receipt again, the same signed bytes, carrying the outcome (DESIGN.md
/// §9: "original result returned"), which finance's app sees on
/// `WatchReceipts` though its node has no record of that message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_restored_from_a_backup_cannot_deliver_a_transaction_twice() {
    let fed = Federation::standard();
    let data = fed.layout.data_dir("finance");
    let backup = fed.layout.dir().join("finance-backup");
    fed.start("finance").await.stop().await.unwrap();
    copy_dir(&data, &backup);

    let finance_node = fed.start("finance").await;
    let health_node = fed.start("health").await;
    let payment = transaction(
        "health",
        "tax.payment",
        "payment-2026-000043",
        b"EUR 80.00 to health",
    );
    let finance = fed.app("finance").await;
    let original = send(&finance, payment.clone()).await;
    let health = fed.app("health").await;
    assert_eq!(receive(&health, 1, 15, false).await.len(), 1);
    health
        .agency()
        .ack(wire::AckRequest {
            message_id: original.clone(),
            outcome: wire::Outcome::Committed as i32,
            result: Vec::new().into(),
        })
        .await
        .unwrap();
    let first = until_state(&finance, &original, wire::MessageState::Processed, 15).await;
    let processed = first
        .receipts
        .iter()
        .find(|r| {
            fed.verifier().verify_receipt(r).unwrap().receipt.status == wire::ReceiptStatus::Processed as i32
        })
        .expect("health's PROCESSED receipt")
        .clone();

    // The disk is lost; finance comes back from the backup.
    finance_node.stop().await.unwrap();
    std::fs::remove_dir_all(&data).unwrap();
    copy_dir(&backup, &data);
    let finance_node = fed.start("finance").await;
    let finance = fed.app("finance").await;
    let again = send(&finance, payment).await;
    assert_ne!(again, original, "the restored node no longer knows the key");
    let t = until_state(&finance, &again, wire::MessageState::Rejected, 15).await;
    assert_eq!(t.reason, "duplicate_transaction");
    let verifier = fed.verifier();
    let refusal = t
        .receipts
        .iter()
        .map(|r| verifier.verify_receipt(r).unwrap().receipt)
        .find(|r| r.status == wire::ReceiptStatus::Rejected as i32)
        .expect("health's signed REJECTED receipt");
    assert_eq!(
        (
            refusal.issuer.as_str(),
            refusal.reason.as_str(),
            refusal.duplicate_of.as_str()
        ),
        ("health", "duplicate_transaction", original.as_str())
    );
    assert!(
        receive(&health, 1, 2, false).await.is_empty(),
        "the transaction was delivered twice"
    );

    // The original's outcome came back with the refusal: the very receipt
    // health issued when its app acked, logged once more at finance only.
    use tokio_stream::StreamExt as _;
    let mut events = finance
        .agency()
        .watch_receipts(wire::WatchReceiptsRequest { after_cursor: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut again_processed = None;
    while again_processed.is_none() {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("the original's PROCESSED receipt at the restored finance")
            .unwrap()
            .unwrap();
        let signed = event.receipt.unwrap();
        let r = verifier.verify_receipt(&signed).unwrap().receipt;
        if r.message_id == original && r.status == wire::ReceiptStatus::Processed as i32 {
            assert_eq!(r.outcome, wire::Outcome::Committed as i32);
            again_processed = Some(signed);
        }
    }
    assert_eq!(again_processed.unwrap(), processed);
    finance_node.stop().await.unwrap();
    health_node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_key_is_delivered_once_across_repeats_and_a_sender_restart() {
    let fed = Federation::standard();
    let mut finance_node = fed.start("finance").await;
    let registry_node = fed.start("registry").await;
    let hub = fed.start("hub").await;
    let payment = transaction(
        "registry",
        "fee.payment",
        "payment-2026-000042",
        b"EUR 120.00 to registry",
    );

    let finance = fed.app("finance").await;
    let id = send(&finance, payment.clone()).await;
    let registry = fed.app("registry").await;
    let got = receive(&registry, 1, 10, false).await;
    assert_eq!(got.len(), 1);
    registry
        .agency()
        .ack(wire::AckRequest {
            message_id: id.clone(),
            outcome: wire::Outcome::Committed as i32,
            result: b"registry receipt no. 77".to_vec().into(),
        })
        .await
        .unwrap();
    until_state(&finance, &id, wire::MessageState::Processed, 15).await;

    // Again after it was processed: the same id, nothing new sent.
    assert_eq!(send(&finance, payment.clone()).await, id);
    // And again across a restart of the sender node.
    finance_node.stop().await.unwrap();
    finance_node = fed.start("finance").await;
    let finance = fed.app("finance").await;
    assert_eq!(send(&finance, payment.clone()).await, id);
    assert!(
        receive(&registry, 1, 2, true).await.is_empty(),
        "a repeated transaction key must never be delivered twice"
    );

    // The PROCESSED receipt carries the app's outcome and the digest of its result.
    let t = track(&finance, &id).await;
    let verifier = fed.verifier();
    let processed = t
        .receipts
        .iter()
        .map(|r| verifier.verify_receipt(r).unwrap().receipt)
        .find(|r| r.status == wire::ReceiptStatus::Processed as i32)
        .unwrap();
    assert_eq!(processed.outcome, wire::Outcome::Committed as i32);
    assert_eq!(
        processed.result_digest,
        antar_core::envelope::sha256(b"registry receipt no. 77").to_vec()
    );
    for n in [hub, registry_node, finance_node] {
        n.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_envelope_becomes_a_dead_letter_that_can_be_retried_or_purged() {
    let fed = Federation::standard();
    let finance_node = fed.start("finance").await;
    let finance = fed.app("finance").await;
    let admin = fed.admin("finance").await;
    let short = |body: &[u8]| wire::SendRequest {
        ttl: Some(prost_types_duration(1)),
        ..notice("health", "tax.notice", body)
    };
    let retry_me = send(&finance, short(b"retry me")).await;
    let purge_me = send(&finance, short(b"purge me")).await;

    // Health is down: the TTL passes, finance signs EXPIRED receipts.
    for id in [&retry_me, &purge_me] {
        let t = until_state(&finance, id, wire::MessageState::Expired, 10).await;
        assert_eq!(t.reason, "expired");
        let statuses: Vec<i32> = verified_statuses(&fed, &t).into_iter().map(|s| s.0).collect();
        assert_eq!(
            statuses,
            vec![
                wire::ReceiptStatus::Accepted as i32,
                wire::ReceiptStatus::Expired as i32
            ]
        );
    }
    assert_eq!(backlog(&admin, "health").await, 0);
    let dead = dead_letters(&admin).await;
    assert_eq!(dead.len(), 2);
    assert!(dead.iter().all(|d| d.reason == "expired"));

    // Purge one, retry the other: it is delivered once health is back.
    let purged = admin
        .admin()
        .purge_dead_letters(wire::PurgeDeadLettersRequest {
            message_ids: vec![purge_me.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .purged;
    assert_eq!(purged, vec![purge_me.clone()]);
    let retried = admin
        .admin()
        .retry_dead_letters(wire::RetryDeadLettersRequest {
            message_ids: vec![retry_me.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .retried;
    assert_eq!(retried, vec![retry_me.clone()]);
    let health_node = fed.start("health").await;
    let got = receive(&fed.app("health").await, 2, 10, true).await;
    assert_eq!(
        got.iter().map(|d| envelope_of(d).id).collect::<Vec<_>>(),
        vec![retry_me]
    );
    assert!(dead_letters(&admin).await.is_empty());
    for n in [health_node, finance_node] {
        n.stop().await.unwrap();
    }
}

/// A TTL shorter than the way to the peer: with every node up, and the
/// sweeper too slow to matter, the envelope still never leaves — the
/// forwarder expires it in place of sending it — whether its route is
/// direct (health) or through the hub (registry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_past_its_ttl_is_expired_by_the_forwarder_not_sent() {
    let fed = Federation::standard();
    let nodes = fed
        .start_all_with(&["finance", "health", "registry", "hub"], |_, config| {
            config.limits.sweep_interval_ms = 600_000;
        })
        .await;
    let finance = fed.app("finance").await;
    let admin = fed.admin("finance").await;
    let tiny = |to: &str| wire::SendRequest {
        ttl: Some(antar_proto::prost_types::Duration { seconds: 0, nanos: 1 }),
        ..notice(to, "tax.notice", b"too late")
    };
    let direct = send(&finance, tiny("health")).await;
    let relayed = send(&finance, tiny("registry")).await;
    for id in [&direct, &relayed] {
        let t = until_state(&finance, id, wire::MessageState::Expired, 10).await;
        assert_eq!(t.reason, "expired");
        let statuses: Vec<(i32, String)> = verified_statuses(&fed, &t);
        assert_eq!(
            statuses,
            vec![
                (wire::ReceiptStatus::Accepted as i32, "finance".to_owned()),
                (wire::ReceiptStatus::Expired as i32, "finance".to_owned()),
            ]
        );
    }
    let mut dead: Vec<String> = dead_letters(&admin)
        .await
        .into_iter()
        .map(|d| {
            assert_eq!(d.reason, "expired");
            let signed = d.envelope.expect("a dead letter holds its envelope");
            <wire::Envelope as prost::Message>::decode(&signed.envelope[..])
                .unwrap()
                .id
        })
        .collect();
    dead.sort();
    let mut both = vec![direct, relayed];
    both.sort();
    assert_eq!(dead, both);
    for peer in ["health", "hub"] {
        assert_eq!(backlog(&admin, peer).await, 0);
    }
    for agency in ["health", "registry"] {
        let got = receive(&fed.app(agency).await, 1, 1, false).await;
        assert!(got.is_empty(), "{agency} got an expired envelope");
    }
    for n in nodes {
        n.stop().await.unwrap();
    }
}

async fn dead_letters(admin: &Client) -> Vec<wire::DeadLetter> {
    admin
        .admin()
        .list_dead_letters(wire::ListDeadLettersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .dead_letters
}

fn prost_types_duration(secs: i64) -> antar_proto::prost_types::Duration {
    antar_proto::prost_types::Duration {
        seconds: secs,
        nanos: 0,
    }
}

/// With both batch switches on, one `SendBatch` holding a NOTICE to two
/// agencies and a NOTICE to one is sealed with one signature over its three
/// envelopes; each reaches its own recipient, verifies alone, and its
/// receipt chain comes back complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_batch_is_sealed_together_and_each_envelope_reaches_its_own_recipient() {
    use prost::Message as _;
    use wire::send_result;
    let fed = Federation::standard();
    let nodes = fed
        .start_all_with(&["finance", "health", "registry", "hub"], |_, config| {
            config.envelopes.batch_signatures = true;
            config.receipts.batch_signatures = true;
        })
        .await;
    let finance = fed.app("finance").await;
    let results = finance
        .agency()
        .send_batch(wire::SendBatchRequest {
            requests: vec![
                wire::SendRequest {
                    recipients: vec!["registry".into(), "health".into()],
                    ..notice("registry", "address.changed", b"citizen 3171 moved")
                },
                notice("health", "address.changed", b"citizen 3172 moved"),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let ids: Vec<Vec<String>> = results
        .iter()
        .map(|r| match &r.result {
            Some(send_result::Result::Sent(s)) => s.message_ids.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!((ids[0].len(), ids[1].len()), (2, 1));
    let mut got: Vec<String> = Vec::new();
    for (agency, n) in [("registry", 1), ("health", 2)] {
        let app = fed.app(agency).await;
        let d = receive(&app, n, 10, true).await;
        assert_eq!(d.len(), n, "{agency}");
        got.extend(d.iter().map(|d| envelope_of(d).id));
    }
    got.sort();
    let mut all: Vec<String> = ids.concat();
    all.sort();
    assert_eq!(got, all, "each envelope delivered once");
    let want = [
        ("registry", &ids[0][0]),
        ("health", &ids[0][1]),
        ("health", &ids[1][0]),
    ];
    let mut signatures = Vec::new();
    for (agency, id) in want {
        let t = until_state(&finance, id, wire::MessageState::Processed, 15).await;
        let signed = t.envelope.as_ref().unwrap();
        fed.verifier().verify_envelope(signed).unwrap();
        let e = wire::Envelope::decode(&signed.envelope[..]).unwrap();
        assert_eq!((&e.id, e.recipient.as_str()), (id, agency));
        let batch = signed.batch.as_ref().expect("batch-signed");
        let header = wire::EnvelopeBatch::decode(&batch.header[..]).unwrap();
        assert_eq!((header.size, header.sender.as_str()), (3, "finance"));
        signatures.push(signed.signature.clone());
        let statuses = [
            (wire::ReceiptStatus::Accepted, "finance"),
            (wire::ReceiptStatus::Delivered, agency),
            (wire::ReceiptStatus::Processed, agency),
        ]
        .map(|(status, issuer)| (status as i32, issuer.to_owned()));
        assert_eq!(verified_statuses(&fed, &t), statuses, "{id}");
    }
    assert!(
        signatures.windows(2).all(|w| w[0] == w[1]),
        "one signature for all three"
    );
    for n in nodes {
        n.stop().await.unwrap();
    }
}

/// With `envelopes.batch_signatures` on at the sender, the envelopes of
/// one NOTICE share one signature, and each recipient verifies its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_to_several_agencies_is_one_envelope_and_one_receipt_chain_each() {
    use prost::Message as _;
    let fed = Federation::standard();
    let nodes = fed
        .start_all_with(&["finance", "health", "registry", "hub"], |a, config| {
            config.envelopes.batch_signatures = a == "finance";
        })
        .await;
    let finance = fed.app("finance").await;
    let ids = finance
        .agency()
        .send(wire::SendRequest {
            recipients: vec!["registry".into(), "health".into()],
            ..notice("registry", "address.changed", b"citizen 3171 moved")
        })
        .await
        .unwrap()
        .into_inner()
        .message_ids;
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);
    let mut signatures = Vec::new();
    for (agency, id) in [("registry", &ids[0]), ("health", &ids[1])] {
        let app = fed.app(agency).await;
        let got = receive(&app, 1, 10, true).await;
        assert_eq!(got.len(), 1, "{agency} gets its envelope");
        assert!(
            receive(&app, 1, 1, true).await.is_empty(),
            "{agency} gets only its own envelope"
        );
        let e = envelope_of(&got[0]);
        assert_eq!(
            (&e.id, e.recipient.as_str()),
            (id, agency),
            "ids come back in recipient order"
        );
        let signed = got[0].envelope.as_ref().unwrap();
        fed.verifier().verify_envelope(signed).unwrap();
        let batch = signed.batch.as_ref().expect("one batch for both envelopes");
        let header = wire::EnvelopeBatch::decode(&batch.header[..]).unwrap();
        assert_eq!((header.size, header.sender.as_str()), (2, "finance"));
        signatures.push(signed.signature.clone());
        let t = until_state(&finance, id, wire::MessageState::Processed, 15).await;
        let chain = verified_statuses(&fed, &t);
        assert_eq!(
            chain
                .iter()
                .map(|(_, issuer)| issuer.as_str())
                .collect::<Vec<_>>(),
            ["finance", agency, agency]
        );
    }
    assert_eq!(signatures[0], signatures[1], "one signature for both");
    for n in nodes {
        n.stop().await.unwrap();
    }
}

/// `receipts.batch_signatures` and `envelopes.batch_signatures`: the
/// envelopes of one `SendBatch` share one signature, and so do the
/// DELIVERED receipts of one transfer batch; each envelope and receipt
/// still verifies alone (at the hub that relays it, at the recipient, at
/// the sender, for an app and an auditor), and both exports verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_signed_envelopes_and_receipts_verify_alone_end_to_end_and_in_the_export() {
    use prost::Message as _;
    let fed = Federation::standard();
    let mut config = fed.config("finance");
    config.envelopes.batch_signatures = true;
    let _finance_node = fed.start_with(config).await;
    let _hub = fed.start("hub").await;
    let finance = fed.app("finance").await;

    // Queued at the hub while registry is down, so they reach it in one
    // batch; sent in one call, so their envelopes are signed together.
    let requests = (0..8)
        .map(|i| notice("registry", "birth.lookup", format!("{i}").as_bytes()))
        .collect();
    let ids: Vec<String> = finance
        .agency()
        .send_batch(wire::SendBatchRequest { requests })
        .await
        .unwrap()
        .into_inner()
        .results
        .into_iter()
        .map(|r| match r.result {
            Some(wire::send_result::Result::Sent(s)) => s.message_ids[0].clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    let hub_admin = fed.admin("hub").await;
    eventually(10, "8 queued at the hub for registry", || async {
        (backlog(&hub_admin, "registry").await == 8).then_some(())
    })
    .await;
    let mut config = fed.config("registry");
    config.receipts.batch_signatures = true;
    let _registry_node = fed.start_with(config).await;
    let registry = fed.app("registry").await;
    // Acked all at once: their PROCESSED receipts may share signatures too.
    let deliveries = receive(&registry, 8, 10, false).await;
    assert_eq!(deliveries.len(), 8);
    // What the app is handed verifies as it stands, batch and all.
    // Every batch's envelopes are all among these 8, one per leaf.
    let mut batches = std::collections::HashMap::<Vec<u8>, Vec<u64>>::new();
    let mut batched_envelopes = 0;
    for d in &deliveries {
        let signed = d.envelope.as_ref().unwrap();
        let verified = fed.verifier().verify_envelope(signed).unwrap();
        verified.check_payload(d.payload.as_ref().unwrap()).unwrap();
        if let Some(batch) = &signed.batch {
            let header = wire::EnvelopeBatch::decode(&batch.header[..]).unwrap();
            assert!(header.size >= 2 && batch.index < header.size, "{header:?}");
            assert_eq!(header.sender, "finance");
            batches
                .entry(batch.header.to_vec())
                .or_default()
                .push(batch.index);
            batched_envelopes += 1;
        }
    }
    for (header, mut leaves) in batches {
        let size = wire::EnvelopeBatch::decode(header.as_slice()).unwrap().size;
        leaves.sort_unstable();
        assert_eq!(leaves, (0..size).collect::<Vec<_>>(), "a batch of {size}");
    }
    assert!(
        batched_envelopes >= 2,
        "{batched_envelopes} of 8 envelopes were batch-signed"
    );
    let acks: Vec<_> = deliveries
        .iter()
        .map(|d| {
            let mut agency = registry.agency();
            let message_id = envelope_of(d).id;
            tokio::spawn(async move {
                agency
                    .ack(wire::AckRequest {
                        message_id,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    for a in acks {
        a.await.unwrap();
    }

    let mut batched = 0;
    for id in &ids {
        let t = until_state(&finance, id, wire::MessageState::Processed, 15).await;
        assert_eq!(verified_statuses(&fed, &t), finance_to_registry_chain());
        let delivered = &t.receipts[1];
        if let Some(batch) = &delivered.batch {
            let header = wire::ReceiptBatch::decode(&batch.header[..]).unwrap();
            assert!(header.size >= 2 && batch.index < header.size, "{header:?}");
            assert_eq!(header.issuer, "registry");
            batched += 1;
        }
    }
    // The forwarder may split the queue, but not into batches of one each.
    assert!(
        batched >= 2,
        "{batched} of 8 DELIVERED receipts were batch-signed"
    );

    for agency in ["registry", "finance"] {
        let auditor = fed.client(agency, antar_client::ClientRole::Auditor).await;
        let v = antar_core::audit::verify_bundle(&export(&auditor).await, &fed.verifier()).unwrap();
        assert!(v.receipts >= 16 && v.envelopes >= 8, "{agency}: {v:?}");
    }
}

/// A receipt handed over again is `DUPLICATE` and recorded once — known by
/// its message's record, also one an older build recorded there without
/// digests, and, for a receipt about no message the node holds, by its
/// key in `seen`, also one an older build marked under its digest alone —
/// while a new receipt about the same message is `STORED`; a relaying hub
/// deduplicates the receipts it carries too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_handed_over_again_is_a_duplicate_even_one_an_older_build_saw() {
    use antar_tests::wire::CustodyStatus::{Duplicate, Stored};
    use prost::Message as _;

    let fed = Federation::standard();
    let mut finance_node = fed.start("finance").await;
    let health_node = fed.start("health").await;
    let finance = fed.app("finance").await;
    let id = send(&finance, notice("health", "lab.results", b"result 7")).await;
    assert_eq!(receive(&fed.app("health").await, 1, 10, true).await.len(), 1);
    let t = until_state(&finance, &id, wire::MessageState::Processed, 15).await;
    assert_eq!(t.receipts.len(), 3);
    let delivered = t.receipts[1].clone();

    // The same signed receipt again, from health's node certificate; and
    // finance's own ACCEPTED receipt, which its record holds too.
    assert_eq!(hand_over(&fed, "health", "finance", &delivered).await, Duplicate);
    assert_eq!(
        hand_over(&fed, "health", "finance", &t.receipts[0]).await,
        Duplicate
    );

    // Receipts health's node signs anew: other bytes, so other digests.
    let health_signer = fed.signer("health");
    let variant = |n: i64| {
        let mut r = wire::Receipt::decode(&delivered.receipt[..]).unwrap();
        r.at.as_mut().unwrap().nanos = 0;
        r.at.as_mut().unwrap().seconds += n;
        health_signer.sign_receipt(&r)
    };
    let (old_seen, fresh) = (variant(1), variant(2));
    // About messages finance holds no record of: one minted before the
    // upgrade, and one two days after it (by its UUIDv7 time), whose
    // receipts the old keys cannot hold, so they are not read.
    let about = |id: antar_core::MessageId| {
        let mut r = wire::Receipt::decode(&delivered.receipt[..]).unwrap();
        r.message_id = id.to_string();
        health_signer.sign_receipt(&r)
    };
    let orphan = about(antar_core::MessageId::new());
    let later = about({
        let mut bytes = *antar_core::MessageId::new().as_bytes();
        let ms = antar_core::time::unix_millis(std::time::SystemTime::now()) + 2 * 86_400_000;
        bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        antar_core::MessageId::from_bytes(bytes)
    });

    // What an older build left: `old_seen` recorded on the message's
    // record, which keeps no digests, and all three marked seen by their
    // digests alone.
    finance_node.stop().await.unwrap();
    let store = fed.open_store("finance");
    let message = antar_core::MessageId::parse(&id).unwrap();
    store
        .transact(|tx| {
            let cursor = tx.log_receipt(old_seen.encode_to_vec().into(), &old_seen.signer_cert)?;
            tx.update_message(&message, |record| {
                record.receipt_cursors.push(cursor);
                record.receipt_digests.clear();
            })?;
            for r in [&old_seen, &orphan, &later] {
                tx.mark_seen("receipt", &antar_core::envelope::sha256(&r.receipt))?;
            }
            Ok(())
        })
        .await
        .unwrap();
    store.close().await.unwrap();
    drop(store);
    finance_node = fed.start("finance").await;

    assert_eq!(track(&finance, &id).await.receipts.len(), 4);
    assert_eq!(hand_over(&fed, "health", "finance", &old_seen).await, Duplicate);
    assert_eq!(hand_over(&fed, "health", "finance", &delivered).await, Duplicate);
    assert_eq!(hand_over(&fed, "health", "finance", &fresh).await, Stored);
    assert_eq!(hand_over(&fed, "health", "finance", &fresh).await, Duplicate);
    assert_eq!(track(&finance, &id).await.receipts.len(), 5);
    assert_eq!(hand_over(&fed, "health", "finance", &orphan).await, Duplicate);
    assert_eq!(hand_over(&fed, "health", "finance", &later).await, Stored);
    assert_eq!(hand_over(&fed, "health", "finance", &later).await, Duplicate);

    // A receipt for finance that registry hands the hub to relay.
    let hub_node = fed.start("hub").await;
    let mut r = wire::Receipt::decode(&delivered.receipt[..]).unwrap();
    r.issuer = "registry".into();
    r.recipient = "registry".into();
    let relayed = fed.signer("registry").sign_receipt(&r);
    assert_eq!(hand_over(&fed, "registry", "hub", &relayed).await, Stored);
    assert_eq!(hand_over(&fed, "registry", "hub", &relayed).await, Duplicate);

    for n in [finance_node, health_node, hub_node] {
        n.stop().await.unwrap();
    }
}

/// Hands `receipt` to `to`'s peer port as `from`'s node; the custody status.
async fn hand_over(
    fed: &Federation,
    from: &str,
    to: &str,
    receipt: &wire::SignedReceipt,
) -> wire::CustodyStatus {
    use antar_tests::wire::{transfer_item, ReceiptTransfer, TransferItem};

    let item = TransferItem {
        seq: 7,
        item: Some(transfer_item::Item::Receipt(ReceiptTransfer {
            receipt: Some(receipt.clone()),
            hops: vec![from.into()],
        })),
    };
    let ack = transfer(&mut fed.peer_as(from, to).await, vec![item]).await;
    assert_eq!(ack.acks.len(), 1);
    assert_eq!(ack.acks[0].seq, 7);
    ack.acks[0].status()
}

/// Every event `app`'s WatchReceipts feed holds now: read until it has
/// been quiet for a second.
async fn feed(app: &antar_client::Client) -> Vec<wire::ReceiptEvent> {
    use tokio_stream::StreamExt as _;
    let mut stream = app
        .agency()
        .watch_receipts(wire::WatchReceiptsRequest { after_cursor: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(1), stream.next()).await {
        events.push(event.unwrap());
    }
    events
}

/// A receipt that names this node the sender of a message it received —
/// a peer's error, or a forgery — changes nothing and reaches none of
/// this node's apps: it is kept in the node's Merkle log as evidence, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_naming_this_node_sender_of_a_message_it_received_is_audited_only() {
    use antar_tests::wire::CustodyStatus::{Duplicate, Stored};
    use prost::Message as _;

    let fed = Federation::standard();
    let finance_node = fed.start("finance").await;
    let health_node = fed.start("health").await;
    let finance = fed.app("finance").await;
    let health = fed.app("health").await;
    let id = send(&finance, notice("health", "lab.results", b"result 9")).await;
    assert_eq!(receive(&health, 1, 10, true).await.len(), 1);
    let t = until_state(&finance, &id, wire::MessageState::Processed, 15).await;

    // finance's node claims health sent the message and finance got it.
    let mut r = wire::Receipt::decode(t.receipts[1].receipt.clone()).unwrap();
    r.sender = "health".into();
    r.issuer = "finance".into();
    r.recipient = "finance".into();
    let claim = fed.signer("finance").sign_receipt(&r);
    let auditor = fed.client("health", antar_client::ClientRole::Auditor).await;
    let logged = || async {
        antar_core::audit::verify_bundle(&export(&auditor).await, &fed.verifier())
            .unwrap()
            .receipts
    };
    let before = (feed(&health).await.len(), logged().await);
    assert_eq!(hand_over(&fed, "finance", "health", &claim).await, Stored);
    assert_eq!(hand_over(&fed, "finance", "health", &claim).await, Duplicate);
    assert_eq!(
        (feed(&health).await.len(), logged().await),
        (before.0, before.1 + 1)
    );
    let h = track(&health, &id).await;
    assert_eq!(h.state, wire::MessageState::Processed as i32);

    for n in [finance_node, health_node] {
        n.stop().await.unwrap();
    }
}
