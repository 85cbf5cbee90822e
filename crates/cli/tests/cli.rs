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
