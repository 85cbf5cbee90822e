//! The certificates this crate issues, checked by the core's verifier: what
//! a node does with every envelope it receives.

// Tests panic on the first unexpected error; that is their job.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use antar_core::wire::{Kind, SignedEnvelope};
use antar_core::{Draft, Revocations, ServiceName, SignError, Signer, TrustAnchor, Verifier, VerifyError};
use antar_pki::{serial_of, AgencyId, Ca, CertKey};
use prost::bytes::Bytes;
use time::OffsetDateTime;

/// Flips the bits `mask` of byte `at` of `bytes`: a tampered field.
fn flip(bytes: &mut Bytes, at: usize, mask: u8) {
    let mut v = bytes.to_vec();
    v[at] ^= mask;
    *bytes = v.into();
}

const FED: &str = "gov.example";

fn agency(s: &str) -> AgencyId {
    AgencyId::parse(s).unwrap()
}

fn draft(sender: &str, created_at: SystemTime) -> Draft {
    Draft {
        kind: Kind::Notice,
        sender: agency(sender),
        recipient: agency("health"),
        service: ServiceName::parse("birth.notify").unwrap(),
        correlation_id: String::new(),
        created_at,
        ttl: Duration::from_secs(3600),
        headers: HashMap::new(),
        content_type: "application/json".into(),
    }
}

fn signer(ck: &CertKey) -> Signer {
    Signer::from_pkcs8(&ck.key_der(), ck.cert_der()).unwrap()
}

fn verifier(root: &Ca, revoked: Revocations) -> Verifier {
    Verifier::new(TrustAnchor::new(FED, root.cert_der()).unwrap(), revoked)
}

fn sealed_by(ck: &CertKey, sender: &str, created_at: SystemTime) -> SignedEnvelope {
    draft(sender, created_at)
        .seal(b"{\"child\":1}".to_vec(), &signer(ck))
        .envelope
}

#[test]
fn signing_cert_verifies_and_payload_checks() {
    let root = Ca::new_federation_root(FED, 3650).unwrap();
    let tax = root.issue_node_signing(FED, &agency("tax"), 365).unwrap();
    let sealed = draft("tax", SystemTime::now()).seal(b"payload".to_vec(), &signer(&tax));
    let verified = verifier(&root, Revocations::none())
        .verify_envelope(&sealed.envelope)
        .unwrap();
    assert_eq!(verified.sender, agency("tax"));
    assert_eq!(verified.signer.to_string(), "spiffe://gov.example/agency/tax");
    verified.check_payload(&sealed.payload).unwrap();
}

#[test]
fn revoked_serial_is_refused_and_other_serials_are_not() {
    let root = Ca::new_federation_root(FED, 3650).unwrap();
    let tax = root.issue_node_signing(FED, &agency("tax"), 365).unwrap();
    let other = root.issue_node_signing(FED, &agency("tax"), 365).unwrap();
    let serial = serial_of(&tax.cert_der()).unwrap();
    let anchor = TrustAnchor::new(FED, root.cert_der()).unwrap();

    let crl_pem = root
        .revocation_list(std::slice::from_ref(&serial), 7, 30)
        .unwrap();
    let crl_der = pem::parse(&crl_pem).unwrap().into_contents();
    let revoked = Revocations::from_crl_der(&anchor, &crl_der).unwrap();
    assert_eq!(revoked.len(), 1);
    let v = verifier(&root, revoked);

    let err = v
        .verify_envelope(&sealed_by(&tax, "tax", SystemTime::now()))
        .unwrap_err();
    assert_eq!(
        err,
        VerifyError::Revoked {
            serial: antar_pki::CertInfo::from_der(&tax.cert_der()).unwrap().serial_hex
        }
    );
    // Another certificate of the same agency is unaffected.
    v.verify_envelope(&sealed_by(&other, "tax", SystemTime::now()))
        .unwrap();
}

#[test]
fn crl_signed_by_another_ca_is_refused() {
    let root = Ca::new_federation_root(FED, 3650).unwrap();
    let rogue = Ca::new_federation_root(FED, 3650).unwrap();
    let local = Ca::new_local(FED, &agency("tax"), 1825).unwrap();
    let anchor = TrustAnchor::new(FED, root.cert_der()).unwrap();
    for ca in [&rogue, &local] {
        let crl = ca.revocation_list(&[vec![0x42; 16]], 1, 30).unwrap();
        let der = pem::parse(&crl).unwrap().into_contents();
        assert!(matches!(
            Revocations::from_crl_der(&anchor, &der),
            Err(VerifyError::BadRevocationList(_))
        ));
    }
}

#[test]
fn cert_from_another_root_or_a_local_ca_is_unknown_issuer() {
    let root = Ca::new_federation_root(FED, 3650).unwrap();
    // Same federation name, same subject: only the key differs.
    let rogue_root = Ca::new_federation_root(FED, 3650).unwrap();
    let local = Ca::new_local(FED, &agency("tax"), 1825).unwrap();
    let v = verifier(&root, Revocations::none());
    for ca in [&rogue_root, &local] {
        let cert = ca.issue_node_signing(FED, &agency("tax"), 365).unwrap();
        assert_eq!(
            v.verify_envelope(&sealed_by(&cert, "tax", SystemTime::now()))
                .unwrap_err(),
            VerifyError::UnknownIssuer
        );
    }
}

#[test]
fn expired_signing_cert_is_refused_at_now_but_valid_inside_its_period() {
    let root = Ca::new_federation_root(FED, 3650).unwrap();
    let now = OffsetDateTime::now_utc();
    let expired = root
        .issue_node_signing_with_validity(
            FED,
            &agency("tax"),
            now - time::Duration::days(400),
            now - time::Duration::days(30),
        )
        .unwrap();
    let v = verifier(&root, Revocations::none());
    let created = SystemTime::now();
    let err = v
        .verify_envelope(&sealed_by(&expired, "tax", created))
        .unwrap_err();
    assert!(
        matches!(err, VerifyError::CertificateNotValidAt { .. }),
        "{err:?}"
    );
    // An envelope signed while the certificate was valid still verifies.
    let then = created - Duration::from_secs(100 * 86_400);
    v.verify_envelope(&sealed_by(&expired, "tax", then)).unwrap();
}

#[test]
fn not_yet_valid_signing_cert_is_refused() {
    let root = Ca::new_federation_root(FED, 3650).unwrap();
    let now = OffsetDateTime::now_utc();
    let future = root
        .issue_node_signing_with_validity(
            FED,
            &agency("tax"),
            now + time::Duration::days(1),
            now + time::Duration::days(365),
        )
        .unwrap();
    let err = verifier(&root, Revocations::none())
        .verify_envelope(&sealed_by(&future, "tax", SystemTime::now()))
        .unwrap_err();
    assert!(
        matches!(err, VerifyError::CertificateNotValidAt { .. }),
        "{err:?}"
    );
}

#[test]
fn health_cert_signing_as_finance_is_signer_mismatch() {
    let root = Ca::new_federation_root(FED, 3650).unwrap();
    let health = root.issue_node_signing(FED, &agency("health"), 365).unwrap();
    let err = verifier(&root, Revocations::none())
        .verify_envelope(&sealed_by(&health, "finance", SystemTime::now()))
        .unwrap_err();
    assert_eq!(
        err,
        VerifyError::SignerMismatch {
            signer: "health".into(),
            claimed: "finance".into()
        }
    );
}

#[test]
fn tls_cert_is_not_a_signing_cert() {
    let root = Ca::new_federation_root(FED, 3650).unwrap();
    let tls = root
        .issue_node_tls(FED, &agency("tax"), &["tax.gov.example".into()], &[], 365)
        .unwrap();
    // The core refuses to sign with an ECDSA key at all…
    assert!(matches!(
        Signer::from_pkcs8(&tls.key_der(), tls.cert_der()),
        Err(SignError::BadKey(_))
    ));
    // …and the verifier refuses the certificate before looking at the signature.
    let good = root.issue_node_signing(FED, &agency("tax"), 365).unwrap();
    let mut forged = sealed_by(&good, "tax", SystemTime::now());
    forged.signer_cert = tls.cert_der().into();
    forged.signature = vec![0; 64].into();
    assert!(matches!(
        verifier(&root, Revocations::none())
            .verify_envelope(&forged)
            .unwrap_err(),
        VerifyError::NotSigningCertificate(_)
    ));
}

#[test]
fn signing_key_loads_from_files_written_by_the_crate() {
    let dir = tempfile::tempdir().unwrap();
    let root = Ca::new_federation_root(FED, 3650).unwrap();
    let cert = root.issue_node_signing(FED, &agency("tax"), 365).unwrap();
    let (cp, kp) = (dir.path().join("s.crt"), dir.path().join("s.key"));
    cert.write(&cp, &kp).unwrap();
    let signer = Signer::from_pkcs8(
        &antar_pki::read_key_der(&kp).unwrap(),
        antar_pki::read_cert_der(&cp).unwrap(),
    )
    .unwrap();
    let sealed = draft("tax", SystemTime::now()).seal(b"x".to_vec(), &signer);
    verifier(&root, Revocations::none())
        .verify_envelope(&sealed.envelope)
        .unwrap();
}

#[test]
fn round_trips_and_each_altered_part_fails_with_its_own_error() {
    let root = Ca::new_federation_root(FED, 3650).unwrap();
    let tax = root.issue_node_signing(FED, &agency("tax"), 365).unwrap();
    let v = verifier(&root, Revocations::none());
    let sealed = draft("tax", SystemTime::now()).seal(b"{\"child\":1}".to_vec(), &signer(&tax));
    v.verify_envelope(&sealed.envelope)
        .unwrap()
        .check_payload(&sealed.payload)
        .unwrap();

    // Each of the four parts fails with its own error, for every bit.
    let flips = |len: usize| (0..len * 8).map(|i| (i / 8, 1u8 << (i % 8)));
    for (byte, bit) in flips(sealed.envelope.envelope.len()) {
        let mut e = sealed.envelope.clone();
        flip(&mut e.envelope, byte, bit);
        assert_eq!(
            v.verify_envelope(&e).unwrap_err(),
            VerifyError::BytesAltered,
            "envelope byte {byte} bit {bit:#04x}"
        );
        // Without the signer's (unsigned, optional) digest, all a verifier
        // can say is that the signature does not verify.
        e.envelope_sha256.clear();
        assert_eq!(v.verify_envelope(&e).unwrap_err(), VerifyError::BadSignature);
    }
    for (byte, bit) in flips(sealed.envelope.signature.len()) {
        let mut e = sealed.envelope.clone();
        flip(&mut e.signature, byte, bit);
        assert_eq!(
            v.verify_envelope(&e).unwrap_err(),
            VerifyError::BadSignature,
            "signature byte {byte} bit {bit:#04x}"
        );
    }
    let verified = v.verify_envelope(&sealed.envelope).unwrap();
    for (byte, bit) in flips(sealed.payload.data.len()) {
        let mut p = sealed.payload.clone();
        flip(&mut p.data, byte, bit);
        assert_eq!(
            verified.check_payload(&p).unwrap_err(),
            VerifyError::PayloadDigest,
            "payload byte {byte} bit {bit:#04x}"
        );
    }
    for (byte, bit) in flips(sealed.payload.salt.len()) {
        let mut p = sealed.payload.clone();
        flip(&mut p.salt, byte, bit);
        assert_eq!(
            verified.check_payload(&p).unwrap_err(),
            VerifyError::SaltDigest,
            "salt byte {byte} bit {bit:#04x}"
        );
    }
    // The digest beside the signature is a hint, not a check: altering it
    // alone changes nothing, since the signature still verifies.
    let mut e = sealed.envelope.clone();
    flip(&mut e.envelope_sha256, 0, 1);
    v.verify_envelope(&e).unwrap();
    let mut short = sealed.payload.clone();
    short.data.truncate(short.data.len() - 1);
    assert!(matches!(
        verified.check_payload(&short),
        Err(VerifyError::PayloadSize { .. })
    ));

    // Receipts: round trip, then any flipped bit of the bytes or the signature.
    let receipt = antar_core::wire::Receipt {
        message_id: verified.id.to_string(),
        envelope_sha256: antar_core::envelope::sha256(&sealed.envelope.envelope)
            .to_vec()
            .into(),
        sender: "tax".into(),
        recipient: "health".into(),
        status: antar_core::wire::ReceiptStatus::Accepted as i32,
        at: Some(antar_core::time::to_timestamp(SystemTime::now())),
        issuer: "tax".into(),
        ..Default::default()
    };
    let signed = signer(&tax).sign_receipt(&receipt);
    assert_eq!(v.verify_receipt(&signed).unwrap().receipt, receipt);
    for (byte, bit) in flips(signed.receipt.len()) {
        let mut r = signed.clone();
        flip(&mut r.receipt, byte, bit);
        assert_eq!(
            v.verify_receipt(&r).unwrap_err(),
            VerifyError::BytesAltered,
            "receipt byte {byte} bit {bit:#04x}"
        );
    }
    for (byte, bit) in flips(signed.signature.len()) {
        let mut r = signed.clone();
        flip(&mut r.signature, byte, bit);
        assert_eq!(
            v.verify_receipt(&r).unwrap_err(),
            VerifyError::BadSignature,
            "receipt signature byte {byte} bit {bit:#04x}"
        );
    }
}

/// A batch-signed envelope or receipt, as the tamper checks below see it.
trait InBatch: Clone {
    fn bytes(&mut self) -> &mut Bytes;
    fn signature(&mut self) -> &mut Bytes;
    fn cert(&mut self) -> &mut Bytes;
    /// The batch header, leaf index and inclusion proof.
    fn proof(&mut self) -> (&mut Bytes, &mut u64, &mut Vec<Bytes>);
    fn verify(&self, v: &Verifier) -> Result<(), VerifyError>;
}

/// `InBatch` for a signed type whose signed bytes are `$bytes`, checked by `$verify`.
macro_rules! in_batch {
    ($t:ty, $bytes:ident, $verify:ident) => {
        impl InBatch for $t {
            fn bytes(&mut self) -> &mut Bytes {
                &mut self.$bytes
            }
            fn signature(&mut self) -> &mut Bytes {
                &mut self.signature
            }
            fn cert(&mut self) -> &mut Bytes {
                &mut self.signer_cert
            }
            fn proof(&mut self) -> (&mut Bytes, &mut u64, &mut Vec<Bytes>) {
                let b = self.batch.as_mut().unwrap();
                (&mut b.header, &mut b.index, &mut b.path)
            }
            fn verify(&self, v: &Verifier) -> Result<(), VerifyError> {
                v.$verify(self).map(drop)
            }
        }
    };
}
in_batch!(antar_core::wire::SignedReceipt, receipt, verify_receipt);
in_batch!(SignedEnvelope, envelope, verify_envelope);

/// No altered item, proof, header or signature of `signed` (a batch of at
/// least 5 whose item 3 is checked) passes, whether or not `root`'s
/// verifier has seen the batch before; nor does the batch under `other`'s
/// certificate.
fn batch_resists_tampering<T: InBatch>(root: &Ca, other: &CertKey, signed: &[T]) {
    let flips = |len: usize| (0..len * 8).map(|i| (i / 8, 1u8 << (i % 8)));
    let v = verifier(root, Revocations::none());
    signed[3].verify(&v).unwrap(); // the batch is now known to `v`
    for verifier in [verifier(root, Revocations::none()), v] {
        let rejects = |r: &T, err: VerifyError, what: &str| {
            assert_eq!(r.verify(&verifier).unwrap_err(), err, "{what}");
        };
        let mut s = signed[3].clone();
        for (byte, bit) in flips(s.bytes().len()) {
            let mut r = s.clone();
            flip(r.bytes(), byte, bit);
            rejects(
                &r,
                VerifyError::BytesAltered,
                &format!("byte {byte} bit {bit:#04x}"),
            );
        }
        for (byte, bit) in flips(s.signature().len()) {
            let mut r = s.clone();
            flip(r.signature(), byte, bit);
            rejects(&r, VerifyError::BadSignature, &format!("signature byte {byte}"));
        }
        for (byte, bit) in flips(s.proof().0.len()) {
            let mut r = s.clone();
            flip(r.proof().0, byte, bit);
            rejects(
                &r,
                VerifyError::BadSignature,
                &format!("header byte {byte} bit {bit:#04x}"),
            );
        }
        for hash in 0..s.proof().2.len() {
            let mut r = s.clone();
            flip(&mut r.proof().2[hash], 7, 1);
            rejects(&r, VerifyError::BadSignature, &format!("path hash {hash}"));
        }
        // Another leaf's proof, or the proof cut short, does not fit.
        let mut r = s.clone();
        *r.proof().1 = 4;
        rejects(&r, VerifyError::BadSignature, "index 4");
        let mut r = s.clone();
        r.proof().2.pop();
        rejects(&r, VerifyError::BadSignature, "a hash short");
        // Bytes moved between the signature and the header, which would
        // hash to the cached batch's key were lengths not checked.
        let mut r = s.clone();
        let first = r.proof().0.split_to(1);
        let signature = r.signature();
        *signature = [&signature[..], &first[..]].concat().into();
        rejects(&r, VerifyError::BadSignature, "a byte moved");
        // Another item of the batch with this item's proof.
        let mut r = signed[4].clone();
        let (header, index, path) = s.proof();
        let (header, index, path) = (header.clone(), *index, path.clone());
        let p = r.proof();
        (*p.0, *p.1, *p.2) = (header, index, path);
        rejects(&r, VerifyError::BadSignature, "item 4 with item 3's proof");
        // The batch under another node's certificate.
        let mut r = s.clone();
        *r.cert() = other.cert_der().into();
        rejects(&r, VerifyError::BadSignature, "another node's certificate");
    }
}

/// One signature over a batch of receipts: every receipt verifies alone,
/// with its inclusion proof, and no altered receipt, proof, header or
/// signature passes — whether or not the batch was seen before.
#[test]
fn batch_signed_receipts_verify_one_by_one_and_resist_tampering() {
    use antar_core::wire::{Receipt, ReceiptBatch, ReceiptStatus};
    use prost::Message;
    let root = Ca::new_federation_root(FED, 3650).unwrap();
    let health = root.issue_node_signing(FED, &agency("health"), 365).unwrap();
    let tax = root.issue_node_signing(FED, &agency("tax"), 365).unwrap();
    let receipt = |i: usize| Receipt {
        message_id: antar_core::MessageId::new().to_string(),
        envelope_sha256: antar_core::envelope::sha256(&i.to_be_bytes()).to_vec().into(),
        sender: "tax".into(),
        recipient: "health".into(),
        status: ReceiptStatus::Delivered as i32,
        at: Some(antar_core::time::to_timestamp(SystemTime::now())),
        issuer: "health".into(),
        ..Default::default()
    };
    let receipts: Vec<Receipt> = (0..7).map(receipt).collect();
    let signed = signer(&health).sign_receipts(&receipts);
    assert_eq!(signed.len(), 7);
    let header = ReceiptBatch::decode(signed[0].batch.as_ref().unwrap().header.clone()).unwrap();
    assert_eq!(header.size, 7);
    assert_eq!(header.issuer, "health");
    assert!(signed.iter().all(|s| s.signature == signed[0].signature));

    // A fresh verifier each time, so the batch signature is checked, not remembered.
    for (s, r) in signed.iter().zip(&receipts) {
        assert_eq!(
            verifier(&root, Revocations::none())
                .verify_receipt(s)
                .unwrap()
                .receipt,
            *r
        );
    }
    // One receipt alone is signed as before, with no batch.
    let single = signer(&health).sign_receipts(&receipts[..1]);
    assert!(single[0].batch.is_none());
    verifier(&root, Revocations::none())
        .verify_receipt(&single[0])
        .unwrap();

    batch_resists_tampering(&root, &tax, &signed);
    // A batch whose header names another issuer than its signer.
    let mut forged = receipts.clone();
    for r in &mut forged {
        r.issuer = "tax".into();
    }
    let by_health = signer(&health).sign_receipts(&forged);
    assert!(matches!(
        verifier(&root, Revocations::none())
            .verify_receipt(&by_health[0])
            .unwrap_err(),
        VerifyError::SignerMismatch { .. }
    ));
}

/// One signature over a batch of envelopes: every envelope verifies alone,
/// with its inclusion proof, and no altered envelope, proof, header or
/// signature passes, whether or not the batch was seen before; a receipt
/// batch's signature never passes for an envelope batch's, even with the
/// very same header bytes and once the receipt batch is known.
#[test]
fn batch_signed_envelopes_verify_one_by_one_and_resist_tampering() {
    use antar_core::wire::{EnvelopeBatch, EnvelopeBatchProof, Receipt, ReceiptBatch};
    use prost::Message;
    let root = Ca::new_federation_root(FED, 3650).unwrap();
    let tax = root.issue_node_signing(FED, &agency("tax"), 365).unwrap();
    let health = root.issue_node_signing(FED, &agency("health"), 365).unwrap();
    let now = SystemTime::now();
    let prepared: Vec<_> = (0..6)
        .map(|i| draft("tax", now).prepare(format!("payload {i}").into_bytes()))
        .collect();
    let bytes: Vec<Bytes> = prepared.iter().map(|p| p.envelope.clone()).collect();
    let at = antar_core::time::to_timestamp(now);
    let signed = signer(&tax).sign_envelopes(bytes.clone(), "tax", at);
    assert_eq!(signed.len(), 6);
    assert!(signed.iter().all(|s| s.signature == signed[0].signature));
    let header = EnvelopeBatch::decode(signed[0].batch.as_ref().unwrap().header.clone()).unwrap();
    assert_eq!((header.size, header.sender.as_str()), (6, "tax"));
    for ((s, p), b) in signed.iter().zip(&prepared).zip(&bytes) {
        assert_eq!(&s.envelope, b);
        let verified = verifier(&root, Revocations::none()).verify_envelope(s).unwrap();
        assert_eq!(verified.id, p.id);
        verified.check_payload(&p.payload).unwrap();
    }
    // One envelope alone is signed as before, with no batch.
    let single = signer(&tax).sign_envelopes(bytes[..1].to_vec(), "tax", at);
    assert!(single[0].batch.is_none());
    verifier(&root, Revocations::none())
        .verify_envelope(&single[0])
        .unwrap();

    batch_resists_tampering(&root, &health, &signed);

    // What a node of an earlier version sees: the unknown `batch` dropped,
    // the batch signature checked as the envelope's own — refused
    // (`bad_signature`), never taken.
    let mut older = signed[0].clone();
    older.batch = None;
    assert_eq!(
        verifier(&root, Revocations::none())
            .verify_envelope(&older)
            .unwrap_err(),
        VerifyError::BadSignature
    );

    // A batch already checked is refused once its certificate is revoked.
    let v = verifier(&root, Revocations::none());
    v.verify_envelope(&signed[1]).unwrap();
    let anchor = TrustAnchor::new(FED, root.cert_der()).unwrap();
    let crl_pem = root
        .revocation_list(&[serial_of(&tax.cert_der()).unwrap()], 7, 30)
        .unwrap();
    let crl = pem::parse(&crl_pem).unwrap().into_contents();
    v.set_revocations(Revocations::from_crl_der(&anchor, &crl).unwrap());
    for s in &signed[1..3] {
        assert!(
            matches!(v.verify_envelope(s).unwrap_err(), VerifyError::Revoked { .. }),
            "a revoked signer's batch"
        );
    }
    // A batch header dated outside the certificate's validity, though
    // every envelope's own `created_at` is inside it.
    let late = antar_core::time::to_timestamp(now + Duration::from_secs(2 * 365 * 86_400));
    let dated_late = signer(&tax).sign_envelopes(bytes.clone(), "tax", late);
    assert!(matches!(
        verifier(&root, Revocations::none())
            .verify_envelope(&dated_late[0])
            .unwrap_err(),
        VerifyError::CertificateNotValidAt { .. }
    ));

    // A batch whose header names another sender than its signer, and one
    // whose envelopes claim another sender than the signer's agency.
    let by_tax = signer(&tax).sign_envelopes(bytes.clone(), "health", at);
    assert!(matches!(
        verifier(&root, Revocations::none())
            .verify_envelope(&by_tax[0])
            .unwrap_err(),
        VerifyError::SignerMismatch { .. }
    ));
    let theirs: Vec<Bytes> = (0..3)
        .map(|_| draft("health", now).prepare(b"x".to_vec()).envelope)
        .collect();
    assert!(matches!(
        verifier(&root, Revocations::none())
            .verify_envelope(&signer(&tax).sign_envelopes(theirs, "tax", at)[0])
            .unwrap_err(),
        VerifyError::SignerMismatch { .. }
    ));

    // tax's receipt batch, its items presented as envelopes: the header
    // has the layout of an envelope batch's and names "tax", the signature
    // is tax's — under the receipt batch domain. Without the domain in the
    // cache key, a verifier that knows the receipt batch would skip the
    // signature and fail later on the bytes (`Malformed`).
    let receipts: Vec<Receipt> = (0..5)
        .map(|i| Receipt {
            message_id: antar_core::MessageId::new().to_string(),
            envelope_sha256: antar_core::envelope::sha256(&[i]).to_vec().into(),
            at: Some(at),
            issuer: "tax".into(),
            ..Default::default()
        })
        .collect();
    let as_receipts = signer(&tax).sign_receipts(&receipts);
    let v = verifier(&root, Revocations::none());
    v.verify_receipt(&as_receipts[2]).unwrap(); // known to `v` now
    let r = &as_receipts[2];
    let rb = r.batch.as_ref().unwrap();
    let as_envelope_batch = EnvelopeBatch::decode(&rb.header[..]).unwrap();
    assert_eq!(as_envelope_batch.encode_to_vec(), rb.header);
    assert_eq!(
        ReceiptBatch::decode(&rb.header[..]).unwrap().issuer,
        as_envelope_batch.sender
    );
    let forged = SignedEnvelope {
        envelope: r.receipt.clone(),
        signature: r.signature.clone(),
        signer_cert: tax.cert_der().into(),
        envelope_sha256: r.receipt_sha256.clone(),
        batch: Some(EnvelopeBatchProof {
            header: rb.header.clone(),
            index: rb.index,
            path: rb.path.clone(),
        }),
    };
    for verifier in [verifier(&root, Revocations::none()), v] {
        assert_eq!(
            verifier.verify_envelope(&forged).unwrap_err(),
            VerifyError::BadSignature
        );
    }
}
