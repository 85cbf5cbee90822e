//! What each forwarder may have sent: outbox items never to expire, because
//! the peer may hold them (an envelope it delivered, its custody ack lost
//! to a stalled link). Expiring one could give a message both a DELIVERED
//! and an EXPIRED receipt.
//!
//! While the node runs, a peer's mark is exact: the last item sent to it.
//! Across a crash it is kept through a *reservation*: before a forwarder
//! sends an item above the reservation the store holds for its peer, it
//! raises it to the item's number plus [`RESERVE`], synced. So the store's
//! reservation is at or above every item ever sent to that peer. At start
//! the mark is the reservation, but below [`Store::first_seq`]: every item
//! queued before the restart up to the reservation counts as sent (some
//! were not: those stay queued past their TTL until the peer answers
//! again), and an item queued since is sent or expires as usual. A clean
//! stop records the exact marks, so the cost stays with crashes.
//!
//! A peer that refuses a batch saying it took nothing unacked
//! ([`crate::peer::NOT_TAKEN`]: over its ceiling or its rate) puts the mark
//! back where it was when that stream began ([`SentMarks::not_taken`]): so
//! envelopes a full peer keeps refusing still expire at their TTL.
//!
//! Sequence numbers are node-wide (outbox items, inbox entries, receipt
//! cursors), so a reservation covers fewer than [`RESERVE`] of one peer's
//! items. One forwarder per peer marks and reserves. An administrator's
//! release of a former peer's queue removes its mark and reservation
//! ([`forget`]): then none of its items count as sent.

use std::collections::HashMap;

use antar_store::{Store, StoreError};

use crate::error::store_failure;

/// The `seen` namespace holding, per peer (the key), its reservation (u64
/// BE).
pub(crate) const SENT: &str = "sent";

/// The `seen` namespace whose one key is the last sequence number handed
/// out before the first start that kept reservations (u64 BE).
const SINCE: &str = "sent-reserved-since";

/// How far past the item it sends a forwarder reserves: one synced write
/// per this many sequence numbers.
const RESERVE: u64 = 1 << 14;

/// Whether the peer whose mark is `upto` may hold its item `seq`: then it
/// neither expires nor moves to another peer.
pub(crate) fn may_hold(upto: Option<u64>, seq: u64) -> bool {
    upto.is_some_and(|upto| seq <= upto)
}

/// Per peer, what may have been sent to it.
#[derive(Debug, Default)]
pub(crate) struct SentMarks(HashMap<String, Mark>);

#[derive(Debug, Clone, Copy)]
struct Mark {
    /// The last item that may have been sent.
    upto: u64,
    /// The reservation the store holds, when known to be readable.
    reserved: Option<u64>,
}

impl SentMarks {
    /// The marks a node starts with, from the reservations in `store`. On
    /// the first start of a build that keeps them, every item queued counts
    /// as sent: an older build may have sent any of them.
    ///
    /// # Errors
    /// A storage failure.
    pub(crate) async fn load(store: &Store) -> Result<Self, StoreError> {
        let before = store.first_seq().saturating_sub(1);
        let mut marks = Self::default();
        if store.seen_first(SINCE)?.is_none() {
            // Recorded as reservations, so a crash before each forwarder
            // takes its own keeps them counted.
            let peers = store.outbox_peers()?;
            let key = before.to_be_bytes();
            store
                .transact(|tx| {
                    for peer in &peers {
                        tx.note(SENT, peer.as_bytes(), &key)?;
                    }
                    tx.mark_seen(SINCE, &key)
                })
                .await
                .map_err(store_failure)?;
        }
        for (peer, value) in store.notes(SENT)? {
            let peer = String::from_utf8_lossy(&peer).into_owned();
            let reserved = match <[u8; 8]>::try_from(value.as_slice()) {
                Ok(bytes) => u64::from_be_bytes(bytes),
                Err(_) => {
                    tracing::error!(
                        %peer,
                        bytes = value.len(),
                        "what was sent to this peer is unreadable in the store (seen/sent); counting every item queued for it as sent"
                    );
                    u64::MAX
                }
            };
            marks.start(peer, reserved, before);
        }
        Ok(marks)
    }

    /// Starts `peer` from the store's `reserved`; `before` is the last
    /// number handed out before this start.
    fn start(&mut self, peer: String, reserved: u64, before: u64) {
        let mark = self.0.entry(peer).or_insert(Mark {
            upto: 0,
            reserved: None,
        });
        mark.upto = mark.upto.max(reserved.min(before));
        mark.reserved = (reserved != u64::MAX).then_some(reserved);
    }

    /// The last of `peer`'s items that may have been sent.
    pub(crate) fn upto(&self, peer: &str) -> Option<u64> {
        self.0.get(peer).map(|m| m.upto)
    }

    /// Every peer's [`SentMarks::upto`].
    pub(crate) fn snapshot(&self) -> HashMap<String, u64> {
        self.0.iter().map(|(peer, m)| (peer.clone(), m.upto)).collect()
    }

    /// Marks `peer`'s items up to `seq` sent, or about to be. Returns the
    /// reservation the store must hold, synced, before they go, when the
    /// one it holds is below `seq`; [`SentMarks::reserved`] once it does.
    pub(crate) fn mark_sending(&mut self, peer: &str, seq: u64) -> Option<u64> {
        let mark = self.0.entry(peer.to_owned()).or_insert(Mark {
            upto: seq,
            reserved: None,
        });
        mark.upto = mark.upto.max(seq);
        let held = mark.reserved.unwrap_or(0);
        (held < seq).then(|| seq.saturating_add(RESERVE))
    }

    /// Puts `peer`'s mark back to `before`, what it was when a stream
    /// began, once the peer refused a batch of it saying it took none of
    /// what that stream left unacked ([`crate::peer::NOT_TAKEN`]): an item
    /// the stream sent was either acked (and is out of the outbox) or not
    /// taken, and one sent before it stays in doubt. Never raises the mark
    /// (the store's reservation stays: it only bounds the mark from above).
    pub(crate) fn not_taken(&mut self, peer: &str, before: Option<u64>) {
        if let Some(mark) = self.0.get_mut(peer) {
            mark.upto = mark.upto.min(before.unwrap_or(0));
        }
    }

    /// The store holds `reserved` for `peer`, whose items up to some
    /// number were marked ([`SentMarks::mark_sending`]).
    pub(crate) fn reserved(&mut self, peer: &str, reserved: u64) {
        if let Some(mark) = self.0.get_mut(peer) {
            mark.reserved = Some(mark.reserved.unwrap_or(0).max(reserved));
        }
    }

    /// Counts none of `peer`'s items as sent any more ([`forget`]).
    pub(crate) fn forget(&mut self, peer: &str) {
        self.0.remove(peer);
    }
}

/// Records, synced, that none of `peer`'s items were sent: an
/// administrator released its queue (`forward::release`). The caller
/// forgets its mark ([`SentMarks::forget`]) once this returns.
///
/// # Errors
/// A storage failure.
pub(crate) async fn forget(store: &Store, peer: &str) -> Result<(), StoreError> {
    store
        .transact(|tx| tx.unnote(SENT, peer.as_bytes()).map(drop))
        .await
        .map_err(store_failure)
}

/// Records, synced, that `peer`'s items up to `reserved` may have been sent.
///
/// # Errors
/// A storage failure.
pub(crate) async fn reserve(store: &Store, peer: &str, reserved: u64) -> Result<(), StoreError> {
    record(store, [(peer, reserved)]).await
}

/// At a clean stop, once no forwarder runs: records every peer's exact
/// mark as its reservation, so the next start spares only what was sent.
///
/// # Errors
/// A storage failure.
pub(crate) async fn record_exact(store: &Store, marks: &SentMarks) -> Result<(), StoreError> {
    record(store, marks.0.iter().map(|(peer, m)| (peer.as_str(), m.upto))).await
}

/// Writes each (peer, reservation) in one synced transaction; none, none.
async fn record<'a>(
    store: &Store,
    reservations: impl IntoIterator<Item = (&'a str, u64)>,
) -> Result<(), StoreError> {
    let reservations: Vec<(&str, u64)> = reservations.into_iter().collect();
    if reservations.is_empty() {
        return Ok(());
    }
    store
        .transact(|tx| {
            for (peer, reserved) in &reservations {
                tx.note(SENT, peer.as_bytes(), &reserved.to_be_bytes())?;
            }
            Ok(())
        })
        .await
        .map_err(store_failure)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_above_the_reservation_asks_for_one_and_not_again_below_it() {
        let mut marks = SentMarks::default();
        assert_eq!(marks.mark_sending("hub", 10), Some(10 + RESERVE));
        // Not held until the store says so: the next batch asks again.
        assert_eq!(marks.mark_sending("hub", 12), Some(12 + RESERVE));
        marks.reserved("hub", 12 + RESERVE);
        assert_eq!(marks.mark_sending("hub", 12 + RESERVE), None);
        assert_eq!(marks.mark_sending("hub", 13 + RESERVE), Some(13 + 2 * RESERVE));
        assert_eq!(marks.upto("hub"), Some(13 + RESERVE));
        assert_eq!(marks.upto("registry"), None);
        // A lower mark after a failed session's restart from the top keeps the higher one.
        marks.mark_sending("hub", 5);
        assert_eq!(marks.upto("hub"), Some(13 + RESERVE));
    }

    #[test]
    fn a_refusal_that_took_nothing_puts_the_mark_back_never_up() {
        let mut marks = SentMarks::default();
        marks.mark_sending("hub", 40);
        marks.reserved("hub", 40 + RESERVE);
        // A stream began at 40, sent up to 90, was refused taking nothing.
        marks.mark_sending("hub", 90);
        marks.not_taken("hub", Some(40));
        assert_eq!(marks.upto("hub"), Some(40));
        assert!(may_hold(marks.upto("hub"), 40) && !may_hold(marks.upto("hub"), 41));
        // Its reservation stands: the next send below it asks for none.
        assert_eq!(marks.mark_sending("hub", 60), None);
        // A stream that began with no mark leaves nothing in doubt.
        marks.not_taken("hub", None);
        assert_eq!(marks.upto("hub"), Some(0));
        assert!(!may_hold(marks.upto("hub"), 1));
        // Never up, and a peer without a mark gets none.
        marks.not_taken("hub", Some(500));
        assert_eq!(marks.upto("hub"), Some(0));
        marks.not_taken("registry", Some(7));
        assert_eq!(marks.upto("registry"), None);
    }

    fn store_config(dir: &tempfile::TempDir) -> antar_store::StoreConfig {
        antar_store::StoreConfig {
            path: dir.path().into(),
            max_queued_bytes: 1 << 30,
            cache_capacity: 8 << 20,
            journal_segment_bytes: antar_store::DEFAULT_JOURNAL_SEGMENT_BYTES,
        }
    }

    /// On the first start of this build, what an older build queued counts
    /// as sent — also at the start after a crash that came before any
    /// reservation — and what is queued since does not.
    #[tokio::test]
    async fn the_first_start_counts_what_is_queued_as_sent_across_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let config = store_config(&dir);
        let push = |store: &Store, item: &'static [u8]| {
            let store = store.clone();
            async move {
                store
                    .transact(|tx| tx.push_outbox("hub", item, antar_store::Held::Nothing, 0))
                    .await
                    .unwrap()
            }
        };
        let store = Store::open(&config).unwrap();
        let old = push(&store, b"queued by an older build").await;
        drop(store);
        // The first start of this build.
        let store = Store::open(&config).unwrap();
        assert!(may_hold(SentMarks::load(&store).await.unwrap().upto("hub"), old));
        // A crash: no clean stop records the marks.
        drop(store);
        let store = Store::open(&config).unwrap();
        let marks = SentMarks::load(&store).await.unwrap();
        assert!(may_hold(marks.upto("hub"), old));
        let new = push(&store, b"queued since").await;
        assert!(!may_hold(marks.upto("hub"), new));
    }

    /// A release ([`forget`]) holds across a crash: nothing of the peer's
    /// counts as sent at the next start, reserved or not.
    #[tokio::test]
    async fn a_release_holds_across_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let config = store_config(&dir);
        let store = Store::open(&config).unwrap();
        SentMarks::load(&store).await.unwrap();
        reserve(&store, "hub", 10 + RESERVE).await.unwrap();
        reserve(&store, "registry", 20 + RESERVE).await.unwrap();
        drop(store);
        let store = Store::open(&config).unwrap();
        assert!(SentMarks::load(&store).await.unwrap().upto("hub").is_some());
        forget(&store, "hub").await.unwrap();
        drop(store);
        let store = Store::open(&config).unwrap();
        let marks = SentMarks::load(&store).await.unwrap();
        assert_eq!(marks.upto("hub"), None);
        assert!(marks.upto("registry").is_some());
    }

    #[test]
    fn a_start_spares_only_what_was_queued_before_it_up_to_the_reservation() {
        let mut marks = SentMarks::default();
        // Reserved past the last number handed out: everything before counts.
        marks.start("hub".into(), 500, 99);
        assert_eq!(marks.upto("hub"), Some(99));
        // An item queued since (100 on) needs no new reservation up to 500.
        assert_eq!(marks.mark_sending("hub", 400), None);
        // Reserved below: only up to it.
        marks.start("registry".into(), 40, 99);
        assert_eq!(marks.upto("registry"), Some(40));
        // Unreadable, or the first start of this build: all before the start,
        // and no reservation held.
        marks.start("health".into(), u64::MAX, 99);
        assert_eq!(marks.upto("health"), Some(99));
        assert_eq!(marks.mark_sending("health", 100), Some(100 + RESERVE));
    }
}
