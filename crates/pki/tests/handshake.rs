//! Real TLS handshakes on loopback with the configurations of `antar_pki::tls`.

// Tests panic on the first unexpected error; that is their job.
#![allow(clippy::unwrap_used)]

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use antar_pki::tls::{
    api_client_config, api_server_config, peer_client_config, peer_client_config_with_crls, peer_identity,
    peer_server_config,
};
use antar_pki::{serial_of, AgencyId, Ca, CertKey, Identity, PkiError, Role};
use rustls::{CertificateError, ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const FED: &str = "gov.example";

fn agency(s: &str) -> AgencyId {
    AgencyId::parse(s).unwrap()
}

fn localhost() -> Vec<IpAddr> {
    vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]
}

/// A federation root issuing node certificates.
struct Fed {
    name: &'static str,
    root: Ca,
}

impl Fed {
    fn new() -> Self {
        Self::named(FED)
    }

    fn named(name: &'static str) -> Self {
        Self {
            name,
            root: Ca::new_federation_root(name, 3650).unwrap(),
        }
    }

    fn node_tls(&self, a: &str) -> CertKey {
        self.root
            .issue_node_tls(
                self.name,
                &agency(a),
                &[format!("{a}.gov.example")],
                &localhost(),
                365,
            )
            .unwrap()
    }

    fn peer_server(&self, cert: &CertKey, crls: Vec<Vec<u8>>) -> Arc<ServerConfig> {
        peer_server_config(
            &self.root.cert_der(),
            vec![cert.cert_der()],
            cert.key_der(),
            FED,
            crls,
        )
        .unwrap()
    }

    fn peer_client(&self, cert: &CertKey, expected: &str) -> Arc<ClientConfig> {
        peer_client_config(
            &self.root.cert_der(),
            vec![cert.cert_der()],
            cert.key_der(),
            FED,
            &agency(expected),
        )
        .unwrap()
    }
}

/// An agency's local CA with its API server config.
struct Local {
    ca: Ca,
    server: Arc<ServerConfig>,
}

impl Local {
    fn new(a: &str) -> Self {
        let ca = Ca::new_local(FED, &agency(a), 1825).unwrap();
        let cert = ca
            .issue_api_server(FED, &agency(a), &["localhost".into()], &localhost(), 365)
            .unwrap();
        let server = api_server_config(
            &ca.cert_der(),
            vec![cert.cert_der()],
            cert.key_der(),
            FED,
            &agency(a),
        )
        .unwrap();
        Self { ca, server }
    }

    fn client_with(&self, cert: &CertKey) -> Arc<ClientConfig> {
        api_client_config(&self.ca.cert_der(), vec![cert.cert_der()], cert.key_der()).unwrap()
    }
}

/// What each side saw: the peer's identity, or the error that ended it.
struct Outcome {
    server: io::Result<Option<Identity>>,
    client: io::Result<Option<Identity>>,
}

/// Runs one handshake on 127.0.0.1:0 and a two-byte exchange, so that a
/// client certificate refused by the server (which a TLS 1.3 client only
/// learns after its side of the handshake) shows up on the client too.
async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>, name: &str) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server);
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let conn = tls.get_ref().1;
        assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        let id = peer_identity(conn.peer_certificates().unwrap_or(&[]));
        tls.write_all(b"ok").await?;
        tls.flush().await?;
        // Wait for the client's close_notify.
        let mut buf = [0u8; 1];
        let _ = tls.read(&mut buf).await;
        Ok::<_, io::Error>(id)
    });
    let connector = TlsConnector::from(client);
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let client = async {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = connector.connect(server_name, tcp).await?;
        let id = peer_identity(tls.get_ref().1.peer_certificates().unwrap_or(&[]));
        let mut buf = [0u8; 2];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"ok");
        tls.shutdown().await?;
        Ok(id)
    }
    .await;
    let server = server.await.unwrap();
    Outcome { server, client }
}

fn tls_error(e: &io::Error) -> &rustls::Error {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a rustls error: {e:?}"))
}

/// The certificate error of a failed side.
fn cert_error(r: &io::Result<Option<Identity>>) -> &CertificateError {
    match r {
        Err(e) => match tls_error(e) {
            rustls::Error::InvalidCertificate(c) => c,
            other => panic!("expected InvalidCertificate, got {other:?}"),
        },
        Ok(id) => panic!("expected a failure, got a handshake with {id:?}"),
    }
}

/// The `PkiError::IdentityRefused` of a failed side: (expected, found).
fn identity_refused(r: &io::Result<Option<Identity>>) -> (String, String) {
    match cert_error(r) {
        CertificateError::Other(other) => match other.0.downcast_ref::<PkiError>() {
            Some(PkiError::IdentityRefused { expected, found }) => (expected.clone(), found.clone()),
            e => panic!("expected IdentityRefused, got {e:?}"),
        },
        other => panic!("expected an identity refusal, got {other:?}"),
    }
}

/// The other side of a refused handshake got an alert, never data.
fn got_alert(r: &io::Result<Option<Identity>>) {
    match r {
        Err(e) => assert!(matches!(tls_error(e), rustls::Error::AlertReceived(_)), "{e:?}"),
        Ok(id) => panic!("expected an alert, got a session with {id:?}"),
    }
}

#[tokio::test]
async fn nodes_handshake_and_see_each_others_identity() {
    let fed = Fed::new();
    let (tax, health) = (fed.node_tls("tax"), fed.node_tls("health"));
    // health connects to tax, then tax to health: both roles of both certs.
    for ((server, server_id), (client, client_id)) in [
        ((&tax, "tax"), (&health, "health")),
        ((&health, "health"), (&tax, "tax")),
    ] {
        let out = handshake(
            fed.peer_server(server, Vec::new()),
            fed.peer_client(client, server_id),
            "127.0.0.1",
        )
        .await;
        assert_eq!(out.server.unwrap(), Some(Identity::node(FED, agency(client_id))));
        assert_eq!(out.client.unwrap(), Some(Identity::node(FED, agency(server_id))));
    }
}

#[tokio::test]
async fn peer_server_refuses_app_cert_from_a_local_ca() {
    let fed = Fed::new();
    let tax = fed.node_tls("tax");
    let local = Local::new("health");
    let app = local
        .ca
        .issue_client(FED, &agency("health"), &Role::App("portal".into()), 365)
        .unwrap();
    let client = peer_client_config(
        &fed.root.cert_der(),
        vec![app.cert_der()],
        app.key_der(),
        FED,
        &agency("tax"),
    )
    .unwrap();
    let out = handshake(fed.peer_server(&tax, Vec::new()), client, "127.0.0.1").await;
    assert_eq!(cert_error(&out.server), &CertificateError::UnknownIssuer);
    got_alert(&out.client);
}

#[tokio::test]
async fn peer_server_refuses_a_root_issued_cert_without_node_role() {
    let fed = Fed::new();
    let tax = fed.node_tls("tax");
    // Chains to the right root, but says "app": authorised by role, not by chain.
    let app = fed
        .root
        .issue_client(FED, &agency("health"), &Role::App("portal".into()), 365)
        .unwrap();
    let client = peer_client_config(
        &fed.root.cert_der(),
        vec![app.cert_der()],
        app.key_der(),
        FED,
        &agency("tax"),
    )
    .unwrap();
    let out = handshake(fed.peer_server(&tax, Vec::new()), client, "127.0.0.1").await;
    let (_, found) = identity_refused(&out.server);
    assert_eq!(found, "spiffe://gov.example/agency/health/app/portal");
    got_alert(&out.client);

    // A node identity, but of another federation name.
    let stray = fed
        .root
        .issue_node_tls("other.example", &agency("health"), &[], &[], 365)
        .unwrap();
    let client = peer_client_config(
        &fed.root.cert_der(),
        vec![stray.cert_der()],
        stray.key_der(),
        FED,
        &agency("tax"),
    )
    .unwrap();
    let out = handshake(fed.peer_server(&tax, Vec::new()), client, "127.0.0.1").await;
    let (_, found) = identity_refused(&out.server);
    assert_eq!(found, "spiffe://other.example/agency/health");
    got_alert(&out.client);
}

#[tokio::test]
async fn peer_server_refuses_nodes_of_other_roots() {
    let fed = Fed::new();
    let tax = fed.node_tls("tax");
    // Another federation: its root's subject is unknown here.
    // A rogue root of the same name: the subject matches, the signature does not.
    for (other, error) in [
        (Fed::named("other.example"), CertificateError::UnknownIssuer),
        (Fed::new(), CertificateError::BadSignature),
    ] {
        let intruder = other.node_tls("health");
        let client = peer_client_config(
            &fed.root.cert_der(),
            vec![intruder.cert_der()],
            intruder.key_der(),
            FED,
            &agency("tax"),
        )
        .unwrap();
        let out = handshake(fed.peer_server(&tax, Vec::new()), client, "127.0.0.1").await;
        assert_eq!(cert_error(&out.server), &error);
        got_alert(&out.client);
    }
}

#[tokio::test]
async fn peer_client_refuses_servers_of_other_roots() {
    let fed = Fed::new();
    let health = fed.node_tls("health");
    for (other, error) in [
        (Fed::named("other.example"), CertificateError::UnknownIssuer),
        (Fed::new(), CertificateError::BadSignature),
    ] {
        let impostor = other.node_tls("tax");
        let server = peer_server_config(
            &other.root.cert_der(),
            vec![impostor.cert_der()],
            impostor.key_der(),
            other.name,
            Vec::new(),
        )
        .unwrap();
        let out = handshake(server, fed.peer_client(&health, "tax"), "127.0.0.1").await;
        assert_eq!(cert_error(&out.client), &error);
        got_alert(&out.server);
    }
}

#[tokio::test]
async fn peer_client_expecting_health_refuses_finance() {
    let fed = Fed::new();
    let finance = fed.node_tls("finance");
    let tax = fed.node_tls("tax");
    let out = handshake(
        fed.peer_server(&finance, Vec::new()),
        fed.peer_client(&tax, "health"),
        "health.gov.example",
    )
    .await;
    assert_eq!(
        identity_refused(&out.client),
        (
            "spiffe://gov.example/agency/health".to_owned(),
            "spiffe://gov.example/agency/finance".to_owned()
        )
    );
    got_alert(&out.server);
}

#[tokio::test]
async fn peer_server_refuses_a_revoked_node_cert() {
    let fed = Fed::new();
    let (tax, health, finance) = (
        fed.node_tls("tax"),
        fed.node_tls("health"),
        fed.node_tls("finance"),
    );
    let crl = fed
        .root
        .revocation_list(&[serial_of(&health.cert_der()).unwrap()], 1, 30)
        .unwrap();
    let crl = pem::parse(crl).unwrap().into_contents();
    let server = fed.peer_server(&tax, vec![crl]);
    let out = handshake(server.clone(), fed.peer_client(&health, "tax"), "127.0.0.1").await;
    assert_eq!(cert_error(&out.server), &CertificateError::Revoked);
    got_alert(&out.client);
    // A node that is not listed still gets in.
    let out = handshake(server, fed.peer_client(&finance, "tax"), "127.0.0.1").await;
    assert_eq!(out.server.unwrap(), Some(Identity::node(FED, agency("finance"))));
}

#[tokio::test]
async fn peer_client_with_crls_refuses_a_revoked_server() {
    let fed = Fed::new();
    let (tax, health) = (fed.node_tls("tax"), fed.node_tls("health"));
    let crl = fed
        .root
        .revocation_list(&[serial_of(&tax.cert_der()).unwrap()], 1, 30)
        .unwrap();
    let crl = pem::parse(crl).unwrap().into_contents();
    let client = peer_client_config_with_crls(
        &fed.root.cert_der(),
        vec![health.cert_der()],
        health.key_der(),
        FED,
        &agency("tax"),
        vec![crl],
    )
    .unwrap();
    let out = handshake(fed.peer_server(&tax, Vec::new()), client, "127.0.0.1").await;
    assert_eq!(cert_error(&out.client), &CertificateError::Revoked);
    got_alert(&out.server);
}

#[test]
fn peer_client_refuses_a_crl_not_signed_by_the_root() {
    let fed = Fed::new();
    let other = Fed::new();
    let health = fed.node_tls("health");
    let crl = other.root.revocation_list(&[], 1, 30).unwrap();
    let crl = pem::parse(crl).unwrap().into_contents();
    let err = peer_client_config_with_crls(
        &fed.root.cert_der(),
        vec![health.cert_der()],
        health.key_der(),
        FED,
        &agency("tax"),
        vec![crl],
    )
    .unwrap_err();
    assert!(matches!(err, PkiError::BadCrl(_)), "{err:?}");
}

#[tokio::test]
async fn api_server_accepts_app_admin_and_auditor_certs() {
    let local = Local::new("tax");
    for role in [
        Role::App("portal".into()),
        Role::Admin("alice".into()),
        Role::Auditor("oag".into()),
    ] {
        let cert = local.ca.issue_client(FED, &agency("tax"), &role, 365).unwrap();
        for name in ["localhost", "127.0.0.1"] {
            let out = handshake(local.server.clone(), local.client_with(&cert), name).await;
            assert_eq!(
                out.server.unwrap(),
                Some(Identity {
                    federation: FED.into(),
                    agency: agency("tax"),
                    role: role.clone()
                })
            );
            // The API server certificate carries the node's identity.
            assert_eq!(out.client.unwrap(), Some(Identity::node(FED, agency("tax"))));
        }
    }
}

#[tokio::test]
async fn api_server_refuses_a_node_tls_cert() {
    let fed = Fed::new();
    let local = Local::new("tax");
    let node = fed.node_tls("tax");
    let out = handshake(local.server.clone(), local.client_with(&node), "localhost").await;
    assert_eq!(cert_error(&out.server), &CertificateError::UnknownIssuer);
    got_alert(&out.client);
}

#[tokio::test]
async fn api_server_refuses_a_node_identity_even_from_its_local_ca() {
    let local = Local::new("tax");
    let node = local
        .ca
        .issue_node_tls(FED, &agency("tax"), &[], &[], 365)
        .unwrap();
    let out = handshake(local.server.clone(), local.client_with(&node), "localhost").await;
    let (_, found) = identity_refused(&out.server);
    assert_eq!(found, "spiffe://gov.example/agency/tax");
    got_alert(&out.client);
}

#[tokio::test]
async fn api_server_refuses_an_app_of_another_agency() {
    let local = Local::new("tax");
    let app = local
        .ca
        .issue_client(FED, &agency("health"), &Role::App("portal".into()), 365)
        .unwrap();
    let out = handshake(local.server.clone(), local.client_with(&app), "localhost").await;
    let (_, found) = identity_refused(&out.server);
    assert_eq!(found, "spiffe://gov.example/agency/health/app/portal");
    got_alert(&out.client);
}

#[tokio::test]
async fn api_client_verifies_the_hostname() {
    let local = Local::new("tax");
    let app = local
        .ca
        .issue_client(FED, &agency("tax"), &Role::App("portal".into()), 365)
        .unwrap();
    let out = handshake(local.server.clone(), local.client_with(&app), "evil.example").await;
    assert!(
        matches!(
            cert_error(&out.client),
            CertificateError::NotValidForNameContext { .. } | CertificateError::NotValidForName
        ),
        "{:?}",
        out.client.err()
    );
    got_alert(&out.server);
}

#[tokio::test]
async fn api_client_refuses_a_server_cert_from_the_federation_root() {
    // The two trust roots are never mixed: a node TLS cert is no API server cert.
    let fed = Fed::new();
    let local = Local::new("tax");
    let node = fed.node_tls("tax");
    let server = api_server_config(
        &local.ca.cert_der(),
        vec![node.cert_der()],
        node.key_der(),
        FED,
        &agency("tax"),
    )
    .unwrap();
    let app = local
        .ca
        .issue_client(FED, &agency("tax"), &Role::App("portal".into()), 365)
        .unwrap();
    let out = handshake(server, local.client_with(&app), "127.0.0.1").await;
    assert_eq!(cert_error(&out.client), &CertificateError::UnknownIssuer);
    got_alert(&out.server);
}

#[tokio::test]
async fn tls_1_2_clients_are_refused() {
    let fed = Fed::new();
    let (tax, health) = (fed.node_tls("tax"), fed.node_tls("health"));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(fed.root.cert_der().into()).unwrap();
    let client = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![health.cert_der().into()],
            health.key_der().try_into().unwrap(),
        )
        .unwrap();
    let out = handshake(
        fed.peer_server(&tax, Vec::new()),
        Arc::new(client),
        "tax.gov.example",
    )
    .await;
    let server_err = out.server.unwrap_err();
    assert!(
        matches!(tls_error(&server_err), rustls::Error::PeerIncompatible(_)),
        "{server_err:?}"
    );
    got_alert(&out.client);
}
