//! TLS on both listeners and to peers: the accept loop that hands tonic
//! finished TLS 1.3 connections, and the dialer of peer channels.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

/// How the node sets up each TCP connection of its api, admin and peer
/// listeners, and each it opens to a peer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tcp {
    /// The TLS handshake (and, dialing, the TCP connect before it) may take
    /// at most this (`limits.handshake_timeout_ms`).
    pub handshake_timeout: Duration,
    /// A connection opened to a peer gets a PING after this long without
    /// frames while a call is open on it (a forwarder's `Transfer` always
    /// is), and is closed when the answer takes longer than
    /// `keepalive_timeout` (`limits.keepalive_interval_ms`, as the
    /// listeners').
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered (`limits.keepalive_timeout_ms`).
    pub keepalive_timeout: Duration,
}

/// The least `TCP_USER_TIMEOUT` the node sets, whatever the keepalive
/// timeout: Linux checks it only when a retransmission timer fires (200 ms
/// at the soonest, a second or more across a WAN), so a shorter one would
/// close a connection at its first lost segment.
const MIN_USER_TIMEOUT: Duration = Duration::from_secs(5);

impl Tcp {
    pub(crate) fn of(limits: &crate::config::Limits) -> Self {
        Self {
            handshake_timeout: Duration::from_millis(limits.handshake_timeout_ms),
            keepalive_interval: Duration::from_millis(limits.keepalive_interval_ms),
            keepalive_timeout: Duration::from_millis(limits.keepalive_timeout_ms),
        }
    }

    /// How long bytes this node sent may go unacknowledged by the other
    /// end's TCP before the kernel closes the connection
    /// (`TCP_USER_TIMEOUT`): the keepalive timeout, at least
    /// [`MIN_USER_TIMEOUT`]. An end that vanished while the node had
    /// something for it (the GOAWAY a listener writes when a keepalive
    /// fails, among others) lets go of its slot then, not after TCP's own
    /// ~15 minutes of retransmissions.
    pub(crate) fn user_timeout(&self) -> Duration {
        self.keepalive_timeout.max(MIN_USER_TIMEOUT)
    }

    /// Sets `tcp` up: no Nagle delay, and (on Linux) the user timeout.
    fn tune(&self, tcp: &TcpStream) -> io::Result<()> {
        tcp.set_nodelay(true)?;
        #[cfg(any(target_os = "linux", target_os = "android"))]
        socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(self.user_timeout()))?;
        Ok(())
    }

    /// [`Tcp::tune`], a failure logged: the connection is still of use.
    fn tune_or_warn(&self, tcp: &TcpStream, what: &str, remote: &dyn std::fmt::Display) {
        if let Err(e) = self.tune(tcp) {
            tracing::warn!(what, %remote, error = %e, "setting TCP options failed");
        }
    }
}

/// [`accept_admitted`], the connection set up by `tcp_setup`.
async fn accept_tuned(
    listener: &TcpListener,
    limit: &Arc<ConnLimit>,
    tcp_setup: &Tcp,
) -> (TcpStream, std::net::SocketAddr, Slot) {
    let (tcp, remote, slot) = accept_admitted(listener, limit).await;
    tcp_setup.tune_or_warn(&tcp, limit.listener(), &remote);
    (tcp, remote, slot)
}

/// A TCP connection to `addr`, set up by `tcp_setup`.
async fn connect_tuned(addr: &str, tcp_setup: &Tcp) -> io::Result<TcpStream> {
    let tcp = TcpStream::connect(addr).await?;
    tcp_setup.tune_or_warn(&tcp, "dial", &addr);
    Ok(tcp)
}

/// The connections one listener holds open — in all, and per remote IP
/// address — counted from accept (before the TLS handshake, so slow-loris
/// connections count) to close. One flooding client reaches its per-address
/// limit long before the listener's, so everyone else is still served.
#[derive(Debug)]
pub(crate) struct ConnLimit {
    listener: &'static str,
    max_total: usize,
    /// 0: no per-address limit (e.g. every client behind one NAT).
    max_per_ip: usize,
    open: Mutex<Open>,
    refused: AtomicU64,
    /// When a refusal was last logged, and how many went unlogged since.
    quiet: Mutex<(Option<Instant>, u64)>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Refusals are logged at most this often per listener (and all counted).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

impl ConnLimit {
    pub(crate) fn new(listener: &'static str, max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            listener,
            max_total,
            max_per_ip,
            open: Mutex::default(),
            refused: AtomicU64::new(0),
            quiet: Mutex::default(),
        })
    }

    /// The listener's name, as in logs and metrics.
    pub(crate) fn listener(&self) -> &'static str {
        self.listener
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        self.lock().total
    }

    /// Connections refused since the node started.
    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a connection from `ip`, or the name of the limit it hits.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, &'static str> {
        let ip = client_net(ip);
        let mut open = self.lock();
        if open.total >= self.max_total {
            return Err("limits.max_connections");
        }
        let from_ip = open.per_ip.entry(ip).or_default();
        if self.max_per_ip > 0 && *from_ip >= self.max_per_ip {
            return Err("limits.max_connections_per_ip");
        }
        *from_ip += 1;
        open.total += 1;
        Ok(Slot {
            limit: self.clone(),
            ip,
        })
    }

    fn refuse(&self, remote: std::net::SocketAddr, limit: &'static str) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let mut quiet = self.quiet.lock().unwrap_or_else(|p| p.into_inner());
        if quiet.0.is_some_and(|at| at.elapsed() < REFUSAL_LOG_EVERY) {
            quiet.1 += 1;
            return;
        }
        let (max, open) = match limit {
            "limits.max_connections" => (self.max_total, self.open()),
            _ => (
                self.max_per_ip,
                self.lock()
                    .per_ip
                    .get(&client_net(remote.ip()))
                    .copied()
                    .unwrap_or(0),
            ),
        };
        tracing::warn!(
            listener = self.listener,
            %remote,
            limit,
            max,
            open,
            also_refused = quiet.1,
            "connection refused: {limit} reached (raise it, or find the client holding connections open)"
        );
        *quiet = (Some(Instant::now()), 0);
    }
}

/// What one client is counted by for `limits.max_connections_per_ip`: an
/// IPv4 address, or the /64 network of an IPv6 one (a single host is
/// usually given a whole /64, so counting its addresses one by one would
/// count nothing); an IPv4-mapped IPv6 address as the IPv4 address.
fn client_net(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

/// The next connection `listener` takes under `limit`, with its slot:
/// a failed accept (out of file descriptors) is logged and waited out, not
/// retried in a spin; a connection over a limit is closed at once and
/// counted. Cancel-safe: nothing is awaited between accept and admission.
pub(crate) async fn accept_admitted(
    listener: &TcpListener,
    limit: &Arc<ConnLimit>,
) -> (TcpStream, std::net::SocketAddr, Slot) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(listener = limit.listener(), error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match limit.admit(remote.ip()) {
            Ok(slot) => return (tcp, remote, slot),
            Err(which) => limit.refuse(remote, which),
        }
    }
}

/// One admitted connection; frees its place when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    limit: Arc<ConnLimit>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.limit.lock();
        open.total -= 1;
        if let Some(n) = open.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.per_ip.remove(&self.ip);
            }
        }
    }
}

/// A connection that holds its [`Slot`] until tonic drops it.
#[derive(Debug)]
pub(crate) struct Counted<T> {
    io: T,
    _slot: Slot,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for Counted<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Accepts TCP connections within `limit` and runs each TLS handshake on its
/// own task, under `tcp_setup.handshake_timeout`, so a slow or silent client never
/// stalls the others. Refused connections are closed at once; failed
/// handshakes are logged and dropped. `config` is asked for each
/// connection, so a reloaded revocation list applies to the next handshake.
pub(crate) fn tls_incoming(
    listener: TcpListener,
    config: impl Fn() -> Arc<rustls::ServerConfig> + Send + 'static,
    tcp_setup: Tcp,
    limit: Arc<ConnLimit>,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<Counted<TlsStream<TcpStream>>, io::Error>> {
    let name = limit.listener();
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, remote, slot) = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = accept_tuned(&listener, &limit, &tcp_setup) => a,
            };
            let acceptor = TlsAcceptor::from(config());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(tcp_setup.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(Counted { io: tls, _slot: slot })).await;
                    }
                    Ok(Err(e)) => {
                        tracing::info!(listener = name, %remote, error = %e, "TLS handshake refused")
                    }
                    Err(_) => tracing::info!(listener = name, %remote, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A lazily connecting gRPC channel to `addr` over TLS with `config`; TCP
/// connect and TLS handshake together may take at most
/// `tcp_setup.handshake_timeout` (a stalled link must not hang a dial).
pub(crate) fn dial(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
    tcp_setup: Tcp,
) -> Result<Channel, io::Error> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?
        .connect_timeout(tcp_setup.handshake_timeout)
        .http2_keep_alive_interval(tcp_setup.keepalive_interval)
        .keep_alive_timeout(tcp_setup.keepalive_timeout);
    let addr = addr.to_owned();
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']))
        .unwrap_or("localhost");
    let server_name =
        ServerName::try_from(host.to_owned()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let connector = TlsConnector::from(config);
    Ok(endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
        let (addr, connector, server_name) = (addr.clone(), connector.clone(), server_name.clone());
        async move {
            let connect = async {
                let tcp = connect_tuned(&addr, &tcp_setup).await?;
                connector.connect(server_name, tcp).await
            };
            let tls = tokio::time::timeout(tcp_setup.handshake_timeout, connect)
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "TCP connect and TLS handshake timed out")
                })??;
            Ok::<_, io::Error>(TokioIo::new(tls))
        }
    })))
}

/// A channel to `peer`'s node at `addr`: this node's TLS identity, the
/// federation root, the current revocation lists, and `peer`'s identity
/// required of the server.
pub(crate) fn peer_channel(shared: &crate::state::Shared, peer: &str, addr: &str) -> Result<Channel, String> {
    let crls = shared.crls.read().unwrap_or_else(|p| p.into_inner()).clone();
    let config = antar_pki::tls::peer_client_config_with_crls(
        shared.verifier.anchor().root_der(),
        shared.tls_chain.clone(),
        shared.tls_key.clone(),
        &shared.config.federation,
        &antar_core::AgencyId::parse(peer).map_err(|e| e.to_string())?,
        crls,
    )
    .map_err(|e| e.to_string())?;
    dial(addr, config, Tcp::of(shared.limits())).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(client_net(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(client_net(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(client_net(ip("2001:db8:0:5:a::1")), ip("2001:db8:0:5::"));
        let limit = ConnLimit::new("test", 10, 2);
        let held: Vec<Slot> = ["2001:db8::1", "2001:db8::ffff:2"]
            .into_iter()
            .map(|a| limit.admit(ip(a)).unwrap())
            .collect();
        assert_eq!(
            limit.admit(ip("2001:db8::3")).unwrap_err(),
            "limits.max_connections_per_ip",
            "a third address of the same /64"
        );
        let other = limit.admit(ip("2001:db8:0:1::1")).expect("another /64");
        drop(held);
        assert!(limit.admit(ip("2001:db8::3")).is_ok(), "places given back");
        assert_eq!(limit.open(), 1);
        drop(other);
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[tokio::test]
    async fn accepted_and_dialed_connections_get_no_nagle_delay_and_a_user_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let setup = |timeout_ms: u64| Tcp {
            handshake_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(2),
            keepalive_timeout: Duration::from_millis(timeout_ms),
        };
        let user_timeout = |s: &TcpStream| socket2::SockRef::from(s).tcp_user_timeout().unwrap();
        let limit = ConnLimit::new("test", 10, 0);
        let plain = TcpStream::connect(&addr).await.unwrap();
        assert_eq!(user_timeout(&plain), None, "the kernel's default, untuned");
        assert!(!plain.nodelay().unwrap());
        let (accepted, _, _slot) = accept_tuned(&listener, &limit, &setup(12_345)).await;
        assert_eq!(user_timeout(&accepted), Some(Duration::from_millis(12_345)));
        assert!(accepted.nodelay().unwrap());
        // Below the floor: the floor.
        let dialed = connect_tuned(&addr, &setup(100)).await.unwrap();
        assert_eq!(user_timeout(&dialed), Some(MIN_USER_TIMEOUT));
        assert!(dialed.nodelay().unwrap());
    }
}
