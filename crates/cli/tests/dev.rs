//! README command 1 as a newcomer runs it: `antar dev` as a child process,
//! then only the CLI and `federation.json`: send finance -> registry, receive
//! and ack at registry, see PROCESSED at finance, scrape the metrics, and
//! stop it cleanly with SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn antar() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_antar"));
    c.env_remove("ANTAR_FEDERATION").env_remove("ANTAR_AGENCY");
    c
}

/// Kills the federation if the test fails half-way.
struct Dev(Child);

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `antar ARGS --federation F --agency A --json` until it succeeds (the
/// nodes may still be starting) and returns its output.
fn cli(fed: &Path, agency: &str, args: &[&str]) -> Output {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = antar()
            .args(args)
            .arg("--federation")
            .arg(fed)
            .args(["--agency", agency, "--json"])
            .output()
            .unwrap();
        if out.status.success() {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "antar {args:?} kept failing: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn antar_dev_runs_the_readme_tour_and_stops_cleanly() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join(".antar-dev");
    std::fs::create_dir_all(&dir).unwrap();
    // One left by an earlier run, with ports that may be stale: gone as
    // soon as `antar dev` holds the directory, so a script that waits for
    // the file waits for this run's nodes.
    let fed = dir.join("federation.json");
    std::fs::write(&fed, "{\"left\": \"by an earlier run\"}\n").unwrap();
    // The README's command as it is (its directory, .antar-dev, relative
    // to where it runs), with the first of its default ports taken (here,
    // or by whatever holds it already): it comes up on free ports and
    // says so.
    let _taken = std::net::TcpListener::bind(("127.0.0.1", 7400));
    let stderr = work.path().join("stderr");
    let child = antar()
        .arg("dev")
        .current_dir(work.path())
        .env("ANTAR_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut dev = Dev(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stale_gone = false;
    loop {
        match std::fs::read_to_string(&fed) {
            Ok(text) if text.contains("earlier run") => {}
            Ok(_) => break,
            Err(_) => stale_gone = true,
        }
        assert!(Instant::now() < deadline, "antar dev never wrote federation.json");
        assert!(dev.0.try_wait().unwrap().is_none(), "antar dev exited early");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        stale_gone,
        "the old federation.json stayed until the new one replaced it"
    );
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(&fed).unwrap()).unwrap();
    let agencies: Vec<&str> = file["agencies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(agencies.len(), 4, "{agencies:?}");
    for a in ["finance", "health", "registry", "hub"] {
        assert!(agencies.contains(&a), "{a} missing from federation.json");
    }
    let said = std::fs::read_to_string(&stderr).unwrap();
    assert!(
        said.contains("ports 7400-7415 are taken") && said.contains("using free ports"),
        "{said}"
    );
    for a in file["agencies"].as_array().unwrap() {
        let api = a["api_addr"].as_str().unwrap();
        assert!(!api.ends_with(":7400"), "{api}");
    }

    // A second `antar dev` on the same directory stops at once, saying
    // why, and leaves the running one's files alone.
    let before = std::fs::read(&fed).unwrap();
    let second = antar()
        .args(["dev", "--base-port", "0", "--dir"])
        .arg(&dir)
        .env("ANTAR_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!second.status.success());
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(said.contains("another `antar dev` is running"), "{said}");
    assert_eq!(std::fs::read(&fed).unwrap(), before);
    // Each node.toml names its files absolutely: checked from another
    // directory, it still means this run's files.
    let elsewhere = tempfile::tempdir().unwrap();
    let checked = antar()
        .args(["node", "check-config"])
        .arg(dir.join("finance").join("node.toml"))
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&checked.stdout);
    let data = std::fs::canonicalize(&dir).unwrap().join("finance").join("data");
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(
        said.contains(&format!("data_dir = {:?}", data.display().to_string())),
        "{said}"
    );
    // Ports asked for by name are not swapped for others: a taken one fails.
    let pinned = antar()
        .args(["dev", "--base-port", "7400", "--dir"])
        .arg(elsewhere.path())
        .env("ANTAR_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!pinned.status.success());
    let said = String::from_utf8_lossy(&pinned.stderr);
    assert!(
        said.contains("cannot bind 127.0.0.1:7400-7415") && said.contains("Try --base-port 0"),
        "{said}"
    );

    let sent = cli(
        &fed,
        "finance",
        &[
            "send",
            "--to",
            "registry",
            "--service",
            "birth.lookup",
            "--data",
            "hello registry",
        ],
    );
    let id = json_lines(&sent)[0]["message_ids"][0]
        .as_str()
        .unwrap()
        .to_owned();

    let got = cli(
        &fed,
        "registry",
        &["inbox", "--ack", "--count", "1", "--wait", "20"],
    );
    let got = json_lines(&got);
    assert_eq!(got.len(), 1, "registry received {got:?}");
    assert_eq!(got[0]["id"], id.as_str());
    assert_eq!(got[0]["payload"], "hello registry");
    assert_eq!(got[0]["payload_base64"], "aGVsbG8gcmVnaXN0cnk=");
    assert_eq!(got[0]["sender_identity"], "spiffe://gov.example/agency/finance");

    let processed = |id: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let t = json_lines(&cli(&fed, "finance", &["track", id])).remove(0);
            if t["state"] == "MESSAGE_STATE_PROCESSED" {
                break t;
            }
            assert!(Instant::now() < deadline, "never PROCESSED: {t}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let track = processed(&id);
    let receipts = |track: &serde_json::Value, field: &str| -> Vec<String> {
        let list = track["receipts"].as_array().unwrap();
        list.iter()
            .map(|r| r[field].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        receipts(&track, "status"),
        [
            "RECEIPT_STATUS_ACCEPTED",
            "RECEIPT_STATUS_DELIVERED",
            "RECEIPT_STATUS_PROCESSED"
        ]
    );

    // A transaction acked `--outcome rejected`: its PROCESSED receipt says
    // so, by name.
    let sent = cli(
        &fed,
        "finance",
        &[
            "send",
            "--kind",
            "transaction",
            "--idempotency-key",
            "pay-0001",
            "--to",
            "registry",
            "--service",
            "birth.lookup",
            "--data",
            "pay",
        ],
    );
    let tx = json_lines(&sent)[0]["message_ids"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let got = cli(
        &fed,
        "registry",
        &[
            "inbox",
            "--ack",
            "--outcome",
            "rejected",
            "--count",
            "1",
            "--wait",
            "20",
        ],
    );
    assert_eq!(json_lines(&got)[0]["id"], tx.as_str());
    assert_eq!(
        receipts(&processed(&tx), "outcome"),
        ["OUTCOME_UNSPECIFIED", "OUTCOME_UNSPECIFIED", "OUTCOME_REJECTED"]
    );

    // An auditor proves the message's entries in finance's log, under a
    // checkpoint whose signature the CLI checks against the federation root.
    let proof = json_lines(&cli(&fed, "finance", &["audit", "proof", &id])).remove(0);
    assert_eq!(proof["checkpoint_signature_verified"], true, "{proof}");
    assert_eq!(proof["entry_signatures_verified"], true, "{proof}");
    let entries = proof["entries"].as_array().unwrap();
    assert!(entries.len() >= 4, "the envelope and its receipts: {proof}");
    assert!(entries.iter().all(|e| e["message_id"] == id.as_str()), "{proof}");

    // SIGTERM: a clean stop, exit 0.
    let pid = dev.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = dev.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "antar dev did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "antar dev exited with {status}");
    let mut printed = String::new();
    std::io::Read::read_to_string(dev.0.stdout.as_mut().unwrap(), &mut printed).unwrap();
    assert!(
        printed.contains("antar send"),
        "antar dev should print what to try next:\n{printed}"
    );
}
