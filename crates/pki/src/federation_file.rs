//! `federation.json`: how scripts and clients in any language find a
//! federation's nodes and the certificates to reach them (DESIGN.md §8).
//!
//! ```json
//! { "federation": "gov.example", "root_ca": "federation/root.crt",
//!   "agencies": [ { "id": "finance", "api_addr": "127.0.0.1:7443", "peer_addr": "…",
//!                   "admin_addr": "…", "metrics_addr": "…", "api_ca": "finance/certs/local-ca.crt",
//!                   "app_cert": "…", "app_key": "…", "admin_cert": "…", "admin_key": "…",
//!                   "auditor_cert": "…", "auditor_key": "…" } ] }
//! ```
//! Paths are absolute or relative to the file's directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::PkiError;

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FederationFile {
    /// The federation's name.
    pub federation: String,
    /// PEM path of the federation root.
    pub root_ca: PathBuf,
    /// One entry per agency.
    pub agencies: Vec<AgencyEntry>,
}

/// One agency's node and the client certificates to reach it. Only `id`,
/// `api_addr` and `api_ca` are required: a file handed to one app may carry
/// just its own certificate (`app_cert`, `app_key`); a client asking for a
/// field left out is told which.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgencyEntry {
    /// The agency id.
    pub id: String,
    /// API listener, host:port.
    pub api_addr: String,
    /// Peer listener, host:port.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer_addr: String,
    /// Admin listener, host:port.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub admin_addr: String,
    /// Metrics listener, host:port.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub metrics_addr: String,
    /// The agency-local CA: issued the API's server certificate and the client certificates.
    pub api_ca: PathBuf,
    /// App client certificate.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub app_cert: PathBuf,
    /// Its key.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub app_key: PathBuf,
    /// Admin client certificate.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub admin_cert: PathBuf,
    /// Its key.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub admin_key: PathBuf,
    /// Auditor client certificate.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub auditor_cert: PathBuf,
    /// Its key.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub auditor_key: PathBuf,
}

fn is_empty(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

impl FederationFile {
    /// Reads the file and makes every path absolute against its directory.
    ///
    /// # Errors
    /// [`PkiError::Read`] when it cannot be read; [`PkiError::Invalid`] when it is not valid JSON of this shape.
    pub fn load(path: &Path) -> Result<Self, PkiError> {
        let text = std::fs::read_to_string(path).map_err(|source| PkiError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut file: Self = serde_json::from_str(&text).map_err(|e| PkiError::Invalid {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let abs = |p: &mut PathBuf| {
            if p.is_relative() && !is_empty(p) {
                *p = base.join(&*p);
            }
        };
        abs(&mut file.root_ca);
        for a in &mut file.agencies {
            for p in [
                &mut a.api_ca,
                &mut a.app_cert,
                &mut a.app_key,
                &mut a.admin_cert,
                &mut a.admin_key,
                &mut a.auditor_cert,
                &mut a.auditor_key,
            ] {
                abs(p);
            }
        }
        Ok(file)
    }

    /// Writes the file as pretty JSON, atomically: a script that polls for
    /// it never reads half of it.
    ///
    /// # Errors
    /// [`PkiError::Write`] when it cannot be written.
    pub fn save(&self, path: &Path) -> Result<(), PkiError> {
        let text = serde_json::to_string_pretty(self).unwrap_or_default() + "\n";
        crate::files::write_atomic(path, text.as_bytes(), 0o644)
    }

    /// The entry of `agency`.
    pub fn agency(&self, agency: &str) -> Option<&AgencyEntry> {
        self.agencies.iter().find(|a| a.id == agency)
    }
}
