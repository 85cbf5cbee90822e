//! Antar's PKI: certificate issuance with rcgen, PEM/DER loading, SPIFFE
//! identities, revocation lists and the rustls configurations of both
//! listeners.
//!
//! Two trust roots exist and are never mixed (DESIGN.md §3):
//! - the **federation root** ([`Ca::new_federation_root`]) issues each node a
//!   TLS certificate ([`Ca::issue_node_tls`]) and a signing certificate
//!   ([`Ca::issue_node_signing`]); the peer listener trusts only it;
//! - each node's **agency-local CA** ([`Ca::new_local`]) issues the API
//!   listener's server certificate ([`Ca::issue_api_server`]) and the app,
//!   admin and auditor client certificates ([`Ca::issue_client`]); the API
//!   listener trusts only it.
//!
//! Every end-entity certificate carries exactly one URI SAN, its SPIFFE
//! identity (`spiffe://<federation>/agency/<agency>[/<role>/<name>]`), and a
//! certificate is authorised by the role in that URI, never by merely
//! chaining to a trusted CA: see [`tls`].
//!
//! Certificate profiles and the on-disk layout are documented in
//! `certs/README.md`; [`layout`] implements that layout and the workflows of
//! `antar pki`.

#![warn(missing_docs)]

mod ca;
mod error;
pub mod federation_file;
mod files;
mod inspect;
pub mod layout;
pub mod tls;

use std::time::Duration;

pub use antar_core::{AgencyId, Identity, Role};

pub use ca::{Ca, CertKey};
pub use error::PkiError;
pub use files::{read_cert_der, read_certs_der, read_crl_der, read_key_der, write_cert, write_key};
pub use inspect::{identity_of, issued_by, parse_serial_hex, serial_of, CertInfo, CrlInfo};

/// Default lifetime of a federation root: 10 years.
pub const ROOT_VALID_DAYS: u32 = 3650;
/// Default lifetime of an agency-local CA: 5 years.
pub const LOCAL_CA_VALID_DAYS: u32 = 1825;
/// Default lifetime of node TLS, node signing and API server certificates: 1 year.
pub const NODE_VALID_DAYS: u32 = 365;
/// Default lifetime of app, admin and auditor client certificates: 1 year.
pub const CLIENT_VALID_DAYS: u32 = 365;
/// Default time until a revocation list's `nextUpdate`: 30 days.
pub const CRL_NEXT_UPDATE_DAYS: u32 = 30;

/// How far back `notBefore` is set from "now", so a peer whose clock is a
/// little behind still accepts a freshly issued certificate.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

#[cfg(test)]
mod tests;
