//! A typed Rust client for agency systems, administrators and auditors:
//! mutual TLS with a client certificate of the agency-local CA, and the
//! generated gRPC clients of `antar.v1`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), antar_client::ClientError> {
//! use antar_client::{Client, ClientRole};
//! let fed = antar_pki::federation_file::FederationFile::load("fed/federation.json".as_ref())?;
//! let client = Client::from_federation(&fed, "finance", ClientRole::App).await?;
//! let ids = client.send_notice("health", "tax.notice", b"hello".to_vec()).await?;
//! # Ok(()) }
//! ```
//!
//! The `bytes` fields of [`wire`] are `bytes::Bytes` (re-exported as
//! `antar_proto::prost::bytes`); see `antar_proto` for what that means.

#![warn(missing_docs)]

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use antar_pki::federation_file::FederationFile;
pub use antar_proto::v1 as wire;
use wire::admin_client::AdminClient;
use wire::agency_client::AgencyClient;
use wire::audit_client::AuditClient;

/// Why a client could not be set up or a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// A certificate or key file could not be loaded.
    #[error(transparent)]
    Pki(#[from] antar_pki::PkiError),
    /// The address is not `host:port`.
    #[error("invalid address {0:?}: expected host:port such as 127.0.0.1:7443")]
    Address(String),
    /// The node could not be reached or the TLS handshake failed.
    #[error("cannot connect to {addr}: {detail}")]
    Connect {
        /// The address dialed.
        addr: String,
        /// What failed.
        detail: String,
    },
    /// The federation file has no such agency.
    #[error("agency {agency:?} is not in the federation file (it lists: {known})")]
    UnknownAgency {
        /// The agency asked for.
        agency: String,
        /// The ids the file lists, comma-separated.
        known: String,
    },
    /// The federation file's entry of the agency leaves out a field the
    /// client needs (a file handed to an app may carry only its own
    /// certificate).
    #[error("the federation file gives no {field} for agency {agency:?}")]
    Missing {
        /// The agency.
        agency: String,
        /// The field left out, as federation.json names it.
        field: &'static str,
    },
    /// The node answered with an error status.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
}

/// Which client certificate of an agency to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRole {
    /// An agency system: the Agency API.
    App,
    /// An administrator: the Admin API.
    Admin,
    /// An auditor: the Audit API.
    Auditor,
}

/// A client certificate with its key and the CA that issued the node's API certificate.
#[derive(Clone)]
pub struct Credentials {
    ca_der: Vec<u8>,
    cert_chain: Vec<Vec<u8>>,
    key_der: Vec<u8>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

impl Credentials {
    /// Loads PEM files: the agency-local CA, the client certificate and its key.
    ///
    /// # Errors
    /// [`ClientError::Pki`] naming the file that could not be read.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, ClientError> {
        Ok(Self {
            ca_der: antar_pki::read_cert_der(ca)?,
            cert_chain: antar_pki::read_certs_der(cert)?,
            key_der: antar_pki::read_key_der(key)?,
        })
    }

    /// From DER bytes already in memory.
    pub fn from_der(ca_der: Vec<u8>, cert_chain: Vec<Vec<u8>>, key_der: Vec<u8>) -> Self {
        Self {
            ca_der,
            cert_chain,
            key_der,
        }
    }
}

/// A connection to one node's API listener.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
}

impl Client {
    /// Connects to `addr` (`host:port`) with `creds`, failing fast if the node is unreachable.
    ///
    /// # Errors
    /// [`ClientError::Connect`] when the node cannot be reached or refuses the certificate.
    pub async fn connect(addr: &str, creds: &Credentials) -> Result<Self, ClientError> {
        let endpoint = endpoint(addr)?;
        let connector = connector(addr, creds)?;
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| ClientError::Connect {
                addr: addr.to_owned(),
                detail: error_chain(&e),
            })?;
        Ok(Self { channel })
    }

    /// Like [`Client::connect`] but connects on first use and reconnects after failures.
    ///
    /// # Errors
    /// [`ClientError::Address`] or a TLS configuration error.
    pub fn lazy(addr: &str, creds: &Credentials) -> Result<Self, ClientError> {
        let endpoint = endpoint(addr)?;
        let connector = connector(addr, creds)?;
        Ok(Self {
            channel: endpoint.connect_with_connector_lazy(connector),
        })
    }

    /// Connects to `agency`'s API with the certificate of `role` from a `federation.json`.
    ///
    /// # Errors
    /// [`ClientError::UnknownAgency`], or as [`Credentials::load`] and [`Client::connect`].
    pub async fn from_federation(
        fed: &FederationFile,
        agency: &str,
        role: ClientRole,
    ) -> Result<Self, ClientError> {
        let (addr, creds) = federation_credentials(fed, agency, role)?;
        Self::connect(&addr, &creds).await
    }

    /// The Agency API.
    pub fn agency(&self) -> AgencyClient<Channel> {
        AgencyClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// The Admin API.
    pub fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel.clone())
    }

    /// The Audit API.
    pub fn audit(&self) -> AuditClient<Channel> {
        AuditClient::new(self.channel.clone()).max_decoding_message_size(256 << 20)
    }

    /// The underlying channel, for other generated clients (health, reflection).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Sends a NOTICE to one agency; returns its message id.
    ///
    /// # Errors
    /// [`ClientError::Status`] with the node's answer.
    pub async fn send_notice(
        &self,
        to: &str,
        service: &str,
        payload: impl Into<antar_proto::prost::bytes::Bytes>,
    ) -> Result<String, ClientError> {
        let resp = self
            .agency()
            .send(wire::SendRequest {
                kind: wire::Kind::Notice as i32,
                recipients: vec![to.to_owned()],
                service: service.to_owned(),
                payload: payload.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        resp.message_ids
            .into_iter()
            .next()
            .ok_or_else(|| ClientError::Status(tonic::Status::internal("node returned no message id")))
    }
}

/// The API address and credentials of `agency` for `role` in a federation file.
///
/// # Errors
/// [`ClientError::UnknownAgency`], [`ClientError::Missing`], or as [`Credentials::load`].
pub fn federation_credentials(
    fed: &FederationFile,
    agency: &str,
    role: ClientRole,
) -> Result<(String, Credentials), ClientError> {
    federation_credentials_at(fed, agency, role, None)
}

/// [`federation_credentials`], dialling `addr` instead of the file's
/// address when it is given (the file then need not have one).
///
/// # Errors
/// As [`federation_credentials`].
pub fn federation_credentials_at(
    fed: &FederationFile,
    agency: &str,
    role: ClientRole,
    addr: Option<&str>,
) -> Result<(String, Credentials), ClientError> {
    let a = fed.agency(agency).ok_or_else(|| ClientError::UnknownAgency {
        agency: agency.to_owned(),
        known: fed
            .agencies
            .iter()
            .map(|a| a.id.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })?;
    let ((cert_field, cert), (key_field, key)) = match role {
        ClientRole::App => (("app_cert", &a.app_cert), ("app_key", &a.app_key)),
        ClientRole::Admin => (("admin_cert", &a.admin_cert), ("admin_key", &a.admin_key)),
        ClientRole::Auditor => (("auditor_cert", &a.auditor_cert), ("auditor_key", &a.auditor_key)),
    };
    let (addr_field, addr) = match (addr, role) {
        (Some(given), _) => ("address", given),
        (None, ClientRole::Admin) => ("admin_addr", a.admin_addr.as_str()),
        (None, _) => ("api_addr", a.api_addr.as_str()),
    };
    let missing = |field| ClientError::Missing {
        agency: agency.to_owned(),
        field,
    };
    if addr.is_empty() {
        return Err(missing(addr_field));
    }
    for (field, path) in [("api_ca", &a.api_ca), (cert_field, cert), (key_field, key)] {
        if path.as_os_str().is_empty() {
            return Err(missing(field));
        }
    }
    Ok((addr.to_owned(), Credentials::load(&a.api_ca, cert, key)?))
}

fn endpoint(addr: &str) -> Result<Endpoint, ClientError> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| ClientError::Address(addr.to_owned()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true))
}

type Connector = tower::util::BoxCloneSyncService<
    http::Uri,
    TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    io::Error,
>;

fn connector(addr: &str, creds: &Credentials) -> Result<Connector, ClientError> {
    let config =
        antar_pki::tls::api_client_config(&creds.ca_der, creds.cert_chain.clone(), creds.key_der.clone())?;
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']))
        .ok_or_else(|| ClientError::Address(addr.to_owned()))?;
    let server_name =
        ServerName::try_from(host.to_owned()).map_err(|_| ClientError::Address(addr.to_owned()))?;
    let tls = TlsConnector::from(Arc::clone(&config));
    let addr = addr.to_owned();
    Ok(tower::util::BoxCloneSyncService::new(tower::service_fn(
        move |_: http::Uri| {
            let (addr, tls, server_name) = (addr.clone(), tls.clone(), server_name.clone());
            async move {
                let tcp = TcpStream::connect(&addr).await?;
                tcp.set_nodelay(true)?;
                let stream = tls.connect(server_name, tcp).await?;
                Ok::<_, io::Error>(TokioIo::new(stream))
            }
        },
    )))
}

/// An error with its sources, on one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let next = c.to_string();
        if !s.contains(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = c.source();
    }
    s
}
