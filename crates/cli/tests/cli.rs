//! The `antar` binary as an operator runs it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn antar() -> Command {
    Command::new(env!("CARGO_BIN_EXE_antar"))
}

#[test]
fn every_subcommand_has_help_with_an_example() {
    for args in [
        vec!["dev"],
        vec!["node", "run"],
        vec!["node", "check-config"],
        vec!["pki", "init-federation"],
        vec!["pki", "issue-node"],
        vec!["pki", "init-local-ca"],
        vec!["pki", "issue-client"],
        vec!["pki", "revoke"],
        vec!["pki", "show"],
        vec!["send"],
        vec!["inbox"],
        vec!["track"],
        vec!["admin", "status"],
        vec!["admin", "peers"],
        vec!["admin", "drain"],
        vec!["admin", "reload"],
        vec!["admin", "dead-letters", "list"],
        vec!["admin", "dead-letters", "retry"],
        vec!["admin", "dead-letters", "purge"],
        vec!["admin", "release-queue"],
        vec!["call"],
        vec!["reply"],
        vec!["receipts"],
        vec!["audit", "query"],
        vec!["audit", "proof"],
        vec!["audit", "export"],
        vec!["audit", "verify"],
        vec!["bench"],
    ] {
        let out = antar().args(&args).arg("--help").output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Example"),
            "{args:?} --help shows no example:\n{text}"
        );
    }
}

#[test]
fn bad_config_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        "federation = \"gov.example\"\nagency = \"tax\"\ndata_dir = \"d\"\nbogus_key = 1\n",
    )
    .unwrap();
    for sub in ["run", "check-config"] {
        let mut cmd = antar();
        cmd.arg("node").arg(sub);
        if sub == "run" {
            cmd.arg("--config");
        }
        let out = cmd.arg(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{sub}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("bogus_key"), "{sub}: {err}");
    }
}

/// A `log.level` the node could not use is a config error, not a silent
/// `info`; a mistake in an `ANTAR_*` override names the variable.
#[test]
fn a_bad_log_level_or_override_exits_64_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    let minimal = "federation = \"gov.example\"\nagency = \"tax\"\ndata_dir = \"d\"\n[tls]\n\
        federation_root = \"r\"\nnode_cert = \"c\"\nnode_key = \"k\"\nsigning_cert = \"s\"\nsigning_key = \"sk\"\n\
        local_ca = \"l\"\napi_cert = \"a\"\napi_key = \"ak\"\n";
    std::fs::write(&path, format!("{minimal}[log]\nlevel = \"antar_node=verbose\"\n")).unwrap();
    let out = antar()
        .args(["node", "check-config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("log.level: \"antar_node=verbose\" is not a tracing filter"),
        "{err}"
    );

    std::fs::write(&path, minimal).unwrap();
    // check-config takes the file from ANTAR_CONFIG too, as `node run` does.
    let out = antar()
        .args(["node", "check-config"])
        .env("ANTAR_CONFIG", &path)
        .env("ANTAR_LIMITS__MAX_HOPZ", "3")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ANTAR_LIMITS__MAX_HOPZ=\"3\" (environment): unknown field `max_hopz`"),
        "{err}"
    );
}

/// PEM files given in full are used even with `ANTAR_FEDERATION` set; given
/// in part beside a federation file, the mix is refused, naming both.
#[test]
fn pem_files_win_over_a_federation_file_and_a_mix_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fed = dir.path().join("federation.json");
    std::fs::write(
        &fed,
        "{\"federation\": \"gov.example\", \"root_ca\": \"r\", \"agencies\": []}",
    )
    .unwrap();
    let missing = dir.path().join("missing.pem");
    let out = antar()
        .args(["admin", "status", "--addr", "127.0.0.1:9"])
        .args(
            ["--ca", "--cert", "--key"]
                .iter()
                .flat_map(|f| [std::ffi::OsStr::new(f), missing.as_os_str()]),
        )
        .env("ANTAR_FEDERATION", &fed)
        .env_remove("ANTAR_AGENCY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // The PEM files were used: it is their reading that fails.
    assert!(err.contains("missing.pem"), "{err}");
    let out = antar()
        .args(["admin", "status", "--agency", "finance", "--cert"])
        .arg(&missing)
        .env("ANTAR_FEDERATION", &fed)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("(or ANTAR_FEDERATION) and --cert given: pass all of --addr, --ca, --cert and --key"),
        "{err}"
    );
}

/// A federation.json handed to one app needs only what that app uses; a
/// command that needs a field left out, or an agency not listed, says which.
#[test]
fn a_federation_file_for_one_app_is_enough_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let fed = dir.path().join("federation.json");
    std::fs::write(
        &fed,
        r#"{"federation": "gov.example", "root_ca": "root.crt", "agencies": [
            {"id": "finance", "api_addr": "127.0.0.1:9", "api_ca": "local-ca.crt",
             "app_cert": "app.crt", "app_key": "app.key"}]}"#,
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = antar()
            .args(args)
            .arg("--federation")
            .arg(&fed)
            .env_remove("ANTAR_ADDR")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // The app's own files are what it goes on to read.
    let err = run(&[
        "track",
        "0190f3c2-5b1a-7c3e-9d2f-4a5b6c7d8e9f",
        "--agency",
        "finance",
    ]);
    assert!(err.contains("local-ca.crt"), "{err}");
    let err = run(&["admin", "status", "--agency", "finance"]);
    assert!(
        err.contains("the federation file gives no admin_addr for agency \"finance\""),
        "{err}"
    );
    // --addr stands in for an address the file leaves out.
    let err = run(&["admin", "status", "--agency", "finance", "--addr", "127.0.0.1:9"]);
    assert!(
        err.contains("the federation file gives no admin_cert for agency \"finance\""),
        "{err}"
    );
    let err = run(&["track", "0190f3c2-5b1a-7c3e-9d2f-4a5b6c7d8e9f", "--agency", "tax"]);
    assert!(
        err.contains("agency \"tax\" is not in the federation file (it lists: finance)"),
        "{err}"
    );
}

#[test]
fn client_without_connection_says_what_to_pass() {
    let out = antar()
        .args(["send", "--to", "health", "--service", "x"])
        .env_remove("ANTAR_FEDERATION")
        .env_remove("ANTAR_ADDR")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--federation FILE --agency ID"), "{err}");
}

#[test]
fn bench_refuses_a_warmup_that_leaves_nothing_to_measure() {
    let dir = tempfile::tempdir().unwrap();
    // Runs `antar bench ARGS --dir DIR/sub`, which must fail without a
    // RESULT line; its exit code and stderr.
    let refused = |args: &[&str], sub: &str| {
        let out = antar()
            .arg("bench")
            .args(args)
            .arg("--dir")
            .arg(dir.path().join(sub))
            .env("ANTAR_LOG", "error")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("RESULT"),
            "{args:?}"
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // As long as the run: no send would have a latency. Refused before any
    // node starts.
    let (_, err) = refused(&["--rate", "300", "--duration", "1", "--warmup", "1"], "open");
    assert!(
        err.contains("--warmup 1: must be shorter than --duration 1"),
        "{err}"
    );
    assert!(!dir.path().join("open").exists(), "nothing was set up");
    // A closed loop that ends inside its warm-up fails rather than print
    // empty percentiles.
    let (_, err) = refused(&["--messages", "8", "--senders", "2", "--warmup", "60"], "closed");
    assert!(
        err.contains("--warmup 60: every send started in the warm-up"),
        "{err}"
    );
    // The queue test measures no latency.
    let (code, err) = refused(&["--peer-down", "--warmup", "1"], "queue");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--warmup") && err.contains("--peer-down"), "{err}");
}

/// Runs `antar bench ARGS --json F`; returns its RESULT line and the report.
fn bench(args: &[&str]) -> (String, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let out = antar()
        .arg("bench")
        .args(args)
        .arg("--dir")
        .arg(dir.path().join("fed"))
        .arg("--json")
        .arg(&json)
        .env("ANTAR_LOG", "error")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{args:?}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result = stdout
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line in {stdout}"))
        .to_owned();
    // The file the machine's syncs were timed in is gone.
    let calibration = dir.path().join("fed").join(".antar-bench-calibration");
    assert!(!calibration.exists(), "{} left behind", calibration.display());
    let report = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    (result, report)
}

#[test]
fn bench_reports_latencies_of_every_message_and_a_queue_that_drains() {
    // Closed loop, completed by the PROCESSED receipt back at the sender.
    let (result, report) = bench(&["--messages", "60", "--senders", "4", "--receipts", "processed"]);
    assert!(
        result.starts_with("RESULT mode=closed senders=4 hops=1 kind=notice messages=60"),
        "{result}"
    );
    assert!(result.contains("receipts=processed"), "{result}");
    assert_eq!(report["latency_ms"]["samples"], 60, "{report}");
    let (p50, p99) = (
        report["latency_ms"]["p50"].as_f64().unwrap(),
        report["latency_ms"]["p99"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99, "{report}");
    // Two nodes with mTLS and signatures cannot move a message on no CPU.
    assert!(report["cpu_us_per_msg"].as_f64().unwrap() > 0.0, "{report}");
    assert!(result.contains(" cpu_us_per_msg="), "{result}");
    // The kernel's share of it, what reached storage (none on a tmpfs), the RSS peak.
    let system_pct = report["system_pct"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&system_pct), "{report}");
    assert!(report["disk_kb_per_msg"].as_f64().unwrap() >= 0.0, "{report}");
    assert!(report["rss_peak_mb"].as_f64().unwrap() > 1.0, "{report}");
    for field in [" system_pct=", " disk_kb_per_msg=", " rss_peak_mb="] {
        assert!(result.contains(field), "{result}");
    }
    // Every one of the 60 sends waited for at least one journal sync.
    assert!(result.contains(" syncs_over_25ms="), "{result}");
    let syncs = &report["journal_syncs"];
    assert!(syncs["count"].as_u64().unwrap() >= 2, "{report}");
    assert!(
        syncs["over_25ms"].as_u64().unwrap() <= syncs["count"].as_u64().unwrap(),
        "{report}"
    );
    assert!(
        syncs["over_100ms"].as_u64().unwrap() <= syncs["over_25ms"].as_u64().unwrap(),
        "{report}"
    );
    // No batch signatures: each message's envelope, its ACCEPTED,
    // DELIVERED and PROCESSED receipts, one signature each (and, on a
    // machine slow enough for the run to pass the 60 s checkpoint
    // interval, a checkpoint and a cosignature per node).
    let signatures = report["signatures"]["count"].as_u64().unwrap();
    assert!((240..=244).contains(&signatures), "{report}");
    assert!(result.contains(" signs_per_msg=4.0"), "{result}");
    // No warm-up unless asked: every message's latency is recorded.
    assert!(result.contains(" warmup_s=0 "), "{result}");
    // The machine it ran on, measured before the nodes started.
    let machine = &report["machine"];
    for rate in ["ed25519_sign_per_s", "ed25519_verify_per_s"] {
        assert!(machine[rate].as_f64().unwrap() > 100.0, "{rate}: {report}");
    }
    let fsync = &machine["fsync_ms"];
    assert!(fsync["samples"].as_u64().unwrap() >= 1, "{report}");
    assert!(
        0.0 < fsync["p50"].as_f64().unwrap() && fsync["p50"].as_f64() <= fsync["p99"].as_f64(),
        "{report}"
    );
    for share in ["iowait_pct", "steal_pct"] {
        let pct = machine["during_run"][share].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&pct), "{share}: {report}");
    }
    for field in [
        " sign_per_s=",
        " verify_per_s=",
        " fsync_p50_ms=",
        " iowait_pct=",
        " steal_pct=",
    ] {
        assert!(result.contains(field), "{field}: {result}");
    }

    // Open loop, the receiving app acking with AckBatch.
    let (result, report) = bench(&["--rate", "200", "--duration", "1", "--ack-batch", "8"]);
    assert!(
        result.starts_with("RESULT mode=open rate=200 ack_batch=8 hops=1"),
        "{result}"
    );
    assert_eq!(report["ack_batch"], 8, "{report}");
    assert_eq!(report["offered_per_s"], 200, "{report}");
    // Due at i / 200 s for every i with i / 200 < 1: exactly 200.
    assert_eq!(report["messages"], 200, "{report}");
    assert_eq!(report["latency_ms"]["samples"], 200, "{report}");

    // Open loop with SendBatch: due sends queue and two senders take what
    // has queued, so every send is still made, in at most one call each.
    let (result, report) = bench(&["--rate", "300", "--duration", "1", "--batch", "16"]);
    assert!(
        result.starts_with("RESULT mode=open rate=300 senders=2 batch=16 hops=1"),
        "{result}"
    );
    assert_eq!(report["messages"], 300, "{report}");
    assert_eq!(report["latency_ms"]["samples"], 300, "{report}");
    assert_eq!(report["send_latency_ms"]["samples"], 300, "{report}");
    let calls = report["calls"].as_u64().unwrap();
    assert!((300 / 16..=300).contains(&calls), "{report}");

    // With a warm-up: every send is made and counted, but only those due
    // from the first second on (i / 300 >= 1) have latencies.
    let (result, report) = bench(&[
        "--rate",
        "300",
        "--duration",
        "2",
        "--warmup",
        "1",
        "--batch",
        "16",
    ]);
    assert!(result.contains(" warmup_s=1 "), "{result}");
    assert_eq!(report["warmup_s"], 1, "{report}");
    assert_eq!(report["messages"], 600, "{report}");
    assert_eq!(report["latency_ms"]["samples"], 300, "{report}");
    assert_eq!(report["send_latency_ms"]["samples"], 300, "{report}");

    // The recipient down while 60 are sent, then up: they all drain.
    let (result, report) = bench(&["--peer-down", "--messages", "60", "--senders", "4"]);
    assert!(result.starts_with("RESULT mode=queue hops=1"), "{result}");
    assert!(result.contains(" drain_per_s="), "{result}");
    assert!(result.contains(" signs_per_msg="), "{result}");
    // At least each envelope and its ACCEPTED receipt, signed before the
    // recipient came up.
    assert!(report["signatures"]["count"].as_u64().unwrap() >= 120, "{report}");
    assert_eq!(report["messages"], 60, "{report}");
    let queued_peak = report["queue"]["rss_peak_mb"].as_f64().unwrap();
    assert!(queued_peak > 0.0, "{report}");
    assert!(
        report["queue"]["rss_drain_peak_mb"].as_f64().unwrap() >= queued_peak,
        "{report}"
    );
}

/// An agency revokes one of its own client certificates with its local CA:
/// `antar pki revoke --node-dir` writes `local-revoked.crl` there, signed
/// by `local-ca.crt`, listing exactly that serial, and says how to use it.
#[test]
fn pki_revoke_with_a_node_dir_writes_the_local_ca_crl() {
    let dir = tempfile::tempdir().unwrap();
    let fed = dir.path().join("federation");
    let node = dir.path().join("tax");
    // Set as the README has clients use them: `antar pki` takes neither
    // (the federation's name comes from ANTAR_FEDERATION_NAME).
    let run = |args: &[&str]| {
        let out = antar()
            .args(args)
            .env("ANTAR_FEDERATION", dir.path().join("federation.json"))
            .env("ANTAR_AGENCY", "health")
            .env_remove("ANTAR_FEDERATION_NAME")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (fed_s, node_s) = (fed.to_str().unwrap(), node.to_str().unwrap());
    run(&[
        "pki",
        "init-federation",
        "--federation",
        "gov.example",
        "--dir",
        fed_s,
    ]);
    run(&[
        "pki",
        "issue-node",
        "--federation-dir",
        fed_s,
        "--agency",
        "tax",
        "--node-dir",
        node_s,
    ]);
    run(&["pki", "init-local-ca", "--node-dir", node_s]);
    run(&[
        "pki",
        "issue-client",
        "--node-dir",
        node_s,
        "--role",
        "app",
        "--name",
        "portal",
    ]);
    let cert = node.join("clients/app-portal.crt");
    // Each CA revokes only what it issued: the wrong one says which is right.
    let refused = |args: &[&str], hint: &str| {
        let out = antar().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("was not issued by")
                && stderr.contains("nothing revoked")
                && stderr.contains(hint),
            "{stderr}"
        );
    };
    refused(
        &[
            "pki",
            "revoke",
            "--federation-dir",
            fed_s,
            "--cert",
            cert.to_str().unwrap(),
        ],
        "--node-dir",
    );
    let node_tls = node.join("node-tls.crt");
    refused(
        &[
            "pki",
            "revoke",
            "--node-dir",
            node_s,
            "--cert",
            node_tls.to_str().unwrap(),
        ],
        "--federation-dir",
    );
    assert!(!fed.join("revoked.crl").exists() && !node.join("local-revoked.crl").exists());
    let out = run(&[
        "pki",
        "revoke",
        "--node-dir",
        node_s,
        "--cert",
        cert.to_str().unwrap(),
    ]);
    assert!(out.contains("tls.local_revocation_list"), "{out}");
    let crl = node.join("local-revoked.crl");
    let shown = run(&["pki", "show", "--json", crl.to_str().unwrap()]);
    let serial = run(&["pki", "show", "--json", cert.to_str().unwrap()]);
    let serial: serde_json::Value = serde_json::from_str(serial.lines().next().unwrap()).unwrap();
    let serial = serial["certificates"][0]["serial"].as_str().unwrap().to_owned();
    assert!(shown.contains(&serial), "{shown} should list {serial}");
    assert!(
        shown.contains("Antar local CA tax"),
        "{shown} should be issued by the local CA"
    );
    assert!(
        !fed.join("revoked.crl").exists(),
        "the federation's list is not touched"
    );
}

/// `antar pki` says what is wrong before making anything: a client name
/// with capitals, a client issued before its node's local CA exists.
#[test]
fn pki_says_which_name_is_allowed_and_which_command_comes_first() {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("tax");
    let issue = |name: &str| {
        antar()
            .args([
                "pki",
                "issue-client",
                "--role",
                "app",
                "--name",
                name,
                "--federation",
                "gov.example",
                "--agency",
                "tax",
                "--node-dir",
            ])
            .arg(&node)
            .output()
            .unwrap()
    };
    let out = issue("Portal");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a client name is 1-63 lowercase letters"), "{err}");
    let out = issue("portal");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no agency-local CA here yet: create it with `antar pki init-local-ca`"),
        "{err}"
    );
    let out = antar()
        .args(["pki", "issue-node", "--agency", "tax", "--node-dir"])
        .arg(&node)
        .arg("--federation-dir")
        .arg(dir.path().join("federation"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no federation root here yet: create it with `antar pki init-federation`"),
        "{err}"
    );
}
