//! `antar pki`: the federation root, node certificates, agency-local CAs,
//! client certificates and revocation lists, on the layout documented in
//! `certs/README.md`.
//!
//! A thin clap front: every workflow lives in `antar_pki::layout`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use antar_pki::layout::{self, FederationDir, Inspected, NodeDir};
use antar_pki::{AgencyId, CertInfo, CrlInfo, Role};
use anyhow::Context as _;

/// The `antar pki` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum PkiCommand {
    /// Create the federation root CA (ECDSA P-256, 10 years by default).
    ///
    /// Writes root.crt and root.key (mode 0600) into the federation
    /// directory. Keep root.key offline; every node gets a copy of root.crt.
    /// An existing root is never replaced without --force.
    #[command(
        after_help = "Example:\n  antar pki init-federation --federation gov.example --dir certs/federation"
    )]
    InitFederation {
        /// Federation name (SPIFFE trust domain), e.g. gov.example.
        #[arg(long, env = "ANTAR_FEDERATION_NAME")]
        federation: String,
        /// Federation directory to write root.crt and root.key into.
        #[arg(long, default_value = "certs/federation")]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = antar_pki::ROOT_VALID_DAYS)]
        days: u32,
        /// Replace an existing root (every node must then be reissued).
        #[arg(long)]
        force: bool,
    },

    /// Issue a node its TLS certificate (ECDSA P-256, serverAuth+clientAuth)
    /// and its signing certificate (Ed25519), both from the federation root.
    ///
    /// Writes node-tls.crt/.key, node-signing.crt/.key and
    /// federation-root.crt into the node directory. The federation name is
    /// read from the root. The --dns and --ip names are those peers may use
    /// to reach this node; peers verify the node's identity, not the name.
    #[command(
        after_help = "Example:\n  antar pki issue-node --federation-dir certs/federation --agency tax \\\n      --node-dir certs/tax --dns tax.gov.example --ip 10.0.0.5"
    )]
    IssueNode {
        /// Federation directory holding root.crt and root.key.
        #[arg(long, default_value = "certs/federation")]
        federation_dir: PathBuf,
        /// The node's agency id, e.g. tax or health.province-3.
        #[arg(long)]
        agency: AgencyId,
        /// Node directory to write into.
        #[arg(long)]
        node_dir: PathBuf,
        /// DNS name of the node's peer listener (repeatable).
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// IP address of the node's peer listener (repeatable).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// Validity in days.
        #[arg(long, default_value_t = antar_pki::NODE_VALID_DAYS)]
        days: u32,
        /// Replace existing node certificates and keys.
        #[arg(long)]
        force: bool,
    },

    /// Create a node's agency-local CA and its API listener certificate.
    ///
    /// The local CA is never chained to the federation root: it is the only
    /// CA the API listener trusts, and it issues the app, admin and auditor
    /// certificates. Writes local-ca.crt/.key and api-server.crt/.key. The
    /// federation and agency default to those of the node's node-tls.crt.
    #[command(
        after_help = "Example:\n  antar pki init-local-ca --node-dir certs/tax --dns localhost --ip 127.0.0.1"
    )]
    InitLocalCa {
        /// Node directory to write into.
        #[arg(long)]
        node_dir: PathBuf,
        /// Federation name; default: from the node's node-tls.crt.
        #[arg(long, env = "ANTAR_FEDERATION_NAME")]
        federation: Option<String>,
        /// Agency id; default: from the node's node-tls.crt.
        #[arg(long)]
        agency: Option<AgencyId>,
        /// DNS name agency systems use to reach the API listener (repeatable).
        #[arg(long = "dns", default_values_t = [String::from("localhost")])]
        dns: Vec<String>,
        /// IP address agency systems use to reach the API listener (repeatable).
        #[arg(long = "ip", default_values_t = [IpAddr::V4(Ipv4Addr::LOCALHOST)])]
        ips: Vec<IpAddr>,
        /// Validity of the local CA in days.
        #[arg(long, default_value_t = antar_pki::LOCAL_CA_VALID_DAYS)]
        days: u32,
        /// Validity of the API server certificate in days.
        #[arg(long, default_value_t = antar_pki::NODE_VALID_DAYS)]
        server_days: u32,
        /// Replace an existing local CA (every client must then be reissued).
        #[arg(long)]
        force: bool,
    },

    /// Issue an app, admin or auditor client certificate from the node's
    /// local CA (ECDSA P-256, clientAuth).
    ///
    /// Writes clients/<role>-<name>.crt and .key (mode 0600) into the node
    /// directory; hand both, with local-ca.crt, to the certificate's owner.
    /// The role in the certificate's URI decides what it may do.
    #[command(
        after_help = "Example:\n  antar pki issue-client --node-dir certs/tax --role app --name portal"
    )]
    IssueClient {
        /// Node directory holding local-ca.crt and local-ca.key.
        #[arg(long)]
        node_dir: PathBuf,
        /// What the certificate may do.
        #[arg(long, value_enum)]
        role: ClientRole,
        /// The client's name, e.g. portal (lowercase, [a-z0-9._-]).
        #[arg(long, value_parser = client_name)]
        name: String,
        /// Federation name; default: from the node's node-tls.crt.
        #[arg(long, env = "ANTAR_FEDERATION_NAME")]
        federation: Option<String>,
        /// Agency id; default: from the node's node-tls.crt.
        #[arg(long)]
        agency: Option<AgencyId>,
        /// Validity in days.
        #[arg(long, default_value_t = antar_pki::CLIENT_VALID_DAYS)]
        days: u32,
        /// Replace an existing certificate of this client.
        #[arg(long)]
        force: bool,
    },

    /// Revoke node certificates and publish a new CRL signed by the
    /// federation root; or, with --node-dir, app, admin and auditor
    /// certificates and a CRL signed by that node's agency-local CA.
    ///
    /// Serials accumulate in revoked-serials.txt; revoked.crl lists them
    /// all. Copy revoked.crl to every node (e.g. as federation.crl) and
    /// name it in the node's config as tls.revocation_list. With
    /// --node-dir: local-revoked-serials.txt and local-revoked.crl in the
    /// node directory, which the node's tls.local_revocation_list names.
    /// Either takes effect at `antar admin reload` (or SIGHUP). With no
    /// --cert or --serial it re-publishes the list with a fresh nextUpdate
    /// (on a new federation: publishes the first, empty, list).
    #[command(
        after_help = "Example:\n  antar pki revoke --federation-dir certs/federation --cert certs/tax/node-signing.crt\n  antar pki revoke --federation-dir certs/federation --serial 4f3a09c1d2e3f405a1b2c3d4e5f60718\n  antar pki revoke --node-dir certs/tax --cert certs/tax/clients/app-portal.crt"
    )]
    Revoke {
        /// Federation directory holding root.crt and root.key.
        #[arg(long, default_value = "certs/federation")]
        federation_dir: PathBuf,
        /// Revoke client certificates of this node directory's agency-local
        /// CA (local-ca.crt and local-ca.key) instead.
        #[arg(long, conflicts_with = "federation_dir")]
        node_dir: Option<PathBuf>,
        /// Certificate file to revoke (repeatable).
        #[arg(long = "cert")]
        certs: Vec<PathBuf>,
        /// Serial number to revoke, hex (repeatable).
        #[arg(long = "serial")]
        serials: Vec<String>,
        /// Days until the CRL's nextUpdate.
        #[arg(long, default_value_t = antar_pki::CRL_NEXT_UPDATE_DAYS)]
        next_update_days: u32,
    },

    /// Show what certificate or CRL files hold: subject, issuer, serial,
    /// identity, validity, key, usages, SANs, fingerprint.
    #[command(
        after_help = "Example:\n  antar pki show certs/tax/node-tls.crt certs/federation/revoked.crl\n  antar pki show --json certs/tax/clients/app-portal.crt"
    )]
    Show {
        /// PEM files to show.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print JSON, one object per file.
        #[arg(long)]
        json: bool,
    },
}

/// The role of a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientRole {
    /// An agency system that sends and receives messages.
    App,
    /// An operator of the node.
    Admin,
    /// A reader of the tamper-evident log.
    Auditor,
}

/// Runs one `antar pki` subcommand.
///
/// # Errors
/// Whatever the workflow reports, with the files involved named.
pub fn run(cmd: PkiCommand) -> anyhow::Result<()> {
    match cmd {
        PkiCommand::InitFederation {
            federation,
            dir,
            days,
            force,
        } => {
            let written = layout::init_federation(&FederationDir::new(dir), &federation, days, force)?;
            report(&written);
        }
        PkiCommand::IssueNode {
            federation_dir,
            agency,
            node_dir,
            dns,
            ips,
            days,
            force,
        } => {
            let written = layout::issue_node(
                &FederationDir::new(federation_dir),
                &NodeDir::new(node_dir),
                &agency,
                &dns,
                &ips,
                days,
                force,
            )?;
            report(&written);
        }
        PkiCommand::InitLocalCa {
            node_dir,
            federation,
            agency,
            dns,
            ips,
            days,
            server_days,
            force,
        } => {
            let node = NodeDir::new(node_dir);
            let (federation, agency) = resolve(&node, federation, agency)?;
            let written =
                layout::init_local_ca(&node, &federation, &agency, &dns, &ips, days, server_days, force)?;
            report(&written);
        }
        PkiCommand::IssueClient {
            node_dir,
            role,
            name,
            federation,
            agency,
            days,
            force,
        } => {
            let node = NodeDir::new(node_dir);
            let (federation, agency) = resolve(&node, federation, agency)?;
            let role = match role {
                ClientRole::App => Role::App(name),
                ClientRole::Admin => Role::Admin(name),
                ClientRole::Auditor => Role::Auditor(name),
            };
            let written = layout::issue_client(&node, &federation, &agency, &role, days, force)?;
            report(&written);
        }
        PkiCommand::Revoke {
            federation_dir,
            node_dir,
            certs,
            serials,
            next_update_days,
        } => {
            // A serial means something only in its issuer's list: a
            // certificate from the other CA would be revoked nowhere.
            let (ca_path, ca_name, other) = match &node_dir {
                Some(dir) => (
                    NodeDir::new(dir).local_ca_cert(),
                    "this node's agency-local CA",
                    "A node certificate is revoked by the federation root (antar pki revoke --federation-dir <federation dir> --cert …); another agency's certificate only by that agency.",
                ),
                None => (
                    FederationDir::new(&federation_dir).root_cert(),
                    "the federation root",
                    "An app, admin or auditor certificate is revoked by its own agency's local CA: antar pki revoke --node-dir <that node's dir> --cert ….",
                ),
            };
            let ca_der = if certs.is_empty() {
                Vec::new()
            } else {
                antar_pki::read_cert_der(&ca_path)?
            };
            let mut revoke = Vec::with_capacity(certs.len() + serials.len());
            for path in &certs {
                let der = antar_pki::read_cert_der(path)?;
                let here = || format!("{}", path.display());
                if !antar_pki::issued_by(&der, &ca_der).with_context(here)? {
                    let issuer = CertInfo::from_der(&der).with_context(here)?.issuer;
                    anyhow::bail!(
                        "{} was not issued by {ca_name} ({}) but by {issuer}; nothing revoked. {other}",
                        path.display(),
                        ca_path.display()
                    );
                }
                revoke.push(antar_pki::serial_of(&der).with_context(here)?);
            }
            for s in &serials {
                revoke.push(antar_pki::parse_serial_hex(s)?);
            }
            let done = match &node_dir {
                Some(dir) => layout::revoke_local(&NodeDir::new(dir), &revoke, next_update_days)?,
                None => layout::revoke(&FederationDir::new(federation_dir), &revoke, next_update_days)?,
            };
            println!(
                "wrote {} (CRL number {}, {} revoked serial(s))",
                done.crl.display(),
                done.crl_number,
                done.serials.len()
            );
            if node_dir.is_some() {
                println!(
                    "name it in this node's config as tls.local_revocation_list, then `antar admin reload`"
                );
            } else {
                println!(
                    "copy it to every node and name it in each node's config as tls.revocation_list, then `antar admin reload` (or SIGHUP)"
                );
            }
        }
        PkiCommand::Show { files, json } => {
            for path in &files {
                let shown = layout::inspect_file(path)?;
                if json {
                    println!("{}", show_json(path, &shown));
                } else {
                    show_text(path, &shown);
                }
            }
        }
    }
    Ok(())
}

/// The federation and agency given on the command line, else the node's own.
fn resolve(
    node: &NodeDir,
    federation: Option<String>,
    agency: Option<AgencyId>,
) -> anyhow::Result<(String, AgencyId)> {
    if let (Some(f), Some(a)) = (&federation, &agency) {
        return Ok((f.clone(), a.clone()));
    }
    let identity = node.identity().with_context(|| {
        format!(
            "pass --federation and --agency, or run `antar pki issue-node --node-dir {}` first",
            node.dir().display()
        )
    })?;
    Ok((
        federation.unwrap_or(identity.federation),
        agency.unwrap_or(identity.agency),
    ))
}

fn report(written: &[PathBuf]) {
    for path in written {
        let private = path.extension().is_some_and(|e| e == "key");
        if private {
            println!("wrote {} (private key, mode 0600)", path.display());
        } else {
            println!("wrote {}", path.display());
        }
    }
}

fn show_text(path: &Path, shown: &Inspected) {
    match shown {
        Inspected::Certificates(certs) => {
            for (n, c) in certs.iter().enumerate() {
                if certs.len() > 1 {
                    println!("{} [{}]", path.display(), n + 1);
                } else {
                    println!("{}", path.display());
                }
                println!("  subject:            {}", c.subject);
                println!("  issuer:             {}", c.issuer);
                println!("  serial:             {}", c.serial_hex);
                println!("  identity:           {}", c.identity.as_deref().unwrap_or("-"));
                println!("  not before:         {}", c.not_before);
                println!("  not after:          {}", c.not_after);
                println!("  key:                {}", c.key_algorithm);
                println!("  key usage:          {}", list(&c.key_usage));
                println!("  extended key usage: {}", list(&c.extended_key_usage));
                println!("  SANs:               {}", list(&c.sans));
                println!("  CA:                 {}", if c.is_ca { "yes" } else { "no" });
                println!("  SHA-256:            {}", c.sha256_fingerprint);
            }
        }
        Inspected::Crl(crl) => {
            println!("{} (CRL)", path.display());
            println!("  issuer:             {}", crl.issuer);
            println!(
                "  CRL number:         {}",
                crl.crl_number.map_or_else(|| "-".to_owned(), |n| n.to_string())
            );
            println!("  this update:        {}", crl.this_update);
            println!(
                "  next update:        {}",
                crl.next_update.as_deref().unwrap_or("-")
            );
            println!("  revoked serials:    {}", crl.revoked_serials.len());
            for s in &crl.revoked_serials {
                println!("    {s}");
            }
        }
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(", ")
    }
}

fn show_json(path: &Path, shown: &Inspected) -> serde_json::Value {
    let cert = |c: &CertInfo| {
        serde_json::json!({
            "subject": c.subject,
            "issuer": c.issuer,
            "serial": c.serial_hex,
            "identity": c.identity,
            "not_before": c.not_before,
            "not_after": c.not_after,
            "key_algorithm": c.key_algorithm,
            "key_usage": c.key_usage,
            "extended_key_usage": c.extended_key_usage,
            "sans": c.sans,
            "is_ca": c.is_ca,
            "sha256_fingerprint": c.sha256_fingerprint,
        })
    };
    let crl = |c: &CrlInfo| {
        serde_json::json!({
            "issuer": c.issuer,
            "crl_number": c.crl_number,
            "this_update": c.this_update,
            "next_update": c.next_update,
            "revoked_serials": c.revoked_serials,
        })
    };
    match shown {
        Inspected::Certificates(certs) => serde_json::json!({
            "file": path.display().to_string(),
            "certificates": certs.iter().map(cert).collect::<Vec<_>>(),
        }),
        Inspected::Crl(c) => serde_json::json!({
            "file": path.display().to_string(),
            "crl": crl(c),
        }),
    }
}

/// `--name` of `issue-client`, checked before anything is made.
fn client_name(s: &str) -> Result<String, String> {
    if antar_core::id::valid_name(s) {
        Ok(s.to_owned())
    } else {
        Err("a client name is 1-63 lowercase letters, digits, '.', '_' or '-', e.g. portal".to_owned())
    }
}
