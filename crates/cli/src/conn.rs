//! One way to name a connection for every client command: a
//! `federation.json` and an agency, or an address and PEM files; each also
//! from `ANTAR_*` environment variables. An address and all three PEM
//! files win over a federation file.

use std::path::PathBuf;

use antar_client::{Client, ClientRole, Credentials};
use antar_pki::federation_file::FederationFile;
use anyhow::Context as _;

/// Where the node is and which certificate to present.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnArgs {
    /// A federation.json (as written by `antar dev`); use with --agency.
    /// --addr, --ca, --cert and --key given together are used instead.
    #[arg(long, env = "ANTAR_FEDERATION", global = true)]
    pub federation: Option<PathBuf>,
    /// The agency whose node to talk to, from --federation.
    #[arg(long, env = "ANTAR_AGENCY", global = true)]
    pub agency: Option<String>,
    /// The node's API address, host:port (instead of --federation).
    #[arg(long, env = "ANTAR_ADDR", global = true)]
    pub addr: Option<String>,
    /// PEM of the agency-local CA that issued the node's API certificate.
    #[arg(long, env = "ANTAR_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// PEM client certificate (app, admin or auditor, as the command needs).
    #[arg(long, env = "ANTAR_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, env = "ANTAR_KEY", global = true)]
    pub key: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

impl ConnArgs {
    /// Connects with the certificate of `role`.
    pub async fn connect(&self, role: ClientRole) -> anyhow::Result<Client> {
        let (addr, creds) = self.resolve(role)?;
        Client::connect(&addr, &creds).await.with_context(|| {
            format!("is the node running? (`antar dev` or `antar node run`), and is {addr} its API address?")
        })
    }

    fn resolve(&self, role: ClientRole) -> anyhow::Result<(String, Credentials)> {
        // PEM files given in full win over a federation file, which may be
        // set for the whole shell (`ANTAR_FEDERATION`); given in part
        // beside one, they would be ignored, so that is an error.
        let pem = [
            ("--ca", self.ca.is_some()),
            ("--cert", self.cert.is_some()),
            ("--key", self.key.is_some()),
        ];
        let complete = self.addr.is_some() && pem.iter().all(|(_, given)| *given);
        if let (Some(path), false) = (&self.federation, complete) {
            let given: Vec<&str> = pem.iter().filter(|(_, g)| *g).map(|(name, _)| *name).collect();
            if !given.is_empty() {
                anyhow::bail!(
                    "--federation {} (or ANTAR_FEDERATION) and {} given: pass all of --addr, --ca, --cert and --key to use PEM files, or none of them",
                    path.display(),
                    given.join(", ")
                );
            }
            let fed = FederationFile::load(path)?;
            let agency = self.agency.as_deref().with_context(|| {
                let ids: Vec<&str> = fed.agencies.iter().map(|a| a.id.as_str()).collect();
                format!("--federation needs --agency (one of: {})", ids.join(", "))
            })?;
            return Ok(antar_client::federation_credentials_at(
                &fed,
                agency,
                role,
                self.addr.as_deref(),
            )?);
        }
        let missing = |what: &str| {
            anyhow::anyhow!(
                "no connection given: pass --federation FILE --agency ID, or --addr, --ca, --cert and --key (missing {what})"
            )
        };
        let addr = self.addr.clone().ok_or_else(|| missing("--addr"))?;
        let ca = self.ca.as_ref().ok_or_else(|| missing("--ca"))?;
        let cert = self.cert.as_ref().ok_or_else(|| missing("--cert"))?;
        let key = self.key.as_ref().ok_or_else(|| missing("--key"))?;
        Ok((addr, Credentials::load(ca, cert, key)?))
    }
}
