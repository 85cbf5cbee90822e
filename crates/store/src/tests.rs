use super::*;
use antar_core::MessageId;
use prost::bytes::Bytes;

/// Journal segments in these tests: small, so they cross segments.
const SEGMENT_BYTES: u64 = journal::MIN_SEGMENT_BYTES;

fn config(dir: &std::path::Path, quota: u64) -> StoreConfig {
    StoreConfig {
        path: dir.to_path_buf(),
        max_queued_bytes: quota,
        cache_capacity: 8 << 20,
        journal_segment_bytes: SEGMENT_BYTES,
    }
}

fn open(dir: &std::path::Path, quota: u64) -> Store {
    Store::open(&config(dir, quota)).unwrap()
}

#[tokio::test]
async fn outbox_survives_reopen_in_order_and_counts_quota() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path(), 1 << 20);
        for i in 0..10u8 {
            s.transact(|tx| tx.push_outbox("health", &[i; 100], Held::Nothing, 0))
                .await
                .unwrap();
        }
        s.durable().await.unwrap();
        assert_eq!(s.queued_bytes(), 1000);
    }
    let s = open(dir.path(), 1000);
    assert_eq!(s.queued_bytes(), 1000);
    assert!(s.over_quota());
    let batch = s.outbox_batch("health", None, 4).unwrap();
    assert_eq!(batch.len(), 4);
    assert_eq!(
        batch.iter().map(|(_, v)| v[0]).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    let next = s.outbox_batch("health", Some(batch[3].0), 100).unwrap();
    assert_eq!(next.len(), 6);
    assert_eq!(next[0].1[0], 4);
    assert!(s.outbox_batch("hub", None, 100).unwrap().is_empty());
    let seqs: Vec<u64> = batch.iter().map(|(s, _)| *s).collect();
    s.transact(|tx| {
        for seq in &seqs {
            tx.remove_outbox("health", *seq)?;
        }
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(s.queued_bytes(), 600);
    assert!(!s.over_quota());
    assert_eq!(s.outbox_depth("health"), 6);
}

#[tokio::test]
async fn each_peers_outbox_bytes_are_counted_apart_and_rebuilt_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let health = {
        let s = open(dir.path(), 1 << 20);
        let mut health = Vec::new();
        for i in 0..3u8 {
            let (h, _) = s
                .transact(|tx| {
                    let h = tx.push_outbox("health", &[i; 100], Held::Nothing, 0)?;
                    let r = tx.push_outbox("registry", &[i; 30], Held::Nothing, 0)?;
                    Ok((h, r))
                })
                .await
                .unwrap();
            health.push(h);
        }
        s.transact(|tx| tx.push_inbox("tax.notice", &MessageId::new(), 7))
            .await
            .unwrap();
        assert_eq!((s.outbox_bytes("health"), s.outbox_bytes("registry")), (300, 90));
        assert_eq!(s.queued_bytes(), 397);
        health
    };
    let s = open(dir.path(), 1 << 20);
    assert_eq!((s.outbox_bytes("health"), s.outbox_bytes("registry")), (300, 90));
    assert_eq!(s.outbox_bytes("hub"), 0);
    s.transact(|tx| {
        tx.remove_outbox("health", health[0])?;
        tx.drop_outbox("health", health[1])
    })
    .await
    .unwrap();
    assert_eq!((s.outbox_bytes("health"), s.queued_bytes()), (100, 197));
}

#[tokio::test]
async fn each_group_s_journal_sync_is_timed() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 1 << 20);
    assert_eq!(s.journal_syncs().count(), 0);
    for i in 0..3u8 {
        s.transact(|tx| tx.push_outbox("health", &[i; 100], Held::Nothing, 0))
            .await
            .unwrap();
    }
    // Awaited one by one: three groups, each written and synced.
    assert_eq!(s.journal_syncs().count(), 3);
    // A transaction that writes nothing is no group and no sync.
    s.transact(|tx| tx.tx_key("finance", "k")).await.unwrap();
    assert_eq!(s.journal_syncs().count(), 3);
}

#[tokio::test]
async fn aborted_transaction_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 1 << 20);
    let id = MessageId::new();
    let r: Result<(), _> = s
        .transact(|tx| {
            tx.push_inbox("birth.lookup", &id, 10)?;
            tx.mark_seen("finance", id.as_bytes())?;
            Err(Abort::Refused("no".into()).into())
        })
        .await;
    assert!(matches!(r, Err(Ok(Abort::Refused(_)))));
    assert_eq!(s.queued_bytes(), 0);
    assert_eq!(s.inbox_scan(None).count(), 0);
    let seen = s.transact(|tx| tx.seen("finance", id.as_bytes())).await.unwrap();
    assert!(!seen);
}

#[tokio::test]
async fn inbox_dedup_and_removal() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 1 << 20);
    let ids: Vec<MessageId> = (0..3).map(|_| MessageId::new()).collect();
    for id in &ids {
        let dup = s
            .transact(|tx| {
                if tx.mark_seen("finance", id.as_bytes())? {
                    return Ok(true);
                }
                tx.push_inbox("birth.lookup", id, 5)?;
                Ok(false)
            })
            .await
            .unwrap();
        assert!(!dup);
    }
    let again = s
        .transact(|tx| tx.mark_seen("finance", ids[0].as_bytes()))
        .await
        .unwrap();
    assert!(again, "second sighting is a duplicate");
    let listed: Vec<Vec<u8>> = s
        .inbox_scan(Some("birth.lookup"))
        .map(|e| e.unwrap().message_id)
        .collect();
    assert_eq!(
        listed,
        ids.iter().map(|i| i.as_bytes().to_vec()).collect::<Vec<_>>()
    );
    assert!(s.transact(|tx| tx.remove_inbox(&ids[1])).await.unwrap());
    assert!(!s.transact(|tx| tx.remove_inbox(&ids[1])).await.unwrap());
    assert_eq!(s.queued_bytes(), 10);
    assert_eq!(s.inbox_depths(), vec![("birth.lookup".to_owned(), 2)]);
}

#[tokio::test]
async fn group_commit_serves_many_waiters() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 1 << 30);
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.transact(|tx| tx.push_outbox("hub", &i.to_be_bytes(), Held::Nothing, 0))
                .await
                .unwrap();
            s.durable().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(s.outbox_depth("hub"), 200);
}

/// The expiry index follows the outbox: an item is due once its expiry
/// passes, until it is taken; one an aborted transaction queued never is.
/// On open it is derived from the outbox again, and the index an older
/// build kept in sled is cleared.
#[tokio::test]
async fn expiry_index_follows_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 1 << 20);
    let a = s
        .transact(|tx| tx.push_outbox("hub", b"a", Held::Nothing, 1_000))
        .await
        .unwrap();
    let b = s
        .transact(|tx| tx.push_outbox("hub", b"b", Held::Nothing, 5_000))
        .await
        .unwrap();
    let c = s
        .transact(|tx| tx.push_outbox("health", b"c", Held::Nothing, 3_000))
        .await
        .unwrap();
    s.transact(|tx| tx.push_outbox("hub", b"never", Held::Nothing, 0))
        .await
        .unwrap();
    let aborted: Result<(), _> = s
        .transact(|tx| {
            tx.push_outbox("hub", b"aborted", Held::Nothing, 2_000)?;
            Err(Abort::Refused("test".into()).into())
        })
        .await;
    assert!(aborted.is_err());
    assert_eq!(s.expired(2_000, 10).unwrap(), vec![("hub".to_owned(), a)]);
    s.transact(|tx| tx.remove_outbox("hub", a)).await.unwrap();
    assert!(s.expired(2_000, 10).unwrap().is_empty());
    let due = vec![("health".to_owned(), c), ("hub".to_owned(), b)];
    assert_eq!(s.expired(9_000, 10).unwrap(), due);
    assert_eq!(s.expired(9_000, 1).unwrap(), due[..1]);
    // A peer's items up to a sequence number are spared — before `max`
    // is counted, so they never crowd out the others.
    let spare_health = |peer: &str| (peer == "health").then_some(c);
    assert_eq!(s.expired_sparing(9_000, 1, spare_health).unwrap(), due[1..]);
    assert_eq!(
        s.expired_sparing(9_000, 10, |peer| (peer == "hub").then_some(b - 1))
            .unwrap(),
        due
    );
    // Each item read for sending says when it expires (0: never).
    let queued: Vec<(u64, u64, Vec<u8>)> = s
        .outbox_queued("hub", None, 10)
        .unwrap()
        .into_iter()
        .map(|q| (q.seq, q.expires_ms, q.item))
        .collect();
    assert_eq!(queued.len(), 2);
    assert_eq!(queued[0], (b, 5_000, b"b".to_vec()));
    assert_eq!((queued[1].1, queued[1].2.as_slice()), (0, &b"never"[..]));

    // An index entry as a build from before kept them, in sled.
    let mut legacy = 1_500u64.to_be_bytes().to_vec();
    legacy.extend_from_slice(&keys::seq_key("hub", a));
    s.inner.trees[keys::EXPIRY].insert(legacy, &[][..]).unwrap();
    s.close().await.unwrap();
    drop(s);
    let s = open(dir.path(), 1 << 20);
    assert_eq!(s.expired(9_000, 10).unwrap(), due);
    assert_eq!(s.inner.trees[keys::EXPIRY].len(), 0);
    s.transact(|tx| tx.drop_outbox("health", c)).await.unwrap();
    assert_eq!(s.expired(u64::MAX, 10).unwrap(), due[1..]);

    // Queued and taken in one transaction, or by concurrent ones (which
    // share groups): never left due.
    s.transact(|tx| {
        let seq = tx.push_outbox("hub", b"d", Held::Nothing, 1_000)?;
        tx.drop_outbox("hub", seq)
    })
    .await
    .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..32u64 {
        let s = s.clone();
        tasks.spawn(async move {
            let seq = s
                .transact(|tx| tx.push_outbox("hub", b"e", Held::Nothing, 1_000 + n))
                .await
                .unwrap();
            s.transact(|tx| tx.remove_outbox("hub", seq)).await.unwrap()
        });
    }
    while let Some(taken) = tasks.join_next().await {
        assert!(taken.unwrap().is_some());
    }
    assert_eq!(s.expired(u64::MAX, 100).unwrap(), due[1..]);
}

#[tokio::test]
async fn receipt_log_resumes_from_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 1 << 20);
    let c1 = s
        .transact(|tx| tx.log_receipt(Bytes::copy_from_slice(b"one"), b""))
        .await
        .unwrap();
    let c2 = s
        .transact(|tx| tx.log_receipt(Bytes::copy_from_slice(b"two"), b""))
        .await
        .unwrap();
    assert!(c2 > c1 && c1 > 0);
    let all = s.receipts_after(0, 10).unwrap();
    assert_eq!(
        all.iter().map(|(_, v)| v.as_slice()).collect::<Vec<_>>(),
        vec![b"one".as_slice(), b"two"]
    );
    assert_eq!(s.receipts_after(c1, 10).unwrap(), vec![(c2, b"two".to_vec())]);
}

#[tokio::test]
async fn corrupt_record_is_reported_not_panicked() {
    let dir = tempfile::tempdir().unwrap();
    let id = MessageId::new();
    {
        let db = sled::open(dir.path()).unwrap();
        db.open_tree("messages")
            .unwrap()
            .insert(id.as_bytes(), &[0xff, 0xff, 0xff][..])
            .unwrap();
        db.flush().unwrap();
    }
    let s = open(dir.path(), 1 << 20);
    assert!(matches!(
        s.message(&id),
        Err(StoreError::Corrupt { tree: "messages", .. })
    ));
}

#[tokio::test]
async fn the_log_tree_answers_for_any_size_as_it_grows_and_after_reopen() {
    use antar_core::merkle;
    use antar_core::wire::EntryKind;
    let dir = tempfile::tempdir().unwrap();
    let leaves = |s: &Store, n: u64| -> Vec<merkle::Hash> {
        s.audit_entries(0, n as usize)
            .unwrap()
            .iter()
            .map(|(_, entry)| merkle::leaf_hash(entry))
            .collect()
    };
    async fn append(s: &Store, n: usize) {
        for i in 0..n {
            s.transact(|tx| {
                tx.audit_append(
                    EntryKind::Envelope,
                    Bytes::copy_from_slice(&[i as u8; 7]),
                    Held::Nothing,
                    "m",
                )
                .map(drop)
            })
            .await
            .unwrap();
        }
    }
    {
        let s = open(dir.path(), 1 << 20);
        // Grown in uneven steps, the tree is asked about each size.
        for step in [1, 2, 5, 1, 13, 30, 250, 300] {
            append(&s, step).await;
            let size = s.audit_size().unwrap();
            let mut tree = s.audit_tree(size).unwrap();
            let all = leaves(&s, size);
            assert_eq!(merkle::root_of(&mut tree, size).unwrap(), merkle::root(&all));
            // Older sizes still answer from the same stored subtrees.
            for old in (1..=size).step_by(7).chain([size]) {
                assert_eq!(
                    merkle::consistency_proof_of(&mut tree, old, size).unwrap(),
                    merkle::consistency_proof(old as usize, &all).unwrap()
                );
            }
            // Nothing beyond the size asked for is readable through it.
            assert!(merkle::root_of(&mut tree, size + 1).is_err());
        }
    }
    // Reopened: the stored subtrees are picked up where they stopped.
    let s = open(dir.path(), 1 << 20);
    append(&s, 70).await;
    let size = s.audit_size().unwrap();
    assert_eq!(size, 672);
    let mut tree = s.audit_tree(size).unwrap();
    let all = leaves(&s, size);
    assert_eq!(merkle::root_of(&mut tree, size).unwrap(), merkle::root(&all));
    for i in [0, 63, 255, 256, 511, 600, 671] {
        assert_eq!(
            merkle::inclusion_proof_of(&mut tree, i, size).unwrap(),
            merkle::inclusion_proof(i as usize, &all).unwrap()
        );
    }
    // A log with a hole is named, not papered over.
    // Only subtrees of 256 entries and more are stored: two at level 8, one
    // at level 9, and the mark.
    assert_eq!(s.inner.trees[keys::AUDIT_NODE].len(), 4);
    // A log with a hole is named, not papered over: in the stored range...
    s.inner.trees[keys::AUDIT].remove(300u64.to_be_bytes()).unwrap();
    assert!(matches!(
        merkle::inclusion_proof_of(&mut s.audit_tree(size).unwrap(), 301, size),
        Err(merkle::ProofError::Unavailable(_))
    ));
    // ...and past it.
    s.inner.trees[keys::AUDIT_META]
        .insert(keys::AUDIT_SIZE, &700u64.to_be_bytes())
        .unwrap();
    assert!(matches!(s.audit_tree(700), Err(StoreError::Corrupt { .. })));
}

/// Concurrent transactions are applied together (groups) yet stay
/// serial: each read-modify-write sees every one before it, none is lost,
/// aborted ones leave nothing, and queue order follows commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_transactions_are_serial_and_none_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), u64::MAX);
    let tasks = 16;
    let rounds = 40;
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let s = s.clone();
        set.spawn(async move {
            for r in 0..rounds {
                let id = MessageId::new();
                // Append this id to one shared list, and queue it.
                s.transact(|tx| {
                    let mut ids = tx.tx_key("bench", "list")?.unwrap_or_default();
                    ids.push(id);
                    tx.put_tx_key("bench", "list", &ids)?;
                    tx.push_outbox("health", id.as_bytes(), Held::Nothing, 0)?;
                    Ok(())
                })
                .await
                .unwrap();
                if (t + r) % 5 == 0 {
                    let aborted: Result<(), _> = s
                        .transact(|tx| {
                            tx.put_tx_key("bench", "list", &[])?;
                            tx.push_outbox("health", b"never", Held::Nothing, 0)?;
                            Err(Abort::Refused("test".into()).into())
                        })
                        .await;
                    assert!(matches!(aborted, Err(Ok(Abort::Refused(_)))));
                }
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    let list = s
        .transact(|tx| tx.tx_key("bench", "list"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(list.len(), tasks * rounds, "a read-modify-write was lost");
    let queued: Vec<Vec<u8>> = s
        .outbox_batch("health", None, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let listed: Vec<Vec<u8>> = list.iter().map(|id| id.as_bytes().to_vec()).collect();
    assert_eq!(queued, listed, "queue order differs from commit order");
    assert_eq!(s.queued_bytes(), (tasks * rounds * 16) as u64);
    s.durable().await.unwrap();
}

/// A store written before the journal moved out of sled, crashed after a
/// group's record (in the `journal` tree) and part of its writes: opening
/// it finishes the group, and the tree is empty again.
#[tokio::test]
async fn open_finishes_a_group_a_crash_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let id = MessageId::new();
    {
        let s = open(dir.path(), 1 << 20);
        let inner = &s.inner;
        // The writes of a transaction that stores a message and queues it.
        let tx = Tx::new(&inner.trees, [None, None], 1, &inner.certs);
        tx.put_message(&id, &MessageRecord::default()).unwrap();
        tx.push_inbox("birth.lookup", &id, 10).unwrap();
        let (writes, _, _) = tx.into_parts();
        // The record (which keeps the inbox key: no index), its body, the
        // inbox entry, and the next sequence number.
        assert_eq!(writes.iter().count(), 4);
        // Its journal record, and only the first of its writes, reach disk.
        inner.trees[keys::JOURNAL]
            .insert(7u64.to_be_bytes(), group::encode(&writes))
            .unwrap();
        let (tree, key, value) = writes.iter().next().unwrap();
        inner.trees[tree].insert(key, value.clone().unwrap()).unwrap();
        inner.db.flush().unwrap();
    }
    let s = open(dir.path(), 1 << 20);
    assert!(s.transact(|tx| tx.in_inbox(&id)).await.unwrap());
    assert!(s.message(&id).unwrap().is_some());
    assert_eq!(s.queued_bytes(), 10);
    assert_eq!(s.inner.trees[keys::JOURNAL].len(), 0);
    let entries: Vec<_> = s.inbox_scan(None).collect();
    assert_eq!(entries.len(), 1);
}

/// A journal record that does not decode stops the open with an error
/// naming the journal, rather than a guess at what the group held.
#[tokio::test]
async fn a_corrupt_journal_record_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path(), 1 << 20);
        s.inner.trees[keys::JOURNAL]
            .insert(1u64.to_be_bytes(), &[2, 0, 0, 0, 9, 1][..])
            .unwrap();
        s.inner.db.flush().unwrap();
    }
    let err = Store::open(&config(dir.path(), 1 << 20)).err().unwrap();
    assert!(err.to_string().contains("journal record 1"), "{err}");
}

/// A caller that stops waiting (a cancelled request) after its transaction
/// joined a group loses nothing: the write lands, the queued-bytes count
/// and the outbox wake-up still follow it.
#[tokio::test]
async fn a_cancelled_transaction_still_counts_and_wakes() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 1 << 20);
    let notify = s.outbox_notify("health");
    let woken = notify.notified();
    tokio::pin!(woken);
    woken.as_mut().enable();
    let mut fut = Box::pin(s.transact(|tx| tx.push_outbox("health", &[7; 100], Held::Nothing, 0)));
    // One poll runs the closure and joins the open group; then it is dropped.
    let first = tokio::time::timeout(std::time::Duration::ZERO, &mut fut).await;
    drop(fut);
    tokio::time::timeout(std::time::Duration::from_secs(5), woken)
        .await
        .expect("the outbox wake-up was lost");
    assert_eq!(s.queued_bytes(), 100, "first poll finished: {}", first.is_ok());
    assert_eq!(s.outbox_batch("health", None, 10).unwrap().len(), 1);
    // Removing it brings the count back to zero, not below (no wrap).
    let seq = s.outbox_batch("health", None, 10).unwrap()[0].0;
    s.transact(|tx| tx.remove_outbox("health", seq)).await.unwrap();
    assert_eq!(s.queued_bytes(), 0);
    assert!(!s.over_quota());
}

/// Writes nobody waits for (`transact_unsynced`): every later transaction
/// sees them at once, and one that read them waits for them; they reach
/// sled with the next group a waiting transaction starts, alone after a
/// while, and at close at the latest.
#[tokio::test]
async fn unsynced_writes_ride_with_the_next_group_or_go_alone() {
    let dir = tempfile::tempdir().unwrap();
    let seqs = {
        let s = open(dir.path(), 1 << 20);
        for i in 0..3u8 {
            s.transact(|tx| tx.push_outbox("health", &[i; 100], Held::Nothing, 0))
                .await
                .unwrap();
        }
        let seqs: Vec<u64> = s
            .outbox_batch("health", None, 10)
            .unwrap()
            .iter()
            .map(|(q, _)| *q)
            .collect();
        assert_eq!(seqs.len(), 3);

        // Not written at once: no sync of its own, still in sled. (Only
        // checked when this thread ran on within 50 ms, well before the
        // applier would write it alone.)
        let syncs = s.journal_syncs().count();
        let started = std::time::Instant::now();
        assert!(s
            .transact_unsynced(|tx| tx.drop_outbox("health", seqs[0]))
            .unwrap());
        let synced = s.journal_syncs().count();
        let in_sled = s.outbox_batch("health", None, 10).unwrap().len();
        if started.elapsed() < std::time::Duration::from_millis(50) {
            assert_eq!(
                (synced, in_sled),
                (syncs, 3),
                "an unsynced write was synced at once"
            );
        }

        // Read by the next transaction, which waits for it.
        let again = s.transact(|tx| tx.drop_outbox("health", seqs[0])).await.unwrap();
        assert!(!again, "the next transaction saw the item still there");
        assert_eq!(s.outbox_batch("health", None, 10).unwrap().len(), 2);
        assert_eq!(s.queued_bytes(), 200);

        // Alone, it is written all the same.
        assert!(s
            .transact_unsynced(|tx| tx.drop_outbox("health", seqs[1]))
            .unwrap());
        assert!(
            poll(|| s.outbox_batch("health", None, 10).unwrap().len() == 1 && s.queued_bytes() == 100),
            "an unsynced write alone never reached sled"
        );

        // Closed right after: `close` writes it.
        assert!(s
            .transact_unsynced(|tx| tx.drop_outbox("health", seqs[2]))
            .unwrap());
        s.close().await.unwrap();
        assert!(s.outbox_batch("health", None, 10).unwrap().is_empty());
        assert_eq!(s.queued_bytes(), 0);

        // Dropped right after another: written before the store lets go.
        s.transact(|tx| tx.push_outbox("health", &[3; 100], Held::Nothing, 0))
            .await
            .unwrap();
        let last = s.outbox_batch("health", None, 10).unwrap()[0].0;
        assert!(s.transact_unsynced(|tx| tx.drop_outbox("health", last)).unwrap());
        seqs
    };
    let s = open(dir.path(), 1 << 20);
    assert!(s.outbox_batch("health", None, 10).unwrap().is_empty());
    assert_eq!(s.queued_bytes(), 0);
    // An abort keeps nothing, as in a waiting transaction.
    let aborted = s.transact_unsynced(|tx| {
        tx.push_outbox("health", &[9; 100], Held::Nothing, 0)?;
        Err::<(), _>(Abort::Refused("no".into()).into())
    });
    assert!(matches!(aborted, Err(Ok(Abort::Refused(_)))));
    s.transact(|_| Ok(())).await.unwrap();
    assert!(s.outbox_batch("health", None, 10).unwrap().is_empty(), "{seqs:?}");
}

/// Copies a store's directory while it is open: what `kill -9` leaves.
fn crash_copy(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            crash_copy(&entry.path(), &target);
        } else {
            match std::fs::copy(entry.path(), target) {
                // Renamed or deleted meanwhile (a spare, a checkpointed segment).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                r => drop(r.unwrap()),
            }
        }
    }
}

/// The first byte of each item in `peer`'s outbox, in queue order.
fn first_bytes(s: &Store, peer: &str) -> Vec<u8> {
    s.outbox_batch(peer, None, usize::MAX)
        .unwrap()
        .iter()
        .map(|(_, v)| v[0])
        .collect()
}

/// A store under `dir` with `n` outbox items (`[i; 100]`), and a copy of
/// it as a `kill -9` would leave it: the copy's path and its newest
/// journal segment.
async fn crashed_with(dir: &std::path::Path, n: u8) -> (std::path::PathBuf, std::path::PathBuf) {
    let (live, copy) = (dir.join("live"), dir.join("copy"));
    let s = open(&live, 1 << 20);
    for i in 0..n {
        s.transact(|tx| tx.push_outbox("health", &[i; 100], Held::Nothing, 0))
            .await
            .unwrap();
    }
    crash_copy(&live, &copy);
    let last = segments(&copy).pop().unwrap();
    (copy, last)
}

/// The store at `copy` opens holding exactly [`crashed_with`]'s three
/// items.
fn holds_the_three(copy: &std::path::Path) {
    let r = open(copy, 1 << 20);
    assert_eq!(first_bytes(&r, "health"), vec![0, 1, 2]);
    assert_eq!(r.queued_bytes(), 300);
}

/// Queues item `i` for health: `size` bytes of `i % 251`, as
/// [`first_bytes`] reads back.
async fn put_numbered(s: &Store, i: u64, size: usize) {
    let v = vec![(i % 251) as u8; size];
    s.transact(|tx| tx.push_outbox("health", &v, Held::Nothing, 0))
        .await
        .unwrap();
}

/// Drops every item of `peer`'s outbox, one transaction each.
async fn drop_all(s: &Store, peer: &str) {
    let queued: Vec<u64> = s
        .outbox_batch(peer, None, usize::MAX)
        .unwrap()
        .iter()
        .map(|(seq, _)| *seq)
        .collect();
    for seq in queued {
        s.transact(|tx| tx.drop_outbox(peer, seq)).await.unwrap();
    }
}

/// Polls `done` every 10 ms for up to 10 s; whether it came true.
fn poll(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..1000 {
        if done() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    false
}

/// The number `n` of journal segment `<n>.log`.
fn segment_number(path: &std::path::Path) -> u64 {
    path.file_stem().unwrap().to_str().unwrap().parse().unwrap()
}

/// The journal's segment files (not its spare), oldest first.
fn segments(store: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(journal::dir(store))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

/// A transaction is durable when `transact` returns, before sled has it:
/// a `kill -9` then leaves it only in the journal, and the next open
/// replays it. Without the journal the copy does not have it.
#[tokio::test]
async fn a_returned_transaction_survives_a_crash_through_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let (with, without) = (dir.path().join("with"), dir.path().join("without"));
    let live = dir.path().join("live");
    let s = open(&live, 1 << 20);
    let id = MessageId::new();
    s.transact(|tx| {
        tx.put_message(&id, &MessageRecord::default())?;
        tx.push_inbox("birth.lookup", &id, 10)
    })
    .await
    .unwrap();
    crash_copy(&live, &with);
    crash_copy(&live, &without);
    std::fs::remove_dir_all(journal::dir(&without)).unwrap();
    {
        let bare = open(&without, 1 << 20);
        assert!(
            bare.message(&id).unwrap().is_none(),
            "sled had it on its own: the test proves nothing"
        );
    }
    let r = open(&with, 1 << 20);
    assert!(r.message(&id).unwrap().is_some());
    assert_eq!(r.queued_bytes(), 10);
    assert_eq!(r.inbox_scan(None).count(), 1);
    // The replayed segment is gone; one empty segment is open.
    assert_eq!(segments(&with).len(), 1);
    assert_eq!(std::fs::metadata(&segments(&with)[0]).unwrap().len(), 0);
}

/// A crash in the middle of a record's write leaves a torn tail: the open
/// keeps every whole group before it and drops the torn one, which was
/// never acknowledged.
#[tokio::test]
async fn a_torn_journal_tail_is_dropped_and_the_rest_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let (copy, last) = crashed_with(dir.path(), 3).await;
    let whole = std::fs::read(&last).unwrap();
    // A fourth record cut short: its header and part of its body.
    let mut torn = whole.clone();
    torn.extend_from_slice(&500u32.to_be_bytes());
    torn.extend_from_slice(&0u32.to_be_bytes());
    torn.extend_from_slice(&[1, 1, 0, 0]);
    std::fs::write(&last, torn).unwrap();
    holds_the_three(&copy);
}

/// A bad record in a segment before the last cannot be a torn write: the
/// open stops and names the file, rather than losing acknowledged groups.
/// So are zeros with a record after them (a hole, not an unwritten tail).
#[tokio::test]
async fn a_bad_record_before_the_last_segment_is_reported() {
    let bad = [0, 0, 0, 4, 9, 9, 9, 9, 1, 2, 3, 4];
    for segment in [bad.to_vec(), [&[0; 64][..], &bad].concat()] {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path(), 1 << 20);
            s.transact(|tx| tx.push_outbox("health", &[1; 100], Held::Nothing, 0))
                .await
                .unwrap();
        }
        let jdir = journal::dir(dir.path());
        std::fs::write(jdir.join(format!("{:016}.log", 1)), segment).unwrap();
        std::fs::write(jdir.join(format!("{:016}.log", 2)), []).unwrap();
        let err = Store::open(&config(dir.path(), 1 << 20)).err().unwrap();
        let msg = err.to_string();
        assert!(
            msg.contains("0000000000000001.log") && msg.contains("corrupt"),
            "{msg}"
        );
    }
}

/// Past a segment's size the journal moves on, and the checkpointer flushes
/// sled and deletes the full segment: the journal stays small while every
/// group survives a crash.
#[tokio::test]
async fn full_segments_are_checkpointed_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let (live, copy) = (dir.path().join("live"), dir.path().join("copy"));
    let s = open(&live, 1 << 30);
    let n = 4 * SEGMENT_BYTES / 1000;
    for i in 0..n {
        s.transact(|tx| tx.push_outbox("health", &[(i % 251) as u8; 1000], Held::Nothing, 0))
            .await
            .unwrap();
    }
    let mut left = segments(&live);
    for _ in 0..500 {
        if left.len() <= 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        left = segments(&live);
    }
    assert!(left.len() <= 2, "retired segments were not deleted: {left:?}");
    let first = segment_number(&left[0]);
    assert!(first >= 3, "the journal did not move on: {left:?}");
    // Each checkpoint is timed once its segments are gone: at least one,
    // and no more than the segments gone when counted after it.
    assert!(
        poll(|| s.journal_checkpoints().count() >= 1),
        "no checkpoint was timed"
    );
    let checkpoints = s.journal_checkpoints().count();
    let gone = segment_number(&segments(&live)[0]);
    assert!(
        checkpoints <= gone,
        "{checkpoints} checkpoints for {gone} segments gone"
    );
    crash_copy(&live, &copy);
    let r = open(&copy, 1 << 30);
    assert_eq!(r.queued_bytes(), n * 1000);
    let want: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    assert_eq!(first_bytes(&r, "health"), want);
}

/// Half way through a segment the checkpointer writes a zeroed spare (in
/// place of one of another size), and the next segment is that spare
/// renamed: records overwrite its zeros within its size (no metadata to
/// sync with each record). A crash then replays every group, the spare's
/// zero tail ending the last segment.
#[tokio::test]
async fn the_next_segment_is_the_zeroed_spare() {
    let dir = tempfile::tempdir().unwrap();
    let (live, copy) = (dir.path().join("live"), dir.path().join("copy"));
    let s = open(&live, 1 << 30);
    let spare = journal::dir(&live).join("spare.zero");
    // A spare of another size (another build's) is replaced, not used.
    std::fs::write(&spare, [0; 4096]).unwrap();
    let mut i = 0u64;
    // Past half of the first segment: the spare is written, whole.
    for _ in 0..SEGMENT_BYTES / 2 / 1000 + 2 {
        i += 1;
        put_numbered(&s, i, 1000).await;
    }
    let mut len = None;
    poll(|| {
        len = std::fs::metadata(&spare).ok().map(|m| m.len());
        len.is_some()
    });
    assert_eq!(len, Some(SEGMENT_BYTES), "no whole spare was written");
    assert!(std::fs::read(&spare).unwrap().iter().all(|&b| b == 0));
    // Past the end of it: segment 1 is the spare, a few records in.
    while segments(&live)
        .iter()
        .all(|p| !p.ends_with("0000000000000001.log"))
    {
        i += 1;
        put_numbered(&s, i, 1000).await;
    }
    for _ in 0..3 {
        i += 1;
        put_numbered(&s, i, 1000).await;
    }
    let current = segments(&live).pop().unwrap();
    assert!(current.ends_with("0000000000000001.log"), "{current:?}");
    assert_eq!(std::fs::metadata(&current).unwrap().len(), SEGMENT_BYTES);
    let n = i;
    crash_copy(&live, &copy);
    let r = open(&copy, 1 << 30);
    assert_eq!(r.queued_bytes(), n * 1000);
    let want: Vec<u8> = (1..=n).map(|i| (i % 251) as u8).collect();
    assert_eq!(first_bytes(&r, "health"), want);
}

/// Segment 0, once checkpointed, is not deleted: its file becomes the next
/// spare (the same inode), so a journal under steady load frees and
/// allocates no blocks. Only its first page is zeroed; its records stay,
/// and when it is written again as segment 2 they follow the new records
/// in the file. They are bound to segment 0, so a crash copy replays the
/// new groups and none of them: the items dropped meanwhile stay dropped.
/// (Whether an old record begins where the new ones end is up to their
/// sizes; the next tests put one there.)
#[tokio::test]
async fn a_checkpointed_segment_is_the_next_spare_and_its_old_records_never_replay() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let (live, copy) = (dir.path().join("live"), dir.path().join("copy"));
    let s = open(&live, 1 << 30);
    let journal = journal::dir(&live);
    let first = journal.join("0000000000000000.log");
    let inode = std::fs::metadata(&first).unwrap().ino();
    let mut n = 0u64;
    // Past half of segment 0, then wait for the (new) spare, so segment 1
    // is that spare and, once segment 0 is checkpointed, there is none:
    // segment 0 is recycled whatever the threads' timing.
    while n * 8000 < SEGMENT_BYTES / 2 + 8000 {
        put_numbered(&s, n, 8000).await;
        n += 1;
    }
    assert!(
        poll(|| journal.join("spare.zero").exists()),
        "no spare was written"
    );
    let in_segment = |i: u64| move |p: &std::path::PathBuf| p.ends_with(format!("{i:016}.log"));
    while !segments(&live).iter().any(in_segment(1)) {
        put_numbered(&s, n, 8000).await;
        n += 1;
    }
    // Named for the segment it was: it may only become a later one.
    let spare = journal.join("spare.0000000000000000");
    let recycled = poll(|| std::fs::metadata(&spare).is_ok_and(|m| m.ino() == inode));
    let names: Vec<_> = std::fs::read_dir(&journal)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(recycled, "segment 0 did not become the spare: {names:?}");
    assert!(!first.exists(), "{names:?}");
    let bytes = std::fs::read(&spare).unwrap();
    assert_eq!(bytes.len() as u64, SEGMENT_BYTES);
    assert!(
        bytes[..4096].iter().all(|&b| b == 0),
        "the first page is not zeroed"
    );
    assert!(
        bytes[4096..].iter().any(|&b| b != 0),
        "the recycled spare was zeroed whole"
    );
    // Every item so far dropped: segment 0's records say they are queued.
    let dropped = n;
    drop_all(&s, "health").await;
    // Into segment 2, the recycled file: a few records over segment 0's.
    while !segments(&live).iter().any(in_segment(2)) {
        put_numbered(&s, n, 8000).await;
        n += 1;
    }
    for _ in 0..3 {
        put_numbered(&s, n, 8000).await;
        n += 1;
    }
    let current = segments(&live).pop().unwrap();
    assert_eq!(std::fs::metadata(&current).unwrap().ino(), inode);
    // Segment 1 (the drops) checkpointed first: a copy taken while sled is
    // flushed and the segment renamed meanwhile could miss both.
    assert!(
        poll(|| journal.join("spare.0000000000000001").exists()),
        "segment 1 was not recycled"
    );
    crash_copy(&live, &copy);
    let r = open(&copy, 1 << 30);
    assert_eq!(r.queued_bytes(), (n - dropped) * 8000);
    let want: Vec<u8> = (dropped..n).map(|i| (i % 251) as u8).collect();
    assert_eq!(first_bytes(&r, "health"), want);
}

/// Where each record of a segment's bytes begins, up to the first zeros;
/// the last offset is where the records end.
fn record_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut at = vec![0];
    let mut end = 0;
    while end + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[end..end + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        end += 8 + len;
        at.push(end);
    }
    at
}

/// A clean stop empties the journal, and the next open numbers segments
/// on past the spare it keeps: a spare recycled from segment 0 never
/// becomes segment 0 again, where its records would check. Whether an old
/// record begins right where the new ones end is up to their sizes, so the
/// crash copy's newest segment is made so: its own records, then the
/// spare's from one of their boundaries. The items dropped before the stop
/// stay dropped.
#[tokio::test]
async fn a_spare_kept_over_a_clean_stop_never_replays_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let (live, copy) = (dir.path().join("live"), dir.path().join("copy"));
    let mut n = 0u64;
    {
        let s = open(&live, 1 << 30);
        // Past half of segment 0, then wait for the (new) spare, so segment
        // 1 is that spare and segment 0, once checkpointed, the next one.
        while n * 8000 < SEGMENT_BYTES / 2 + 8000 {
            put_numbered(&s, n, 8000).await;
            n += 1;
        }
        assert!(poll(|| spare(&live).is_some()), "no spare was written");
        while !segments(&live).iter().any(|p| segment_number(p) == 1) {
            put_numbered(&s, n, 8000).await;
            n += 1;
        }
        let first = journal::dir(&live).join("0000000000000000.log");
        assert!(
            poll(|| !first.exists() && spare(&live).is_some()),
            "segment 0 was not recycled"
        );
        drop_all(&s, "health").await;
    }
    assert!(segments(&live).is_empty());
    let kept = spare(&live).expect("the clean stop did not keep the spare");
    let old = std::fs::read(&kept).unwrap();
    // Where segment 0's first whole record begins, past the zeroed page.
    let old_at = (4096..old.len())
        .find(|&at| begins_with_record_of(&old[at..], 0))
        .expect("the spare holds none of segment 0's records");
    let s = open(&live, 1 << 30);
    let dropped = n;
    let current = segments(&live).pop().unwrap();
    assert!(segment_number(&current) >= 1, "{current:?} after {kept:?}");
    for _ in 0..3 {
        put_numbered(&s, n, 8000).await;
        n += 1;
    }
    crash_copy(&live, &copy);
    let newest = segments(&copy).pop().unwrap();
    let ours = std::fs::read(&newest).unwrap();
    let end = record_offsets(&ours)[3];
    std::fs::write(&newest, [&ours[..end], &old[old_at..]].concat()).unwrap();
    let r = open(&copy, 1 << 30);
    let want: Vec<u8> = (dropped..n).map(|i| (i % 251) as u8).collect();
    assert_eq!(first_bytes(&r, "health"), want);
}

/// Whether `bytes` begin with a whole record bound to segment `n`: its
/// CRC-32 over `n` (u64 BE) and its group bytes.
fn begins_with_record_of(bytes: &[u8], n: u64) -> bool {
    let Some(head) = bytes.get(..8) else {
        return false;
    };
    let len = u32::from_be_bytes(head[..4].try_into().unwrap()) as usize;
    let sum = u32::from_be_bytes(head[4..].try_into().unwrap());
    let Some(body) = bytes.get(8..8 + len).filter(|_| len > 0) else {
        return false;
    };
    let mut h = crc32fast::Hasher::new();
    h.update(&n.to_be_bytes());
    h.update(body);
    h.finalize() == sum
}

/// The journal's spare, if it has one.
fn spare(store: &std::path::Path) -> Option<std::path::PathBuf> {
    std::fs::read_dir(journal::dir(store))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            name.starts_with("spare.") && !name.ends_with(".partial")
        })
}

/// Rewrites the CRC of every record of a segment as `crc` of its group
/// bytes; returns how many records there were.
fn rewrite_crcs(segment: &std::path::Path, crc: impl Fn(&[u8]) -> u32) -> usize {
    let mut bytes = std::fs::read(segment).unwrap();
    let offsets = record_offsets(&bytes);
    for pair in offsets.windows(2) {
        let sum = crc(&bytes[pair[0] + 8..pair[1]]);
        bytes[pair[0] + 4..pair[0] + 8].copy_from_slice(&sum.to_be_bytes());
    }
    std::fs::write(segment, bytes).unwrap();
    offsets.len() - 1
}

/// What a recycled segment holds after its new records, record for
/// record: records the journal wrote in another segment, here segment 1
/// of another store, queueing items of 7s. Behind the last segment's own
/// records, at a record's boundary, they end the journal and none replays.
#[tokio::test]
async fn another_segment_s_records_after_the_last_record_are_not_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let (copy, last) = crashed_with(dir.path(), 3).await;
    assert_eq!(segment_number(&last), 0);
    let other = dir.path().join("other");
    let s = open(&other, 1 << 30);
    let mut i = 0;
    while !segments(&other).iter().any(|p| segment_number(p) == 1) {
        put_numbered(&s, i, 1000).await;
        i += 1;
    }
    for _ in 0..3 {
        s.transact(|tx| tx.push_outbox("health", &[7; 100], Held::Nothing, 0))
            .await
            .unwrap();
    }
    let theirs = std::fs::read(journal::dir(&other).join(format!("{:016}.log", 1))).unwrap();
    let end = *record_offsets(&theirs).last().unwrap();
    assert!(end > 0, "segment 1 of the other store holds no record");
    let mut ours = std::fs::read(&last).unwrap();
    assert_eq!(*record_offsets(&ours).last().unwrap(), ours.len());
    ours.extend_from_slice(&theirs[..end]);
    std::fs::write(&last, ours).unwrap();
    holds_the_three(&copy);
}

/// A journal left by a build from before records were bound to their
/// segment (the CRC of the group bytes alone) still replays whole.
#[tokio::test]
async fn a_journal_from_before_segment_bound_records_replays() {
    let dir = tempfile::tempdir().unwrap();
    let (copy, last) = crashed_with(dir.path(), 3).await;
    assert_eq!(rewrite_crcs(&last, crc32fast::hash), 3);
    holds_the_three(&copy);
}

/// A record is bound to the segment it was written in: a segment renamed
/// to another number replays nothing as the last segment, and before the
/// last it is corruption, named.
#[tokio::test]
async fn records_under_another_segment_number_are_not_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let (copy, last) = crashed_with(dir.path(), 3).await;
    let n = segment_number(&last);
    let moved = last.with_file_name(format!("{:016}.log", n + 1));
    std::fs::rename(&last, &moved).unwrap();
    let r = open(&copy, 1 << 20);
    assert!(first_bytes(&r, "health").is_empty());
    drop(r);

    let (copy, last) = crashed_with(&dir.path().join("again"), 3).await;
    let n = segment_number(&last);
    std::fs::rename(&last, last.with_file_name(format!("{:016}.log", n + 1))).unwrap();
    std::fs::write(last.with_file_name(format!("{:016}.log", n + 2)), []).unwrap();
    let err = Store::open(&config(&copy, 1 << 20)).err().unwrap().to_string();
    assert!(
        err.contains(&format!("{:016}.log", n + 1)) && err.contains("corrupt"),
        "{err}"
    );
}

/// The segment size is the store's configuration, and may change from one
/// open to the next: a segment of the old size left by a crash replays as
/// it is, a spare of the old size is not used but replaced by one of the
/// new size, and segments are retired at the new size.
#[tokio::test]
async fn the_segment_size_may_change_between_opens() {
    let dir = tempfile::tempdir().unwrap();
    let open_sized = |path: &std::path::Path, segment: u64| {
        Store::open(&StoreConfig {
            journal_segment_bytes: segment,
            ..config(path, 1 << 30)
        })
        .unwrap()
    };
    let spare_len =
        |store: &std::path::Path| spare(store).map_or(0, |p| std::fs::metadata(p).map_or(0, |m| m.len()));
    let mut n = 0u64;
    let mut store = dir.path().join("0");
    // Each round: the store crashed at the end of the last one, opened with
    // another size, written past one and a half segments of it, crashed.
    for (round, size) in [SEGMENT_BYTES, 2 * SEGMENT_BYTES, SEGMENT_BYTES]
        .into_iter()
        .enumerate()
    {
        let s = open_sized(&store, size);
        assert_eq!(s.queued_bytes(), n * 1000, "round {round}: a replay lost items");
        let first = segments(&store).pop().unwrap();
        // A spare of the old size left by the crash is not the new segment.
        assert_eq!(std::fs::metadata(&first).unwrap().len(), 0, "round {round}");
        // Until the segment this open started is retired, and a spare of
        // the new size written: about one and a half segments.
        // Its length when last seen, and so when it was retired (within a
        // record: the checkpointer may take it before the test looks).
        let (mut seen_len, mut retired_len) = (0, None);
        for _ in 0..4 * size / 1000 {
            put_numbered(&s, n, 1000).await;
            n += 1;
            match std::fs::metadata(&first) {
                Ok(m) => seen_len = m.len(),
                Err(_) => retired_len = retired_len.or(Some(seen_len)),
            }
            if retired_len.is_some() && spare_len(&store) == size {
                break;
            }
        }
        let retired_len = retired_len.expect("the first segment was never retired");
        assert!(
            retired_len + 2000 >= size && retired_len < size + 2000,
            "round {round}: a segment retired at {retired_len} bytes, not {size}"
        );
        // Nothing left for the checkpointer: the crash copy is then not
        // taken half way through a checkpoint.
        assert!(
            poll(|| segments(&store).len() == 1 && spare_len(&store) == size),
            "round {round}: the journal did not settle at {size} bytes"
        );
        let copy = dir.path().join(format!("{}", round + 1));
        crash_copy(&store, &copy);
        drop(s);
        store = copy;
    }
    let r = open(&store, 1 << 30);
    assert_eq!(r.queued_bytes(), n * 1000);
    let want: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    assert_eq!(first_bytes(&r, "health"), want);
}

/// Sequence numbers and receipt cursors handed out before a crash that
/// only the journal kept are not handed out again: a new item after the
/// restart queues behind the replayed ones instead of overwriting one.
#[tokio::test]
async fn numbers_handed_out_before_a_crash_are_not_reused() {
    let dir = tempfile::tempdir().unwrap();
    let (live, copy) = (dir.path().join("live"), dir.path().join("copy"));
    let s = open(&live, 1 << 20);
    let mut cursors = Vec::new();
    for i in 0..2u8 {
        let c = s
            .transact(|tx| {
                tx.push_outbox("health", &[i; 10], Held::Nothing, 0)?;
                tx.log_receipt(Bytes::copy_from_slice(&[i]), b"")
            })
            .await
            .unwrap();
        cursors.push(c);
    }
    crash_copy(&live, &copy);
    let r = open(&copy, 1 << 20);
    let c = r
        .transact(|tx| {
            tx.push_outbox("health", &[2; 10], Held::Nothing, 0)?;
            tx.log_receipt(Bytes::copy_from_slice(&[2]), b"")
        })
        .await
        .unwrap();
    assert!(
        c > cursors[1],
        "cursor {c} handed out again (before: {cursors:?})"
    );
    assert_eq!(first_bytes(&r, "health"), vec![0, 1, 2]);
    let log: Vec<Vec<u8>> = r
        .receipts_after(0, 10)
        .unwrap()
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    assert_eq!(log, vec![vec![0], vec![1], vec![2]]);
}

/// Zeros after the last record (a file system that extended the file but
/// never wrote it, after a power cut) are not a record: the open keeps
/// every group and starts after them.
#[tokio::test]
async fn a_zero_filled_journal_tail_is_not_a_record() {
    let dir = tempfile::tempdir().unwrap();
    let (copy, last) = crashed_with(dir.path(), 2).await;
    let mut bytes = std::fs::read(&last).unwrap();
    bytes.extend_from_slice(&[0; 4096]);
    std::fs::write(&last, bytes).unwrap();
    let r = open(&copy, 1 << 20);
    assert_eq!(first_bytes(&r, "health"), vec![0, 1]);
}

/// Zeros are an end only in the last segment: a retired segment was
/// written past its size, so zeros in it are lost records, and the open
/// refuses rather than skip acknowledged groups.
#[tokio::test]
async fn zeros_in_a_segment_before_the_last_stop_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let (copy, last) = crashed_with(dir.path(), 2).await;
    let records = std::fs::read(&last).unwrap();
    let n = segment_number(&last);
    // The same groups again in a newer segment (a replay is idempotent),
    // and zeros after them in the older one.
    std::fs::write(last.with_file_name(format!("{:016}.log", n + 1)), &records).unwrap();
    let mut padded = records;
    padded.extend_from_slice(&[0; 4096]);
    std::fs::write(&last, padded).unwrap();
    let err = Store::open(&config(&copy, 1 << 20)).expect_err("the open must refuse");
    assert!(
        err.to_string().contains("bad record before the last segment"),
        "{err}"
    );
}

/// A power cut between removing a spare of another size and renaming the
/// new one can leave two spares. The open keeps one, and numbers its
/// segments past the `k` of every `spare.<k>` it saw.
#[tokio::test]
async fn two_spares_at_open_leave_one_and_segments_number_past_both() {
    let dir = tempfile::tempdir().unwrap();
    let (copy, last) = crashed_with(dir.path(), 2).await;
    assert_eq!(segment_number(&last), 0);
    let jdir = journal::dir(&copy);
    std::fs::write(jdir.join("spare.zero"), vec![0; SEGMENT_BYTES as usize]).unwrap();
    let recycled = jdir.join(format!("spare.{:016}", 5));
    std::fs::write(&recycled, vec![0; SEGMENT_BYTES as usize]).unwrap();
    let r = open(&copy, 1 << 20);
    assert_eq!(first_bytes(&r, "health"), vec![0, 1]);
    let spares: Vec<_> = std::fs::read_dir(&jdir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("spare."))
        .collect();
    assert!(spares.len() <= 1, "{spares:?}");
    let newest = segments(&copy).pop().unwrap();
    assert!(segment_number(&newest) >= 6, "{newest:?}");
}

/// A crash right after the spare became the newest segment, before any
/// record went into it, and another while the next spare was half
/// written: the open replays every group, stops at the zeros, deletes the
/// partial spare, and does not take a spare of another size.
#[tokio::test]
async fn a_zeroed_newest_segment_and_partial_or_odd_spares_are_handled() {
    let dir = tempfile::tempdir().unwrap();
    let (copy, last) = crashed_with(dir.path(), 2).await;
    let n = segment_number(&last);
    let jdir = journal::dir(&copy);
    std::fs::write(
        jdir.join(format!("{:016}.log", n + 1)),
        vec![0; SEGMENT_BYTES as usize],
    )
    .unwrap();
    std::fs::write(jdir.join("spare.zero.partial"), [0; 4096]).unwrap();
    std::fs::write(jdir.join("spare.zero"), [0; 4096]).unwrap();
    let r = open(&copy, 1 << 20);
    assert_eq!(first_bytes(&r, "health"), vec![0, 1]);
    assert!(!jdir.join("spare.zero.partial").exists());
    // The new segment is a new file, not the spare of another size.
    let newest = segments(&copy).pop().unwrap();
    assert_eq!(std::fs::metadata(&newest).unwrap().len(), 0, "{newest:?}");
}

/// A clean stop, even with full segments just handed to the checkpointer,
/// leaves no segment behind: never an older one without the newer ones,
/// which a later open would replay over newer state.
#[tokio::test]
async fn a_clean_stop_empties_the_journal_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let n = 3 * SEGMENT_BYTES / 1000;
    {
        let s = open(dir.path(), 1 << 30);
        for i in 0..n {
            s.transact(|tx| tx.push_outbox("health", &[(i % 251) as u8; 1000], Held::Nothing, 0))
                .await
                .unwrap();
        }
    }
    assert!(segments(dir.path()).is_empty(), "{:?}", segments(dir.path()));
    let r = open(dir.path(), 1 << 30);
    assert_eq!(r.queued_bytes(), n * 1000);
}

/// A record with its envelope's and receipts' signer certificates.
fn record_with_certs(cert: &[u8]) -> MessageRecord {
    use antar_core::wire::{SignedEnvelope, SignedReceipt};
    MessageRecord {
        envelope: Some(SignedEnvelope {
            envelope: vec![7; 50].into(),
            signature: vec![8; 64].into(),
            signer_cert: cert.to_vec().into(),
            ..Default::default()
        }),
        receipts: (0..2)
            .map(|i| SignedReceipt {
                receipt: vec![i; 40].into(),
                signature: vec![9; 64].into(),
                signer_cert: cert.to_vec().into(),
                ..Default::default()
            })
            .collect(),
        state: 2,
        ..Default::default()
    }
}

/// A record with certificates and a 1 KB payload, stored in `s`.
async fn stored_with_body(s: &Store) -> (MessageId, MessageRecord) {
    let id = MessageId::new();
    let mut record = record_with_certs(&[3; 300]);
    record.payload = Some(antar_core::wire::Payload {
        salt: vec![1; 32].into(),
        data: vec![2; 1000].into(),
    });
    s.transact(|tx| tx.put_message(&id, &record)).await.unwrap();
    (id, record)
}

/// A record's signer certificates are stored once, outside it, and put
/// back on every read — through the transaction, the store, a crash — while
/// a record stored with them inline (before) reads as it was.
#[tokio::test]
async fn signer_certificates_are_stored_once_and_put_back() {
    let dir = tempfile::tempdir().unwrap();
    let (live, copy) = (dir.path().join("live"), dir.path().join("copy"));
    let s = open(&live, 1 << 20);
    let cert: Vec<u8> = (0..400u32).map(|i| (i * 7 % 251) as u8).collect();
    let record = record_with_certs(&cert);
    let (id, old) = (MessageId::new(), MessageId::new());
    let seen = s
        .transact(|tx| {
            tx.put_message(&id, &record)?;
            tx.message(&id)
        })
        .await
        .unwrap();
    assert_eq!(seen.as_ref(), Some(&record));
    assert_eq!(s.message(&id).unwrap().as_ref(), Some(&record));
    let raw = s.inner.trees[keys::MESSAGES].get(id.as_bytes()).unwrap().unwrap();
    assert!(
        !raw.windows(cert.len()).any(|w| w == cert.as_slice()),
        "the record still holds the certificate"
    );
    let key = certs::key(&antar_core::envelope::sha256(&cert));
    assert_eq!(
        s.inner.trees[keys::META].get(&key).unwrap().unwrap(),
        cert.as_slice()
    );

    // Written inline by an earlier version: read as it is.
    s.inner.trees[keys::MESSAGES]
        .insert(old.as_bytes(), prost::Message::encode_to_vec(&record))
        .unwrap();
    assert_eq!(s.message(&old).unwrap().as_ref(), Some(&record));

    let lost = dir.path().join("lost");
    crash_copy(&live, &copy);
    crash_copy(&live, &lost);
    let r = open(&copy, 1 << 20);
    assert_eq!(r.message(&id).unwrap().as_ref(), Some(&record));
    // Read again, now from the cache of certificates.
    assert_eq!(r.message(&id).unwrap().as_ref(), Some(&record));

    // A digest with no certificate behind it is corruption, not a guess.
    let l = open(&lost, 1 << 20);
    l.inner.trees[keys::META].remove(&key).unwrap();
    let err = l.message(&id).unwrap_err().to_string();
    assert!(err.contains("no signer certificate"), "{err}");
}

/// A record's envelope and payload live apart from it and are written only
/// when they change: a state change rewrites the small record alone, a
/// purged payload rewrites the body; reads see the whole record throughout.
#[tokio::test]
async fn a_record_body_is_written_only_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (live, copy) = (dir.path().join("live"), dir.path().join("copy"));
    let s = open(&live, 1 << 20);
    let (id, mut record) = stored_with_body(&s).await;
    let stored = s.inner.trees[keys::MESSAGES].get(id.as_bytes()).unwrap().unwrap();
    assert!(
        stored.len() < 400,
        "the record still holds its body: {} bytes",
        stored.len()
    );

    // Read, change the state, write back: the body is not written again.
    let writes = |change: &dyn Fn(&mut MessageRecord)| {
        let tx = Tx::new(&s.inner.trees, [None, None], 1, &s.inner.certs);
        let mut r = tx.message(&id).unwrap().unwrap();
        change(&mut r);
        tx.put_message(&id, &r).unwrap();
        let (writes, _, _) = tx.into_parts();
        writes.get(keys::BODIES, id.as_bytes()).is_some()
    };
    assert!(!writes(&|r| r.state = 3));
    assert!(writes(&|r| r.payload = None));
    // Written twice in one transaction, the second time with the body it
    // read: the second write must undo the first's body, not skip it.
    let tx = Tx::new(&s.inner.trees, [None, None], 1, &s.inner.certs);
    let read = tx.message(&id).unwrap().unwrap();
    let mut purged = read.clone();
    purged.payload = None;
    tx.put_message(&id, &purged).unwrap();
    tx.put_message(&id, &read).unwrap();
    assert_eq!(tx.message(&id).unwrap().as_ref(), Some(&read));

    // A reader outside a transaction sees a group being applied: the body
    // goes in first, so no record shows without its envelope.
    let tx = Tx::new(&s.inner.trees, [None, None], 1, &s.inner.certs);
    tx.push_inbox("birth.lookup", &id, 10).unwrap();
    tx.put_message(&MessageId::new(), &record).unwrap();
    let (group, _, _) = tx.into_parts();
    let order: Vec<usize> = group.iter().map(|(tree, ..)| tree).collect();
    let at = |tree| order.iter().position(|t| *t == tree).unwrap();
    assert!(at(keys::BODIES) < at(keys::MESSAGES), "{order:?}");

    s.transact(|tx| {
        let mut r = tx.message(&id)?.unwrap();
        r.state = 4;
        tx.put_message(&id, &r)
    })
    .await
    .unwrap();
    record.state = 4;
    assert_eq!(s.message(&id).unwrap().as_ref(), Some(&record));
    crash_copy(&live, &copy);
    assert_eq!(open(&copy, 1 << 20).message(&id).unwrap().as_ref(), Some(&record));
}

/// A body written by the transaction that logged its signed envelope is
/// stored without the envelope, which the Merkle-log entry holds (ADR
/// 0011), and reads back whole: in the transaction, through the store, a
/// reader of several records, and a crash. A body written without its
/// envelope logged beside it, or rewritten by a payload purge, is stored
/// whole, its signer certificate as a digest, as before.
#[tokio::test]
async fn a_body_is_stored_without_the_envelope_its_log_entry_holds() {
    use antar_core::wire::{EntryKind, Payload};
    let dir = tempfile::tempdir().unwrap();
    let (live, copy) = (dir.path().join("live"), dir.path().join("copy"));
    let s = open(&live, 1 << 20);
    let cert: Vec<u8> = (0..400u32).map(|i| (i * 7 % 251) as u8).collect();
    let records: Vec<(MessageId, MessageRecord)> = (0..4u8)
        .map(|i| {
            let mut record = record_with_certs(&cert);
            record.envelope.as_mut().unwrap().envelope = vec![100 + i; 300].into();
            record.payload = Some(Payload {
                salt: vec![1; 32].into(),
                data: vec![i; 1000].into(),
            });
            (MessageId::new(), record)
        })
        .collect();
    let (logged, unlogged) = records.split_at(3);
    s.transact(|tx| {
        for (id, record) in logged {
            let signed = record.envelope.as_ref().unwrap();
            let data = Bytes::from(signed.encode_to_vec());
            let cert = Held::Cert(&signed.signer_cert);
            tx.audit_append(EntryKind::Envelope, data, cert, &id.to_string())?;
            tx.put_message(id, record)?;
            assert_eq!(tx.message(id)?.as_ref(), Some(record));
        }
        tx.put_message(&unlogged[0].0, &unlogged[0].1)
    })
    .await
    .unwrap();

    let stored = |s: &Store, id: &MessageId| s.inner.trees[keys::BODIES].get(id.as_bytes()).unwrap().unwrap();
    let holds = |stored: &[u8], part: &[u8]| stored.windows(part.len()).any(|w| w == part);
    for (id, record) in logged {
        let signed = record.envelope.as_ref().unwrap().encode_to_vec();
        let whole = MessageRecord {
            envelope: record.envelope.clone(),
            payload: record.payload.clone(),
            ..Default::default()
        }
        .encode_to_vec();
        let stored = stored(&s, id);
        // A cut's head (6 bytes), the entry's index and the part's length (12).
        assert_eq!(stored[..2], [0, 3], "a cut of a log entry's data");
        assert_eq!(stored.len(), whole.len() - signed.len() + 6 + 12);
        assert!(!holds(&stored, &record.envelope.as_ref().unwrap().envelope));
    }
    let (id, record) = &unlogged[0];
    let stored_whole = stored(&s, id);
    assert_ne!(stored_whole[0], 0, "stored whole");
    assert!(holds(&stored_whole, &record.envelope.as_ref().unwrap().envelope));
    assert!(!holds(&stored_whole, &cert), "the certificate stays a digest");

    let check = |s: &Store| {
        let reader = s.messages();
        for (id, record) in &records {
            assert_eq!(reader.get(id).unwrap().as_ref(), Some(record));
        }
        for (id, record) in records.iter().rev() {
            assert_eq!(s.message(id).unwrap().as_ref(), Some(record));
        }
    };
    check(&s);
    crash_copy(&live, &copy);
    check(&open(&copy, 1 << 20));

    // In a group, the log goes into sled before the bodies cut against it.
    let tx = Tx::new(&s.inner.trees, [None, None], 1, &s.inner.certs);
    let id = MessageId::new();
    let signed = records[0].1.envelope.clone().unwrap();
    let data = Bytes::from(signed.encode_to_vec());
    tx.audit_append(EntryKind::Envelope, data, Held::Nothing, &id.to_string())
        .unwrap();
    tx.put_message(&id, &records[0].1).unwrap();
    let (group, _, _) = tx.into_parts();
    let order: Vec<usize> = group.iter().map(|(tree, ..)| tree).collect();
    let at = |tree| order.iter().position(|t| *t == tree).unwrap();
    assert!(at(keys::AUDIT) < at(keys::BODIES), "{order:?}");
    assert!(at(keys::BODIES) < at(keys::MESSAGES), "{order:?}");
    assert_eq!(
        group.get(keys::BODIES, id.as_bytes()).unwrap().as_ref().unwrap()[..2],
        [0, 3]
    );

    // A state change leaves the body alone; a purge stores it whole.
    let (id, _) = &logged[0];
    let tx = Tx::new(&s.inner.trees, [None, None], 1, &s.inner.certs);
    let mut r = tx.message(id).unwrap().unwrap();
    r.state = 3;
    tx.put_message(id, &r).unwrap();
    assert!(tx.into_parts().0.get(keys::BODIES, id.as_bytes()).is_none());
    assert_eq!(s.purge_payloads(|_| true).await.unwrap(), 4);
    for (id, record) in &records {
        let mut purged = record.clone();
        purged.payload = None;
        assert_eq!(s.message(id).unwrap(), Some(purged));
        let stored = stored(&s, id);
        assert_ne!(stored[0], 0, "stored whole");
        assert!(!holds(&stored, &cert), "the certificate stays a digest");
    }
}

/// `update_message` changes a record's state and receipts without reading
/// or writing its body, and the record reads back whole; a record with
/// its body inline (an older store) is written whole; no record, no write.
#[tokio::test]
async fn update_message_leaves_the_body_alone() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 1 << 20);
    let (id, mut record) = stored_with_body(&s).await;
    let new_receipt = antar_core::wire::SignedReceipt {
        receipt: vec![5; 40].into(),
        signature: vec![6; 64].into(),
        signer_cert: vec![4; 300].into(),
        ..Default::default()
    };

    let tx = Tx::new(&s.inner.trees, [None, None], 1, &s.inner.certs);
    let mut seen = None;
    let found = tx
        .update_message(&id, |r| {
            seen = Some(r.clone());
            r.state = 5;
            r.receipts.push(new_receipt.clone());
        })
        .unwrap();
    assert!(found);
    let seen = seen.unwrap();
    assert_eq!((seen.envelope, seen.payload), (None, None), "the body was read");
    assert_eq!(seen.receipts, record.receipts, "certificates put back");
    let (writes, _, _) = tx.into_parts();
    assert!(
        writes.get(keys::BODIES, id.as_bytes()).is_none(),
        "the body was written"
    );

    s.transact(|tx| {
        tx.update_message(&id, |r| {
            r.state = 5;
            r.receipts.push(new_receipt.clone());
        })
    })
    .await
    .unwrap();
    record.state = 5;
    record.receipts.push(new_receipt);
    assert_eq!(s.message(&id).unwrap().as_ref(), Some(&record));

    // An older record, body inline: written whole, the body moved out.
    let old = MessageId::new();
    s.inner.trees[keys::MESSAGES]
        .insert(old.as_bytes(), record.encode_to_vec())
        .unwrap();
    s.transact(|tx| tx.update_message(&old, |r| r.state = 6))
        .await
        .unwrap();
    record.state = 6;
    assert_eq!(s.message(&old).unwrap().as_ref(), Some(&record));
    assert!(s.inner.trees[keys::BODIES].get(old.as_bytes()).unwrap().is_some());

    // A payload given alone replaces the stored one; the envelope stays.
    let payload = antar_core::wire::Payload {
        salt: vec![9; 32].into(),
        data: vec![8; 10].into(),
    };
    let mut expected = s.message(&id).unwrap().unwrap();
    s.transact(|tx| tx.update_message(&id, |r| r.payload = Some(payload.clone())))
        .await
        .unwrap();
    expected.payload = Some(payload);
    assert_eq!(s.message(&id).unwrap().as_ref(), Some(&expected));

    let tx = Tx::new(&s.inner.trees, [None, None], 1, &s.inner.certs);
    assert!(!tx
        .update_message(&MessageId::new(), |_| panic!("no record"))
        .unwrap());
    let (writes, _, _) = tx.into_parts();
    assert!(writes.iter().next().is_none());
}

/// A store sled recovered nothing from (killed before sled first wrote
/// its log, by a version that did not flush a new store) may hold blob
/// files no log points to; they are removed before anything is written,
/// or the journal's replay would collide with them.
#[test]
fn orphan_blob_files_of_a_store_never_written_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let blob = dir.path().join("blobs").join("181769");
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    std::fs::write(&blob, b"left by a crash").unwrap();
    let s = open(dir.path(), 1 << 20);
    assert!(!blob.exists(), "the orphan blob file is still there");
    drop(s);
    // A store sled recovered leaves its blobs directory to sled (which
    // itself removes only blobs past its stable log position).
    let below = dir.path().join("blobs").join("0");
    std::fs::write(&below, b"not ours to judge").unwrap();
    let _s = open(dir.path(), 1 << 20);
    assert!(below.exists());
}

#[tokio::test]
async fn inbox_after_resumes_past_a_sequence_number_within_one_service() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 1 << 20);
    // Names where one is a prefix of another must not leak into each other.
    let services = ["ab", "a", "a.b", "a", "ab", "a"];
    let mut ids = Vec::new();
    for service in services {
        let id = MessageId::new();
        s.transact(|tx| tx.push_inbox(service, &id, 1)).await.unwrap();
        ids.push((service, id));
    }
    let of = |service: &str, after: Option<u64>| -> Vec<(u64, Vec<u8>)> {
        s.inbox_after(service, after)
            .map(|e| e.map(|(seq, entry)| (seq, entry.message_id)).unwrap())
            .collect()
    };
    let a = of("a", None);
    let expected: Vec<Vec<u8>> = ids
        .iter()
        .filter(|(s, _)| *s == "a")
        .map(|(_, id)| id.as_bytes().to_vec())
        .collect();
    assert_eq!(a.iter().map(|(_, id)| id.clone()).collect::<Vec<_>>(), expected);
    assert!(a.windows(2).all(|w| w[0].0 < w[1].0), "in arrival order: {a:?}");
    // After the first: the other two; after the last: nothing.
    assert_eq!(of("a", Some(a[0].0)), a[1..].to_vec());
    assert_eq!(of("a", Some(a[2].0)), Vec::new());
    assert_eq!(of("a.b", None).len(), 1);
    assert_eq!(of("ab", None).len(), 2);
    assert_eq!(of("b", None), Vec::new());

    // Services with entries, in name order, one at a time.
    let mut listed = Vec::new();
    let mut at = None;
    while let Some(next) = s.next_inbox_service(at.as_deref()).unwrap() {
        listed.push(next.clone());
        at = Some(next);
    }
    assert_eq!(listed, ["a", "a.b", "ab"]);
}

/// A record keeps the receipts of the receipt log by cursor: a read
/// outside a transaction puts them in after those the record holds itself,
/// a transaction's read leaves the cursors for its write; a cursor with
/// nothing under it is named as corruption.
#[tokio::test]
async fn a_records_receipts_in_the_receipt_log_come_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 1 << 20);
    let (id, mut record) = stored_with_body(&s).await;
    let receipt = |n: u8| antar_core::wire::SignedReceipt {
        receipt: vec![n; 40].into(),
        signature: vec![n; 64].into(),
        signer_cert: vec![4; 300].into(),
        ..Default::default()
    };
    let (second, third) = (receipt(8), receipt(9));
    s.transact(|tx| {
        for r in [&second, &third] {
            let cursor = tx.log_receipt(r.encode_to_vec().into(), &r.signer_cert)?;
            tx.update_message(&id, |rec| rec.receipt_cursors.push(cursor))?;
        }
        Ok(())
    })
    .await
    .unwrap();
    let inline = record.receipts.len();
    assert!(inline > 0, "stored_with_body holds a receipt inline");
    record.receipts.extend([second.clone(), third.clone()]);
    assert_eq!(s.message(&id).unwrap().as_ref(), Some(&record));

    // Read and written back in a transaction: still cursors, not copies.
    let kept = s
        .transact(|tx| {
            let r = tx.message(&id)?.unwrap();
            tx.put_message(&id, &r)?;
            Ok(r)
        })
        .await
        .unwrap();
    assert_eq!((kept.receipts.len(), kept.receipt_cursors.len()), (inline, 2));
    assert_eq!(s.message(&id).unwrap().as_ref(), Some(&record));

    // A reader outside a transaction may see a group half applied: a
    // receipt goes into the log before the record that points at it.
    let tx = Tx::new(&s.inner.trees, [None, None], 1, &s.inner.certs);
    let cursor = tx
        .log_receipt(second.encode_to_vec().into(), &second.signer_cert)
        .unwrap();
    tx.update_message(&id, |rec| rec.receipt_cursors.push(cursor))
        .unwrap();
    let (group, _, _) = tx.into_parts();
    let order: Vec<usize> = group.iter().map(|(tree, ..)| tree).collect();
    let at = |tree| order.iter().position(|t| *t == tree).unwrap();
    assert!(at(keys::RECEIPT_LOG) < at(keys::MESSAGES), "{order:?}");
    // And a signer certificate seen for the first time goes into `meta`
    // before the record that refers to it (and its inbox entry).
    let tx = Tx::new(&s.inner.trees, [None, None], 1, &s.inner.certs);
    let fresh = MessageId::new();
    tx.put_message(&fresh, &record_with_certs(&[7; 333])).unwrap();
    tx.push_inbox("birth.lookup", &fresh, 10).unwrap();
    let (group, _, _) = tx.into_parts();
    let order: Vec<usize> = group.iter().map(|(tree, ..)| tree).collect();
    let at = |tree| order.iter().position(|t| *t == tree).unwrap();
    assert!(at(keys::META) < at(keys::MESSAGES), "{order:?}");
    assert!(at(keys::MESSAGES) < at(keys::INBOX), "{order:?}");

    // A record pointing at an empty cursor is corrupt, and says which.
    s.transact(|tx| tx.update_message(&id, |rec| rec.receipt_cursors.push(1 << 40)))
        .await
        .unwrap();
    let err = s.message(&id).unwrap_err().to_string();
    assert!(err.contains("receipt log cursor 1099511627776"), "{err}");
}

/// A record knows the receipts it holds by their digests. One written
/// before digests existed — its receipts inline or in the receipt log —
/// has them hashed when asked, and the digests kept once it is written
/// back. An update its closure declines writes nothing.
#[tokio::test]
async fn a_record_knows_its_receipts_by_digest_even_one_from_before_digests() {
    use antar_core::wire::SignedReceipt;
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 1 << 20);
    let (id, record) = stored_with_body(&s).await;
    let inline = record.receipts;
    assert_eq!(inline.len(), 2, "record_with_certs holds two receipts inline");
    let receipt = |n: u8| SignedReceipt {
        receipt: vec![n; 40].into(),
        signature: vec![n; 64].into(),
        signer_cert: vec![4; 300].into(),
        ..Default::default()
    };
    let (old, new) = (receipt(8), receipt(9));
    let digest = |r: &SignedReceipt| antar_core::envelope::sha256(&r.receipt);
    // As a build from before digests wrote it: a cursor, and no digest.
    s.transact(|tx| {
        let cursor = tx.log_receipt(old.encode_to_vec().into(), &old.signer_cert)?;
        tx.update_message(&id, |rec| rec.receipt_cursors.push(cursor))?;
        Ok(())
    })
    .await
    .unwrap();
    drop(s);
    let s = open(dir.path(), 1 << 20);

    // The receipt handed over is taken when the record does not hold it.
    let apply = |r: SignedReceipt| {
        let s = s.clone();
        async move {
            s.transact(move |tx| {
                tx.update_message_if(&id, |rec| {
                    if tx.holds_receipt(&id, rec, &digest(&r))? {
                        return Ok(false);
                    }
                    let cursor = tx.log_receipt(r.encode_to_vec().into(), &r.signer_cert)?;
                    rec.push_logged_receipt(cursor, &digest(&r));
                    Ok(true)
                })
            })
            .await
            .unwrap()
        }
    };
    for r in [&inline[0], &inline[1], &old] {
        assert_eq!(apply(r.clone()).await, Some(false));
    }
    assert_eq!(apply(new.clone()).await, Some(true));
    assert_eq!(apply(new.clone()).await, Some(false));
    let stored = s.message(&id).unwrap().unwrap();
    let all = [&inline[0], &inline[1], &old, &new];
    assert!(stored.receipts.iter().eq(all), "receipts in order, none twice");
    assert_eq!(
        stored.receipt_digests,
        all.map(digest).concat(),
        "the digests of the older receipts were filled in"
    );

    // Declined: not one write.
    let tx = Tx::new(&s.inner.trees, [None, None], 1, &s.inner.certs);
    assert_eq!(tx.update_message_if(&id, |_| Ok(false)).unwrap(), Some(false));
    assert_eq!(
        tx.update_message_if(&MessageId::new(), |_| Ok(true)).unwrap(),
        None
    );
    let (group, _, _) = tx.into_parts();
    assert_eq!(group.iter().count(), 0);
}

/// An inbox entry is found through its message's record, which keeps its
/// key; without a record — or queued by a build from before, whose record
/// keeps none — through `inbox_index`, and an indexed message whose entry
/// is gone is taken out all the same, as before.
#[tokio::test]
async fn an_inbox_entry_is_found_through_its_record_or_the_old_index() {
    let dir = tempfile::tempdir().unwrap();
    let [recorded, older, gone, bare] = [(); 4].map(|()| MessageId::new());
    {
        let s = open(dir.path(), 1 << 20);
        s.transact(|tx| {
            tx.put_message(&recorded, &MessageRecord::default())?;
            tx.push_inbox("birth.lookup", &recorded, 10)?;
            tx.push_inbox("birth.lookup", &bare, 20)
        })
        .await
        .unwrap();
        let index = &s.inner.trees[keys::INBOX_INDEX];
        assert!(index.get(recorded.as_bytes()).unwrap().is_none());
        assert!(index.get(bare.as_bytes()).unwrap().is_some());
        // As a build from before wrote one: a record without the key, an index entry.
        s.transact(|tx| tx.put_message(&older, &MessageRecord::default()))
            .await
            .unwrap();
        let key = keys::seq_key("birth.lookup", 1 << 30);
        let entry = InboxEntry {
            message_id: older.as_bytes().to_vec(),
            size: 40,
            service: "birth.lookup".into(),
        };
        s.inner.trees[keys::INBOX]
            .insert(&key, entry.encode_to_vec())
            .unwrap();
        index.insert(older.as_bytes(), key).unwrap();
        // And an index entry whose inbox entry is gone.
        index
            .insert(gone.as_bytes(), keys::seq_key("birth.lookup", 1 << 31))
            .unwrap();
        s.close().await.unwrap();
    }
    let s = open(dir.path(), 1 << 20);
    assert_eq!(s.queued_bytes(), 70);
    for (id, left) in [(&recorded, 60), (&older, 20), (&gone, 20), (&bare, 0)] {
        assert!(s.transact(|tx| tx.in_inbox(id)).await.unwrap());
        assert!(s.transact(|tx| tx.remove_inbox(id)).await.unwrap());
        assert!(!s.transact(|tx| tx.in_inbox(id)).await.unwrap());
        assert!(!s.transact(|tx| tx.remove_inbox(id)).await.unwrap());
        assert_eq!(s.queued_bytes(), left);
    }
    assert_eq!(s.inbox_scan(None).count(), 0);
    assert_eq!(s.inner.trees[keys::INBOX_INDEX].len(), 0);
}

/// Log values are stored without what the store holds already — a signer
/// certificate, a receipt the same transaction logged — and read back byte
/// for byte: by cursor, as log entries, in the log's Merkle tree, and after
/// a reopen with nothing cached. A certificate gone from `meta` is named
/// as corruption of the tree that needed it.
#[tokio::test]
async fn log_values_are_stored_without_shared_parts_and_read_back_byte_for_byte() {
    use antar_core::merkle;
    use antar_core::wire::{EntryKind, LogEntry, SignedEnvelope, SignedReceipt};
    let dir = tempfile::tempdir().unwrap();
    let (node_cert, other_cert) = (vec![5u8; 436], vec![6u8; 420]);
    let receipt = SignedReceipt {
        receipt: vec![1; 120].into(),
        signature: vec![2; 64].into(),
        signer_cert: node_cert.clone().into(),
        ..Default::default()
    }
    .encode_to_vec();
    let envelope = SignedEnvelope {
        envelope: vec![3; 300].into(),
        signature: vec![4; 64].into(),
        signer_cert: other_cert.clone().into(),
        ..Default::default()
    }
    .encode_to_vec();
    let check = |s: &Store, cursor: u64| {
        assert_eq!(s.receipts_after(0, 10).unwrap(), vec![(cursor, receipt.clone())]);
        let entries = s.audit_entries(0, 10).unwrap();
        let data: Vec<Vec<u8>> = entries
            .iter()
            .map(|(_, raw)| LogEntry::decode(raw.as_slice()).unwrap().data.to_vec())
            .collect();
        assert_eq!(data, [receipt.clone(), envelope.clone(), envelope.clone()]);
        let leaves: Vec<merkle::Hash> = entries.iter().map(|(_, raw)| merkle::leaf_hash(raw)).collect();
        let mut tree = s.audit_tree(3).unwrap();
        assert_eq!(merkle::root_of(&mut tree, 3).unwrap(), merkle::root(&leaves));
    };
    let s = open(dir.path(), 1 << 20);
    let cursor = s
        .transact(|tx| {
            let cursor = tx.log_receipt(Bytes::copy_from_slice(&receipt), &node_cert)?;
            tx.audit_append(
                EntryKind::Receipt,
                Bytes::copy_from_slice(&receipt),
                Held::Logged(cursor),
                "m1",
            )?;
            for message in ["m2", "m3"] {
                let envelope = Bytes::copy_from_slice(&envelope);
                tx.audit_append(EntryKind::Envelope, envelope, Held::Cert(&other_cert), message)?;
            }
            Ok(cursor)
        })
        .await
        .unwrap();
    check(&s, cursor);
    // What sled holds: each certificate once in `meta`, the log values
    // without them, the receipt's log entry without the receipt.
    let stored = |tree: usize, key: u64| runs::get(&s.inner.trees, tree, key).unwrap().unwrap().len();
    // A cut's head: mark, kind, offset (6 bytes), then a digest or a cursor.
    assert_eq!(
        stored(keys::RECEIPT_LOG, cursor),
        receipt.len() - node_cert.len() + 6 + 32
    );
    let whole = s.audit_entries(0, 10).unwrap();
    assert_eq!(stored(keys::AUDIT, 0), whole[0].1.len() - receipt.len() + 6 + 8);
    for i in [1, 2] {
        assert_eq!(
            stored(keys::AUDIT, i),
            whole[i as usize].1.len() - other_cert.len() + 6 + 32
        );
    }
    let certs = s.inner.trees[keys::META].scan_prefix(b"cert\0").count();
    assert_eq!(certs, 2);
    // An outbox item too: counted and returned whole, stored without the
    // certificate, and counted whole again after a reopen.
    s.transact(|tx| tx.push_outbox("health", &envelope, Held::Cert(&other_cert), 0))
        .await
        .unwrap();
    assert_eq!(s.queued_bytes(), envelope.len() as u64);
    let value = s.inner.trees[keys::OUTBOX].iter().next().unwrap().unwrap().1;
    assert_eq!(value.len(), 8 + envelope.len() - other_cert.len() + 6 + 32);
    assert_eq!(s.outbox_batch("health", None, 10).unwrap()[0].1, envelope);
    drop(s);
    let s = open(dir.path(), 1 << 20);
    assert_eq!(s.queued_bytes(), envelope.len() as u64);
    let seq = s.outbox_batch("health", None, 10).unwrap()[0].0;
    let taken = s.transact(|tx| tx.remove_outbox("health", seq)).await.unwrap();
    assert_eq!(taken, Some(envelope.clone()));
    assert_eq!(s.queued_bytes(), 0);
    drop(s);

    let s = open(dir.path(), 1 << 20);
    check(&s, cursor);
    // The envelopes' signer certificate is lost: reads that need it fail, naming it.
    let digest = antar_core::envelope::sha256(&other_cert);
    s.inner.trees[keys::META].remove(certs::key(&digest)).unwrap();
    drop(s);
    let s = open(dir.path(), 1 << 20);
    let err = s.audit_entries(0, 10).unwrap_err().to_string();
    assert!(err.contains("corrupt record in tree audit"), "{err}");
    assert!(
        err.contains(&format!(
            "no signer certificate with SHA-256 {}",
            certs::hex(&digest)
        )),
        "{err}"
    );
    assert!(err.contains("at log entry 1"), "{err}");
    assert_eq!(s.receipts_after(0, 10).unwrap(), vec![(cursor, receipt)]);
}

/// One outbox batch restores items whose log entries lie in several runs
/// of the audit log, every item whole: the reader keeps the last run it
/// read, and must answer from it only for the numbers it holds.
#[tokio::test]
async fn an_outbox_batch_restores_items_from_several_log_runs() {
    use antar_core::wire::EntryKind;
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 1 << 20);
    let data = |g: u8, i: u8| vec![10 * g + i; 200];
    // Three transactions one after another: three groups, three runs.
    for g in 0..3 {
        s.transact(|tx| {
            for i in 0..3 {
                let index = tx.audit_append(
                    EntryKind::Envelope,
                    Bytes::copy_from_slice(&data(g, i)),
                    Held::Nothing,
                    "m",
                )?;
                tx.push_outbox("health", &data(g, i), Held::Audited(index), 0)?;
            }
            Ok(())
        })
        .await
        .unwrap();
    }
    assert_eq!(s.inner.trees[keys::AUDIT].len(), 3, "one run a group");
    let stored: usize = s.inner.trees[keys::OUTBOX]
        .iter()
        .map(|kv| kv.unwrap().1.len())
        .sum();
    assert!(
        stored < 9 * 100,
        "the items are stored without their entries' data: {stored}"
    );
    let all: Vec<Vec<u8>> = (0..3).flat_map(|g| (0..3).map(move |i| data(g, i))).collect();
    let batch = s.outbox_batch("health", None, 100).unwrap();
    assert_eq!(batch.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(), all);
    // From inside the second run on; a batch that ends inside it; one
    // that ends on its last item.
    let after = Some(batch[3].0);
    let rest = s.outbox_batch("health", after, 100).unwrap();
    assert_eq!(rest.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(), all[4..]);
    let one = s.outbox_batch("health", after, 1).unwrap();
    assert_eq!(one.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(), all[4..5]);
    let two = s.outbox_batch("health", after, 2).unwrap();
    assert_eq!(two.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(), all[4..6]);
}

/// An outbox item holds the signed envelope its transaction appended to
/// the Merkle log by the entry's index: stored without it, counted and
/// returned whole, before and after a reopen, and counted off whole when
/// dropped unread. The log entry reaches sled
/// before the item that refers to it; an item without the entry's data is
/// stored whole.
#[tokio::test]
async fn an_outbox_item_holds_its_log_entry_by_index() {
    use antar_core::wire::{
        transfer_item, EntryKind, EnvelopeTransfer, Payload, SignedEnvelope, TransferItem,
    };
    let dir = tempfile::tempdir().unwrap();
    let cert = vec![6u8; 420];
    let signed = SignedEnvelope {
        envelope: vec![3; 300].into(),
        signature: vec![4; 64].into(),
        signer_cert: cert.clone().into(),
        ..Default::default()
    };
    let item = TransferItem {
        seq: 0,
        item: Some(transfer_item::Item::Envelope(EnvelopeTransfer {
            envelope: Some(signed.clone()),
            payload: Some(Payload {
                salt: vec![1; 32].into(),
                data: vec![2; 1000].into(),
            }),
            hops: vec!["finance".into()],
            traceparent: String::new(),
        })),
    }
    .encode_to_vec();
    let signed = signed.encode_to_vec();
    let s = open(dir.path(), 1 << 20);
    s.transact(|tx| {
        let index = tx.audit_append(
            EntryKind::Envelope,
            Bytes::copy_from_slice(&signed),
            Held::Cert(&cert),
            "m",
        )?;
        tx.push_outbox("health", &item, Held::Audited(index), 0)?;
        // Not holding the entry's data: whole.
        tx.push_outbox("hub", b"\x0aunrelated", Held::Audited(index), 0)
    })
    .await
    .unwrap();
    let stored = |s: &Store, peer: &str| {
        let (_, v) = s.inner.trees[keys::OUTBOX]
            .scan_prefix(keys::prefixed(peer))
            .next()
            .unwrap()
            .unwrap();
        v.len() - 8
    };
    assert_eq!(stored(&s, "health"), item.len() - signed.len() + 6 + 12);
    assert_eq!(stored(&s, "hub"), 10);
    assert_eq!(s.queued_bytes(), (item.len() + 10) as u64);
    assert_eq!(s.outbox_batch("health", None, 10).unwrap()[0].1, item);
    drop(s);

    let s = open(dir.path(), 1 << 20);
    assert_eq!(s.queued_bytes(), (item.len() + 10) as u64);
    // The entry's data, read back in a later transaction as it was logged
    // (its certificate put back); no entry past the log's end.
    let (logged, past) = s
        .transact(|tx| Ok((tx.audit_data(0)?, tx.audit_data(1)?)))
        .await
        .unwrap();
    assert_eq!((logged.as_deref(), past), (Some(signed.as_slice()), None));
    let seq = s.outbox_batch("health", None, 10).unwrap()[0].0;
    let taken = s.transact(|tx| tx.remove_outbox("health", seq)).await.unwrap();
    assert_eq!(taken.as_deref(), Some(item.as_slice()));
    assert_eq!(s.queued_bytes(), 10);
    // Dropped unread, once.
    let seq = s.outbox_batch("hub", None, 10).unwrap()[0].0;
    assert!(s.transact(|tx| tx.drop_outbox("hub", seq)).await.unwrap());
    assert!(!s.transact(|tx| tx.drop_outbox("hub", seq)).await.unwrap());
    assert_eq!(s.queued_bytes(), 0);

    // A group applies log entries before the outbox items that hold them.
    let tx = Tx::new(&s.inner.trees, [None, None], 1, &s.inner.certs);
    let index = tx
        .audit_append(
            EntryKind::Envelope,
            Bytes::copy_from_slice(&signed),
            Held::Cert(&cert),
            "m",
        )
        .unwrap();
    tx.push_outbox("health", &item, Held::Audited(index), 0).unwrap();
    let (group, _, _) = tx.into_parts();
    let order: Vec<usize> = group.iter().map(|(tree, ..)| tree).collect();
    let at = |tree| order.iter().position(|t| *t == tree).unwrap();
    assert!(at(keys::AUDIT) < at(keys::OUTBOX), "{order:?}");
    assert!(at(keys::AUDIT) < at(keys::AUDIT_META), "{order:?}");
}

/// A group's appends to `receipt_log` and `audit` are stored as runs, one
/// sled value each (`runs.rs`), and read like values stored alone: by key,
/// in ranges from any point (a cursor between two receipts included), as
/// the parts of cuts — an outbox item holding a log entry that holds a
/// receipt, both inside runs —, in the Merkle tree, after a reopen. A
/// replay over values an older build wrote alone leaves none of them
/// beside the runs, and replaying again writes the same values.
#[tokio::test]
async fn a_groups_log_appends_are_stored_as_runs() {
    use antar_core::merkle;
    use antar_core::wire::{EntryKind, LogEntry};
    let dir = tempfile::tempdir().unwrap();
    let cert = [7u8; 40];
    let receipts: Vec<Vec<u8>> = (0..4u8)
        .map(|i| [&[i + 1; 20][..], &cert, &vec![i + 1; 30 + usize::from(i)]].concat())
        .collect();
    let cursors = {
        let s = open(dir.path(), 1 << 20);
        // One entry alone, as every value of a store from before runs.
        s.transact(|tx| {
            tx.audit_append(
                EntryKind::Envelope,
                Bytes::copy_from_slice(b"alone"),
                Held::Nothing,
                "m0",
            )
            .map(drop)
        })
        .await
        .unwrap();
        let inner = &s.inner;
        let tx = Tx::new(&inner.trees, [None, None], 100, &inner.certs);
        let mut cursors = Vec::new();
        for (i, receipt) in receipts.iter().enumerate() {
            let cursor = tx.log_receipt(Bytes::copy_from_slice(receipt), &cert).unwrap();
            let index = tx
                .audit_append(
                    EntryKind::Receipt,
                    Bytes::copy_from_slice(receipt),
                    Held::Logged(cursor),
                    &format!("m{i}"),
                )
                .unwrap();
            // Takes a sequence number: the receipts' cursors have gaps.
            tx.push_outbox("health", receipt, Held::Audited(index), 0)
                .unwrap();
            cursors.push(cursor);
        }
        let (writes, _, _) = tx.into_parts();
        let logs = |inner: &Inner| -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
            [keys::AUDIT, keys::RECEIPT_LOG]
                .map(|t| {
                    inner.trees[t]
                        .iter()
                        .map(|kv| kv.unwrap())
                        .map(|(k, v)| (k.to_vec(), v.to_vec()))
                        .collect()
                })
                .to_vec()
        };
        let write = |pass| {
            group::write_all(
                &inner.trees,
                writes.iter().map(|(t, k, v)| (t, k, v.clone())),
                pass,
            )
            .unwrap();
        };
        // As a build from before runs left it at a crash: every value alone
        // (here, the receipts' and the first two entries).
        for (tree, key, value) in writes.iter() {
            if tree == keys::RECEIPT_LOG || (tree == keys::AUDIT && keys::u64_of(key) < 3) {
                inner.trees[tree].insert(key, value.clone().unwrap()).unwrap();
            }
        }
        write(group::Pass::Replay);
        let once = logs(inner);
        write(group::Pass::Replay);
        assert_eq!(logs(inner), once, "a replay writes the same values");
        // The lone entry and one run; one run of receipts.
        assert_eq!(once[0].len(), 2);
        assert_eq!(once[1].len(), 1);
        inner.db.flush().unwrap();
        cursors
    };
    let s = open(dir.path(), 1 << 20);
    assert!(cursors.windows(2).all(|w| w[1] > w[0] + 1), "{cursors:?}");

    let entries = s.audit_entries(0, 10).unwrap();
    assert_eq!(
        entries.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    let data: Vec<Vec<u8>> = entries
        .iter()
        .map(|(_, raw)| LogEntry::decode(raw.as_slice()).unwrap().data.to_vec())
        .collect();
    assert_eq!(data, [&[b"alone".to_vec()][..], &receipts].concat());
    assert_eq!(s.audit_entries(2, 2).unwrap(), entries[2..4]);
    assert_eq!(s.audit_entries(5, 2).unwrap(), []);

    let logged: Vec<_> = cursors.iter().copied().zip(receipts.iter().cloned()).collect();
    assert_eq!(s.receipts_after(0, 10).unwrap(), logged);
    assert_eq!(s.receipts_after(cursors[1], 10).unwrap(), logged[2..]);
    assert_eq!(s.receipts_after(cursors[1] + 1, 1).unwrap(), logged[2..3]);

    let leaves: Vec<merkle::Hash> = entries.iter().map(|(_, raw)| merkle::leaf_hash(raw)).collect();
    let mut tree = s.audit_tree(5).unwrap();
    assert_eq!(merkle::root_of(&mut tree, 5).unwrap(), merkle::root(&leaves));
    assert_eq!(
        merkle::inclusion_proof_of(&mut tree, 3, 5).unwrap(),
        merkle::inclusion_proof(3, &leaves).unwrap()
    );

    let items: Vec<Vec<u8>> = s
        .outbox_batch("health", None, 10)
        .unwrap()
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    assert_eq!(items, receipts);
    assert_eq!(
        s.queued_bytes(),
        receipts.iter().map(|r| r.len() as u64).sum::<u64>()
    );
}

/// Joining a transaction's writes to a group keeps the later write where
/// both wrote a key — a removal too —, whichever of the two is larger.
#[test]
fn joined_writes_keep_the_later_one() {
    use crate::tx::Writes;
    use sled::IVec;
    let writes = |pairs: &[(u8, Option<u8>)]| {
        let mut w = Writes::default();
        for (k, v) in pairs {
            w.set(keys::OUTBOX, vec![*k], v.map(|v| IVec::from(&[v][..])));
        }
        w
    };
    let joined = |early: Writes, later: Writes| {
        let mut w = early;
        w.append(later);
        w.iter()
            .map(|(_, k, v)| (k[0], v.as_ref().map(|v| v[0])))
            .collect::<Vec<_>>()
    };
    // The later writes fewer than the group...
    assert_eq!(
        joined(
            writes(&[(1, Some(1)), (2, Some(1)), (3, Some(1))]),
            writes(&[(2, None)])
        ),
        [(1, Some(1)), (2, None), (3, Some(1))]
    );
    // ...and more.
    assert_eq!(
        joined(
            writes(&[(2, None), (4, Some(1))]),
            writes(&[(1, Some(2)), (2, Some(2)), (3, Some(2))])
        ),
        [(1, Some(2)), (2, Some(2)), (3, Some(2)), (4, Some(1))]
    );
}

/// What a group queues for one peer (or one service) is one sled value;
/// items taken out of it come out of that value, which goes once empty.
/// An item alone whose expiry begins like a run is read as itself.
#[tokio::test]
async fn a_groups_queue_items_are_stored_as_runs_and_taken_out_run_by_run() {
    let dir = tempfile::tempdir().unwrap();
    let items: Vec<Vec<u8>> = (0..10u8).map(|i| vec![0x0a, i, i]).collect();
    // In the outbox a value alone begins with its expiry: here, like a run.
    let odd = u64::from_be_bytes([cuts::MARK, cuts::RUN, 0, 0, 0, 0, 0, 9]);
    let ids: Vec<MessageId> = (0..5).map(|_| MessageId::new()).collect();
    let (seqs, hub, want) = {
        let s = open(dir.path(), 1 << 20);
        let values = |tree: usize| s.inner.trees[tree].len();
        let (seqs, hub) = s
            .transact(|tx| {
                let mut seqs = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let expires_ms = if i == 3 || i == 6 { 77 } else { 0 };
                    seqs.push(tx.push_outbox("health", item, Held::Nothing, expires_ms)?);
                }
                let hub = tx.push_outbox("hub", b"\x0aalone", Held::Nothing, odd)?;
                for id in &ids {
                    tx.push_inbox("birth.notify", id, 10)?;
                }
                Ok((seqs, hub))
            })
            .await
            .unwrap();
        assert_eq!(values(keys::OUTBOX), 2, "a run for health, the hub's item alone");
        assert_eq!(values(keys::INBOX), 1, "a run");
        assert_eq!(s.outbox_depths(), [("health".into(), 10), ("hub".into(), 1)]);
        assert_eq!(s.outbox_depth("health"), 10);
        assert_eq!(s.inbox_depths(), [("birth.notify".into(), 5)]);
        assert_eq!(
            s.outbox_batch("hub", None, 5).unwrap(),
            [(hub, b"\x0aalone".to_vec())]
        );
        let due = [("health".into(), seqs[3]), ("health".into(), seqs[6])];
        assert_eq!(s.expired(100, 10).unwrap(), due);

        // Three from the middle of the run, and two inbox entries.
        s.transact(|tx| {
            for seq in &seqs[2..5] {
                assert!(tx.drop_outbox("health", *seq)?);
            }
            for id in &ids[..2] {
                assert!(tx.remove_inbox(id)?);
            }
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(values(keys::OUTBOX), 2, "the run, rewritten");
        assert_eq!(values(keys::INBOX), 1);
        let want: Vec<(u64, Vec<u8>)> = seqs
            .iter()
            .copied()
            .zip(items.iter().cloned())
            .enumerate()
            .filter(|(i, _)| !(2..5).contains(i))
            .map(|(_, item)| item)
            .collect();
        assert_eq!(s.outbox_batch("health", None, 20).unwrap(), want);
        assert_eq!(s.outbox_batch("health", Some(seqs[1]), 2).unwrap(), want[2..4]);
        assert_eq!(
            s.outbox_batch("health", Some(seqs[3]), 1).unwrap(),
            want[2..3],
            "after one taken"
        );
        assert_eq!(s.expired(100, 10).unwrap(), due[1..]);
        let inbox: Vec<Vec<u8>> = s
            .inbox_after("birth.notify", None)
            .map(|e| e.unwrap().1.message_id)
            .collect();
        assert_eq!(
            inbox,
            ids[2..]
                .iter()
                .map(|id| id.as_bytes().to_vec())
                .collect::<Vec<_>>()
        );
        s.durable().await.unwrap();
        (seqs, hub, want)
    };

    // Counted, indexed and read back from the runs after a restart.
    let s = open(dir.path(), 1 << 20);
    let values = |tree: usize| s.inner.trees[tree].len();
    assert_eq!(s.queued_bytes(), 7 * 3 + 6 + 3 * 10);
    assert_eq!(s.expired(100, 10).unwrap(), [("health".into(), seqs[6])]);
    assert_eq!(
        s.expired(u64::MAX - 1, 10).unwrap().len(),
        2,
        "and the hub's item"
    );
    assert_eq!(s.outbox_batch("health", None, 20).unwrap(), want);
    assert_eq!(s.inbox_scan(None).count(), 3);

    // Taking the rest takes the runs away.
    s.transact(|tx| {
        for (seq, item) in &want {
            assert_eq!(tx.remove_outbox("health", *seq)?.as_ref(), Some(item));
        }
        for id in &ids[2..] {
            assert!(tx.remove_inbox(id)?);
        }
        assert!(!tx.drop_outbox("health", seqs[2])?, "taken before");
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(values(keys::OUTBOX), 1, "only the hub's item");
    assert_eq!(values(keys::INBOX), 0);
    assert!(s.outbox_depth_is_zero("health"));
    assert_eq!(s.queued_bytes(), 6);
    assert_eq!(
        s.outbox_batch("hub", None, 5).unwrap(),
        [(hub, b"\x0aalone".to_vec())]
    );
}

/// A transaction answers for the items of a run from the run it read,
/// also while the applier rewrites that run under it: what it takes out
/// is the group the transaction reads first.
#[tokio::test]
async fn a_transaction_keeps_the_run_it_read_and_stays_right_while_it_is_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 1 << 20);
    let seqs = s
        .transact(|tx| {
            (0..6u8)
                .map(|i| tx.push_outbox("health", &[0x0a, i], Held::Nothing, 0))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .unwrap();
    let inner = &s.inner;
    assert_eq!(inner.trees[keys::OUTBOX].len(), 1, "one run");
    let apply = |writes: &tx::Writes| {
        let writes = writes.iter().map(|(t, k, v)| (t, k, v.clone()));
        group::write_all(&inner.trees, writes, group::Pass::First).unwrap();
    };
    // The group being applied takes items 1 and 2.
    let mut applying = tx::Writes::default();
    for seq in &seqs[1..3] {
        applying.set(keys::OUTBOX, keys::seq_key("health", *seq), None);
    }
    let tx = Tx::new(&inner.trees, [None, Some(&applying)], 1000, &inner.certs);
    assert_eq!(tx.remove_outbox("health", seqs[0]).unwrap(), Some(vec![0x0a, 0]));
    // The applier writes that group now: the run in sled loses 1 and 2.
    apply(&applying);
    assert!(
        !tx.drop_outbox("health", seqs[1]).unwrap(),
        "taken by the group below"
    );
    assert!(!tx.drop_outbox("health", seqs[2]).unwrap());
    assert_eq!(tx.remove_outbox("health", seqs[3]).unwrap(), Some(vec![0x0a, 3]));
    assert!(tx.drop_outbox("health", seqs[5]).unwrap());
    let (writes, _, _) = tx.into_parts();
    apply(&writes);
    assert_eq!(
        s.outbox_batch("health", None, 10).unwrap(),
        [(seqs[4], vec![0x0a, 4])]
    );
    assert_eq!(inner.trees[keys::OUTBOX].len(), 1);
}

#[test]
fn a_store_held_by_another_handle_is_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let held = open(dir.path(), 1 << 20);
    let started = std::time::Instant::now();
    let err = Store::open(&config(dir.path(), 1 << 20)).unwrap_err();
    assert!(
        started.elapsed() >= LOCK_WAIT,
        "gave up after {:?}",
        started.elapsed()
    );
    assert!(matches!(&err, StoreError::InUse(p) if p == dir.path()), "{err}");
    assert!(err.to_string().contains("in use by another process"), "{err}");
    drop(held);
}

#[test]
fn open_waits_for_a_lock_let_go_of_soon() {
    // sled lets go of its lock a little after the last handle is dropped;
    // here the other handle is dropped 300 ms into the wait.
    let dir = tempfile::tempdir().unwrap();
    let held = open(dir.path(), 1 << 20);
    let started = std::time::Instant::now();
    let dropper = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(held);
    });
    let s = open(dir.path(), 1 << 20);
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    assert!(started.elapsed() < LOCK_WAIT);
    dropper.join().unwrap();
    drop(s);
}
