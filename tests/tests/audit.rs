//! The tamper-evident log from an auditor's side: after traffic of all four
//! kinds every node's export verifies offline; a receipt is proven in the
//! recipient's log; any altered byte, dropped or swapped entry, or a
//! checkpoint from a forked history fails `verify` with a named reason; only
//! auditor certificates may use the Audit API.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use antar_client::ClientRole;
use antar_core::audit::{verify_bundle, verify_bundle_extending, AuditError};
use antar_core::checkpoint::{origin, Checkpoint as Note};
use antar_core::merkle;
use antar_node::dev::DEV_FEDERATION;
use antar_tests::*;
use prost::Message as _;
use tokio_stream::StreamExt as _;
use tonic::Code;

/// Traffic of all four kinds between finance, registry (via hub) and health.
async fn traffic(fed: &Federation) -> String {
    let finance = fed.app("finance").await;
    let registry = fed.app("registry").await;
    send(&finance, notice("health", "tax.notice", b"notice")).await;
    let ids = finance
        .agency()
        .send(wire::SendRequest {
            recipients: vec!["health".into(), "registry".into()],
            ..notice("health", "address.changed", b"fan-out")
        })
        .await
        .unwrap()
        .into_inner()
        .message_ids;
    let payment = send(
        &finance,
        wire::SendRequest {
            kind: wire::Kind::Transaction as i32,
            idempotency_key: "pay-1".into(),
            ..notice("registry", "fee.payment", b"EUR 10")
        },
    )
    .await;
    // A request answered by registry.
    let responder = {
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut agency = registry.agency();
            let mut stream = agency
                .receive(wire::ReceiveRequest {
                    services: vec![],
                    max_in_flight: 16,
                })
                .await
                .unwrap()
                .into_inner();
            let mut seen = 0;
            while seen < 3 {
                let d = tokio::time::timeout(Duration::from_secs(15), stream.next())
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap();
                let e = envelope_of(&d);
                if e.kind == wire::Kind::Request as i32 {
                    agency
                        .reply(wire::ReplyRequest {
                            request_id: e.id.clone(),
                            payload: b"born 2001".to_vec().into(),
                            ..Default::default()
                        })
                        .await
                        .unwrap();
                }
                agency
                    .ack(wire::AckRequest {
                        message_id: e.id,
                        outcome: if e.kind == wire::Kind::Transaction as i32 {
                            wire::Outcome::Committed as i32
                        } else {
                            0
                        },
                        result: vec![].into(),
                    })
                    .await
                    .unwrap();
                seen += 1;
            }
        })
    };
    let mut call = tonic::Request::new(wire::SendRequest {
        kind: wire::Kind::Request as i32,
        ..notice("registry", "birth.lookup", b"who?")
    });
    call.set_timeout(Duration::from_secs(15));
    finance.agency().call(call).await.unwrap();
    responder.await.unwrap();
    receive(&fed.app("health").await, 2, 10, true).await;
    for id in [&payment, &ids[1]] {
        until_state(&finance, id, wire::MessageState::Processed, 15).await;
    }
    payment
}

/// A proof's path as hashes.
fn hashes(path: &[prost::bytes::Bytes]) -> Vec<merkle::Hash> {
    path.iter().map(|h| h[..].try_into().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_verify_and_any_tampering_is_named() {
    let fed = Federation::standard();
    let mut nodes = Vec::new();
    for a in ["finance", "health", "registry", "hub"] {
        nodes.push(fed.start(a).await);
    }
    let payment = traffic(&fed).await;
    let verifier = fed.verifier();

    // Every node's export verifies offline.
    let mut bundles = std::collections::BTreeMap::new();
    for a in ["finance", "health", "registry", "hub"] {
        let auditor = fed.client(a, ClientRole::Auditor).await;
        let bytes = export(&auditor).await;
        let v = verify_bundle(&bytes, &verifier).unwrap_or_else(|e| panic!("{a}'s export: {e}"));
        assert!(v.entries > 0 && v.envelopes > 0 && v.receipts > 0, "{a}: {v:?}");
        bundles.insert(a, bytes);
    }

    // The payment's DELIVERED receipt is in registry's log under its signed
    // checkpoint, cosigned by registry's peer, the hub.
    let registry_auditor = fed.client("registry", ClientRole::Auditor).await;
    let mut audit = registry_auditor.audit();
    let checkpoint = witnessed(&registry_auditor, "hub", 0).await;
    let hub_cosig = checkpoint
        .cosignatures
        .iter()
        .find(|c| c.witness == "hub")
        .unwrap();
    let (hub, hub_key) = verifier.node_signing_key(&hub_cosig.cert).unwrap();
    assert_eq!(hub.agency.as_str(), "hub");
    let registry_key = antar_core::Verifier::node_signing_key(
        &verifier,
        &antar_pki::read_cert_der(&fed.certs("registry").signing_cert()).unwrap(),
    )
    .unwrap()
    .1;
    let note = Note::verify(&checkpoint.note, &registry_key).unwrap();
    antar_core::checkpoint::verify_cosignature(
        &hub_cosig.line,
        &note,
        &origin("gov.example", "hub"),
        &hub_key,
    )
    .unwrap();
    let entries: Vec<wire::LogEntry> = audit
        .query(wire::QueryRequest {
            message_id: payment.clone(),
            status: wire::ReceiptStatus::Delivered as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(
        entries.len(),
        1,
        "one DELIVERED receipt for the payment: {entries:?}"
    );
    let delivered = &entries[0];
    let signed = wire::SignedReceipt::decode(&delivered.data[..]).unwrap();
    let r = verifier.verify_receipt(&signed).unwrap().receipt;
    assert_eq!(
        (r.status, r.issuer.as_str()),
        (wire::ReceiptStatus::Delivered as i32, "registry")
    );
    let path = audit
        .inclusion_proof(wire::InclusionProofRequest {
            index: delivered.index,
            tree_size: note.size,
        })
        .await
        .unwrap()
        .into_inner()
        .path;
    merkle::verify_inclusion(
        &merkle::leaf_hash(&delivered.encode_to_vec()),
        delivered.index,
        note.size,
        &hashes(&path),
        &note.root,
    )
    .unwrap();

    // The log under that checkpoint extends every earlier size: the proof
    // the node gives verifies against roots the auditor computes from the
    // entries themselves.
    let leaves: Vec<merkle::Hash> = audit
        .query(wire::QueryRequest {
            limit: u32::try_from(note.size).unwrap(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .map(|e| merkle::leaf_hash(&e.unwrap().encode_to_vec()))
        .collect()
        .await;
    assert_eq!(merkle::root(&leaves), note.root);
    let old_size = note.size / 2;
    let path = audit
        .consistency_proof(wire::ConsistencyProofRequest {
            old_size,
            new_size: note.size,
        })
        .await
        .unwrap()
        .into_inner()
        .path;
    let old_root = merkle::root(&leaves[..usize::try_from(old_size).unwrap()]);
    merkle::verify_consistency(old_size, note.size, &hashes(&path), &old_root, &note.root).unwrap();
    // Sizes and indexes no proof exists for: INVALID_ARGUMENT naming the field.
    for (old_size, new_size, field) in [
        (0, note.size, "old_size"),
        (note.size, note.size - 1, "old_size"),
        (1, 0, "new_size"),
        (1, u64::MAX, "new_size"),
    ] {
        let st = audit
            .consistency_proof(wire::ConsistencyProofRequest { old_size, new_size })
            .await
            .unwrap_err();
        assert_eq!(st.code(), Code::InvalidArgument, "{old_size}..{new_size}: {st:?}");
        assert!(st.message().starts_with(&format!("{field}: ")), "{st:?}");
    }
    for (index, tree_size, field) in [(note.size, note.size, "index"), (0, 0, "tree_size")] {
        let st = audit
            .inclusion_proof(wire::InclusionProofRequest { index, tree_size })
            .await
            .unwrap_err();
        assert_eq!(st.code(), Code::InvalidArgument, "{index} of {tree_size}: {st:?}");
        assert!(st.message().starts_with(&format!("{field}: ")), "{st:?}");
    }

    // One byte altered anywhere: refused, every time.
    let good = bundles["finance"].clone();
    let step = (good.len() / 150).max(1);
    for pos in (0..good.len()).step_by(step).chain([good.len() - 1]) {
        let mut bad = good.clone();
        bad[pos] ^= 0x01;
        assert!(
            verify_bundle(&bad, &verifier).is_err(),
            "flipping byte {pos} went unnoticed"
        );
    }

    // An entry dropped, or two swapped: named by position.
    let bundle = wire::AuditBundle::decode(good.as_slice()).unwrap();
    let mut dropped = bundle.clone();
    dropped.entries.remove(2);
    assert_eq!(
        verify_bundle(&dropped.encode_to_vec(), &verifier).unwrap_err(),
        AuditError::Entry {
            index: 2,
            detail: "says it is entry 3: entries were dropped, inserted or reordered".into()
        }
    );
    let mut swapped = bundle.clone();
    swapped.entries.swap(3, 4);
    let err = verify_bundle(&swapped.encode_to_vec(), &verifier).unwrap_err();
    assert!(matches!(err, AuditError::Entry { index: 3, .. }), "{err}");

    // A checkpoint from a forked history, properly signed by finance's key.
    let finance_signer = antar_core::Signer::from_pkcs8(
        &antar_pki::read_key_der(&fed.certs("finance").signing_key()).unwrap(),
        antar_pki::read_cert_der(&fed.certs("finance").signing_cert()).unwrap(),
    )
    .unwrap();
    let last = bundle.checkpoints.last().unwrap().clone();
    let forked_root = merkle::leaf_hash(b"another history");
    let forked = Note {
        origin: origin("gov.example", "finance"),
        size: last.tree_size,
        root: forked_root,
    };
    let mut forked_bundle = bundle.clone();
    *forked_bundle.checkpoints.last_mut().unwrap() = wire::Checkpoint {
        note: forked.sign(&finance_signer),
        tree_size: last.tree_size,
        root_hash: forked_root.to_vec().into(),
        ..Default::default()
    };
    let err = verify_bundle(&forked_bundle.encode_to_vec(), &verifier).unwrap_err();
    assert!(
        matches!(&err, AuditError::Checkpoint { detail, .. } if detail.contains("root does not match")),
        "{err}"
    );

    // Cosignatures that would make the log look more witnessed than it is:
    // finance's own, and health's twice. Each is genuine, and refused.
    let note = Note {
        origin: origin("gov.example", "finance"),
        size: last.tree_size,
        root: last.root_hash[..].try_into().unwrap(),
    };
    let cosigned_by = |agency: &str| {
        let signer = fed.signer(agency);
        wire::Cosignature {
            witness: agency.into(),
            line: antar_core::checkpoint::cosign(&note, &origin("gov.example", agency), &signer, 1),
            cert: signer.cert_der().to_vec().into(),
        }
    };
    let with = |extra: Vec<wire::Cosignature>| {
        let mut bundle = bundle.clone();
        let cp = bundle.checkpoints.last_mut().unwrap();
        cp.cosignatures.retain(|c| c.witness != "health");
        cp.cosignatures.extend(extra);
        verify_bundle(&bundle.encode_to_vec(), &verifier)
    };
    with(vec![cosigned_by("health")]).unwrap();
    for (extra, want) in [
        (vec![cosigned_by("finance")], "a node cannot witness its own log"),
        (
            vec![cosigned_by("health"), cosigned_by("health")],
            "repeats witness health",
        ),
    ] {
        let err = with(extra).unwrap_err();
        assert!(
            matches!(&err, AuditError::Checkpoint { detail, .. } if detail.contains(want)),
            "{err}"
        );
    }

    // The CLI, as an auditor runs it: export, verify OK; a swapped bundle fails naming the entry.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("finance.bundle");
    let fed_json = fed.layout.federation_json();
    let status = Command::new(antar_bin())
        .args(["audit", "export", "--agency", "finance", "--out"])
        .arg(&out)
        .arg("--federation")
        .arg(&fed_json)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        !dir.path().join("finance.bundle.partial").exists(),
        "the partial file is renamed once whole"
    );
    // Straight to a pipe: the bundle alone on stdout; a directory refused.
    // (/dev/fd/1, not /dev/stdout: a build that renamed over its `--out`
    // could not replace a link in /proc, but as root it would replace
    // /dev/stdout.)
    let piped = Command::new(antar_bin())
        .args(["audit", "export", "--agency", "finance", "--out", "/dev/fd/1"])
        .arg("--federation")
        .arg(&fed_json)
        .output()
        .unwrap();
    assert!(
        piped.status.success(),
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );
    // Through a link to a regular file (as /dev/stdout is, with stdout
    // redirected to one): written through, the link left a link.
    let target = dir.path().join("target.bundle");
    std::fs::write(&target, b"old").unwrap();
    let link = dir.path().join("link.bundle");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let through = Command::new(antar_bin())
        .args(["audit", "export", "--agency", "finance", "--out"])
        .arg(&link)
        .arg("--federation")
        .arg(&fed_json)
        .output()
        .unwrap();
    assert!(
        through.status.success(),
        "{}",
        String::from_utf8_lossy(&through.stderr)
    );
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    verify_bundle(&std::fs::read(&target).unwrap(), &verifier).expect("the bundle behind the link verifies");
    verify_bundle(&piped.stdout, &verifier).unwrap_or_else(|e| {
        panic!(
            "the bundle on stdout: {e}; it starts {:?}",
            String::from_utf8_lossy(&piped.stdout[..piped.stdout.len().min(300)])
        )
    });
    let to_dir = Command::new(antar_bin())
        .args(["audit", "export", "--agency", "finance", "--out"])
        .arg(dir.path())
        .arg("--federation")
        .arg(&fed_json)
        .output()
        .unwrap();
    assert!(!to_dir.status.success());
    assert!(
        String::from_utf8_lossy(&to_dir.stderr).contains("is a directory"),
        "{}",
        String::from_utf8_lossy(&to_dir.stderr)
    );
    let ok = Command::new(antar_bin())
        .args(["audit", "verify"])
        .arg(&out)
        .arg("--root")
        .arg(&fed.file.root_ca)
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let said = String::from_utf8_lossy(&ok.stdout);
    assert!(said.starts_with("OK: finance's log"), "{said}");
    let root_sha256 = hex(&antar_core::envelope::sha256(
        &antar_pki::read_cert_der(&fed.file.root_ca).unwrap(),
    ));
    assert!(
        said.contains(&format!("(SHA-256 {root_sha256})")),
        "the root trusted is named: {said}"
    );
    // Nothing verified (the root cannot be read) is not a failed check.
    let unread = Command::new(antar_bin())
        .args(["audit", "verify"])
        .arg(&out)
        .arg("--root")
        .arg(dir.path().join("no-such-root.crt"))
        .output()
        .unwrap();
    assert_eq!(unread.status.code(), Some(2), "{unread:?}");
    let bad = dir.path().join("swapped.bundle");
    std::fs::write(&bad, swapped.encode_to_vec()).unwrap();
    let failed = Command::new(antar_bin())
        .args(["audit", "verify"])
        .arg(&bad)
        .arg("--federation")
        .arg(&fed_json)
        .output()
        .unwrap();
    assert_eq!(failed.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("FAILED: entry 3"), "{stderr}");

    // Only auditors: app and admin certificates are PERMISSION_DENIED.
    for role in [ClientRole::App, ClientRole::Admin] {
        let c = fed.client("finance", role).await;
        let st = c
            .audit()
            .latest_checkpoint(wire::LatestCheckpointRequest {})
            .await
            .unwrap_err();
        assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    }
    for n in nodes {
        n.stop().await.unwrap();
    }
}

/// Removes the last `n` entries of a stopped node's log and every stored
/// checkpoint and witness state: a rewritten history, as an operator with
/// access to the disk could make it.
fn rewrite_history(data_dir: &std::path::Path, n: u64) {
    let db = sled::open(data_dir).unwrap();
    let meta = db.open_tree("audit_meta").unwrap();
    let size = u64::from_be_bytes(meta.get("size").unwrap().unwrap().as_ref().try_into().unwrap());
    assert!(size > n, "log of {size} entries is too short to rewrite");
    // Entries are stored alone, or a group's together as a run: `0x00
    // 0x04`, then per entry its index (u64), length (u32) and stored value
    // (crates/store/src/runs.rs). Runs that reach past the new end are cut.
    let audit = db.open_tree("audit").unwrap();
    let end = size - n;
    let index = |b: &[u8]| u64::from_be_bytes(b[..8].try_into().unwrap());
    let start = audit
        .range(..=end.to_be_bytes())
        .next_back()
        .map_or(end.to_be_bytes().to_vec(), |kv| kv.unwrap().0.to_vec());
    for kv in audit.range(start..) {
        let (k, v) = kv.unwrap();
        if !v.starts_with(&[0, 4]) {
            if index(&k) >= end {
                audit.remove(k).unwrap();
            }
            continue;
        }
        let (mut kept, mut at) = (Vec::new(), 2);
        while at < v.len() {
            let len = u32::from_be_bytes(v[at + 8..at + 12].try_into().unwrap()) as usize;
            if index(&v[at..]) < end {
                kept.push(&v[at..at + 12 + len]);
            }
            at += 12 + len;
        }
        match kept.as_slice() {
            [] => audit.remove(k).map(drop).unwrap(),
            [alone] => audit.insert(k, &alone[12..]).map(drop).unwrap(),
            items => audit
                .insert(k, [&[0u8, 4][..], &items.concat()].concat())
                .map(drop)
                .unwrap(),
        }
    }
    meta.insert("size", &(size - n).to_be_bytes()).unwrap();
    // A careful rewrite also drops the derived subtree hashes, so the node
    // presents the new history consistently from then on.
    db.open_tree("audit_node").unwrap().clear().unwrap();
    for prefix in [b"cp".as_slice(), b"wit\0"] {
        for k in meta.scan_prefix(prefix).keys() {
            meta.remove(k.unwrap()).unwrap();
        }
    }
    db.flush().unwrap();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The stderr of a command that exited with `code`, trimmed.
fn stderr_of(out: &std::process::Output, code: i32) -> String {
    assert_eq!(out.status.code(), Some(code), "{out:?}");
    String::from_utf8_lossy(&out.stderr).trim().to_owned()
}

/// `antar audit verify FILE --federation … --extends E` for each of `extends`.
fn verify_cli(fed: &Federation, file: &std::path::Path, extends: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(antar_bin());
    cmd.args(["audit", "verify"])
        .arg(file)
        .arg("--federation")
        .arg(fed.layout.federation_json());
    for e in extends {
        cmd.args(["--extends", e]);
    }
    cmd.output().unwrap()
}

/// Waits until the newest checkpoint of `auditor`'s node, of a size past
/// `past`, carries a cosignature by `witness`, and returns it.
async fn witnessed(auditor: &antar_client::Client, witness: &str, past: u64) -> wire::Checkpoint {
    eventually(
        20,
        &format!("the log witnessed by {witness} past size {past}"),
        || {
            let mut audit = auditor.audit();
            async move {
                let c = audit
                    .latest_checkpoint(wire::LatestCheckpointRequest {})
                    .await
                    .unwrap()
                    .into_inner();
                (c.tree_size > past && c.cosignatures.iter().any(|c| c.witness == witness)).then_some(c)
            }
        },
    )
    .await
}

async fn latest_checkpoint(fed: &Federation, agency: &str) -> wire::Checkpoint {
    fed.client(agency, ClientRole::Auditor)
        .await
        .audit()
        .latest_checkpoint(wire::LatestCheckpointRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// After its signing certificate is renewed, a quiet node's newest
/// checkpoint (the log has not grown) is signed again with the new key, so
/// it verifies with the certificate LatestCheckpoint hands out with it; the
/// peers' cosignatures of the same text stay with it. An export carries
/// the old certificate too, so the checkpoints signed before still verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_signing_key_signs_the_newest_checkpoint_again() {
    let fed = Federation::standard();
    let nodes = fed.start_all_with(&["finance", "health"], |_, _| {}).await;
    // Signed with the old key and never signed again: the log grows after it.
    let early = latest_checkpoint(&fed, "finance").await;
    send(&fed.app("finance").await, notice("health", "tax.notice", b"x")).await;
    assert_eq!(receive(&fed.app("health").await, 1, 10, true).await.len(), 1);
    let verifies = |cp: &wire::Checkpoint| {
        let (_, key) = fed.verifier().node_signing_key(&cp.signer_cert).unwrap();
        Note::verify(&cp.note, &key).map(|n| n.size)
    };
    // Witnessed by health before the renewal.
    let before = eventually(20, "finance's newest checkpoint cosigned by health", || async {
        let cp = latest_checkpoint(&fed, "finance").await;
        cp.cosignatures
            .iter()
            .any(|c| c.witness == "health")
            .then_some(cp)
    })
    .await;
    assert_eq!(verifies(&before), Ok(before.tree_size));
    for n in nodes {
        n.stop().await.unwrap();
    }
    antar_pki::layout::issue_node(
        &fed.layout.federation_dir(),
        &fed.certs("finance"),
        &antar_core::AgencyId::parse("finance").unwrap(),
        &["localhost".to_owned()],
        &[std::net::Ipv4Addr::LOCALHOST.into()],
        30,
        true,
    )
    .unwrap();
    let finance = fed.start("finance").await;
    let after = latest_checkpoint(&fed, "finance").await;
    assert_ne!(after.signer_cert, before.signer_cert);
    assert_eq!(after.tree_size, before.tree_size, "the log did not grow");
    assert_eq!(verifies(&after), Ok(after.tree_size));
    // Health's cosignature covers the note's text, which did not change:
    // kept with the checkpoint signed again, and still valid on it.
    let note = Note::verify(
        &after.note,
        &fed.verifier().node_signing_key(&after.signer_cert).unwrap().1,
    )
    .unwrap();
    let health = after
        .cosignatures
        .iter()
        .find(|c| c.witness == "health")
        .expect("health's cosignature kept");
    let (_, health_key) = fed.verifier().node_signing_key(&health.cert).unwrap();
    antar_core::checkpoint::verify_cosignature(
        &health.line,
        &note,
        &origin(DEV_FEDERATION, "health"),
        &health_key,
    )
    .unwrap();
    // An export holds the checkpoints signed with the old key too, and the
    // certificates of both keys: it verifies, old checkpoints included.
    let bytes = export(&fed.client("finance", ClientRole::Auditor).await).await;
    let v = verify_bundle(&bytes, &fed.verifier()).unwrap_or_else(|e| panic!("export after a renewal: {e}"));
    let bundle = wire::AuditBundle::decode(bytes.as_slice()).unwrap();
    assert!(
        bundle.certificates == [after.signer_cert.clone(), before.signer_cert.clone()],
        "not the current signing certificate, then the renewed one: {} certificates",
        bundle.certificates.len()
    );
    assert!(
        bundle.checkpoints.iter().any(|c| c.note == early.note),
        "the bundle holds the checkpoint signed with the old key: {v:?}"
    );
    finance.stop().await.unwrap();
}

/// A witness keeps and decides on what a checkpoint's note signs, never on
/// the request's unsigned copy of it: a node that signs size 100 but says
/// 0 beside it is refused, so its next checkpoint (any fork) is still
/// checked against the 100 it signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_witness_takes_only_what_the_note_signs() {
    let fed = Federation::standard();
    let health = fed.start("health").await;
    let finance = fed.signer("finance");
    let signed = |size: u64, root: u8| wire::Checkpoint {
        note: Note {
            origin: origin(DEV_FEDERATION, "finance"),
            size,
            root: [root; 32],
        }
        .sign(&finance),
        tree_size: size,
        root_hash: vec![root; 32].into(),
        ..Default::default()
    };
    let ask = |checkpoint: wire::Checkpoint, old_size: u64| wire::WitnessRequest {
        checkpoint: Some(checkpoint),
        signer_cert: finance.cert_der().to_vec().into(),
        old_size,
        proof: Vec::new(),
    };
    let mut peer = fed.peer_as("finance", "health").await;
    let lying = wire::Checkpoint {
        tree_size: 0,
        ..signed(100, 1)
    };
    let st = peer.witness(ask(lying, 0)).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(
        st.message().starts_with("checkpoint: tree_size 0 and root_hash")
            && st.message().contains("size 100"),
        "{st:?}"
    );
    // The same note, told truly: cosigned, and what health holds is 100.
    let ok = peer.witness(ask(signed(100, 1), 0)).await.unwrap().into_inner();
    assert!(!ok.cosignature.is_empty() && ok.known_size == 100, "{ok:?}");
    // A fork from nothing is not cosigned: health asks for a proof from 100.
    let fork = peer.witness(ask(signed(120, 2), 0)).await.unwrap().into_inner();
    assert_eq!((fork.cosignature.as_str(), fork.known_size), ("", 100));
    health.stop().await.unwrap();

    // What a build from before this check kept of the lying request: the
    // note of 100 beside a copy saying 0. The note is what counts.
    {
        let db = sled::open(fed.layout.data_dir("health")).unwrap();
        let lied = wire::Checkpoint {
            tree_size: 0,
            root_hash: vec![9; 32].into(),
            ..signed(100, 1)
        };
        db.open_tree("audit_meta")
            .unwrap()
            .insert(b"seen\0finance", lied.encode_to_vec())
            .unwrap();
        db.flush().unwrap();
    }
    let health = fed.start("health").await;
    let mut peer = fed.peer_as("finance", "health").await;
    let fork = peer.witness(ask(signed(120, 2), 0)).await.unwrap().into_inner();
    assert_eq!((fork.cosignature.as_str(), fork.known_size), ("", 100));
    health.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_log_is_caught_by_the_peers_witness() {
    let fed = Federation::standard();
    let health_node = fed.start("health").await;
    let finance_node = fed.start("finance").await;
    let finance = fed.app("finance").await;
    let health = fed.app("health").await;
    for i in 0..3u8 {
        send(&finance, notice("health", "tax.notice", &[i])).await;
    }
    assert_eq!(receive(&health, 3, 10, true).await.len(), 3);
    let auditor = fed.client("finance", ClientRole::Auditor).await;
    // An auditor keeps an export, and the newest size and root its
    // verification printed; a later export extends both.
    let dir = tempfile::tempdir().unwrap();
    let before = dir.path().join("before.bundle");
    std::fs::write(&before, export(&auditor).await).unwrap();
    let earlier = verify_bundle(&std::fs::read(&before).unwrap(), &fed.verifier()).unwrap();
    let earlier_root = format!("{}:{}", earlier.latest.0, hex(&earlier.latest.1));
    send(&finance, notice("health", "tax.notice", &[3])).await;
    assert_eq!(receive(&health, 1, 10, true).await.len(), 1);
    let grown = dir.path().join("grown.bundle");
    std::fs::write(&grown, export(&auditor).await).unwrap();
    let grown_view = verify_bundle(&std::fs::read(&grown).unwrap(), &fed.verifier()).unwrap();
    assert!(grown_view.latest.0 > earlier.latest.0);
    let ok = verify_cli(&fed, &grown, &[before.to_str().unwrap(), &earlier_root]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let said = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(
        said.matches(&format!("OK: extends the earlier log {earlier_root} "))
            .count(),
        2,
        "{said}"
    );
    // The other way round, the earlier log lacks the newer entries.
    let grown_root = format!("{}:{}", grown_view.latest.0, hex(&grown_view.latest.1));
    let shorter = verify_cli(&fed, &before, &[&grown_root]);
    assert_eq!(
        stderr_of(&shorter, 1),
        format!(
            "FAILED: does not extend the earlier log of size {} (root {}): this log holds {} entries, fewer than the earlier {}: entries were dropped since",
            grown_view.latest.0,
            hex(&grown_view.latest.1),
            earlier.latest.0,
            grown_view.latest.0
        )
    );

    witnessed(&auditor, "health", 0).await;
    let health_admin = fed.admin("health").await;
    assert!(status(&health_admin).await.split_views.is_empty());
    // The newest view before the rewrite, as an auditor keeps it.
    let last = dir.path().join("last.bundle");
    std::fs::write(&last, export(&auditor).await).unwrap();
    let last_view = verify_bundle(&std::fs::read(&last).unwrap(), &fed.verifier()).unwrap();
    let last_root = format!("{}:{}", last_view.latest.0, hex(&last_view.latest.1));

    // finance's operator rewrites history on disk, then carries on.
    finance_node.stop().await.unwrap();
    rewrite_history(&fed.layout.data_dir("finance"), 2);
    let finance_node = fed.start("finance").await;
    let finance = fed.app("finance").await;
    for i in 10..13u8 {
        send(&finance, notice("health", "tax.notice", &[i])).await;
    }

    // Health's witness catches it at the next checkpoint: Admin status, metrics.
    eventually(20, "health flags a split view of finance's log", || async {
        (status(&health_admin).await.split_views == ["finance"]).then_some(())
    })
    .await;
    let mut conn = tokio::net::TcpStream::connect(fed.addrs["health"].metrics)
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut conn, b"GET /metrics HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut conn, &mut text)
        .await
        .unwrap();
    assert!(text.contains("antar_split_view{log=\"finance\"} 1"), "{text}");
    // Witnessing never blocks traffic: the new envelopes still arrive.
    assert_eq!(receive(&health, 3, 10, true).await.len(), 3);

    // An auditor holding an earlier export sees it too, offline: the new
    // export verifies on its own, but not as an extension of either
    // earlier view.
    let auditor = fed.client("finance", ClientRole::Auditor).await;
    let after = dir.path().join("after.bundle");
    std::fs::write(&after, export(&auditor).await).unwrap();
    let alone = verify_cli(&fed, &after, &[]);
    assert!(
        alone.status.success(),
        "{}",
        String::from_utf8_lossy(&alone.stderr)
    );
    let after_view = verify_bundle(&std::fs::read(&after).unwrap(), &fed.verifier()).unwrap();
    for view in [last.to_str().unwrap(), &last_root] {
        let rewritten = verify_cli(&fed, &after, &[view]);
        let stderr = stderr_of(&rewritten, 1);
        let why = if after_view.latest.0 >= last_view.latest.0 {
            format!("the root of this log's first {} entries is ", last_view.latest.0)
        } else {
            format!("this log holds {} entries, fewer than", after_view.latest.0)
        };
        assert!(
            stderr.starts_with(&format!(
                "FAILED: does not extend the earlier log of size {} (root {}): {why}",
                last_view.latest.0,
                hex(&last_view.latest.1),
            )),
            "{stderr}"
        );
    }
    // The two entries dropped came after the first export: it is still
    // a prefix of the new history.
    assert!(last_view.latest.0 >= earlier.latest.0 + 2);
    let prefix = verify_cli(&fed, &after, &[before.to_str().unwrap()]);
    assert!(
        prefix.status.success(),
        "{}",
        String::from_utf8_lossy(&prefix.stderr)
    );
    // Another node's log is not an earlier view of this one.
    let health_log = dir.path().join("health.bundle");
    let health_auditor = fed.client("health", ClientRole::Auditor).await;
    std::fs::write(&health_log, export(&health_auditor).await).unwrap();
    let other = verify_cli(&fed, &grown, &[health_log.to_str().unwrap()]);
    assert_eq!(
        stderr_of(&other, 1),
        format!(
            "FAILED: the earlier bundle {} is health's log, this is finance's",
            health_log.display()
        )
    );

    // The operators settle it (say finance was restored from a backup):
    // health's administrator clears the flag, and health witnesses
    // finance's log again from its next checkpoint.
    let admin_cli = |log: &str| {
        Command::new(antar_bin())
            .args([
                "admin",
                "clear-split-view",
                log,
                "--agency",
                "health",
                "--json",
                "--federation",
            ])
            .arg(fed.layout.federation_json())
            .output()
            .unwrap()
    };
    let cleared = admin_cli("finance");
    assert!(
        cleared.status.success(),
        "{}",
        String::from_utf8_lossy(&cleared.stderr)
    );
    let said: serde_json::Value = serde_json::from_slice(&cleared.stdout).unwrap();
    let (size, root) = (
        said["forgotten_size"].as_u64().unwrap(),
        said["forgotten_root"].as_str().unwrap(),
    );
    assert!(size > 0 && root.len() == 64, "{said}");
    // The peer's own signed note for the history it showed before, handed
    // over to keep.
    assert!(
        said["forgotten_note"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}\n{size}\n", origin(DEV_FEDERATION, "finance"))),
        "{said}"
    );
    assert!(
        said["found"].as_str().unwrap().contains(&format!(
            " is not consistent with size {size} root {root} witnessed before ("
        )),
        "{said}"
    );
    let split_views = status(&health_admin).await.split_views;
    assert!(split_views.is_empty(), "{split_views:?}");
    assert!(!scrape(&fed, "health")
        .await
        .contains_key("antar_split_view{log=\"finance\"}"));
    let finance = fed.app("finance").await;
    send(&finance, notice("health", "tax.notice", &[20])).await;
    assert_eq!(receive(&health, 1, 10, true).await.len(), 1);
    witnessed(&auditor, "health", after_view.latest.0).await;
    // Nothing is flagged any more: nothing to clear.
    let again = admin_cli("finance");
    assert!(!again.status.success());
    assert_eq!(
        String::from_utf8_lossy(&again.stderr).trim(),
        "error: the node answered NotFound: no split view of finance's log is flagged on this node"
    );
    for n in [finance_node, health_node] {
        n.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_payload_purge_every_proof_still_verifies() {
    let fed = Federation::standard();
    let mut config = fed.config("finance");
    config.limits.payload_retention_secs = 1;
    let finance_node = fed.start_with(config).await;
    let health_node = fed.start("health").await;
    let finance = fed.app("finance").await;
    let mut ids = Vec::new();
    for i in 0..2u8 {
        ids.push(send(&finance, notice("health", "tax.notice", &[i; 100])).await);
    }
    assert_eq!(receive(&fed.app("health").await, 2, 10, true).await.len(), 2);
    let metrics = fed.addrs["finance"].metrics;
    eventually(20, "finance purged both payloads", || async move {
        let mut conn = tokio::net::TcpStream::connect(metrics).await.ok()?;
        tokio::io::AsyncWriteExt::write_all(&mut conn, b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut conn, &mut text)
            .await
            .ok()?;
        text.contains("antar_payloads_purged_total 2").then_some(())
    })
    .await;

    let auditor = fed.client("finance", ClientRole::Auditor).await;
    let bundle = export(&auditor).await;
    let v = verify_bundle(&bundle, &fed.verifier()).unwrap();
    assert!(v.entries >= 6, "{v:?}");
    let mut audit = auditor.audit();
    let cp = audit
        .latest_checkpoint(wire::LatestCheckpointRequest {})
        .await
        .unwrap()
        .into_inner();
    let root: merkle::Hash = cp.root_hash[..].try_into().unwrap();
    let entries: Vec<wire::LogEntry> = audit
        .query(wire::QueryRequest {
            message_id: ids[0].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .map(Result::unwrap)
        .collect()
        .await;
    assert!(
        entries.len() >= 3,
        "envelope, ACCEPTED, DELIVERED, PROCESSED: {entries:?}"
    );
    for e in entries.iter().filter(|e| e.index < cp.tree_size) {
        let path = audit
            .inclusion_proof(wire::InclusionProofRequest {
                index: e.index,
                tree_size: cp.tree_size,
            })
            .await
            .unwrap()
            .into_inner()
            .path;
        merkle::verify_inclusion(
            &merkle::leaf_hash(&e.encode_to_vec()),
            e.index,
            cp.tree_size,
            &hashes(&path),
            &root,
        )
        .unwrap();
    }
    finance_node.stop().await.unwrap();
    health_node.stop().await.unwrap();

    // On disk: the payload is gone, the signed envelope and receipts are not.
    let store = fed.open_store("finance");
    let record = store
        .message(&antar_core::MessageId::parse(&ids[0]).unwrap())
        .unwrap()
        .unwrap();
    assert!(record.payload.is_none());
    assert!(record.envelope.is_some());
    assert_eq!(record.receipts.len(), 3);
}

/// An auditor who verified an export takes only what came after it
/// (`antar audit export --from-size N`): the smaller bundle verifies with
/// `--extends` the earlier export or its N:ROOT, and not alone; a view it
/// does not reach is refused; an altered prefix fails; a size past the
/// log is INVALID_ARGUMENT naming `from_size`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_from_an_earlier_size_carries_only_what_came_after() {
    let fed = Federation::standard();
    let health_node = fed.start("health").await;
    let finance_node = fed.start("finance").await;
    let finance = fed.app("finance").await;
    let health = fed.app("health").await;
    let dir = tempfile::tempdir().unwrap();
    let export_cli = |out: &std::path::Path, from: u64| {
        Command::new(antar_bin())
            .args([
                "audit",
                "export",
                "--agency",
                "finance",
                "--from-size",
                &from.to_string(),
                "--out",
            ])
            .arg(out)
            .arg("--federation")
            .arg(fed.layout.federation_json())
            .output()
            .unwrap()
    };
    for i in 0..5u8 {
        send(&finance, notice("health", "tax.notice", &[i])).await;
    }
    assert_eq!(receive(&health, 5, 10, true).await.len(), 5);
    let may = dir.path().join("may.bundle");
    assert!(export_cli(&may, 0).status.success());
    let may_view = verify_bundle(&std::fs::read(&may).unwrap(), &fed.verifier()).unwrap();
    let (n, r) = (may_view.latest.0, hex(&may_view.latest.1));
    for i in 5..10u8 {
        send(&finance, notice("health", "tax.notice", &[i])).await;
    }
    assert_eq!(receive(&health, 5, 10, true).await.len(), 5);
    let june = dir.path().join("june.bundle");
    let wrote = export_cli(&june, n);
    assert!(
        wrote.status.success(),
        "{}",
        String::from_utf8_lossy(&wrote.stderr)
    );
    assert!(
        String::from_utf8_lossy(&wrote.stdout).contains(&format!(
            "--root ROOT_CA --extends EARLIER (the export of {n} entries it continues, or {n}:ROOT)"
        )),
        "{}",
        String::from_utf8_lossy(&wrote.stdout)
    );
    let whole = dir.path().join("whole.bundle");
    assert!(export_cli(&whole, 0).status.success());
    let (june_bytes, whole_bytes) = (std::fs::read(&june).unwrap(), std::fs::read(&whole).unwrap());
    let bundle = wire::AuditBundle::decode(june_bytes.as_slice()).unwrap();
    assert_eq!(bundle.first_index, n);
    assert_eq!(bundle.prefix.len(), n.count_ones() as usize);
    let whole_bundle = wire::AuditBundle::decode(whole_bytes.as_slice()).unwrap();
    assert_eq!(
        bundle.entries[..],
        whole_bundle.entries[n as usize..bundle.entries.len() + n as usize]
    );
    assert!(bundle.checkpoints.iter().all(|c| c.tree_size >= n));
    assert!(june_bytes.len() < whole_bytes.len());

    for view in [may.to_str().unwrap(), &format!("{n}:{r}")] {
        let ok = verify_cli(&fed, &june, &[view]);
        assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
        let said = String::from_utf8_lossy(&ok.stdout);
        assert!(
            said.starts_with(&format!(
                "OK: finance's log from entry {n}, {} entries (",
                bundle.entries.len()
            )),
            "{said}"
        );
        assert!(
            said.contains(&format!("OK: extends the earlier log {n}:{r}")),
            "{said}"
        );
    }
    // Alone it proves nothing about what it continues: not verified.
    let alone = verify_cli(&fed, &june, &[]);
    assert_eq!(
        stderr_of(&alone, 2),
        format!(
            "error: {} holds the log from entry {n} on: verify it with --extends the earlier export it continues (or its {n}:ROOT, or a later view)",
            june.display()
        )
    );
    // A view that ends before the bundle starts cannot be checked with it:
    // not verified, rather than failed.
    let short = verify_cli(&fed, &june, &[&format!("{}:{r}", n - 1)]);
    assert_eq!(
        stderr_of(&short, 2),
        format!(
            "error: the earlier log {}:{r} ends before this bundle's first entry {n}, and no other view given links the two: export the log from entry {} or before, or give the exports between",
            n - 1,
            n - 1
        )
    );
    // The prefix stands for the entries before: altered, the checkpoint
    // at n no longer matches.
    let mut altered = bundle.clone();
    flip(&mut altered.prefix[0], 0, 1);
    let bad = dir.path().join("altered.bundle");
    std::fs::write(&bad, altered.encode_to_vec()).unwrap();
    let failed = verify_cli(&fed, &bad, &[may.to_str().unwrap()]);
    assert_eq!(
        stderr_of(&failed, 1),
        format!("FAILED: checkpoint 0 (size {n}): root does not match entries 0..{n}: the log was rewritten or the checkpoint comes from another history")
    );
    // A node that forges the roots it stands on, and signs a checkpoint
    // over them, makes a bundle that holds together on its own: only the
    // earlier view catches it.
    let mut forged = bundle.clone();
    flip(&mut forged.prefix[0], 0, 1);
    let prefix: Vec<merkle::Hash> = forged.prefix.iter().map(|h| h[..].try_into().unwrap()).collect();
    let leaves: Vec<merkle::Hash> = forged.entries.iter().map(|e| merkle::leaf_hash(e)).collect();
    let size = n + leaves.len() as u64;
    let root = merkle::root_after(&prefix, n, &leaves).unwrap();
    let note = Note {
        origin: origin(DEV_FEDERATION, "finance"),
        size,
        root,
    }
    .sign(&fed.signer("finance"));
    forged.checkpoints = vec![wire::Checkpoint {
        note,
        tree_size: size,
        root_hash: root.to_vec().into(),
        ..Default::default()
    }];
    forged.consistency.clear();
    let forged_bytes = forged.encode_to_vec();
    let on_its_own = antar_core::audit::verify_log(&forged_bytes, &fed.verifier()).unwrap();
    assert_eq!(on_its_own.verified.first, n);
    assert!(
        matches!(verify_bundle(&forged_bytes, &fed.verifier()),
            Err(AuditError::Bundle(m)) if m.starts_with(&format!("starts at entry {n}: "))),
        "not without a view"
    );
    let forged_file = dir.path().join("forged.bundle");
    std::fs::write(&forged_file, &forged_bytes).unwrap();
    for view in [may.to_str().unwrap(), &format!("{n}:{r}")] {
        let caught = verify_cli(&fed, &forged_file, &[view]);
        let stderr = stderr_of(&caught, 1);
        assert!(
            stderr.starts_with(&format!(
                "FAILED: does not extend the earlier log of size {n} (root {r}): the root of this log's first {n} entries is "
            )),
            "{stderr}"
        );
    }

    // Exports from an earlier size on chain: July's continues June's,
    // which continues May's; June's counts as a view only with May's.
    let june_view = verify_bundle_extending(&june_bytes, &fed.verifier(), &[may_view.latest]).unwrap();
    for i in 10..12u8 {
        send(&finance, notice("health", "tax.notice", &[i])).await;
    }
    assert_eq!(receive(&health, 2, 10, true).await.len(), 2);
    let july = dir.path().join("july.bundle");
    assert!(export_cli(&july, june_view.latest.0).status.success());
    let unvouched = verify_cli(&fed, &july, &[june.to_str().unwrap()]);
    assert_eq!(
        stderr_of(&unvouched, 2),
        format!(
            "error: the earlier bundle {} holds the log from entry {n} on: give also --extends a view it continues (the export before it, or its {n}:ROOT)",
            june.display()
        )
    );
    let chained = verify_cli(&fed, &july, &[june.to_str().unwrap(), may.to_str().unwrap()]);
    assert!(
        chained.status.success(),
        "{}",
        String::from_utf8_lossy(&chained.stderr)
    );
    let said = String::from_utf8_lossy(&chained.stdout);
    assert!(
        said.contains(&format!(
            "OK: extends the earlier log {}:{} of {} (",
            june_view.latest.0,
            hex(&june_view.latest.1),
            june.display()
        )),
        "{said}"
    );
    // A forged June does not pass for a view, even with May's beside it.
    let forged_june = verify_cli(
        &fed,
        &july,
        &[forged_file.to_str().unwrap(), may.to_str().unwrap()],
    );
    let stderr = stderr_of(&forged_june, 1);
    assert!(
        stderr.starts_with(&format!(
            "FAILED: the earlier bundle {}: does not extend the earlier log of size {n}",
            forged_file.display()
        )),
        "{stderr}"
    );

    // Past the log's end.
    let past = export_cli(&dir.path().join("past.bundle"), 1_000_000);
    assert!(!past.status.success());
    let stderr = String::from_utf8_lossy(&past.stderr);
    assert!(
        stderr.contains("InvalidArgument: from_size: 1000000 is past the log's "),
        "{stderr}"
    );
    for node in [finance_node, health_node] {
        node.stop().await.unwrap();
    }
}

/// An export is read and sent a page of entries at a time (1,024), in
/// chunks of 1 MiB: what arrives is the one canonical encoding of the
/// bundle, every entry once, and it verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_log_is_exported_a_page_at_a_time_and_verifies() {
    let fed = Federation::standard();
    let nodes = fed.start_all_with(&["finance", "health"], |_, _| {}).await;
    let finance = fed.app("finance").await;
    let ids = finance
        .agency()
        .send_batch(wire::SendBatchRequest {
            requests: vec![notice("health", "tax.notice", b"page"); 1000],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let last = match &ids.last().unwrap().result {
        Some(wire::send_result::Result::Sent(r)) => r.message_ids[0].clone(),
        other => panic!("{other:?}"),
    };
    until_state(&finance, &last, wire::MessageState::Delivered, 60).await;
    let auditor = fed.client("finance", ClientRole::Auditor).await;
    let bytes = export(&auditor).await;
    let bundle = wire::AuditBundle::decode(bytes.as_slice()).unwrap();
    assert!(
        bundle.entries.len() > 2 * 1024 && bytes.len() > 1 << 20,
        "{} entries, {} bytes: too few to cross pages and chunks",
        bundle.entries.len(),
        bytes.len()
    );
    assert!(
        bundle.encode_to_vec() == bytes,
        "the export is not the bundle's canonical encoding"
    );
    let v = verify_bundle(&bytes, &fed.verifier()).unwrap();
    assert_eq!(v.entries, bundle.entries.len());
    for n in nodes {
        n.stop().await.unwrap();
    }
}
