//! `antar dev`: the local federation of DESIGN.md §8 in one process.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use tokio::net::TcpListener;

use antar_node::dev::{standard_topology, Addrs, DevLayout};
use antar_node::{Listeners, Node};

/// `antar dev` arguments.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Directory for certificates, node configs, sled stores and federation.json.
    #[arg(long, default_value = ".antar-dev")]
    dir: PathBuf,
    /// First port of a block of 16 (API, peer, admin, metrics per agency);
    /// 0 picks free ports. Without it: 7400, or free ports when one of
    /// 7400-7415 is taken (say, by another `antar dev`). federation.json
    /// always holds the addresses bound.
    #[arg(long)]
    base_port: Option<u16>,
}

/// The block `antar dev` binds when not told otherwise.
const DEFAULT_BASE_PORT: u16 = 7400;

async fn bind(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await
}

/// Four listeners (API, peer, admin, metrics) for each of `agencies`
/// agencies, from port `base` on (the caller checked the block fits), or
/// on free ports when `base` is 0.
async fn bind_block(base: u16, agencies: u16) -> std::io::Result<Vec<[TcpListener; 4]>> {
    let mut bound = Vec::with_capacity(usize::from(agencies));
    for i in 0..agencies {
        let port = |k: u16| if base == 0 { 0 } else { base + i * 4 + k };
        bound.push([
            bind(port(0)).await?,
            bind(port(1)).await?,
            bind(port(2)).await?,
            bind(port(3)).await?,
        ]);
    }
    Ok(bound)
}

/// The listeners of `agencies` agencies: from `--base-port` as given, else
/// from 7400, or on free ports when that block is taken.
async fn listeners(base_port: Option<u16>, agencies: u16) -> anyhow::Result<Vec<[TcpListener; 4]>> {
    let base = base_port.unwrap_or(DEFAULT_BASE_PORT);
    if base == 0 {
        return bind_block(0, agencies)
            .await
            .context("cannot bind free ports on 127.0.0.1");
    }
    let Some(last) = (agencies * 4 - 1).checked_add(base) else {
        anyhow::bail!(
            "--base-port {base} leaves no room for {} ports below 65536",
            agencies * 4
        );
    };
    match bind_block(base, agencies).await {
        Ok(bound) => Ok(bound),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && base_port.is_none() => {
            eprintln!(
                "ports {base}-{last} are taken ({e}; another `antar dev`?): using free ports; \
                 federation.json and the list below name them"
            );
            bind_block(0, agencies)
                .await
                .context("cannot bind free ports on 127.0.0.1")
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(e).with_context(|| {
            format!("cannot bind 127.0.0.1:{base}-{last}; is another `antar dev` running? Try --base-port 0")
        }),
        Err(e) => Err(e).with_context(|| format!("cannot bind 127.0.0.1:{base}-{last}")),
    }
}

/// Takes `dir/dev.lock`, exclusively, or says who holds it.
fn lock_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join("dev.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another `antar dev` is running on {} (it holds {}): stop it, or give this one another --dir",
            dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

fn remove_if_there(path: &std::path::Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove the old {}", path.display()))
        }
        _ => Ok(()),
    }
}

pub async fn run(args: DevArgs) -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    let mut signals = crate::Signals::install();
    std::fs::create_dir_all(&args.dir).with_context(|| format!("cannot create {}", args.dir.display()))?;
    // Absolute: each node.toml names its files absolutely, so it means the
    // same wherever `antar node run` or `check-config` is started from.
    let dir =
        std::fs::canonicalize(&args.dir).with_context(|| format!("cannot resolve {}", args.dir.display()))?;
    let layout = DevLayout::new(&dir);
    let topology = standard_topology();
    // One `antar dev` per directory, held for the whole run (the OS lets go
    // when the process ends, however it ends); a second one stops here,
    // before it touches anything of the first's.
    let _lock = lock_dir(&args.dir)?;
    // federation.json is written once every node is up, so scripts wait
    // for it: one left by an earlier run (its ports perhaps stale) goes now.
    let fed_path = layout.federation_json();
    remove_if_there(&fed_path)?;
    let created = layout
        .ensure_pki(&topology)
        .context("cannot create the dev certificates")?;
    let agencies = u16::try_from(topology.len()).context("too many agencies")?;
    let bound = listeners(args.base_port, agencies).await?;
    let mut addrs = BTreeMap::new();
    for (spec, l) in topology.iter().zip(&bound) {
        addrs.insert(
            spec.id.clone(),
            Addrs {
                api: l[0].local_addr()?,
                peer: l[1].local_addr()?,
                admin: l[2].local_addr()?,
                metrics: l[3].local_addr()?,
            },
        );
    }
    let mut nodes = Vec::new();
    for (spec, [api, peer, admin, metrics]) in topology.iter().zip(bound) {
        let config = layout.node_config(spec, &addrs);
        let path = layout.config_path(&spec.id);
        std::fs::write(&path, config.to_toml())
            .with_context(|| format!("cannot write {}", path.display()))?;
        let listeners = Listeners {
            api,
            peer,
            admin: Some(admin),
            metrics: Some(metrics),
        };
        let node = Node::start(config, Some(path), listeners)
            .await
            .with_context(|| format!("cannot start {}", spec.id))?;
        nodes.push(node);
    }
    layout.federation_file(&topology, &addrs)?.save(&fed_path)?;
    let fed = std::fs::canonicalize(&fed_path).unwrap_or(fed_path);
    let fed = fed.display();
    println!(
        "Antar dev federation {} is up in {:.1}s ({}):",
        antar_node::dev::DEV_FEDERATION,
        started.elapsed().as_secs_f64(),
        if created {
            "certificates created"
        } else {
            "certificates reused"
        }
    );
    for (id, a) in &addrs {
        println!(
            "  {id:<9} api {}  peer {}  admin {}  metrics http://{}/metrics",
            a.api, a.peer, a.admin, a.metrics
        );
    }
    println!("finance <-> health directly; registry only through hub.\n");
    println!("Try, in another terminal:");
    println!("  antar send  --federation {fed} --agency finance --to registry --service birth.lookup --data 'hello registry'");
    println!("  antar inbox --federation {fed} --agency registry --ack");
    println!("  antar track --federation {fed} --agency finance <id printed by send>");
    println!("  antar admin status --federation {fed} --agency hub");
    println!("\nClients in other languages need only {fed} and proto/. Ctrl-C stops.");
    signals
        .wait(|| {
            for n in &nodes {
                if let Err(e) = n.reload() {
                    tracing::error!(error = %e, "reload failed");
                }
            }
        })
        .await;
    eprintln!("stopping: draining transfers and flushing stores (Ctrl-C again: exit at once)");
    let stop_all = async {
        for n in nodes {
            n.stop().await?;
        }
        anyhow::Ok(())
    };
    tokio::select! {
        stopped = stop_all => stopped?,
        () = signals.again() => crate::stopped_at_once(),
    }
    Ok(ExitCode::SUCCESS)
}
