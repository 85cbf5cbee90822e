//! TLS on both listeners and to peers: the accept loop that hands tonic
//! finished TLS 1.3 connections, and the dialer of peer channels.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// Accepts TCP connections and runs each TLS handshake on its own task, under
/// `handshake_timeout`, so a slow or silent client never stalls the others.
/// Failed handshakes are logged and dropped. `config` is asked for each
/// connection, so a reloaded revocation list applies to the next handshake.
pub(crate) fn tls_incoming(
    listener: TcpListener,
    config: impl Fn() -> Arc<rustls::ServerConfig> + Send + 'static,
    handshake_timeout: Duration,
    shutdown: CancellationToken,
    name: &'static str,
) -> ReceiverStream<Result<TlsStream<TcpStream>, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            let (tcp, remote) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(config());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
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

/// A lazily connecting gRPC channel to `addr` over TLS with `config`.
pub(crate) fn dial(addr: &str, config: Arc<rustls::ClientConfig>) -> Result<Channel, io::Error> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20));
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
            let tcp = TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
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
    dial(addr, config).map_err(|e| e.to_string())
}
