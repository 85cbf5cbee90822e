//! Signer certificates of message records, stored once.
//!
//! A node signs with one certificate for a long time, and a message record
//! is rewritten with each receipt it collects; written into every record
//! and every rewrite, the certificates of its envelope and receipts were a
//! large share of the bytes sled wrote (measured: 133 → 118 KB written per
//! message by both nodes of `antar bench`, 4 % less CPU). So a stored
//! record holds each signer certificate as its SHA-256 — 32 bytes, which no
//! DER certificate is — and the certificate itself is kept once, in `meta`
//! under `cert\0` ‖ digest, written in the same transaction as the first
//! record that refers to it. Records written before this hold their
//! certificates inline and are read as they are.

use std::collections::HashMap;
use std::sync::Mutex;

use antar_core::envelope::sha256;
use prost::bytes::Bytes;
use sled::IVec;

use crate::records::MessageRecord;

/// Certificates already read from sled, by digest: a record is read or
/// written many times a second, its certificates are few and never change.
/// Only what sled holds is cached — durable, since sled only ever gets
/// what the journal already synced — never a write that could still be
/// undone.
#[derive(Default)]
pub(crate) struct Cache(Mutex<HashMap<[u8; DIGEST], IVec>>);

impl Cache {
    /// The certificate with SHA-256 `digest`: from the cache, else from
    /// sled's `meta` tree (and then cached).
    pub(crate) fn lookup(&self, meta: &sled::Tree, digest: &[u8]) -> sled::Result<Option<IVec>> {
        let Ok(digest) = <[u8; DIGEST]>::try_from(digest) else {
            return Ok(None);
        };
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(der) = map.get(&digest) {
            return Ok(Some(der.clone()));
        }
        let der = meta.get(key(&digest))?;
        if let Some(d) = &der {
            map.insert(digest, d.clone());
        }
        Ok(der)
    }
}

/// Length of a certificate's stand-in: its SHA-256.
pub(crate) const DIGEST: usize = 32;

/// The key in `meta` of the certificate with SHA-256 `digest`.
pub(crate) fn key(digest: &[u8]) -> Vec<u8> {
    let mut k = b"cert\0".to_vec();
    k.extend_from_slice(digest);
    k
}

/// Every signer certificate field of a record.
fn fields(r: &mut MessageRecord) -> impl Iterator<Item = &mut Bytes> {
    r.envelope
        .iter_mut()
        .map(|e| &mut e.signer_cert)
        .chain(r.receipts.iter_mut().map(|s| &mut s.signer_cert))
}

/// Replaces each certificate of `r` by its digest; returns the
/// certificates, by digest, for the caller to store.
pub(crate) fn detach(r: &mut MessageRecord) -> Vec<([u8; DIGEST], Bytes)> {
    let mut out = Vec::new();
    for cert in fields(r) {
        if cert.len() == DIGEST || cert.is_empty() {
            continue;
        }
        let digest = sha256(cert);
        out.push((digest, std::mem::replace(cert, Bytes::copy_from_slice(&digest))));
    }
    out
}

/// Puts back each certificate a digest in `r` stands for, read with
/// `lookup` (by digest); a digest with no certificate is corruption, named
/// as such.
pub(crate) fn attach<E>(
    r: &mut MessageRecord,
    mut lookup: impl FnMut(&[u8]) -> Result<Option<IVec>, E>,
    corrupt: impl Fn(String) -> E,
) -> Result<(), E> {
    for cert in fields(r) {
        if cert.len() != DIGEST {
            continue;
        }
        match lookup(cert)? {
            Some(der) => *cert = Bytes::from_owner(der),
            None => {
                return Err(corrupt(format!(
                    "no signer certificate with SHA-256 {}",
                    hex(cert)
                )))
            }
        }
    }
    Ok(())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
