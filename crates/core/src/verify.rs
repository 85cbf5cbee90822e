//! Verification of signed envelopes and receipts against the federation root.
//!
//! A signature counts only when its certificate was issued by the federation
//! root, was valid when the thing was signed, is a signing certificate
//! (Ed25519, digitalSignature + contentCommitment, no TLS usage), is not
//! revoked, names a node of this federation, and that node's agency is the
//! envelope's `sender` (the receipt's `issuer`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use prost::bytes::Bytes;
use prost::Message;
use ring::signature::{UnparsedPublicKey, ED25519};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::envelope::{payload_digest, sha256};
use crate::id::{AgencyId, Identity, MessageId, Role};
use crate::merkle::{self, leaf_hash, Hash};
use crate::sign::{ENVELOPE_BATCH_DOMAIN, ENVELOPE_DOMAIN, RECEIPT_BATCH_DOMAIN, RECEIPT_DOMAIN};
use crate::time::from_timestamp;
use crate::wire::{Envelope, EnvelopeBatch, Payload, Receipt, ReceiptBatch, SignedEnvelope, SignedReceipt};

/// OID of Ed25519 keys (RFC 8410).
const OID_ED25519: &str = "1.3.101.112";

/// Why a signed envelope, receipt, payload or revocation list was refused.
///
/// Each variant is one way verification fails, so a caller (and a
/// `REJECTED` receipt's reason code, see [`VerifyError::reason`]) can say
/// exactly what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The signature does not verify, and the signed bytes are the ones the
    /// signer digested (or no digest came with them): the signature was
    /// altered, or made by another key.
    #[error("signature does not verify over the signed bytes")]
    BadSignature,
    /// The signature does not verify because the signed bytes were altered
    /// after signing: they no longer match the SHA-256 the signer sent with
    /// them (`envelope_sha256` / `receipt_sha256`).
    #[error("signed bytes were altered after signing: they do not match the signer's SHA-256")]
    BytesAltered,
    /// The signed bytes verified but do not decode as the expected message.
    #[error("signed bytes are not a valid {0}")]
    Malformed(&'static str),
    /// A required field is missing or invalid in the signed message.
    #[error("invalid field {field}: {detail}")]
    InvalidField {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// The payload does not match the envelope's `payload_digest` (and its
    /// salt matches `salt_sha256`, or the envelope carries none).
    #[error("payload does not match the envelope's payload_digest")]
    PayloadDigest,
    /// The salt does not match the envelope's `salt_sha256`: the payload
    /// cannot be checked against `payload_digest`.
    #[error("salt does not match the envelope's salt_sha256")]
    SaltDigest,
    /// The payload's length differs from the envelope's `payload_size`.
    #[error("payload is {actual} bytes, the envelope says {declared}")]
    PayloadSize {
        /// `payload_size` in the envelope.
        declared: u64,
        /// Length of the payload received.
        actual: u64,
    },
    /// The signer certificate is not DER X.509.
    #[error("signer certificate is not a valid X.509 certificate")]
    CertificateMalformed,
    /// The signer certificate was not issued by the federation root.
    #[error("signer certificate was not issued by the federation root")]
    UnknownIssuer,
    /// The signer certificate was not valid at the time of signing.
    #[error("signer certificate was not valid at {at}")]
    CertificateNotValidAt {
        /// The signing time, seconds since the Unix epoch.
        at: i64,
    },
    /// The signer certificate has been revoked by the federation.
    #[error("signer certificate serial {serial} is revoked")]
    Revoked {
        /// The certificate serial, hex.
        serial: String,
    },
    /// The certificate is not a signing certificate (e.g. a TLS certificate).
    #[error("not a signing certificate: {0}")]
    NotSigningCertificate(&'static str),
    /// The certificate carries no node identity of this federation.
    #[error("signer certificate has no node identity of federation {federation}: {found}")]
    NotNodeIdentity {
        /// The federation this verifier trusts.
        federation: String,
        /// What the certificate carries instead.
        found: String,
    },
    /// The certificate's agency is not the envelope's sender (the receipt's issuer).
    #[error("signed by agency {signer} but claims to be from {claimed}")]
    SignerMismatch {
        /// The agency in the signer certificate.
        signer: String,
        /// The `sender` or `issuer` claimed in the signed bytes.
        claimed: String,
    },
    /// A revocation list that is not a CRL signed by the federation root.
    #[error("revocation list is invalid: {0}")]
    BadRevocationList(String),
    /// The federation root certificate itself could not be used.
    #[error("federation root certificate is invalid: {0}")]
    BadRoot(String),
}

impl VerifyError {
    /// A stable reason code for `REJECTED` receipts and custody acks.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadSignature => "bad_signature",
            Self::BytesAltered => "bytes_altered",
            Self::SaltDigest => "salt_digest",
            Self::Malformed(_) | Self::InvalidField { .. } => "malformed",
            Self::PayloadDigest | Self::PayloadSize { .. } => "payload_digest",
            Self::CertificateMalformed | Self::UnknownIssuer | Self::NotNodeIdentity { .. } => {
                "unknown_signer"
            }
            Self::CertificateNotValidAt { .. } => "certificate_expired",
            Self::Revoked { .. } => "revoked",
            Self::NotSigningCertificate(_) => "not_signing_certificate",
            Self::SignerMismatch { .. } => "wrong_signer",
            Self::BadRevocationList(_) | Self::BadRoot(_) => "bad_trust_config",
        }
    }
}

/// The federation root: the only issuer of node certificates.
#[derive(Debug, Clone)]
pub struct TrustAnchor {
    federation: String,
    root_der: Arc<Vec<u8>>,
}

impl TrustAnchor {
    /// Trusts `root_der` as the root of `federation`.
    ///
    /// # Errors
    /// [`VerifyError::BadRoot`] when the root is not a CA certificate.
    pub fn new(federation: &str, root_der: Vec<u8>) -> Result<Self, VerifyError> {
        let (_, root) =
            X509Certificate::from_der(&root_der).map_err(|e| VerifyError::BadRoot(e.to_string()))?;
        if !root.is_ca() {
            return Err(VerifyError::BadRoot("not a CA certificate".into()));
        }
        Ok(Self {
            federation: federation.to_owned(),
            root_der: Arc::new(root_der),
        })
    }

    /// The federation's name, e.g. `gov.example`.
    pub fn federation(&self) -> &str {
        &self.federation
    }

    /// The root certificate, DER.
    pub fn root_der(&self) -> &[u8] {
        &self.root_der
    }

    fn root(&self) -> X509Certificate<'_> {
        // `new` parsed these same bytes, so parsing again cannot fail.
        match X509Certificate::from_der(&self.root_der) {
            Ok((_, c)) => c,
            Err(_) => unreachable!("root parsed in TrustAnchor::new"),
        }
    }
}

/// The serials the federation root has revoked, from a CRL it signed.
#[derive(Debug, Clone, Default)]
pub struct Revocations {
    serials: HashSet<Vec<u8>>,
}

impl Revocations {
    /// No certificate revoked.
    pub fn none() -> Self {
        Self::default()
    }

    /// Reads a DER CRL and checks that the federation root signed it.
    ///
    /// # Errors
    /// [`VerifyError::BadRevocationList`] when it does not parse, was issued
    /// by someone else, or its signature does not verify.
    pub fn from_crl_der(anchor: &TrustAnchor, der: &[u8]) -> Result<Self, VerifyError> {
        let bad = |e: String| VerifyError::BadRevocationList(e);
        let (_, crl) = CertificateRevocationList::from_der(der).map_err(|e| bad(e.to_string()))?;
        let root = anchor.root();
        if crl.issuer() != root.subject() {
            return Err(bad("not issued by the federation root".into()));
        }
        crl.verify_signature(root.public_key())
            .map_err(|e| bad(format!("signature: {e}")))?;
        let serials = crl
            .iter_revoked_certificates()
            .map(|r| strip_leading_zeros(r.raw_serial()).to_vec())
            .collect();
        Ok(Self { serials })
    }

    /// How many serials are revoked.
    pub fn len(&self) -> usize {
        self.serials.len()
    }

    /// True when nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.serials.is_empty()
    }

    fn contains(&self, serial: &[u8]) -> bool {
        self.serials.contains(strip_leading_zeros(serial))
    }
}

fn strip_leading_zeros(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|b| **b == 0).count();
    &s[n.min(s.len().saturating_sub(1))..]
}

/// A signing certificate that chains to the root, parsed once and cached.
#[derive(Debug, Clone)]
struct SignerCert {
    identity: Identity,
    public_key: Vec<u8>,
    serial: Vec<u8>,
    not_before: i64,
    not_after: i64,
}

/// An envelope whose signature, signer and fields have been checked.
#[derive(Debug, Clone)]
pub struct VerifiedEnvelope {
    /// The decoded header.
    pub envelope: Envelope,
    /// The parsed id.
    pub id: MessageId,
    /// The parsed sender.
    pub sender: AgencyId,
    /// The parsed recipient.
    pub recipient: AgencyId,
    /// The identity of the node that signed it.
    pub signer: Identity,
}

impl VerifiedEnvelope {
    /// Checks that `payload` is the one the signed header commits to.
    ///
    /// # Errors
    /// [`VerifyError::PayloadSize`], [`VerifyError::SaltDigest`] or
    /// [`VerifyError::PayloadDigest`].
    pub fn check_payload(&self, payload: &Payload) -> Result<(), VerifyError> {
        let actual = payload.data.len() as u64;
        if actual != self.envelope.payload_size {
            return Err(VerifyError::PayloadSize {
                declared: self.envelope.payload_size,
                actual,
            });
        }
        if payload_digest(&payload.salt, &payload.data)[..] != self.envelope.payload_digest[..] {
            // Only a failure pays for naming what was altered.
            let salt = &self.envelope.salt_sha256;
            if !salt.is_empty() && sha256(&payload.salt)[..] != salt[..] {
                return Err(VerifyError::SaltDigest);
            }
            return Err(VerifyError::PayloadDigest);
        }
        Ok(())
    }
}

/// A receipt whose signature and issuer have been checked.
#[derive(Debug, Clone)]
pub struct VerifiedReceipt {
    /// The decoded receipt.
    pub receipt: Receipt,
    /// The parsed message id.
    pub message_id: MessageId,
    /// The identity of the node that signed it.
    pub signer: Identity,
}

/// Verifies envelopes and receipts of one federation; cheap to clone and share.
#[derive(Debug, Clone)]
pub struct Verifier {
    anchor: TrustAnchor,
    revoked: Arc<RwLock<Revocations>>,
    /// Certificates that already chained to the root, by their DER: a node
    /// signs thousands of envelopes with one certificate, and looking one
    /// up costs a hash and a compare of its bytes, not a SHA-256.
    cache: Arc<Mutex<HashMap<Vec<u8>, Arc<SignerCert>>>>,
    /// Batch signatures already checked, by SHA-256 of (domain, public key,
    /// signature, header): the envelopes or receipts of one batch arrive
    /// together and cost one signature check between them.
    batches: Arc<Mutex<HashSet<[u8; 32]>>>,
}

impl Verifier {
    /// A verifier trusting `anchor`, with `revoked` serials refused.
    pub fn new(anchor: TrustAnchor, revoked: Revocations) -> Self {
        Self {
            anchor,
            revoked: Arc::new(RwLock::new(revoked)),
            cache: Arc::default(),
            batches: Arc::default(),
        }
    }

    /// The trust anchor.
    pub fn anchor(&self) -> &TrustAnchor {
        &self.anchor
    }

    /// Replaces the revocation list (on reload); takes effect for every clone.
    pub fn set_revocations(&self, revoked: Revocations) {
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = revoked;
    }

    /// Verifies a signed envelope: signature, signer certificate, sender, fields.
    ///
    /// The payload is checked separately by [`VerifiedEnvelope::check_payload`].
    ///
    /// # Errors
    /// One [`VerifyError`] variant per way it can fail.
    pub fn verify_envelope(&self, signed: &SignedEnvelope) -> Result<VerifiedEnvelope, VerifyError> {
        let cert = self.signer_cert(&signed.signer_cert)?;
        match &signed.batch {
            None => verify_signed(
                &cert.public_key,
                ENVELOPE_DOMAIN,
                &signed.envelope,
                &signed.signature,
                &signed.envelope_sha256,
            )?,
            Some(proof) => self.verify_in_batch(
                &cert,
                &InBatch {
                    domain: ENVELOPE_BATCH_DOMAIN,
                    bytes: &signed.envelope,
                    bytes_sha256: &signed.envelope_sha256,
                    signature: &signed.signature,
                    header: &proof.header,
                    index: proof.index,
                    path: &proof.path,
                },
                |b| {
                    let h = EnvelopeBatch::decode(b).map_err(|_| VerifyError::Malformed("EnvelopeBatch"))?;
                    Ok((h.root, h.size, h.sender, h.at))
                },
            )?,
        }
        let envelope =
            Envelope::decode(signed.envelope.clone()).map_err(|_| VerifyError::Malformed("Envelope"))?;
        let created_at = envelope
            .created_at
            .as_ref()
            .ok_or_else(|| field("created_at", "missing"))?;
        self.check_cert_at(&cert, from_timestamp(created_at))?;
        let sender = AgencyId::parse(&envelope.sender).map_err(|e| field("sender", e))?;
        if sender != cert.identity.agency {
            return Err(VerifyError::SignerMismatch {
                signer: cert.identity.agency.to_string(),
                claimed: sender.to_string(),
            });
        }
        let id = MessageId::parse(&envelope.id).map_err(|e| field("id", e))?;
        let recipient = AgencyId::parse(&envelope.recipient).map_err(|e| field("recipient", e))?;
        if envelope.payload_digest.len() != 32 {
            return Err(field("payload_digest", "must be 32 bytes"));
        }
        if !matches!(envelope.salt_sha256.len(), 0 | 32) {
            return Err(field("salt_sha256", "must be empty or 32 bytes"));
        }
        Ok(VerifiedEnvelope {
            envelope,
            id,
            sender,
            recipient,
            signer: cert.identity.clone(),
        })
    }

    /// Verifies a signed receipt: signature, signer certificate, issuer.
    ///
    /// # Errors
    /// One [`VerifyError`] variant per way it can fail.
    pub fn verify_receipt(&self, signed: &SignedReceipt) -> Result<VerifiedReceipt, VerifyError> {
        let cert = self.signer_cert(&signed.signer_cert)?;
        match &signed.batch {
            None => verify_signed(
                &cert.public_key,
                RECEIPT_DOMAIN,
                &signed.receipt,
                &signed.signature,
                &signed.receipt_sha256,
            )?,
            Some(proof) => self.verify_in_batch(
                &cert,
                &InBatch {
                    domain: RECEIPT_BATCH_DOMAIN,
                    bytes: &signed.receipt,
                    bytes_sha256: &signed.receipt_sha256,
                    signature: &signed.signature,
                    header: &proof.header,
                    index: proof.index,
                    path: &proof.path,
                },
                |b| {
                    let h = ReceiptBatch::decode(b).map_err(|_| VerifyError::Malformed("ReceiptBatch"))?;
                    Ok((h.root, h.size, h.issuer, h.at))
                },
            )?,
        }
        let receipt =
            Receipt::decode(signed.receipt.clone()).map_err(|_| VerifyError::Malformed("Receipt"))?;
        let at = receipt.at.as_ref().ok_or_else(|| field("at", "missing"))?;
        self.check_cert_at(&cert, from_timestamp(at))?;
        let issuer = AgencyId::parse(&receipt.issuer).map_err(|e| field("issuer", e))?;
        if issuer != cert.identity.agency {
            return Err(VerifyError::SignerMismatch {
                signer: cert.identity.agency.to_string(),
                claimed: issuer.to_string(),
            });
        }
        let message_id = MessageId::parse(&receipt.message_id).map_err(|e| field("message_id", e))?;
        Ok(VerifiedReceipt {
            receipt,
            message_id,
            signer: cert.identity.clone(),
        })
    }

    /// Checks that an envelope or receipt is in a batch its signer signed:
    /// the batch signature over `domain || header` (checked once per batch,
    /// then remembered), the batch's signer agency (`decode` reads the
    /// header's root, size, signer agency and time), and the item's
    /// inclusion proof up to the signed root.
    fn verify_in_batch(
        &self,
        cert: &SignerCert,
        item: &InBatch<'_>,
        decode: impl FnOnce(Bytes) -> Result<BatchHeader, VerifyError>,
    ) -> Result<(), VerifyError> {
        // An Ed25519 signature is 64 bytes; checked first, so that no split
        // of other bytes between `signature` and `header` can match the
        // cache key of a batch already verified. The domain (ending in its
        // only NUL) keeps a receipt batch from passing for an envelope batch.
        if item.signature.len() != 64 {
            return Err(VerifyError::BadSignature);
        }
        let key = {
            let mut k = Vec::with_capacity(
                item.domain.len() + cert.public_key.len() + item.signature.len() + item.header.len(),
            );
            k.extend_from_slice(item.domain);
            k.extend_from_slice(&cert.public_key);
            k.extend_from_slice(item.signature);
            k.extend_from_slice(item.header);
            sha256(&k)
        };
        let known = self
            .batches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&key);
        if !known {
            verify_sig(&cert.public_key, item.domain, item.header, item.signature)?;
        }
        let (root, size, signer, at) = decode(item.header.clone())?;
        let root: Hash = root[..]
            .try_into()
            .map_err(|_| field("batch.root", "must be 32 bytes"))?;
        let at = at.as_ref().ok_or_else(|| field("batch.at", "missing"))?;
        self.check_cert_at(cert, from_timestamp(at))?;
        if signer != cert.identity.agency.as_str() {
            return Err(VerifyError::SignerMismatch {
                signer: cert.identity.agency.to_string(),
                claimed: signer,
            });
        }
        if !known {
            let mut batches = self.batches.lock().unwrap_or_else(|p| p.into_inner());
            if batches.len() > 4096 {
                batches.clear();
            }
            batches.insert(key);
        }
        let path = item
            .path
            .iter()
            .map(|h| h[..].try_into())
            .collect::<Result<Vec<Hash>, _>>()
            .map_err(|_| field("batch.path", "every hash must be 32 bytes"))?;
        merkle::verify_inclusion(&leaf_hash(item.bytes), item.index, size, &path, &root).map_err(|_| {
            if !item.bytes_sha256.is_empty() && sha256(item.bytes)[..] != item.bytes_sha256[..] {
                VerifyError::BytesAltered
            } else {
                VerifyError::BadSignature
            }
        })
    }

    /// Checks a node signing certificate — chained to the federation root,
    /// signing key usage, a node identity, not revoked — and returns its
    /// identity and raw Ed25519 public key (for checkpoint signatures).
    ///
    /// # Errors
    /// The [`VerifyError`] of the first check that fails.
    pub fn node_signing_key(&self, der: &[u8]) -> Result<(Identity, Vec<u8>), VerifyError> {
        let cert = self.signer_cert(der)?;
        let revoked = self.revoked.read().unwrap_or_else(|p| p.into_inner());
        if revoked.contains(&cert.serial) {
            return Err(VerifyError::Revoked {
                serial: hex::encode(&cert.serial),
            });
        }
        Ok((cert.identity.clone(), cert.public_key.clone()))
    }

    fn check_cert_at(&self, cert: &SignerCert, at: SystemTime) -> Result<(), VerifyError> {
        let at = crate::time::unix_millis(at) as i64 / 1000;
        if at < cert.not_before || at > cert.not_after {
            return Err(VerifyError::CertificateNotValidAt { at });
        }
        let revoked = self.revoked.read().unwrap_or_else(|p| p.into_inner());
        if revoked.contains(&cert.serial) {
            return Err(VerifyError::Revoked {
                serial: hex::encode(&cert.serial),
            });
        }
        Ok(())
    }

    fn signer_cert(&self, der: &[u8]) -> Result<Arc<SignerCert>, VerifyError> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(der) {
            return Ok(Arc::clone(c));
        }
        drop(cache);
        let parsed = Arc::new(self.parse_signer_cert(der)?);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > 4096 {
            cache.clear();
        }
        cache.insert(der.to_vec(), Arc::clone(&parsed));
        Ok(parsed)
    }

    fn parse_signer_cert(&self, der: &[u8]) -> Result<SignerCert, VerifyError> {
        let (rest, cert) = X509Certificate::from_der(der).map_err(|_| VerifyError::CertificateMalformed)?;
        if !rest.is_empty() {
            return Err(VerifyError::CertificateMalformed);
        }
        let root = self.anchor.root();
        if cert.issuer() != root.subject() || cert.verify_signature(Some(root.public_key())).is_err() {
            return Err(VerifyError::UnknownIssuer);
        }
        if cert.public_key().algorithm.algorithm.to_id_string() != OID_ED25519 {
            return Err(VerifyError::NotSigningCertificate("key is not Ed25519"));
        }
        if cert.is_ca() {
            return Err(VerifyError::NotSigningCertificate("certificate is a CA"));
        }
        let mut usage_ok = false;
        let mut uris = Vec::new();
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::KeyUsage(ku) => {
                    usage_ok = ku.digital_signature() && ku.non_repudiation();
                }
                ParsedExtension::ExtendedKeyUsage(eku) if eku.server_auth || eku.client_auth || eku.any => {
                    return Err(VerifyError::NotSigningCertificate(
                        "certificate is for TLS (serverAuth/clientAuth)",
                    ));
                }
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        if let GeneralName::URI(uri) = name {
                            uris.push((*uri).to_owned());
                        }
                    }
                }
                _ => {}
            }
        }
        if !usage_ok {
            return Err(VerifyError::NotSigningCertificate(
                "key usage lacks digitalSignature + contentCommitment",
            ));
        }
        let federation = self.anchor.federation();
        let identity = uris
            .iter()
            .filter_map(|u| Identity::parse(u).ok())
            .find(|id| id.federation == federation && id.role == Role::Node)
            .ok_or_else(|| VerifyError::NotNodeIdentity {
                federation: federation.to_owned(),
                found: if uris.is_empty() {
                    "no URI SAN".into()
                } else {
                    uris.join(", ")
                },
            })?;
        let validity = cert.validity();
        Ok(SignerCert {
            identity,
            public_key: cert.public_key().subject_public_key.data.to_vec(),
            serial: strip_leading_zeros(cert.raw_serial()).to_vec(),
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
        })
    }
}

/// A signed envelope or receipt that claims a place in a signed batch.
struct InBatch<'a> {
    /// The batch signature's domain.
    domain: &'static [u8],
    /// The item's signed bytes: its leaf.
    bytes: &'a [u8],
    /// SHA-256 of `bytes` as the signer sent it (unsigned, optional).
    bytes_sha256: &'a [u8],
    signature: &'a [u8],
    /// The serialized batch header the signature covers.
    header: &'a Bytes,
    index: u64,
    path: &'a [Bytes],
}

/// A batch header's root, size, signer agency and time.
type BatchHeader = (Bytes, u64, String, Option<prost_types::Timestamp>);

fn field(field: &'static str, detail: impl ToString) -> VerifyError {
    VerifyError::InvalidField {
        field,
        detail: detail.to_string(),
    }
}

fn verify_sig(public_key: &[u8], domain: &[u8], bytes: &[u8], signature: &[u8]) -> Result<(), VerifyError> {
    let mut msg = Vec::with_capacity(domain.len() + bytes.len());
    msg.extend_from_slice(domain);
    msg.extend_from_slice(bytes);
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&msg, signature)
        .map_err(|_| VerifyError::BadSignature)
}

/// [`verify_sig`], naming what was altered when it fails: the bytes, if
/// they no longer match the SHA-256 their signer sent with them
/// (`bytes_sha256`, unsigned and optional), else the signature.
fn verify_signed(
    public_key: &[u8],
    domain: &[u8],
    bytes: &[u8],
    signature: &[u8],
    bytes_sha256: &[u8],
) -> Result<(), VerifyError> {
    verify_sig(public_key, domain, bytes, signature).map_err(|e| {
        if !bytes_sha256.is_empty() && sha256(bytes)[..] != bytes_sha256[..] {
            VerifyError::BytesAltered
        } else {
            e
        }
    })
}

/// Checks an Ed25519 signature over `domain || bytes` with a raw public key:
/// what an auditor with any Ed25519 library does.
///
/// # Errors
/// [`VerifyError::BadSignature`] when it does not verify.
pub fn verify_raw(
    public_key: &[u8],
    domain: &[u8],
    bytes: &[u8],
    signature: &[u8],
) -> Result<(), VerifyError> {
    verify_sig(public_key, domain, bytes, signature)
}
