// Shared by the fuzz targets: a verifier for a federation root made once
// per process (rcgen), so inputs reach the signature and chain checks.

use std::sync::OnceLock;

use antar_core::{Revocations, TrustAnchor, Verifier};

pub fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fuzz federation root");
        let key = rcgen::KeyPair::generate().expect("key");
        let root = params.self_signed(&key).expect("root");
        Verifier::new(
            TrustAnchor::new("fuzz.example", root.der().to_vec()).expect("anchor"),
            Revocations::none(),
        )
    })
}
