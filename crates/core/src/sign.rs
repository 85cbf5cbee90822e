//! Ed25519 signing with domain separation.

use prost::Message;
use ring::signature::{Ed25519KeyPair, KeyPair};

use crate::envelope::sha256;
use crate::merkle::{leaf_hash, root_and_proofs, Hash};
use crate::wire::{Receipt, ReceiptBatch, ReceiptBatchProof, SignedEnvelope, SignedReceipt};

/// Prefix of the bytes an envelope signature covers: `domain || envelope`.
pub const ENVELOPE_DOMAIN: &[u8] = b"antar/envelope/v1\0";
/// Prefix of the bytes a receipt signature covers: `domain || receipt`.
pub const RECEIPT_DOMAIN: &[u8] = b"antar/receipt/v1\0";
/// Prefix of the bytes a receipt batch signature covers: `domain || ReceiptBatch`.
pub const RECEIPT_BATCH_DOMAIN: &[u8] = b"antar/receipt-batch/v1\0";

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
    cert_der: Vec<u8>,
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
        Ok(Self { key, cert_der })
    }

    /// A signer with no certificate, for unit tests of what it signs.
    #[cfg(test)]
    pub(crate) fn without_cert(pkcs8: &[u8]) -> Self {
        #[allow(clippy::expect_used)]
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8).expect("an Ed25519 key");
        Self {
            key,
            cert_der: Vec::new(),
        }
    }

    /// Signs the body of a C2SP signed note (a log checkpoint). The note
    /// format is its own domain: a body starts with the log's origin line,
    /// never with an `antar/…\0` prefix, so it cannot pass for an envelope
    /// or a receipt.
    pub fn sign_note(&self, body: &[u8]) -> Vec<u8> {
        self.key.sign(body).as_ref().to_vec()
    }

    /// The DER certificate that is sent with every signature.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The raw 32-byte Ed25519 public key.
    pub fn public_key(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }

    /// Signs serialized `Envelope` bytes.
    pub fn sign_envelope_bytes(&self, envelope: Vec<u8>) -> SignedEnvelope {
        let signature = self.sign(ENVELOPE_DOMAIN, &envelope);
        SignedEnvelope {
            envelope_sha256: sha256(&envelope).to_vec(),
            envelope,
            signature,
            signer_cert: self.cert_der.clone(),
        }
    }

    /// Serializes and signs a receipt.
    pub fn sign_receipt(&self, receipt: &Receipt) -> SignedReceipt {
        let receipt = receipt.encode_to_vec();
        let signature = self.sign(RECEIPT_DOMAIN, &receipt);
        SignedReceipt {
            receipt_sha256: sha256(&receipt).to_vec(),
            receipt,
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
        let leaves: Vec<Hash> = bytes.iter().map(|b| leaf_hash(b)).collect();
        let (root, proofs) = root_and_proofs(&leaves);
        let at = receipts
            .iter()
            .filter_map(|r| r.at)
            .max_by_key(|t| (t.seconds, t.nanos));
        let header = ReceiptBatch {
            root: root.to_vec(),
            size: receipts.len() as u64,
            issuer: first.issuer.clone(),
            at,
        }
        .encode_to_vec();
        let signature = self.sign(RECEIPT_BATCH_DOMAIN, &header);
        bytes
            .into_iter()
            .zip(proofs)
            .enumerate()
            .map(|(index, (receipt, path))| SignedReceipt {
                receipt_sha256: sha256(&receipt).to_vec(),
                receipt,
                signature: signature.clone(),
                signer_cert: self.cert_der.clone(),
                batch: Some(ReceiptBatchProof {
                    header: header.clone(),
                    index: index as u64,
                    path: path.iter().map(|h| h.to_vec()).collect(),
                }),
            })
            .collect()
    }

    fn sign(&self, domain: &[u8], bytes: &[u8]) -> Vec<u8> {
        let mut msg = Vec::with_capacity(domain.len() + bytes.len());
        msg.extend_from_slice(domain);
        msg.extend_from_slice(bytes);
        self.key.sign(&msg).as_ref().to_vec()
    }
}
