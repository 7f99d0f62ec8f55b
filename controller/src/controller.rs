//! The controller task: the thin loop around [`crate::decide`]. It owns
//! the decisions' state, the store's write connection, the workers and the
//! evaluation in flight; it turns what arrives (the watcher's revisions,
//! workers' reports, operator requests, timers) into messages, asks
//! `decide::handle` what they mean, and carries the effects out.
//!
//! Group commit: the loop takes every message that is ready (up to
//! [`GROUP_LIMIT`]) and handles them in one SQLite transaction, one disk
//! sync for all their events. Nothing outside the task sees an effect
//! before that sync — events are broadcast, requests answered, workers and
//! evaluations started only after it — so what anyone was told is always
//! durable. A group whose commit fails stops the controller (its memory is
//! ahead of the disk, as after a failed fsync); a restart rebuilds it from
//! the store and adopts what workers left in flight.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::decide::{self, Ask, Effect, Msg, Now, RequestId, State};
use crate::driver::DriverConfig;
use crate::event::Event;
use crate::host::Backend;
use crate::reconcile::{self, Report};
use crate::spec::FleetSpec;
use crate::status::FleetStatus;
use crate::store::{Store, StoreError};
use crate::watch::Found;

pub use crate::event::short;

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
    /// `--refuse-rewrites`.
    pub refuse_rewrites: bool,
}

/// A request from the API, with where its answer goes.
#[derive(Debug)]
pub enum Request {
    /// Reconcile one host, the hosts a selector matches, or every host,
    /// now.
    Reconcile {
        host: Option<String>,
        selector: Option<crate::spec::Selector>,
        force_window: bool,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// The hosts whose labels match `selector` (one name per line).
    Select {
        selector: crate::spec::Selector,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Suspend a host and switch it to its previous generation.
    Rollback {
        host: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Reboot a host now.
    Reboot {
        host: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Hand a host suspended by `Rollback` back to the controller.
    Resume {
        host: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Deploy a rewritten revision held back by `--refuse-rewrites`.
    Accept {
        revision: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Let a wave with `approval: manual` go ahead.
    Approve {
        revision: String,
        wave: Option<String>,
        reply: oneshot::Sender<Result<String, String>>,
    },
}

/// The group commit failed: the controller stopped.
#[derive(Debug, thiserror::Error)]
#[error("the store could not commit a group of events; the controller stopped and a restart picks up from what is durable")]
pub struct Stopped(#[source] pub StoreError);

/// The controller task's state; `B` is how it reaches nix and the hosts
/// (simulated in benchmarks).
pub struct Controller<B: Backend = DriverConfig> {
    cfg: ControllerConfig,
    backend: Arc<B>,
    store: Store,
    state: State,
    events: broadcast::Sender<Event>,
    /// Workers' builds, batched.
    builds: reconcile::Builds,
    /// The evaluation in flight.
    evaluation: Option<tokio::task::JoinHandle<()>>,
    workers: JoinSet<()>,
    /// Which host (and revision) each worker task works on, so that a
    /// worker that panics is reported as a failed reconcile of its host.
    worker_hosts: HashMap<tokio::task::Id, (crate::types::HostName, crate::types::Revision)>,
    worker_cancel: CancellationToken,
    fetch_now: Arc<Notify>,
    /// Evaluations' and retention's results.
    msg_tx: mpsc::Sender<Msg>,
    msg_rx: Option<mpsc::Receiver<Msg>>,
    report_tx: mpsc::Sender<Report>,
    report_rx: Option<mpsc::Receiver<Report>>,
    /// Why the store refuses writes, published for `/healthz`.
    health: tokio::sync::watch::Sender<Option<String>>,
    /// The newest committed event's sequence number, for the API.
    committed: tokio::sync::watch::Sender<u64>,
    /// The rows each commit wrote, for the API's status snapshot.
    feed: crate::feed::StatusFeed,
    /// Fed every committed event and every group commit's time.
    metrics: Arc<crate::metrics::Metrics>,
    /// Requests waiting for their answer.
    replies: HashMap<RequestId, oneshot::Sender<Result<String, String>>>,
    next_request: u64,
    /// What waits for the group's commit: effects and appended events.
    outbox: Vec<Effect>,
    appended: Vec<Event>,
}

const CHANNEL_CAPACITY: usize = 256;
/// Events a subscriber (the SSE streams, the status snapshot) may fall
/// behind before it must read the store instead: a wave of 1,000 hosts
/// finishing together makes a few thousand events within milliseconds.
const EVENT_BROADCAST_CAPACITY: usize = 16_384;
/// The most messages handled in one group commit (about 40 ms of the
/// controller's time at most). With a channel of a quarter of it, groups
/// were cut at the channel's size and 10,000 simulated hosts took 8%
/// longer (more commits, each a disk sync).
const GROUP_LIMIT: usize = 4096;
/// Workers' reports that may wait for the controller, per worker allowed
/// at once: a worker reports its steps and goes on, so 10,000 that finish
/// a step together must not wait for the controller to record the step
/// of all the others first (they did: 80 ms before each copy started).
const REPORTS_PER_WORKER: usize = 4;
/// However many workers are allowed at once, the reports' queue is at
/// most this long (a few hundred bytes each).
const REPORTS_LIMIT: usize = 1 << 18;
/// When `--event-retention` first runs after a start, and how often after.
const RETENTION_FIRST: Duration = Duration::from_secs(30);
const RETENTION_INTERVAL: Duration = Duration::from_secs(600);
/// How long the controller is idle before it writes the status rows that
/// lag the log (see `Store::commit_group_with`).
const IDLE_BEFORE_ROWS: Duration = Duration::from_millis(50);
/// How often a store that refused a write is tried again.
const STORE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

impl<B: Backend> Controller<B> {
    pub fn new(
        cfg: ControllerConfig,
        backend: B,
        mut store: Store,
        fetch_now: Arc<Notify>,
    ) -> Result<Controller<B>, StoreError> {
        let status = store.load_status_to_write()?;
        store.checkpoint_apart(&cfg.state_dir)?;
        let backend = Arc::new(backend);
        let state = State::new(
            decide::Config {
                max_parallel: cfg.max_parallel,
                backoff_base: cfg.backoff_base,
                backoff_max: cfg.backoff_max,
                substitute_on_destination: cfg.substitute_on_destination,
                push_to_cache: backend.cache().is_some(),
                refuse_rewrites: cfg.refuse_rewrites,
            },
            status,
        );
        let (events, _) = broadcast::channel(EVENT_BROADCAST_CAPACITY);
        let (msg_tx, msg_rx) = mpsc::channel(CHANNEL_CAPACITY);
        let (report_tx, report_rx) = mpsc::channel(
            cfg.max_parallel
                .saturating_mul(REPORTS_PER_WORKER)
                .clamp(GROUP_LIMIT, REPORTS_LIMIT),
        );
        Ok(Controller {
            msg_tx,
            msg_rx: Some(msg_rx),
            report_tx,
            report_rx: Some(report_rx),
            health: tokio::sync::watch::Sender::new(None),
            committed: tokio::sync::watch::Sender::new(state.status().repo.last_seq),
            feed: crate::feed::StatusFeed::default(),
            metrics: Arc::default(),
            cfg,
            builds: reconcile::Builds::spawn(Arc::clone(&backend)),
            backend,
            store,
            state,
            events,
            evaluation: None,
            workers: JoinSet::new(),
            worker_hosts: HashMap::new(),
            worker_cancel: CancellationToken::new(),
            fetch_now,
            replies: HashMap::new(),
            next_request: 0,
            outbox: Vec::new(),
            appended: Vec::new(),
        })
    }

    pub fn status(&self) -> &FleetStatus {
        self.state.status()
    }

    /// Why the controller cannot work (`None`: it can), for `/healthz`.
    pub fn health(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.health.subscribe()
    }

    pub fn events(&self) -> broadcast::Sender<Event> {
        self.events.clone()
    }

    /// Where other tasks (the notifier) report to the controller.
    pub fn reporter(&self) -> mpsc::Sender<Msg> {
        self.msg_tx.clone()
    }

    /// The metrics this controller feeds, for `/metrics`.
    pub fn metrics(&self) -> Arc<crate::metrics::Metrics> {
        Arc::clone(&self.metrics)
    }

    /// The newest committed event's sequence number, as it changes.
    pub fn committed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.committed.subscribe()
    }

    /// The projection rows each commit writes, published before the
    /// commit is made known through [`Controller::committed`].
    pub fn status_feed(&self) -> crate::feed::StatusFeed {
        self.feed.clone()
    }

    /// Resumes reconciling the last valid revision recorded in the store,
    /// before the watcher has fetched anything.
    pub fn resume(&mut self, revision: crate::types::Revision, specs: FleetSpec) {
        tracing::info!(%revision, hosts = specs.hosts.len(), "resuming the last valid revision");
        let effects = self.state.resume(revision, specs);
        self.outbox.extend(effects);
    }

    /// Runs until `cancel` fires (or a group commit fails). `found`
    /// carries the watcher's reports, `requests` the API's.
    pub async fn run(
        mut self,
        mut found: mpsc::Receiver<Found>,
        mut requests: mpsc::Receiver<Request>,
        cancel: CancellationToken,
    ) -> Result<(), Stopped> {
        let (Some(mut rx), Some(mut reports)) = (self.msg_rx.take(), self.report_rx.take()) else {
            return Ok(());
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
        let mut result = self.group(Vec::new());
        // When the projection's rows that lag the log are written: once
        // nothing has come for a moment (a burst's groups write only their
        // events).
        let mut write_rows_at = Instant::now() + IDLE_BEFORE_ROWS;
        while result.is_ok() {
            let next_due = self.state.next_dispatch().map(Instant::from_std);
            let msg = tokio::select! {
                () = cancel.cancelled() => break,
                Some(f) = found.recv() => found_msg(f),
                Some(r) = reports.recv() => Msg::Report(r),
                Some(m) = rx.recv() => m,
                Some(r) = requests.recv() => self.request(r),
                _ = resync.tick() => Msg::Resync,
                _ = retention.tick(), if !retains_all => { self.trim_events(); continue; }
                _ = store_check.tick(), if self.state.store_failure().is_some() => {
                    match self.store.check_writable() {
                        Ok(()) => {
                            tracing::info!("the store takes writes again; resuming work");
                            Msg::StoreWritable
                        }
                        Err(e) => {
                            tracing::warn!(error = %crate::error::error_chain(&e), "the store still refuses writes");
                            continue;
                        }
                    }
                }
                () = tokio::time::sleep_until(write_rows_at), if self.store.lagging() => {
                    if let Err(e) = self.write_rows() {
                        tracing::warn!(error = %crate::error::error_chain(&e), "cannot write the status rows; the log holds them, trying again");
                        write_rows_at = Instant::now() + STORE_CHECK_INTERVAL;
                    }
                    continue;
                }
                () = sleep_until(next_due) => Msg::Tick,
                Some(joined) = self.workers.join_next_with_id(), if !self.workers.is_empty() => {
                    match self.worker_ended(joined) {
                        Some(report) => Msg::Report(report),
                        None => continue,
                    }
                }
            };
            // Whatever else is ready joins this group.
            let mut msgs = vec![msg];
            while msgs.len() < GROUP_LIMIT {
                match reports.try_recv() {
                    Ok(r) => msgs.push(Msg::Report(r)),
                    Err(_) => break,
                }
            }
            result = self.group(msgs);
            write_rows_at = Instant::now() + IDLE_BEFORE_ROWS;
        }
        match &result {
            Err(e) => tracing::error!(error = %crate::error::error_chain(e), "stopping"),
            // Stopped cleanly: the rows that lag the log are written, so
            // that the next start folds nothing. (Reads are exact either
            // way; after a failed group the store is left as it is.)
            Ok(()) => {
                if let Err(e) = self.write_rows() {
                    tracing::warn!(error = %crate::error::error_chain(&e), "cannot write the status rows; the next start folds them from the log");
                }
            }
        }
        tracing::info!("shutting down: stopping workers");
        self.worker_cancel.cancel();
        if let Some(evaluation) = self.evaluation.take() {
            evaluation.abort();
        }
        while self.workers.join_next().await.is_some() {}
        result
    }

    /// Writes the status rows that lag the log, if any (the write waits
    /// for the disk, like a group's).
    fn write_rows(&mut self) -> Result<(), StoreError> {
        tokio::task::block_in_place(|| self.store.write_lagging(self.state.status()))
    }

    /// Handles `msgs` (and a dispatch) in one group commit, then carries
    /// out what waited for it.
    fn group(&mut self, msgs: Vec<Msg>) -> Result<(), Stopped> {
        // The group's sync waits for the disk; the runtime moves its other
        // tasks (the API, workers' reports) off this thread meanwhile.
        let written = tokio::task::block_in_place(|| {
            self.store.begin_group();
            for msg in msgs {
                self.step(msg);
            }
            self.step(Msg::Tick);
            let started = std::time::Instant::now();
            let committed = self
                .store
                .commit_group_with(self.state.status(), || self.feed.is_followed());
            if !self.appended.is_empty() {
                self.metrics.observe_commit(started.elapsed().as_secs_f64());
            }
            committed
        })
        .map_err(Stopped)?;
        if !self.appended.is_empty() {
            self.feed.publish(self.state.status(), written);
        }
        self.health.send_if_modified(|h| {
            let now = self
                .state
                .store_failure()
                .map(|message| format!("the store refuses writes, no new work starts: {message}"));
            let changed = *h != now;
            *h = now;
            changed
        });
        let last = self.state.status().repo.last_seq;
        self.committed
            .send_if_modified(|seq| std::mem::replace(seq, last) != last);
        for ev in std::mem::take(&mut self.appended) {
            self.metrics.observe(&ev);
            let _ = self.events.send(ev);
        }
        for effect in std::mem::take(&mut self.outbox) {
            self.carry_out(effect);
        }
        Ok(())
    }

    /// Decides on one message; appends at once (inside the group) and
    /// feeds the outcome back, keeps every other effect for after the
    /// group's commit.
    fn step(&mut self, msg: Msg) {
        let now = Now {
            at: Instant::now().into_std(),
            wall: OffsetDateTime::now_utc(),
        };
        for effect in decide::handle(&mut self.state, msg, now) {
            match effect {
                Effect::Append { events, then } => {
                    let appended = self
                        .store
                        .append_all(self.state.projection(), events, now.wall);
                    match appended {
                        Ok(evs) => {
                            evs.iter().for_each(log_event);
                            self.appended.extend(evs);
                            self.step(Msg::Committed { then });
                        }
                        Err(e) => {
                            let error = crate::error::error_chain(&e);
                            tracing::error!(%error, "cannot record an event; no new work starts until the store takes writes again");
                            self.step(Msg::AppendFailed { error, then });
                        }
                    }
                }
                other => self.outbox.push(other),
            }
        }
    }

    fn carry_out(&mut self, effect: Effect) {
        match effect {
            Effect::Append { .. } => {}
            Effect::Evaluate {
                revision,
                purpose,
                configurations,
            } => self.evaluate(revision, purpose, configurations),
            Effect::Run(item) => {
                let (host, revision) = (item.host.name.clone(), item.revision.clone());
                let work = reconcile::run(
                    Arc::clone(&self.backend),
                    self.builds.clone(),
                    item,
                    self.report_tx.clone(),
                    self.worker_cancel.child_token(),
                );
                self.spawn_worker(&host, &revision, work);
            }
            Effect::RollBack { host, revision } => {
                self.spawn_operator_worker(host, revision, reconcile::run_rollback)
            }
            Effect::Reboot { host, revision } => {
                self.spawn_operator_worker(host, revision, reconcile::run_reboot)
            }
            Effect::Prebuild(systems) => {
                for system in systems {
                    let builds = self.builds.clone();
                    // Its result is the worker's to find out, later.
                    tokio::spawn(async move {
                        let _ = builds.build(system).await;
                    });
                }
            }
            Effect::Fetch => self.fetch_now.notify_one(),
            Effect::Reply { id, result } => {
                if let Some(reply) = self.replies.remove(&id) {
                    let _ = reply.send(result);
                }
            }
        }
    }

    /// Keeps a request's answer channel and turns it into a message.
    fn request(&mut self, request: Request) -> Msg {
        let (ask, reply) = match request {
            Request::Reconcile {
                host,
                selector,
                force_window,
                reply,
            } => (
                Ask::Reconcile {
                    host,
                    selector,
                    force_window,
                },
                reply,
            ),
            Request::Select { selector, reply } => (Ask::Select { selector }, reply),
            Request::Rollback { host, reply } => (Ask::Rollback { host }, reply),
            Request::Reboot { host, reply } => (Ask::Reboot { host }, reply),
            Request::Resume { host, reply } => (Ask::Resume { host }, reply),
            Request::Accept { revision, reply } => (Ask::Accept { revision }, reply),
            Request::Approve {
                revision,
                wave,
                reply,
            } => (Ask::Approve { revision, wave }, reply),
        };
        self.next_request += 1;
        let id = RequestId(self.next_request);
        self.replies.insert(id, reply);
        Msg::Request { id, ask }
    }

    /// Evaluates `revision` in the background (one `nix eval` for the
    /// fleet), replacing an evaluation in flight.
    fn evaluate(
        &mut self,
        revision: crate::types::Revision,
        purpose: decide::Purpose,
        configurations: Vec<String>,
    ) {
        if let Some(old) = self.evaluation.take() {
            old.abort();
        }
        let flake = crate::git::flake_ref(&self.cfg.mirror_path, &revision);
        let backend = Arc::clone(&self.backend);
        let tx = self.msg_tx.clone();
        self.evaluation = Some(tokio::spawn(async move {
            use futures::FutureExt;
            // An evaluation that panics still answers, or the revision
            // would wait for it forever.
            let result = std::panic::AssertUnwindSafe(backend.evaluate(&flake, &configurations))
                .catch_unwind()
                .await
                .map_err(|panic| {
                    format!(
                        "the evaluation crashed: {}",
                        reconcile::panic_message(panic)
                    )
                })
                .and_then(|r| r.map_err(|e| crate::error::error_chain(&e)));
            let _ = tx
                .send(Msg::Evaluated {
                    revision,
                    purpose,
                    result,
                })
                .await;
        }));
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

    /// Starts a worker task for `host`; see [`Controller::worker_ended`].
    /// Starts an operator's worker on `host` (`cim rollback`, `cim
    /// reboot`): `work` is its function, with the backend, the host, the
    /// revision, the report channel and its cancellation.
    fn spawn_operator_worker<F, Fut>(
        &mut self,
        host: crate::spec::HostSpec,
        revision: crate::types::Revision,
        work: F,
    ) where
        F: FnOnce(
            Arc<B>,
            crate::spec::HostSpec,
            crate::types::Revision,
            mpsc::Sender<Report>,
            CancellationToken,
        ) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let name = host.name.clone();
        let work = work(
            Arc::clone(&self.backend),
            host,
            revision.clone(),
            self.report_tx.clone(),
            self.worker_cancel.child_token(),
        );
        self.spawn_worker(&name, &revision, work);
    }

    fn spawn_worker(
        &mut self,
        host: &crate::types::HostName,
        revision: &crate::types::Revision,
        work: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let handle = self.workers.spawn(work);
        self.worker_hosts
            .insert(handle.id(), (host.clone(), revision.clone()));
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
                reason: crate::event::Reason::WorkerCrashed,
                message: format!("the worker reconciling this host crashed: {message}"),
            },
        })
    }
}

fn found_msg(found: Found) -> Msg {
    match found {
        Found::Head { revision } => Msg::Head { revision },
        Found::Revision {
            revision,
            specs,
            trust,
            rewritten_from,
        } => Msg::Revision {
            revision,
            specs: *specs,
            trust,
            rewritten_from,
        },
        Found::FetchFailed { message } => Msg::FetchFailed { message },
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

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
