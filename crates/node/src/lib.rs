//! The Antar node: configuration, the two TLS listeners, the Agency, Peer
//! and Admin services, one forwarder per peer, the expiry sweeper and
//! metrics. [`run`] takes bound listeners and a shutdown future, so tests
//! bind `127.0.0.1:0` and stop nodes cleanly.

#![warn(missing_docs)]

mod admin;
mod agency;
mod audit;
mod auth;
pub mod config;
pub mod dev;
mod error;
mod forward;
mod metrics;
mod net;
mod peer;
mod rate;
mod sent;
mod state;
mod trace;
mod witness;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::Status;

use antar_core::wire::admin_server::AdminServer;
use antar_core::wire::agency_server::AgencyServer;
use antar_core::wire::audit_server::AuditServer;
use antar_core::wire::peer_server::PeerServer;
use antar_core::wire::ReloadResponse;
use antar_core::{AgencyId, Identity, Revocations, Signer, TrustAnchor, Verifier};
use antar_store::{Store, StoreConfig};

pub use config::{ConfigError, NodeConfig};
pub use error::NodeError;

/// Why a node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A certificate or key could not be loaded.
    #[error("{0}")]
    Pki(String),
    /// The store could not be opened or failed.
    #[error(transparent)]
    Store(#[from] antar_store::StoreError),
    /// A listener failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The IO error.
        source: std::io::Error,
    },
}

/// The node's listeners, bound before [`run`] so a caller can choose port 0.
#[derive(Debug)]
pub struct Listeners {
    /// Agency systems, administrators, auditors.
    pub api: TcpListener,
    /// Other nodes.
    pub peer: TcpListener,
    /// An extra API listener for administrators.
    pub admin: Option<TcpListener>,
    /// Prometheus metrics.
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses in `config.listen`.
    ///
    /// # Errors
    /// [`RunError::Io`] naming the address that could not be bound.
    pub async fn bind(config: &NodeConfig) -> Result<Self, RunError> {
        async fn one(what: &str, addr: SocketAddr) -> Result<TcpListener, RunError> {
            TcpListener::bind(addr).await.map_err(|source| RunError::Io {
                what: format!("cannot bind {what} listener {addr}"),
                source,
            })
        }
        let l = &config.listen;
        Ok(Self {
            api: one("listen.api", l.api).await?,
            peer: one("listen.peer", l.peer).await?,
            admin: match l.admin {
                Some(a) => Some(one("listen.admin", a).await?),
                None => None,
            },
            metrics: match l.metrics {
                Some(a) => Some(one("listen.metrics", a).await?),
                None => None,
            },
        })
    }
}

/// The error and its chain of sources on one line ("cannot read x: No such file").
fn pki_err(e: impl std::fmt::Display) -> RunError {
    RunError::Pki(e.to_string())
}

/// HTTP/2 limits for every listener: tonic leaves them unset, which also
/// switches off hyper's own defaults. Concurrent streams per connection
/// are bounded (each may hold a decode buffer before any rate check), a
/// connection that keeps making the node reset streams is closed
/// (RUSTSEC-2024-0003's guard), and keepalive pings find dead peers and
/// clients (`limits.keepalive_interval_ms`, `limits.keepalive_timeout_ms`)
/// so their connections stop holding a slot of `limits.max_connections`.
fn http2_limits(server: Server, limits: &config::Limits) -> Server {
    server
        .max_concurrent_streams(1024)
        .http2_max_local_error_reset_streams(Some(1024))
        .http2_keepalive_interval(Some(Duration::from_millis(limits.keepalive_interval_ms)))
        .http2_keepalive_timeout(Some(Duration::from_millis(limits.keepalive_timeout_ms)))
}

/// A certificate or key file named by `tls.<key>` that could not be read:
/// the error names the key as well as the file.
fn tls_file(key: &'static str) -> impl Fn(antar_pki::PkiError) -> RunError {
    move |e| pki_err(format!("tls.{key}: {}", chain(&e)))
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    with_causes(e.to_string(), e.source())
}

/// A gRPC status as an operator reads it: its code and message, then the
/// causes under it — for a failed dial, the TCP or TLS error that tonic's
/// "transport error" alone does not name.
pub(crate) fn status_chain(s: &tonic::Status) -> String {
    with_causes(
        format!("{}: {}", s.code(), s.message()),
        std::error::Error::source(s),
    )
}

/// `s`, then each cause's text — but one that only repeats the part
/// before it (tonic's "transport error" under a status saying the same).
fn with_causes(mut s: String, mut cause: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(c) = cause {
        let text = c.to_string();
        if s != text && !s.ends_with(&format!(": {text}")) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s
}

fn load_revocations(
    config: &NodeConfig,
    anchor: &TrustAnchor,
) -> Result<(Revocations, Vec<Vec<u8>>), RunError> {
    match &config.tls.revocation_list {
        None => Ok((Revocations::none(), Vec::new())),
        Some(path) => {
            let der = antar_pki::read_crl_der(path).map_err(|e| {
                pki_err(format!(
                    "tls.revocation_list: {} (`antar pki revoke --federation-dir DIR` publishes the federation's list, an empty one with no --cert or --serial; or leave the key out)",
                    chain(&e)
                ))
            })?;
            let r = Revocations::from_crl_der(anchor, &der)
                .map_err(|e| pki_err(format!("tls.revocation_list {}: {e}", path.display())))?;
            Ok((r, vec![der]))
        }
    }
}

/// Runs a node until `shutdown` completes, then stops accepting, drains
/// in-flight transfers and flushes the store.
///
/// `config_path` is re-read by Admin `Reload` (and SIGHUP in the CLI).
///
/// # Errors
/// [`RunError`] when the node cannot start (bad certificates, store) or a listener fails.
pub async fn run(
    config: NodeConfig,
    config_path: Option<PathBuf>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let node = Node::start(config, config_path, listeners).await?;
    shutdown.await;
    node.stop().await
}

/// A running node.
pub struct Node {
    shared: Arc<state::Shared>,
    token: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    servers: Vec<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
    reload: Reload,
}

/// Re-reads the config file (Admin `Reload`, SIGHUP): see [`Node::reload`].
pub(crate) type Reload = Arc<dyn Fn() -> Result<ReloadResponse, NodeError> + Send + Sync>;

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("agency", &self.shared.agency)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Loads certificates, opens the store and starts every listener and task.
    ///
    /// # Errors
    /// [`RunError`] when a certificate, key or the store cannot be loaded.
    pub async fn start(
        config: NodeConfig,
        config_path: Option<PathBuf>,
        listeners: Listeners,
    ) -> Result<Self, RunError> {
        config.validate()?;
        let t = &config.tls;
        let agency = AgencyId::parse(&config.agency).map_err(|e| pki_err(format!("agency: {e}")))?;
        let root_der = antar_pki::read_cert_der(&t.federation_root).map_err(tls_file("federation_root"))?;
        let anchor = TrustAnchor::new(&config.federation, root_der.clone()).map_err(|e| {
            pki_err(format!(
                "tls.federation_root {}: {e}",
                t.federation_root.display()
            ))
        })?;
        let (revocations, crls) = load_revocations(&config, &anchor)?;
        let signing_cert = antar_pki::read_cert_der(&t.signing_cert).map_err(tls_file("signing_cert"))?;
        let signing_key = antar_pki::read_key_der(&t.signing_key).map_err(tls_file("signing_key"))?;
        let signer = Signer::from_pkcs8(&signing_key, signing_cert)
            .map_err(|e| pki_err(format!("tls.signing_key {}: {e}", t.signing_key.display())))?;
        let verifier = Verifier::new(anchor, revocations);
        let tls_chain = antar_pki::read_certs_der(&t.node_cert).map_err(tls_file("node_cert"))?;
        let tls_key = antar_pki::read_key_der(&t.node_key).map_err(tls_file("node_key"))?;
        let identity = Identity::node(&config.federation, agency.clone());
        match tls_chain.first().map(|c| antar_pki::identity_of(c)) {
            Some(Ok(id)) if id == identity => {}
            other => {
                let found = match other {
                    Some(Ok(id)) => id.to_string(),
                    Some(Err(e)) => format!("no identity: {e}"),
                    None => "no certificate".to_owned(),
                };
                return Err(pki_err(format!(
                    "tls.node_cert {}: must carry {identity}, found {found}",
                    t.node_cert.display()
                )));
            }
        }
        let local_ca = antar_pki::read_cert_der(&t.local_ca).map_err(tls_file("local_ca"))?;
        let api_chain = antar_pki::read_certs_der(&t.api_cert).map_err(tls_file("api_cert"))?;
        let api_key = antar_pki::read_key_der(&t.api_key).map_err(tls_file("api_key"))?;
        let peer_tls = antar_pki::tls::peer_server_config(
            &root_der,
            tls_chain.clone(),
            tls_key.clone(),
            &config.federation,
            crls.clone(),
        )
        .map_err(|e| pki_err(chain(&e)))?;
        let api_identity = state::ApiIdentity {
            local_ca,
            chain: api_chain,
            key: api_key,
        };
        let (api_tls, _) = api_identity
            .tls(
                &config.federation,
                &agency,
                config.tls.local_revocation_list.as_deref(),
            )
            .map_err(pki_err)?;
        let store = Store::open(&StoreConfig {
            path: config.data_dir.clone(),
            max_queued_bytes: config.limits.max_queued_bytes,
            cache_capacity: config.limits.cache_bytes,
            journal_segment_bytes: config.limits.journal_segment_bytes,
        })?;
        let legacy_seen_until = state::SeenReceipts::legacy(&store).await?;
        let sent = sent::SentMarks::load(&store).await?;
        let shared = Arc::new(state::Shared {
            policy: RwLock::new(Arc::new(state::Policy::from_config(&config))),
            agency,
            identity,
            signer,
            verifier,
            store,
            leases: Mutex::default(),
            receive_streams: state::StreamCounts::default(),
            watch_streams: state::StreamCounts::default(),
            peer_health: Mutex::default(),
            draining: AtomicBool::new(false),
            started: Instant::now(),
            metrics: metrics::Metrics::default(),
            tls_chain,
            tls_key,
            crls: RwLock::new(crls),
            app_rate: rate::RateLimiter::new(config.limits.app_sends_per_sec),
            app_calls: rate::RateLimiter::new(config.limits.app_calls_per_sec),
            peer_rate: rate::RateLimiter::new(config.limits.peer_items_per_sec),
            peer_tls: RwLock::new(peer_tls),
            api_tls: RwLock::new(api_tls),
            reloading: Mutex::default(),
            api_identity,
            config,
            shutdown: CancellationToken::new(),
            receipt_queue: Default::default(),
            envelope_queue: Default::default(),
            identities: Default::default(),
            legacy_seen_until,
            calls: state::Calls::default(),
            sent: Mutex::new(sent),
            sending: tokio::sync::RwLock::default(),
            checkpoints: tokio::sync::Mutex::default(),
            witnessed: Mutex::default(),
            forwarders: Mutex::default(),
            reloads: tokio::sync::watch::Sender::new(0),
        });
        let token = shared.shutdown.clone();
        let reload = {
            let shared = shared.clone();
            let runtime = tokio::runtime::Handle::current();
            Arc::new(move || reload(&shared, &runtime, config_path.as_ref())) as Reload
        };
        let mut node = Self {
            shared: shared.clone(),
            token: token.clone(),
            tasks: Vec::new(),
            servers: Vec::new(),
            reload: reload.clone(),
        };
        let limits = shared.limits().clone();
        let tcp = net::Tcp::of(&limits);
        let (health_reporter, health) = tonic_health::server::health_reporter();
        for name in [
            "",
            "antar.v1.Agency",
            "antar.v1.Admin",
            "antar.v1.Audit",
            "antar.v1.Peer",
        ] {
            health_reporter
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        }
        // Server reflection in both versions clients speak: v1, and
        // v1alpha for Python's grpcio-reflection, grpcurl before 1.8.8 and
        // other older tools.
        let reflection_of = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(antar_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection = reflection_of()
            .build_v1()
            .map_err(|e| pki_err(format!("reflection: {e}")))?;
        let reflection_alpha = reflection_of()
            .build_v1alpha()
            .map_err(|e| pki_err(format!("reflection: {e}")))?;
        let agency_cap = AgencyCap {
            bytes: (limits.max_payload_bytes as usize).saturating_add(1 << 20),
            max_payload: limits.max_payload_bytes,
        };
        let api_router = |shared: &Arc<state::Shared>| {
            http2_limits(Server::builder(), &limits)
                .layer(tower::util::MapResponseLayer::new(move |response| {
                    unreadable_is_invalid_argument_http(response, Some(agency_cap))
                }))
                .add_service(health.clone())
                .add_service(reflection.clone())
                .add_service(reflection_alpha.clone())
                .add_service(
                    AgencyServer::new(agency::AgencyService::new(shared.clone()))
                        .max_decoding_message_size(agency_cap.bytes),
                )
                .add_service(
                    AuditServer::new(audit::AuditService {
                        shared: shared.clone(),
                    })
                    .max_encoding_message_size(64 << 20),
                )
                .add_service(AdminServer::new(admin::AdminService {
                    shared: shared.clone(),
                    reload: reload.clone(),
                    health: health_reporter.clone(),
                }))
        };
        let mut api_listeners = vec![("api", listeners.api)];
        if let Some(a) = listeners.admin {
            api_listeners.push(("admin", a));
        }
        for (name, l) in api_listeners {
            let api_tls = {
                let shared = shared.clone();
                move || shared.api_tls.read().unwrap_or_else(|p| p.into_inner()).clone()
            };
            let incoming = net::tls_incoming(l, api_tls, tcp, conn_limit(&shared, name), token.clone());
            let router = api_router(&shared);
            let t = token.clone();
            node.servers.push(tokio::spawn(
                router.serve_with_incoming_shutdown(incoming, t.cancelled_owned()),
            ));
        }
        let peer_router = http2_limits(Server::builder(), &limits)
            .layer(tower::util::MapResponseLayer::new(|response| {
                unreadable_is_invalid_argument_http(response, None)
            }))
            .add_service(health.clone())
            .add_service(reflection.clone())
            .add_service(reflection_alpha.clone())
            .add_service(
                PeerServer::new(peer::PeerService {
                    shared: shared.clone(),
                })
                .max_decoding_message_size(64 << 20),
            );
        let peer_tls = {
            let shared = shared.clone();
            move || shared.peer_tls.read().unwrap_or_else(|p| p.into_inner()).clone()
        };
        let incoming = net::tls_incoming(
            listeners.peer,
            peer_tls,
            tcp,
            conn_limit(&shared, "peer"),
            token.clone(),
        );
        node.servers.push(tokio::spawn(
            peer_router.serve_with_incoming_shutdown(incoming, token.clone().cancelled_owned()),
        ));
        if let Some(m) = listeners.metrics {
            node.tasks.push(tokio::spawn(metrics::serve(
                m,
                shared.clone(),
                conn_limit(&shared, "metrics"),
                token.clone(),
            )));
        }
        forward::start(&shared, &tokio::runtime::Handle::current());
        node.tasks
            .push(tokio::spawn(forward::rerouter(shared.clone(), token.clone())));
        node.tasks
            .push(tokio::spawn(sweeper(shared.clone(), token.clone())));
        node.tasks
            .push(tokio::spawn(audit::checkpointer(shared.clone(), token.clone())));
        tracing::info!(agency = %shared.agency, identity = %shared.identity, "node started");
        Ok(node)
    }

    /// Reloads the config file's policy (peers' routes, apps, access) and
    /// the revocation lists; says how many serials each list revokes.
    ///
    /// # Errors
    /// [`NodeError`] when the file cannot be read or is invalid; the old policy stays.
    pub fn reload(&self) -> Result<ReloadResponse, NodeError> {
        (self.reload)()
    }

    /// Each group of transactions' journal write and `fdatasync`
    /// (`antar_journal_sync_duration_seconds`).
    pub fn journal_syncs(&self) -> &antar_core::Histogram {
        self.shared.store.journal_syncs()
    }

    /// Ed25519 signatures this node has made (`antar_signatures_total`).
    pub fn signatures(&self) -> u64 {
        self.shared.signer.signatures()
    }

    /// Stops accepting, drains in-flight transfers, and flushes the store.
    ///
    /// # Errors
    /// [`RunError::Store`] when the final flush fails.
    pub async fn stop(self) -> Result<(), RunError> {
        let Self {
            shared,
            token,
            tasks,
            servers,
            reload,
        } = self;
        token.cancel();
        for t in servers {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        let mut stopped = true;
        for t in tasks.into_iter().chain(forward::take_all(&shared)) {
            stopped &= tokio::time::timeout(Duration::from_secs(10), t).await.is_ok();
        }
        // No forwarder sends any more: what each sent is exactly known.
        if stopped {
            // Alone: a release racing the stop (`forward::release`) sees
            // it stopping, or is recorded before.
            let _alone = shared.sending.write().await;
            let marks = std::mem::take(&mut *state::lock(&shared.sent));
            if let Err(e) = sent::record_exact(&shared.store, &marks).await {
                tracing::warn!(error = %e, "could not record what was sent to each peer; the next start spares up to the reservations");
            }
        }
        shared.store.close().await?;
        // Tasks spawned per stream hold the shared state, and with it the
        // store's files (sled's lock), until they see the cancellation: a
        // stopped node has let go of them, so the next open of its data
        // directory (a restart in the same process) is not refused.
        drop(reload);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&shared) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::info!(agency = %shared.agency, "node stopped");
        Ok(())
    }
}

fn reload(
    shared: &Arc<state::Shared>,
    runtime: &tokio::runtime::Handle,
    path: Option<&PathBuf>,
) -> Result<ReloadResponse, NodeError> {
    // One at a time (SIGHUP and Admin.Reload may coincide): everything a
    // reload swaps comes from the same reading of the file.
    let _one = shared.reloading.lock().unwrap_or_else(|p| p.into_inner());
    let Some(path) = path else {
        return Err(NodeError::FailedPrecondition(
            "this node was started without a config file".into(),
        ));
    };
    let config =
        NodeConfig::load(path, std::env::vars()).map_err(|e| NodeError::FailedPrecondition(e.to_string()))?;
    let (revocations, crls) = load_revocations(&config, shared.verifier.anchor())
        .map_err(|e| NodeError::FailedPrecondition(e.to_string()))?;
    let peer_tls = antar_pki::tls::peer_server_config(
        shared.verifier.anchor().root_der(),
        shared.tls_chain.clone(),
        shared.tls_key.clone(),
        &shared.config.federation,
        crls.clone(),
    )
    .map_err(|e| NodeError::FailedPrecondition(chain(&e)))?;
    let (api_tls, local_revoked) = shared
        .api_identity
        .tls(
            &shared.config.federation,
            &shared.agency,
            config.tls.local_revocation_list.as_deref(),
        )
        .map_err(NodeError::FailedPrecondition)?;
    let n = revocations.len() as u32;
    // Signatures, new peer handshakes in and out: all from now on.
    shared.verifier.set_revocations(revocations);
    *shared.crls.write().unwrap_or_else(|p| p.into_inner()) = crls;
    *shared.peer_tls.write().unwrap_or_else(|p| p.into_inner()) = peer_tls;
    // New API handshakes refuse what the local CRL lists; connections
    // already open stay (as for peers).
    *shared.api_tls.write().unwrap_or_else(|p| p.into_inner()) = api_tls;
    *shared.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(state::Policy::from_config(&config));
    tracing::info!(path = %path.display(), revoked = n, local_revoked, "configuration reloaded");
    // Peers added get a forwarder; one removed, or dialled at another
    // address, and the rerouter wake on the count (`forward.rs`).
    forward::start(shared, runtime);
    shared.reloads.send_modify(|n| *n += 1);
    Ok(ReloadResponse {
        revoked_serials: n,
        local_revoked_serials: local_revoked,
    })
}

async fn sweeper(shared: Arc<state::Shared>, token: CancellationToken) {
    let every = Duration::from_millis(shared.limits().sweep_interval_ms.max(10));
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match admin::sweep_expired(&shared).await {
            Ok(0) => {}
            Ok(n) => {
                if let Err(e) = shared.store.durable().await {
                    tracing::error!(error = %e, "flush after expiry failed");
                }
                tracing::info!(expired = n, "moved expired envelopes to dead letters");
            }
            Err(e) => tracing::error!(error = %e, "expiry sweep failed"),
        }
    }
}

/// Whether `status` is tonic's answer to a request it could not read, which
/// DESIGN.md §9 calls `INVALID_ARGUMENT` ("malformed protobuf / oversize
/// frames"): a message over the size limit (tonic: `OUT_OF_RANGE`), or gRPC
/// framing it cannot parse — a message cut short, no message at all, a
/// compressed-flag that is neither 0 nor 1, or set with no `grpc-encoding`
/// (tonic: `INTERNAL`, which the gRPC spec asks for the last; §9 is this
/// node's contract), or protobuf the stock codec of the health service
/// cannot decode (tonic-prost: `INTERNAL`; ours says `INVALID_ARGUMENT`
/// itself). Reflection ends its stream with OK on a request it cannot
/// decode: tonic-reflection's doing, not changed here. No handler of ours answers `OUT_OF_RANGE`, nor
/// `INTERNAL` with these messages.
fn unreadable(status: &Status) -> bool {
    match status.code() {
        tonic::Code::OutOfRange => true,
        tonic::Code::Internal => {
            let m = status.message();
            m.starts_with("protocol error: received message with")
                || m.starts_with("Unexpected EOF decoding stream")
                || m.starts_with("Missing request message")
                // tonic-prost's codec, in the health service (reflection
                // ends its stream OK on a message it cannot decode)
                || m.starts_with("failed to decode Protobuf message")
        }
        _ => false,
    }
}

/// `status`, as `INVALID_ARGUMENT` if it says a request could not be read
/// ([`unreadable`]); its message is kept.
pub(crate) fn unreadable_is_invalid_argument(status: Status) -> Status {
    if unreadable(&status) {
        Status::invalid_argument(status.message())
    } else {
        status
    }
}

/// Runs `feed` — what sends a streaming answer's items on `tx` — on a task
/// of its own. Should it panic, the stream ends `INTERNAL` instead of OK
/// (all a dropped sender would say), so no client takes an answer cut
/// short for a whole one: an audit query's last page, an export's bundle.
pub(crate) fn spawn_feed<T, F>(
    what: &'static str,
    tx: tokio::sync::mpsc::Sender<Result<T, tonic::Status>>,
    feed: impl FnOnce(tokio::sync::mpsc::Sender<Result<T, tonic::Status>>) -> F,
) where
    T: Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let job = tokio::spawn(feed(tx.clone()));
    tokio::spawn(async move {
        if let Err(e) = job.await {
            if e.is_panic() {
                tracing::error!(what, error = %e, "a streaming answer failed midway (a bug: please report it)");
                let failed =
                    format!("{what} failed midway on the node; what came before is not the whole answer");
                let _ = tx.send(Err(tonic::Status::internal(failed))).await;
            }
        }
    });
}

/// The next item of `stream` if it is here already: polled once, never
/// waited for. `None`: nothing yet; `Some(None)`: the stream ended. The
/// caller awaits the stream again before it sleeps, which registers its
/// own waker again.
pub(crate) fn ready_now<S: tokio_stream::Stream + Unpin>(stream: &mut S) -> Option<Option<S::Item>> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::Pin::new(stream).poll_next(&mut cx) {
        std::task::Poll::Ready(item) => Some(item),
        std::task::Poll::Pending => None,
    }
}

/// The Agency service's size cap: `max_payload_bytes` plus 1 MiB for the
/// rest of a request.
#[derive(Debug, Clone, Copy)]
struct AgencyCap {
    bytes: usize,
    max_payload: u64,
}

/// tonic refuses a request it cannot read before any handler runs, with a
/// trailers-only response; one it could not read ([`unreadable`]) has its
/// code rewritten to `INVALID_ARGUMENT`, its message kept (naming the limit
/// or what was wrong) — but for one over the Agency service's cap (`agency`,
/// on the API listener), whose message DESIGN.md §9 wants to name the
/// limit: `max_payload_bytes` is put in front of tonic's words. Other
/// services' limits (tonic's 4 MiB) keep their message.
fn unreadable_is_invalid_argument_http(
    mut response: http::Response<tonic::body::Body>,
    agency: Option<AgencyCap>,
) -> http::Response<tonic::body::Body> {
    let headers = response.headers_mut();
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32);
    if !matches!(code, Some(tonic::Code::OutOfRange | tonic::Code::Internal)) {
        return response;
    }
    let Some(status) = Status::from_header_map(headers).filter(unreadable) else {
        return response;
    };
    let over_cap = agency.filter(|cap| {
        status.code() == tonic::Code::OutOfRange
            && status
                .message()
                .starts_with("Error, decoded message length too large")
            && status
                .message()
                .ends_with(&format!("the limit is: {} bytes", cap.bytes))
    });
    let rewritten = match over_cap {
        Some(cap) => Status::invalid_argument(format!(
            "payload: the request is over max_payload_bytes = {} plus 1 MiB for the rest \
             of it ({}): send a smaller payload, or fewer messages in one SendBatch",
            cap.max_payload,
            status.message().trim_start_matches("Error, ")
        )),
        None => Status::invalid_argument(status.message()),
    };
    // Only a message that cannot be encoded leaves tonic's answer as it is.
    let _ = rewritten.add_header(headers);
    response
}

/// The connection limit of listener `name`, registered for the metrics.
fn conn_limit(shared: &state::Shared, name: &'static str) -> Arc<net::ConnLimit> {
    let limits = shared.limits();
    let limit = net::ConnLimit::new(
        name,
        limits.max_connections as usize,
        limits.max_connections_per_ip as usize,
    );
    shared
        .metrics
        .listeners
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(limit.clone());
    limit
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_feed_that_panics_ends_its_stream_internal_not_ok() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<u32, tonic::Status>>(4);
        super::spawn_feed("a test answer", tx, |tx| async move {
            tx.send(Ok(1)).await.unwrap();
            panic!("midway");
        });
        assert_eq!(rx.recv().await.unwrap().unwrap(), 1);
        let status = rx.recv().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(
            status.message().contains("a test answer failed midway"),
            "{status:?}"
        );
        assert!(rx.recv().await.is_none());

        // One that ends ends the stream OK, after its items.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<u32, tonic::Status>>(4);
        super::spawn_feed("a test answer", tx, |tx| async move {
            tx.send(Ok(2)).await.unwrap();
        });
        assert_eq!(rx.recv().await.unwrap().unwrap(), 2);
        assert!(rx.recv().await.is_none());
    }

    use super::status_chain;

    #[test]
    fn a_status_names_each_cause_once() {
        let refused = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let mut dial = tonic::Status::unavailable("dial failed");
        dial.set_source(std::sync::Arc::new(refused()));
        assert_eq!(
            status_chain(&dial),
            "The service is currently unavailable: dial failed: connection refused"
        );
        // tonic repeats its error's text as the status message.
        let repeated = tonic::Status::from_error(Box::new(refused()));
        assert_eq!(status_chain(&repeated), "Unknown error: connection refused");
        // Only a whole repeat is dropped, not a cause that ends the same way.
        let mut missing = tonic::Status::not_found("no such file");
        missing.set_source(std::sync::Arc::new(std::io::Error::other("file")));
        assert_eq!(
            status_chain(&missing),
            "Some requested entity was not found: no such file: file"
        );
    }
}
