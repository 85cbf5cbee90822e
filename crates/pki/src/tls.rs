//! rustls configurations of the peer and API listeners and their clients.
//!
//! Every configuration is TLS 1.3 only, uses the ring provider and offers
//! ALPN `h2` (gRPC). Chain checks are rustls's webpki ones; on top of them a
//! certificate is authorised by the SPIFFE identity in its URI SAN
//! (DESIGN.md §3), never merely by chaining to a trusted CA:
//!
//! | endpoint | trusts | requires |
//! |---|---|---|
//! | peer listener ([`peer_server_config`]) | federation root | a node identity of the federation |
//! | peer client ([`peer_client_config`]) | federation root | exactly the expected peer's node identity |
//! | API listener ([`api_server_config`]) | agency-local CA | an app/admin/auditor identity of this agency |
//! | API client ([`api_client_config`]) | agency-local CA | the server's hostname, as usual |
//!
//! An identity refusal fails the handshake with
//! `rustls::Error::InvalidCertificate(CertificateError::Other(_))` wrapping
//! [`PkiError::IdentityRefused`].

use std::collections::HashSet;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime,
};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::inspect::{identity_of_cert, parse};
use crate::{AgencyId, Identity, PkiError, Role};

/// The only ALPN protocol Antar speaks: HTTP/2, for gRPC.
pub const ALPN_H2: &[u8] = b"h2";

/// The peer listener's configuration: presents the node TLS certificate,
/// trusts only the federation root, and requires a client certificate that
/// carries a node identity of `federation`, so neither an app certificate
/// nor a certificate of another federation can open a peer connection.
///
/// `crls` (DER, signed by the root) revoke node certificates; when any is
/// given, a client certificate whose status they do not cover is refused.
/// Which peers may actually transfer is the node's decision, from
/// [`peer_identity`] after the handshake.
///
/// # Errors
/// [`PkiError::InvalidIdentity`] for a bad federation name;
/// [`PkiError::Tls`] for a bad root, chain or key;
/// [`PkiError::Verifier`] for a bad CRL.
pub fn peer_server_config(
    root_der: &[u8],
    cert_chain: Vec<Vec<u8>>,
    key_der: Vec<u8>,
    federation: &str,
    crls: Vec<Vec<u8>>,
) -> Result<Arc<ServerConfig>, PkiError> {
    crate::ca::check_federation(federation)?;
    let verifier = IdentityClientVerifier {
        inner: client_verifier(root_der, crls)?,
        policy: ClientPolicy::PeerNode {
            federation: federation.to_owned(),
        },
    };
    server_config(Arc::new(verifier), cert_chain, key_der)
}

/// The peer client's configuration: presents the node TLS certificate and
/// accepts only a server certificate that chains to the federation root and
/// carries exactly the node identity of `expected` in `federation`.
///
/// The identity replaces hostname verification (SPIFFE style): the server
/// name the caller connects with is not checked, so peers may be addressed
/// by IP or by any DNS name.
///
/// # Errors
/// [`PkiError::InvalidIdentity`] for a bad federation name;
/// [`PkiError::Tls`] for a bad root, chain or key.
pub fn peer_client_config(
    root_der: &[u8],
    cert_chain: Vec<Vec<u8>>,
    key_der: Vec<u8>,
    federation: &str,
    expected: &AgencyId,
) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    peer_client_config_with_crls(root_der, cert_chain, key_der, federation, expected, Vec::new())
}

/// Like [`peer_client_config`], also refusing a server certificate whose
/// serial is listed in one of `crls` (DER, each signed by the federation
/// root), so a node does not deliver to a peer whose TLS key was revoked.
///
/// # Errors
/// [`PkiError::InvalidIdentity`] for a bad federation name;
/// [`PkiError::Tls`] for a bad root, chain or key; [`PkiError::BadCrl`] for
/// a CRL that does not parse or is not signed by the root;
/// [`PkiError::BadCertificate`] for a root that does not parse when CRLs
/// are given.
pub fn peer_client_config_with_crls(
    root_der: &[u8],
    cert_chain: Vec<Vec<u8>>,
    key_der: Vec<u8>,
    federation: &str,
    expected: &AgencyId,
    crls: Vec<Vec<u8>>,
) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    crate::ca::check_federation(federation)?;
    let provider = provider();
    let verifier = PeerServerVerifier {
        roots: roots(root_der)?,
        algorithms: provider.signature_verification_algorithms,
        expected: Identity::node(federation, expected.clone()),
        revoked: revoked_serials(root_der, &crls)?,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain(cert_chain), key(key_der))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The API listener's configuration: presents the API server certificate,
/// trusts only the agency-local CA, and requires a client certificate with
/// an app, admin or auditor identity of (`federation`, `agency`). Node
/// identities are refused even when the local CA issued them: nodes talk on
/// the peer listener.
///
/// # Errors
/// [`PkiError::InvalidIdentity`] for a bad federation name;
/// [`PkiError::Tls`] for a bad CA, chain or key.
pub fn api_server_config(
    local_ca_der: &[u8],
    cert_chain: Vec<Vec<u8>>,
    key_der: Vec<u8>,
    federation: &str,
    agency: &AgencyId,
) -> Result<Arc<ServerConfig>, PkiError> {
    api_server_config_with_crls(local_ca_der, cert_chain, key_der, federation, agency, Vec::new())
}

/// [`api_server_config`], refusing client certificates that `crls` (DER,
/// signed by the local CA: `antar pki revoke --node-dir`) revoke.
///
/// # Errors
/// As [`api_server_config`]; [`PkiError::BadCrl`] for a CRL that does not
/// parse or is not signed by the local CA.
pub fn api_server_config_with_crls(
    local_ca_der: &[u8],
    cert_chain: Vec<Vec<u8>>,
    key_der: Vec<u8>,
    federation: &str,
    agency: &AgencyId,
    crls: Vec<Vec<u8>>,
) -> Result<Arc<ServerConfig>, PkiError> {
    crate::ca::check_federation(federation)?;
    // Each CRL must come from the local CA: one that does not would leave
    // every client's revocation status unknown, refused at the handshake.
    revoked_serials(local_ca_der, &crls)?;
    let verifier = IdentityClientVerifier {
        inner: client_verifier(local_ca_der, crls)?,
        policy: ClientPolicy::ApiClient {
            federation: federation.to_owned(),
            agency: agency.clone(),
        },
    };
    server_config(Arc::new(verifier), cert_chain, key_der)
}

/// The configuration of an agency system (app, admin or auditor) calling the
/// API listener: presents its client certificate, trusts only the
/// agency-local CA and verifies the server's hostname as usual (dev server
/// certificates cover `localhost` and `127.0.0.1`).
///
/// # Errors
/// [`PkiError::Tls`] for a bad CA, chain or key.
pub fn api_client_config(
    local_ca_der: &[u8],
    cert_chain: Vec<Vec<u8>>,
    key_der: Vec<u8>,
) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(local_ca_der)?)
        .with_client_auth_cert(chain(cert_chain), key(key_der))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The identity in the peer's end-entity certificate (the first of
/// `certs`, as rustls's `peer_certificates()` returns them).
///
/// Call it after a handshake with one of this module's configurations,
/// whose verifiers have checked the chain and the identity's role; `None`
/// when there is no certificate or it has no single Antar identity.
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Option<Identity> {
    let end_entity = certs.first()?;
    let (_, cert) = X509Certificate::from_der(end_entity.as_ref()).ok()?;
    identity_of_cert(&cert).ok()
}

/// [`peer_identity`] for a server that asks it on every call: the
/// identities of end-entity certificates seen before, by their exact DER
/// bytes. An identity depends on nothing but those bytes (the TLS layer
/// verified the chain before, and on the peer listener revocation), so a
/// remembered one is what parsing would give; parsing a certificate on each call cost about 2 %
/// of a message's CPU. At most [`IdentityCache::KEPT`] are remembered; past
/// that the cache starts again empty.
#[derive(Debug, Default)]
pub struct IdentityCache {
    known: std::sync::Mutex<std::collections::HashMap<Vec<u8>, Identity>>,
}

impl IdentityCache {
    /// Certificates remembered at most.
    pub const KEPT: usize = 4096;

    /// As [`peer_identity`].
    pub fn identity(&self, certs: &[CertificateDer<'_>]) -> Option<Identity> {
        let der = certs.first()?.as_ref();
        let known = || self.known.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(id) = known().get(der) {
            return Some(id.clone());
        }
        let id = peer_identity(certs)?;
        let mut known = known();
        if known.len() >= Self::KEPT {
            known.clear();
        }
        known.insert(der.to_vec(), id.clone());
        Some(id)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_der: &[u8]) -> Result<Arc<RootCertStore>, PkiError> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    Ok(Arc::new(roots))
}

fn chain(cert_chain: Vec<Vec<u8>>) -> Vec<CertificateDer<'static>> {
    cert_chain.into_iter().map(CertificateDer::from).collect()
}

fn key(key_der: Vec<u8>) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der))
}

fn client_verifier(ca_der: &[u8], crls: Vec<Vec<u8>>) -> Result<Arc<dyn ClientCertVerifier>, PkiError> {
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots(ca_der)?, provider());
    if !crls.is_empty() {
        builder = builder
            .with_crls(crls.into_iter().map(CertificateRevocationListDer::from))
            .only_check_end_entity_revocation();
    }
    Ok(builder.build()?)
}

fn server_config(
    verifier: Arc<dyn ClientCertVerifier>,
    cert_chain: Vec<Vec<u8>>,
    key_der: Vec<u8>,
) -> Result<Arc<ServerConfig>, PkiError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain(cert_chain), key(key_der))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Serials revoked by CRLs that the root (the federation's, or an
/// agency-local CA) signed (checked here, once).
fn revoked_serials(root_der: &[u8], crls: &[Vec<u8>]) -> Result<HashSet<Vec<u8>>, PkiError> {
    let mut serials = HashSet::new();
    if crls.is_empty() {
        return Ok(serials);
    }
    let root = parse(root_der)?;
    for der in crls {
        let (_, crl) =
            CertificateRevocationList::from_der(der).map_err(|e| PkiError::BadCrl(e.to_string()))?;
        if crl.issuer() != root.subject() {
            return Err(PkiError::BadCrl(format!(
                "issued by {}, not by {}, the CA it must come from",
                crl.issuer(),
                root.subject()
            )));
        }
        crl.verify_signature(root.public_key())
            .map_err(|e| PkiError::BadCrl(format!("signature: {e}")))?;
        serials.extend(
            crl.iter_revoked_certificates()
                .map(|r| strip_leading_zeros(r.raw_serial()).to_vec()),
        );
    }
    Ok(serials)
}

fn strip_leading_zeros(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|b| **b == 0).count();
    &s[n.min(s.len().saturating_sub(1))..]
}

/// A handshake failure that names the identity we expected and what we got.
fn refused(expected: String, found: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
        PkiError::IdentityRefused { expected, found },
    ))))
}

fn bad_encoding() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::BadEncoding)
}

/// The identity of an end-entity certificate rustls already chain-checked.
fn identity_or_refuse(end_entity: &CertificateDer<'_>, expected: &str) -> Result<Identity, rustls::Error> {
    let cert = parse(end_entity.as_ref()).map_err(|_| bad_encoding())?;
    identity_of_cert(&cert).map_err(|e| {
        let found = match e {
            PkiError::NoIdentity { found } => format!("no Antar identity (URI SANs: {found})"),
            other => other.to_string(),
        };
        refused(expected.to_owned(), found)
    })
}

/// Which client identities a listener accepts.
#[derive(Debug)]
enum ClientPolicy {
    /// A node of this federation.
    PeerNode { federation: String },
    /// An app, admin or auditor of this agency.
    ApiClient { federation: String, agency: AgencyId },
}

impl ClientPolicy {
    fn expected(&self) -> String {
        match self {
            Self::PeerNode { federation } => {
                format!("a node identity spiffe://{federation}/agency/<agency>")
            }
            Self::ApiClient { federation, agency } => format!(
                "an app, admin or auditor identity spiffe://{federation}/agency/{agency}/<role>/<name>"
            ),
        }
    }

    fn allows(&self, id: &Identity) -> bool {
        match self {
            Self::PeerNode { federation } => id.federation == *federation && id.role == Role::Node,
            Self::ApiClient { federation, agency } => {
                id.federation == *federation
                    && id.agency == *agency
                    && matches!(id.role, Role::App(_) | Role::Admin(_) | Role::Auditor(_))
            }
        }
    }
}

/// rustls's webpki client verifier (chain, EKU clientAuth, validity, CRLs),
/// then the identity check of `policy`.
#[derive(Debug)]
struct IdentityClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    policy: ClientPolicy,
}

impl ClientCertVerifier for IdentityClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let expected = self.policy.expected();
        let identity = identity_or_refuse(end_entity, &expected)?;
        if !self.policy.allows(&identity) {
            return Err(refused(expected, identity.to_string()));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Chain to the federation root with EKU serverAuth (rustls's webpki
/// helper), then exactly the expected node identity instead of a hostname.
#[derive(Debug)]
struct PeerServerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    expected: Identity,
    revoked: HashSet<Vec<u8>>,
}

impl ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let cert = parse(end_entity.as_ref()).map_err(|_| bad_encoding())?;
        if self.revoked.contains(strip_leading_zeros(cert.raw_serial())) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        let expected = self.expected.to_string();
        let identity = identity_or_refuse(end_entity, &expected)?;
        if identity != self.expected {
            return Err(refused(expected, identity.to_string()));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
