//! `cim-bench`: the benchmarks behind `BENCHMARKS.md`, against sandbox
//! fleets with real nix and sshd. `scripts/bench` builds and runs it.
//!
//! - `converge`: a change of every host, made by `cim`, by the floor (one
//!   evaluation of every host's `drvPath`, one realise, then every host's
//!   `nix copy` + `nix-env --set` + `switch-to-configuration` at once) and by
//!   an `xargs -P10` loop of per-host `nix build`/`nix copy`/switch, in
//!   alternating order, with and without a shared evaluation cost.
//! - `latency`: commit → `RevisionDetected` on a local repository.
//! - `idle`: the controller's CPU and process starts on a converged fleet.
//! - `scale`: 10,000 suspended hosts added and removed; status latency.
//! - `restart`: a controller started on a log of 1,000,000 events.
//! - `simulate`: `cim simulate`, 10,000 simulated hosts through a
//!   whole-fleet change, with status read throughout.
//!
//! Every figure is a median over rounds, printed as a markdown table.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use cim_sandbox::sh;

mod cim_run;
mod controller;
mod converge;
mod simulate;

use controller::{idle, latency, restart, scale};
use converge::converge;
use simulate::simulate;
pub(crate) struct Options {
    pub(crate) sizes: Vec<usize>,
    pub(crate) rounds: usize,
    pub(crate) eval_costs: Vec<u64>,
    pub(crate) idle_hosts: usize,
    pub(crate) idle_seconds: u64,
    pub(crate) latency_commits: usize,
    pub(crate) scale_hosts: usize,
    pub(crate) sim_hosts: usize,
    pub(crate) sim_parallel: Vec<usize>,
    /// `cim simulate --policy`: waves and a failure budget.
    pub(crate) sim_policy: bool,
    /// The status readers ask `?since=` their last answer (as the
    /// dashboard does) instead of reading the whole status each time.
    pub(crate) sim_since: bool,
    pub(crate) cim: PathBuf,
    pub(crate) baseline: Option<PathBuf>,
    pub(crate) only: Option<String>,
}

fn main() -> Result<()> {
    let mut opts = Options {
        sizes: vec![10, 50],
        rounds: 3,
        eval_costs: vec![0, 4_000_000],
        idle_hosts: 100,
        idle_seconds: 30,
        latency_commits: 20,
        scale_hosts: 10_000,
        sim_hosts: 10_000,
        sim_parallel: vec![1000, 10_000],
        sim_policy: false,
        sim_since: false,
        // target/release/cim next to target/release/cim-bench.
        cim: std::env::current_exe()?.with_file_name("cim"),
        baseline: None,
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().context("missing value");
        match a.as_str() {
            "--sizes" => opts.sizes = list(&value()?)?,
            "--rounds" => opts.rounds = value()?.parse()?,
            "--eval-costs" => opts.eval_costs = list(&value()?)?,
            "--idle-hosts" => opts.idle_hosts = value()?.parse()?,
            "--idle-seconds" => opts.idle_seconds = value()?.parse()?,
            "--latency-commits" => opts.latency_commits = value()?.parse()?,
            "--scale-hosts" => opts.scale_hosts = value()?.parse()?,
            "--sim-hosts" => opts.sim_hosts = value()?.parse()?,
            "--sim-parallel" => opts.sim_parallel = list(&value()?)?,
            "--sim-policy" => opts.sim_policy = true,
            "--sim-since" => opts.sim_since = true,
            "--cim" => opts.cim = value()?.into(),
            "--baseline" => opts.baseline = Some(value()?.into()),
            "--only" => opts.only = Some(value()?),
            other => bail!(
                "unknown argument {other}; see scripts/bench (--sizes 10,50 --rounds 3 --eval-costs 0,4000000 --idle-hosts N --idle-seconds S --latency-commits N --cim BIN --baseline BIN --scale-hosts N --sim-hosts N --sim-parallel 1000,10000 --sim-policy --sim-since --only converge|latency|idle|scale|restart|simulate)"
            ),
        }
    }
    let wanted = |what: &str| opts.only.as_deref().is_none_or(|o| o == what);
    println!("# cim benchmarks\n");
    println!("machine: {}\n", machine());
    if wanted("converge") {
        converge(&opts)?;
    }
    if wanted("latency") {
        latency(&opts)?;
    }
    if wanted("idle") {
        idle(&opts)?;
    }
    if wanted("scale") {
        scale(&opts)?;
    }
    if wanted("restart") {
        restart(&opts)?;
    }
    if wanted("simulate") {
        simulate(&opts)?;
    }
    Ok(())
}

/// A comma-separated list: `10,50`.
fn list<T: std::str::FromStr>(s: &str) -> Result<Vec<T>, T::Err> {
    s.split(',').map(str::parse).collect()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let nix = sh("nix", &["--version"]).unwrap_or_default();
    format!("{cores} cores ({cpu}), {nix}")
}

/// The nearest-rank percentile `q` (0–1) of `sorted` (ascending): the
/// smallest value at least a fraction `q` of them do not exceed.
pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((sorted.len() as f64) * q).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1))
        .copied()
        .unwrap_or(f64::NAN)
}

pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_p99_of_232_reads_is_the_third_slowest() {
        let sorted: Vec<f64> = (1..=232).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 0.99), 230.0);
        assert_eq!(percentile(&sorted, 0.5), 116.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert!(percentile(&[], 0.99).is_nan());
    }
}
