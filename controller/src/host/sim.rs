//! Simulated hosts and a simulated nix, with configurable latencies and
//! failure rates and no processes: the controller's benchmark drives
//! thousands of them, and unit tests run the reconcile, confirm and
//! rollback paths against them under `tokio::time::pause()`.
//!
//! A simulated host keeps what a NixOS host has that the controller can
//! see: the running system, the system profile's generations, and
//! confirmed activations in flight (a watchdog that reverts the host unless
//! confirmed in time). Failures are drawn from a seeded hash of the host
//! and a counter, so a run is reproducible.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::{Backend, Host};
use crate::driver::{
    destination, ActivateError, BootState, BuildError, CommandOutput, ConfirmedRun, CopyError,
    Evaluation, Look, SshError, Toplevel,
};
use crate::plan::PathInfo;
use crate::spec::{Action, HostSpec};
use crate::types::StorePath;

/// What stands for the flake in the system of an [`SimConfig::unchanged`]
/// configuration, whatever the revision.
pub const UNCHANGED: &str = "unchanged";

/// How simulated hosts and nix behave.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Opening a connection.
    pub connect: Duration,
    /// One short remote command (look, readlink, confirm).
    pub command: Duration,
    /// Copying a closure to a host.
    pub copy: Duration,
    /// `switch-to-configuration` (and a rollback's).
    pub activate: Duration,
    /// Evaluating the fleet once.
    pub evaluate: Duration,
    /// A reboot: the host is unreachable this long, then runs its profile.
    pub reboot: Duration,
    /// One build batch.
    pub build: Duration,
    /// Probability that a connection attempt fails.
    pub connect_failure: f64,
    /// Probability that an activation fails.
    pub activation_failure: f64,
    pub seed: u64,
    /// Configurations whose system is the same at every revision (a
    /// commit that changes only the others).
    pub unchanged: Arc<HashSet<String>>,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            connect: Duration::from_millis(20),
            command: Duration::from_millis(5),
            copy: Duration::from_millis(200),
            activate: Duration::from_millis(300),
            evaluate: Duration::from_millis(100),
            reboot: Duration::from_secs(5),
            build: Duration::from_millis(100),
            connect_failure: 0.0,
            activation_failure: 0.0,
            seed: 0,
            unchanged: Arc::default(),
        }
    }
}

impl SimConfig {
    /// One host's reconcile when it needs a change and nothing fails: its
    /// build (while connecting and looking, for a host the controller
    /// knows; after looking, for one it has never seen, which may run
    /// the system already), the copy (while the host is asked the closure
    /// it runs, for the build's summary), a confirmed activation (start,
    /// switch, confirm over a new connection), and the old generations'
    /// pruning.
    pub fn reconcile_time(&self, known: bool) -> Duration {
        let look = self.connect + self.command;
        let built = if known {
            look.max(self.build)
        } else {
            look + self.build
        };
        // What it runs is asked of the host for the build's summary (the
        // controller's store does not hold simulated systems) during the
        // copy.
        built
            + self.copy.max(self.command)
            + self.command
            + self.activate
            + self.connect
            + self.command
            + self.command
    }

    /// The critical path of a whole-fleet change of hosts in `waves` (how
    /// many hosts each has, in order), at most `parallel` at once: one
    /// evaluation, then each wave's rounds of reconciles.
    pub fn critical_path(&self, waves: &[usize], parallel: usize, known: bool) -> Duration {
        let rounds: usize = waves.iter().map(|n| n.div_ceil(parallel.max(1))).sum();
        self.evaluate + self.reconcile_time(known) * u32::try_from(rounds).unwrap_or(u32::MAX)
    }

    /// The critical path of a change of `changed` hosts of `hosts` the
    /// controller knows, at most `parallel` at once: one evaluation, the
    /// changed hosts' rounds of reconciles, then the others' rounds of
    /// looks (a connection and one command each).
    pub fn critical_path_of_some(&self, changed: usize, hosts: usize, parallel: usize) -> Duration {
        let rounds = |n: usize| u32::try_from(n.div_ceil(parallel.max(1))).unwrap_or(u32::MAX);
        self.evaluate
            + self.reconcile_time(true) * rounds(changed)
            + (self.connect + self.command) * rounds(hosts.saturating_sub(changed))
    }
}

/// A fault a test gives one simulated host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Connections fail.
    Unreachable,
    /// Activating any system fails.
    ActivationFails,
    /// Once a new system is activated, connections fail until the host has
    /// reverted it (a system that broke sshd or the network).
    NewSystemCutsNetwork,
    /// A reboot never ends: the host stays down.
    NeverComesBack,
}

#[derive(Debug, Default, Clone)]
struct SimHost {
    current: Option<String>,
    /// The system profile's generations, oldest first.
    generations: Vec<String>,
    /// Confirmed activations not confirmed yet, by token.
    pending: BTreeMap<String, Pending>,
    fault: Option<Fault>,
    /// What `/run/booted-system` points at.
    booted: Option<String>,
    /// A reboot in progress: down until then.
    down_until: Option<Instant>,
    /// `cim`'s mark in `/run`, gone after a reboot.
    marked: bool,
}

#[derive(Debug, Clone)]
struct Pending {
    /// When `switch-to-configuration` ends.
    done_at: Instant,
    /// Its exit code.
    code: i32,
    /// When the watchdog reverts unless confirmed.
    reverts_at: Instant,
    previous_running: Option<String>,
    previous_profile: Option<String>,
}

impl SimHost {
    /// Lets the host's watchdogs act: an activation not confirmed in time
    /// is reverted.
    fn settle(&mut self, now: Instant) {
        if self
            .down_until
            .is_some_and(|t| t <= now && self.fault != Some(Fault::NeverComesBack))
        {
            self.down_until = None;
            self.marked = false;
            self.pending.clear();
            self.booted = self.profile();
            self.current = self.profile();
        }
        let expired: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.reverts_at <= now)
            .map(|(t, _)| t.clone())
            .collect();
        for token in expired {
            if let Some(p) = self.pending.remove(&token) {
                self.current = p.previous_running;
                if let Some(profile) = p.previous_profile {
                    self.generations.push(profile);
                }
            }
        }
    }

    fn profile(&self) -> Option<String> {
        self.generations.last().cloned()
    }

    fn cut_off(&self) -> bool {
        if self.down_until.is_some() {
            return true;
        }
        match self.fault {
            Some(Fault::Unreachable) => true,
            Some(Fault::NewSystemCutsNetwork) => !self.pending.is_empty(),
            _ => false,
        }
    }
}

/// What the simulation did, for benchmarks and tests.
#[derive(Debug, Default)]
pub struct SimCounts {
    pub connections: AtomicU64,
    pub copies: AtomicU64,
    pub activations: AtomicU64,
    pub builds: AtomicU64,
    pub evaluations: AtomicU64,
}

/// A simulated fleet and nix. Cheap to share: hosts live behind one lock,
/// held only for bookkeeping, never across a wait.
#[derive(Debug, Clone)]
pub struct Sim {
    cfg: Arc<SimConfig>,
    hosts: Arc<Mutex<HashMap<String, SimHost>>>,
    draws: Arc<AtomicU64>,
    /// Each system's kernel (the default one if not set).
    kernels: Arc<Mutex<HashMap<String, String>>>,
    pub counts: Arc<SimCounts>,
}

impl Sim {
    pub fn new(cfg: SimConfig) -> Sim {
        Sim {
            cfg: Arc::new(cfg),
            hosts: Arc::default(),
            draws: Arc::default(),
            kernels: Arc::default(),
            counts: Arc::default(),
        }
    }

    /// Makes `system` boot `kernel` (a name).
    pub fn set_kernel(&self, system: &str, kernel: &str) {
        self.kernels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(system.to_string(), kernel.to_string());
    }

    /// Makes `host` booted into what it runs.
    pub fn boot(&self, host: &str) {
        let mut hosts = self.lock();
        let h = hosts.entry(host.to_string()).or_default();
        h.booted = h.current.clone();
    }

    /// What `host` booted.
    pub fn booted(&self, host: &str) -> Option<String> {
        let mut hosts = self.lock();
        let h = hosts.get_mut(host)?;
        h.settle(Instant::now());
        h.booted.clone()
    }

    fn files_of(&self, system: &str) -> Vec<String> {
        let kernel = self
            .kernels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(system)
            .cloned()
            .unwrap_or_else(|| "linux-6.1".to_string());
        vec![
            format!("/nix/store/{kernel}/bzImage"),
            format!("/nix/store/{kernel}-initrd/initrd"),
            format!("/nix/store/{kernel}-modules"),
        ]
    }

    /// Makes `host` run `system` (with it as its only generation).
    pub fn install(&self, host: &str, system: &str) {
        let mut hosts = self.lock();
        let h = hosts.entry(host.to_string()).or_default();
        h.current = Some(system.to_string());
        h.generations = vec![system.to_string()];
    }

    pub fn set_fault(&self, host: &str, fault: Option<Fault>) {
        self.lock().entry(host.to_string()).or_default().fault = fault;
    }

    /// What `host` runs now.
    pub fn current(&self, host: &str) -> Option<String> {
        let mut hosts = self.lock();
        let h = hosts.get_mut(host)?;
        h.settle(Instant::now());
        h.current.clone()
    }

    /// The system the simulated nix evaluates `configuration` to at
    /// `flake`: a valid store path, different for every revision.
    pub fn system(flake: &str, configuration: &str) -> Toplevel {
        let hash = nix_hash(&(flake, configuration));
        let name = format!("nixos-system-{configuration}");
        Toplevel {
            drv: StorePath::parse(&format!("/nix/store/{hash}-{name}.drv"))
                .unwrap_or_else(|| placeholder(".drv")),
            out: StorePath::parse(&format!("/nix/store/{hash}-{name}"))
                .unwrap_or_else(|| placeholder("")),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SimHost>> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether an event of probability `p` happens to `host` this time.
    fn draw(&self, host: &str, p: f64) -> bool {
        if p <= 0.0 {
            return false;
        }
        let n = self.draws.fetch_add(1, Ordering::Relaxed);
        let mut h = DefaultHasher::new();
        (self.cfg.seed, host, n).hash(&mut h);
        (h.finish() % 1_000_000) as f64 / 1_000_000.0 < p
    }
}

/// A store path for configuration names that make no valid one (never
/// with the names specs allow).
fn placeholder(suffix: &str) -> StorePath {
    StorePath::parse(&format!(
        "/nix/store/00000000000000000000000000000000-invalid{suffix}"
    ))
    .expect("a valid store path")
}

/// 32 characters of nix's base-32 alphabet, from a hash of `value`.
fn nix_hash(value: &impl Hash) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    (0u64..4)
        .flat_map(|round| {
            let mut h = DefaultHasher::new();
            (round, value).hash(&mut h);
            let bits = h.finish();
            (0..8).map(move |i| ALPHABET[((bits >> (i * 5)) & 31) as usize] as char)
        })
        .collect()
}

fn refused(host: &HostSpec) -> SshError {
    SshError::Connect {
        destination: destination(host),
        source: openssh::Error::Connect(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "simulated: connection refused",
        )),
    }
}

impl Backend for Sim {
    type Session = SimSession;

    async fn connect(&self, host: &HostSpec) -> Result<SimSession, SshError> {
        tokio::time::sleep(self.cfg.connect).await;
        self.counts.connections.fetch_add(1, Ordering::Relaxed);
        let cut_off = {
            let mut hosts = self.lock();
            let h = hosts.entry(host.name.to_string()).or_default();
            h.settle(Instant::now());
            h.cut_off()
        };
        if cut_off || self.draw(&host.name, self.cfg.connect_failure) {
            return Err(refused(host));
        }
        Ok(SimSession {
            sim: self.clone(),
            host: host.name.to_string(),
            destination: destination(host),
        })
    }

    fn connect_timeout(&self) -> Duration {
        Duration::from_secs(10)
    }

    async fn evaluate(
        &self,
        flake: &str,
        configurations: &[String],
    ) -> Result<Evaluation, BuildError> {
        // Made up while the simulated nix "evaluates": the evaluation
        // takes its latency, not that plus the fake's own work on 10,000
        // systems.
        let done = Instant::now() + self.cfg.evaluate;
        let evaluation = Evaluation {
            names: configurations.to_vec(),
            systems: configurations
                .iter()
                .map(|c| {
                    let flake = match self.cfg.unchanged.contains(c) {
                        true => UNCHANGED,
                        false => flake,
                    };
                    (c.clone(), Ok(Sim::system(flake, c)))
                })
                .collect(),
        };
        tokio::time::sleep_until(done).await;
        self.counts.evaluations.fetch_add(1, Ordering::Relaxed);
        Ok(evaluation)
    }

    async fn realise(&self, _systems: &[Toplevel]) -> Result<(), BuildError> {
        tokio::time::sleep(self.cfg.build).await;
        self.counts.builds.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn cache(&self) -> Option<&str> {
        None
    }

    async fn push(&self, _closure: &StorePath) -> Result<(), BuildError> {
        Ok(())
    }

    async fn closures(&self, roots: &[StorePath]) -> Result<Vec<PathInfo>, BuildError> {
        Ok(roots.iter().map(|r| sim_path_info(r.as_str())).collect())
    }

    async fn boot_files(&self, system: &StorePath) -> Vec<String> {
        self.files_of(system.as_str())
    }
}

/// A simulated system's closure: the system alone, 1 MiB.
fn sim_path_info(root: &str) -> PathInfo {
    PathInfo {
        path: root.to_string(),
        nar_size: 1 << 20,
        references: Vec::new(),
    }
}

/// A connection to a simulated host.
#[derive(Debug)]
pub struct SimSession {
    sim: Sim,
    host: String,
    destination: String,
}

impl SimSession {
    /// Waits `d`, then runs `f` on the host's state, unless the host has
    /// cut this connection off meanwhile.
    async fn after<T>(
        &self,
        d: Duration,
        command: &str,
        f: impl FnOnce(&mut SimHost, Instant) -> T,
    ) -> Result<T, SshError> {
        tokio::time::sleep(d).await;
        let now = Instant::now();
        let mut hosts = self.sim.lock();
        let h = hosts.entry(self.host.clone()).or_default();
        h.settle(now);
        if h.fault == Some(Fault::Unreachable) {
            return Err(SshError::Command {
                destination: self.destination.clone(),
                command: command.to_string(),
                source: openssh::Error::Disconnected,
            });
        }
        Ok(f(h, now))
    }

    fn failed(&self, command: &str, stderr: &str) -> ActivateError {
        ActivateError::Failed {
            destination: self.destination.clone(),
            command: command.to_string(),
            output: CommandOutput {
                status: Some(1),
                stdout: String::new(),
                stderr: stderr.to_string(),
            },
        }
    }

    fn ok() -> CommandOutput {
        CommandOutput {
            status: Some(0),
            stdout: String::new(),
            stderr: String::new(),
        }
    }

    fn activation_fails(&self) -> bool {
        let faulty = self
            .sim
            .lock()
            .get(&self.host)
            .and_then(|h| h.fault.clone())
            == Some(Fault::ActivationFails);
        faulty || self.sim.draw(&self.host, self.sim.cfg.activation_failure)
    }
}

impl Host for SimSession {
    async fn look(&self) -> Result<Look, SshError> {
        let sim = self.sim.clone();
        self.after(self.sim.cfg.command, "sh -c LOOK", |h, _| Look {
            current: h.current.clone(),
            profile: h.profile(),
            pending: h.pending.keys().cloned().collect(),
            booted: h.booted.clone(),
            booted_files: h
                .booted
                .as_deref()
                .map(|b| sim.files_of(b))
                .unwrap_or_default(),
        })
        .await
    }

    async fn current_system(&self) -> Result<Option<String>, SshError> {
        self.after(self.sim.cfg.command, "readlink", |h, _| h.current.clone())
            .await
    }

    async fn boot_system(&self) -> Result<Option<String>, SshError> {
        self.after(self.sim.cfg.command, "readlink -f", |h, _| h.profile())
            .await
    }

    async fn copy(&self, _closure: &StorePath, _substitute: bool) -> Result<(), CopyError> {
        tokio::time::sleep(self.sim.cfg.copy).await;
        self.sim.counts.copies.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn activate(
        &self,
        closure: &StorePath,
        action: Action,
    ) -> Result<CommandOutput, ActivateError> {
        let fails = self.activation_fails();
        self.sim.counts.activations.fetch_add(1, Ordering::Relaxed);
        let closure = closure.to_string();
        let done = self
            .after(self.sim.cfg.activate, "switch-to-configuration", |h, _| {
                if action.sets_profile() {
                    h.generations.push(closure.clone());
                }
                if !fails && matches!(action, Action::Switch | Action::Test) {
                    h.current = Some(closure);
                }
            })
            .await;
        done?;
        if fails {
            return Err(self.failed(
                "switch-to-configuration",
                "simulated: a unit failed to start",
            ));
        }
        Ok(SimSession::ok())
    }

    async fn start_confirmed_activation(
        &self,
        run: &ConfirmedRun<'_>,
    ) -> Result<(), ActivateError> {
        let fails = self.activation_fails();
        self.sim.counts.activations.fetch_add(1, Ordering::Relaxed);
        let activate = self.sim.cfg.activate;
        let (closure, action, timeout) = (run.closure.to_string(), run.action, run.timeout);
        let pending = Pending {
            done_at: Instant::now(),
            code: i32::from(fails),
            reverts_at: Instant::now(),
            previous_running: run.previous_running.map(str::to_string),
            previous_profile: run.previous_profile.map(str::to_string),
        };
        let token = run.token.to_string();
        self.after(
            self.sim.cfg.command,
            "setsid sh -c WATCHDOG",
            move |h, now| {
                if action.sets_profile() {
                    h.generations.push(closure.clone());
                }
                if !fails {
                    h.current = Some(closure);
                }
                h.pending.insert(
                    token,
                    Pending {
                        done_at: now + activate,
                        reverts_at: now + activate + timeout,
                        ..pending
                    },
                );
            },
        )
        .await?;
        Ok(())
    }

    async fn activation_result(
        &self,
        token: &str,
        within: Duration,
    ) -> Result<Option<(i32, String)>, SshError> {
        let done_at = self
            .after(Duration::ZERO, "sh -c WAIT_FOR_RESULT", |h, _| {
                h.pending.get(token).map(|p| (p.done_at, p.code))
            })
            .await?;
        let Some((done_at, code)) = done_at else {
            return Ok(Some((0, String::new())));
        };
        let waited = done_at.min(Instant::now() + within);
        tokio::time::sleep_until(waited).await;
        Ok((waited >= done_at).then(|| (code, String::new())))
    }

    async fn activation_previous(
        &self,
        token: &str,
    ) -> Result<(Option<String>, Option<String>), SshError> {
        self.after(self.sim.cfg.command, "cat", |h, _| {
            h.pending
                .get(token)
                .map(|p| (p.previous_running.clone(), p.previous_profile.clone()))
                .unwrap_or_default()
        })
        .await
    }

    async fn confirm(&self, token: &str) -> Result<bool, SshError> {
        self.after(self.sim.cfg.command, "rm", |h, _| {
            h.pending.remove(token).is_some()
        })
        .await
    }

    async fn confirm_and_read(&self, token: &str) -> Result<Option<Option<String>>, SshError> {
        self.after(self.sim.cfg.command, "sh -c CONFIRM", |h, _| {
            h.pending.remove(token).map(|_| h.current.clone())
        })
        .await
    }

    async fn roll_back(
        &self,
        action: Action,
        to: &str,
        previous_profile: Option<&str>,
    ) -> Result<(), ActivateError> {
        let (to, profile) = (to.to_string(), previous_profile.map(str::to_string));
        self.after(self.sim.cfg.activate, "switch-to-configuration", |h, _| {
            if let (true, Some(p)) = (action.sets_profile(), profile) {
                h.generations.push(p);
            }
            if action != Action::Boot {
                h.current = Some(to);
            }
        })
        .await?;
        Ok(())
    }

    async fn roll_back_generation(&self, action: Action) -> Result<String, ActivateError> {
        let back = self
            .after(self.sim.cfg.activate, "nix-env --rollback", |h, _| {
                if h.generations.len() < 2 {
                    return None;
                }
                h.generations.pop();
                let previous = h.profile();
                if action != Action::Boot {
                    h.current = previous.clone();
                }
                previous
            })
            .await?;
        back.ok_or_else(|| {
            self.failed(
                "nix-env --rollback",
                "error: no generation older than the current one",
            )
        })
    }

    async fn prune_generations(&self, keep: u32) -> Result<u32, ActivateError> {
        let pruned = self
            .after(
                self.sim.cfg.command,
                "nix-env --delete-generations",
                |h, _| {
                    let extra = h.generations.len().saturating_sub(keep as usize);
                    h.generations.drain(..extra);
                    u32::try_from(extra).unwrap_or(u32::MAX)
                },
            )
            .await?;
        Ok(pruned)
    }

    async fn closure(&self, root: &str) -> Result<Vec<PathInfo>, SshError> {
        let info = sim_path_info(root);
        self.after(self.sim.cfg.command, "nix path-info", |_, _| vec![info])
            .await
    }

    async fn reboot(&self) -> Result<(), ActivateError> {
        let down = self.sim.cfg.reboot;
        self.after(self.sim.cfg.command, "sh -c REBOOT", |h, now| {
            h.marked = true;
            h.down_until = Some(now + down);
        })
        .await?;
        Ok(())
    }

    async fn boot_state(&self) -> Result<BootState, SshError> {
        self.after(self.sim.cfg.command, "sh -c BOOT_STATE", |h, _| BootState {
            rebooting: h.marked,
            booted: h.booted.clone(),
            current: h.current.clone(),
        })
        .await
    }

    async fn run_check(
        &self,
        argv: &[String],
        _limit: Duration,
    ) -> Result<CommandOutput, SshError> {
        let passes = argv.first().map(String::as_str) != Some("false");
        self.after(self.sim.cfg.command, "health check", |_, _| {
            let mut out = SimSession::ok();
            if !passes {
                out.status = Some(1);
            }
            out
        })
        .await
    }

    async fn close(self) {}
}
