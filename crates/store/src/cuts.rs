//! Values stored with a part kept elsewhere cut out.
//!
//! Log values, outbox items and message bodies carry bytes the store holds already: the
//! signer's certificate (436 of a receipt's ~900 bytes), kept once in
//! `meta` (`certs.rs`); in the log entry of a receipt about one of this
//! node's own messages, the whole receipt, logged in `receipt_log` by the
//! same transaction; in an outbox item, the signed envelope or receipt
//! that the same transaction appended to the Merkle log; in a message's
//! body, the signed envelope that the same transaction logged for it
//! (ADR 0011). Written whole,
//! they were most of the bytes a message cost the journal and sled
//! (measured: 16.8 KB per message for both nodes). So such a value is
//! stored as a *cut*: the value without the part, and where the part was
//! and what it was. Reading puts the part back byte for byte — the Merkle
//! log's leaf hashes are over the exact bytes, and nothing outside this
//! crate ever sees a cut.
//!
//! Layout of a cut: `0x00`, the part's kind (1: a certificate, by its
//! SHA-256; 2: a receipt, by its receipt-log cursor, u64 BE; 3: the data
//! of a log entry, by its index, u64 BE, and its length, u32 BE, so that
//! an outbox item's length is known without reading the entry), the part's offset in the value
//! (u32 BE), the reference, then the value without the part. A part read
//! from another value is restored first (at most [`DEPTH`] such steps). No
//! protobuf message begins with a zero byte (there is no field number 0),
//! so a value stored whole — everything written before cuts existed, and
//! any value the part was not found in — is told apart by its first byte
//! and read as it is (one that does begin with it is stored behind
//! `0x00 0x00`). Kind 4 is not a cut: it marks a run of log values or
//! queue items (`runs.rs`), taken apart before any of its values is restored.

use std::borrow::Cow;

use prost::bytes::Bytes;
use prost::Message;
use sled::IVec;

use crate::certs::DIGEST;

/// First byte of a cut, and of a run (`runs.rs`).
pub(crate) const MARK: u8 = 0;
/// Kind of a value stored whole that begins with `MARK` (`whole`).
const WHOLE: u8 = 0;
const CERT: u8 = 1;
const RECEIPT: u8 = 2;
const ENTRY: u8 = 3;
/// Kind of a run of log values or queue items (`runs.rs`): never a cut, read before any.
pub(crate) const RUN: u8 = 4;
/// Parts read from other values, one inside the other, at most: an outbox
/// item's log entry's receipt.
const DEPTH: usize = 2;
/// Mark, kind, offset.
const HEAD: usize = 6;

/// What a cut's part is, by the reference stored in its place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part<'a> {
    /// A signer certificate, by its SHA-256 (its key in `meta`: `certs::key`).
    Cert(&'a [u8]),
    /// The receipt at this receipt-log cursor, as read from there (itself
    /// possibly a cut of its certificate).
    Receipt(u64),
    /// The data (signed envelope or receipt) of the Merkle-log entry at
    /// this index, as read from there (itself possibly a cut).
    Entry(u64),
}

/// `value` with the first occurrence of `part` cut out and `reference`
/// recorded in its place; `None` when `part` is empty or not in it.
pub(crate) fn cut(value: &[u8], part: &[u8], reference: Part<'_>) -> Option<Vec<u8>> {
    let at = find(value, part)?;
    let offset = u32::try_from(at).ok()?;
    let (kind, reference): (u8, Cow<'_, [u8]>) = match reference {
        Part::Cert(digest) => (CERT, Cow::Borrowed(digest)),
        Part::Receipt(cursor) => (RECEIPT, Cow::Owned(cursor.to_be_bytes().to_vec())),
        // With the part's length, so a queue's bytes are counted without reading it.
        Part::Entry(index) => {
            let len = u32::try_from(part.len()).ok()?;
            (
                ENTRY,
                Cow::Owned([&index.to_be_bytes()[..], &len.to_be_bytes()].concat()),
            )
        }
    };
    let mut out = Vec::with_capacity(HEAD + reference.len() + value.len() - part.len());
    out.extend_from_slice(&[MARK, kind]);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&reference);
    out.extend_from_slice(&value[..at]);
    out.extend_from_slice(&value[at + part.len()..]);
    Some(out)
}

/// `value` stored whole: as it is, unless it begins like a cut — no
/// protobuf message does, but the store does not parse what it keeps —
/// then behind a head that says "whole".
pub(crate) fn whole(value: &[u8]) -> Vec<u8> {
    if value.first() == Some(&MARK) {
        [&[MARK, WHOLE][..], value].concat()
    } else {
        value.to_vec()
    }
}

/// Where `part` first occurs in `value`. Only the places that hold its
/// first byte are compared whole: comparing at every offset called
/// `memcmp` a thousand times to find a certificate in a 2 KB envelope,
/// 2.5 % of the node's CPU under load.
fn find(value: &[u8], part: &[u8]) -> Option<usize> {
    let (&first, rest) = part.split_first()?;
    let last = value.len().checked_sub(part.len())?;
    let mut from = 0;
    while from <= last {
        let at = from + value[from..=last].iter().position(|&b| b == first)?;
        if value[at + 1..at + part.len()] == *rest {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// A part looked up by its reference: absent, or a storage failure.
pub(crate) type Lookup<E> = Result<Option<IVec>, E>;

/// Where the parts of cuts are read from: values as stored.
pub(crate) trait Parts {
    type Error;
    /// The certificate with SHA-256 `digest`.
    fn cert(&self, digest: &[u8]) -> Lookup<Self::Error>;
    /// The stored value of `receipt_log` at `cursor`.
    fn receipt(&self, cursor: u64) -> Lookup<Self::Error>;
    /// The stored value of `audit` at `index`.
    fn entry(&self, index: u64) -> Lookup<Self::Error>;
}

/// The value `stored` stands for, byte for byte: itself when stored
/// whole, else the cut with its part, read through `parts`, put back. A
/// cut that does not parse, or whose part is not found, is named through
/// `corrupt`.
pub(crate) fn restore<'s, E>(
    stored: &'s [u8],
    parts: &dyn Parts<Error = E>,
    corrupt: &dyn Fn(String) -> E,
) -> Result<Cow<'s, [u8]>, E> {
    restore_within(stored, parts, corrupt, DEPTH)
}

fn restore_within<'s, E>(
    stored: &'s [u8],
    parts: &dyn Parts<Error = E>,
    corrupt: &dyn Fn(String) -> E,
    depth: usize,
) -> Result<Cow<'s, [u8]>, E> {
    // Parts are passed on as `Bytes` over the value read, or over the one
    // restored: put back into the value, they are copied once.
    let inner = |value: Option<IVec>| -> Result<Option<Bytes>, E> {
        let Some(value) = value else { return Ok(None) };
        let Some(depth) = depth.checked_sub(1) else {
            return Err(corrupt("a stored value refers to parts nested too deep".into()));
        };
        let restored = restore_within(&value, parts, corrupt, depth)?;
        Ok(Some(restored_bytes(&value, restored)))
    };
    fill(
        stored,
        |part| match part {
            Part::Cert(digest) => Ok(parts.cert(digest)?.map(Bytes::from_owner)),
            Part::Receipt(cursor) => inner(parts.receipt(cursor)?),
            Part::Entry(index) => match inner(parts.entry(index)?)? {
                Some(entry) => entry_data(entry)
                    .map(Some)
                    .map_err(|e| corrupt(format!("log entry {index}, which a value refers to, {e}"))),
                None => Ok(None),
            },
        },
        corrupt,
    )
}

/// `restored`, what `stored` stands for (`restore`), without a copy: a
/// slice of `stored` when it was stored whole, else the bytes restored.
pub(crate) fn restored_bytes(stored: &IVec, restored: Cow<'_, [u8]>) -> Bytes {
    match restored {
        // A value stored whole, or behind the `WHOLE` head: its tail.
        Cow::Borrowed(whole) => {
            let at = stored.len() - whole.len();
            Bytes::from_owner(stored.clone()).slice(at..)
        }
        Cow::Owned(whole) => Bytes::from(whole),
    }
}

/// The data (signed envelope or receipt bytes) of a whole log entry: a
/// slice of `entry`, not a copy.
fn entry_data(entry: Bytes) -> Result<Bytes, String> {
    antar_core::wire::LogEntry::decode(entry)
        .map(|e| e.data)
        .map_err(|e| format!("does not decode: {e}"))
}

/// A stored value, parsed.
enum Stored<'s> {
    Whole(&'s [u8]),
    Cut {
        part: Part<'s>,
        /// The part's length, when the cut records it (`ENTRY`).
        len: Option<usize>,
        offset: usize,
        rest: &'s [u8],
    },
}

fn parse(stored: &[u8]) -> Result<Stored<'_>, String> {
    if stored.first() != Some(&MARK) {
        return Ok(Stored::Whole(stored));
    }
    if stored.get(1) == Some(&WHOLE) {
        return Ok(Stored::Whole(&stored[2..]));
    }
    let bad = |what: &str| format!("a stored value cut for a shared part {what}");
    let (kind, offset, rest) = match stored {
        [_, kind, a, b, c, d, rest @ ..] => (*kind, u32::from_be_bytes([*a, *b, *c, *d]) as usize, rest),
        _ => return Err(bad("is shorter than its header")),
    };
    let number = |rest: &[u8]| {
        let mut n = [0u8; 8];
        n.copy_from_slice(&rest[..8]);
        u64::from_be_bytes(n)
    };
    let (part, len, rest) = match kind {
        CERT if rest.len() >= DIGEST => (Part::Cert(&rest[..DIGEST]), None, &rest[DIGEST..]),
        RECEIPT if rest.len() >= 8 => (Part::Receipt(number(rest)), None, &rest[8..]),
        ENTRY if rest.len() >= 12 => {
            let len = u32::from_be_bytes([rest[8], rest[9], rest[10], rest[11]]) as usize;
            (Part::Entry(number(rest)), Some(len), &rest[12..])
        }
        _ => return Err(bad(&format!("has an unknown kind {kind} or a short reference"))),
    };
    if offset > rest.len() {
        return Err(bad(&format!("puts it at {offset}, past the value's end")));
    }
    Ok(Stored::Cut {
        part,
        len,
        offset,
        rest,
    })
}

/// The length of the value `stored` stands for, without reading a part
/// whose length the cut records.
pub(crate) fn whole_len<E>(
    stored: &[u8],
    parts: &dyn Parts<Error = E>,
    corrupt: &dyn Fn(String) -> E,
) -> Result<usize, E> {
    match parse(stored).map_err(corrupt)? {
        Stored::Whole(value) => Ok(value.len()),
        Stored::Cut {
            len: Some(len), rest, ..
        } => Ok(rest.len() + len),
        Stored::Cut { .. } => Ok(restore(stored, parts, corrupt)?.len()),
    }
}

/// `stored` made whole with the part `lookup` returns (see `restore`).
fn fill<'s, P: AsRef<[u8]>, E>(
    stored: &'s [u8],
    lookup: impl FnOnce(Part<'_>) -> Result<Option<P>, E>,
    corrupt: &dyn Fn(String) -> E,
) -> Result<Cow<'s, [u8]>, E> {
    let (part, len, offset, rest) = match parse(stored).map_err(corrupt)? {
        Stored::Whole(value) => return Ok(Cow::Borrowed(value)),
        Stored::Cut {
            part,
            len,
            offset,
            rest,
        } => (part, len, offset, rest),
    };
    let Some(bytes) = lookup(part)? else {
        return Err(corrupt(match part {
            Part::Cert(digest) => format!("no signer certificate with SHA-256 {}", crate::certs::hex(digest)),
            Part::Receipt(cursor) => {
                format!("a value refers to receipt log cursor {cursor}, which holds nothing")
            }
            Part::Entry(index) => format!("a value refers to log entry {index}, which holds nothing"),
        }));
    };
    let bytes = bytes.as_ref();
    if let Some(len) = len.filter(|len| *len != bytes.len()) {
        return Err(corrupt(format!(
            "a value's part is {} bytes, not the {len} it was cut as",
            bytes.len()
        )));
    }
    let mut out = Vec::with_capacity(rest.len() + bytes.len());
    out.extend_from_slice(&rest[..offset]);
    out.extend_from_slice(bytes);
    out.extend_from_slice(&rest[offset..]);
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_is_found_where_it_first_occurs() {
        let value = b"xaab\x30\x30\x31ab\x30\x31z";
        assert_eq!(
            find(value, b"\x30\x31"),
            Some(5),
            "past a first byte that did not lead on"
        );
        assert_eq!(find(value, b"x"), Some(0), "at the start");
        assert_eq!(find(value, b"\x31z"), Some(10), "at the end");
        assert_eq!(find(value, value), Some(0), "the whole value");
        assert_eq!(find(value, b"\x31y"), None, "absent");
        assert_eq!(find(value, b""), None, "empty");
        assert_eq!(find(b"ab", b"abc"), None, "longer than the value");
        assert_eq!(find(b"", b"a"), None);
        let naive = |v: &[u8], p: &[u8]| v.windows(p.len()).position(|w| w == p);
        let bytes: Vec<u8> = (0..600u32).map(|i| (i * 7 % 5) as u8).collect();
        for len in 1..6 {
            for at in 0..bytes.len() - len {
                let part = &bytes[at..at + len];
                assert_eq!(find(&bytes, part), naive(&bytes, part), "part {part:?}");
            }
        }
    }

    fn fill_with(stored: &[u8], cert: &[u8], receipt: &[u8]) -> Result<Vec<u8>, String> {
        fill(
            stored,
            |part| {
                Ok::<_, String>(match part {
                    Part::Cert(d) if d == [7u8; 32] => Some(cert.to_vec()),
                    Part::Receipt(9) => Some(receipt.to_vec()),
                    _ => None,
                })
            },
            &|e| e,
        )
        .map(Cow::into_owned)
    }

    #[test]
    fn a_cut_comes_back_byte_for_byte_wherever_the_part_was() {
        let cert = b"CERTIFICATE".as_slice();
        for value in [
            b"\x0aheadCERTIFICATEtail".as_slice(),
            b"\x0aCERTIFICATE",
            b"CERTIFICATE",
        ] {
            let stored = cut(value, cert, Part::Cert(&[7; 32])).unwrap();
            assert_eq!(stored[0], MARK);
            assert_eq!(stored.len(), value.len() - cert.len() + HEAD + 32);
            assert_eq!(fill_with(&stored, cert, b"").unwrap(), value);
        }
        let receipt = b"\x12a whole receipt".as_slice();
        let entry = [b"\x08\x05\x1a\x10".as_slice(), receipt, b"\x22\x01m"].concat();
        let stored = cut(&entry, receipt, Part::Receipt(9)).unwrap();
        assert_eq!(stored.len(), entry.len() - receipt.len() + HEAD + 8);
        assert_eq!(fill_with(&stored, b"", receipt).unwrap(), entry);
    }

    #[test]
    fn a_value_without_its_part_is_stored_and_read_whole() {
        let value = b"\x0anothing shared".as_slice();
        for part in [b"CERT".as_slice(), b""] {
            assert_eq!(cut(value, part, Part::Cert(&[7; 32])), None);
        }
        assert_eq!(whole(value), value);
        assert_eq!(fill_with(value, b"CERT", b"").unwrap(), value);
        // Even one that begins like a cut.
        for value in [b"\x00".as_slice(), b"\x00\x01\x00\x00\x00\x00", b""] {
            assert_eq!(fill_with(&whole(value), b"CERT", b"").unwrap(), value);
        }
    }

    #[test]
    fn a_broken_cut_is_named_not_guessed() {
        let good = cut(b"\x0aaCERTb", b"CERT", Part::Cert(&[7; 32])).unwrap();
        let unknown = cut(b"\x0aaCERTb", b"CERT", Part::Cert(&[8; 32])).unwrap();
        let err = fill_with(&unknown, b"CERT", b"").unwrap_err();
        assert!(err.contains("no signer certificate with SHA-256 0808"), "{err}");
        let err = fill_with(&good[..4], b"CERT", b"").unwrap_err();
        assert!(err.contains("shorter than its header"), "{err}");
        let mut past = good.clone();
        past[2..6].copy_from_slice(&99u32.to_be_bytes());
        assert!(fill_with(&past, b"CERT", b"")
            .unwrap_err()
            .contains("past the value's end"));
        let mut kind = good;
        kind[1] = 5;
        assert!(fill_with(&kind, b"CERT", b"")
            .unwrap_err()
            .contains("unknown kind 5"));
        let missing = cut(b"\x0ax", b"x", Part::Receipt(3)).unwrap();
        let err = fill_with(&missing, b"", b"").unwrap_err();
        assert!(err.contains("receipt log cursor 3, which holds nothing"), "{err}");
    }

    /// Values as a store would hold them, by reference.
    #[derive(Default)]
    struct Held {
        certs: Vec<([u8; 32], Vec<u8>)>,
        /// By cursor and index, big-endian, as the store keys them.
        receipts: Vec<([u8; 8], Vec<u8>)>,
        entries: Vec<([u8; 8], Vec<u8>)>,
    }

    fn lookup<K: PartialEq + ?Sized>(list: &[(impl AsRef<K>, Vec<u8>)], key: &K) -> Lookup<String> {
        Ok(list
            .iter()
            .find(|(k, _)| k.as_ref() == key)
            .map(|(_, v)| v.as_slice().into()))
    }

    impl Parts for Held {
        type Error = String;
        fn cert(&self, digest: &[u8]) -> Lookup<String> {
            lookup(&self.certs, digest)
        }
        fn receipt(&self, cursor: u64) -> Lookup<String> {
            lookup(&self.receipts, &cursor.to_be_bytes()[..])
        }
        fn entry(&self, index: u64) -> Lookup<String> {
            lookup(&self.entries, &index.to_be_bytes()[..])
        }
    }

    #[test]
    fn parts_read_from_other_values_are_restored_first_and_not_without_end() {
        use antar_core::wire::LogEntry;
        let cert = b"CERTIFICATE".as_slice();
        let receipt = b"\x0asigned receipt by CERTIFICATE".to_vec();
        let entry = |data: &[u8]| {
            LogEntry {
                index: 4,
                data: data.to_vec().into(),
                message_id: "m".into(),
                ..Default::default()
            }
            .encode_to_vec()
        };
        let mut held = Held::default();
        held.certs.push(([7; 32], cert.to_vec()));
        held.receipts.push((
            9u64.to_be_bytes(),
            cut(&receipt, cert, Part::Cert(&[7; 32])).unwrap(),
        ));
        // A log entry holding the receipt by cursor, and an outbox item
        // holding that entry's data: two steps from the item to the
        // receipt, one more to its certificate.
        held.entries.push((
            4u64.to_be_bytes(),
            cut(&entry(&receipt), &receipt, Part::Receipt(9)).unwrap(),
        ));
        let item = [b"\x12\x05hops!".as_slice(), &receipt].concat();
        let stored = cut(&item, &receipt, Part::Entry(4)).unwrap();
        assert_eq!(stored.len(), item.len() - receipt.len() + HEAD + 12);
        assert_eq!(restore(&stored, &held, &|e| e).unwrap(), item.as_slice());
        // Its length is known without reading the entry.
        assert_eq!(whole_len(&stored, &Held::default(), &|e| e).unwrap(), item.len());
        // An entry that refers to itself ends, named.
        held.entries[0] = (
            4u64.to_be_bytes(),
            cut(&entry(&receipt), &receipt, Part::Entry(4)).unwrap(),
        );
        let err = restore(&stored, &held, &|e| e).unwrap_err();
        assert!(err.contains("nested too deep"), "{err}");
        // An entry that does not decode is named with its index.
        held.entries[0] = (
            4u64.to_be_bytes(),
            cut(b"\x0a\x05shortCERTIFICATE", cert, Part::Cert(&[7; 32])).unwrap(),
        );
        let err = restore(&stored, &held, &|e| e).unwrap_err();
        assert!(
            err.contains("log entry 4, which a value refers to, does not decode"),
            "{err}"
        );
        held.entries.clear();
        let err = restore(&stored, &held, &|e| e).unwrap_err();
        assert!(
            err.contains("refers to log entry 4, which holds nothing"),
            "{err}"
        );
    }

    /// A part read from a value stored whole behind the `WHOLE` head comes
    /// back without the head, as does such a value read as a sled value.
    #[test]
    fn a_part_stored_whole_behind_its_head_comes_back_without_it() {
        let receipt = b"\x00receipt that begins like a cut".to_vec();
        let stored_receipt = whole(&receipt);
        assert_eq!(stored_receipt[..2], [MARK, WHOLE]);
        let mut held = Held::default();
        held.receipts.push((9u64.to_be_bytes(), stored_receipt.clone()));
        let item = [b"\x12\x02ok".as_slice(), &receipt].concat();
        let stored = cut(&item, &receipt, Part::Receipt(9)).unwrap();
        assert_eq!(restore(&stored, &held, &|e| e).unwrap(), item.as_slice());

        let stored = IVec::from(stored_receipt);
        let restored = restore(&stored, &held, &|e| e).unwrap();
        assert_eq!(restored_bytes(&stored, restored), receipt.as_slice());
        let plain = IVec::from(&b"\x0aplain"[..]);
        let restored = restore(&plain, &held, &|e| e).unwrap();
        assert_eq!(restored_bytes(&plain, restored), plain.as_ref());
    }
}
