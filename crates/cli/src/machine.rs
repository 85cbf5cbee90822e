//! What the machine under `antar bench` can do, measured before each run,
//! and what else used it while the run went on: figures from two machines,
//! or from one machine on two days, compare only through these.
//!
//! DESIGN.md §10 sets the performance budget for a machine that signs about
//! 45k/s and verifies about 16k/s on one core and syncs in about 0.1 ms; a
//! result is read against the same three figures of the machine it ran on.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

/// One core's Ed25519 rates, and the sync latency of the run's file system.
#[derive(Debug, Clone)]
pub(crate) struct Calibration {
    pub cpu: String,
    pub sign_per_s: f64,
    pub verify_per_s: f64,
    /// `fdatasync` of a 4 KiB overwrite, milliseconds.
    pub fsync_p50_ms: f64,
    pub fsync_p99_ms: f64,
    pub fsync_samples: usize,
}

/// How long each crypto rate is measured; the syncs stop at [`SYNCS`] or
/// after [`SYNC_BUDGET`], whichever comes first.
const CRYPTO_TIME: Duration = Duration::from_millis(150);
const SLICES: usize = 5;
const SYNCS: usize = 200;
const SYNC_BUDGET: Duration = Duration::from_secs(1);

/// Measures on this thread (about half a second): Ed25519 over a 64-byte
/// message with `ring`, the library the nodes sign with, then 4 KiB
/// overwrites of a file in `dir`, each followed by `fdatasync`, as the
/// journal writes a record into a zeroed segment.
pub(crate) fn calibrate(dir: &Path) -> anyhow::Result<Calibration> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| anyhow::anyhow!("cannot generate an Ed25519 key"))?;
    let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| anyhow::anyhow!("cannot load an Ed25519 key"))?;
    let msg = [0x5au8; 64];
    let sign_per_s = rate(|| {
        std::hint::black_box(key.sign(std::hint::black_box(&msg)));
    });
    let sig = key.sign(&msg);
    let public = UnparsedPublicKey::new(&ED25519, key.public_key().as_ref().to_vec());
    let verify_per_s = rate(|| {
        let ok = public.verify(std::hint::black_box(&msg), sig.as_ref()).is_ok();
        std::hint::black_box(ok);
    });
    let mut syncs = fsync_times(&dir.join(".antar-bench-calibration"))?;
    syncs.sort();
    let at = |q: f64| syncs[((syncs.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    Ok(Calibration {
        cpu: cpu_model(),
        sign_per_s,
        verify_per_s,
        fsync_p50_ms: at(0.50),
        fsync_p99_ms: at(0.99),
        fsync_samples: syncs.len(),
    })
}

/// Calls of `f` per second: the median of [`SLICES`] slices of
/// [`CRYPTO_TIME`], so a moment the core was taken from us moves one slice,
/// not the figure.
fn rate(mut f: impl FnMut()) -> f64 {
    let mut rates: Vec<f64> = (0..SLICES)
        .map(|_| {
            let started = Instant::now();
            let mut n = 0u64;
            while started.elapsed() < CRYPTO_TIME / SLICES as u32 {
                for _ in 0..8 {
                    f();
                }
                n += 8;
            }
            n as f64 / started.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[SLICES / 2]
}

/// Times `fdatasync` after each 4 KiB write into a zeroed, synced file at
/// `path`, which is removed after (or on failure).
fn fsync_times(path: &Path) -> anyhow::Result<Vec<Duration>> {
    const BLOCK: usize = 4096;
    let run = || -> std::io::Result<Vec<Duration>> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        f.write_all(&vec![0u8; BLOCK * SYNCS])?;
        f.sync_all()?;
        f.seek(SeekFrom::Start(0))?;
        let block = [0xa5u8; BLOCK];
        let started = Instant::now();
        let mut times = Vec::with_capacity(SYNCS);
        while times.len() < SYNCS && (times.is_empty() || started.elapsed() < SYNC_BUDGET) {
            f.write_all(&block)?;
            let t = Instant::now();
            f.sync_data()?;
            times.push(t.elapsed());
        }
        Ok(times)
    };
    let times = run();
    let _ = std::fs::remove_file(path);
    times.map_err(|e| anyhow::anyhow!("cannot time syncs in {}: {e}", path.display()))
}

/// The CPU's model name (Linux `/proc/cpuinfo`), or "unknown".
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, v)| v.trim().to_owned())
            })
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The whole machine's CPU time by kind (Linux `/proc/stat`, first line),
/// in ticks: what other processes and the hypervisor took during a run.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuTimes {
    total: u64,
    iowait: u64,
    steal: u64,
}

impl CpuTimes {
    pub(crate) fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal [guest guest_nice]:
        // guest time is counted in user already.
        Some(Self {
            total: fields.iter().take(8).sum(),
            iowait: *fields.get(4)?,
            steal: *fields.get(7)?,
        })
    }

    /// Per cent of all CPU time since `earlier` spent waiting for IO with
    /// nothing to run, and taken by the hypervisor.
    pub(crate) fn since(self, earlier: Self) -> (f64, f64) {
        let total = self.total.saturating_sub(earlier.total).max(1) as f64;
        let pct = |a: u64, b: u64| a.saturating_sub(b) as f64 * 100.0 / total;
        (pct(self.iowait, earlier.iowait), pct(self.steal, earlier.steal))
    }
}
