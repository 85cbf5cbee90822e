//! The node's configuration: one typed struct, read from TOML, with
//! `ANTAR_*` environment overrides and defaults that work.
//!
//! Unknown keys are an error that names the key (and its line, or the
//! `ANTAR_*` variable that set it); problems with values are reported at
//! once, each with the key it concerns.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use antar_core::{AgencyId, ServiceName};

/// A configuration that could not be used; the message lists every problem.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    /// One line per problem, each naming its key.
    pub problems: Vec<String>,
}

/// Everything a node needs to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Name of the federation (the SPIFFE trust domain), e.g. `gov.example`.
    pub federation: String,
    /// This node's agency id, e.g. `finance`.
    pub agency: String,
    /// Directory of the sled store. Relative paths are relative to the config file.
    pub data_dir: PathBuf,
    /// Listen addresses.
    #[serde(default)]
    pub listen: Listen,
    /// Certificates and keys.
    pub tls: Tls,
    /// Nodes this node transfers to and accepts transfers from.
    #[serde(default)]
    pub peers: Vec<Peer>,
    /// Static routes: recipient agency -> peer agency that is the next hop.
    #[serde(default)]
    pub routes: BTreeMap<String, String>,
    /// Next hop for agencies with no route and no direct peering (a hub).
    #[serde(default)]
    pub default_route: Option<String>,
    /// The federation's agencies that apps of this node may address. When
    /// set, a `Send` to an agency outside it is `NOT_FOUND` and stores
    /// nothing; when empty, any agency a peer, route or default route
    /// reaches is accepted (and one nobody knows comes back `REJECTED`).
    #[serde(default)]
    pub directory: Vec<String>,
    /// Agency systems and the services each owns (`*`: every service).
    #[serde(default = "default_apps")]
    pub apps: Vec<App>,
    /// Which sender agencies may send to which service.
    #[serde(default = "default_access")]
    pub access: Vec<Access>,
    /// Limits and timings.
    #[serde(default)]
    pub limits: Limits,
    /// How envelopes are signed.
    #[serde(default)]
    pub envelopes: Envelopes,
    /// How receipts are signed.
    #[serde(default)]
    pub receipts: Receipts,
    /// Logging.
    #[serde(default)]
    pub log: Log,
}

/// Listen addresses.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// The API listener (agency systems; Agency, Admin, health, reflection). Default `127.0.0.1:7443`.
    #[serde(default = "default_api")]
    pub api: SocketAddr,
    /// The peer listener (other nodes; Peer, health, reflection). Default `0.0.0.0:7444`.
    #[serde(default = "default_peer")]
    pub peer: SocketAddr,
    /// An extra listener for administrators, same services as `api`. Default: none.
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    /// Prometheus `/metrics` over plain HTTP. Default: none.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            api: default_api(),
            peer: default_peer(),
            admin: None,
            metrics: None,
        }
    }
}

/// Certificate and key paths (PEM). Relative paths are relative to the config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// The federation root CA certificate: the only trust root of the peer listener.
    pub federation_root: PathBuf,
    /// This node's TLS certificate (from the federation root).
    pub node_cert: PathBuf,
    /// Its private key.
    pub node_key: PathBuf,
    /// This node's Ed25519 signing certificate (from the federation root).
    pub signing_cert: PathBuf,
    /// Its private key.
    pub signing_key: PathBuf,
    /// The agency-local CA: the only trust root of the API listener.
    pub local_ca: PathBuf,
    /// The API listener's server certificate (from the local CA).
    pub api_cert: PathBuf,
    /// Its private key.
    pub api_key: PathBuf,
    /// Federation-signed CRL (PEM); reloaded on `antar admin reload` and SIGHUP.
    #[serde(default)]
    pub revocation_list: Option<PathBuf>,
    /// CRL (PEM) of the app, admin and auditor certificates the
    /// agency-local CA revoked (`antar pki revoke --node-dir`): the API
    /// listener refuses them at the handshake. Reloaded like
    /// `revocation_list`.
    #[serde(default)]
    pub local_revocation_list: Option<PathBuf>,
}

/// A peer node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// The peer's agency id; its certificate must carry this identity.
    pub agency: String,
    /// Its peer listener, `host:port`.
    pub addr: String,
}

/// An agency system of this node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct App {
    /// The name in its certificate, `…/app/<name>`.
    pub name: String,
    /// Services whose inbox it receives; `*` for all.
    pub services: Vec<String>,
}

/// An access right: these sender agencies may send to this service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Access {
    /// A service of this agency, or `*`.
    pub service: String,
    /// Sender agency ids, or `*`.
    pub allow: Vec<String>,
}

/// Least `limits.keepalive_interval_ms` and `limits.keepalive_timeout_ms`.
pub const MIN_KEEPALIVE_MS: u64 = 100;
/// Most of either: one day. The kernel refuses a TCP user timeout past
/// `i32::MAX` ms (~24.8 days), and a longer keepalive is no keepalive.
pub const MAX_KEEPALIVE_MS: u64 = 86_400_000;

/// The default `limits.max_payload_bytes`: 4 MiB, the most a stock gRPC
/// client (Go, Java, Python, C++, tonic) receives in one message, less 64
/// KiB for the rest of a `Delivery` — the envelope with its headers (at
/// most [`MAX_HEADERS`], [`MAX_HEADER_BYTES`] in all), content type (256
/// bytes), ids and names, batch proof, salt, signature and signer
/// certificate: under 40 KiB at worst.
pub const DEFAULT_MAX_PAYLOAD_BYTES: u64 = (4 << 20) - (64 << 10);

/// Most bytes a send's headers may hold in all, names and values.
pub const MAX_HEADER_BYTES: usize = 32 << 10;

/// Most headers a send may carry: each costs a few bytes more on the wire
/// than its name and value.
pub const MAX_HEADERS: usize = 64;

/// Limits and timings; every one has a default that works.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest payload an app may send, bytes. Default 4 MiB less 64 KiB
    /// ([`DEFAULT_MAX_PAYLOAD_BYTES`]), so the `Delivery` of the largest
    /// payload fits the 4 MiB a stock gRPC client receives.
    pub max_payload_bytes: u64,
    /// TTL of a message whose sender set none, seconds. Default 86400 (one day).
    pub default_ttl_secs: u64,
    /// Longest TTL an app may ask for, seconds. Default 30 days.
    pub max_ttl_secs: u64,
    /// Most nodes an envelope may pass through. Default 8.
    pub max_hops: u32,
    /// Queued bytes (outboxes + inboxes) past which `Send` answers RESOURCE_EXHAUSTED. Default 1 GiB.
    pub max_queued_bytes: u64,
    /// How long a delivery stays leased to a receiver before it is redelivered, ms. Default 30000.
    pub visibility_timeout_ms: u64,
    /// Unacked deliveries per `Receive` stream when the app asks for 0. Default 64.
    pub max_in_flight: u32,
    /// `Receive` streams one app (every certificate of its name) may hold
    /// open at once, all its connections together; one more is
    /// `RESOURCE_EXHAUSTED`. Default 64.
    pub max_receive_streams_per_app: u32,
    /// `WatchReceipts` streams one app (every certificate of its name) may
    /// hold open at once, all its connections together; one more is
    /// `RESOURCE_EXHAUSTED`. Default 64.
    pub max_watch_streams_per_app: u32,
    /// Most items in one transfer batch. Default 256.
    pub batch_size: usize,
    /// Batches a forwarder keeps in flight before it waits for acks. Default 4.
    pub transfer_window: usize,
    /// Longest a forwarder waits for the custody ack of a batch before it
    /// drops the stream as stalled and retries, ms. Default 30000.
    pub transfer_ack_timeout_ms: u64,
    /// First retry delay of a forwarder after a failure, ms. Default 200.
    pub retry_initial_ms: u64,
    /// Longest retry delay, ms. Default 30000.
    pub retry_max_ms: u64,
    /// sled page cache, bytes. Default 64 MiB.
    pub cache_bytes: u64,
    /// Size past which a write-ahead journal segment is retired and sled
    /// checkpointed, bytes. Default 32 MiB; 64 KiB to 1 GiB.
    pub journal_segment_bytes: u64,
    /// How often the expiry sweeper runs, ms. Default 1000.
    pub sweep_interval_ms: u64,
    /// Longest a TLS handshake may take before the connection is dropped, ms. Default 10000.
    pub handshake_timeout_ms: u64,
    /// How long an HTTP/2 connection to the api, admin or peer listener
    /// may go without sending a request's data (or answering a PING)
    /// before the node sends it a PING, ms: a healthy idle connection
    /// answers one every interval. Also the PING interval of the
    /// connections this node opens to its peers, while a call is open.
    /// Default 60000; 100 to 86400000.
    pub keepalive_interval_ms: u64,
    /// How long the node waits for the answer to that PING before it
    /// closes the connection, freeing its slot of `max_connections`, ms;
    /// also the `TCP_USER_TIMEOUT` of those connections (at least 5 s).
    /// Default 20000; 100 to 86400000.
    pub keepalive_timeout_ms: u64,
    /// Connections each listener holds open at once (handshakes included). Default 1024.
    pub max_connections: u32,
    /// Connections one remote IP address may hold open on each listener; 0: no limit. Default 256.
    pub max_connections_per_ip: u32,
    /// Envelopes one app may send per second (burst: one second's worth); 0: unlimited.
    pub app_sends_per_sec: u64,
    /// Calls one app may make per second that are not sends (`Receive`,
    /// `Ack`, `AckBatch`, `Reply`, `Track`, `WatchReceipts`; burst: one
    /// second's worth); an ack or reply that settles a message gives its
    /// token back, an `AckBatch` pays for each of its acks; 0: unlimited.
    pub app_calls_per_sec: u64,
    /// Items one peer may transfer per second (burst: one second's worth); 0: unlimited.
    pub peer_items_per_sec: u64,
    /// Seconds between signed checkpoints of the Merkle log (when it grew).
    pub checkpoint_interval_secs: u64,
    /// Seconds after which the payload of a finished message (processed,
    /// rejected or expired) is deleted; 0 keeps payloads forever.
    pub payload_retention_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            default_ttl_secs: 86_400,
            max_ttl_secs: 30 * 86_400,
            max_hops: 8,
            max_queued_bytes: 1 << 30,
            visibility_timeout_ms: 30_000,
            max_in_flight: 64,
            max_receive_streams_per_app: 64,
            max_watch_streams_per_app: 64,
            batch_size: 256,
            transfer_window: 4,
            transfer_ack_timeout_ms: 30_000,
            retry_initial_ms: 200,
            retry_max_ms: 30_000,
            cache_bytes: 64 << 20,
            journal_segment_bytes: antar_store::DEFAULT_JOURNAL_SEGMENT_BYTES,
            sweep_interval_ms: 1_000,
            handshake_timeout_ms: 10_000,
            keepalive_interval_ms: 60_000,
            keepalive_timeout_ms: 20_000,
            max_connections: 1024,
            max_connections_per_ip: 256,
            app_sends_per_sec: 10_000,
            app_calls_per_sec: 10_000,
            peer_items_per_sec: 50_000,
            checkpoint_interval_secs: 60,
            payload_retention_secs: 0,
        }
    }
}

/// How this node signs the envelopes it sends.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Envelopes {
    /// Sign the envelopes of the `Send`s, `Call`s and `Reply`s being served
    /// at the same moment (a `SendBatch`, concurrent unary calls) with one
    /// Ed25519 signature over the Merkle root of their bytes; each envelope
    /// then carries the signed batch header and its inclusion proof
    /// (`SignedEnvelope.batch`). Saves a signature per envelope here and a
    /// verification per envelope at every node it passes. Every Antar node
    /// since the version that introduced it verifies both forms; apps and
    /// auditors that check envelope signatures themselves must handle
    /// batches (docs/auditing.md). Default false: each envelope carries its
    /// own signature.
    pub batch_signatures: bool,
}

/// How this node signs the receipts it issues.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Receipts {
    /// Sign the receipts issued together — the DELIVERED and REJECTED
    /// receipts of one incoming transfer batch, the ACCEPTED and PROCESSED
    /// receipts of the `Send`s and `Ack`s being served at the same moment —
    /// with one Ed25519 signature over the Merkle root of their bytes; each receipt then carries the
    /// signed batch header and its inclusion proof (`SignedReceipt.batch`).
    /// Saves a signature per receipt here and a verification per receipt
    /// at the sender. Every Antar node verifies both forms; an auditor's own
    /// tools must handle batches (docs/auditing.md). Default false: each
    /// receipt carries its own signature.
    pub batch_signatures: bool,
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// `pretty` or `json`. Default `pretty`.
    pub format: String,
    /// A tracing filter, e.g. `info,antar_node=debug`. Default `info`.
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            format: "pretty".into(),
            level: "info".into(),
        }
    }
}

fn default_api() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7443))
}
fn default_peer() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7444))
}
fn default_apps() -> Vec<App> {
    Vec::new()
}
fn default_access() -> Vec<Access> {
    Vec::new()
}

impl NodeConfig {
    /// Reads `path`, applies `ANTAR_*` overrides from `env`, resolves relative
    /// paths against the file's directory, and validates.
    ///
    /// # Errors
    /// [`ConfigError`] listing every problem, each naming its key.
    pub fn load(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            problems: vec![format!("{}: cannot read: {e}", path.display())],
        })?;
        let in_file = |e: toml::de::Error| ConfigError {
            problems: vec![format!("{}: {e}", path.display())],
        };
        let file: toml::Table = toml::from_str(&text).map_err(in_file)?;
        let overrides = env_overrides(env);
        let mut table = file.clone();
        for o in &overrides {
            o.apply(&mut table)?;
        }
        let mut config: NodeConfig = match table.try_into() {
            Ok(c) => c,
            Err(merged) => return Err(blame(path, &text, &file, &overrides, &merged, in_file)),
        };
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text (no env, paths as given) and validates.
    ///
    /// # Errors
    /// [`ConfigError`] listing every problem.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: NodeConfig = toml::from_str(text).map_err(|e| ConfigError {
            problems: vec![e.to_string()],
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        let t = &mut self.tls;
        for p in [
            &mut t.federation_root,
            &mut t.node_cert,
            &mut t.node_key,
            &mut t.signing_cert,
            &mut t.signing_key,
            &mut t.local_ca,
            &mut t.api_cert,
            &mut t.api_key,
        ] {
            fix(p);
        }
        for p in [&mut t.revocation_list, &mut t.local_revocation_list]
            .into_iter()
            .flatten()
        {
            fix(p);
        }
    }

    /// Checks every value; collects all problems before failing.
    ///
    /// # Errors
    /// [`ConfigError`] listing every problem, each naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut agency = |key: &str, v: &str| {
            if let Err(e) = AgencyId::parse(v) {
                problems.push(format!("{key}: {e}"));
            }
        };
        agency("agency", &self.agency);
        for (i, p) in self.peers.iter().enumerate() {
            agency(&format!("peers[{i}].agency"), &p.agency);
        }
        for (dest, hop) in &self.routes {
            agency(&format!("routes.{dest} (key)"), dest);
            agency(&format!("routes.{dest}"), hop);
        }
        if let Some(d) = &self.default_route {
            agency("default_route", d);
        }
        for (i, d) in self.directory.iter().enumerate() {
            agency(&format!("directory[{i}]"), d);
        }
        if self.federation.is_empty() {
            problems.push("federation: must not be empty".into());
        }
        let peers: Vec<&str> = self.peers.iter().map(|p| p.agency.as_str()).collect();
        for (i, p) in self.peers.iter().enumerate() {
            if p.addr
                .rsplit_once(':')
                .and_then(|(_, port)| port.parse::<u16>().ok())
                .is_none()
            {
                problems.push(format!("peers[{i}].addr: {:?} is not host:port", p.addr));
            }
            if p.agency == self.agency {
                problems.push(format!("peers[{i}].agency: a node cannot peer with itself"));
            }
        }
        for (dest, hop) in &self.routes {
            if !peers.contains(&hop.as_str()) {
                problems.push(format!("routes.{dest}: next hop {hop:?} is not in [[peers]]"));
            }
        }
        if let Some(d) = &self.default_route {
            if !peers.contains(&d.as_str()) {
                problems.push(format!("default_route: {d:?} is not in [[peers]]"));
            }
        }
        for (i, app) in self.apps.iter().enumerate() {
            for s in &app.services {
                if s != "*" {
                    if let Err(e) = ServiceName::parse(s) {
                        problems.push(format!("apps[{i}].services: {e}"));
                    }
                }
            }
        }
        for (i, a) in self.access.iter().enumerate() {
            if a.service != "*" {
                if let Err(e) = ServiceName::parse(&a.service) {
                    problems.push(format!("access[{i}].service: {e}"));
                }
            }
            for s in &a.allow {
                if s != "*" {
                    if let Err(e) = AgencyId::parse(s) {
                        problems.push(format!("access[{i}].allow: {e}"));
                    }
                }
            }
        }
        let l = &self.limits;
        if l.max_hops == 0 {
            problems.push("limits.max_hops: must be at least 1".into());
        }
        if l.batch_size == 0 {
            problems.push("limits.batch_size: must be at least 1".into());
        }
        if l.transfer_window == 0 {
            problems.push("limits.transfer_window: must be at least 1".into());
        }
        for (key, v) in [
            ("limits.max_in_flight", u64::from(l.max_in_flight)),
            (
                "limits.max_receive_streams_per_app",
                u64::from(l.max_receive_streams_per_app),
            ),
            (
                "limits.max_watch_streams_per_app",
                u64::from(l.max_watch_streams_per_app),
            ),
            ("limits.visibility_timeout_ms", l.visibility_timeout_ms),
            ("limits.retry_initial_ms", l.retry_initial_ms),
            ("limits.sweep_interval_ms", l.sweep_interval_ms),
            ("limits.handshake_timeout_ms", l.handshake_timeout_ms),
            ("limits.transfer_ack_timeout_ms", l.transfer_ack_timeout_ms),
            ("limits.max_connections", u64::from(l.max_connections)),
            ("limits.checkpoint_interval_secs", l.checkpoint_interval_secs),
            ("limits.max_payload_bytes", l.max_payload_bytes),
        ] {
            if v == 0 {
                problems.push(format!("{key}: must be at least 1"));
            }
        }
        // Shorter PINGs than this would be a storm on every idle
        // connection, or close peers whose round trip is longer.
        for (key, v) in [
            ("limits.keepalive_interval_ms", l.keepalive_interval_ms),
            ("limits.keepalive_timeout_ms", l.keepalive_timeout_ms),
        ] {
            if v < MIN_KEEPALIVE_MS {
                problems.push(format!("{key}: must be at least {MIN_KEEPALIVE_MS} (ms)"));
            } else if v > MAX_KEEPALIVE_MS {
                problems.push(format!("{key}: must be at most {MAX_KEEPALIVE_MS} (ms, one day)"));
            }
        }
        let segment = antar_store::MIN_JOURNAL_SEGMENT_BYTES..=antar_store::MAX_JOURNAL_SEGMENT_BYTES;
        if !segment.contains(&l.journal_segment_bytes) {
            problems.push(format!(
                "limits.journal_segment_bytes: must be between {} (64 KiB) and {} (1 GiB)",
                segment.start(),
                segment.end()
            ));
        }
        if l.retry_max_ms < l.retry_initial_ms {
            problems.push("limits.retry_max_ms: must be at least limits.retry_initial_ms".into());
        }
        if l.default_ttl_secs == 0 || l.default_ttl_secs > l.max_ttl_secs {
            problems.push("limits.default_ttl_secs: must be between 1 and limits.max_ttl_secs".into());
        }
        if !matches!(self.log.format.as_str(), "pretty" | "json") {
            problems.push(format!(
                "log.format: {:?} is not \"pretty\" or \"json\"",
                self.log.format
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }

    /// The visibility timeout as a duration.
    pub fn visibility_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.visibility_timeout_ms)
    }
}

/// Applies `ANTAR_<SECTION>__<KEY>=value` (double underscore between levels,
/// e.g. `ANTAR_LIMITS__MAX_HOPS=4`, `ANTAR_DATA_DIR=/var/lib/antar`).
/// Values parse as TOML when they can (numbers, booleans), else as strings.
/// Where the problem `merged` (of the file with every override) lies: in
/// the file, when the file alone has the same problem (its error has the
/// line); else in the override without which the config reads, or reads
/// with another problem; else in the two together.
fn blame(
    path: &Path,
    text: &str,
    file: &toml::Table,
    overrides: &[Override],
    merged: &toml::de::Error,
    in_file: impl Fn(toml::de::Error) -> ConfigError,
) -> ConfigError {
    if let Err(e) = toml::from_str::<NodeConfig>(text) {
        if e.message() == merged.message() {
            return in_file(e);
        }
    }
    // Without override `i`: Ok, or the error.
    let without = |i: usize| {
        let mut t = file.clone();
        for (j, other) in overrides.iter().enumerate() {
            if j != i && other.apply(&mut t).is_err() {
                return Err(None);
            }
        }
        t.try_into::<NodeConfig>().map(drop).map_err(Some)
    };
    let culprit = (0..overrides.len()).find(|&i| without(i).is_ok()).or_else(|| {
        (0..overrides.len()).find(|&i| matches!(without(i), Err(Some(e)) if e.message() != merged.message()))
    });
    if let Some(o) = culprit.map(|i| &overrides[i]) {
        return ConfigError {
            problems: vec![format!("{}={:?} (environment): {merged}", o.name, o.raw)],
        };
    }
    ConfigError {
        problems: vec![format!(
            "{} with the ANTAR_* environment overrides: {merged}",
            path.display()
        )],
    }
}

/// One `ANTAR_<SECTION>__<KEY>=value` environment override.
struct Override {
    /// The variable's name.
    name: String,
    /// Its value as given.
    raw: String,
    /// The key it sets, lowercased, section first.
    path: Vec<String>,
    /// The value as TOML (a string unless it parses as a TOML value).
    value: toml::Value,
}

impl Override {
    fn apply(&self, table: &mut toml::Table) -> Result<(), ConfigError> {
        set_path(table, &self.path, self.value.clone()).map_err(|p| ConfigError {
            problems: vec![format!("{}: {p} is not a table", self.name)],
        })
    }
}

/// The config overrides among `env`: `ANTAR_` variables but those the CLI
/// reads for itself.
fn env_overrides(env: impl IntoIterator<Item = (String, String)>) -> Vec<Override> {
    let mut overrides = Vec::new();
    for (k, v) in env {
        let Some(rest) = k.strip_prefix("ANTAR_") else {
            continue;
        };
        // Variables the CLI reads for its own connections are not config keys.
        if matches!(
            rest,
            "CONFIG"
                | "LOG"
                | "FEDERATION"
                | "FEDERATION_NAME"
                | "AGENCY"
                | "ADDR"
                | "CA"
                | "CERT"
                | "KEY"
                | "BIN"
                | "JSON"
        ) {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        // Without a section only the top-level scalars are config keys; other
        // ANTAR_* names (Kubernetes service links, ANTAR_FOO_SERVICE_HOST) are
        // not ours.
        if let [key] = path.as_slice() {
            if !matches!(key.as_str(), "data_dir" | "default_route") {
                continue;
            }
        }
        let value = toml::from_str::<toml::Table>(&format!("v = {v}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(v.clone()));
        overrides.push(Override {
            name: k,
            raw: v,
            path,
            value,
        });
    }
    overrides
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    match path {
        [] => Ok(()),
        [last] => {
            table.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => match table
            .entry(first.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            toml::Value::Table(t) => set_path(t, rest, value),
            _ => Err(first.clone()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
federation = "gov.example"
agency = "finance"
data_dir = "data"
[tls]
federation_root = "root.pem"
node_cert = "node.pem"
node_key = "node.key"
signing_cert = "sign.pem"
signing_key = "sign.key"
local_ca = "local-ca.pem"
api_cert = "api.pem"
api_key = "api.key"
"#;

    #[test]
    fn minimal_config_takes_defaults() {
        let c = NodeConfig::from_toml(MINIMAL).unwrap();
        assert_eq!(c.limits.max_hops, 8);
        assert_eq!(c.limits.journal_segment_bytes, 32 << 20);
        assert_eq!(c.listen.api, default_api());
    }

    #[test]
    fn a_journal_segment_outside_64_kib_to_1_gib_is_refused() {
        let with = |bytes: u64| {
            NodeConfig::from_toml(&format!("{MINIMAL}\n[limits]\njournal_segment_bytes = {bytes}\n"))
        };
        assert_eq!(with(65_536).unwrap().limits.journal_segment_bytes, 65_536);
        assert_eq!(with(1 << 30).unwrap().limits.journal_segment_bytes, 1 << 30);
        for bad in [65_535, (1 << 30) + 1] {
            let msg = with(bad).unwrap_err().to_string();
            assert!(
                msg.contains(
                    "limits.journal_segment_bytes: must be between 65536 (64 KiB) and 1073741824 (1 GiB)"
                ),
                "{bad}: {msg}"
            );
        }
    }

    #[test]
    fn keepalive_under_100_ms_or_over_a_day_is_refused() {
        let with =
            |key: &str, ms: u64| NodeConfig::from_toml(&format!("{MINIMAL}\n[limits]\n{key} = {ms}\n"));
        for key in ["keepalive_interval_ms", "keepalive_timeout_ms"] {
            assert!(with(key, 100).is_ok(), "{key} = 100");
            assert!(with(key, 86_400_000).is_ok(), "{key}: a day");
            let msg = with(key, 99).unwrap_err().to_string();
            assert!(
                msg.contains(&format!("limits.{key}: must be at least 100 (ms)")),
                "{msg}"
            );
            let msg = with(key, 86_400_001).unwrap_err().to_string();
            assert!(
                msg.contains(&format!("limits.{key}: must be at most 86400000 (ms, one day)")),
                "{msg}"
            );
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let err = NodeConfig::from_toml(&format!("{MINIMAL}\n[limits]\nmax_hopz = 3\n")).unwrap_err();
        assert!(err.to_string().contains("max_hopz"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = "default_route = \"hub\"\n".to_owned()
            + &MINIMAL.replace("agency = \"finance\"", "agency = \"Finance\"")
            + "[[peers]]\nagency = \"health\"\naddr = \"nope\"\n";
        let err = NodeConfig::from_toml(&text).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("agency: invalid agency id \"Finance\""), "{msg}");
        assert!(msg.contains("peers[0].addr"), "{msg}");
        assert!(
            msg.contains("default_route: \"hub\" is not in [[peers]]"),
            "{msg}"
        );
    }

    #[test]
    fn env_overrides_and_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        let env = vec![
            ("ANTAR_LIMITS__MAX_HOPS".to_owned(), "3".to_owned()),
            ("ANTAR_AGENCY".to_owned(), "ignored-by-config".to_owned()),
            ("ANTAR_LISTEN__API".to_owned(), "127.0.0.1:9000".to_owned()),
            ("HOME".to_owned(), "/root".to_owned()),
            (
                "ANTAR_FINANCE_PEER_SERVICE_HOST".to_owned(),
                "10.0.0.1".to_owned(),
            ),
        ];
        let c = NodeConfig::load(&path, env).unwrap();
        assert_eq!(c.limits.max_hops, 3);
        assert_eq!(c.agency, "finance");
        assert_eq!(c.listen.api.port(), 9000);
        assert_eq!(c.data_dir, dir.path().join("data"));
        assert_eq!(c.tls.api_key, dir.path().join("api.key"));
    }

    /// A mistake in an override is blamed on the variable, with its value;
    /// one in the file on the file, with its line.
    #[test]
    fn a_bad_override_is_named_not_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        let var = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        let err = NodeConfig::load(&path, var("ANTAR_LIMITS__MAX_HOPZ", "3")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("ANTAR_LIMITS__MAX_HOPZ=\"3\" (environment): unknown field `max_hopz`"),
            "{msg}"
        );
        let err = NodeConfig::load(&path, var("ANTAR_LISTEN__API", "localhost:7443")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("ANTAR_LISTEN__API=\"localhost:7443\" (environment): "),
            "{msg}"
        );
        // The file leaves out what the environment gives: still the override.
        std::fs::write(&path, MINIMAL.replace("data_dir = \"data\"\n", "")).unwrap();
        let env = vec![
            ("ANTAR_DATA_DIR".to_owned(), "/var/lib/antar".to_owned()),
            ("ANTAR_LIMITS__MAX_HOPS".to_owned(), "abc".to_owned()),
        ];
        let msg = NodeConfig::load(&path, env).unwrap_err().to_string();
        assert!(
            msg.starts_with("ANTAR_LIMITS__MAX_HOPS=\"abc\" (environment): "),
            "{msg}"
        );
        std::fs::write(&path, format!("{MINIMAL}\n[limits]\nmax_hopz = 3\n")).unwrap();
        let err = NodeConfig::load(&path, var("ANTAR_LIMITS__MAX_HOPS", "3")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("node.toml: TOML parse error at line") && msg.contains("unknown field `max_hopz`"),
            "{msg}"
        );
    }
}
