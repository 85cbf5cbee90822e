//! Tree names and key layout.
//!
//! | tree | key | value |
//! |---|---|---|
//! | `messages` | message id (16 bytes) | `MessageRecord`, without its envelope and payload (in `bodies`), signer certificates as their SHA-256 (`certs.rs`), receipts of its own messages as `receipt_log` cursors, the SHA-256 of each receipt it holds (`receipt_digests`), and its `inbox` key once queued there (`inbox_key`); records from before hold them inline, and no digests or inbox key |
//! | `bodies` | message id | `MessageRecord` holding only the envelope and payload: written when they change, not with every state change; without the signed envelope (a cut, `cuts.rs`) when the transaction that wrote it logged that envelope in `audit` (ADR 0011), else its signer certificate as a SHA-256 (`certs.rs`) |
//! | `outbox` | peer `\0` seq (u64 BE) | expires_ms (u64 BE) ‖ `TransferItem`, its signed envelope or receipt cut out (held by its `audit` entry) or else its signer certificate (`cuts.rs`); a group's items for one peer as one run under the first seq (`runs.rs`), taken out of it one by one |
//! | `inbox` | service `\0` seq (u64 BE) | `InboxEntry`; a group's entries for one service as one run under the first seq (`runs.rs`) |
//! | `inbox_index` | message id | inbox key, of a message without a record, or queued by a build from before `inbox_key` |
//! | `seen` | namespace `\0` key: `envelope` (written by relays; recipients dedup by the record), `rejected` / `rejected-verified` (a REJECTED receipt was issued about an envelope refused before or without verification / a verified one for this agency), `refused` (a verified envelope for this agency refused for good; the value is the reason) or `resent` (the receipts about a message received from that sender went to it again when it offered the message again; the value is when, ms u64 BE) ‖ sender `\0` message id; `receipt-of` / `relayed-receipt-of` ‖ message id (text) ‖ SHA-256 of the receipt, so that one period's keys sit together (`receipt-of`: only receipts about no message this node holds a record of, since records know their receipts; builds from before marked every one); stores from before hold `receipt` / `relayed-receipt` ‖ SHA-256 alone, and then `receipts-by-id-since` ‖ ms (u64 BE) when a newer build first ran on them; `sent` ‖ peer agency, the value a sequence number (u64 BE) at or above every outbox item sent to that peer (removed when an administrator releases the queue of a former peer), and `sent-reserved-since` ‖ the last sequence number (u64 BE) handed out before the first start that kept them (`antar-node`'s `sent.rs`) | empty: dedup of received envelopes and receipts (but for the values named) |
//! | `tx_keys` | key space `\0` idempotency key: the space is the sending agency's id for a TRANSACTION (on its own node when sent, on the recipient's when delivered), `<agency>/notice`, `/request` or `/reply` for the other kinds (sender side only) | message ids (16 bytes each) |
//! | `receipt_log` | cursor (u64 BE) | `SignedReceipt` about a message this node sent, its signer certificate cut out (`cuts.rs`); a group's receipts as one run under the first cursor (`runs.rs`) |
//! | `dead` | message id | `DeadLetter` |
//! | `expiry` | expires_ms (u64 BE) ‖ peer `\0` seq | no longer written; cleared on open: the index of the outbox by expiry of builds from before, now kept in memory (`tx::Expiry`) |
//! | `audit` | index (u64 BE, dense from 0) | `LogEntry`: one entry of the Merkle log, its signer certificate — or the receipt it logs, when in `receipt_log` — cut out (`cuts.rs`); restored byte for byte before it is hashed; a group's entries as one run under the first index (`runs.rs`) |
//! | `audit_hash` | index (u64 BE) | no longer written: leaf hashes, in stores from before they were derived from `audit` |
//! | `audit_node` | level (1 byte, ≥ 8) ‖ index (u64 BE) / `nodes` | MTH of the perfect subtree of entries `[index·2^level, (index+1)·2^level)`, derived from `audit` / how many entries they cover (u64 BE), written in the same batch |
//! | `audit_meta` | `size` / `cp` ‖ size (u64 BE) / `seen\0` agency / `wit\0` peer / `split\0` agency | log size / a signed `Checkpoint` with its cosignatures / newest checkpoint witnessed of that agency / size last cosigned by that peer / what a split view of that agency's log showed |
//! | `journal` | id (u64 BE) | in stores from before ADR 0005: a group of writes being applied (`group.rs`); empty between groups |
//! | `meta` | `next_id` / `cert\0` ‖ SHA-256 | the next sequence number or receipt cursor (u64 BE) / a signer certificate (DER) that message records and cut values refer to by its SHA-256 (`certs.rs`, `cuts.rs`); never removed |
//!
//! Sequence numbers come from the store's own counter (`meta`), monotonic
//! across crashes, so queues are FIFO.

pub(crate) const MESSAGES: usize = 0;
pub(crate) const OUTBOX: usize = 1;
pub(crate) const INBOX: usize = 2;
pub(crate) const INBOX_INDEX: usize = 3;
pub(crate) const SEEN: usize = 4;
pub(crate) const TX_KEYS: usize = 5;
pub(crate) const RECEIPT_LOG: usize = 6;
pub(crate) const DEAD: usize = 7;
pub(crate) const EXPIRY: usize = 8;
pub(crate) const AUDIT: usize = 9;
// 10: `audit_hash`, no longer written; its name stays so indexes keep their trees.
pub(crate) const AUDIT_META: usize = 11;
pub(crate) const AUDIT_NODE: usize = 12;
pub(crate) const JOURNAL: usize = 13;
/// The store's own counters: `next_id`.
pub(crate) const META: usize = 14;
/// The envelope and payload of a message, apart from its record.
pub(crate) const BODIES: usize = 15;

pub(crate) const TREES: [&str; 16] = [
    "messages",
    "outbox",
    "inbox",
    "inbox_index",
    "seen",
    "tx_keys",
    "receipt_log",
    "dead",
    "expiry",
    "audit",
    "audit_hash",
    "audit_meta",
    "audit_node",
    "journal",
    "meta",
    "bodies",
];

/// In `meta`: the next sequence number or cursor to hand out (u64 BE),
/// written with every group that hands one out, so a replayed journal
/// restores it and no number is given twice.
pub(crate) const NEXT_ID: &[u8] = b"next_id";

pub(crate) const AUDIT_SIZE: &[u8] = b"size";
pub(crate) const AUDIT_NODES: &[u8] = b"nodes";
pub(crate) const CHECKPOINT_PREFIX: &[u8] = b"cp";

pub(crate) fn prefixed(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 9);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k
}

/// The first key past every `prefixed(name)` key: names hold no `\0`.
pub(crate) fn prefix_end(name: &str) -> Vec<u8> {
    let mut k = prefixed(name);
    k[name.len()] = 1;
    k
}

pub(crate) fn seq_key(name: &str, seq: u64) -> Vec<u8> {
    let mut k = prefixed(name);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub(crate) fn pair_key(name: &str, rest: &[u8]) -> Vec<u8> {
    let mut k = prefixed(name);
    k.extend_from_slice(rest);
    k
}

pub(crate) fn u64_of(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = bytes.len().min(8);
    b[..n].copy_from_slice(&bytes[..n]);
    u64::from_be_bytes(b)
}

pub(crate) fn seq_of(key: &[u8]) -> u64 {
    u64_of(&key[key.len().saturating_sub(8)..])
}

/// Key `key` of `tree` as an operator reads it, for error messages.
pub(crate) fn describe(tree: usize, key: &[u8]) -> String {
    match tree {
        AUDIT => format!("log entry {}", u64_of(key)),
        RECEIPT_LOG => format!("receipt log cursor {}", u64_of(key)),
        OUTBOX | INBOX => format!("{} seq {}", name_of(key), seq_of(key)),
        _ => crate::certs::hex(key),
    }
}

pub(crate) fn name_of(key: &[u8]) -> String {
    let end = key.iter().position(|b| *b == 0).unwrap_or(key.len());
    String::from_utf8_lossy(&key[..end]).into_owned()
}

/// Perfect subtrees of fewer than 2^8 entries are not stored but folded from
/// their leaf hashes when asked for: a 256th of the writes, and a root or
/// proof still reads O(log n) stored hashes plus a few hundred leaves.
pub(crate) const MIN_STORED_LEVEL: u32 = 8;

pub(crate) fn node_key(level: u32, index: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = level as u8;
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}
