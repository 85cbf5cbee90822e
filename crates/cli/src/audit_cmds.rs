//! `antar audit`: the auditor's tools. `query`, `proof` and `export` talk to
//! a node with an auditor certificate; `verify` needs no node at all.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use prost::Message as _;
use serde_json::json;
use tokio_stream::StreamExt as _;

use antar_client::wire::{self, EntryKind};
use antar_client::ClientRole;
use antar_core::checkpoint::Checkpoint as Note;
use antar_core::merkle;

use crate::client_cmds::{kind_name, status_err, status_name};
use crate::conn::ConnArgs;

/// `antar audit`.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Entries of the node's log, filtered (streamed; --limit per call, --from-index to page).
    #[command(
        after_help = "Examples:\n  antar audit query --federation .antar-dev/federation.json --agency registry --message 01a2…\n  antar audit query ... --involving finance --status delivered --from 2026-11-01T00:00:00Z"
    )]
    Query(QueryArgs),
    /// Prove that a message's entries are in the node's log under its newest signed checkpoint.
    #[command(
        after_help = "Example:\n  antar audit proof 01a221aa-ea26-74f5-bc27-02bd702a59be --federation .antar-dev/federation.json --agency registry"
    )]
    Proof(ProofArgs),
    /// Write the node's whole log as a self-contained bundle (entries, checkpoints, proofs, certificates).
    #[command(
        after_help = "Example:\n  antar audit export --federation .antar-dev/federation.json --agency registry --out registry.bundle"
    )]
    Export(ExportArgs),
    /// Verify a bundle offline: every signature, certificate chain, checkpoint and consistency proof.
    #[command(
        after_help = "Examples:\n  antar audit verify registry.bundle --root federation/root.pem\n  antar audit verify registry.bundle --federation .antar-dev/federation.json   # root_ca from the file\n\nExit code 0: every check passed; 1: the first failure is printed, naming the entry or checkpoint."
    )]
    Verify(VerifyArgs),
}

/// `antar audit query`.
#[derive(Debug, clap::Args)]
pub struct QueryArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Only entries about this message id.
    #[arg(long)]
    message: Option<String>,
    /// Only entries where this agency is sender, recipient or receipt issuer.
    #[arg(long)]
    involving: Option<String>,
    /// Only envelopes of this kind.
    #[arg(long, value_parser = ["request", "response", "notice", "transaction"])]
    kind: Option<String>,
    /// Only receipts with this status.
    #[arg(long, value_parser = ["accepted", "delivered", "processed", "rejected", "expired"])]
    status: Option<String>,
    /// Logged at or after (RFC 3339).
    #[arg(long)]
    from: Option<String>,
    /// Logged at or before (RFC 3339).
    #[arg(long)]
    until: Option<String>,
    /// First log index to return (to page on: the last index printed + 1).
    #[arg(long = "from-index", default_value_t = 0)]
    from_index: u64,
    /// At most this many entries (0: the node's page of 1,000).
    #[arg(long, default_value_t = 0)]
    limit: u32,
}

/// `antar audit proof`.
#[derive(Debug, clap::Args)]
pub struct ProofArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The message id.
    id: String,
}

/// `antar audit export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Where to write the bundle.
    #[arg(long)]
    out: PathBuf,
}

/// `antar audit verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The bundle written by `antar audit export`.
    file: PathBuf,
    /// The federation root certificate (PEM) to verify against.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Take the root from this federation.json (`root_ca`) when --root is not given.
    #[arg(long, env = "ANTAR_FEDERATION")]
    federation: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

fn timestamp(flag: &str, s: &Option<String>) -> anyhow::Result<Option<prost_types::Timestamp>> {
    let Some(s) = s else { return Ok(None) };
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("--{flag} {s:?} is not an RFC 3339 time such as 2026-11-01T00:00:00Z"))?;
    Ok(Some(prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: t.nanosecond() as i32,
    }))
}

/// What an entry says, in one line or a JSON object.
fn describe(e: &wire::LogEntry) -> (String, serde_json::Value) {
    let at = e.logged_at.map(|t| t.seconds).unwrap_or_default();
    match EntryKind::try_from(e.kind) {
        Ok(EntryKind::Envelope) => {
            let env = wire::SignedEnvelope::decode(e.data.as_slice())
                .ok()
                .and_then(|s| wire::Envelope::decode(s.envelope.as_slice()).ok())
                .unwrap_or_default();
            (
                format!(
                    "{:>6} {} envelope {} {} -> {}/{}",
                    e.index,
                    e.message_id,
                    kind_name(env.kind),
                    env.sender,
                    env.recipient,
                    env.service
                ),
                json!({ "index": e.index, "message_id": e.message_id, "entry": "envelope", "kind": kind_name(env.kind),
                        "sender": env.sender, "recipient": env.recipient, "service": env.service, "logged_at": at }),
            )
        }
        _ => {
            let r = wire::SignedReceipt::decode(e.data.as_slice())
                .ok()
                .and_then(|s| wire::Receipt::decode(s.receipt.as_slice()).ok())
                .unwrap_or_default();
            (
                format!(
                    "{:>6} {} receipt {} by {}{}",
                    e.index,
                    e.message_id,
                    status_name(r.status),
                    r.issuer,
                    crate::client_cmds::optional(": ", &r.reason, "")
                ),
                json!({ "index": e.index, "message_id": e.message_id, "entry": "receipt", "status": status_name(r.status),
                        "issuer": r.issuer, "reason": r.reason, "logged_at": at }),
            )
        }
    }
}

pub async fn run(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Query(a) => query(a).await,
        AuditCommand::Proof(a) => proof(a).await,
        AuditCommand::Export(a) => export(a).await,
        AuditCommand::Verify(a) => verify(a),
    }
}

async fn query(a: QueryArgs) -> anyhow::Result<ExitCode> {
    let client = a.conn.connect(ClientRole::Auditor).await?;
    let kind = a
        .kind
        .as_deref()
        .and_then(|k| wire::Kind::from_str_name(&format!("KIND_{}", k.to_uppercase())))
        .map_or(0, |k| k as i32);
    let status = a
        .status
        .as_deref()
        .and_then(|s| wire::ReceiptStatus::from_str_name(&format!("RECEIPT_STATUS_{}", s.to_uppercase())))
        .map_or(0, |s| s as i32);
    let mut stream = client
        .audit()
        .query(wire::QueryRequest {
            message_id: a.message.clone().unwrap_or_default(),
            agency: a.involving.clone().unwrap_or_default(),
            status,
            from: timestamp("from", &a.from)?,
            until: timestamp("until", &a.until)?,
            after_index: a.from_index,
            limit: a.limit,
            kind,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let mut n = 0;
    while let Some(e) = stream.next().await {
        let (line, value) = describe(&e.map_err(status_err)?);
        if a.conn.json {
            println!("{value}");
        } else {
            println!("{line}");
        }
        n += 1;
    }
    if !a.conn.json {
        eprintln!("{n} entries");
    }
    Ok(ExitCode::SUCCESS)
}

async fn proof(a: ProofArgs) -> anyhow::Result<ExitCode> {
    let client = a.conn.connect(ClientRole::Auditor).await?;
    let mut audit = client.audit();
    let checkpoint = audit
        .latest_checkpoint(wire::LatestCheckpointRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    let root =
        merkle::Hash::try_from(checkpoint.root_hash.as_slice()).context("checkpoint root is not 32 bytes")?;
    let mut entries = audit
        .query(wire::QueryRequest {
            message_id: a.id.clone(),
            limit: 1000,
            ..Default::default()
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let mut found = Vec::new();
    while let Some(e) = entries.next().await {
        let e = e.map_err(status_err)?;
        if e.index < checkpoint.tree_size {
            found.push(e);
        }
    }
    anyhow::ensure!(
        !found.is_empty(),
        "no entry about {} under the newest checkpoint (size {})",
        a.id,
        checkpoint.tree_size
    );
    let signature_checked = check_checkpoint(
        a.conn.federation.as_deref(),
        a.conn.agency.as_deref(),
        &checkpoint,
        &root,
        &found,
    )?;
    let mut out = Vec::new();
    for e in &found {
        let path = audit
            .inclusion_proof(wire::InclusionProofRequest {
                index: e.index,
                tree_size: checkpoint.tree_size,
            })
            .await
            .map_err(status_err)?
            .into_inner()
            .path;
        let hashes = path
            .iter()
            .map(|h| merkle::Hash::try_from(h.as_slice()))
            .collect::<Result<Vec<_>, _>>()
            .context("a proof hash is not 32 bytes")?;
        let leaf = merkle::leaf_hash(&e.encode_to_vec());
        merkle::verify_inclusion(&leaf, e.index, checkpoint.tree_size, &hashes, &root)
            .with_context(|| format!("entry {} is NOT proven in the log", e.index))?;
        let (line, mut value) = describe(e);
        value["proof"] = json!(path.iter().map(hex::encode).collect::<Vec<_>>());
        out.push((line, value, path.len()));
    }
    if a.conn.json {
        println!(
            "{}",
            json!({ "checkpoint": checkpoint.note, "tree_size": checkpoint.tree_size,
                    "checkpoint_signature_verified": signature_checked,
                    "entries": out.iter().map(|(_, v, _)| v.clone()).collect::<Vec<_>>() })
        );
    } else {
        println!(
            "checkpoint (tree size {}):\n{}",
            checkpoint.tree_size, checkpoint.note
        );
        for (line, _, n) in &out {
            println!("{line}\n        included: verified with {n} proof hashes against the checkpoint root");
        }
        if signature_checked {
            println!("checkpoint: signed by the node's signing key, chained to the federation root");
        } else {
            println!("note: the checkpoint signature was not checked here; `antar audit export` + `verify` checks it");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Checks the checkpoint's signature where it can: with `--federation`
/// and `--agency`, by the agency's signing certificate from an entry it
/// signed (chained to the federation root). Whether it was checked; an
/// error when it was and does not hold: a signature that does not verify,
/// another log's origin, or a signed size and root other than those the
/// node gave with it (against which the entries are proven).
fn check_checkpoint(
    federation: Option<&std::path::Path>,
    agency: Option<&str>,
    checkpoint: &wire::Checkpoint,
    root: &merkle::Hash,
    found: &[wire::LogEntry],
) -> anyhow::Result<bool> {
    let (Some(f), Some(agency)) = (federation, agency) else {
        return Ok(false);
    };
    let fed = antar_pki::federation_file::FederationFile::load(f)?;
    let anchor = antar_core::TrustAnchor::new(&fed.federation, antar_pki::read_cert_der(&fed.root_ca)?)
        .with_context(|| format!("the federation root of {}", f.display()))?;
    let verifier = antar_core::Verifier::new(anchor, antar_core::Revocations::none());
    let signer_cert = |e: &wire::LogEntry| match EntryKind::try_from(e.kind) {
        Ok(EntryKind::Envelope) => wire::SignedEnvelope::decode(e.data.as_slice())
            .ok()
            .map(|s| s.signer_cert),
        _ => wire::SignedReceipt::decode(e.data.as_slice())
            .ok()
            .map(|s| s.signer_cert),
    };
    let key = found.iter().find_map(|e| {
        let (id, key) = verifier.node_signing_key(&signer_cert(e)?).ok()?;
        (id.agency.as_str() == agency).then_some(key)
    });
    // No entry of the message signed by the agency itself: nothing to check with.
    let Some(key) = key else {
        return Ok(false);
    };
    let note = Note::verify(&checkpoint.note, &key)
        .with_context(|| format!("the checkpoint is NOT signed by {agency}'s signing key"))?;
    let origin = antar_core::checkpoint::origin(&fed.federation, agency);
    anyhow::ensure!(
        note.origin == origin,
        "the checkpoint is of the log {:?}, NOT {origin:?}",
        note.origin
    );
    anyhow::ensure!(
        note.size == checkpoint.tree_size && note.root == *root,
        "the checkpoint's signed size and root ({}, {}) are NOT those the node gave with it ({}, {})",
        note.size,
        hex::encode(note.root),
        checkpoint.tree_size,
        hex::encode(root)
    );
    Ok(true)
}

async fn export(a: ExportArgs) -> anyhow::Result<ExitCode> {
    let client = a.conn.connect(ClientRole::Auditor).await?;
    let mut stream = client
        .audit()
        .export(wire::ExportRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    let mut file =
        std::fs::File::create(&a.out).with_context(|| format!("cannot create {}", a.out.display()))?;
    let mut bytes = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(status_err)?;
        file.write_all(&chunk.data)?;
        bytes += chunk.data.len();
    }
    file.sync_all()?;
    if a.conn.json {
        println!("{}", json!({ "out": a.out, "bytes": bytes }));
    } else {
        println!(
            "wrote {} ({bytes} bytes); check it anywhere with: antar audit verify {} --root ROOT_CA",
            a.out.display(),
            a.out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let root_path = match (&a.root, &a.federation) {
        (Some(r), _) => r.clone(),
        (None, Some(f)) => antar_pki::federation_file::FederationFile::load(f)?.root_ca,
        (None, None) => anyhow::bail!("pass --root ROOT_CA (the federation root, PEM) or --federation FILE"),
    };
    let root = antar_pki::read_cert_der(&root_path)?;
    let bytes = std::fs::read(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?;
    let bundle = wire::AuditBundle::decode(bytes.as_slice()).unwrap_or_default();
    let federation = if bundle.federation.is_empty() {
        "unknown".to_owned()
    } else {
        bundle.federation
    };
    let anchor =
        antar_core::TrustAnchor::new(&federation, root).context("the root certificate is not a CA")?;
    let verifier = antar_core::Verifier::new(anchor, antar_core::Revocations::none());
    match antar_core::audit::verify_bundle(&bytes, &verifier) {
        Ok(v) => {
            if a.json {
                println!(
                    "{}",
                    json!({ "ok": true, "agency": v.agency, "entries": v.entries, "envelopes": v.envelopes,
                            "receipts": v.receipts, "checkpoints": v.checkpoints, "cosignatures": v.cosignatures,
                            "tree_size": v.latest.0,
                            "root": hex::encode(v.latest.1) })
                );
            } else {
                println!(
                    "OK: {}'s log, {} entries ({} envelopes, {} receipts), {} checkpoints consistent, {} peer cosignatures; newest size {} root {}",
                    v.agency,
                    v.entries,
                    v.envelopes,
                    v.receipts,
                    v.checkpoints,
                    v.cosignatures,
                    v.latest.0,
                    hex::encode(v.latest.1)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if a.json {
                println!("{}", json!({ "ok": false, "error": e.to_string() }));
            } else {
                eprintln!("FAILED: {e}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use antar_core::checkpoint::origin;
    use antar_core::Signer;
    use antar_node::dev::{standard_topology, Addrs, DevLayout};

    use super::*;

    fn signer(layout: &DevLayout, agency: &str) -> Signer {
        let node = layout.node_dir(agency);
        Signer::from_pkcs8(
            &antar_pki::read_key_der(&node.signing_key()).unwrap(),
            antar_pki::read_cert_der(&node.signing_cert()).unwrap(),
        )
        .unwrap()
    }

    /// A checkpoint that was checked and does not hold fails the command;
    /// one that could not be checked says so.
    #[test]
    fn a_checkpoint_not_signed_as_given_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let layout = DevLayout::new(dir.path());
        let topology = standard_topology();
        layout.ensure_pki(&topology).unwrap();
        let any = "127.0.0.1:9".parse().unwrap();
        let addrs: BTreeMap<String, Addrs> = topology
            .iter()
            .map(|s| {
                let a = Addrs {
                    api: any,
                    peer: any,
                    admin: any,
                    metrics: any,
                };
                (s.id.clone(), a)
            })
            .collect();
        let fed_path = layout.federation_json();
        let fed = layout.federation_file(&topology, &addrs).unwrap();
        fed.save(&fed_path).unwrap();
        let (finance, health) = (signer(&layout, "finance"), signer(&layout, "health"));
        let receipt = |by: &Signer| wire::LogEntry {
            index: 3,
            kind: EntryKind::Receipt as i32,
            data: by.sign_receipt(&wire::Receipt::default()).encode_to_vec(),
            ..Default::default()
        };
        let root = [7u8; 32];
        let checkpoint = |origin_of: &str, size: u64, by: &Signer| wire::Checkpoint {
            note: Note {
                origin: origin(&fed.federation, origin_of),
                size,
                root,
            }
            .sign(by),
            tree_size: 5,
            root_hash: root.to_vec(),
            cosignatures: Vec::new(),
        };
        let check = |agency: Option<&str>, cp: &wire::Checkpoint, found: &[wire::LogEntry]| {
            check_checkpoint(Some(&fed_path), agency, cp, &root, found).map_err(|e| format!("{e:#}"))
        };
        let found = [receipt(&health), receipt(&finance)];
        assert_eq!(
            check(Some("finance"), &checkpoint("finance", 5, &finance), &found),
            Ok(true)
        );
        // Signed by another node's key, of another log, over another size.
        let err = check(Some("finance"), &checkpoint("finance", 5, &health), &found).unwrap_err();
        assert!(
            err.starts_with("the checkpoint is NOT signed by finance's signing key"),
            "{err}"
        );
        let err = check(Some("finance"), &checkpoint("health", 5, &finance), &found).unwrap_err();
        assert!(err.contains("is of the log") && err.contains("NOT"), "{err}");
        let err = check(Some("finance"), &checkpoint("finance", 4, &finance), &found).unwrap_err();
        assert!(err.contains("are NOT those the node gave with it (5, "), "{err}");
        // Nothing finance signed among the entries, or no agency: not checked.
        let cp = checkpoint("finance", 5, &health);
        assert_eq!(check(Some("finance"), &cp, &found[..1]), Ok(false));
        assert_eq!(check(None, &cp, &found), Ok(false));
    }
}
