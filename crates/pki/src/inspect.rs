//! Reading identities, serials and human-readable summaries out of
//! certificates and revocation lists.

use std::fmt::Write as _;
use std::net::IpAddr;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::{Identity, PkiError};

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_ED25519: &str = "1.3.101.112";
const OID_RSA: &str = "1.2.840.113549.1.1.1";

/// The serial number of a certificate, big-endian bytes exactly as encoded
/// in it: what [`crate::Ca::revocation_list`] takes to revoke it.
///
/// Antar serials are 16 random bytes with 126 bits of entropy, so a serial
/// names one certificate and revoking it revokes no other.
///
/// # Errors
/// [`PkiError::BadCertificate`] when `cert_der` is not a certificate.
pub fn serial_of(cert_der: &[u8]) -> Result<Vec<u8>, PkiError> {
    Ok(parse(cert_der)?.raw_serial().to_vec())
}

/// Whether the CA certificate `ca_der` issued `cert_der`: the certificate
/// names the CA's subject as its issuer and the CA's key verifies its
/// signature. A serial means something only in its issuer's revocation
/// list, so `antar pki revoke --cert` checks this first.
///
/// # Errors
/// [`PkiError::BadCertificate`] when either is not a certificate.
pub fn issued_by(cert_der: &[u8], ca_der: &[u8]) -> Result<bool, PkiError> {
    let (cert, ca) = (parse(cert_der)?, parse(ca_der)?);
    Ok(cert.issuer().as_raw() == ca.subject().as_raw()
        && cert.verify_signature(Some(ca.public_key())).is_ok())
}

/// The SPIFFE identity a certificate carries in its URI SAN.
///
/// Following SPIFFE, an Antar certificate has exactly one URI SAN; a
/// certificate with none or several has no identity, so it can never be
/// authorised by the wrong one of several names.
///
/// # Errors
/// [`PkiError::BadCertificate`] when `cert_der` is not a certificate;
/// [`PkiError::NoIdentity`] when it has not exactly one URI SAN or that URI
/// is not an Antar identity.
pub fn identity_of(cert_der: &[u8]) -> Result<Identity, PkiError> {
    identity_of_cert(&parse(cert_der)?)
}

/// Parses a serial number written as hex (`4f3a…`, `4F:3A:…` or `0x4f3a…`),
/// as printed by [`CertInfo::serial_hex`] or `openssl x509 -serial`.
///
/// # Errors
/// [`PkiError::InvalidSerial`] when it is empty, longer than 20 bytes or not hex.
pub fn parse_serial_hex(text: &str) -> Result<Vec<u8>, PkiError> {
    let bad = || PkiError::InvalidSerial(text.to_owned());
    let t = text.trim();
    let t = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")).unwrap_or(t);
    let digits: Vec<u8> = t.bytes().filter(|b| *b != b':').collect();
    if digits.is_empty() || digits.len() > 40 {
        return Err(bad());
    }
    let nibble = |b: u8| char::from(b).to_digit(16).ok_or_else(bad);
    // An odd number of digits has an implicit leading zero.
    let mut padded = Vec::with_capacity(digits.len() + 1);
    if digits.len() % 2 == 1 {
        padded.push(b'0');
    }
    padded.extend_from_slice(&digits);
    padded
        .chunks(2)
        .map(|pair| match pair {
            [hi, lo] => Ok(u8::try_from(nibble(*hi)? * 16 + nibble(*lo)?).map_err(|_| bad())?),
            _ => Err(bad()),
        })
        .collect()
}

/// What `antar pki show` prints about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject distinguished name, e.g. `CN=Antar node tax TLS`.
    pub subject: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// Serial number, lowercase hex without separators (as in `Revoked` errors).
    pub serial_hex: String,
    /// The SPIFFE identity (see [`identity_of`]), if the certificate has one.
    pub identity: Option<String>,
    /// Start of validity, RFC 3339.
    pub not_before: String,
    /// End of validity, RFC 3339.
    pub not_after: String,
    /// `ECDSA P-256`, `Ed25519`, … or the key algorithm's OID.
    pub key_algorithm: String,
    /// Key usages by their RFC 5280 names, e.g. `digitalSignature`.
    pub key_usage: Vec<String>,
    /// Extended key usages, e.g. `serverAuth`, `clientAuth`.
    pub extended_key_usage: Vec<String>,
    /// Subject alternative names, `DNS:…`, `IP:…`, `URI:…`.
    pub sans: Vec<String>,
    /// SHA-256 of the DER, lowercase hex.
    pub sha256_fingerprint: String,
    /// Whether basicConstraints says CA:TRUE.
    pub is_ca: bool,
}

impl CertInfo {
    /// Summarises a DER certificate.
    ///
    /// # Errors
    /// [`PkiError::BadCertificate`] when `der` is not a certificate or one
    /// of its extensions is malformed.
    pub fn from_der(der: &[u8]) -> Result<CertInfo, PkiError> {
        let cert = parse(der)?;
        let bad = |e: x509_parser::error::X509Error| PkiError::BadCertificate(e.to_string());
        let mut key_usage = Vec::new();
        if let Some(ku) = cert.key_usage().map_err(bad)? {
            let ku = ku.value;
            for (set, name) in [
                (ku.digital_signature(), "digitalSignature"),
                (ku.non_repudiation(), "contentCommitment"),
                (ku.key_encipherment(), "keyEncipherment"),
                (ku.data_encipherment(), "dataEncipherment"),
                (ku.key_agreement(), "keyAgreement"),
                (ku.key_cert_sign(), "keyCertSign"),
                (ku.crl_sign(), "cRLSign"),
                (ku.encipher_only(), "encipherOnly"),
                (ku.decipher_only(), "decipherOnly"),
            ] {
                if set {
                    key_usage.push(name.to_owned());
                }
            }
        }
        let mut extended_key_usage = Vec::new();
        if let Some(eku) = cert.extended_key_usage().map_err(bad)? {
            let eku = eku.value;
            for (set, name) in [
                (eku.any, "any"),
                (eku.server_auth, "serverAuth"),
                (eku.client_auth, "clientAuth"),
                (eku.code_signing, "codeSigning"),
                (eku.email_protection, "emailProtection"),
                (eku.time_stamping, "timeStamping"),
                (eku.ocsp_signing, "OCSPSigning"),
            ] {
                if set {
                    extended_key_usage.push(name.to_owned());
                }
            }
            extended_key_usage.extend(eku.other.iter().map(|o| o.to_id_string()));
        }
        let mut sans = Vec::new();
        if let Some(san) = cert.subject_alternative_name().map_err(bad)? {
            for name in &san.value.general_names {
                sans.push(match name {
                    GeneralName::DNSName(d) => format!("DNS:{d}"),
                    GeneralName::URI(u) => format!("URI:{u}"),
                    GeneralName::RFC822Name(m) => format!("email:{m}"),
                    GeneralName::IPAddress(ip) => match ip_of(ip) {
                        Some(ip) => format!("IP:{ip}"),
                        None => format!("IP:{}", hex(ip)),
                    },
                    other => format!("{other:?}"),
                });
            }
        }
        let validity = cert.validity();
        Ok(CertInfo {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial_hex: hex(cert.raw_serial()),
            identity: identity_of_cert(&cert).ok().map(|i| i.to_string()),
            not_before: rfc3339(validity.not_before.to_datetime()),
            not_after: rfc3339(validity.not_after.to_datetime()),
            key_algorithm: key_algorithm(&cert),
            key_usage,
            extended_key_usage,
            sans,
            sha256_fingerprint: hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref()),
            is_ca: cert.is_ca(),
        })
    }
}

/// What `antar pki show` prints about a revocation list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlInfo {
    /// Issuer distinguished name.
    pub issuer: String,
    /// The CRL number, if present and at most 64 bits.
    pub crl_number: Option<u64>,
    /// When it was issued, RFC 3339.
    pub this_update: String,
    /// When the next one is due, RFC 3339.
    pub next_update: Option<String>,
    /// The revoked serials, lowercase hex.
    pub revoked_serials: Vec<String>,
}

impl CrlInfo {
    /// Summarises a DER CRL. The signature is not checked here: the
    /// verifiers check it against the root they trust.
    ///
    /// # Errors
    /// [`PkiError::BadCrl`] when `der` is not a CRL.
    pub fn from_der(der: &[u8]) -> Result<CrlInfo, PkiError> {
        let (_, crl) =
            CertificateRevocationList::from_der(der).map_err(|e| PkiError::BadCrl(e.to_string()))?;
        Ok(CrlInfo {
            issuer: crl.issuer().to_string(),
            crl_number: crl.crl_number().and_then(|n| {
                let bytes = n.to_bytes_be();
                (bytes.len() <= 8).then(|| bytes.iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b)))
            }),
            this_update: rfc3339(crl.last_update().to_datetime()),
            next_update: crl.next_update().map(|t| rfc3339(t.to_datetime())),
            revoked_serials: crl
                .iter_revoked_certificates()
                .map(|r| hex(r.raw_serial()))
                .collect(),
        })
    }
}

pub(crate) fn parse(der: &[u8]) -> Result<X509Certificate<'_>, PkiError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PkiError::BadCertificate(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        )));
    }
    Ok(cert)
}

/// Every URI SAN of a certificate (an unparsable SAN extension counts as none).
pub(crate) fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

pub(crate) fn identity_of_cert(cert: &X509Certificate<'_>) -> Result<Identity, PkiError> {
    let uris = uri_sans(cert);
    match uris.as_slice() {
        [uri] => Identity::parse(uri).map_err(|_| PkiError::NoIdentity { found: uri.clone() }),
        [] => Err(PkiError::NoIdentity { found: "none".into() }),
        _ => Err(PkiError::NoIdentity {
            found: uris.join(", "),
        }),
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

fn key_algorithm(cert: &X509Certificate<'_>) -> String {
    let alg = &cert.public_key().algorithm;
    match alg.algorithm.to_id_string().as_str() {
        OID_ED25519 => "Ed25519".into(),
        OID_RSA => "RSA".into(),
        OID_EC_PUBLIC_KEY => {
            let curve = alg
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string());
            match curve.as_deref() {
                Some(OID_P256) => "ECDSA P-256".into(),
                Some(OID_P384) => "ECDSA P-384".into(),
                Some(other) => format!("ECDSA {other}"),
                None => "ECDSA".into(),
            }
        }
        other => other.to_owned(),
    }
}
