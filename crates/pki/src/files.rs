//! Reading and writing PEM files, with private keys never readable by others.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::PkiError;

/// PEM label of a certificate.
pub(crate) const CERTIFICATE: &str = "CERTIFICATE";
/// PEM label of a PKCS#8 private key.
pub(crate) const PRIVATE_KEY: &str = "PRIVATE KEY";
/// PEM label of a certificate revocation list.
pub(crate) const X509_CRL: &str = "X509 CRL";

/// Writes a private key with mode 0600, creating parent directories.
///
/// The key goes to a temporary file in the same directory that is created
/// 0600 (so the key is never readable by others, not even for an instant)
/// and is then renamed over `path`, so a crash leaves the old key or the
/// new one, never half of one. An existing file is replaced.
///
/// # Errors
/// [`PkiError::Write`] naming `path` (or its directory).
pub fn write_key(path: &Path, pem: &str) -> Result<(), PkiError> {
    write_atomic(path, pem.as_bytes(), 0o600)
}

/// Writes a certificate (or CRL) with mode 0644, creating parent directories.
///
/// Written like [`write_key`]: to a temporary file, then renamed.
///
/// # Errors
/// [`PkiError::Write`] naming `path` (or its directory).
pub fn write_cert(path: &Path, pem: &str) -> Result<(), PkiError> {
    write_atomic(path, pem.as_bytes(), 0o644)
}

/// The first `CERTIFICATE` block of a PEM file, DER.
///
/// # Errors
/// [`PkiError::Read`], [`PkiError::BadPem`], or [`PkiError::MissingPem`]
/// when the file holds no certificate.
pub fn read_cert_der(path: &Path) -> Result<Vec<u8>, PkiError> {
    first(path, read_blocks(path, CERTIFICATE)?, CERTIFICATE)
}

/// Every `CERTIFICATE` block of a PEM file in order, DER (a chain, or a
/// bundle of roots during a rotation).
///
/// # Errors
/// [`PkiError::Read`], [`PkiError::BadPem`], or [`PkiError::MissingPem`]
/// when the file holds no certificate.
pub fn read_certs_der(path: &Path) -> Result<Vec<Vec<u8>>, PkiError> {
    let certs = read_blocks(path, CERTIFICATE)?;
    if certs.is_empty() {
        return Err(PkiError::MissingPem {
            path: path.to_owned(),
            label: CERTIFICATE,
        });
    }
    Ok(certs)
}

/// The PKCS#8 DER of the `PRIVATE KEY` block of a PEM file.
///
/// Older `EC PRIVATE KEY` (SEC1) or `RSA PRIVATE KEY` blocks are not
/// accepted: every key Antar writes is PKCS#8.
///
/// # Errors
/// [`PkiError::Read`], [`PkiError::BadPem`], or [`PkiError::MissingPem`]
/// when the file holds no PKCS#8 key.
pub fn read_key_der(path: &Path) -> Result<Vec<u8>, PkiError> {
    first(path, read_blocks(path, PRIVATE_KEY)?, PRIVATE_KEY)
}

/// The DER of the `X509 CRL` block of a PEM file.
///
/// # Errors
/// [`PkiError::Read`], [`PkiError::BadPem`], or [`PkiError::MissingPem`]
/// when the file holds no CRL.
pub fn read_crl_der(path: &Path) -> Result<Vec<u8>, PkiError> {
    first(path, read_blocks(path, X509_CRL)?, X509_CRL)
}

/// Parses every PEM block of `text`.
pub(crate) fn pem_blocks(text: &str) -> Result<Vec<pem::Pem>, pem::PemError> {
    pem::parse_many(text)
}

/// Reads a PEM file and returns the contents of every block labelled `label`.
pub(crate) fn read_blocks(path: &Path, label: &str) -> Result<Vec<Vec<u8>>, PkiError> {
    let text = fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })?;
    let blocks = pem_blocks(&text).map_err(|e| PkiError::BadPem {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    Ok(blocks
        .into_iter()
        .filter(|b| b.tag() == label)
        .map(pem::Pem::into_contents)
        .collect())
}

fn first(path: &Path, blocks: Vec<Vec<u8>>, label: &'static str) -> Result<Vec<u8>, PkiError> {
    blocks.into_iter().next().ok_or_else(|| PkiError::MissingPem {
        path: path.to_owned(),
        label,
    })
}

/// Writes `bytes` to a temporary file beside `path` with `mode`, syncs it
/// and renames it over `path`: a reader sees the old file or the whole
/// new one, never a part.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let err = |p: &Path| {
        let p = p.to_owned();
        move |source| PkiError::Write { path: p, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(err(&dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    // A temporary file left by a crashed run of this same process id is stale.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(&tmp)(e)),
        _ => {}
    }
    let result = (|| {
        let mut file = create_new(&tmp, mode)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        // Best effort: the error that matters is the one returned below.
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err(path))
}

#[cfg(unix)]
fn create_new(path: &Path, mode: u32) -> std::io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    // The umask may have removed bits from `mode` (never added any): set it exactly.
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    Ok(file)
}

#[cfg(not(unix))]
fn create_new(path: &Path, _mode: u32) -> std::io::Result<File> {
    OpenOptions::new().write(true).create_new(true).open(path)
}
