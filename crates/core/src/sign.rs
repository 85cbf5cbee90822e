//! Ed25519 signing with domain separation.

use std::sync::atomic::{AtomicU64, Ordering};

use prost::bytes::Bytes;
use prost::Message;
use prost_types::Timestamp;
use ring::signature::{Ed25519KeyPair, KeyPair};

use crate::envelope::sha256;
use crate::merkle::{leaf_hash, root_and_proofs, Hash};
use crate::wire::{
    EnvelopeBatch, EnvelopeBatchProof, Receipt, ReceiptBatch, ReceiptBatchProof, SignedEnvelope,
    SignedReceipt,
};

/// Prefix of the bytes an envelope signature covers: `domain || envelope`.
pub const ENVELOPE_DOMAIN: &[u8] = b"antar/envelope/v1\0";
/// Prefix of the bytes a receipt signature covers: `domain || receipt`.
pub const RECEIPT_DOMAIN: &[u8] = b"antar/receipt/v1\0";
/// Prefix of the bytes a receipt batch signature covers: `domain || ReceiptBatch`.
pub const RECEIPT_BATCH_DOMAIN: &[u8] = b"antar/receipt-batch/v1\0";
/// Prefix of the bytes an envelope batch signature covers: `domain || EnvelopeBatch`.
pub const ENVELOPE_BATCH_DOMAIN: &[u8] = b"antar/envelope-batch/v1\0";

/// Why a signing key could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    /// The key is not an Ed25519 PKCS#8 key.
    #[error("signing key is not an Ed25519 PKCS#8 key: {0}")]
    BadKey(String),
    /// The key does not belong to the certificate given with it.
    #[error("signing key does not match the public key of its certificate")]
    KeyCertMismatch,
}

/// A node's signing key with the certificate that vouches for it.
pub struct Signer {
    key: Ed25519KeyPair,
    /// Shared by every signed envelope and receipt that carries it.
    cert_der: Bytes,
    /// Signatures made so far: what the node's CPU spends on them.
    made: AtomicU64,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

impl Signer {
    /// Loads an Ed25519 PKCS#8 key (v1 or v2) and the DER certificate of its public key.
    ///
    /// # Errors
    /// [`SignError::BadKey`] for a key that is not Ed25519 PKCS#8;
    /// [`SignError::KeyCertMismatch`] when the certificate holds another key.
    pub fn from_pkcs8(pkcs8: &[u8], cert_der: Vec<u8>) -> Result<Self, SignError> {
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map_err(|e| SignError::BadKey(e.to_string()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| SignError::BadKey(format!("certificate: {e}")))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key().as_ref() {
            return Err(SignError::KeyCertMismatch);
        }
        Ok(Self {
            key,
            cert_der: cert_der.into(),
            made: AtomicU64::new(0),
        })
    }

    /// A signer with no certificate, for unit tests of what it signs.
    #[cfg(test)]
    pub(crate) fn without_cert(pkcs8: &[u8]) -> Self {
        #[allow(clippy::expect_used)]
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8).expect("an Ed25519 key");
        Self {
            key,
            cert_der: Bytes::new(),
            made: AtomicU64::new(0),
        }
    }

    /// Signs the body of a C2SP signed note (a log checkpoint). The note
    /// format is its own domain: a body starts with the log's origin line,
    /// never with an `antar/…\0` prefix, so it cannot pass for an envelope
    /// or a receipt.
    pub fn sign_note(&self, body: &[u8]) -> Vec<u8> {
        self.ed25519(body)
    }

    /// How many Ed25519 signatures this signer has made: one per
    /// envelope, receipt or batch of them, signed note.
    pub fn signatures(&self) -> u64 {
        self.made.load(Ordering::Relaxed)
    }

    /// The DER certificate that is sent with every signature.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The same certificate, as a message field shares it (no copy).
    pub fn cert_bytes(&self) -> Bytes {
        self.cert_der.clone()
    }

    /// The raw 32-byte Ed25519 public key.
    pub fn public_key(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }

    /// Signs serialized `Envelope` bytes.
    pub fn sign_envelope_bytes(&self, envelope: impl Into<Bytes>) -> SignedEnvelope {
        let envelope = envelope.into();
        let signature = self.sign(ENVELOPE_DOMAIN, &envelope);
        SignedEnvelope {
            envelope_sha256: digest_bytes(&envelope),
            envelope,
            signature,
            signer_cert: self.cert_der.clone(),
            batch: None,
        }
    }

    /// Signs serialized `Envelope`s, all sent by `sender`, with one
    /// signature: an [`EnvelopeBatch`] over the Merkle root of their bytes,
    /// each envelope carrying the batch and its inclusion proof. One
    /// envelope alone is signed as by [`Signer::sign_envelope_bytes`]. `at`
    /// is the latest `created_at` of the envelopes.
    pub fn sign_envelopes<E: Into<Bytes>>(
        &self,
        envelopes: Vec<E>,
        sender: &str,
        at: Timestamp,
    ) -> Vec<SignedEnvelope> {
        let envelopes: Vec<Bytes> = envelopes.into_iter().map(Into::into).collect();
        if envelopes.len() < 2 {
            return envelopes
                .into_iter()
                .map(|e| self.sign_envelope_bytes(e))
                .collect();
        }
        let batch = self.sign_batch(ENVELOPE_BATCH_DOMAIN, &envelopes, |root, size| EnvelopeBatch {
            root,
            size,
            sender: sender.to_owned(),
            at: Some(at),
        });
        envelopes
            .into_iter()
            .zip(batch.proofs)
            .map(|(envelope, (index, path, digest))| SignedEnvelope {
                envelope_sha256: digest,
                envelope,
                signature: batch.signature.clone(),
                signer_cert: self.cert_der.clone(),
                batch: Some(EnvelopeBatchProof {
                    header: batch.header.clone(),
                    index,
                    path,
                }),
            })
            .collect()
    }

    /// Serializes and signs a receipt.
    pub fn sign_receipt(&self, receipt: &Receipt) -> SignedReceipt {
        let receipt = receipt.encode_to_vec();
        let signature = self.sign(RECEIPT_DOMAIN, &receipt);
        SignedReceipt {
            receipt_sha256: digest_bytes(&receipt),
            receipt: receipt.into(),
            signature,
            signer_cert: self.cert_der.clone(),
            batch: None,
        }
    }

    /// Serializes `receipts` and signs them all with one signature: a
    /// [`ReceiptBatch`] over the Merkle root of their bytes, each receipt
    /// carrying the batch and its inclusion proof. One receipt alone is
    /// signed as by [`Signer::sign_receipt`]. The batch's `issuer` and `at`
    /// are the first receipt's issuer and the latest receipt time.
    pub fn sign_receipts(&self, receipts: &[Receipt]) -> Vec<SignedReceipt> {
        if let [one] = receipts {
            return vec![self.sign_receipt(one)];
        }
        let Some(first) = receipts.first() else {
            return Vec::new();
        };
        let bytes: Vec<Vec<u8>> = receipts.iter().map(Message::encode_to_vec).collect();
        let at = receipts
            .iter()
            .filter_map(|r| r.at)
            .max_by_key(|t| (t.seconds, t.nanos));
        let batch = self.sign_batch(RECEIPT_BATCH_DOMAIN, &bytes, |root, size| ReceiptBatch {
            root,
            size,
            issuer: first.issuer.clone(),
            at,
        });
        bytes
            .into_iter()
            .zip(batch.proofs)
            .map(|(receipt, (index, path, digest))| SignedReceipt {
                receipt_sha256: digest,
                receipt: receipt.into(),
                signature: batch.signature.clone(),
                signer_cert: self.cert_der.clone(),
                batch: Some(ReceiptBatchProof {
                    header: batch.header.clone(),
                    index,
                    path,
                }),
            })
            .collect()
    }

    /// Signs `domain || header` once for all of `leaves`, the header
    /// (built by `header` from the RFC 9162 Merkle root of their leaf
    /// hashes and their count) committing to every one of them.
    fn sign_batch<H: Message>(
        &self,
        domain: &[u8],
        leaves: &[impl AsRef<[u8]>],
        header: impl FnOnce(Bytes, u64) -> H,
    ) -> SignedBatch {
        let hashes: Vec<Hash> = leaves.iter().map(|b| leaf_hash(b.as_ref())).collect();
        let (root, proofs) = root_and_proofs(&hashes);
        let header = header(Bytes::copy_from_slice(&root), leaves.len() as u64).encode_to_vec();
        let mut paths = hash_fields(proofs.iter().flatten()).into_iter();
        let digests: Vec<Hash> = leaves.iter().map(|b| sha256(b.as_ref())).collect();
        SignedBatch {
            signature: self.sign(domain, &header),
            header: header.into(),
            proofs: proofs
                .iter()
                .zip(hash_fields(digests.iter()))
                .enumerate()
                .map(|(index, (path, digest))| {
                    (index as u64, paths.by_ref().take(path.len()).collect(), digest)
                })
                .collect(),
        }
    }

    fn sign(&self, domain: &[u8], bytes: &[u8]) -> Bytes {
        let mut msg = Vec::with_capacity(domain.len() + bytes.len());
        msg.extend_from_slice(domain);
        msg.extend_from_slice(bytes);
        self.ed25519(&msg).into()
    }

    /// Every signature goes through here, and is counted.
    fn ed25519(&self, msg: &[u8]) -> Vec<u8> {
        self.made.fetch_add(1, Ordering::Relaxed);
        self.key.sign(msg).as_ref().to_vec()
    }
}

/// One signature over a batch header, and each leaf's (index, inclusion
/// proof, SHA-256).
struct SignedBatch {
    signature: Bytes,
    header: Bytes,
    proofs: Vec<(u64, Vec<Bytes>, Bytes)>,
}

/// SHA-256 of `bytes`, as a field of a signed envelope or receipt.
fn digest_bytes(bytes: &[u8]) -> Bytes {
    Bytes::copy_from_slice(&sha256(bytes))
}

/// `hashes` as message fields, slices of one buffer: a batch's proofs
/// cost one allocation, not one per hash.
fn hash_fields<'a>(hashes: impl Iterator<Item = &'a Hash>) -> Vec<Bytes> {
    let mut buf = Vec::with_capacity(hashes.size_hint().0 * 32);
    hashes.for_each(|h| buf.extend_from_slice(h));
    let buf = Bytes::from(buf);
    (0..buf.len() / 32)
        .map(|i| buf.slice(i * 32..(i + 1) * 32))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// What `antar_signatures_total` counts: a batch is one signature.
    #[test]
    fn signatures_are_counted_once_per_batch() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let s = Signer::without_cert(pkcs8.as_ref());
        assert_eq!(s.signatures(), 0);
        let at = Timestamp::default();
        s.sign_envelopes(vec![b"one".to_vec()], "finance", at);
        assert_eq!(s.signatures(), 1);
        s.sign_envelopes(vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()], "finance", at);
        assert_eq!(s.signatures(), 2);
        s.sign_receipts(&[Receipt::default(), Receipt::default()]);
        assert_eq!(s.signatures(), 3);
        s.sign_note(b"origin\n1\nroot\n");
        assert_eq!(s.signatures(), 4);
    }

    /// Each item of a batch carries its own digest, index and inclusion
    /// path (slices of buffers the batch shares), whatever the batch's size.
    #[test]
    fn batch_items_carry_their_own_digest_index_and_path() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let s = Signer::without_cert(pkcs8.as_ref());
        // Each signed item as (bytes, SHA-256 field, index, path), checked
        // against the leaves it was made of.
        let check = |leaves: &[Vec<u8>], signed: Vec<(Bytes, Bytes, u64, Vec<Bytes>)>| {
            let hashes: Vec<Hash> = leaves.iter().map(|b| leaf_hash(b)).collect();
            let (_, proofs) = root_and_proofs(&hashes);
            assert_eq!(signed.len(), leaves.len());
            for (i, (bytes, digest, index, path)) in signed.into_iter().enumerate() {
                let n = leaves.len();
                assert_eq!(bytes, leaves[i], "batch of {n}, item {i}");
                assert_eq!(digest, &sha256(&leaves[i])[..], "batch of {n}, item {i}");
                assert_eq!(index, i as u64, "batch of {n}, item {i}");
                let want: Vec<Vec<u8>> = proofs[i].iter().map(|h| h.to_vec()).collect();
                assert_eq!(path, want, "batch of {n}, item {i}");
            }
        };
        for n in [2usize, 3, 5, 8] {
            let leaves: Vec<Vec<u8>> = (0..n).map(|i| format!("item {i} of {n}").into_bytes()).collect();
            let signed = s.sign_envelopes(leaves.clone(), "finance", Timestamp::default());
            let signed = signed.into_iter().map(|e| {
                let proof = e.batch.unwrap();
                (e.envelope, e.envelope_sha256, proof.index, proof.path)
            });
            check(&leaves, signed.collect());
            let receipts: Vec<Receipt> = (0..n)
                .map(|i| Receipt {
                    message_id: format!("m{i}"),
                    ..Receipt::default()
                })
                .collect();
            let leaves: Vec<Vec<u8>> = receipts.iter().map(Message::encode_to_vec).collect();
            let signed = s.sign_receipts(&receipts).into_iter().map(|r| {
                let proof = r.batch.unwrap();
                (r.receipt, r.receipt_sha256, proof.index, proof.path)
            });
            check(&leaves, signed.collect());
        }
    }
}
