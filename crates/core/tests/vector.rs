//! The committed envelope test vector (tests/vectors/envelope-v1.json): made
//! by an independent implementation (Python `cryptography` and protobuf
//! classes from stock protoc, see make_envelope_vector.py) and checked here
//! with ring, so any Ed25519 library can check what Antar signs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use antar_core::wire::{Envelope, Kind};
use antar_core::{payload_digest, ENVELOPE_DOMAIN};
use prost::Message as _;
use ring::signature::{UnparsedPublicKey, ED25519};

fn field(v: &serde_json::Value, name: &str) -> Vec<u8> {
    hex::decode(v[name].as_str().unwrap()).unwrap()
}

#[test]
fn committed_envelope_vector_verifies() {
    let v: serde_json::Value = serde_json::from_str(include_str!("vectors/envelope-v1.json")).unwrap();
    let (envelope, signature, public) = (
        field(&v, "envelope_hex"),
        field(&v, "signature_hex"),
        field(&v, "public_key_hex"),
    );
    assert_eq!(field(&v, "domain_hex"), ENVELOPE_DOMAIN);
    let message = [ENVELOPE_DOMAIN, &envelope].concat();
    assert_eq!(field(&v, "signed_message_hex"), message);

    let key = UnparsedPublicKey::new(&ED25519, &public);
    key.verify(&message, &signature)
        .expect("the vector's signature verifies");
    // Without the domain prefix, or with one bit flipped, it does not.
    assert!(key.verify(&envelope, &signature).is_err());
    let mut flipped = message.clone();
    flipped[40] ^= 0x01;
    assert!(key.verify(&flipped, &signature).is_err());

    // The digest binds the detached payload through its salt.
    let digest = payload_digest(&field(&v, "salt_hex"), &field(&v, "payload_hex"));
    assert_eq!(digest.to_vec(), field(&v, "payload_digest_hex"));

    // And the bytes are an Envelope our generated code reads field for field.
    let e = Envelope::decode(envelope.as_slice()).unwrap();
    assert_eq!(e.kind, Kind::Notice as i32);
    assert_eq!((e.sender.as_str(), e.recipient.as_str()), ("finance", "health"));
    assert_eq!(e.service, "tax.notice");
    assert_eq!(e.payload_digest, digest.to_vec());
    assert_eq!(e.payload_size, field(&v, "payload_hex").len() as u64);
    assert_eq!(e.headers["case"], "2026-001");
    antar_core::MessageId::parse(&e.id).expect("a UUIDv7 id");
}
