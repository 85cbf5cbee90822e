//! `antar`: the one binary of Antar. A thin clap front over the node, the
//! PKI and the client; see `antar --help`.

mod audit_cmds;
mod bench;
mod client_cmds;
mod conn;
mod dev;
mod exchange;
mod machine;
mod pki;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: sled copies whole leaf nodes on
/// writes, and glibc's malloc and free were ~17% of the samples of a bench
/// process (two nodes and the load generator) allocating and freeing them
/// (docs/benchmarks.md, "Allocator").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Transparent huge pages off for this process, unless the operator chose
/// with mimalloc's own `MIMALLOC_ALLOW_THP` (0 or 1), which mimalloc has
/// already applied by the time `main` runs.
///
/// With them on, mimalloc asks for huge pages on its arenas and gives freed
/// pages back a second later. A later fault in such a range zeroes a whole
/// 2 MiB page where 4 KiB were wanted: a sixth of a bench process's samples
/// were the kernel's `clear_page_erms` under mimalloc's page set-up. Off,
/// the closed loop costs 6–7 % less CPU (a third less system time, a few
/// percent more user time) and the process a fifth less RSS
/// (docs/benchmarks.md, "Transparent huge pages").
///
/// The flag holds for the process's later faults whatever the system's
/// setting (`always` or `madvise`), and children inherit it. If the kernel
/// refuses, the node runs as before: a note in the log, nothing else.
fn huge_pages_off() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
            // Logging is not set up yet; this is the one line it would carry.
            eprintln!("note: transparent huge pages stay on for this process: {e}");
        }
    }
}

/// Exit code for a configuration that cannot be used (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// Antar: inter-agency message exchange gateway.
///
/// Agency systems hand their node envelopes for other agencies; nodes move
/// signed envelopes through durable store-and-forward queues over mutual TLS
/// and bring back signed delivery receipts.
#[derive(Debug, Parser)]
#[command(
    name = "antar",
    version,
    after_help = "Start here:\n  antar dev                      # a local federation: finance, health, registry, hub\n  antar send --federation .antar-dev/federation.json --agency finance \\\n      --to registry --service birth.lookup --data 'hello'\n\nEvery subcommand has --help with an example."
)]
struct Cli {
    /// Log filter (tracing syntax), e.g. info or antar_node=debug.
    #[arg(long, global = true, env = "ANTAR_LOG")]
    log: Option<String>,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole local federation (finance, health, registry, hub) in one process.
    #[command(
        after_help = "Example:\n  antar dev --dir .antar-dev\n\nCertificates are made on the first run and reused; a second run on the\nsame directory resumes with every queued envelope intact. Ctrl-C stops it."
    )]
    Dev(dev::DevArgs),
    /// Run or check a node.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Manage the federation PKI: roots, node and client certificates, revocation.
    #[command(subcommand)]
    Pki(pki::PkiCommand),
    /// Send an envelope to one or more agencies.
    Send(client_cmds::SendArgs),
    /// Receive deliveries from this agency's inbox and acknowledge them.
    Inbox(client_cmds::InboxArgs),
    /// Show a message's state and every receipt about it.
    Track(client_cmds::TrackArgs),
    /// Send a REQUEST and wait for its RESPONSE.
    Call(exchange::CallArgs),
    /// Answer a REQUEST from this agency's inbox with a RESPONSE.
    Reply(exchange::ReplyArgs),
    /// List the receipts this node holds for its agency's messages; --follow streams new ones.
    Receipts(exchange::ReceiptsArgs),
    /// Administer a node: status, peers, drain, reload, dead letters.
    #[command(subcommand)]
    Admin(client_cmds::AdminCommand),
    /// Audit a node's tamper-evident log: query, prove, export, verify offline.
    #[command(subcommand)]
    Audit(audit_cmds::AuditCommand),
    /// Measure the whole path: two real nodes, mTLS, sled, signatures, receipts.
    Bench(bench::BenchArgs),
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Run a node until SIGTERM or Ctrl-C; SIGHUP reloads its config and revocation lists.
    #[command(
        after_help = "Example:\n  antar node run --config /etc/antar/node.toml\n\nEnvironment overrides: ANTAR_<SECTION>__<KEY>, e.g. ANTAR_LIMITS__MAX_HOPS=4."
    )]
    Run {
        /// The node's TOML config.
        #[arg(long, env = "ANTAR_CONFIG")]
        config: PathBuf,
    },
    /// Check a config file and print it with every default filled in.
    #[command(after_help = "Example:\n  antar node check-config /etc/antar/node.toml")]
    CheckConfig {
        /// The node's TOML config.
        #[arg(env = "ANTAR_CONFIG")]
        config: PathBuf,
    },
}

/// The node's config, with `ANTAR_*` overrides, checked, its `log.level`
/// included (a filter the node could not use would be replaced by `info`
/// without a word).
fn load_config(path: &std::path::Path) -> Result<antar_node::NodeConfig, String> {
    let config = antar_node::NodeConfig::load(path, std::env::vars()).map_err(|e| e.to_string())?;
    tracing_subscriber::EnvFilter::try_new(&config.log.level).map_err(|e| {
        format!(
            "log.level: {:?} is not a tracing filter such as \"info,antar_node=debug\": {e}",
            config.log.level
        )
    })?;
    Ok(config)
}

fn init_tracing(filter: Option<&str>, json: bool) {
    let wanted = filter.unwrap_or("info");
    let filter = tracing_subscriber::EnvFilter::try_new(wanted).unwrap_or_else(|e| {
        eprintln!("warning: --log/ANTAR_LOG {wanted:?} is not a tracing filter ({e}); logging at info");
        tracing_subscriber::EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    huge_pages_off();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let quiet_default = match &cli.command {
        Command::Node(_) | Command::Dev(_) => "info",
        _ => "warn",
    };
    match cli.command {
        Command::Node(NodeCommand::Run { config }) => {
            let loaded = match load_config(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: invalid config {}:\n{e}", config.display());
                    return Ok(ExitCode::from(EXIT_CONFIG));
                }
            };
            let json = cli.log_json || loaded.log.format == "json";
            init_tracing(Some(cli.log.as_deref().unwrap_or(&loaded.log.level)), json);
            run_node(loaded, config).await
        }
        Command::Node(NodeCommand::CheckConfig { config }) => match load_config(&config) {
            Ok(c) => {
                println!(
                    "# {} is valid; effective configuration:\n{}",
                    config.display(),
                    c.to_toml()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("error: invalid config {}:\n{e}", config.display());
                Ok(ExitCode::from(EXIT_CONFIG))
            }
        },
        command => {
            init_tracing(Some(cli.log.as_deref().unwrap_or(quiet_default)), cli.log_json);
            match command {
                Command::Dev(args) => dev::run(args).await,
                Command::Pki(cmd) => pki::run(cmd).map(|()| ExitCode::SUCCESS),
                Command::Send(args) => client_cmds::send(args).await,
                Command::Inbox(args) => client_cmds::inbox(args).await,
                Command::Track(args) => client_cmds::track(args).await,
                Command::Call(args) => exchange::call(args).await,
                Command::Reply(args) => exchange::reply(args).await,
                Command::Receipts(args) => exchange::receipts(args).await,
                Command::Admin(cmd) => client_cmds::admin(cmd).await,
                Command::Bench(args) => bench::run(args).await,
                Command::Audit(cmd) => audit_cmds::run(cmd).await,
                Command::Node(_) => unreachable!("handled above"),
            }
        }
    }
}

async fn run_node(config: antar_node::NodeConfig, path: PathBuf) -> anyhow::Result<ExitCode> {
    // Before anything slow: a SIGHUP during start-up (a `systemctl reload`)
    // must not kill the node, nor a SIGTERM go unheeded (PID 1 in a
    // container ignores it without a handler); both wait for the node.
    let mut signals = Signals::install();
    let listeners = antar_node::Listeners::bind(&config).await?;
    let node = match antar_node::Node::start(config, Some(path), listeners).await {
        Ok(n) => n,
        Err(e @ (antar_node::RunError::Config(_) | antar_node::RunError::Pki(_))) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
        Err(e) => return Err(e.into()),
    };
    signals
        .wait(|| match node.reload() {
            Ok(r) => tracing::info!(
                revoked = r.revoked_serials,
                local_revoked = r.local_revoked_serials,
                "reloaded on SIGHUP"
            ),
            Err(e) => tracing::error!(error = %e, "reload on SIGHUP failed; the old configuration stays"),
        })
        .await;
    tokio::select! {
        stopped = node.stop() => stopped?,
        () = signals.again() => stopped_at_once(),
    }
    Ok(ExitCode::SUCCESS)
}

/// What a second Ctrl-C or SIGTERM during a stop does: the process ends
/// now, nothing more flushed or joined, as after `kill -9`, which loses no
/// acknowledged work (the store replays its journal at the next start).
/// Exit status 130.
pub(crate) fn stopped_at_once() -> ! {
    eprintln!(
        "antar: second signal during the stop: exiting now without waiting for it (acknowledged work is on disk; the next start recovers the store)"
    );
    std::process::exit(130)
}

/// SIGTERM and SIGHUP, caught from when they are installed: one that
/// comes before [`Signals::wait`] is acted on there. Ctrl-C (SIGINT) is
/// caught from the first `wait` on, so it still ends a start-up that
/// hangs; from then on every one is caught, including one that comes
/// while a SIGHUP's reload runs. A signal that cannot be installed is
/// never waited for.
pub(crate) struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    pub(crate) fn install() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Self {
            term: signal(SignalKind::terminate()).ok(),
            hup: signal(SignalKind::hangup()).ok(),
            int: None,
        }
    }

    /// Waits for SIGTERM or Ctrl-C; calls `on_hup` on each SIGHUP.
    pub(crate) async fn wait(&mut self, on_hup: impl Fn()) {
        use tokio::signal::unix::{signal, SignalKind};
        if self.int.is_none() {
            self.int = signal(SignalKind::interrupt()).ok();
        }
        loop {
            tokio::select! {
                () = next(&mut self.int) => return,
                () = next(&mut self.term) => return,
                () = next(&mut self.hup) => on_hup(),
            }
        }
    }

    /// The next SIGTERM or Ctrl-C after [`Signals::wait`] returned: an
    /// operator who will not wait for the stop. SIGHUPs are ignored.
    pub(crate) async fn again(&mut self) {
        self.wait(|| tracing::info!("SIGHUP during the stop ignored"))
            .await;
    }
}

/// The next delivery of `signal`; never, when it is not installed.
async fn next(signal: &mut Option<tokio::signal::unix::Signal>) {
    let Some(s) = signal else {
        return std::future::pending().await;
    };
    if s.recv().await.is_none() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
