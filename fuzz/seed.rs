//! Writes seed corpora for the fuzz targets: real, valid inputs signed under
//! a federation root made here, so the fuzzer starts from bytes that pass
//! decoding, signature and chain checks (and, for the audit bundle, every
//! Merkle check) and mutates its way into the deep paths instead of being
//! stopped at the first check.
//!
//!   cargo +nightly run --release --bin seed      # in fuzz/
//!
//! Writes `corpus/keys/` (the root certificate and the two nodes' public
//! keys the targets verify against; no private key is kept) and
//! `corpus/<target>/seed-*`. Everything it writes is generated and
//! git-ignored. Running it again starts over: it deletes `corpus/` first,
//! since inputs signed under the old root would no longer verify.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use antar_core::checkpoint::{cosign, origin, Checkpoint};
use antar_core::merkle;
use antar_core::time::to_timestamp;
use antar_core::wire::{
    transfer_item, AuditBundle, Checkpoint as WireCheckpoint, ConsistencyProofResponse, Cosignature,
    EntryKind, EnvelopeTransfer, Kind, LogEntry, Outcome, Receipt, ReceiptStatus, ReceiptTransfer,
    SignedReceipt, TransferBatch, TransferItem,
};
use antar_core::{AgencyId, Draft, Sealed, ServiceName, Signer};
use antar_pki::Ca;
use prost::Message as _;

const FED: &str = "fuzz.example";

fn main() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    if dir.exists() {
        fs::remove_dir_all(&dir).expect("remove the old corpus");
    }
    let root = Ca::new_federation_root(FED, 3650).expect("root");
    let node = |name: &str| {
        let ck = root
            .issue_node_signing(FED, &agency(name), 3650)
            .expect("signing certificate");
        Signer::from_pkcs8(&ck.key_der(), ck.cert_der()).expect("signer")
    };
    let (finance, health) = (node("finance"), node("health"));

    write(&dir.join("keys"), "root.der", &root.cert_der());
    write(&dir.join("keys"), "finance.pub", finance.public_key());
    write(&dir.join("keys"), "health.pub", health.public_key());

    // Envelopes of every kind, small and not so small.
    let kinds = [Kind::Request, Kind::Response, Kind::Notice, Kind::Transaction];
    let sealed: Vec<Sealed> = kinds
        .iter()
        .enumerate()
        .map(|(i, kind)| {
            let mut headers = HashMap::new();
            if i % 2 == 1 {
                headers.insert("x-case".to_string(), format!("case-{i}"));
            }
            Draft {
                kind: *kind,
                sender: agency("finance"),
                recipient: agency("health"),
                service: ServiceName::parse("birth.notify").expect("service"),
                correlation_id: if i == 0 {
                    String::new()
                } else {
                    format!("corr-{i}")
                },
                created_at: SystemTime::now(),
                ttl: Duration::from_secs(3600),
                headers,
                content_type: "application/json".into(),
            }
            .seal(vec![b'x'; 16 << (2 * i)], &finance)
        })
        .collect();
    for (i, s) in sealed.iter().enumerate() {
        write(
            &dir.join("envelope"),
            &format!("seed-{i}"),
            &s.envelope.encode_to_vec(),
        );
    }

    // The same envelopes signed as one batch (ADR 0008).
    let batched = finance.sign_envelopes(
        sealed.iter().map(|s| s.envelope.envelope.to_vec()).collect(),
        "finance",
        to_timestamp(SystemTime::now()),
    );
    for (i, e) in batched.iter().enumerate() {
        write(
            &dir.join("envelope"),
            &format!("seed-batch-{i}"),
            &e.encode_to_vec(),
        );
    }

    // Receipts of every status for those envelopes.
    let receipts: Vec<SignedReceipt> = sealed
        .iter()
        .zip([
            ReceiptStatus::Delivered,
            ReceiptStatus::Processed,
            ReceiptStatus::Rejected,
            ReceiptStatus::Expired,
        ])
        .map(|(s, status)| receipt(s, status, &health))
        .collect();
    for (i, r) in receipts.iter().enumerate() {
        write(&dir.join("receipt"), &format!("seed-{i}"), &r.encode_to_vec());
    }
    // And the DELIVERED receipts of all of them as one batch (ADR 0006).
    let drafts: Vec<Receipt> = sealed
        .iter()
        .map(|s| receipt_draft(s, ReceiptStatus::Delivered))
        .collect();
    for (i, r) in health.sign_receipts(&drafts).iter().enumerate() {
        write(
            &dir.join("receipt"),
            &format!("seed-batch-{i}"),
            &r.encode_to_vec(),
        );
    }

    // Transfer batches: envelopes only, receipts only, both.
    let env_item = |seq: u64, s: &Sealed| TransferItem {
        seq,
        item: Some(transfer_item::Item::Envelope(EnvelopeTransfer {
            envelope: Some(s.envelope.clone()),
            payload: Some(s.payload.clone()),
            hops: vec!["finance".into()],
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        })),
    };
    let rcpt_item = |seq: u64, r: &SignedReceipt| TransferItem {
        seq,
        item: Some(transfer_item::Item::Receipt(ReceiptTransfer {
            receipt: Some(r.clone()),
            hops: vec!["health".into(), "hub".into()],
        })),
    };
    let batches = [
        sealed
            .iter()
            .zip(1..)
            .map(|(s, n)| env_item(n, s))
            .collect::<Vec<_>>(),
        receipts.iter().zip(1..).map(|(r, n)| rcpt_item(n, r)).collect(),
        vec![env_item(7, &sealed[0]), rcpt_item(8, &receipts[0])],
    ];
    for (i, items) in batches.into_iter().enumerate() {
        write(
            &dir.join("transfer"),
            &format!("seed-{i}"),
            &TransferBatch { items }.encode_to_vec(),
        );
    }

    // A log of envelopes and receipts with three checkpoints, each cosigned.
    let mut entries: Vec<prost::bytes::Bytes> = Vec::new();
    let mut log = |kind: EntryKind, id: &str, data: Vec<u8>| {
        entries.push(
            LogEntry {
                index: entries.len() as u64,
                kind: kind as i32,
                data: data.into(),
                message_id: id.to_string(),
                logged_at: Some(to_timestamp(SystemTime::now())),
            }
            .encode_to_vec()
            .into(),
        );
    };
    for (s, r) in sealed.iter().zip(&receipts) {
        log(EntryKind::Envelope, &s.id.to_string(), s.envelope.encode_to_vec());
        log(EntryKind::Receipt, &s.id.to_string(), r.encode_to_vec());
    }
    let leaves: Vec<merkle::Hash> = entries.iter().map(|e| merkle::leaf_hash(e)).collect();
    let sizes = [1usize, 5, leaves.len()];
    let checkpoints: Vec<(Checkpoint, String)> = sizes
        .iter()
        .map(|&n| {
            let cp = Checkpoint {
                origin: origin(FED, "finance"),
                size: n as u64,
                root: merkle::root(&leaves[..n]),
            };
            let note = cp.sign(&finance);
            (cp, note)
        })
        .collect();
    let bundle = AuditBundle {
        federation: FED.into(),
        agency: "finance".into(),
        certificates: vec![finance.cert_bytes()],
        entries: entries.clone(),
        checkpoints: checkpoints
            .iter()
            .map(|(cp, note)| WireCheckpoint {
                note: note.clone(),
                tree_size: cp.size,
                root_hash: cp.root.to_vec().into(),
                cosignatures: vec![Cosignature {
                    witness: "health".into(),
                    line: cosign(cp, &origin(FED, "health"), &health, 1_700_000_000),
                    cert: health.cert_bytes(),
                }],
                // Empty in a bundle, which carries `certificates`.
                signer_cert: Default::default(),
            })
            .collect(),
        consistency: sizes
            .windows(2)
            .map(|w| ConsistencyProofResponse {
                path: merkle::consistency_proof(w[0], &leaves[..w[1]])
                    .expect("consistency proof")
                    .iter()
                    .map(|h| h.to_vec().into())
                    .collect(),
            })
            .collect(),
        root_ca: root.cert_der().into(),
        ..AuditBundle::default()
    };
    let verifier = antar_core::Verifier::new(
        antar_core::TrustAnchor::new(FED, root.cert_der()).expect("anchor"),
        antar_core::Revocations::none(),
    );
    let bytes = bundle.encode_to_vec();
    antar_core::audit::verify_bundle(&bytes, &verifier).expect("the seed bundle verifies");
    write(&dir.join("bundle"), "seed-0", &bytes);
    // The same log exported from its second checkpoint's size on: the
    // entries after, the checkpoints from there, the frontier before.
    let from = sizes[1];
    let partial = AuditBundle {
        entries: entries[from..].to_vec(),
        checkpoints: bundle.checkpoints[1..].to_vec(),
        consistency: bundle.consistency[1..].to_vec(),
        first_index: from as u64,
        prefix: merkle::frontier(&leaves[..from])
            .iter()
            .map(|h| h.to_vec().into())
            .collect(),
        ..bundle.clone()
    };
    let bytes = partial.encode_to_vec();
    let view = (sizes[1] as u64, merkle::root(&leaves[..sizes[1]]));
    antar_core::audit::verify_bundle_extending(&bytes, &verifier, &[view])
        .expect("the partial seed bundle verifies against the view it continues");
    write(&dir.join("bundle"), "seed-from-5", &bytes);

    // Checkpoint notes, each followed by a cosignature line; proof inputs
    // in the target's layout (two little-endian sizes, then hashes).
    for (i, (cp, note)) in checkpoints.iter().enumerate() {
        let line = cosign(cp, &origin(FED, "health"), &health, 1_700_000_000);
        write(
            &dir.join("checkpoint"),
            &format!("seed-note-{i}"),
            format!("{note}{line}\n").as_bytes(),
        );
    }
    for (i, w) in sizes.windows(2).enumerate() {
        let mut input = (w[0] as u64).to_le_bytes().to_vec();
        input.extend_from_slice(&(w[1] as u64).to_le_bytes());
        for h in merkle::consistency_proof(w[0], &leaves[..w[1]]).expect("proof") {
            input.extend_from_slice(&h);
        }
        write(&dir.join("checkpoint"), &format!("seed-proof-{i}"), &input);
    }

    // A node configuration as operators write it.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/node.toml.example");
    write(
        &dir.join("config"),
        "seed-0",
        &fs::read(example).expect("example config"),
    );
    println!("seed corpora written under {}", dir.display());
}

fn agency(s: &str) -> AgencyId {
    AgencyId::parse(s).expect("agency")
}

fn receipt(s: &Sealed, status: ReceiptStatus, issuer: &Signer) -> SignedReceipt {
    issuer.sign_receipt(&receipt_draft(s, status))
}

/// health's receipt about `s`, unsigned.
fn receipt_draft(s: &Sealed, status: ReceiptStatus) -> Receipt {
    Receipt {
        message_id: s.id.to_string(),
        envelope_sha256: antar_core::envelope::sha256(&s.envelope.envelope).to_vec().into(),
        sender: "finance".into(),
        recipient: "health".into(),
        status: status as i32,
        reason: match status {
            ReceiptStatus::Rejected => "payload_digest".into(),
            ReceiptStatus::Expired => "expired".into(),
            _ => String::new(),
        },
        at: Some(to_timestamp(SystemTime::now())),
        issuer: "health".into(),
        outcome: if status == ReceiptStatus::Processed {
            Outcome::Committed as i32
        } else {
            Outcome::Unspecified as i32
        },
        result_digest: Default::default(),
        duplicate_of: String::new(),
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::create_dir_all(dir).expect("corpus directory");
    fs::write(dir.join(name), bytes).expect("seed file");
}
