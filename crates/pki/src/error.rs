//! The one error type of the crate.

use std::io;
use std::path::PathBuf;

/// Why a PKI operation failed.
///
/// Errors that involve a file name it, so an operator can tell which of a
/// node's many PEM files is the problem. Following the std convention, a
/// variant that wraps a lower-level error (IO, rcgen, rustls) exposes it as
/// its `source()` rather than repeating it in its message: print the chain
/// (anyhow's `{:#}`) to see both.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// rcgen refused to generate a key, certificate or revocation list.
    #[error("cannot generate {what}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// rcgen's reason.
        #[source]
        source: rcgen::Error,
    },
    /// A federation, agency or client name does not form a valid SPIFFE identity.
    #[error(transparent)]
    InvalidIdentity(#[from] antar_core::IdError),
    /// A DNS name that cannot be used as a subjectAltName.
    #[error("invalid DNS name {0:?}: expected a hostname such as node.tax.gov.example")]
    InvalidDnsName(String),
    /// A server certificate was asked for without any DNS name or IP address to verify.
    #[error("a server certificate needs at least one DNS name or IP address")]
    NoServerName,
    /// A client certificate was asked for with a node role: nodes use their TLS certificate.
    #[error("client certificates carry an app, admin or auditor identity, not {0}")]
    NotClientRole(String),
    /// A validity period that is empty or out of range.
    #[error("invalid validity period: {0}")]
    InvalidValidity(String),
    /// A serial number given as text is not hexadecimal.
    #[error("invalid serial number {0:?}: expected hex such as 4f3a09c1d2e3f405 (colons allowed)")]
    InvalidSerial(String),
    /// Bytes that are not a DER X.509 certificate.
    #[error("not a valid X.509 certificate: {0}")]
    BadCertificate(String),
    /// Bytes that are not a DER X.509 certificate revocation list.
    #[error("not a valid X.509 CRL: {0}")]
    BadCrl(String),
    /// A private key that is not PKCS#8 of a supported algorithm.
    #[error("not a usable PKCS#8 private key: {0}")]
    BadKey(String),
    /// A CA private key that does not belong to the CA certificate given with it.
    #[error("the CA private key does not match the public key of the CA certificate")]
    KeyMismatch,
    /// A certificate used as a CA that is not one (no basicConstraints CA:TRUE).
    #[error("certificate {subject} is not a CA certificate")]
    NotCa {
        /// The certificate's subject.
        subject: String,
    },
    /// A certificate without exactly one URI SAN that is an Antar SPIFFE identity.
    #[error("certificate carries no single Antar SPIFFE identity (URI SANs: {found})")]
    NoIdentity {
        /// The URI SANs found, or a note that there are none.
        found: String,
    },
    /// A TLS peer presented a valid certificate whose identity is not allowed here.
    #[error("peer identity refused: expected {expected}, found {found}")]
    IdentityRefused {
        /// What this endpoint accepts.
        expected: String,
        /// What the peer's certificate carries.
        found: String,
    },
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A file or its directory could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A file that a workflow would overwrite already exists (a CA key, above all, is never silently replaced).
    #[error("refusing to overwrite existing {path} (`antar pki` replaces it only with --force)")]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// A file that is not valid PEM.
    #[error("{path}: not valid PEM: {detail}")]
    BadPem {
        /// The file.
        path: PathBuf,
        /// The PEM parser's reason.
        detail: String,
    },
    /// A PEM file without a block of the expected kind.
    #[error("{path}: no \"{label}\" PEM block")]
    MissingPem {
        /// The file.
        path: PathBuf,
        /// The PEM label looked for, e.g. `CERTIFICATE`.
        label: &'static str,
    },
    /// A file whose contents are not valid for its format (e.g. `federation.json`).
    #[error("{path}: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// rustls refused the certificates, key or protocol settings of a TLS configuration.
    #[error("cannot build TLS configuration")]
    Tls(#[from] rustls::Error),
    /// rustls could not build a certificate verifier from the trust root or CRLs.
    #[error("cannot build certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}
