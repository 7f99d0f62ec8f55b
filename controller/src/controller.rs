//! The controller task: the one owner of mutable state (the status
//! projection, the store, the work queue, the desired closures). Everything
//! else talks to it with messages: the watcher reports revisions, the build
//! task reports closures, workers report steps and outcomes, and the API asks
//! for reconciles. It turns each state change into exactly one event, appended
//! to the store together with the projection update.
//!
//! Level-triggered: the desired state is "every host runs the closure built
//! from the current valid revision"; workers compare against what each host
//! really runs, and a resync timer re-checks every host periodically.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::driver::{self, DriverConfig};
use crate::event::{Event, NewEvent, Phase, Reason};
use crate::queue::WorkQueue;
use crate::reconcile::{self, Report, WorkItem};
use crate::rollout;
use crate::spec::{Action, FleetSpec};
use crate::status::FleetStatus;
use crate::store::{Store, StoreError};
use crate::types::StorePath;
use crate::watch::Found;

mod evaluation;
mod outcome;
mod requests;

pub(crate) use evaluation::Purpose;

/// Tunables of the reconcile loop.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub resync_interval: Duration,
    pub max_parallel: usize,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Path of the bare mirror nix builds from.
    pub mirror_path: PathBuf,
    /// `--substitute-on-destination`: hosts fetch from their own binary
    /// caches, unless their spec or the Fleet document says otherwise.
    pub substitute_on_destination: bool,
    /// `--event-retention`, applied in the background.
    pub retention: crate::store::Retention,
    /// Where the store is (retention opens its own connection there).
    pub state_dir: PathBuf,
}

/// A request from the API.
#[derive(Debug)]
pub enum Request {
    /// Reconcile one host, or every host, now.
    Reconcile {
        host: Option<String>,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Suspend a host and switch it to its previous generation.
    Rollback {
        host: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Hand a host suspended by `Rollback` back to the controller.
    Resume {
        host: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
}

/// Everything the controller task receives.
#[derive(Debug)]
enum Msg {
    Found(Found),
    Report(Report),
    Evaluated {
        revision: String,
        purpose: Purpose,
        result: Result<driver::Evaluation, String>,
    },
    Request(Request),
    /// Old events were deleted by `--event-retention`.
    Trimmed {
        through: u64,
        deleted: u64,
    },
}

/// Channels into a running controller.
#[derive(Clone)]
pub struct Handle {
    pub requests: mpsc::Sender<Request>,
    pub events: broadcast::Sender<Event>,
}

pub struct Controller {
    cfg: ControllerConfig,
    driver: Arc<DriverConfig>,
    store: Store,
    status: FleetStatus,
    events: broadcast::Sender<Event>,
    /// The current valid revision and its specs.
    specs: Option<(String, FleetSpec)>,
    /// Each host's system at the current revision (evaluated; built by
    /// its worker when needed).
    desired: BTreeMap<String, driver::Toplevel>,
    /// Closures known to exist in the local store (built this run).
    built: std::collections::BTreeSet<StorePath>,
    /// Closures pushed to the binary cache this run.
    pushed: std::collections::BTreeSet<StorePath>,
    /// Workers' builds, batched.
    builds: reconcile::Builds,
    /// The evaluation in flight and the revision it is of.
    evaluation: Option<(String, tokio::task::JoinHandle<()>)>,
    /// A revision whose invalid specs were already reported.
    judged: Option<String>,
    queue: WorkQueue<Instant>,
    workers: JoinSet<()>,
    /// Which host (and revision) each worker task works on, so that a
    /// worker that panics is reported as a failed reconcile of its host.
    worker_hosts: std::collections::HashMap<tokio::task::Id, (String, String)>,
    worker_cancel: CancellationToken,
    fetch_now: Arc<Notify>,
    msg_tx: mpsc::Sender<Msg>,
    msg_rx: Option<mpsc::Receiver<Msg>>,
    report_tx: mpsc::Sender<Report>,
    report_rx: Option<mpsc::Receiver<Report>>,
    /// Hosts due but held back by the rollout policy (waves, dependsOn, a
    /// halt); queued again whenever another host's state changes.
    gated: std::collections::BTreeSet<String>,
    /// Why the store last refused a write; while set, no new work starts.
    store_failure: Option<String>,
    /// `store_failure`, published for `/healthz`.
    health: tokio::sync::watch::Sender<Option<String>>,
    /// A revision whose specs the store refused to record.
    unapplied: Option<(String, FleetSpec)>,
    /// Hosts whose `cim rollback` waits for their current reconcile to end.
    pending_rollbacks: std::collections::BTreeSet<String>,
}

const CHANNEL_CAPACITY: usize = 256;
/// When `--event-retention` first runs after a start, and how often after.
const RETENTION_FIRST: Duration = Duration::from_secs(30);
const RETENTION_INTERVAL: Duration = Duration::from_secs(600);
/// How often a store that refused a write is tried again.
const STORE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

impl Controller {
    pub fn new(
        cfg: ControllerConfig,
        driver: DriverConfig,
        store: Store,
        fetch_now: Arc<Notify>,
    ) -> Result<Controller, StoreError> {
        let status = store.load_status()?;
        let driver = Arc::new(driver);
        // A newest revision that is not the deployed one and carries a
        // message was refused before this restart; do not report it again.
        let judged =
            status.repo.latest_revision.clone().filter(|l| {
                Some(l) != status.repo.revision.as_ref() && status.repo.message.is_some()
            });
        let (events, _) = broadcast::channel(1024);
        let (msg_tx, msg_rx) = mpsc::channel(CHANNEL_CAPACITY);
        let (report_tx, report_rx) = mpsc::channel(CHANNEL_CAPACITY);
        Ok(Controller {
            msg_tx,
            msg_rx: Some(msg_rx),
            report_tx,
            report_rx: Some(report_rx),
            gated: std::collections::BTreeSet::new(),
            pending_rollbacks: std::collections::BTreeSet::new(),
            store_failure: None,
            health: tokio::sync::watch::Sender::new(None),
            unapplied: None,
            cfg,
            builds: reconcile::Builds::spawn(Arc::clone(&driver)),
            driver,
            store,
            status,
            events,
            specs: None,
            desired: BTreeMap::new(),
            built: std::collections::BTreeSet::new(),
            pushed: std::collections::BTreeSet::new(),
            evaluation: None,
            judged,
            queue: WorkQueue::default(),
            workers: JoinSet::new(),
            worker_hosts: std::collections::HashMap::new(),
            worker_cancel: CancellationToken::new(),
            fetch_now,
        })
    }

    pub fn status(&self) -> &FleetStatus {
        &self.status
    }

    /// Why the controller cannot work (`None`: it can), for `/healthz`.
    pub fn health(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.health.subscribe()
    }

    pub fn events(&self) -> broadcast::Sender<Event> {
        self.events.clone()
    }

    /// Resumes reconciling the last valid revision recorded in the store,
    /// before the watcher has fetched anything: a restart, or an unreachable
    /// git server, must not stop the fleet from being kept converged.
    pub fn resume(&mut self, revision: String, specs: FleetSpec) {
        tracing::info!(%revision, hosts = specs.hosts.len(), "resuming the last valid revision");
        self.specs = Some((revision.clone(), specs));
        self.start_evaluation(&revision, Purpose::Refresh);
    }

    /// Runs until `cancel` fires. `found` carries the watcher's reports,
    /// `requests` the API's.
    pub async fn run(
        mut self,
        mut found: mpsc::Receiver<Found>,
        mut requests: mpsc::Receiver<Request>,
        cancel: CancellationToken,
    ) {
        let (Some(mut rx), Some(mut reports)) = (self.msg_rx.take(), self.report_rx.take()) else {
            return;
        };
        let mut resync = tokio::time::interval_at(
            Instant::now() + self.cfg.resync_interval,
            self.cfg.resync_interval,
        );
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut store_check = tokio::time::interval(STORE_CHECK_INTERVAL);
        let mut retention =
            tokio::time::interval_at(Instant::now() + RETENTION_FIRST, RETENTION_INTERVAL);
        retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let retains_all = self.cfg.retention.keeps_everything();
        loop {
            self.dispatch();
            let next_due = self.queue.next_due();
            let msg = tokio::select! {
                () = cancel.cancelled() => break,
                Some(f) = found.recv() => Msg::Found(f),
                Some(r) = reports.recv() => Msg::Report(r),
                Some(m) = rx.recv() => m,
                Some(r) = requests.recv() => Msg::Request(r),
                _ = resync.tick() => { self.resync(); continue; }
                _ = retention.tick(), if !retains_all => { self.trim_events(); continue; }
                _ = store_check.tick(), if self.store_failure.is_some() => {
                    self.check_store();
                    continue;
                }
                () = sleep_until(next_due) => continue,
                Some(joined) = self.workers.join_next_with_id(), if !self.workers.is_empty() => {
                    match self.worker_ended(joined) {
                        Some(report) => Msg::Report(report),
                        None => continue,
                    }
                }
            };
            self.handle(msg);
        }
        tracing::info!("shutting down: stopping workers");
        self.worker_cancel.cancel();
        if let Some((_, evaluation)) = self.evaluation.take() {
            evaluation.abort();
        }
        while self.workers.join_next().await.is_some() {}
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Found(Found::Head { revision }) => self.on_head(&revision),
            Msg::Found(Found::Revision { revision, specs }) => self.on_revision(revision, specs),
            Msg::Found(Found::FetchFailed { message }) => {
                let revision = self.status.repo.latest_revision.clone();
                self.record(NewEvent::repo(
                    Reason::FetchFailed,
                    revision.as_deref(),
                    message,
                ));
            }
            Msg::Evaluated {
                revision,
                purpose,
                result,
            } => self.on_evaluated(revision, purpose, result),
            Msg::Report(Report::Step {
                host,
                revision,
                step,
            }) => self.on_step(&host, &revision, step),
            Msg::Report(Report::Done {
                host,
                revision,
                outcome,
            }) => self.on_done(&host, &revision, outcome),
            Msg::Request(Request::Reconcile { host, reply }) => {
                let _ = reply.send(self.on_reconcile(host));
            }
            Msg::Request(Request::Rollback { host, reply }) => {
                let _ = reply.send(self.on_rollback(&host));
            }
            Msg::Request(Request::Resume { host, reply }) => {
                let _ = reply.send(self.on_resume(&host));
            }
            Msg::Trimmed { through, deleted } => {
                let mut ev = NewEvent::repo(
                    Reason::EventsTrimmed,
                    None,
                    format!(
                        "--event-retention deleted {deleted} events; the history now starts after #{through}"
                    ),
                );
                ev.trimmed_through = Some(through);
                self.record(ev);
            }
        }
    }

    /// Appends an event; the projection follows. A failed append fails
    /// closed: whatever depended on the event is not done (callers check
    /// the result), and no new work starts until the store takes writes
    /// again (see [`Controller::check_store`]).
    fn record(&mut self, new: NewEvent) -> Option<Event> {
        self.record_all(vec![new]).and_then(|mut evs| evs.pop())
    }

    /// Appends events in one transaction; see [`Controller::record`].
    fn record_all(&mut self, news: Vec<NewEvent>) -> Option<Vec<Event>> {
        // The append waits for the disk; the runtime moves its other tasks
        // (the API, workers' reports) off this thread meanwhile.
        let (store, status) = (&mut self.store, &mut self.status);
        let appended = tokio::task::block_in_place(|| {
            store.append_all(status, news, OffsetDateTime::now_utc())
        });
        match appended {
            Ok(evs) => {
                for ev in &evs {
                    log_event(ev);
                    let _ = self.events.send(ev.clone());
                }
                Some(evs)
            }
            Err(e) => {
                let message = crate::error::error_chain(&e);
                tracing::error!(error = %message, "cannot record an event; no new work starts until the store takes writes again");
                self.set_store_failure(Some(message));
                None
            }
        }
    }

    fn current_revision(&self) -> Option<&str> {
        self.specs.as_ref().map(|(r, _)| r.as_str())
    }

    fn host_spec(&self, name: &str) -> Option<&crate::spec::HostSpec> {
        self.specs.as_ref().and_then(|(_, s)| s.hosts.get(name))
    }

    fn active_hosts(&self) -> Vec<String> {
        self.specs
            .as_ref()
            .map(|(_, s)| {
                s.hosts
                    .values()
                    .filter(|h| !h.suspend)
                    .map(|h| h.name.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The branch moved: said at once, before specs are read or anything
    /// is evaluated.
    fn on_head(&mut self, revision: &str) {
        if self.status.repo.latest_revision.as_deref() == Some(revision)
            || self.current_revision() == Some(revision)
        {
            return;
        }
        self.record(NewEvent::repo(
            Reason::RevisionDetected,
            Some(revision),
            format!("new head {} of the watched branch", short(revision)),
        ));
    }

    fn on_revision(&mut self, revision: String, specs: Result<FleetSpec, crate::spec::SpecErrors>) {
        if self.current_revision() == Some(revision.as_str()) {
            return;
        }
        self.on_head(&revision);
        match specs {
            Err(errors) => self.spec_invalid(&revision, &errors),
            Ok(fleet) => self.start_evaluation(&revision, Purpose::New(fleet)),
        }
    }

    /// Reports a revision whose specs do not validate (once per revision);
    /// the current one stays deployed.
    fn spec_invalid(&mut self, revision: &str, errors: &crate::spec::SpecErrors) {
        if self.judged.as_deref() == Some(revision) {
            return;
        }
        self.judged = Some(revision.to_string());
        let keeping = self
            .current_revision()
            .map_or("nothing is deployed".to_string(), |r| {
                format!("still reconciling {}", short(r))
            });
        self.record(NewEvent::repo(
            Reason::SpecInvalid,
            Some(revision),
            format!(
                "specs at {} are invalid, {keeping}: {errors}",
                short(revision)
            ),
        ));
    }

    /// Makes `fleet` the current specs: one batch of events (loaded,
    /// removed, suspended and resumed hosts), written in one transaction.
    /// Returns false, changing nothing, if the store refuses it.
    fn apply_specs(&mut self, revision: String, fleet: FleetSpec) -> bool {
        let mut news = vec![NewEvent::repo(
            Reason::SpecsLoaded,
            Some(&revision),
            format!("{} hosts at {}", fleet.hosts.len(), short(&revision)),
        )];
        let removed: Vec<String> = self
            .status
            .hosts
            .keys()
            .filter(|h| !fleet.hosts.contains_key(*h))
            .cloned()
            .collect();
        for host in &removed {
            news.push(NewEvent::host(
                host,
                Reason::HostRemoved,
                Some(&revision),
                "no longer in the specs; the host is left running as it is",
            ));
        }
        let mut suspended = Vec::new();
        for host in fleet.hosts.values() {
            let phase = self.status.phase_of(&host.name);
            if host.suspend && phase != Some(Phase::Suspended) {
                suspended.push(host.name.clone());
                news.push(
                    NewEvent::host(
                        &host.name,
                        Reason::Suspended,
                        Some(&revision),
                        "suspended by its spec",
                    )
                    .phase(Phase::Suspended),
                );
            } else if !host.suspend
                && phase == Some(Phase::Suspended)
                && !self.operator_suspended(&host.name)
            {
                news.push(
                    NewEvent::host(
                        &host.name,
                        Reason::Resumed,
                        Some(&revision),
                        "resumed by its spec",
                    )
                    .phase(Phase::Pending),
                );
            }
        }
        if self.record_all(news).is_none() {
            return false;
        }
        for host in removed {
            self.queue.remove(&host);
            self.desired.remove(&host);
        }
        for host in suspended {
            self.queue.forget(&host);
        }
        self.specs = Some((revision, fleet));
        self.desired.clear();
        true
    }

    /// After any host's state changed: halt the rollout if its failure
    /// budget is spent, announce a new wave, and let gated hosts be
    /// re-evaluated.
    fn advance_rollout(&mut self) {
        let Some((revision, fleet)) = self.specs.as_ref() else {
            return;
        };
        let revision = revision.clone();
        let halt = rollout::over_budget(fleet, &self.status, &revision).map(|failed| {
            format!(
                "rollout of {} halted: {} failed ({}); hosts not yet touched stay as they are until a new revision or `cim reconcile --all`",
                short(&revision),
                failed.join(", "),
                fleet.policy.max_failures
            )
        });
        let waves = fleet.policy.waves.len();
        let wave = rollout::current_wave(fleet, &self.status, &revision)
            .filter(|w| self.status.repo.wave.as_deref() != Some(w.name.as_str()));
        if let Some(message) = halt {
            self.record(NewEvent::repo(
                Reason::RolloutHalted,
                Some(&revision),
                message,
            ));
        }
        if let Some(w) = wave {
            let mut ev = NewEvent::repo(
                Reason::WaveStarted,
                Some(&revision),
                format!(
                    "wave {} of {}: {} ({})",
                    w.index + 1,
                    waves + 1,
                    w.name,
                    w.members.join(", ")
                ),
            );
            ev.wave = Some(w.name);
            self.record(ev);
        }
        let now = Instant::now();
        for host in std::mem::take(&mut self.gated) {
            self.queue.enqueue(&host, now);
        }
    }

    /// A build error is deterministic for a given revision, so it is not
    /// retried on a timer: a new revision or `cim reconcile` tries again.
    fn build_failed(&mut self, host: &str, revision: &str, message: String) {
        self.desired.remove(host);
        self.gated.remove(host);
        self.record(
            NewEvent::host(host, Reason::BuildFailed, Some(revision), message).phase(Phase::Failed),
        );
    }

    /// Sets why the store refuses writes (`None`: it takes them), and says
    /// so on `/healthz`.
    fn set_store_failure(&mut self, failure: Option<String>) {
        self.health.send_replace(
            failure
                .as_ref()
                .map(|message| format!("the store refuses writes, no new work starts: {message}")),
        );
        self.store_failure = failure;
    }

    /// While the store refuses writes, tries a write; once one succeeds,
    /// work resumes (nothing is lost: status only ever changes after a
    /// commit, and the level-triggered loop redoes what was skipped).
    fn check_store(&mut self) {
        match self.store.check_writable() {
            Ok(()) => {
                tracing::info!("the store takes writes again; resuming work");
                self.set_store_failure(None);
                if let Some((revision, fleet)) = self.unapplied.take() {
                    self.start_evaluation(&revision, Purpose::New(fleet));
                }
                self.resync();
            }
            Err(e) => {
                tracing::warn!(error = %crate::error::error_chain(&e), "the store still refuses writes");
            }
        }
    }

    /// Deletes the events `--event-retention` no longer keeps, on a
    /// blocking thread with its own connection; the controller records
    /// what was deleted when it is done.
    fn trim_events(&mut self) {
        let retention = self.cfg.retention;
        let dir = self.cfg.state_dir.clone();
        let tx = self.msg_tx.clone();
        tokio::task::spawn_blocking(move || {
            let trimmed =
                Store::open(&dir).and_then(|mut s| s.trim(&retention, OffsetDateTime::now_utc()));
            match trimmed {
                Ok(Some((through, deleted))) => {
                    let _ = tx.blocking_send(Msg::Trimmed { through, deleted });
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %crate::error::error_chain(&e), "cannot delete old events");
                }
            }
        });
    }

    /// Hands due hosts to workers, within `--max-parallel`.
    fn dispatch(&mut self) {
        if self.store_failure.is_some() {
            return;
        }
        let limit = self
            .specs
            .as_ref()
            .and_then(|(_, f)| f.policy.max_parallel)
            .map_or(self.cfg.max_parallel, |p| p.min(self.cfg.max_parallel));
        let free = limit.saturating_sub(self.queue.running());
        if free == 0 {
            return;
        }
        for host in self.queue.pop_ready(Instant::now(), free) {
            let item = match (self.specs.as_ref(), self.desired.get(&host)) {
                (Some((revision, fleet)), Some(desired)) => fleet
                    .hosts
                    .get(&host)
                    .filter(|h| !h.suspend)
                    .map(|spec| WorkItem {
                        host: spec.clone(),
                        revision: revision.clone(),
                        desired: desired.out.clone(),
                        build: (!self.built.contains(&desired.out)).then(|| desired.drv.clone()),
                        // Also for a host cim knows nothing of yet (a new
                        // state directory on a running fleet): looking costs
                        // one connection, building what it already runs
                        // could cost minutes.
                        likely_current: self.status.hosts.get(&host).is_none_or(|h| {
                            h.current_system.as_deref() == Some(desired.out.as_str())
                        }),
                        push: self.driver.cache.is_some() && !self.pushed.contains(&desired.out),
                        substitute: spec
                            .substitute_on_destination
                            .unwrap_or(self.cfg.substitute_on_destination),
                    }),
                _ => None,
            };
            let Some(item) = item.filter(|_| !self.held(&host)) else {
                self.queue.done(&host);
                continue;
            };
            if let Some((revision, fleet)) = self.specs.as_ref() {
                if let Some(why) = rollout::blocked_by(fleet, &self.status, revision, &item.host) {
                    tracing::debug!(host = %host, "{why}");
                    self.queue.done(&host);
                    self.gated.insert(host);
                    continue;
                }
            }
            let revision = item.revision.clone();
            let work = reconcile::run(
                Arc::clone(&self.driver),
                self.builds.clone(),
                item,
                self.report_tx.clone(),
                self.worker_cancel.child_token(),
            );
            self.spawn_worker(&host, &revision, work);
        }
    }

    /// Starts a worker task for `host`; see [`Controller::worker_ended`].
    pub(super) fn spawn_worker(
        &mut self,
        host: &str,
        revision: &str,
        work: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let handle = self.workers.spawn(work);
        self.worker_hosts
            .insert(handle.id(), (host.to_string(), revision.to_string()));
    }

    /// A worker task ended. One that panicked never sent its `Done`: it is
    /// reported here as a failed reconcile of its host, which frees the
    /// host's slot and retries it with backoff.
    fn worker_ended(
        &mut self,
        joined: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
    ) -> Option<Report> {
        let (id, error) = match joined {
            Ok((id, ())) => (id, None),
            Err(e) => (e.id(), Some(e)),
        };
        let (host, revision) = self.worker_hosts.remove(&id)?;
        let error = error.filter(|e| e.is_panic())?;
        let message = crate::reconcile::panic_message(error.into_panic());
        tracing::error!(%host, %message, "a worker panicked");
        Some(Report::Done {
            host,
            revision,
            outcome: reconcile::Outcome::Failed {
                reason: Reason::WorkerCrashed,
                message: format!("the worker reconciling this host crashed: {message}"),
            },
        })
    }

    fn operator_suspended(&self, host: &str) -> bool {
        self.status
            .hosts
            .get(host)
            .is_some_and(|h| h.operator_suspended)
    }

    /// Whether `host` must not be worked on now: an operator suspended it
    /// with `cim rollback`, or it failed to activate the current revision
    /// and waits for a new one or an explicit reconcile.
    fn held(&self, host: &str) -> bool {
        if self.operator_suspended(host) {
            return true;
        }
        let failed = self
            .status
            .hosts
            .get(host)
            .and_then(|h| h.failed_revision.as_deref());
        failed.is_some() && failed == self.current_revision()
    }

    /// Re-checks every host that is not already waiting for a retry.
    fn resync(&mut self) {
        let now = Instant::now();
        let hosts: Vec<String> = self.desired.keys().cloned().collect();
        for host in hosts {
            let Some(spec) = self.host_spec(&host) else {
                continue;
            };
            if spec.suspend || self.queue.is_queued(&host) || self.held(&host) {
                continue;
            }
            // dry-activate changes nothing on the host, so there is nothing
            // to re-check once it has run.
            if spec.action == Action::DryActivate
                && self.status.phase_of(&host) == Some(Phase::Converged)
            {
                continue;
            }
            self.queue.enqueue(&host, now);
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

pub use crate::event::short;

fn log_event(ev: &Event) {
    let host = ev.host.as_deref().unwrap_or("");
    let revision = ev.revision.as_deref().unwrap_or("");
    match ev.event_type {
        crate::event::EventType::Normal => tracing::info!(
            seq = ev.seq, host, revision, reason = %ev.reason, to = ?ev.to_phase, "{}", ev.message
        ),
        crate::event::EventType::Warning => tracing::warn!(
            seq = ev.seq, host, revision, reason = %ev.reason, to = ?ev.to_phase, "{}", ev.message
        ),
    }
}

#[cfg(test)]
mod tests;
