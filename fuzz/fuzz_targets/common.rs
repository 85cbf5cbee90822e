// Shared by the fuzz targets: the federation root and node keys to verify
// against. With seed corpora (`cargo +nightly run --release --bin seed`)
// they are the ones the seeds were signed under, read from corpus/keys/, so
// mutated seeds reach the signature, chain and Merkle checks; without, a
// root is made once per process (rcgen) and a fixed dummy key is used.

use std::sync::OnceLock;

use antar_core::{Revocations, TrustAnchor, Verifier};

/// Federation name the seeds are made for.
pub const FED: &str = "fuzz.example";

/// A file from corpus/keys/ written by the seed generator, if present.
pub fn seed_key(name: &str) -> Option<Vec<u8>> {
    let dir = std::env::var_os("ANTAR_FUZZ_KEYS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/corpus/keys").into());
    std::fs::read(dir.join(name)).ok()
}

#[allow(dead_code)]
pub fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let root = seed_key("root.der").unwrap_or_else(|| {
            eprintln!(
                "antar-fuzz: no corpus/keys/root.der (run `cargo +nightly run --release --bin seed`); \
                 verifying against a random root, so no input can pass the chain check"
            );
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "fuzz federation root");
            let key = rcgen::KeyPair::generate().expect("key");
            params.self_signed(&key).expect("root").der().to_vec()
        });
        Verifier::new(TrustAnchor::new(FED, root).expect("anchor"), Revocations::none())
    })
}

/// Public keys of the seeded nodes `finance` (the log) and `health` (its
/// witness), or dummies.
#[allow(dead_code)]
pub fn node_keys() -> &'static (Vec<u8>, Vec<u8>) {
    static K: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    K.get_or_init(|| {
        let key = |agency: &str| seed_key(&format!("{agency}.pub")).unwrap_or_else(|| vec![7u8; 32]);
        (key("finance"), key("health"))
    })
}
