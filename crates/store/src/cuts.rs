//! Log values stored with a part kept elsewhere cut out.
//!
//! A receipt in the receipt log and an entry of the Merkle log carry bytes
//! the store holds already: the signer's certificate (436 of a receipt's
//! ~900 bytes), kept once in `meta` (`certs.rs`), and, in the log entry of
//! a receipt about one of this node's own messages, the whole receipt,
//! logged in `receipt_log` by the same transaction. Written whole, they
//! were most of the bytes a message cost the journal and sled (measured:
//! ~6.4 of ~10 KB per message at a sending node). So such a value is
//! stored as a *cut*: the value without the part, and where the part was
//! and what it was. Reading puts the part back byte for byte — the Merkle
//! log's leaf hashes are over the exact bytes, and nothing outside this
//! crate ever sees a cut.
//!
//! Layout of a cut: `0x00`, the part's kind (1: a certificate, by its
//! SHA-256; 2: a receipt, by its receipt-log cursor, u64 BE), the part's
//! offset in the value (u32 BE), the reference, then the value without the
//! part. No protobuf message begins with a zero byte (there is no field
//! number 0), so a value stored whole — everything written before cuts
//! existed, and any value the part was not found in — is told apart by its
//! first byte and read as it is (one that does begin with it is stored
//! behind `0x00 0x00`).

use std::borrow::Cow;

use sled::IVec;

use crate::certs::DIGEST;

/// First byte of a cut.
const MARK: u8 = 0;
/// Kind of a value stored whole that begins with `MARK` (`whole`).
const WHOLE: u8 = 0;
const CERT: u8 = 1;
const RECEIPT: u8 = 2;
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
}

/// `value` with the first occurrence of `part` cut out and `reference`
/// recorded in its place; `None` when `part` is empty or not in it.
pub(crate) fn cut(value: &[u8], part: &[u8], reference: Part<'_>) -> Option<Vec<u8>> {
    let at = find(value, part)?;
    let offset = u32::try_from(at).ok()?;
    let (kind, reference): (u8, Cow<'_, [u8]>) = match reference {
        Part::Cert(digest) => (CERT, Cow::Borrowed(digest)),
        Part::Receipt(cursor) => (RECEIPT, Cow::Owned(cursor.to_be_bytes().to_vec())),
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

fn find(value: &[u8], part: &[u8]) -> Option<usize> {
    if part.is_empty() {
        return None;
    }
    value.windows(part.len()).position(|w| w == part)
}

/// A part looked up by its reference: absent, or a storage failure.
pub(crate) type Lookup<E> = Result<Option<IVec>, E>;

/// The value `stored` stands for, byte for byte: itself when stored
/// whole, else the cut with its part put back — a certificate read
/// through `cert` (by SHA-256), a receipt through `receipt` (the stored
/// receipt-log value at a cursor, itself restored with `cert`). A cut that
/// does not parse, or whose part is not found, is named through `corrupt`.
pub(crate) fn restore<'s, E>(
    stored: &'s [u8],
    cert: &dyn Fn(&[u8]) -> Lookup<E>,
    receipt: &dyn Fn(u64) -> Lookup<E>,
    corrupt: &dyn Fn(String) -> E,
) -> Result<Cow<'s, [u8]>, E> {
    fill(
        stored,
        |part| match part {
            Part::Cert(digest) => cert(digest),
            Part::Receipt(cursor) => match receipt(cursor)? {
                // A receipt's own value refers to its certificate only.
                Some(r) => fill(
                    &r,
                    |part| match part {
                        Part::Cert(digest) => cert(digest),
                        Part::Receipt(_) => Ok(None),
                    },
                    corrupt,
                )
                .map(|whole| Some(IVec::from(whole.as_ref()))),
                None => Ok(None),
            },
        },
        corrupt,
    )
}

/// `stored` made whole with the part `lookup` returns (see `restore`).
fn fill<'s, P: AsRef<[u8]>, E>(
    stored: &'s [u8],
    lookup: impl FnOnce(Part<'_>) -> Result<Option<P>, E>,
    corrupt: &dyn Fn(String) -> E,
) -> Result<Cow<'s, [u8]>, E> {
    if stored.first() != Some(&MARK) {
        return Ok(Cow::Borrowed(stored));
    }
    if stored.get(1) == Some(&WHOLE) {
        return Ok(Cow::Borrowed(&stored[2..]));
    }
    let bad = |what: &str| corrupt(format!("a stored value cut for a shared part {what}"));
    let (kind, offset, rest) = match stored {
        [_, kind, a, b, c, d, rest @ ..] => (*kind, u32::from_be_bytes([*a, *b, *c, *d]) as usize, rest),
        _ => return Err(bad("is shorter than its header")),
    };
    let (part, rest) = match kind {
        CERT if rest.len() >= DIGEST => (Part::Cert(&rest[..DIGEST]), &rest[DIGEST..]),
        RECEIPT if rest.len() >= 8 => {
            let mut cursor = [0u8; 8];
            cursor.copy_from_slice(&rest[..8]);
            (Part::Receipt(u64::from_be_bytes(cursor)), &rest[8..])
        }
        _ => return Err(bad(&format!("has an unknown kind {kind} or a short reference"))),
    };
    if offset > rest.len() {
        return Err(bad(&format!("puts it at {offset}, past the value's end")));
    }
    let Some(bytes) = lookup(part)? else {
        return Err(corrupt(match part {
            Part::Cert(digest) => format!("no signer certificate with SHA-256 {}", crate::certs::hex(digest)),
            Part::Receipt(cursor) => {
                format!("a log value refers to receipt log cursor {cursor}, which holds nothing")
            }
        }));
    };
    let bytes = bytes.as_ref();
    let mut out = Vec::with_capacity(rest.len() + bytes.len());
    out.extend_from_slice(&rest[..offset]);
    out.extend_from_slice(bytes);
    out.extend_from_slice(&rest[offset..]);
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
