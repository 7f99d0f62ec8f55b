//! `cim simulate`: the real controller (decisions, run loop, store, API)
//! driving a fleet of simulated hosts (`host::sim`) through one
//! whole-fleet change, and what it cost — wall time against the simulated
//! work's own critical path, events per second, CPU per event, peak
//! memory. `cim-bench --only simulate` runs it and measures the API while
//! it runs.
//!
//! The change is the everyday one: a fleet the controller already knows
//! (it has converged at a first revision, not measured) moves to a
//! second. `--first-contact` measures a controller meeting the fleet
//! instead, which looks at each host before building for it; `--changed N`
//! a commit that changes only N hosts' systems (the others are looked at),
//! and when those N converged.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::controller::{Controller, ControllerConfig};
use crate::event::Reason;
use crate::host::sim::{Sim, SimConfig};
use crate::spec::{parse_fleet, SpecFile};
use crate::store::{Store, StoreError};
use crate::types::Revision;
use crate::watch::Found;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimulateOptions {
    pub hosts: usize,
    pub max_parallel: usize,
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    pub sim: SimConfig,
    /// Give up after this long.
    pub deadline: Duration,
    /// After the change, keep the controller and its API running until
    /// interrupted (to look at a converged 10,000-host fleet).
    pub hold: bool,
    /// Measure the controller's first revision on a fleet it has never
    /// seen, rather than a change of a fleet it knows.
    pub first_contact: bool,
    /// Roll out under a Fleet policy: a canary wave of every
    /// [`CANARY_EVERY`]th host, then the others as a second wave, with a
    /// failure budget of 1%; the others also depend on the canaries
    /// (`dependsOn` a selector).
    pub policy: bool,
    /// Change only this many hosts' systems (the last in name order);
    /// the others are only looked at. `None`: every host's.
    pub changed: Option<usize>,
}

/// With a policy, one host in this many is a canary.
const CANARY_EVERY: usize = 100;

/// What a simulation measured (printed as JSON).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SimulateReport {
    pub hosts: usize,
    pub max_parallel: usize,
    /// Events appended during the change.
    pub events: u64,
    /// From the new revision to the last host converged.
    pub wall_seconds: f64,
    /// The simulated work's own critical path: one evaluation, then each
    /// round of `max_parallel` hosts' reconcile.
    pub critical_path_seconds: f64,
    pub ratio: f64,
    pub events_per_second: f64,
    /// CPU (user + system) of the whole process per event, simulation
    /// included.
    pub cpu_micros_per_event: f64,
    pub peak_rss_mb: f64,
    /// With `--changed N`: how many hosts the change changed, when the
    /// last of them converged (from the new revision), and the critical
    /// path of their reconciles alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed: Option<ChangedReport>,
}

/// The hosts a change of only some changed, measured apart.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangedReport {
    pub hosts: usize,
    pub wall_seconds: f64,
    pub critical_path_seconds: f64,
    pub ratio: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("cannot create the state directory {}", .path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the store")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the simulated specs do not validate: {0}")]
    Specs(String),
    #[error("{converged} of {hosts} hosts converged at {revision} within {}s", .deadline.as_secs())]
    TimedOut {
        revision: &'static str,
        converged: usize,
        hosts: usize,
        deadline: Duration,
    },
}

/// What the fleet runs before the change (converged first, not measured).
const BEFORE: &str = "4111111111111111111111111111111111111111";
/// The change measured.
const REVISION: &str = "5111111111111111111111111111111111111111";

/// Runs the simulation; `listening` is told the API's address when the
/// measured change starts.
pub async fn simulate(
    opts: SimulateOptions,
    listening: impl FnOnce(SocketAddr),
) -> Result<SimulateReport, SimulateError> {
    std::fs::create_dir_all(&opts.state_dir).map_err(|source| SimulateError::StateDir {
        path: opts.state_dir.clone(),
        source,
    })?;
    let store = Store::open(&opts.state_dir)?;
    let names: Vec<String> = (0..opts.hosts).map(|i| format!("sim-{i:05}")).collect();
    let changed: HashSet<String> = match opts.changed {
        Some(n) => names.iter().rev().take(n).cloned().collect(),
        None => names.iter().cloned().collect(),
    };
    let mut sim_cfg = opts.sim.clone();
    sim_cfg.unchanged = Arc::new(
        names
            .iter()
            .filter(|n| !changed.contains(*n))
            .cloned()
            .collect(),
    );
    let sim = Sim::new(sim_cfg);
    let mirror = opts.state_dir.join("mirror.git");
    // Known hosts already run the first revision's systems: the controller
    // only looks at each of them before the change.
    let before = match opts.first_contact {
        true => "before".to_string(),
        false => crate::git::flake_ref(&mirror, &revision(BEFORE)?),
    };
    for name in &names {
        let flake = match changed.contains(name) {
            true => before.as_str(),
            false => crate::host::sim::UNCHANGED,
        };
        sim.install(name, Sim::system(flake, name).out.as_str());
    }
    let fleet = parse_fleet(&spec_files(&names, opts.policy))
        .map_err(|e| SimulateError::Specs(e.to_string()))?;
    let fetch_now = Arc::new(Notify::new());
    let hooks = Arc::clone(&fetch_now);
    let cfg = ControllerConfig {
        resync_interval: Duration::from_secs(3600),
        max_parallel: opts.max_parallel.max(1),
        backoff_base: Duration::from_secs(1),
        backoff_max: Duration::from_secs(60),
        mirror_path: mirror,
        substitute_on_destination: false,
        retention: crate::store::Retention::default(),
        state_dir: opts.state_dir.clone(),
        refuse_rewrites: false,
    };
    let controller = Controller::new(cfg, sim.clone(), store, fetch_now)?;
    let events = controller.events();
    let (req_tx, req_rx) = mpsc::channel(64);
    let api_context = crate::api::ApiContext {
        state_dir: opts.state_dir.clone(),
        requests: req_tx,
        events,
        health: controller.health(),
        committed: controller.committed(),
        status_feed: controller.status_feed(),
        metrics: controller.metrics(),
        access: Arc::new(
            crate::api::access::Access::new(crate::api::access::AccessOptions {
                listen: opts.listen,
                token: None,
                allowed_hosts: vec!["127.0.0.1".to_string()],
            })
            .map_err(|e| SimulateError::Specs(e.to_string()))?,
        ),
        webhook: None,
        planner: None,
        fetch_now: hooks,
    };
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| SimulateError::Listen {
            addr: opts.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| SimulateError::Listen {
            addr: opts.listen,
            source,
        })?;
    let cancel = CancellationToken::new();
    let api = crate::api::serve::serve_apart(
        listener,
        move || crate::api::router(api_context),
        None,
        cancel.clone(),
    )
    .map_err(|source| SimulateError::Listen {
        addr: opts.listen,
        source,
    })?;
    let (found_tx, found_rx) = mpsc::channel(4);
    let run = tokio::spawn(controller.run(found_rx, req_rx, cancel.clone()));
    // Followed from the store, as an API client would: only new events
    // are read, and nothing the controller does waits for this reader.
    let reader = Store::open_read_only(&opts.state_dir)?;
    let deadline = Instant::now() + opts.deadline;
    let mut follow = Follow {
        reader,
        hosts: &names,
        last_seq: 0,
        read_seq: 0,
        deadline,
        timeout: opts.deadline,
        changed: &changed,
    };
    if !opts.first_contact {
        let _ = found_tx.send(found(BEFORE, fleet.clone())?).await;
        if let Err(e) = follow.until_converged(BEFORE).await {
            cancel.cancel();
            return Err(e);
        }
    }
    listening(addr);

    let cpu_before = cpu_seconds();
    let first_seq = follow.last_seq;
    let started_wall = time::OffsetDateTime::now_utc();
    let _ = found_tx.send(found(REVISION, fleet)?).await;
    let (last_converged, last_changed) = match follow.until_converged(REVISION).await {
        Ok(Converged { last, last_changed }) => (
            last.unwrap_or(started_wall),
            last_changed.unwrap_or(started_wall),
        ),
        Err(e) => {
            cancel.cancel();
            return Err(e);
        }
    };
    let wall = (last_converged - started_wall).as_seconds_f64();
    let cpu = cpu_seconds() - cpu_before;
    if opts.hold {
        let _ = tokio::signal::ctrl_c().await;
    }
    cancel.cancel();
    let _ = run.await;
    let _ = api.await;
    let waves = match opts.policy {
        true => {
            let canaries = opts.hosts.div_ceil(CANARY_EVERY);
            vec![canaries, opts.hosts - canaries]
        }
        false => vec![opts.hosts],
    };
    let critical = match opts.changed {
        Some(n) => opts
            .sim
            .critical_path_of_some(n.min(opts.hosts), opts.hosts, opts.max_parallel),
        None => opts
            .sim
            .critical_path(&waves, opts.max_parallel, !opts.first_contact),
    }
    .as_secs_f64();
    let changed = opts.changed.map(|n| {
        let n = n.min(opts.hosts);
        let critical = opts.sim.critical_path(&[n], opts.max_parallel, true);
        let wall = (last_changed - started_wall).as_seconds_f64();
        ChangedReport {
            hosts: n,
            wall_seconds: wall,
            critical_path_seconds: critical.as_secs_f64(),
            ratio: wall / critical.as_secs_f64(),
        }
    });
    let events = follow.last_seq - first_seq;
    Ok(SimulateReport {
        hosts: opts.hosts,
        max_parallel: opts.max_parallel,
        events,
        wall_seconds: wall,
        critical_path_seconds: critical,
        ratio: wall / critical,
        events_per_second: events as f64 / wall,
        cpu_micros_per_event: cpu * 1e6 / events.max(1) as f64,
        peak_rss_mb: peak_rss_mb(),
        changed,
    })
}

fn revision(text: &str) -> Result<Revision, SimulateError> {
    Revision::parse(text).ok_or_else(|| SimulateError::Specs(format!("`{text}` is no revision")))
}

/// The watcher's report of `revision` with `fleet`'s specs.
fn found(revision_text: &str, fleet: crate::spec::FleetSpec) -> Result<Found, SimulateError> {
    Ok(Found::Revision {
        revision: revision(revision_text)?,
        specs: Box::new(Ok(fleet)),
        trust: crate::trust::Verdict::NotChecked,
        rewritten_from: None,
    })
}

/// Reads the store's new events until every host has converged at a
/// revision.
struct Follow<'a> {
    reader: Store,
    hosts: &'a [String],
    /// The newest event once every host converged.
    last_seq: u64,
    /// The newest event looked at.
    read_seq: u64,
    deadline: Instant,
    timeout: Duration,
    /// The hosts whose systems the change changes.
    changed: &'a HashSet<String>,
}

/// When the last host converged at a revision, and the last of those the
/// change changed (`None`: none had anything to do).
struct Converged {
    last: Option<time::OffsetDateTime>,
    last_changed: Option<time::OffsetDateTime>,
}

impl Follow<'_> {
    /// Waits for every host to converge at `revision`.
    async fn until_converged(
        &mut self,
        revision: &'static str,
    ) -> Result<Converged, SimulateError> {
        let mut converged = HashSet::new();
        let mut last = None;
        let mut last_changed = None;
        while converged.len() < self.hosts.len() {
            if Instant::now() > self.deadline {
                return Err(SimulateError::TimedOut {
                    revision,
                    converged: converged.len(),
                    hosts: self.hosts.len(),
                    deadline: self.timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            // Only the convergences are read: reading and parsing every
            // event took a tenth of the process's CPU, beside the
            // controller it measures.
            let (newest, news) = tokio::task::block_in_place(|| {
                self.reader.events_of(Reason::Converged, self.read_seq)
            })?;
            self.read_seq = newest;
            for ev in news {
                if ev.revision.as_deref() == Some(revision) {
                    if ev.host.as_ref().is_some_and(|h| self.changed.contains(h)) {
                        last_changed = Some(ev.time);
                    }
                    converged.extend(ev.host);
                    last = Some(ev.time);
                }
            }
        }
        // The last convergence's commit holds the rollout's last events.
        self.last_seq = tokio::task::block_in_place(|| self.reader.last_seq())?;
        Ok(Converged { last, last_changed })
    }
}

/// The simulated fleet's specs, 1,000 hosts per file (files are limited to
/// 1 MiB each), and with `policy` a Fleet document. Also the decisions'
/// benchmark's fleet.
pub fn spec_files(names: &[String], policy: bool) -> Vec<SpecFile> {
    let mut files: Vec<SpecFile> = names
        .chunks(1000)
        .enumerate()
        .map(|(i, chunk)| SpecFile {
            path: format!("specs/sim-{i}.yaml"),
            contents: chunk
                .iter()
                .enumerate()
                .map(|(j, name)| {
                    let (role, depends) = match ((i * 1000 + j) % CANARY_EVERY, policy) {
                        (0, _) => ("canary", ""),
                        (_, false) => ("web", ""),
                        (_, true) => ("web", ", dependsOn: [{selector: {role: canary}}]"),
                    };
                    format!(
                        "---\napiVersion: cim/v1\nkind: Host\nmetadata: {{name: {name}, labels: {{role: {role}}}}}\nspec: {{address: 10.{}.{}.{}{depends}}}\n",
                        i % 250,
                        j / 250,
                        j % 250 + 1
                    )
                })
                .collect::<String>()
                .into_bytes(),
        })
        .collect();
    if policy {
        files.push(SpecFile {
            path: "specs/fleet.yaml".to_string(),
            contents: b"apiVersion: cim/v1\nkind: Fleet\nmetadata: {name: sim}\nspec:\n  maxFailures: \"1%\"\n  waves:\n    - {name: canary, selector: {role: canary}}\n    - {name: web, selector: {role: web}}\n".to_vec(),
        });
    }
    files
}

/// This process's CPU time (user + system), from `/proc/self/stat`.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15, in clock ticks of 1/100 s.
    (ticks(11) + ticks(12)) / 100.0
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}
