//! A whole local federation on one machine (DESIGN.md §8): finance, health,
//! registry and a relay hub; finance and health peered directly, registry
//! reached only through the hub. Used by `antar dev` and the test harness.
//!
//! Certificates are generated on first use and reused afterwards; node
//! configs and `federation.json` are rewritten for the addresses of each run.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use antar_core::{AgencyId, Role};
use antar_pki::federation_file::{AgencyEntry, FederationFile};
use antar_pki::layout::{self, FederationDir, NodeDir};
use antar_pki::PkiError;

use crate::config::{Access, App, Limits, Listen, Log, NodeConfig, Peer, Receipts, Tls};

/// The federation name of `antar dev`.
pub const DEV_FEDERATION: &str = "gov.example";

/// Name of the app, admin and auditor certificates made for every dev agency.
pub const DEV_CLIENT: &str = "dev";

/// One node of a local federation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgencySpec {
    /// Its agency id.
    pub id: String,
    /// Agencies it is peered with directly.
    pub peers: Vec<String>,
    /// Its default route (a hub), if any.
    pub default_route: Option<String>,
}

impl AgencySpec {
    fn new(id: &str, peers: &[&str], default_route: Option<&str>) -> Self {
        Self {
            id: id.to_owned(),
            peers: peers.iter().map(|s| (*s).to_owned()).collect(),
            default_route: default_route.map(str::to_owned),
        }
    }
}

/// finance, health, registry and hub, as DESIGN.md §8 lays them out.
pub fn standard_topology() -> Vec<AgencySpec> {
    vec![
        AgencySpec::new("finance", &["health", "hub"], Some("hub")),
        AgencySpec::new("health", &["finance", "hub"], Some("hub")),
        AgencySpec::new("registry", &["hub"], Some("hub")),
        AgencySpec::new("hub", &["finance", "health", "registry"], None),
    ]
}

/// The four addresses of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addrs {
    /// API listener.
    pub api: SocketAddr,
    /// Peer listener.
    pub peer: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// Metrics listener.
    pub metrics: SocketAddr,
}

/// Where a local federation keeps its files under its directory.
#[derive(Debug, Clone)]
pub struct DevLayout {
    dir: PathBuf,
}

impl DevLayout {
    /// The layout under `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The federation operator's directory (`federation/`).
    pub fn federation_dir(&self) -> FederationDir {
        FederationDir::new(self.dir.join("federation"))
    }

    /// An agency's certificate directory (`<agency>/certs/`).
    pub fn node_dir(&self, agency: &str) -> NodeDir {
        NodeDir::new(self.dir.join(agency).join("certs"))
    }

    /// An agency's sled directory (`<agency>/data/`).
    pub fn data_dir(&self, agency: &str) -> PathBuf {
        self.dir.join(agency).join("data")
    }

    /// An agency's node config (`<agency>/node.toml`).
    pub fn config_path(&self, agency: &str) -> PathBuf {
        self.dir.join(agency).join("node.toml")
    }

    /// `federation.json`.
    pub fn federation_json(&self) -> PathBuf {
        self.dir.join("federation.json")
    }

    /// Creates whatever certificates are missing: the federation root, and
    /// per agency its node certificates, local CA, API certificate and the
    /// `dev` app, admin and auditor certificates. Returns true when anything
    /// was created.
    ///
    /// # Errors
    /// [`PkiError`] when a certificate cannot be generated or written.
    pub fn ensure_pki(&self, agencies: &[AgencySpec]) -> Result<bool, PkiError> {
        let fed = self.federation_dir();
        let mut created = false;
        if !fed.root_cert().exists() {
            layout::init_federation(&fed, DEV_FEDERATION, antar_pki::ROOT_VALID_DAYS, false)?;
            created = true;
        }
        let dns = vec!["localhost".to_owned()];
        let ips = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
        for spec in agencies {
            let agency = AgencyId::parse(&spec.id)?;
            let node = self.node_dir(&spec.id);
            if !node.signing_cert().exists() {
                layout::issue_node(&fed, &node, &agency, &dns, &ips, antar_pki::NODE_VALID_DAYS, true)?;
                created = true;
            }
            if !node.api_cert().exists() {
                layout::init_local_ca(
                    &node,
                    DEV_FEDERATION,
                    &agency,
                    &dns,
                    &ips,
                    antar_pki::LOCAL_CA_VALID_DAYS,
                    antar_pki::NODE_VALID_DAYS,
                    true,
                )?;
                created = true;
            }
            for role in client_roles() {
                if !node.client_files(&role)?.0.exists() {
                    layout::issue_client(
                        &node,
                        DEV_FEDERATION,
                        &agency,
                        &role,
                        antar_pki::CLIENT_VALID_DAYS,
                        true,
                    )?;
                    created = true;
                }
            }
        }
        Ok(created)
    }

    /// The config of one dev node, with every agency's addresses known.
    pub fn node_config(&self, spec: &AgencySpec, addrs: &BTreeMap<String, Addrs>) -> NodeConfig {
        let node = self.node_dir(&spec.id);
        let own = addrs.get(&spec.id).copied().unwrap_or(Addrs {
            api: SocketAddr::from(([127, 0, 0, 1], 0)),
            peer: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics: SocketAddr::from(([127, 0, 0, 1], 0)),
        });
        NodeConfig {
            federation: DEV_FEDERATION.to_owned(),
            agency: spec.id.clone(),
            data_dir: self.data_dir(&spec.id),
            listen: Listen {
                api: own.api,
                peer: own.peer,
                admin: Some(own.admin),
                metrics: Some(own.metrics),
            },
            tls: Tls {
                federation_root: node.federation_root(),
                node_cert: node.tls_cert(),
                node_key: node.tls_key(),
                signing_cert: node.signing_cert(),
                signing_key: node.signing_key(),
                local_ca: node.local_ca_cert(),
                api_cert: node.api_cert(),
                api_key: node.api_key(),
                revocation_list: None,
                local_revocation_list: None,
            },
            peers: spec
                .peers
                .iter()
                .map(|p| Peer {
                    agency: p.clone(),
                    addr: addrs.get(p).map(|a| a.peer.to_string()).unwrap_or_default(),
                })
                .collect(),
            routes: BTreeMap::new(),
            default_route: spec.default_route.clone(),
            directory: addrs.keys().cloned().collect(),
            apps: vec![App {
                name: DEV_CLIENT.to_owned(),
                services: vec!["*".to_owned()],
            }],
            access: vec![Access {
                service: "*".to_owned(),
                allow: vec!["*".to_owned()],
            }],
            limits: Limits::default(),
            envelopes: Default::default(),
            receipts: Receipts::default(),
            log: Log::default(),
        }
    }

    /// `federation.json` for these addresses, paths relative to the directory.
    ///
    /// # Errors
    /// [`PkiError`] for a client role without files (never for dev roles).
    pub fn federation_file(
        &self,
        agencies: &[AgencySpec],
        addrs: &BTreeMap<String, Addrs>,
    ) -> Result<FederationFile, PkiError> {
        let rel = |p: PathBuf| p.strip_prefix(&self.dir).map(Path::to_path_buf).unwrap_or(p);
        let mut entries = Vec::new();
        for spec in agencies {
            let node = self.node_dir(&spec.id);
            let a = addrs.get(&spec.id).copied();
            let addr = |f: fn(&Addrs) -> SocketAddr| a.as_ref().map(|a| f(a).to_string()).unwrap_or_default();
            let [app, admin, auditor] = client_roles();
            let (app_cert, app_key) = node.client_files(&app)?;
            let (admin_cert, admin_key) = node.client_files(&admin)?;
            let (auditor_cert, auditor_key) = node.client_files(&auditor)?;
            entries.push(AgencyEntry {
                id: spec.id.clone(),
                api_addr: addr(|a| a.api),
                peer_addr: addr(|a| a.peer),
                admin_addr: addr(|a| a.admin),
                metrics_addr: addr(|a| a.metrics),
                api_ca: rel(node.local_ca_cert()),
                app_cert: rel(app_cert),
                app_key: rel(app_key),
                admin_cert: rel(admin_cert),
                admin_key: rel(admin_key),
                auditor_cert: rel(auditor_cert),
                auditor_key: rel(auditor_key),
            });
        }
        Ok(FederationFile {
            federation: DEV_FEDERATION.to_owned(),
            root_ca: rel(self.federation_dir().root_cert()),
            agencies: entries,
        })
    }
}

fn client_roles() -> [Role; 3] {
    [
        Role::App(DEV_CLIENT.to_owned()),
        Role::Admin(DEV_CLIENT.to_owned()),
        Role::Auditor(DEV_CLIENT.to_owned()),
    ]
}
