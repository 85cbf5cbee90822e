//! The on-disk layout of certificate directories (certs/README.md) and the
//! workflows `antar pki` runs on it.
//!
//! Two kinds of directory exist: the federation's (the root key, kept
//! offline by the federation operator) and each node's (everything one node
//! needs, including its agency-local CA). The workflows never overwrite an
//! existing certificate or key unless told to, so a CA key is never
//! silently replaced.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::files::{read_blocks, CERTIFICATE, X509_CRL};
use crate::inspect::{hex, parse, uri_sans};
use crate::{
    identity_of, parse_serial_hex, read_cert_der, write_cert, AgencyId, Ca, CertInfo, CrlInfo, Identity,
    PkiError, Role,
};

/// The federation operator's directory: the root and its revocation state.
///
/// ```text
/// root.crt              federation root certificate (distributed to every node)
/// root.key              its private key, 0600 (keep offline)
/// revoked-serials.txt   every serial revoked so far, hex, one per line
/// revoked.crl           the current CRL, signed by the root (distributed to every node)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationDir {
    dir: PathBuf,
}

impl FederationDir {
    /// The federation directory at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `root.crt`: the federation root certificate.
    pub fn root_cert(&self) -> PathBuf {
        self.dir.join("root.crt")
    }

    /// `root.key`: the federation root's private key.
    pub fn root_key(&self) -> PathBuf {
        self.dir.join("root.key")
    }

    /// `revoked-serials.txt`: every serial revoked so far, the source of each new CRL.
    pub fn revoked_serials(&self) -> PathBuf {
        self.dir.join("revoked-serials.txt")
    }

    /// `revoked.crl`: the current revocation list.
    pub fn crl(&self) -> PathBuf {
        self.dir.join("revoked.crl")
    }

    /// Loads the root CA (certificate and key).
    ///
    /// # Errors
    /// As [`Ca::load`].
    pub fn load_root(&self) -> Result<Ca, PkiError> {
        not_yet(&self.root_cert(), NO_ROOT)?;
        Ca::load(&self.root_cert(), &self.root_key())
    }

    /// The federation name, read from the root's URI SAN `spiffe://<federation>`.
    ///
    /// # Errors
    /// [`PkiError::Read`] and friends for the file; [`PkiError::NoIdentity`]
    /// when the root carries no `spiffe://<federation>` URI.
    pub fn federation(&self) -> Result<String, PkiError> {
        not_yet(&self.root_cert(), NO_ROOT)?;
        federation_of_root(&read_cert_der(&self.root_cert())?)
    }
}

/// One node's directory: its federation credentials and its agency-local CA.
///
/// ```text
/// federation-root.crt          peer trust anchor (copy of the federation's root.crt)
/// federation.crl               the federation's CRL (copy of revoked.crl), optional
/// node-tls.crt / .key          peer listener and peer client (ECDSA P-256)
/// node-signing.crt / .key      envelope and receipt signatures (Ed25519)
/// local-ca.crt / .key          agency-local CA: API trust anchor
/// local-revoked.crl            its CRL of revoked client certificates, optional
/// api-server.crt / .key        API listener
/// clients/<role>-<name>.crt / .key   app, admin and auditor certificates, handed to their owners
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDir {
    dir: PathBuf,
}

impl NodeDir {
    /// The node directory at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `federation-root.crt`: the only trust anchor of the peer listener.
    pub fn federation_root(&self) -> PathBuf {
        self.dir.join("federation-root.crt")
    }

    /// `federation.crl`: the federation's revocation list, when installed.
    pub fn crl(&self) -> PathBuf {
        self.dir.join("federation.crl")
    }

    /// `node-tls.crt`: the node's TLS certificate.
    pub fn tls_cert(&self) -> PathBuf {
        self.dir.join("node-tls.crt")
    }

    /// `node-tls.key`: the node's TLS key.
    pub fn tls_key(&self) -> PathBuf {
        self.dir.join("node-tls.key")
    }

    /// `node-signing.crt`: the node's signing certificate.
    pub fn signing_cert(&self) -> PathBuf {
        self.dir.join("node-signing.crt")
    }

    /// `node-signing.key`: the node's signing key.
    pub fn signing_key(&self) -> PathBuf {
        self.dir.join("node-signing.key")
    }

    /// `local-ca.crt`: the agency-local CA, the only trust anchor of the API listener.
    pub fn local_ca_cert(&self) -> PathBuf {
        self.dir.join("local-ca.crt")
    }

    /// `local-ca.key`: the agency-local CA's key.
    pub fn local_ca_key(&self) -> PathBuf {
        self.dir.join("local-ca.key")
    }

    /// `local-revoked-serials.txt`: the serials the agency-local CA revoked.
    pub fn local_revoked_serials(&self) -> PathBuf {
        self.dir.join("local-revoked-serials.txt")
    }

    /// `local-revoked.crl`: the agency-local CA's revocation list.
    pub fn local_crl(&self) -> PathBuf {
        self.dir.join("local-revoked.crl")
    }

    /// `api-server.crt`: the API listener's certificate.
    pub fn api_cert(&self) -> PathBuf {
        self.dir.join("api-server.crt")
    }

    /// `api-server.key`: the API listener's key.
    pub fn api_key(&self) -> PathBuf {
        self.dir.join("api-server.key")
    }

    /// `clients/<role>-<name>.crt` and `.key` for an app, admin or auditor.
    ///
    /// # Errors
    /// [`PkiError::NotClientRole`] for [`Role::Node`].
    pub fn client_files(&self, role: &Role) -> Result<(PathBuf, PathBuf), PkiError> {
        let stem = match role {
            Role::Node => return Err(PkiError::NotClientRole("a node identity".into())),
            Role::App(n) => format!("app-{n}"),
            Role::Admin(n) => format!("admin-{n}"),
            Role::Auditor(n) => format!("auditor-{n}"),
        };
        let dir = self.dir.join("clients");
        Ok((dir.join(format!("{stem}.crt")), dir.join(format!("{stem}.key"))))
    }

    /// The node's identity, read from `node-tls.crt`.
    ///
    /// # Errors
    /// [`PkiError::Read`] and friends for the file; [`PkiError::NoIdentity`].
    pub fn identity(&self) -> Result<Identity, PkiError> {
        identity_of(&read_cert_der(&self.tls_cert())?)
    }

    /// Loads the agency-local CA (certificate and key).
    ///
    /// # Errors
    /// As [`Ca::load`].
    pub fn load_local_ca(&self) -> Result<Ca, PkiError> {
        not_yet(
            &self.local_ca_cert(),
            "no agency-local CA here yet: create it with `antar pki init-local-ca`",
        )?;
        Ca::load(&self.local_ca_cert(), &self.local_ca_key())
    }
}

const NO_ROOT: &str = "no federation root here yet: create it with `antar pki init-federation`";

/// A CA certificate a workflow needs that is not there: says which
/// command makes it (reading it would only say the file is missing).
fn not_yet(cert: &Path, what: &str) -> Result<(), PkiError> {
    if cert.exists() {
        return Ok(());
    }
    Err(PkiError::Invalid {
        path: cert.to_path_buf(),
        detail: what.to_owned(),
    })
}

/// Creates a federation root in `fed` (`root.crt`, `root.key`).
///
/// Returns the files written.
///
/// # Errors
/// [`PkiError::Exists`] when a root is already there and `overwrite` is
/// false; otherwise as [`Ca::new_federation_root`] and the file writers.
pub fn init_federation(
    fed: &FederationDir,
    federation: &str,
    valid_days: u32,
    overwrite: bool,
) -> Result<Vec<PathBuf>, PkiError> {
    let (cert, key) = (fed.root_cert(), fed.root_key());
    refuse_existing(&[&cert, &key], overwrite)?;
    let root = Ca::new_federation_root(federation, valid_days)?;
    crate::write_key(&key, root.key_pem())?;
    write_cert(&cert, root.cert_pem())?;
    Ok(vec![cert, key])
}

/// Issues a node of `agency` its TLS and signing certificates from the
/// federation root in `fed`, and installs the root as the node's peer trust
/// anchor. The federation name comes from the root.
///
/// Returns the files written.
///
/// # Errors
/// [`PkiError::Exists`] when the node already has certificates and
/// `overwrite` is false; otherwise as [`Ca::load`], [`Ca::issue_node_tls`],
/// [`Ca::issue_node_signing`] and the file writers.
pub fn issue_node(
    fed: &FederationDir,
    node: &NodeDir,
    agency: &AgencyId,
    dns: &[String],
    ips: &[IpAddr],
    valid_days: u32,
    overwrite: bool,
) -> Result<Vec<PathBuf>, PkiError> {
    let files = [
        node.tls_cert(),
        node.tls_key(),
        node.signing_cert(),
        node.signing_key(),
    ];
    refuse_existing(&files.iter().collect::<Vec<_>>(), overwrite)?;
    let federation = fed.federation()?;
    let root = fed.load_root()?;
    let tls = root.issue_node_tls(&federation, agency, dns, ips, valid_days)?;
    let signing = root.issue_node_signing(&federation, agency, valid_days)?;
    let [tls_cert, tls_key, signing_cert, signing_key] = files;
    tls.write(&tls_cert, &tls_key)?;
    signing.write(&signing_cert, &signing_key)?;
    let anchor = node.federation_root();
    write_cert(&anchor, root.cert_pem())?;
    Ok(vec![tls_cert, tls_key, signing_cert, signing_key, anchor])
}

/// Creates a node's agency-local CA and the API listener's server
/// certificate (for `dns` and `ips`) in `node`.
///
/// Returns the files written.
///
/// # Errors
/// [`PkiError::Exists`] when a local CA or API certificate is already there
/// and `overwrite` is false; otherwise as [`Ca::new_local`],
/// [`Ca::issue_api_server`] and the file writers.
#[allow(clippy::too_many_arguments)]
pub fn init_local_ca(
    node: &NodeDir,
    federation: &str,
    agency: &AgencyId,
    dns: &[String],
    ips: &[IpAddr],
    ca_valid_days: u32,
    server_valid_days: u32,
    overwrite: bool,
) -> Result<Vec<PathBuf>, PkiError> {
    let files = [
        node.local_ca_cert(),
        node.local_ca_key(),
        node.api_cert(),
        node.api_key(),
    ];
    refuse_existing(&files.iter().collect::<Vec<_>>(), overwrite)?;
    let ca = Ca::new_local(federation, agency, ca_valid_days)?;
    let server = ca.issue_api_server(federation, agency, dns, ips, server_valid_days)?;
    let [ca_cert, ca_key, api_cert, api_key] = files;
    crate::write_key(&ca_key, ca.key_pem())?;
    write_cert(&ca_cert, ca.cert_pem())?;
    server.write(&api_cert, &api_key)?;
    Ok(vec![ca_cert, ca_key, api_cert, api_key])
}

/// Issues an app, admin or auditor certificate from the node's local CA
/// into `clients/<role>-<name>.crt` / `.key`.
///
/// Returns the files written.
///
/// # Errors
/// [`PkiError::Exists`] when that client already has a certificate and
/// `overwrite` is false; otherwise as [`Ca::load`], [`Ca::issue_client`]
/// and the file writers.
pub fn issue_client(
    node: &NodeDir,
    federation: &str,
    agency: &AgencyId,
    role: &Role,
    valid_days: u32,
    overwrite: bool,
) -> Result<Vec<PathBuf>, PkiError> {
    let (cert, key) = node.client_files(role)?;
    refuse_existing(&[&cert, &key], overwrite)?;
    let ca = node.load_local_ca()?;
    ca.issue_client(federation, agency, role, valid_days)?
        .write(&cert, &key)?;
    Ok(vec![cert, key])
}

/// What [`revoke`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The CRL written.
    pub crl: PathBuf,
    /// Its CRL number.
    pub crl_number: u64,
    /// Every serial it lists, hex.
    pub serials: Vec<String>,
}

/// Adds `serials` to the federation's revoked serials and publishes a new
/// CRL listing all of them, signed by the root.
///
/// With no new serial it just re-publishes the list with a fresh
/// `nextUpdate`. The CRL number is the larger of the previous number plus
/// one and the current Unix time, so it always grows. The serial list is
/// written before the CRL: a crash in between loses no revocation.
///
/// # Errors
/// As [`FederationDir::load_root`], [`Ca::revocation_list`], and the file
/// readers and writers; [`PkiError::InvalidSerial`] for a bad line in
/// `revoked-serials.txt`.
pub fn revoke(fed: &FederationDir, serials: &[Vec<u8>], next_update_days: u32) -> Result<Revoked, PkiError> {
    let list = RevocationFiles {
        ca: fed.load_root()?,
        serials: fed.revoked_serials(),
        crl: fed.crl(),
        what: "this federation root",
    };
    list.revoke(serials, next_update_days)
}

/// [`revoke`] for the app, admin and auditor certificates a node's
/// agency-local CA issued: `local-revoked-serials.txt` and
/// `local-revoked.crl`, signed by the local CA, in the node's directory —
/// the node's `tls.local_revocation_list`.
///
/// # Errors
/// As [`revoke`], for `local-ca.crt` / `.key`.
pub fn revoke_local(node: &NodeDir, serials: &[Vec<u8>], next_update_days: u32) -> Result<Revoked, PkiError> {
    let list = RevocationFiles {
        ca: Ca::load(&node.local_ca_cert(), &node.local_ca_key())?,
        serials: node.local_revoked_serials(),
        crl: node.local_crl(),
        what: "this agency-local CA",
    };
    list.revoke(serials, next_update_days)
}

/// A CA's list of revoked serials and the CRL it publishes from it.
struct RevocationFiles {
    ca: Ca,
    serials: PathBuf,
    crl: PathBuf,
    /// Who revoked them, for the list's header line.
    what: &'static str,
}

impl RevocationFiles {
    fn revoke(self, serials: &[Vec<u8>], next_update_days: u32) -> Result<Revoked, PkiError> {
        let mut all = read_serial_list(&self.serials)?;
        for s in serials {
            if !all.contains(s) {
                all.push(s.clone());
            }
        }
        let previous = match read_blocks(&self.crl, X509_CRL) {
            Ok(blocks) => blocks
                .first()
                .and_then(|der| CrlInfo::from_der(der).ok())
                .and_then(|info| info.crl_number),
            Err(PkiError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let now = u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp()).unwrap_or(0);
        let crl_number = previous.map_or(now, |p| now.max(p.saturating_add(1)));
        let pem = self.ca.revocation_list(&all, crl_number, next_update_days)?;
        let hexes: Vec<String> = all.iter().map(|s| hex(s)).collect();
        let mut text = format!("# Serials revoked by {}, hex, one per line.\n", self.what);
        for h in &hexes {
            text.push_str(h);
            text.push('\n');
        }
        write_cert(&self.serials, &text)?;
        write_cert(&self.crl, &pem)?;
        Ok(Revoked {
            crl: self.crl,
            crl_number,
            serials: hexes,
        })
    }
}

/// What a PEM file holds, for `antar pki show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inspected {
    /// One or more certificates, in file order.
    Certificates(Vec<CertInfo>),
    /// A revocation list.
    Crl(CrlInfo),
}

/// Summarises the certificates of a PEM file, or its CRL if it holds no certificate.
///
/// # Errors
/// [`PkiError::Read`], [`PkiError::BadPem`]; [`PkiError::MissingPem`] when
/// it holds neither; [`PkiError::BadCertificate`] / [`PkiError::BadCrl`].
pub fn inspect_file(path: &Path) -> Result<Inspected, PkiError> {
    let certs = read_blocks(path, CERTIFICATE)?;
    if !certs.is_empty() {
        return certs
            .iter()
            .map(|der| CertInfo::from_der(der))
            .collect::<Result<_, _>>()
            .map(Inspected::Certificates);
    }
    let crl = crate::read_crl_der(path).map_err(|e| match e {
        PkiError::MissingPem { path, .. } => PkiError::MissingPem {
            path,
            label: "CERTIFICATE or X509 CRL",
        },
        other => other,
    })?;
    CrlInfo::from_der(&crl).map(Inspected::Crl)
}

/// The federation of a root certificate: its URI SAN `spiffe://<federation>`.
///
/// # Errors
/// [`PkiError::BadCertificate`]; [`PkiError::NoIdentity`] when the
/// certificate has no such URI.
pub fn federation_of_root(root_der: &[u8]) -> Result<String, PkiError> {
    let cert = parse(root_der)?;
    let uris = uri_sans(&cert);
    uris.iter()
        .filter_map(|u| u.strip_prefix("spiffe://"))
        .find(|f| !f.contains('/') && crate::ca::check_federation(f).is_ok())
        .map(str::to_owned)
        .ok_or_else(|| PkiError::NoIdentity {
            found: if uris.is_empty() {
                "none".into()
            } else {
                uris.join(", ")
            },
        })
}

fn refuse_existing(paths: &[&PathBuf], overwrite: bool) -> Result<(), PkiError> {
    if overwrite {
        return Ok(());
    }
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(PkiError::Exists { path: (*p).clone() }),
        None => Ok(()),
    }
}

fn read_serial_list(path: &Path) -> Result<Vec<Vec<u8>>, PkiError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PkiError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(parse_serial_hex)
        .collect()
}
