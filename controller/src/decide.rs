//! The controller's brain: every decision it makes, as plain functions of
//! its state, one message and the time — `handle(&mut State, Msg, now) ->
//! Vec<Effect>`. No IO, no tokio, no store: an effect is a value (append
//! these events, evaluate this revision, run this host's reconcile, reply
//! to this request, fetch now) and the run loop in `controller` carries it
//! out.
//!
//! Whatever depends on an event being durable is not done alongside the
//! append but in its continuation ([`Then`]): the loop appends, and answers
//! with [`Msg::Committed`] or [`Msg::AppendFailed`]. So a refused append
//! fails closed by construction — the state change, request or work that
//! needed it never happens, and the operator is told why.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use crate::driver::{Evaluation, Toplevel};
use crate::event::{short, NewEvent, Phase, Reason};
use crate::queue::WorkQueue;
use crate::reconcile::{Report, WorkItem};
use crate::spec::{FleetSpec, HostSpec};
use crate::status::FleetStatus;
use crate::types::{Revision, StorePath};

mod dispatch;
mod evaluation;
mod outcome;
mod requests;
mod windows;

/// The decisions' tunables (from the command line).
#[derive(Debug, Clone)]
pub struct Config {
    pub max_parallel: usize,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// `--substitute-on-destination`, unless a spec says otherwise.
    pub substitute_on_destination: bool,
    /// Whether closures are pushed to a binary cache before copying.
    pub push_to_cache: bool,
    /// `--refuse-rewrites`: a head that does not descend from the previous
    /// one waits for `cim accept`.
    pub refuse_rewrites: bool,
}

/// The two clocks a decision may read: the monotonic one for the queue,
/// the wall clock for what events say (a retry's time).
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub at: Instant,
    pub wall: OffsetDateTime,
}

/// Identifies an operator request, so that its answer finds its way back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(pub u64);

/// What an operator asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ask {
    /// Reconcile one host, the hosts a label selector matches, or every
    /// host, now.
    Reconcile {
        host: Option<String>,
        selector: Option<crate::spec::Selector>,
        /// `--force-window`: work on them although the deployment windows
        /// are closed.
        force_window: bool,
    },
    /// The hosts of the current specs whose labels match `selector`.
    Select { selector: crate::spec::Selector },
    /// Suspend a host and switch it to its previous generation.
    Rollback { host: String },
    /// Reboot a host now (`cim reboot`).
    Reboot { host: String },
    /// Hand a host suspended by `Rollback` back to the controller.
    Resume { host: String },
    /// Deploy a rewritten revision (`--refuse-rewrites`); a full commit id
    /// or a prefix of at least 7 digits.
    Accept { revision: String },
    /// Let a wave with `approval: manual` go ahead at `revision` (a prefix
    /// of at least 7 digits); `wave` by name or 1-based number, else the
    /// current one.
    Approve {
        revision: String,
        wave: Option<String>,
    },
}

/// Why a revision is evaluated.
#[derive(Debug, Clone)]
pub enum Purpose {
    /// A new revision with valid specs: deployed once its configurations
    /// check out against the flake.
    New(FleetSpec),
    /// The current revision again: after a restart, or for hosts without a
    /// system (their build failed and a reconcile was asked for).
    Refresh,
}

/// Everything the controller decides on.
#[derive(Debug)]
pub enum Msg {
    /// The branch moved (before its specs are read).
    Head {
        revision: Revision,
    },
    /// A fetched revision and its specs.
    Revision {
        revision: Revision,
        specs: Result<FleetSpec, crate::spec::SpecErrors>,
        trust: crate::trust::Verdict,
        /// The head it replaced without descending from it.
        rewritten_from: Option<Revision>,
    },
    FetchFailed {
        message: String,
    },
    Evaluated {
        revision: Revision,
        purpose: Purpose,
        result: Result<Evaluation, String>,
    },
    Report(Report),
    Request {
        id: RequestId,
        ask: Ask,
    },
    /// `--event-retention` deleted old events.
    Trimmed {
        through: u64,
        deleted: u64,
    },
    /// The resync timer: re-check every host.
    Resync,
    /// The store takes writes again after refusing one.
    StoreWritable,
    /// Time passed: hand due hosts to workers.
    Tick,
    /// A `--notify` URL refuses notifications.
    NotifyFailed {
        error: String,
    },
    /// An [`Effect::Append`] committed; its events are folded into the
    /// status already.
    Committed {
        then: Then,
    },
    /// An [`Effect::Append`] was refused; nothing of it is in the status.
    AppendFailed {
        error: String,
        then: Then,
    },
}

/// What the run loop must do, in order.
#[derive(Debug)]
pub enum Effect {
    /// Append these events in one transaction, then answer with
    /// [`Msg::Committed`] or [`Msg::AppendFailed`] carrying `then`.
    Append { events: Vec<NewEvent>, then: Then },
    /// Evaluate every listed configuration at `revision` (one `nix eval`),
    /// replacing any evaluation in flight; answer with [`Msg::Evaluated`].
    Evaluate {
        revision: Revision,
        purpose: Purpose,
        configurations: Vec<String>,
    },
    /// Start a worker reconciling one host; it reports with [`Msg::Report`].
    Run(WorkItem),
    /// Start a worker rolling `host` back to its previous generation.
    RollBack { host: HostSpec, revision: Revision },
    /// Start a worker rebooting `host` (`cim reboot`).
    Reboot { host: HostSpec, revision: Revision },
    /// Build these systems ahead of their hosts' turn (the deployment
    /// windows are closed); nothing reports back, the workers build them
    /// again (at no cost) when they run.
    Prebuild(Vec<Toplevel>),
    /// Fetch the watched branch now.
    Fetch,
    /// Answer an operator request.
    Reply {
        id: RequestId,
        result: Result<String, String>,
    },
}

/// What follows an append once it committed (or what to say when it did
/// not).
#[derive(Debug)]
pub enum Then {
    Nothing,
    /// A revision's specs were recorded: make them current and give hosts
    /// their systems.
    SpecsApplied {
        revision: Revision,
        fleet: FleetSpec,
        removed: Vec<String>,
        suspended: Vec<String>,
        result: Result<Evaluation, String>,
    },
    /// A host's state changed: see whether the rollout moves on (once
    /// per group, at its dispatch: a scan of the fleet per outcome would
    /// cost 10,000 hosts' rollout 10,000 scans).
    AdvanceRollout,
    /// The rollout's own events are durable: hand out work.
    Dispatch,
    /// `cim rollback`'s suspension is durable: roll the host back.
    RollbackRecorded {
        id: RequestId,
        host: String,
    },
    /// `cim resume` is durable: reconcile the host again.
    Resumed {
        id: RequestId,
        host: String,
        revision: Option<Revision>,
    },
    /// `cim reboot`'s request is durable: reboot the host.
    RebootRecorded {
        id: RequestId,
        host: String,
    },
    /// `cim approve` is durable: the waiting wave goes ahead.
    Approved {
        id: RequestId,
        message: String,
    },
    /// `cim accept` is durable: deploy the revision.
    Accepted {
        id: RequestId,
        revision: Revision,
        specs: Result<FleetSpec, crate::spec::SpecErrors>,
    },
    /// `cim reconcile`'s requests are durable (they clear holds): queue.
    ReconcileRecorded {
        id: RequestId,
        one: Option<String>,
        hosts: Vec<String>,
        revision: Revision,
        force_window: bool,
    },
}

/// Everything the controller knows. Only [`handle`] changes it, and the
/// status only by folding committed events.
#[derive(Debug)]
pub struct State {
    pub(crate) cfg: Config,
    pub(crate) status: FleetStatus,
    /// The current valid revision and its specs.
    pub(crate) specs: Option<(Revision, FleetSpec)>,
    /// Each host's system at the current revision (evaluated; built by
    /// its worker when needed).
    pub(crate) desired: BTreeMap<String, Toplevel>,
    /// Closures known to exist in the local store (built this run).
    built: BTreeSet<StorePath>,
    /// Closures pushed to the binary cache this run.
    pushed: BTreeSet<StorePath>,
    /// The revision of the evaluation in flight.
    evaluating: Option<Revision>,
    /// The configurations a refresh in flight evaluates (sorted): only
    /// their hosts take its result.
    refreshing: Vec<String>,
    /// A revision whose invalid specs were already reported.
    judged: Option<Revision>,
    pub(crate) queue: WorkQueue<Instant>,
    /// Hosts due but held back by the rollout policy (waves, dependsOn, a
    /// halt); queued again whenever another host's state changes.
    gated: BTreeSet<String>,
    /// Why the store last refused a write; while set, no new work starts.
    pub(crate) store_failure: Option<String>,
    /// A revision whose specs the store refused to record.
    unapplied: Option<(Revision, FleetSpec)>,
    /// Hosts whose `cim rollback` waits for their current reconcile to end.
    pending_rollbacks: BTreeSet<String>,
    /// Hosts an operator asked to reconcile whose outcome is not recorded
    /// yet: it is, even when nothing changed (`cim reconcile --wait`).
    requested: BTreeSet<String>,
    /// When the current revision's rollout began (its specs recorded), for
    /// the duration `RolloutCompleted` names.
    rollout_started: Option<OffsetDateTime>,
    /// Hosts' states changed since the rollout was last looked at.
    rollout_due: bool,
    /// A rewritten revision waiting for `cim accept` (`--refuse-rewrites`).
    awaiting_accept: Option<(Revision, Result<FleetSpec, crate::spec::SpecErrors>)>,
    /// How each host's run changes its system ("3 packages upgraded"),
    /// from its build until its outcome.
    changes: BTreeMap<String, String>,
    /// Hosts `cim reconcile --force-window` lets through closed windows,
    /// until their run ends.
    forced: BTreeSet<String>,
    /// Whether `WindowClosed` was said last (not `WindowOpened`).
    window_closed: bool,
    /// Hosts whose run rebooted them, until its outcome.
    rebooting: BTreeSet<String>,
    /// Systems built ahead while the windows were closed.
    prebuilt: BTreeSet<StorePath>,
}

impl State {
    pub fn new(cfg: Config, status: FleetStatus) -> State {
        // A newest revision that is not the deployed one and carries a
        // message was refused before this restart; do not report it again.
        let judged = status
            .repo
            .latest_revision
            .as_deref()
            .filter(|l| {
                Some(*l) != status.repo.revision.as_deref() && status.repo.message.is_some()
            })
            .and_then(Revision::parse);
        let window_closed = status.repo.window.is_some();
        State {
            cfg,
            status,
            specs: None,
            desired: BTreeMap::new(),
            built: BTreeSet::new(),
            pushed: BTreeSet::new(),
            evaluating: None,
            refreshing: Vec::new(),
            judged,
            queue: WorkQueue::default(),
            gated: BTreeSet::new(),
            store_failure: None,
            unapplied: None,
            changes: BTreeMap::new(),
            forced: BTreeSet::new(),
            window_closed,
            rebooting: BTreeSet::new(),
            prebuilt: BTreeSet::new(),
            pending_rollbacks: BTreeSet::new(),
            rollout_started: None,
            rollout_due: false,
            requested: BTreeSet::new(),
            awaiting_accept: None,
        }
    }

    pub fn status(&self) -> &FleetStatus {
        &self.status
    }

    /// The status, for the run loop's store to fold committed events into.
    pub fn projection(&mut self) -> &mut FleetStatus {
        &mut self.status
    }

    /// Why the store refuses writes (`None`: it takes them).
    pub fn store_failure(&self) -> Option<&str> {
        self.store_failure.as_deref()
    }

    /// When a host can next be handed to a worker: when the queue next has
    /// one due, if a worker slot is free and the store takes writes.
    /// (`None` while every slot is taken: a due host waits for a worker's
    /// report, not for a timer that would fire again and again.)
    pub fn next_dispatch(&self) -> Option<Instant> {
        if self.store_failure.is_some() || self.free_slots() == 0 {
            return None;
        }
        self.queue.next_due()
    }

    fn free_slots(&self) -> usize {
        let limit = self
            .specs
            .as_ref()
            .and_then(|(_, f)| f.policy.max_parallel)
            .map_or(self.cfg.max_parallel, |p| p.min(self.cfg.max_parallel));
        limit.saturating_sub(self.queue.running())
    }

    /// Resumes reconciling the last valid revision recorded in the store,
    /// before the watcher has fetched anything: a restart, or an unreachable
    /// git server, must not stop the fleet from being kept converged.
    pub fn resume(&mut self, revision: Revision, specs: FleetSpec) -> Vec<Effect> {
        self.specs = Some((revision.clone(), specs));
        let mut out = Vec::new();
        self.start_evaluation(&revision, Purpose::Refresh, &mut out);
        out
    }

    pub(crate) fn current_revision(&self) -> Option<&str> {
        self.current().map(Revision::as_str)
    }

    fn current(&self) -> Option<&Revision> {
        self.specs.as_ref().map(|(r, _)| r)
    }

    fn host_spec(&self, name: &str) -> Option<&HostSpec> {
        self.specs
            .as_ref()
            .and_then(|(_, s)| s.hosts.get(name))
            .map(|h| &**h)
    }

    fn active_hosts(&self) -> Vec<String> {
        self.specs
            .as_ref()
            .map(|(_, s)| {
                s.hosts
                    .values()
                    .filter(|h| !h.suspend)
                    .map(|h| h.name.to_string())
                    .collect()
            })
            .unwrap_or_default()
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
}

/// Decides what `msg` means for the controller: changes `state` and
/// returns what the run loop must do, in order.
pub fn handle(state: &mut State, msg: Msg, now: Now) -> Vec<Effect> {
    let mut out = Vec::new();
    match msg {
        Msg::Head { revision } => state.on_head(&revision, &mut out),
        Msg::Revision {
            revision,
            specs,
            trust,
            rewritten_from,
        } => state.on_new_head(revision, specs, trust, rewritten_from, &mut out),
        Msg::FetchFailed { message } => {
            let revision = state.status.repo.latest_revision.clone();
            append(
                &mut out,
                vec![NewEvent::repo(
                    Reason::FetchFailed,
                    revision.as_deref(),
                    message,
                )],
                Then::Nothing,
            );
        }
        Msg::Evaluated {
            revision,
            purpose,
            result,
        } => state.on_evaluated(revision, purpose, result, now, &mut out),
        Msg::Report(Report::Step {
            host,
            revision,
            step,
        }) => state.on_step(&host, &revision, step, &mut out),
        Msg::Report(Report::Done {
            host,
            revision,
            outcome,
        }) => state.on_done(&host, &revision, outcome, now, &mut out),
        Msg::Request { id, ask } => state.on_request(id, ask, &mut out),
        Msg::Trimmed { through, deleted } => {
            let mut ev = NewEvent::repo(
                Reason::EventsTrimmed,
                None,
                format!(
                    "--event-retention deleted {deleted} events; the history now starts after #{through}"
                ),
            );
            ev.trimmed_through = Some(through);
            append(&mut out, vec![ev], Then::Nothing);
        }
        Msg::Resync => state.resync(now),
        Msg::StoreWritable => {
            state.store_failure = None;
            if let Some((revision, fleet)) = state.unapplied.take() {
                state.start_evaluation(&revision, Purpose::New(fleet), &mut out);
            }
            state.resync(now);
        }
        Msg::Tick if state.rollout_due => {
            state.rollout_due = false;
            state.advance_rollout(now, Then::Dispatch, &mut out);
        }
        Msg::Tick => state.dispatch(now, &mut out),
        Msg::NotifyFailed { error } => append(
            &mut out,
            vec![NewEvent::repo(
                Reason::NotificationFailed,
                None,
                format!("{error}; retried with backoff, nothing is dropped"),
            )],
            Then::Nothing,
        ),
        Msg::Committed { then } => state.committed(then, now, &mut out),
        Msg::AppendFailed { error, then } => state.append_failed(error, then, &mut out),
    }
    out
}

/// Asks for `events` to be appended, `then` to follow once they are
/// durable. An empty append still carries its continuation, in order.
fn append(out: &mut Vec<Effect>, events: Vec<NewEvent>, then: Then) {
    if events.is_empty() && matches!(then, Then::Nothing) {
        return;
    }
    out.push(Effect::Append { events, then });
}

impl State {
    fn committed(&mut self, then: Then, now: Now, out: &mut Vec<Effect>) {
        match then {
            Then::Nothing => {}
            Then::SpecsApplied {
                revision,
                fleet,
                removed,
                suspended,
                result,
            } => self.specs_applied(revision, fleet, removed, suspended, result, now, out),
            Then::AdvanceRollout => self.rollout_due = true,
            Then::Dispatch => self.dispatch(now, out),
            Then::RollbackRecorded { id, host } => self.rollback_recorded(id, &host, out),
            Then::Resumed { id, host, revision } => self.resumed(id, &host, revision, now, out),
            Then::ReconcileRecorded {
                id,
                one,
                hosts,
                revision,
                force_window,
            } => {
                if force_window {
                    self.forced.extend(hosts.iter().cloned());
                }
                self.reconcile_recorded(id, one, &hosts, &revision, now, out)
            }
            Then::RebootRecorded { id, host } => self.reboot_recorded(id, &host, out),
            Then::Approved { id, message } => {
                self.advance_rollout(now, Then::Nothing, out);
                out.push(Effect::Reply {
                    id,
                    result: Ok(message),
                });
            }
            Then::Accepted {
                id,
                revision,
                specs,
            } => {
                out.push(Effect::Reply {
                    id,
                    result: Ok(format!("deploying {}", short(&revision))),
                });
                self.on_revision(revision, specs, out);
            }
        }
    }

    /// A refused append: remember why (no new work starts until the store
    /// takes writes again), and do not do what depended on it.
    fn append_failed(&mut self, error: String, then: Then, out: &mut Vec<Effect>) {
        self.store_failure = Some(error);
        match then {
            Then::Nothing | Then::AdvanceRollout => {}
            // Looked at again (a halt it may have recorded is recorded
            // then) before anything is handed out.
            Then::Dispatch => self.rollout_due = true,
            Then::SpecsApplied {
                revision, fleet, ..
            } => {
                // Evaluated again once the store takes writes.
                self.unapplied = Some((revision, fleet));
            }
            Then::RollbackRecorded { id, .. } => self.refuse(id, "rollback", out),
            Then::RebootRecorded { id, .. } => self.refuse(id, "reboot", out),
            Then::Resumed { id, .. } => self.refuse(id, "resume", out),
            Then::ReconcileRecorded { id, .. } => self.refuse(id, "reconcile", out),
            Then::Approved { id, .. } => self.refuse(id, "approval", out),
            Then::Accepted {
                id,
                revision,
                specs,
            } => {
                self.awaiting_accept = Some((revision, specs));
                self.refuse(id, "acceptance", out);
            }
        }
    }

    /// Answers a request whose event the store refused.
    fn refuse(&self, id: RequestId, what: &str, out: &mut Vec<Effect>) {
        out.push(Effect::Reply {
            id,
            result: Err(format!(
                "the {what} was not carried out: the store refused to record it ({})",
                self.store_failure.as_deref().unwrap_or("unknown error")
            )),
        });
    }

    /// Records a build error. It is deterministic for a given revision, so
    /// it is not retried on a timer: a new revision or `cim reconcile`
    /// tries again.
    fn build_failed(&mut self, host: &str, revision: &str, message: String) -> NewEvent {
        self.desired.remove(host);
        self.gated.remove(host);
        NewEvent::host(host, Reason::BuildFailed, Some(revision), message).phase(Phase::Failed)
    }
}

#[cfg(test)]
mod tests;
