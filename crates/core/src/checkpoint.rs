//! Checkpoints of a node's log in the C2SP `tlog-checkpoint` format, as a
//! C2SP `signed-note` signed with the node's Ed25519 signing key:
//!
//! ```text
//! gov.example/antar/finance
//! 1042
//! 8Qw2…base64 root…=
//!
//! — gov.example/antar/finance Ab3x…base64(key hash ‖ signature)…
//! ```
//!
//! The key hash is the first four bytes of
//! `SHA-256(name || "\n" || 0x01 || public key)` (0x01: Ed25519).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use crate::envelope::sha256;
use crate::merkle::Hash;
use crate::Signer;

/// Why a checkpoint note was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The text is not a signed note with a checkpoint body.
    #[error("malformed checkpoint note: {0}")]
    Malformed(&'static str),
    /// No signature line by the expected key.
    #[error("no signature by {0}")]
    NotSigned(String),
    /// The signature by the expected key does not verify.
    #[error("the signature by {0} does not verify")]
    BadSignature(String),
}

/// What a checkpoint commits to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's origin line, e.g. `gov.example/antar/finance`.
    pub origin: String,
    /// Number of entries.
    pub size: u64,
    /// Root hash of the first `size` entries.
    pub root: Hash,
}

/// The origin (and key name) of `agency`'s log in `federation`.
pub fn origin(federation: &str, agency: &str) -> String {
    format!("{federation}/antar/{agency}")
}

fn key_hash(name: &str, public_key: &[u8]) -> [u8; 4] {
    let mut b = Vec::with_capacity(name.len() + 2 + public_key.len());
    b.extend_from_slice(name.as_bytes());
    b.push(b'\n');
    b.push(0x01);
    b.extend_from_slice(public_key);
    let h = sha256(&b);
    [h[0], h[1], h[2], h[3]]
}

impl Checkpoint {
    /// The signed text: origin, size and base64 root, one per line.
    pub fn body(&self) -> String {
        format!("{}\n{}\n{}\n", self.origin, self.size, B64.encode(self.root))
    }

    /// The signed note, signed by `signer` under the origin as key name.
    pub fn sign(&self, signer: &Signer) -> String {
        let body = self.body();
        let mut sig = key_hash(&self.origin, signer.public_key()).to_vec();
        sig.extend_from_slice(&signer.sign_note(body.as_bytes()));
        format!("{body}\n\u{2014} {} {}\n", self.origin, B64.encode(sig))
    }

    /// Parses a signed note and checks the signature made under its origin
    /// by `public_key`.
    ///
    /// # Errors
    /// [`CheckpointError`] naming what is wrong.
    pub fn verify(note: &str, public_key: &[u8]) -> Result<Self, CheckpointError> {
        let (checkpoint, body, sigs) = Self::parse(note)?;
        let signed = Self::signature_of(&checkpoint.origin, sigs, public_key)?;
        crate::verify::verify_raw(public_key, b"", body.as_bytes(), &signed[4..])
            .map_err(|_| CheckpointError::BadSignature(checkpoint.origin.clone()))?;
        Ok(checkpoint)
    }

    /// The decoded signature (key hash, then the signature) of the line of
    /// `sigs` signed under `origin` with `public_key`.
    fn signature_of(origin: &str, sigs: &str, public_key: &[u8]) -> Result<Vec<u8>, CheckpointError> {
        let want = key_hash(origin, public_key);
        for line in sigs.lines() {
            let rest = line.strip_prefix("\u{2014} ").ok_or(CheckpointError::Malformed(
                "a signature line does not start with an em dash",
            ))?;
            let (name, sig) = rest
                .rsplit_once(' ')
                .ok_or(CheckpointError::Malformed("a signature line has no signature"))?;
            let sig = B64
                .decode(sig)
                .map_err(|_| CheckpointError::Malformed("a signature is not base64"))?;
            if name != origin || sig.len() != 68 || sig[..4] != want {
                continue;
            }
            return Ok(sig);
        }
        Err(CheckpointError::NotSigned(origin.to_owned()))
    }

    /// What `note` says, its signatures NOT checked: only for a note this
    /// program verified before it kept it (a witness's record of the last
    /// checkpoint it cosigned).
    ///
    /// # Errors
    /// [`CheckpointError::Malformed`] naming what is wrong.
    pub fn read(note: &str) -> Result<Self, CheckpointError> {
        Self::parse(note).map(|(checkpoint, _, _)| checkpoint)
    }

    /// The checkpoint, the signed text (with its final newline) and the
    /// signature lines of `note`.
    fn parse(note: &str) -> Result<(Self, String, &str), CheckpointError> {
        let (body, sigs) = note
            .split_once("\n\n")
            .ok_or(CheckpointError::Malformed("no blank line before the signatures"))?;
        let body = format!("{body}\n");
        let mut lines = body.lines();
        let origin = lines
            .next()
            .filter(|l| !l.is_empty())
            .ok_or(CheckpointError::Malformed("no origin"))?;
        let size = lines.next().ok_or(CheckpointError::Malformed("no size"))?;
        if size.is_empty() || (size.len() > 1 && size.starts_with('0')) {
            return Err(CheckpointError::Malformed("size is not a decimal number"));
        }
        let size: u64 = size
            .parse()
            .map_err(|_| CheckpointError::Malformed("size is not a decimal number"))?;
        let root = lines
            .next()
            .and_then(|l| B64.decode(l).ok())
            .and_then(|r| Hash::try_from(r.as_slice()).ok())
            .ok_or(CheckpointError::Malformed("root is not a base64 SHA-256 hash"))?;
        if lines.next().is_some() {
            return Err(CheckpointError::Malformed("unexpected extension lines"));
        }
        if !sigs.ends_with('\n') {
            return Err(CheckpointError::Malformed("does not end with a newline"));
        }
        let checkpoint = Self {
            origin: origin.to_owned(),
            size,
            root,
        };
        Ok((checkpoint, body, sigs))
    }
}

fn cosignature_key_id(name: &str, public_key: &[u8]) -> [u8; 4] {
    let mut b = Vec::with_capacity(name.len() + 2 + public_key.len());
    b.extend_from_slice(name.as_bytes());
    b.push(b'\n');
    b.push(0x04);
    b.extend_from_slice(public_key);
    let h = sha256(&b);
    [h[0], h[1], h[2], h[3]]
}

fn cosigned_message(body: &str, time: u64) -> String {
    format!("cosignature/v1\ntime {time}\n{body}")
}

/// A witness's C2SP `tlog-cosignature/v1` line over `checkpoint`, made at
/// `time` (Unix seconds) by `signer` under the witness `name`.
pub fn cosign(checkpoint: &Checkpoint, name: &str, signer: &Signer, time: u64) -> String {
    let msg = cosigned_message(&checkpoint.body(), time);
    let mut sig = cosignature_key_id(name, signer.public_key()).to_vec();
    sig.extend_from_slice(&time.to_be_bytes());
    sig.extend_from_slice(&signer.sign_note(msg.as_bytes()));
    format!("\u{2014} {name} {}", B64.encode(sig))
}

/// Checks a cosignature line of witness `name` (key `public_key`) over
/// `checkpoint`; returns the time it was made.
///
/// # Errors
/// [`CheckpointError`] naming what is wrong.
pub fn verify_cosignature(
    line: &str,
    checkpoint: &Checkpoint,
    name: &str,
    public_key: &[u8],
) -> Result<u64, CheckpointError> {
    let rest = line.strip_prefix("\u{2014} ").ok_or(CheckpointError::Malformed(
        "a cosignature line does not start with an em dash",
    ))?;
    let (line_name, sig) = rest
        .rsplit_once(' ')
        .ok_or(CheckpointError::Malformed("a cosignature line has no signature"))?;
    let sig = B64
        .decode(sig)
        .map_err(|_| CheckpointError::Malformed("a cosignature is not base64"))?;
    if line_name != name || sig.len() != 76 || sig[..4] != cosignature_key_id(name, public_key) {
        return Err(CheckpointError::NotSigned(name.to_owned()));
    }
    let mut t = [0u8; 8];
    t.copy_from_slice(&sig[4..12]);
    let time = u64::from_be_bytes(t);
    let msg = cosigned_message(&checkpoint.body(), time);
    crate::verify::verify_raw(public_key, b"", msg.as_bytes(), &sig[12..])
        .map(|()| time)
        .map_err(|_| CheckpointError::BadSignature(name.to_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn signer() -> Signer {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        Signer::without_cert(pkcs8.as_ref())
    }

    #[test]
    fn signed_note_round_trip_and_tampering() {
        let s = signer();
        let c = Checkpoint {
            origin: origin("gov.example", "finance"),
            size: 1042,
            root: sha256(b"root"),
        };
        let note = c.sign(&s);
        assert!(note.starts_with("gov.example/antar/finance\n1042\n"));
        assert_eq!(Checkpoint::verify(&note, s.public_key()).unwrap(), c);
        let other = signer();
        assert_eq!(
            Checkpoint::verify(&note, other.public_key()),
            Err(CheckpointError::NotSigned("gov.example/antar/finance".into()))
        );
        let tampered = note.replacen("1042", "1043", 1);
        assert_eq!(
            Checkpoint::verify(&tampered, s.public_key()),
            Err(CheckpointError::BadSignature("gov.example/antar/finance".into()))
        );
        assert!(Checkpoint::verify("garbage", s.public_key()).is_err());

        let witness = signer();
        let name = origin("gov.example", "health");
        let line = cosign(&c, &name, &witness, 1_790_000_000);
        assert_eq!(
            verify_cosignature(&line, &c, &name, witness.public_key()),
            Ok(1_790_000_000)
        );
        let moved = Checkpoint {
            size: 1043,
            ..c.clone()
        };
        assert!(verify_cosignature(&line, &moved, &name, witness.public_key()).is_err());
        assert!(verify_cosignature(&line, &c, &name, s.public_key()).is_err());
    }
}
