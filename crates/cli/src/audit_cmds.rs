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
    ///
    /// Each entry's inclusion proof is checked here against the
    /// checkpoint's root. With --federation (and --agency), against that
    /// file's federation root: each entry's own signature and message id,
    /// and the checkpoint's signature, origin, size and root. Any of them
    /// that does not hold exits 1, naming it.
    #[command(
        after_help = "Example:\n  antar audit proof 01a221aa-ea26-74f5-bc27-02bd702a59be --federation .antar-dev/federation.json --agency registry"
    )]
    Proof(ProofArgs),
    /// Write the node's log as a self-contained bundle (entries, checkpoints, proofs, certificates): all of it, or from an earlier export's size on.
    #[command(
        after_help = "Examples:\n  antar audit export --federation .antar-dev/federation.json --agency registry --out registry.bundle\n  antar audit export ... --out june.bundle --from-size 1042   # only what came after May's 1042 entries\n  antar audit verify june.bundle --federation F --extends may.bundle"
    )]
    Export(ExportArgs),
    /// Verify a bundle offline: every signature, certificate chain, checkpoint and consistency proof.
    #[command(
        after_help = "Examples:\n  antar audit verify registry.bundle --root .antar-dev/federation/root.crt\n  antar audit verify registry.bundle --federation .antar-dev/federation.json   # root_ca from the file\n  antar audit verify june.bundle --federation F --extends may.bundle   # may.bundle's entries unchanged\n  antar audit verify june.bundle --federation F --extends 1042:ROOT      # ROOT: 64 hex digits, as printed\n\nThe result names the root it verified against (path and SHA-256 of its DER): check it is your federation's.\nKeep the `newest size N root R` of each verification: a later export of the same node must --extends N:R.\n\nExit code 0: every check passed; 1: a check failed, the first failure is printed, naming the entry or checkpoint, or the earlier log this one does not extend; 2: nothing was verified (a file could not be read, or the arguments do not name a root)."
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
    /// Where to write the bundle. A file is written as OUT.partial and
    /// renamed once whole; an existing link, pipe or device (e.g.
    /// /dev/stdout) is written through.
    #[arg(long)]
    out: PathBuf,
    /// Only the entries from this index on: the size of an earlier export
    /// you verified (its `newest size N`). The bundle is then checked with
    /// `antar audit verify --extends` that earlier export or N:ROOT, and
    /// proves the log still holds it, without carrying it again.
    #[arg(long, value_name = "N", default_value_t = 0)]
    from_size: u64,
}

/// `antar audit verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The bundle written by `antar audit export`.
    file: PathBuf,
    /// The federation root certificate (PEM) to verify against.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Take the root (`root_ca`) and the federation's name from this
    /// federation.json, unless --root is given.
    #[arg(long, env = "ANTAR_FEDERATION")]
    federation: Option<PathBuf>,
    /// An earlier view of the same node's log that this one must extend
    /// (every entry it held still there, unchanged, in its place): an
    /// earlier export of the node (a bundle file, verified too), or
    /// `SIZE:ROOT`, the newest size and hex root an earlier verification
    /// printed. May be given more than once.
    #[arg(long, value_name = "BUNDLE|SIZE:ROOT")]
    extends: Vec<String>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// An earlier view of a log, as `--extends` names it.
enum Earlier {
    /// `SIZE:ROOT`.
    Root(u64, merkle::Hash),
    /// The bytes of an earlier export.
    Bundle(Vec<u8>),
}

impl Earlier {
    /// `SIZE:ROOT`, else the bundle file of that name, read. One that
    /// cannot be read is a mistake in the arguments, not a failed check.
    fn read(s: &str) -> anyhow::Result<Earlier> {
        let root = s.split_once(':').and_then(|(size, root)| {
            let size = size.parse().ok()?;
            let root = hex::decode(root).ok()?.try_into().ok()?;
            Some(Earlier::Root(size, root))
        });
        match root {
            Some(root) => Ok(root),
            None => std::fs::read(s).map(Earlier::Bundle).with_context(|| {
                format!("cannot read {s} (--extends takes an earlier bundle or SIZE:ROOT, e.g. 1042:0f2a…, 64 hex digits)")
            }),
        }
    }
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
            let env = wire::SignedEnvelope::decode(&e.data[..])
                .ok()
                .and_then(|s| wire::Envelope::decode(&s.envelope[..]).ok())
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
            let r = wire::SignedReceipt::decode(&e.data[..])
                .ok()
                .and_then(|s| wire::Receipt::decode(&s.receipt[..]).ok())
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
        AuditCommand::Verify(a) => Ok(verify(a).unwrap_or_else(|e| {
            // Not a failed check: nothing was checked.
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        })),
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
        merkle::Hash::try_from(&checkpoint.root_hash[..]).context("checkpoint root is not 32 bytes")?;
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
    // With --federation: every entry's own signature, and with --agency
    // the checkpoint's, chained to the federation root.
    let trust = Trust::load(a.conn.federation.as_deref())?;
    let checkpoint_checked = match (&trust, a.conn.agency.as_deref()) {
        (Some(trust), Some(agency)) => {
            trust.check_checkpoint(agency, &checkpoint, &root)?;
            true
        }
        _ => false,
    };
    if let Some(trust) = &trust {
        for e in &found {
            trust.check_entry(e, &a.id)?;
        }
    }
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
            .map(|h| merkle::Hash::try_from(&h[..]))
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
                    "checkpoint_signature_verified": checkpoint_checked,
                    "entry_signatures_verified": trust.is_some(),
                    "entries": out.iter().map(|(_, v, _)| v.clone()).collect::<Vec<_>>() })
        );
    } else {
        println!(
            "checkpoint (tree size {}):\n{}",
            checkpoint.tree_size, checkpoint.note
        );
        let signed = if trust.is_some() {
            "; its signature verified"
        } else {
            ""
        };
        for (line, _, n) in &out {
            println!(
                "{line}\n        included: verified with {n} proof hashes against the checkpoint root{signed}"
            );
        }
        if checkpoint_checked {
            println!("checkpoint: signed by the node's signing key, chained to the federation root");
        } else {
            println!(
                "note: the checkpoint signature{} was not checked here (give --federation and --agency); \
                 `antar audit export` + `verify` checks everything",
                if trust.is_some() {
                    ""
                } else {
                    ", nor the entries' own signatures,"
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `--federation` lets `antar audit proof` check, against the
/// federation root of that file rather than anything the node says.
struct Trust {
    federation: String,
    verifier: antar_core::Verifier,
}

impl Trust {
    /// From `--federation`, when given.
    fn load(federation: Option<&std::path::Path>) -> anyhow::Result<Option<Self>> {
        let Some(f) = federation else {
            return Ok(None);
        };
        let fed = antar_pki::federation_file::FederationFile::load(f)?;
        let anchor = antar_core::TrustAnchor::new(&fed.federation, antar_pki::read_cert_der(&fed.root_ca)?)
            .with_context(|| format!("the federation root of {}", f.display()))?;
        Ok(Some(Self {
            federation: fed.federation,
            verifier: antar_core::Verifier::new(anchor, antar_core::Revocations::none()),
        }))
    }

    /// The checkpoint is `agency`'s: signed with the signing certificate
    /// the node gave with it (one of `agency`'s node, chained to the
    /// root), of `agency`'s log, over the very size and root the entries
    /// are proven against. An error names what does not hold.
    fn check_checkpoint(
        &self,
        agency: &str,
        checkpoint: &wire::Checkpoint,
        root: &merkle::Hash,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            !checkpoint.signer_cert.is_empty(),
            "the node gave no signing certificate with its checkpoint: it cannot be checked (a node \
             from before Checkpoint.signer_cert? upgrade nodes before auditors' CLIs, or check its \
             export with `antar audit verify`)"
        );
        let (signer, key) = self
            .verifier
            .node_signing_key(&checkpoint.signer_cert)
            .context("the checkpoint's signing certificate is NOT valid")?;
        anyhow::ensure!(
            signer.agency.as_str() == agency,
            "the checkpoint's signing certificate is {}'s, NOT {agency}'s",
            signer.agency
        );
        let note = Note::verify(&checkpoint.note, &key)
            .with_context(|| format!("the checkpoint is NOT signed by {agency}'s signing key"))?;
        let origin = antar_core::checkpoint::origin(&self.federation, agency);
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
        Ok(())
    }

    /// The entry is a signed envelope or receipt about message `id`, its
    /// signature valid under the federation root, as `antar audit verify`
    /// checks every entry of a bundle.
    fn check_entry(&self, e: &wire::LogEntry, id: &str) -> anyhow::Result<()> {
        let signs = match EntryKind::try_from(e.kind) {
            Ok(EntryKind::Envelope) => wire::SignedEnvelope::decode(&e.data[..])
                .map_err(anyhow::Error::from)
                .and_then(|s| Ok(self.verifier.verify_envelope(&s)?.id)),
            Ok(EntryKind::Receipt) => wire::SignedReceipt::decode(&e.data[..])
                .map_err(anyhow::Error::from)
                .and_then(|s| Ok(self.verifier.verify_receipt(&s)?.message_id)),
            _ => Err(anyhow::anyhow!("unknown kind {}", e.kind)),
        }
        .with_context(|| format!("entry {} is NOT a validly signed envelope or receipt", e.index))?;
        anyhow::ensure!(
            signs.to_string() == id && e.message_id == id,
            "entry {} is listed under message {} and signs message {signs}, NOT {id}",
            e.index,
            e.message_id
        );
        Ok(())
    }
}

async fn export(a: ExportArgs) -> anyhow::Result<ExitCode> {
    let client = a.conn.connect(ClientRole::Auditor).await?;
    let mut stream = client
        .audit()
        .export(wire::ExportRequest {
            from_size: a.from_size,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    // A file is written beside `--out` and renamed over it once whole: an
    // export cut short leaves no file that looks like one (nor replaces a
    // good one). An existing link (`/dev/stdout`, whatever stdout is),
    // pipe or device is written through, never renamed over: renaming
    // would replace the link or device itself.
    if std::fs::metadata(&a.out).is_ok_and(|m| m.is_dir()) {
        anyhow::bail!("--out {} is a directory; name the bundle file", a.out.display());
    }
    let kind = std::fs::symlink_metadata(&a.out).ok().map(|m| m.file_type());
    let partial = match kind {
        Some(t) if t.is_symlink() || !t.is_file() => None,
        _ => {
            let mut partial = a.out.clone().into_os_string();
            partial.push(".partial");
            Some(PathBuf::from(partial))
        }
    };
    let target = partial.as_ref().unwrap_or(&a.out);
    let mut file =
        std::fs::File::create(target).with_context(|| format!("cannot create {}", target.display()))?;
    let mut bytes = 0;
    let written: anyhow::Result<()> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(status_err)?;
            file.write_all(&chunk.data)?;
            bytes += chunk.data.len();
        }
        if partial.is_some() {
            // A pipe cannot be synced.
            file.sync_all()?;
        }
        Ok(())
    }
    .await;
    let moved = match (&partial, written) {
        (_, Err(e)) => Err(e.context(format!(
            "the export was cut short; {} not written",
            a.out.display()
        ))),
        (Some(p), Ok(())) => std::fs::rename(p, &a.out)
            .with_context(|| format!("cannot move {} to {}", p.display(), a.out.display())),
        (None, Ok(())) => Ok(()),
    };
    if let Err(e) = moved {
        if let Some(p) = &partial {
            let _ = std::fs::remove_file(p);
        }
        return Err(e);
    }
    // Said on stderr when the bundle itself may be on stdout.
    let said = if a.conn.json {
        json!({ "out": a.out, "bytes": bytes, "from_size": a.from_size }).to_string()
    } else {
        let earlier = match a.from_size {
            0 => String::new(),
            n => format!(" --extends EARLIER (the export of {n} entries it continues, or {n}:ROOT)"),
        };
        format!(
            "wrote {} ({bytes} bytes); check it anywhere with: antar audit verify {} --root ROOT_CA{earlier}",
            a.out.display(),
            a.out.display()
        )
    };
    if partial.is_some() {
        println!("{said}");
    } else {
        eprintln!("{said}");
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    // The root and the federation's name from --federation, unless --root
    // is given: then the name is the bundle's own (its certificates must
    // then carry it under that root).
    let file = match (&a.root, &a.federation) {
        (None, Some(f)) => Some(antar_pki::federation_file::FederationFile::load(f)?),
        _ => None,
    };
    let root_path = match (&a.root, &file) {
        (Some(r), _) => r.clone(),
        (None, Some(f)) => f.root_ca.clone(),
        (None, None) => anyhow::bail!("pass --root ROOT_CA (the federation root, PEM) or --federation FILE"),
    };
    let root = antar_pki::read_cert_der(&root_path)?;
    let root_sha256 = hex::encode(antar_core::envelope::sha256(&root));
    let bytes = std::fs::read(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?;
    let federation = match file {
        Some(f) => f.federation,
        None => match wire::AuditBundle::decode(bytes.as_slice()) {
            Ok(b) if !b.federation.is_empty() => b.federation,
            _ => "unknown".to_owned(),
        },
    };
    let anchor =
        antar_core::TrustAnchor::new(&federation, root).context("the root certificate is not a CA")?;
    let verifier = antar_core::Verifier::new(anchor, antar_core::Revocations::none());
    // Earlier bundles are read before anything is verified: one that
    // cannot be read is a mistake in the arguments (exit 2), not a check
    // that failed.
    let earlier = a
        .extends
        .iter()
        .map(|given| Ok((given, Earlier::read(given)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let log = match antar_core::audit::verify_log(&bytes, &verifier) {
        Ok(log) => log,
        Err(e) => return Ok(failed(a.json, &e.to_string())),
    };
    // The earlier views: each N:ROOT as given; an earlier bundle once
    // verified, and, if it was itself exported from an earlier size on,
    // once another view reaching its first entry vouches for what it
    // stands on (a chain of such exports, given together, vouches link by
    // link).
    let mut views = Vec::new();
    let mut pending = Vec::new();
    for (given, view) in &earlier {
        match view {
            Earlier::Root(size, root) => views.push(View::new(given, *size, *root, String::new())),
            Earlier::Bundle(old) => match antar_core::audit::verify_log(old, &verifier) {
                Ok(l) if l.verified.agency == log.verified.agency => pending.push((given.as_str(), l)),
                Ok(l) => {
                    let this = &log.verified.agency;
                    let e = format!(
                        "the earlier bundle {given} is {}'s log, this is {this}'s",
                        l.verified.agency
                    );
                    return Ok(failed(a.json, &e));
                }
                Err(e) => return Ok(failed(a.json, &format!("the earlier bundle {given}: {e}"))),
            },
        }
    }
    match vouch(&mut views, pending) {
        Ok(()) => {}
        Err(Refused::Failed(e)) => return Ok(failed(a.json, &e)),
        Err(Refused::Unchecked(e)) => anyhow::bail!(e),
    }
    // This log must extend every view: directly each it reaches, and
    // through the chain those before its first entry that vouched for one.
    let mut linked = vec![false; views.len()];
    let mut chain = Vec::new();
    for (k, view) in views.iter().enumerate() {
        if view.size >= log.verified.first {
            if let Err(e) = log.extends((view.size, view.root)) {
                return Ok(failed(a.json, &e.to_string()));
            }
            linked[k] = true;
            chain.push(k);
        }
    }
    while let Some(k) = chain.pop() {
        for &j in &views[k].vouched_by {
            if !std::mem::replace(&mut linked[j], true) {
                chain.push(j);
            }
        }
    }
    if let Some(k) = linked.iter().position(|l| !l) {
        // Not contradicted: not checked.
        let (view, first) = (&views[k], log.verified.first);
        anyhow::bail!(
            "the earlier log {}:{}{} ends before this bundle's first entry {first}, and no other view given links the two: \
             export the log from entry {} or before, or give the exports between",
            view.size,
            hex::encode(view.root),
            view.from,
            view.size
        );
    }
    let extends: Vec<_> = views
        .into_iter()
        .map(|v| (v.given, v.size, hex::encode(v.root), v.from))
        .collect();
    let v = log.verified;
    // Every view is linked, through one it reaches: any at all will do.
    if v.first > 0 && extends.is_empty() {
        // Its entries verified, but not what they continue.
        anyhow::bail!(
            "{} holds the log from entry {} on: verify it with --extends the earlier export it continues \
             (or its {}:ROOT, or a later view)",
            a.file.display(),
            v.first,
            v.first
        );
    }
    if a.json {
        let extends: Vec<_> = extends
            .iter()
            .map(|(given, size, root, _)| json!({ "given": given, "size": size, "root": root }))
            .collect();
        println!(
            "{}",
            json!({ "ok": true, "agency": v.agency, "entries": v.entries, "envelopes": v.envelopes,
                    "receipts": v.receipts, "checkpoints": v.checkpoints, "cosignatures": v.cosignatures,
                    "first_index": v.first, "tree_size": v.latest.0, "root": hex::encode(v.latest.1), "extends": extends,
                    "federation_root": root_path, "federation_root_sha256": root_sha256 })
        );
        return Ok(ExitCode::SUCCESS);
    }
    let from = match v.first {
        0 => String::new(),
        n => format!(" from entry {n}"),
    };
    println!(
        "OK: {}'s log{from}, {} entries ({} envelopes, {} receipts), {} checkpoints consistent, {} peer cosignatures; newest size {} root {}; against the federation root {} (SHA-256 {root_sha256})",
        v.agency,
        v.entries,
        v.envelopes,
        v.receipts,
        v.checkpoints,
        v.cosignatures,
        v.latest.0,
        hex::encode(v.latest.1),
        root_path.display()
    );
    for (_, size, root, from) in &extends {
        println!("OK: extends the earlier log {size}:{root}{from} (its entries unchanged, in their places)");
    }
    Ok(ExitCode::SUCCESS)
}

/// An earlier view of the log: given as N:ROOT, or where an earlier bundle
/// ended.
struct View<'a> {
    given: &'a str,
    size: u64,
    root: merkle::Hash,
    /// How the OK line names it: " of FILE" for a bundle.
    from: String,
    /// The views that vouched for this one, a bundle exported from an
    /// earlier size on, each checked against it.
    vouched_by: Vec<usize>,
}

impl<'a> View<'a> {
    fn new(given: &'a str, size: u64, root: merkle::Hash, from: String) -> Self {
        View {
            given,
            size,
            root,
            from,
            vouched_by: Vec::new(),
        }
    }
}

/// Why earlier views were not taken.
enum Refused {
    /// A check failed (exit 1).
    Failed(String),
    /// Nothing could be checked (exit 2).
    Unchecked(String),
}

/// Adds to `views` each earlier bundle in `pending`: a whole one as it is,
/// one exported from an earlier size on once a view falls within it. Then
/// each bundle taken must extend every view within it, whatever the order
/// they came in: those are its links (`vouched_by`).
fn vouch<'a>(
    views: &mut Vec<View<'a>>,
    mut pending: Vec<(&'a str, antar_core::audit::Log)>,
) -> Result<(), Refused> {
    let span = |l: &antar_core::audit::Log| l.verified.first..=l.verified.first + l.verified.entries as u64;
    let mut taken = Vec::new();
    while !pending.is_empty() {
        let before = pending.len();
        let mut waiting = Vec::new();
        for (given, l) in pending {
            if l.verified.first > 0 && !views.iter().any(|v| span(&l).contains(&v.size)) {
                waiting.push((given, l));
                continue;
            }
            let (size, root) = l.verified.latest;
            views.push(View::new(given, size, root, format!(" of {given}")));
            taken.push((views.len() - 1, l));
        }
        if waiting.len() == before {
            let (given, l) = &waiting[0];
            return Err(Refused::Unchecked(format!(
                "the earlier bundle {given} holds the log from entry {} on: give also --extends a view it continues \
                 (the export before it, or its {}:ROOT)",
                l.verified.first, l.verified.first
            )));
        }
        pending = waiting;
    }
    for (b, l) in &taken {
        for k in 0..views.len() {
            if k != *b && span(l).contains(&views[k].size) {
                l.extends((views[k].size, views[k].root))
                    .map_err(|e| Refused::Failed(format!("the earlier bundle {}: {e}", views[*b].given)))?;
                views[*b].vouched_by.push(k);
            }
        }
    }
    Ok(())
}

/// Prints a failed check; exit code 1.
fn failed(json: bool, error: &str) -> ExitCode {
    if json {
        println!("{}", json!({ "ok": false, "error": error }));
    } else {
        eprintln!("FAILED: {error}");
    }
    ExitCode::FAILURE
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

    /// A checkpoint or an entry that does not hold, checked against the
    /// federation root, fails the command, naming what does not hold.
    #[test]
    fn a_checkpoint_or_entry_not_signed_as_given_is_an_error() {
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
        let trust = Trust::load(Some(&fed_path)).unwrap().unwrap();
        // A node of another federation, under another root.
        let elsewhere = tempfile::tempdir().unwrap();
        let other = DevLayout::new(elsewhere.path());
        other.ensure_pki(&topology).unwrap();
        let stranger = signer(&other, "finance");
        let root = [7u8; 32];
        // A note of `origin_of`'s log over `size`, signed by `by`, handed
        // out with `cert_of`'s certificate.
        let checkpoint = |origin_of: &str, size: u64, by: &Signer, cert_of: &Signer| wire::Checkpoint {
            note: Note {
                origin: origin(&fed.federation, origin_of),
                size,
                root,
            }
            .sign(by),
            tree_size: 5,
            root_hash: prost::bytes::Bytes::copy_from_slice(&root),
            signer_cert: cert_of.cert_bytes(),
            ..Default::default()
        };
        let check = |cp: &wire::Checkpoint| {
            trust
                .check_checkpoint("finance", cp, &root)
                .map_err(|e| format!("{e:#}"))
        };
        check(&checkpoint("finance", 5, &finance, &finance)).unwrap();
        for (cp, want) in [
            (
                checkpoint("finance", 5, &health, &finance),
                "the checkpoint is NOT signed by finance's signing key",
            ),
            (
                checkpoint("finance", 5, &health, &health),
                "the checkpoint's signing certificate is health's, NOT finance's",
            ),
            (
                checkpoint("finance", 5, &stranger, &stranger),
                "the checkpoint's signing certificate is NOT valid",
            ),
            (
                checkpoint("health", 5, &finance, &finance),
                "the checkpoint is of the log \"gov.example/antar/health\", NOT",
            ),
            (
                checkpoint("finance", 4, &finance, &finance),
                "the checkpoint's signed size and root (4, 0707",
            ),
            (
                wire::Checkpoint {
                    signer_cert: Default::default(),
                    ..checkpoint("finance", 5, &finance, &finance)
                },
                "the node gave no signing certificate with its checkpoint",
            ),
        ] {
            let err = check(&cp).unwrap_err();
            assert!(err.starts_with(want), "{err}");
        }

        // Entries: each a valid signature about the message asked for.
        let id = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";
        let receipt = |about: &str| wire::LogEntry {
            index: 3,
            kind: EntryKind::Receipt as i32,
            data: health
                .sign_receipt(&wire::Receipt {
                    message_id: about.into(),
                    issuer: "health".into(),
                    sender: "finance".into(),
                    recipient: "health".into(),
                    status: wire::ReceiptStatus::Delivered as i32,
                    at: Some(antar_core::time::to_timestamp(std::time::SystemTime::now())),
                    ..Default::default()
                })
                .encode_to_vec()
                .into(),
            message_id: id.into(),
            ..Default::default()
        };
        trust.check_entry(&receipt(id), id).unwrap();
        let other = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c";
        let err = format!("{:#}", trust.check_entry(&receipt(other), id).unwrap_err());
        assert!(err.contains(&format!("signs message {other}, NOT {id}")), "{err}");
        let mut forged = receipt(id);
        let mut data = forged.data.to_vec();
        let at = data.len() / 3;
        data[at] ^= 1;
        forged.data = data.into();
        let err = format!("{:#}", trust.check_entry(&forged, id).unwrap_err());
        assert!(err.starts_with("entry 3 is NOT a validly signed"), "{err}");
    }
}
