//! Certificate profiles, PEM files and the `antar pki` workflows.

// Tests panic on the first unexpected error; that is their job.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use x509_parser::prelude::{FromDer, X509Certificate};

use crate::layout::{self, FederationDir, Inspected, NodeDir};
use crate::*;

const FED: &str = "gov.example";

fn agency(s: &str) -> AgencyId {
    AgencyId::parse(s).unwrap()
}

fn info(ck: &CertKey) -> CertInfo {
    CertInfo::from_der(&ck.cert_der()).unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn days(info_not_before: &str, info_not_after: &str) -> i64 {
    use time::format_description::well_known::Rfc3339;
    let nb = time::OffsetDateTime::parse(info_not_before, &Rfc3339).unwrap();
    let na = time::OffsetDateTime::parse(info_not_after, &Rfc3339).unwrap();
    (na - nb).whole_days()
}

fn path_len(der: &[u8]) -> Option<u32> {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    cert.basic_constraints()
        .unwrap()
        .and_then(|bc| bc.value.path_len_constraint)
}

#[test]
fn federation_root_profile() {
    let root = Ca::new_federation_root(FED, ROOT_VALID_DAYS).unwrap();
    let i = CertInfo::from_der(&root.cert_der()).unwrap();
    assert_eq!(i.subject, "CN=Antar federation root gov.example");
    assert_eq!(i.issuer, i.subject);
    assert!(i.is_ca);
    assert_eq!(path_len(&root.cert_der()), Some(0));
    assert_eq!(i.key_algorithm, "ECDSA P-256");
    assert_eq!(i.key_usage, ["keyCertSign", "cRLSign"]);
    assert!(i.extended_key_usage.is_empty());
    assert_eq!(i.sans, ["URI:spiffe://gov.example"]);
    assert_eq!(i.identity, None);
    assert_eq!(days(&i.not_before, &i.not_after), 3650);
    assert_eq!(
        layout::federation_of_root(&root.cert_der()).unwrap(),
        "gov.example"
    );
}

#[test]
fn local_ca_profile() {
    let ca = Ca::new_local(FED, &agency("tax"), LOCAL_CA_VALID_DAYS).unwrap();
    let i = CertInfo::from_der(&ca.cert_der()).unwrap();
    assert!(i.subject.contains("CN=Antar local CA tax"), "{}", i.subject);
    assert_eq!(i.issuer, i.subject);
    assert!(i.is_ca);
    assert_eq!(path_len(&ca.cert_der()), Some(0));
    assert_eq!(i.key_algorithm, "ECDSA P-256");
    assert_eq!(i.key_usage, ["keyCertSign", "cRLSign"]);
    assert!(i.sans.is_empty());
    assert_eq!(days(&i.not_before, &i.not_after), 1825);
}

#[test]
fn node_tls_profile() {
    let root = Ca::new_federation_root(FED, 3650).unwrap();
    let ck = root
        .issue_node_tls(
            FED,
            &agency("tax"),
            &["tax.gov.example".into()],
            &[IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5))],
            NODE_VALID_DAYS,
        )
        .unwrap();
    let i = info(&ck);
    assert_eq!(i.issuer, "CN=Antar federation root gov.example");
    assert!(!i.is_ca);
    assert_eq!(i.key_algorithm, "ECDSA P-256");
    assert_eq!(i.key_usage, ["digitalSignature"]);
    assert_eq!(i.extended_key_usage, ["serverAuth", "clientAuth"]);
    assert_eq!(
        i.sans,
        [
            "DNS:tax.gov.example",
            "IP:10.0.0.5",
            "URI:spiffe://gov.example/agency/tax"
        ]
    );
    assert_eq!(i.identity.as_deref(), Some("spiffe://gov.example/agency/tax"));
    assert_eq!(days(&i.not_before, &i.not_after), 365);
    assert_eq!(
        identity_of(&ck.cert_der()).unwrap(),
        Identity::node(FED, agency("tax"))
    );
    // One PKCS#8 block, generated just now; no key material lives in the source.
    assert_eq!(pem::parse(&ck.key_pem).unwrap().tag(), crate::files::PRIVATE_KEY);
}

#[test]
fn node_signing_profile() {
    let root = Ca::new_federation_root(FED, 3650).unwrap();
    let ck = root
        .issue_node_signing(FED, &agency("tax"), NODE_VALID_DAYS)
        .unwrap();
    let i = info(&ck);
    assert_eq!(i.key_algorithm, "Ed25519");
    assert_eq!(i.key_usage, ["digitalSignature", "contentCommitment"]);
    assert!(i.extended_key_usage.is_empty());
    assert_eq!(i.sans, ["URI:spiffe://gov.example/agency/tax"]);
    assert!(!i.is_ca);
    assert_eq!(days(&i.not_before, &i.not_after), 365);
    antar_core::Signer::from_pkcs8(&ck.key_der(), ck.cert_der()).unwrap();
}

#[test]
fn api_server_and_client_profiles() {
    let ca = Ca::new_local(FED, &agency("tax"), 1825).unwrap();
    let server = ca
        .issue_api_server(
            FED,
            &agency("tax"),
            &["localhost".into()],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            365,
        )
        .unwrap();
    let i = info(&server);
    assert_eq!(i.issuer, CertInfo::from_der(&ca.cert_der()).unwrap().subject);
    assert_eq!(i.extended_key_usage, ["serverAuth"]);
    assert_eq!(
        i.sans,
        [
            "DNS:localhost",
            "IP:127.0.0.1",
            "URI:spiffe://gov.example/agency/tax"
        ]
    );

    for (role, uri) in [
        (
            Role::App("portal".into()),
            "spiffe://gov.example/agency/tax/app/portal",
        ),
        (
            Role::Admin("alice".into()),
            "spiffe://gov.example/agency/tax/admin/alice",
        ),
        (
            Role::Auditor("oag".into()),
            "spiffe://gov.example/agency/tax/auditor/oag",
        ),
    ] {
        let ck = ca
            .issue_client(FED, &agency("tax"), &role, CLIENT_VALID_DAYS)
            .unwrap();
        let i = info(&ck);
        assert_eq!(i.key_algorithm, "ECDSA P-256");
        assert_eq!(i.key_usage, ["digitalSignature"]);
        assert_eq!(i.extended_key_usage, ["clientAuth"]);
        assert_eq!(i.sans, [format!("URI:{uri}")]);
        assert_eq!(identity_of(&ck.cert_der()).unwrap().role, role);
    }
}

#[test]
fn bad_issuance_inputs_have_exact_errors() {
    let ca = Ca::new_local(FED, &agency("tax"), 1825).unwrap();
    assert!(matches!(
        ca.issue_client(FED, &agency("tax"), &Role::Node, 365),
        Err(PkiError::NotClientRole(_))
    ));
    assert!(matches!(
        ca.issue_client(FED, &agency("tax"), &Role::App("Bad Name".into()), 365),
        Err(PkiError::InvalidIdentity(_))
    ));
    assert!(matches!(
        Ca::new_federation_root("Gov Example", 365),
        Err(PkiError::InvalidIdentity(_))
    ));
    assert!(matches!(
        ca.issue_node_tls("gov/example", &agency("tax"), &[], &[], 365),
        Err(PkiError::InvalidIdentity(_))
    ));
    assert!(matches!(
        ca.issue_node_tls(FED, &agency("tax"), &["not a host".into()], &[], 365),
        Err(PkiError::InvalidDnsName(n)) if n == "not a host"
    ));
    assert!(matches!(
        ca.issue_api_server(FED, &agency("tax"), &[], &[], 365),
        Err(PkiError::NoServerName)
    ));
    assert!(matches!(
        ca.issue_node_signing(FED, &agency("tax"), 0),
        Err(PkiError::InvalidValidity(_))
    ));
    let now = time::OffsetDateTime::now_utc();
    assert!(matches!(
        ca.issue_node_signing_with_validity(FED, &agency("tax"), now, now),
        Err(PkiError::InvalidValidity(_))
    ));
    assert!(matches!(
        ca.revocation_list(&[], 1, 0),
        Err(PkiError::InvalidValidity(_))
    ));
}

#[test]
fn serials_are_random_positive_and_at_least_64_bits() {
    let root = Ca::new_federation_root(FED, 3650).unwrap();
    let mut seen = HashSet::new();
    for _ in 0..64 {
        let ck = root.issue_node_signing(FED, &agency("tax"), 365).unwrap();
        let serial = serial_of(&ck.cert_der()).unwrap();
        assert!(serial.len() * 8 >= 64, "{serial:?}");
        assert!(serial[0] & 0x80 == 0 && serial[0] != 0, "{serial:?}");
        assert_eq!(info(&ck).serial_hex, inspect::hex(&serial));
        assert!(seen.insert(serial), "duplicate serial");
    }
}

#[test]
fn ca_round_trips_through_pem_and_checks_its_key() {
    let root = Ca::new_federation_root(FED, 3650).unwrap();
    let loaded = Ca::from_pem(root.cert_pem(), root.key_pem()).unwrap();
    assert_eq!(loaded.cert_der(), root.cert_der());
    // A loaded CA issues certificates whose issuer is byte-identical to the root's subject.
    let ck = loaded.issue_node_signing(FED, &agency("tax"), 365).unwrap();
    let ck_der = ck.cert_der();
    let (_, cert) = X509Certificate::from_der(&ck_der).unwrap();
    let root_der = root.cert_der();
    let (_, root_cert) = X509Certificate::from_der(&root_der).unwrap();
    assert_eq!(cert.issuer().as_raw(), root_cert.subject().as_raw());
    cert.verify_signature(Some(root_cert.public_key())).unwrap();

    let other = Ca::new_federation_root(FED, 3650).unwrap();
    assert!(matches!(
        Ca::from_pem(root.cert_pem(), other.key_pem()),
        Err(PkiError::KeyMismatch)
    ));
    assert!(matches!(
        Ca::from_pem(&ck.cert_pem, &ck.key_pem),
        Err(PkiError::NotCa { .. })
    ));
    assert!(matches!(
        Ca::from_pem("garbage", root.key_pem()),
        Err(PkiError::BadCertificate(_))
    ));
    assert!(matches!(
        Ca::from_pem(root.cert_pem(), "garbage"),
        Err(PkiError::BadKey(_))
    ));
}

#[test]
fn identity_needs_exactly_one_antar_uri() {
    let root = Ca::new_federation_root(FED, 3650).unwrap();
    // The root has a URI SAN that is a trust domain, not an identity.
    assert!(matches!(
        identity_of(&root.cert_der()),
        Err(PkiError::NoIdentity { found }) if found == "spiffe://gov.example"
    ));
    let local = Ca::new_local(FED, &agency("tax"), 365).unwrap();
    assert!(matches!(
        identity_of(&local.cert_der()),
        Err(PkiError::NoIdentity { found }) if found == "none"
    ));
    assert!(matches!(
        identity_of(b"not der"),
        Err(PkiError::BadCertificate(_))
    ));
    assert_eq!(tls::peer_identity(&[]), None);
    assert_eq!(tls::peer_identity(&[root.cert_der().into()]), None);
}

/// The cache gives what parsing gives, for each certificate apart, also
/// when asked again and after it filled up; certificates without an
/// identity are never taken for one.
#[test]
fn cached_identities_are_the_parsed_ones() {
    let root = Ca::new_federation_root(FED, 3650).unwrap();
    let tax = root
        .issue_node_tls(FED, &agency("tax"), &[], &[], 365)
        .unwrap()
        .cert_der();
    let health = root
        .issue_node_tls(FED, &agency("health"), &[], &[], 365)
        .unwrap()
        .cert_der();
    let cache = tls::IdentityCache::default();
    for _ in 0..2 {
        for der in [&tax, &health] {
            let certs = [der.clone().into()];
            let id = cache.identity(&certs);
            assert!(id.is_some());
            assert_eq!(id, tls::peer_identity(&certs));
        }
        assert_eq!(cache.identity(&[root.cert_der().into()]), None);
        assert_eq!(cache.identity(&[]), None);
    }
    assert_eq!(
        cache.identity(&[tax.clone().into()]).unwrap().agency.as_str(),
        "tax"
    );
    assert_eq!(
        cache.identity(&[health.clone().into()]).unwrap().agency.as_str(),
        "health"
    );
}

#[test]
fn revocation_list_lists_the_serials() {
    let root = Ca::new_federation_root(FED, 3650).unwrap();
    let a = serial_of(
        &root
            .issue_node_tls(FED, &agency("a"), &[], &[], 365)
            .unwrap()
            .cert_der(),
    )
    .unwrap();
    let b = serial_of(
        &root
            .issue_node_signing(FED, &agency("b"), 365)
            .unwrap()
            .cert_der(),
    )
    .unwrap();
    let pem = root.revocation_list(&[a.clone(), b.clone()], 42, 7).unwrap();
    assert!(pem.starts_with("-----BEGIN X509 CRL-----"));
    let der = pem::parse(&pem).unwrap().into_contents();
    let i = CrlInfo::from_der(&der).unwrap();
    assert_eq!(i.crl_number, Some(42));
    assert_eq!(i.issuer, "CN=Antar federation root gov.example");
    assert_eq!(i.revoked_serials, [inspect::hex(&a), inspect::hex(&b)]);
    assert!(i.next_update.is_some());
    let anchor = antar_core::TrustAnchor::new(FED, root.cert_der()).unwrap();
    assert_eq!(
        antar_core::Revocations::from_crl_der(&anchor, &der)
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn keys_are_0600_and_certs_0644_even_when_replacing_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = Ca::new_federation_root(FED, 3650).unwrap();
    let key = dir.path().join("deep/er/root.key");
    let cert = dir.path().join("deep/er/root.crt");
    write_key(&key, root.key_pem()).unwrap();
    write_cert(&cert, root.cert_pem()).unwrap();
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&cert), 0o644);

    // A world-readable file in the way is replaced by a 0600 one.
    let loose = dir.path().join("loose.key");
    std::fs::write(&loose, "old").unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    write_key(&loose, root.key_pem()).unwrap();
    assert_eq!(mode(&loose), 0o600);
    assert_eq!(std::fs::read_to_string(&loose).unwrap(), root.key_pem());
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");

    assert_eq!(read_cert_der(&cert).unwrap(), root.cert_der());
    assert_eq!(
        read_key_der(&key).unwrap(),
        CertKey {
            cert_pem: String::new(),
            key_pem: root.key_pem().to_owned()
        }
        .key_der()
    );
    let loaded = Ca::load(&cert, &key).unwrap();
    assert_eq!(loaded.cert_der(), root.cert_der());
}

#[test]
fn read_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.crt");
    let err = read_cert_der(&missing).unwrap_err();
    assert!(matches!(&err, PkiError::Read { path, .. } if *path == missing));
    assert!(err.to_string().contains("missing.crt"), "{err}");

    let root = Ca::new_federation_root(FED, 3650).unwrap();
    let cert = dir.path().join("root.crt");
    write_cert(&cert, root.cert_pem()).unwrap();
    let err = read_key_der(&cert).unwrap_err();
    assert!(
        matches!(&err, PkiError::MissingPem { path, label } if *path == cert && *label == crate::files::PRIVATE_KEY),
        "{err:?}"
    );
    assert!(matches!(
        read_crl_der(&cert),
        Err(PkiError::MissingPem {
            label: "X509 CRL",
            ..
        })
    ));
    let bad = dir.path().join("bad.crt");
    std::fs::write(
        &bad,
        "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    assert!(matches!(read_certs_der(&bad), Err(PkiError::BadPem { path, .. }) if path == bad));

    // A bundle keeps its order.
    let bundle = dir.path().join("bundle.crt");
    let other = Ca::new_federation_root(FED, 3650).unwrap();
    write_cert(&bundle, &format!("{}{}", root.cert_pem(), other.cert_pem())).unwrap();
    assert_eq!(
        read_certs_der(&bundle).unwrap(),
        [root.cert_der(), other.cert_der()]
    );
}

#[test]
fn serial_hex_parsing() {
    assert_eq!(parse_serial_hex("4f3a").unwrap(), [0x4f, 0x3a]);
    assert_eq!(parse_serial_hex("4F:3A").unwrap(), [0x4f, 0x3a]);
    assert_eq!(parse_serial_hex("0x4f3a").unwrap(), [0x4f, 0x3a]);
    assert_eq!(parse_serial_hex("abc").unwrap(), [0x0a, 0xbc]);
    for bad in ["", "xyz", "0x", &"ab".repeat(21)] {
        assert!(
            matches!(parse_serial_hex(bad), Err(PkiError::InvalidSerial(s)) if s == bad),
            "{bad}"
        );
    }
}

#[test]
fn debug_never_prints_keys() {
    let root = Ca::new_federation_root(FED, 3650).unwrap();
    let ck = root.issue_node_signing(FED, &agency("tax"), 365).unwrap();
    let marker = crate::files::PRIVATE_KEY;
    assert!(!format!("{root:?}").contains(marker));
    assert!(!format!("{ck:?}").contains(marker));
    assert!(
        !format!("{ck:?}").contains(&ck.key_pem[30..60]),
        "no key bytes either"
    );
}

#[test]
fn workflows_build_the_documented_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let fed = FederationDir::new(tmp.path().join("federation"));
    let node = NodeDir::new(tmp.path().join("tax"));

    layout::init_federation(&fed, FED, ROOT_VALID_DAYS, false).unwrap();
    assert_eq!(mode(&fed.root_key()), 0o600);
    assert_eq!(fed.federation().unwrap(), FED);
    // A root is never replaced by accident.
    assert!(matches!(
        layout::init_federation(&fed, FED, ROOT_VALID_DAYS, false),
        Err(PkiError::Exists { path }) if path == fed.root_cert()
    ));

    let written = layout::issue_node(
        &fed,
        &node,
        &agency("tax"),
        &["tax.gov.example".into()],
        &[],
        NODE_VALID_DAYS,
        false,
    )
    .unwrap();
    assert_eq!(written.len(), 5);
    assert_eq!(node.identity().unwrap(), Identity::node(FED, agency("tax")));
    assert_eq!(
        read_cert_der(&node.federation_root()).unwrap(),
        read_cert_der(&fed.root_cert()).unwrap()
    );
    for key in [node.tls_key(), node.signing_key()] {
        assert_eq!(mode(&key), 0o600, "{}", key.display());
    }
    antar_core::Signer::from_pkcs8(
        &read_key_der(&node.signing_key()).unwrap(),
        read_cert_der(&node.signing_cert()).unwrap(),
    )
    .unwrap();
    assert!(matches!(
        layout::issue_node(&fed, &node, &agency("tax"), &[], &[], 365, false),
        Err(PkiError::Exists { .. })
    ));
    layout::issue_node(&fed, &node, &agency("tax"), &[], &[], 365, true).unwrap();

    layout::init_local_ca(
        &node,
        FED,
        &agency("tax"),
        &["localhost".into()],
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        LOCAL_CA_VALID_DAYS,
        NODE_VALID_DAYS,
        false,
    )
    .unwrap();
    assert_eq!(mode(&node.local_ca_key()), 0o600);
    assert_eq!(mode(&node.api_key()), 0o600);
    let api = CertInfo::from_der(&read_cert_der(&node.api_cert()).unwrap()).unwrap();
    assert_eq!(
        api.sans,
        [
            "DNS:localhost",
            "IP:127.0.0.1",
            "URI:spiffe://gov.example/agency/tax"
        ]
    );

    let role = Role::Auditor("oag".into());
    let files = layout::issue_client(&node, FED, &agency("tax"), &role, 365, false).unwrap();
    assert_eq!(files, {
        let (c, k) = node.client_files(&role).unwrap();
        vec![c, k]
    });
    assert!(files[0].ends_with("clients/auditor-oag.crt"));
    assert_eq!(mode(&files[1]), 0o600);
    assert_eq!(
        identity_of(&read_cert_der(&files[0]).unwrap()).unwrap().role,
        role
    );

    // Revocation accumulates serials and the CRL number always grows.
    let tls_serial = serial_of(&read_cert_der(&node.tls_cert()).unwrap()).unwrap();
    let first = layout::revoke(&fed, std::slice::from_ref(&tls_serial), CRL_NEXT_UPDATE_DAYS).unwrap();
    assert_eq!(first.serials, [inspect::hex(&tls_serial)]);
    let sig_serial = serial_of(&read_cert_der(&node.signing_cert()).unwrap()).unwrap();
    let second = layout::revoke(&fed, &[sig_serial.clone(), tls_serial.clone()], 30).unwrap();
    assert!(second.crl_number > first.crl_number);
    assert_eq!(
        second.serials,
        [inspect::hex(&tls_serial), inspect::hex(&sig_serial)]
    );
    match layout::inspect_file(&fed.crl()).unwrap() {
        Inspected::Crl(crl) => {
            assert_eq!(crl.revoked_serials, second.serials);
            assert_eq!(crl.crl_number, Some(second.crl_number));
        }
        other => panic!("{other:?}"),
    }
    match layout::inspect_file(&node.tls_cert()).unwrap() {
        Inspected::Certificates(certs) => {
            assert_eq!(certs.len(), 1);
            assert_eq!(
                certs[0].identity.as_deref(),
                Some("spiffe://gov.example/agency/tax")
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        layout::inspect_file(&node.tls_key()),
        Err(PkiError::MissingPem {
            label: "CERTIFICATE or X509 CRL",
            ..
        })
    ));
}
