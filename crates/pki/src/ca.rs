//! Certificate authorities and the certificate profiles they issue.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType,
    SerialNumber, SignatureAlgorithm, PKCS_ECDSA_P256_SHA256, PKCS_ED25519,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::files::{pem_blocks, write_cert, write_key, CERTIFICATE, PRIVATE_KEY};
use crate::{AgencyId, Identity, PkiError, Role, BACKDATE};

/// Issued material, PEM: a certificate and its private key.
///
/// The key is PKCS#8 (`PRIVATE KEY`); write it with [`write_key`] so it is
/// never readable by others. `Debug` is deliberately not derived: the key
/// must never end up in a log.
#[derive(Clone)]
pub struct CertKey {
    /// The certificate, one `CERTIFICATE` PEM block.
    pub cert_pem: String,
    /// The private key, one PKCS#8 `PRIVATE KEY` PEM block.
    pub key_pem: String,
}

impl fmt::Debug for CertKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("CertKey")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl CertKey {
    /// The certificate, DER: what rustls and the core verifier take.
    ///
    /// Empty when `cert_pem` holds no `CERTIFICATE` block, which never
    /// happens for a `CertKey` this crate issued.
    pub fn cert_der(&self) -> Vec<u8> {
        first_block(&self.cert_pem, CERTIFICATE)
    }

    /// The private key, PKCS#8 DER: what rustls and `antar_core::Signer` take.
    ///
    /// Empty when `key_pem` holds no `PRIVATE KEY` block, which never
    /// happens for a `CertKey` this crate issued.
    pub fn key_der(&self) -> Vec<u8> {
        first_block(&self.key_pem, PRIVATE_KEY)
    }

    /// Writes the certificate (mode 0644) and the key (mode 0600).
    ///
    /// # Errors
    /// [`PkiError::Write`] naming the file that could not be written.
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        write_key(key_path, &self.key_pem)?;
        write_cert(cert_path, &self.cert_pem)
    }
}

/// A CA that can issue certificates: the federation root or an agency-local CA.
///
/// Which one it is only matters to whoever trusts it; the issuing methods
/// are the same, and the caller picks the profile that fits (node
/// certificates from the root, API and client certificates from a local CA).
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("Ca")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Creates a federation root: ECDSA P-256, self-signed, CN `Antar federation
    /// root <federation>`, URI SAN `spiffe://<federation>`, keyCertSign +
    /// cRLSign, path length 0 (it signs end-entity certificates only).
    ///
    /// # Errors
    /// [`PkiError::InvalidIdentity`] for a federation name that is not a
    /// SPIFFE trust domain; [`PkiError::InvalidValidity`] for 0 days;
    /// [`PkiError::Generate`] if key or certificate generation fails.
    pub fn new_federation_root(federation: &str, valid_days: u32) -> Result<Ca, PkiError> {
        check_federation(federation)?;
        let mut params = ca_params(format!("Antar federation root {federation}"), valid_days)?;
        params.subject_alt_names = vec![uri_san(&format!("spiffe://{federation}"))?];
        Self::self_signed(params)
    }

    /// Creates an agency-local CA: ECDSA P-256, self-signed, CN `Antar local
    /// CA <agency>`, keyCertSign + cRLSign, path length 0.
    ///
    /// It is never chained to the federation root: a certificate it issues
    /// must never be accepted on the peer listener, and one the root issues
    /// must never be accepted on the API listener.
    ///
    /// # Errors
    /// [`PkiError::InvalidIdentity`] for a federation name that is not a
    /// SPIFFE trust domain; [`PkiError::InvalidValidity`] for 0 days;
    /// [`PkiError::Generate`] if key or certificate generation fails.
    pub fn new_local(federation: &str, agency: &AgencyId, valid_days: u32) -> Result<Ca, PkiError> {
        check_federation(federation)?;
        let mut params = ca_params(format!("Antar local CA {agency}"), valid_days)?;
        params
            .distinguished_name
            .push(DnType::OrganizationName, format!("Antar {federation}"));
        Self::self_signed(params)
    }

    /// Loads a CA from its certificate and PKCS#8 key, PEM.
    ///
    /// # Errors
    /// [`PkiError::BadCertificate`] / [`PkiError::BadKey`] when either does
    /// not parse; [`PkiError::NotCa`] when the certificate is not a CA;
    /// [`PkiError::KeyMismatch`] when the key is not the certificate's.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let cert_der = first_block(cert_pem, CERTIFICATE);
        let (_, cert) =
            X509Certificate::from_der(&cert_der).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
        if !cert.is_ca() {
            return Err(PkiError::NotCa {
                subject: cert.subject().to_string(),
            });
        }
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::BadKey(e.to_string()))?;
        if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
            return Err(PkiError::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der.as_slice().into(), key).map_err(|source| {
            PkiError::Generate {
                what: "CA issuer from its certificate",
                source,
            }
        })?;
        Ok(Ca {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            cert_der,
            issuer,
        })
    }

    /// Loads a CA from a certificate file and a key file, PEM.
    ///
    /// # Errors
    /// [`PkiError::Read`] naming the file that cannot be read, then the
    /// errors of [`Ca::from_pem`].
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Ca, PkiError> {
        let cert_pem = read_text(cert_path)?;
        let key_pem = read_text(key_path)?;
        Ca::from_pem(&cert_pem, &key_pem)
    }

    /// The CA certificate, PEM: what the trusting side installs.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PKCS#8 PEM: write it only with [`write_key`].
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> Vec<u8> {
        self.cert_der.clone()
    }

    /// Issues a node's TLS certificate, used both by its peer listener and
    /// when it connects to peers: ECDSA P-256, KU digitalSignature, EKU
    /// serverAuth + clientAuth, SANs `dns` + `ips` + URI
    /// `spiffe://<federation>/agency/<agency>`.
    ///
    /// # Errors
    /// [`PkiError::InvalidIdentity`], [`PkiError::InvalidDnsName`],
    /// [`PkiError::InvalidValidity`] for bad inputs;
    /// [`PkiError::Generate`] if generation fails.
    pub fn issue_node_tls(
        &self,
        federation: &str,
        agency: &AgencyId,
        dns: &[String],
        ips: &[IpAddr],
        valid_days: u32,
    ) -> Result<CertKey, PkiError> {
        let identity = Identity::node(federation, agency.clone());
        let (not_before, not_after) = validity(valid_days)?;
        let mut params = leaf_params(format!("Antar node {agency} TLS"), not_before, not_after)?;
        params.subject_alt_names = host_sans(dns, ips)?;
        params.subject_alt_names.push(identity_san(&identity)?);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue(&params, &PKCS_ECDSA_P256_SHA256)
    }

    /// Issues a node's signing certificate for envelopes and receipts:
    /// Ed25519, KU digitalSignature + contentCommitment, no EKU (it must
    /// never pass as a TLS certificate), URI SAN
    /// `spiffe://<federation>/agency/<agency>` only.
    ///
    /// # Errors
    /// [`PkiError::InvalidIdentity`], [`PkiError::InvalidValidity`] for bad
    /// inputs; [`PkiError::Generate`] if generation fails.
    pub fn issue_node_signing(
        &self,
        federation: &str,
        agency: &AgencyId,
        valid_days: u32,
    ) -> Result<CertKey, PkiError> {
        let (not_before, not_after) = validity(valid_days)?;
        self.issue_node_signing_with_validity(federation, agency, not_before, not_after)
    }

    /// Issues a signing certificate like [`Ca::issue_node_signing`] with an
    /// explicit validity period; for tests (expired or not yet valid
    /// certificates) and for planned rotations.
    ///
    /// # Errors
    /// [`PkiError::InvalidValidity`] when `not_after` is not after
    /// `not_before`; otherwise as [`Ca::issue_node_signing`].
    pub fn issue_node_signing_with_validity(
        &self,
        federation: &str,
        agency: &AgencyId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<CertKey, PkiError> {
        if not_after <= not_before {
            return Err(PkiError::InvalidValidity(format!(
                "notAfter {not_after} is not after notBefore {not_before}"
            )));
        }
        let identity = Identity::node(federation, agency.clone());
        let mut params = leaf_params(format!("Antar node {agency} signing"), not_before, not_after)?;
        params.subject_alt_names = vec![identity_san(&identity)?];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::ContentCommitment,
        ];
        self.issue(&params, &PKCS_ED25519)
    }

    /// Issues the API listener's server certificate: ECDSA P-256, KU
    /// digitalSignature, EKU serverAuth, SANs `dns` + `ips` (what agency
    /// systems verify as the hostname) + the node's URI.
    ///
    /// # Errors
    /// [`PkiError::NoServerName`] when `dns` and `ips` are both empty (no
    /// client could verify the name); otherwise as [`Ca::issue_node_tls`].
    pub fn issue_api_server(
        &self,
        federation: &str,
        agency: &AgencyId,
        dns: &[String],
        ips: &[IpAddr],
        valid_days: u32,
    ) -> Result<CertKey, PkiError> {
        if dns.is_empty() && ips.is_empty() {
            return Err(PkiError::NoServerName);
        }
        let identity = Identity::node(federation, agency.clone());
        let (not_before, not_after) = validity(valid_days)?;
        let mut params = leaf_params(format!("Antar API server {agency}"), not_before, not_after)?;
        params.subject_alt_names = host_sans(dns, ips)?;
        params.subject_alt_names.push(identity_san(&identity)?);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(&params, &PKCS_ECDSA_P256_SHA256)
    }

    /// Issues an app, admin or auditor client certificate: ECDSA P-256, KU
    /// digitalSignature, EKU clientAuth, URI SAN
    /// `spiffe://<federation>/agency/<agency>/<app|admin|auditor>/<name>`.
    ///
    /// # Errors
    /// [`PkiError::NotClientRole`] for [`Role::Node`];
    /// [`PkiError::InvalidIdentity`] for a bad name;
    /// [`PkiError::InvalidValidity`] for 0 days; [`PkiError::Generate`] if
    /// generation fails.
    pub fn issue_client(
        &self,
        federation: &str,
        agency: &AgencyId,
        role: &Role,
        valid_days: u32,
    ) -> Result<CertKey, PkiError> {
        let (kind, name) = match role {
            Role::Node => return Err(PkiError::NotClientRole("a node identity".into())),
            Role::App(n) => ("app", n),
            Role::Admin(n) => ("admin", n),
            Role::Auditor(n) => ("auditor", n),
        };
        let identity = Identity {
            federation: federation.to_owned(),
            agency: agency.clone(),
            role: role.clone(),
        };
        let (not_before, not_after) = validity(valid_days)?;
        let mut params = leaf_params(format!("Antar {kind} {name} of {agency}"), not_before, not_after)?;
        params.subject_alt_names = vec![identity_san(&identity)?];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(&params, &PKCS_ECDSA_P256_SHA256)
    }

    /// An X.509 v2 CRL signed by this CA listing `serials` (big-endian bytes
    /// as in the certificates, see [`crate::serial_of`]), PEM `X509 CRL`.
    ///
    /// `crl_number` must grow with every list the CA publishes, so a node
    /// can tell a newer list from an older one.
    ///
    /// # Errors
    /// [`PkiError::InvalidValidity`] for `next_update_days == 0`;
    /// [`PkiError::Generate`] if signing fails.
    pub fn revocation_list(
        &self,
        serials: &[Vec<u8>],
        crl_number: u64,
        next_update_days: u32,
    ) -> Result<String, PkiError> {
        if next_update_days == 0 {
            return Err(PkiError::InvalidValidity(
                "a revocation list needs nextUpdate at least 1 day ahead".into(),
            ));
        }
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(i64::from(next_update_days)),
            crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(s),
                    revocation_time: now,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let gen = |source| PkiError::Generate {
            what: "revocation list",
            source,
        };
        params.signed_by(&self.issuer).map_err(gen)?.pem().map_err(gen)
    }

    fn self_signed(params: CertificateParams) -> Result<Ca, PkiError> {
        let key = generate_key(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.self_signed(&key).map_err(|source| PkiError::Generate {
            what: "CA certificate",
            source,
        })?;
        // Go through `from_pem` so a fresh CA and a loaded one are the same thing.
        Ca::from_pem(&cert.pem(), &key.serialize_pem())
    }

    fn issue(
        &self,
        params: &CertificateParams,
        alg: &'static SignatureAlgorithm,
    ) -> Result<CertKey, PkiError> {
        let key = generate_key(alg)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| PkiError::Generate {
                what: "certificate",
                source,
            })?;
        Ok(CertKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Checks that `federation` is a SPIFFE trust domain Antar accepts.
pub(crate) fn check_federation(federation: &str) -> Result<(), PkiError> {
    // An identity with a placeholder agency checks the trust domain with the
    // same rules the verifiers apply.
    Identity::parse(&format!("spiffe://{federation}/agency/x"))?;
    Ok(())
}

fn read_text(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

fn first_block(pem_text: &str, label: &str) -> Vec<u8> {
    pem_blocks(pem_text)
        .ok()
        .and_then(|blocks| blocks.into_iter().find(|b| b.tag() == label))
        .map(pem::Pem::into_contents)
        .unwrap_or_default()
}

fn generate_key(alg: &'static SignatureAlgorithm) -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(alg).map_err(|source| PkiError::Generate {
        what: "key pair",
        source,
    })
}

/// `[now - BACKDATE, now + valid_days]`.
fn validity(valid_days: u32) -> Result<(OffsetDateTime, OffsetDateTime), PkiError> {
    if valid_days == 0 {
        return Err(PkiError::InvalidValidity(
            "a certificate must be valid for at least 1 day".into(),
        ));
    }
    let now = OffsetDateTime::now_utc();
    Ok((now - BACKDATE, now + time::Duration::days(i64::from(valid_days))))
}

fn ca_params(common_name: String, valid_days: u32) -> Result<CertificateParams, PkiError> {
    let (not_before, not_after) = validity(valid_days)?;
    let mut params = CertificateParams::default();
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial()?);
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

fn leaf_params(
    common_name: String,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial()?);
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// 16 random bytes with the top bit clear (a positive INTEGER) and the next
/// bit set (no leading zero byte, so the bytes in the certificate are exactly
/// these): 126 random bits, unguessable and unique in practice, so revoking
/// a serial revokes exactly one certificate.
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Generate {
            what: "serial number",
            source: rcgen::Error::RingUnspecified,
        })?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn uri_san(uri: &str) -> Result<SanType, PkiError> {
    let ia5 = uri.try_into().map_err(|source| PkiError::Generate {
        what: "URI subjectAltName",
        source,
    })?;
    Ok(SanType::URI(ia5))
}

fn identity_san(identity: &Identity) -> Result<SanType, PkiError> {
    // Round-trip through the parser: the URI we write is one the verifiers accept.
    let uri = identity.to_string();
    Identity::parse(&uri)?;
    uri_san(&uri)
}

fn host_sans(dns: &[String], ips: &[IpAddr]) -> Result<Vec<SanType>, PkiError> {
    let mut sans = Vec::with_capacity(dns.len() + ips.len() + 1);
    for name in dns {
        rustls_pki_types::DnsName::try_from(name.as_str())
            .map_err(|_| PkiError::InvalidDnsName(name.clone()))?;
        let ia5 = name
            .as_str()
            .try_into()
            .map_err(|_| PkiError::InvalidDnsName(name.clone()))?;
        sans.push(SanType::DnsName(ia5));
    }
    sans.extend(ips.iter().copied().map(SanType::IpAddress));
    Ok(sans)
}
