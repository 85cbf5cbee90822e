//! The federation harness for Antar's multi-node scenarios: certificates
//! made by rcgen at test time, real nodes on 127.0.0.1 with real sled
//! directories, in-process (stoppable) or as `antar node run` child
//! processes (killable with SIGKILL).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use antar_client::{Client, ClientRole, Credentials};
use antar_core::{AgencyId, Role};
use antar_node::dev::{standard_topology, Addrs, AgencySpec, DevLayout, DEV_FEDERATION};
use antar_node::{Listeners, Node, NodeConfig};
use antar_pki::federation_file::FederationFile;

pub use antar_client::wire;

/// A federation of nodes under a temporary directory.
pub struct Federation {
    pub dir: tempfile::TempDir,
    pub layout: DevLayout,
    pub topology: Vec<AgencySpec>,
    pub addrs: BTreeMap<String, Addrs>,
    pub file: FederationFile,
}

/// A loopback port free now, chosen below Linux's ephemeral range
/// (32768 and up): the kernel never hands such a port to a `bind(0)` or an
/// outgoing connection, so nothing else in the test (a link proxy, a client)
/// can take it before its node binds it. Never the same port twice in one
/// test process, so federations of tests running side by side cannot pick
/// the same one either.
fn free_addr() -> SocketAddr {
    use rand::Rng;
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let mut rng = rand::rng();
    for _ in 0..1000 {
        let port = rng.random_range(20_000..32_000);
        if handed_out.contains(&port) {
            continue;
        }
        if let Ok(l) = StdListener::bind(("127.0.0.1", port)) {
            handed_out.push(port);
            return l.local_addr().unwrap();
        }
    }
    panic!("no free loopback port in 20000..32000 after 1000 tries")
}

impl Federation {
    /// finance, health, registry and hub as DESIGN.md §8 lays them out.
    pub fn standard() -> Self {
        Self::new(standard_topology())
    }

    /// Any topology; certificates and free loopback ports are chosen now.
    pub fn new(topology: Vec<AgencySpec>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let layout = DevLayout::new(dir.path());
        layout.ensure_pki(&topology).unwrap();
        let addrs: BTreeMap<String, Addrs> = topology
            .iter()
            .map(|s| {
                (
                    s.id.clone(),
                    Addrs {
                        api: free_addr(),
                        peer: free_addr(),
                        admin: free_addr(),
                        metrics: free_addr(),
                    },
                )
            })
            .collect();
        let file = layout.federation_file(&topology, &addrs).unwrap();
        let path = layout.federation_json();
        file.save(&path).unwrap();
        let file = FederationFile::load(&path).unwrap();
        Self {
            dir,
            layout,
            topology,
            addrs,
            file,
        }
    }

    fn spec(&self, agency: &str) -> &AgencySpec {
        self.topology.iter().find(|s| s.id == agency).unwrap()
    }

    /// The config a node of `agency` runs with (tweak it before starting).
    pub fn config(&self, agency: &str) -> NodeConfig {
        let mut c = self.layout.node_config(self.spec(agency), &self.addrs);
        c.limits.retry_initial_ms = 50;
        c.limits.retry_max_ms = 500;
        c.limits.sweep_interval_ms = 200;
        c.limits.checkpoint_interval_secs = 1;
        c
    }

    /// Starts a node in this process.
    pub async fn start(&self, agency: &str) -> Node {
        self.start_with(self.config(agency)).await
    }

    /// Starts the nodes of `agencies`, each with its config changed by `tune`.
    pub async fn start_all_with(&self, agencies: &[&str], tune: impl Fn(&str, &mut NodeConfig)) -> Vec<Node> {
        let mut nodes = Vec::with_capacity(agencies.len());
        for agency in agencies {
            let mut config = self.config(agency);
            tune(agency, &mut config);
            nodes.push(self.start_with(config).await);
        }
        nodes
    }

    /// Writes `config` as its agency's config file and reloads `node` from it.
    pub fn reload_with(&self, node: &Node, config: &NodeConfig) {
        std::fs::write(self.layout.config_path(&config.agency), config.to_toml()).unwrap();
        node.reload().unwrap();
    }

    /// Starts a node in this process with a given config.
    pub async fn start_with(&self, config: NodeConfig) -> Node {
        let path = self.layout.config_path(&config.agency);
        std::fs::write(&path, config.to_toml()).unwrap();
        let listeners = bind_retrying(&config).await;
        Node::start(config, Some(path), listeners).await.unwrap()
    }

    /// Starts a node as an `antar node run` child process.
    pub fn spawn(&self, agency: &str) -> ChildNode {
        self.spawn_with(self.config(agency))
    }

    /// Starts a node as a child process with a given config.
    pub fn spawn_with(&self, config: NodeConfig) -> ChildNode {
        self.spawn_env(config, &[])
    }

    /// Starts a node as a child process with a given config and extra
    /// environment variables.
    pub fn spawn_env(&self, config: NodeConfig, env: &[(&str, &str)]) -> ChildNode {
        let path = self.layout.config_path(&config.agency);
        std::fs::write(&path, config.to_toml()).unwrap();
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", config.agency))).unwrap();
        let child = Command::new(antar_bin())
            .args(["node", "run", "--config"])
            .arg(&path)
            .env("ANTAR_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start the antar binary");
        ChildNode {
            child,
            agency: config.agency,
        }
    }

    /// An app client of `agency` (certificate `…/app/dev`), retrying until the node answers.
    pub async fn app(&self, agency: &str) -> Client {
        self.client(agency, ClientRole::App).await
    }

    /// An admin client of `agency`.
    pub async fn admin(&self, agency: &str) -> Client {
        self.client(agency, ClientRole::Admin).await
    }

    /// A client of `agency` with the certificate of `role`; retries for up to 20 s
    /// while the node starts.
    pub async fn client(&self, agency: &str, role: ClientRole) -> Client {
        let (addr, creds) = antar_client::federation_credentials(&self.file, agency, role).unwrap();
        connect_retrying(&addr, &creds).await
    }

    /// An app client of `agency` with its own certificate `…/app/<name>`.
    pub async fn named_app(&self, agency: &str, name: &str) -> Client {
        let node = self.layout.node_dir(agency);
        let role = Role::App(name.to_owned());
        let (cert, key) = node.client_files(&role).unwrap();
        if !cert.exists() {
            antar_pki::layout::issue_client(
                &node,
                DEV_FEDERATION,
                &AgencyId::parse(agency).unwrap(),
                &role,
                30,
                false,
            )
            .unwrap();
        }
        let creds = Credentials::load(&node.local_ca_cert(), &cert, &key).unwrap();
        connect_retrying(&self.addrs[agency].api.to_string(), &creds).await
    }

    /// The verifier an auditor of this federation would use.
    pub fn verifier(&self) -> antar_core::Verifier {
        let root = antar_pki::read_cert_der(&self.file.root_ca).unwrap();
        antar_core::Verifier::new(
            antar_core::TrustAnchor::new(DEV_FEDERATION, root).unwrap(),
            antar_core::Revocations::none(),
        )
    }

    /// The directory of `agency`'s certificates.
    pub fn certs(&self, agency: &str) -> antar_pki::layout::NodeDir {
        self.layout.node_dir(agency)
    }

    /// A client of `to`'s peer port holding `from`'s node certificate: a
    /// peer, or one that turned hostile.
    pub async fn peer_as(
        &self,
        from: &str,
        to: &str,
    ) -> wire::peer_client::PeerClient<tonic::transport::Channel> {
        let certs = self.certs(from);
        let creds = Credentials::from_der(
            antar_pki::read_cert_der(&certs.federation_root()).unwrap(),
            antar_pki::read_certs_der(&certs.tls_cert()).unwrap(),
            antar_pki::read_key_der(&certs.tls_key()).unwrap(),
        );
        let client = Client::connect(&self.addrs[to].peer.to_string(), &creds)
            .await
            .unwrap();
        wire::peer_client::PeerClient::new(client.channel())
    }

    /// `agency`'s node signing key, to sign as that node would.
    pub fn signer(&self, agency: &str) -> antar_core::Signer {
        let certs = self.certs(agency);
        antar_core::Signer::from_pkcs8(
            &antar_pki::read_key_der(&certs.signing_key()).unwrap(),
            antar_pki::read_cert_der(&certs.signing_cert()).unwrap(),
        )
        .unwrap()
    }

    /// `agency`'s store, opened directly as an operator with disk access
    /// would; its node must be stopped.
    pub fn open_store(&self, agency: &str) -> antar_store::Store {
        antar_store::Store::open(&antar_store::StoreConfig {
            path: self.layout.data_dir(agency),
            max_queued_bytes: 1 << 30,
            cache_capacity: 1 << 20,
            journal_segment_bytes: antar_store::DEFAULT_JOURNAL_SEGMENT_BYTES,
        })
        .unwrap()
    }

    /// The log of a child node.
    pub fn log(&self, agency: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{agency}.log"))).unwrap_or_default()
    }
}

async fn bind_retrying(config: &NodeConfig) -> Listeners {
    // A port freed by a stopped node can take a moment to be released.
    for _ in 0..100 {
        if let Ok(l) = Listeners::bind(config).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Listeners::bind(config).await.unwrap()
}

async fn connect_retrying(addr: &str, creds: &Credentials) -> Client {
    let mut last = None;
    for _ in 0..400 {
        match Client::connect(addr, creds).await {
            Ok(c) => return c,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("node at {addr} never answered: {last:?}");
}

/// The `antar` binary next to the test executable (built by `cargo test --workspace`),
/// or `$ANTAR_BIN`.
pub fn antar_bin() -> PathBuf {
    if let Ok(p) = std::env::var("ANTAR_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let bin = dir.join("antar");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p antar` (cargo test --workspace builds it)",
        bin.display()
    );
    bin
}

/// A node running as a child process.
pub struct ChildNode {
    child: Child,
    pub agency: String,
}

impl ChildNode {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        match self.exited_within(Duration::from_secs(10)) {
            Some(status) => status,
            None => panic!("{} did not stop within 10 s of SIGTERM", self.agency),
        }
    }

    /// Sends the signal named (`TERM`, `HUP`, `INT`) with `kill`.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args([&format!("-{name}"), &pid]).status();
        assert!(sent.unwrap().success(), "kill -{name} {pid}");
    }

    /// The exit status, once the process has ended; None if it still runs
    /// after `within` (polled every 25 ms).
    pub fn exited_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 20 ms until it returns Some, for at most `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Receives up to `n` deliveries within `secs` seconds, acking each if `ack`.
pub async fn receive(client: &Client, n: usize, secs: u64, ack: bool) -> Vec<wire::Delivery> {
    receive_at_most(client, n, secs, ack, 256).await
}

/// [`receive`] on a stream that holds at most `max_in_flight` unacked.
pub async fn receive_at_most(
    client: &Client,
    n: usize,
    secs: u64,
    ack: bool,
    max_in_flight: u32,
) -> Vec<wire::Delivery> {
    use tokio_stream::StreamExt as _;
    let mut agency = client.agency();
    let mut stream = agency
        .receive(wire::ReceiveRequest {
            services: vec![],
            max_in_flight,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while out.len() < n {
        let Ok(Some(d)) = tokio::time::timeout_at(deadline, stream.next()).await else {
            break;
        };
        let d = d.unwrap();
        if ack {
            let id = envelope_of(&d).id;
            agency
                .ack(wire::AckRequest {
                    message_id: id,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        out.push(d);
    }
    out
}

/// Sends `items` in one `Transfer` batch; the peer's first ack.
pub async fn transfer(
    peer: &mut wire::peer_client::PeerClient<tonic::transport::Channel>,
    items: Vec<wire::TransferItem>,
) -> wire::TransferAck {
    use tokio_stream::StreamExt as _;
    let mut acks = peer
        .transfer(tokio_stream::iter([wire::TransferBatch { items }]))
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(Duration::from_secs(10), acks.next())
        .await
        .expect("the peer never acknowledged the batch")
        .unwrap()
        .unwrap()
}

/// Receives and acks exactly the messages `ids`, each once, within `secs`.
pub async fn receive_exactly(app: &Client, ids: &[String], secs: u64) {
    use std::collections::HashSet;
    let got: Vec<String> = receive(app, ids.len(), secs, true)
        .await
        .iter()
        .map(|d| envelope_of(d).id)
        .collect();
    assert_eq!(got.len(), ids.len(), "not everything arrived");
    let want: HashSet<&String> = ids.iter().collect();
    let unique: HashSet<&String> = got.iter().collect();
    assert_eq!(unique, want, "other messages than those sent");
    assert_eq!(unique.len(), got.len(), "a message arrived twice");
}

/// The decoded header of a delivery.
pub fn envelope_of(d: &wire::Delivery) -> wire::Envelope {
    use prost::Message as _;
    wire::Envelope::decode(d.envelope.as_ref().unwrap().envelope.clone()).unwrap()
}

/// Flips the bits `mask` of byte `at` of `bytes` (a field of a received
/// message: tampering with it as a hostile peer would).
pub fn flip(bytes: &mut prost::bytes::Bytes, at: usize, mask: u8) {
    let mut v = bytes.to_vec();
    v[at] ^= mask;
    *bytes = v.into();
}

/// A NOTICE to one agency.
pub fn notice(to: &str, service: &str, payload: &[u8]) -> wire::SendRequest {
    wire::SendRequest {
        kind: wire::Kind::Notice as i32,
        recipients: vec![to.to_owned()],
        service: service.to_owned(),
        payload: payload.to_vec().into(),
        ..Default::default()
    }
}

/// A TRANSACTION to one agency under an idempotency key.
pub fn transaction(to: &str, service: &str, key: &str, payload: &[u8]) -> wire::SendRequest {
    wire::SendRequest {
        kind: wire::Kind::Transaction as i32,
        idempotency_key: key.to_owned(),
        ..notice(to, service, payload)
    }
}

/// Sends and returns the first message id.
pub async fn send(client: &Client, req: wire::SendRequest) -> String {
    client
        .agency()
        .send(req)
        .await
        .unwrap()
        .into_inner()
        .message_ids
        .remove(0)
}

/// `config` without its peering to `peer`.
pub fn without_peer(mut config: NodeConfig, peer: &str) -> NodeConfig {
    config.peers.retain(|p| p.agency != peer);
    config
}

/// Backlog of `peer` as `agency`'s admin sees it.
pub async fn backlog(admin: &Client, peer: &str) -> u64 {
    peer_status(admin, peer).await.map_or(0, |p| p.backlog)
}

/// `Admin.Status` of `admin`'s node.
pub async fn status(admin: &Client) -> wire::StatusResponse {
    admin
        .admin()
        .status(wire::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// What `Status` says of the queue for `peer`, if it lists one.
pub async fn peer_status(admin: &Client, peer: &str) -> Option<wire::PeerStatus> {
    status(admin).await.peers.into_iter().find(|p| p.agency == peer)
}

/// Sends raw bytes as a gRPC message: what a broken client in any language can do.
#[derive(Debug, Clone, Default)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = prost::bytes::Buf::remaining(src);
        Ok(Some(prost::bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

/// The sender node's view of a message.
pub async fn track(client: &Client, id: &str) -> wire::TrackResponse {
    client
        .agency()
        .track(wire::TrackRequest {
            message_id: id.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Polls Track until `id` is in `state`, for at most `secs` seconds.
pub async fn until_state(
    client: &Client,
    id: &str,
    state: wire::MessageState,
    secs: u64,
) -> wire::TrackResponse {
    eventually(secs, &format!("{id} {state:?}"), || async {
        let t = track(client, id).await;
        (t.state == state as i32).then_some(t)
    })
    .await
}

/// The statuses of a message's receipts, each verified against the federation root.
pub fn verified_statuses(fed: &Federation, t: &wire::TrackResponse) -> Vec<(i32, String)> {
    let verifier = fed.verifier();
    t.receipts
        .iter()
        .map(|r| {
            let v = verifier.verify_receipt(r).expect("every receipt verifies");
            (v.receipt.status, v.receipt.issuer)
        })
        .collect()
}

/// The whole Audit export of the node `client` (an auditor) talks to.
pub async fn export(client: &Client) -> Vec<u8> {
    use tokio_stream::StreamExt as _;
    let mut stream = client
        .audit()
        .export(wire::ExportRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap().data);
    }
    out
}

/// `GET /metrics` of `agency`'s node, parsed into series -> value.
pub async fn scrape(fed: &Federation, agency: &str) -> std::collections::HashMap<String, f64> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut conn = tokio::net::TcpStream::connect(fed.addrs[agency].metrics)
        .await
        .unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse().unwrap())
        })
        .collect()
}

/// One series of a [`scrape`]; panics naming it when it is missing.
pub fn get(m: &std::collections::HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series).unwrap_or_else(|| panic!("no series {series}"))
}

/// What a [`LinkProxy`] does to the bytes of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    /// Bytes flow both ways.
    Up,
    /// Every connection is closed, new ones are closed at accept.
    Cut,
    /// Connections stay open, new ones are accepted, no byte moves.
    Stall,
}

/// A TCP proxy on loopback in front of a node's port: point a peer's
/// `peers.addr` at [`LinkProxy::addr`] and cut or stall the link at will.
pub struct LinkProxy {
    pub addr: SocketAddr,
    mode: tokio::sync::watch::Sender<LinkMode>,
    task: tokio::task::JoinHandle<()>,
}

impl LinkProxy {
    /// A proxy to `target`, up.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, _) = tokio::sync::watch::channel(LinkMode::Up);
        let modes = mode.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *modes.borrow() == LinkMode::Cut {
                    continue; // dropped: closed at once
                }
                let modes = modes.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, modes.subscribe()), pump(sr, cw, modes.subscribe()));
                });
            }
        });
        Self { addr, mode, task }
    }

    /// Changes what the link does, for open and new connections alike.
    pub fn set(&self, mode: LinkMode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.set(LinkMode::Cut);
    }
}

/// Copies one direction of a proxied connection while the link is up;
/// holds the bytes while it is stalled; returns (closing) when it is cut or
/// either side ends.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: tokio::sync::watch::Receiver<LinkMode>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = vec![0u8; 16 << 10];
    loop {
        if !wait_up(&mut mode).await {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = mode.changed() => continue,
        };
        // A chunk read just before a stall waits for the link too.
        if !wait_up(&mut mode).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Waits while the link is stalled: true once it is up, false if cut.
async fn wait_up(mode: &mut tokio::sync::watch::Receiver<LinkMode>) -> bool {
    loop {
        match *mode.borrow_and_update() {
            LinkMode::Up => return true,
            LinkMode::Cut => return false,
            LinkMode::Stall => {}
        }
        if mode.changed().await.is_err() {
            return false;
        }
    }
}
