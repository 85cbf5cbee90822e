//! docs/configuration.md cannot drift from the config struct: every key the
//! node reads has exactly one row, no row names a key it does not read, and
//! every documented default of `[limits]` and `[log]` is the code's default.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use antar_node::dev::{standard_topology, DevLayout};
use antar_node::NodeConfig;

/// Dotted keys of a serialized config; arrays of tables as `peers.agency`,
/// maps (`routes`) as one key.
fn keys(table: &toml::Table, prefix: &str, out: &mut BTreeSet<String>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) if key != "routes" => keys(t, &key, out),
            toml::Value::Array(a) if a.first().is_some_and(toml::Value::is_table) => {
                for t in a {
                    keys(t.as_table().unwrap(), &key, out);
                }
            }
            _ => {
                out.insert(key);
            }
        }
    }
}

/// A config with every optional field set, so every key serializes.
fn full_config() -> NodeConfig {
    let layout = DevLayout::new("/tmp/antar-doc-check");
    let finance = standard_topology()
        .into_iter()
        .find(|s| s.id == "finance")
        .unwrap();
    let mut c = layout.node_config(&finance, &BTreeMap::new());
    c.routes.insert("registry".into(), "hub".into());
    c.tls.revocation_list = Some("crl.pem".into());
    c.tls.local_revocation_list = Some("local-crl.pem".into());
    c.directory = vec!["finance".into()];
    c
}

/// First-cell key -> default cell of every table row in the document.
fn documented() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/configuration.md"
    ))
    .unwrap();
    doc.lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let key = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((key.to_owned(), cells.get(3).copied().unwrap_or("").to_owned()))
        })
        .collect()
}

#[test]
fn every_config_key_is_documented_once_and_nothing_else() {
    let mut code = BTreeSet::new();
    keys(&toml::from_str(&full_config().to_toml()).unwrap(), "", &mut code);
    let rows = documented();
    let mut seen = BTreeSet::new();
    for (k, _) in &rows {
        assert!(
            seen.insert(k.clone()),
            "docs/configuration.md documents `{k}` twice"
        );
    }
    let missing: Vec<_> = code.difference(&seen).collect();
    let unknown: Vec<_> = seen.difference(&code).collect();
    assert!(
        missing.is_empty(),
        "keys the node reads but docs/configuration.md omits: {missing:?}"
    );
    assert!(
        unknown.is_empty(),
        "docs/configuration.md documents keys the node does not read: {unknown:?}"
    );
}

#[test]
fn documented_defaults_are_the_code_defaults() {
    let defaults: toml::Table = toml::from_str(&full_config().to_toml()).unwrap();
    let rows: BTreeMap<String, String> = documented().into_iter().collect();
    for section in ["limits", "log"] {
        for (k, v) in defaults[section].as_table().unwrap() {
            let key = format!("{section}.{k}");
            let doc = rows[&key].replace(['`', '_', ',', '"'], "");
            let code = v.to_string().replace('"', "");
            assert!(
                doc.split_whitespace().next() == Some(code.as_str()),
                "`{key}`: documented default {:?}, code default {code}",
                rows[&key]
            );
        }
    }
}
