//! One host's reconcile, run by a worker task: observe what the host runs,
//! and if it is not the desired closure, copy and activate it. The worker
//! owns no shared state; it reports each step and its outcome to the
//! controller over a channel, and the controller turns them into events.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::driver::{self, Toplevel};
use crate::error::error_chain;
use crate::event::Reason;
use crate::host::{Backend, Host};
use crate::spec::{Action, HostSpec, RebootPolicy};
use crate::types::{HostName, Revision, StorePath};

mod builds;
mod confirmed;
mod health;
mod reboot;

pub use builds::Builds;
pub use reboot::run_reboot;

/// What a worker is asked to do.
#[derive(Debug, Clone)]
pub struct WorkItem {
    pub host: std::sync::Arc<HostSpec>,
    pub revision: Revision,
    /// The closure `host` should run at `revision`.
    pub desired: StorePath,
    /// The derivation of `desired`, when it may not be built yet: the
    /// worker builds it (without evaluating) before copying.
    pub build: Option<StorePath>,
    /// Whether the host was last seen running `desired`: then it is looked
    /// at before anything is built.
    pub likely_current: bool,
    /// Whether `desired` must be pushed to the binary cache before copying.
    pub push: bool,
    /// Whether the host substitutes from its binary caches while copying.
    pub substitute: bool,
    /// When the deployment windows that let this run through close: past
    /// it, the run stops before activating (`None`: no window closes it).
    pub activate_by: Option<std::time::Instant>,
}

/// Progress a worker reports while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// What the host was found running before anything was done.
    Observed {
        current: Option<String>,
    },
    BuildStarted,
    /// The system is built; `changes` says how it differs from what the
    /// host runs ("3 packages upgraded, +12.0 MiB"), when that is known.
    BuildSucceeded {
        changes: Option<String>,
    },
    /// How the system to activate differs from what the host runs, when
    /// it needed no build: said again in `Converged`.
    Compared {
        changes: String,
    },
    /// `desired` is in the binary cache.
    Pushed,
    CopyStarted,
    CopySucceeded,
    /// The new system's kernel, initrd or modules (`what`) differ from the
    /// booted system's; with `auto`, the host is rebooted into it.
    RebootRequired {
        what: Vec<String>,
        auto: bool,
    },
    ActivationStarted {
        action: Action,
    },
    /// The host is rebooting.
    Rebooting,
    /// The host's health checks are running.
    Verifying,
    /// The controller could not confirm a confirmed activation over a new
    /// connection; the host will revert itself.
    ConfirmationTimedOut {
        message: String,
    },
    /// Old system generations were deleted after a successful activation
    /// (how many), or deleting them failed.
    Pruned {
        keep: u32,
        result: Result<u32, String>,
    },
}

/// What happened when a failed activation was undone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rollback {
    /// The host had no previous system to go back to (first deployment).
    NothingToRollBackTo,
    /// The host is verified to be back on `to`.
    RolledBack { to: String },
    /// Rolling back to `to` (`None`: the generation before the current
    /// one, unknown until the rollback ran) failed.
    Failed { to: Option<String>, message: String },
}

impl Rollback {
    /// What a failed rollback was going back to, for messages.
    pub fn target(to: &Option<String>) -> &str {
        to.as_deref().unwrap_or("the previous generation")
    }
}

/// How a worker's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Converged {
        system: String,
        changed: bool,
    },
    Failed {
        reason: Reason,
        message: String,
    },
    /// Building the host's system failed; deterministic, so not retried on
    /// a timer.
    BuildFailed {
        message: String,
    },
    /// `switch-to-configuration` failed; the host was put back.
    ActivationFailed {
        message: String,
        rollback: Rollback,
    },
    /// A confirmed activation was not confirmed; the host reverted itself.
    NotConfirmed {
        rollback: Rollback,
    },
    /// A health check failed after activation; the host was put back.
    HealthCheckFailed {
        message: String,
        rollback: Rollback,
    },
    /// The result of an operator's `cim rollback`.
    ManualRollback {
        rollback: Rollback,
    },
    /// An operator's `cim reboot` ended with the host back, booted into
    /// `booted`.
    Rebooted {
        booted: Option<String>,
    },
    /// The deployment windows closed while the system was built and
    /// copied: nothing was activated.
    WindowClosed,
    /// The controller is shutting down; nothing is recorded.
    Cancelled,
}

/// Messages a worker sends to the controller.
#[derive(Debug)]
pub enum Report {
    Step {
        host: HostName,
        revision: Revision,
        step: Step,
    },
    Done {
        host: HostName,
        revision: Revision,
        outcome: Outcome,
    },
}

/// Reports a step of `host`'s run at `revision`. The controller may be
/// gone during shutdown; nothing to do then.
pub(crate) async fn report_step(
    tx: &mpsc::Sender<Report>,
    host: &HostName,
    revision: &Revision,
    step: Step,
) {
    let _ = tx
        .send(Report::Step {
            host: host.clone(),
            revision: revision.clone(),
            step,
        })
        .await;
}

/// Runs `work` for `host` unless `cancel` fires first (then the outcome is
/// `Cancelled`: the in-flight command is dropped, nix children killed), and
/// reports the outcome. `work` comes boxed: held by value, a worker's
/// future would hold it twice (the argument and the `select!` polling it),
/// and 10,000 workers at once are 10,000 of them.
async fn finish(
    work: futures::future::BoxFuture<'_, Outcome>,
    cancel: CancellationToken,
    tx: &mpsc::Sender<Report>,
    host: HostName,
    revision: Revision,
) {
    let outcome = tokio::select! {
        outcome = work => outcome,
        () = cancel.cancelled() => Outcome::Cancelled,
    };
    let _ = tx
        .send(Report::Done {
            host,
            revision,
            outcome,
        })
        .await;
}

/// Runs one reconcile of `item.host` and reports to `tx`. Cancellation drops
/// the in-flight command (nix children are killed on drop).
pub async fn run<B: Backend>(
    backend: Arc<B>,
    builds: Builds,
    item: WorkItem,
    tx: mpsc::Sender<Report>,
    cancel: CancellationToken,
) {
    let (host, revision) = (item.host.name.clone(), item.revision.clone());
    let work = Box::pin(reconcile(&*backend, &builds, &item, &tx));
    finish(work, cancel, &tx, host, revision).await;
}

/// Connects to `host`, within the backend's connect timeout (plus a grace
/// for the handshake): a host that accepts the TCP connection and then
/// says nothing must not hold a worker forever.
pub(crate) async fn connect<B: Backend>(
    backend: &B,
    host: &crate::spec::HostSpec,
) -> Result<B::Session, driver::SshError> {
    let limit = backend.connect_timeout() + CONNECT_GRACE;
    tokio::time::timeout(limit, backend.connect(host))
        .await
        .unwrap_or_else(|_| {
            Err(driver::SshError::Timeout {
                destination: driver::destination(host),
                command: "ssh (connecting)".to_string(),
                limit,
            })
        })
}

/// How much longer than `--connect-timeout` a connection may take to be
/// ready (authentication, the multiplexing master starting).
const CONNECT_GRACE: Duration = Duration::from_secs(10);

/// What the worker found on first looking at the host.
enum Looked {
    /// An activation a killed controller left behind, now finished.
    Adopted(confirmed::Adopted),
    /// What the host runs.
    Found(driver::Look),
}

async fn reconcile<B: Backend>(
    backend: &B,
    builds: &Builds,
    item: &WorkItem,
    tx: &mpsc::Sender<Report>,
) -> Outcome {
    let report = |step| report_step(tx, &item.host.name, &item.revision, step);
    let system = item.build.as_ref().map(|drv| Toplevel {
        drv: drv.clone(),
        out: item.desired.clone(),
    });
    let build = async {
        let Some(system) = &system else {
            return Ok(());
        };
        // Asked for before it is reported: a controller busy recording
        // thousands of reports must not hold the build back.
        let built = builds.start(system.clone()).await?;
        let _ = report(Step::BuildStarted).await;
        built.await
    };
    let look = async {
        let session = connect(backend, &item.host).await?;
        let found = match session.look().await {
            Ok(found) => found,
            Err(e) => {
                crate::host::close(session).await;
                return Err(e);
            }
        };
        if !found.pending.is_empty() {
            if let Some(adopted) = Box::pin(confirmed::adopt(&session, item, &found.pending)).await
            {
                return Ok((session, Looked::Adopted(adopted)));
            }
        }
        Ok((session, Looked::Found(found)))
    };
    // On the heap, and each dropped once done with: held inline, both
    // would stay in this future's state through the copy and activation,
    // and 10,000 workers at once hold 10,000 of them.
    let (mut build, mut look) = (Box::pin(build), Box::pin(look));
    // A host that is not known to run its system has it built while the
    // connection is made; one that is likely current is looked at first.
    let mut built = None;
    let looked = if item.likely_current {
        look.as_mut().await
    } else {
        loop {
            tokio::select! {
                result = &mut build, if built.is_none() => built = Some(result),
                looked = &mut look => break looked,
            }
        }
    };
    drop(look);
    let (session, looked) = match looked {
        Ok(found) => found,
        Err(e) if matches!(built, Some(Ok(()))) => {
            let _ = report(Step::BuildSucceeded { changes: None }).await;
            return if e.is_host_key_mismatch() {
                failed(Reason::HostKeyMismatch, &e)
            } else {
                failed(Reason::HostUnreachable, &e)
            };
        }
        Err(e) if e.is_host_key_mismatch() => return failed(Reason::HostKeyMismatch, &e),
        Err(e) => return failed(Reason::HostUnreachable, &e),
    };
    let outcome = async {
        let found = match looked {
            Looked::Adopted(adopted) => {
                let previous = Previous {
                    running: adopted.previous_running.as_deref(),
                    profile: adopted.previous_profile.as_deref(),
                };
                return Box::pin(health::after_activation(
                    &session,
                    item,
                    previous,
                    adopted.outcome,
                    tx,
                ))
                .await;
            }
            Looked::Found(found) => found,
        };
        let current = match item.host.action {
            Action::Boot => found.profile.clone(),
            _ => found.current.clone(),
        };
        let _ = report(Step::Observed {
            current: current.clone(),
        })
        .await;
        if current.as_deref() == Some(item.desired.as_str()) {
            return Outcome::Converged {
                system: item.desired.to_string(),
                changed: false,
            };
        }
        let built = match built {
            Some(result) => {
                drop(build);
                result
            }
            None => build.await,
        };
        if let Err(message) = built {
            return Outcome::BuildFailed { message };
        }
        // Said in the build's and the convergence's events; a host that
        // cannot say what it runs only leaves the summary out. Worked out
        // while the copy runs (unless a push to the binary cache comes
        // first): the copy does not wait for a `nix path-info` and an SSH
        // round trip that only describe it.
        let mut roots = vec![item.desired.clone()];
        roots.extend(current.as_deref().and_then(StorePath::parse));
        let announce = async {
            let changes = match builds.closures(roots).await {
                Ok(local) => Box::pin(closure_diff(
                    &local,
                    &session,
                    current.as_deref(),
                    &item.desired,
                ))
                .await
                .map(|d| d.summary())
                .ok(),
                Err(_) => None,
            };
            match (&system, changes) {
                (Some(_), changes) => {
                    let _ = report(Step::BuildSucceeded { changes }).await;
                }
                (None, Some(changes)) => {
                    let _ = report(Step::Compared { changes }).await;
                }
                (None, None) => {}
            }
        };
        let mut announce = Some(Box::pin(announce));
        if let (true, Some(cache)) = (item.push, backend.cache()) {
            if let Some(announce) = announce.take() {
                announce.await;
            }
            if let Err(e) = backend.push(&item.desired).await {
                return Outcome::Failed {
                    reason: Reason::CopyFailed,
                    message: format!(
                        "pushing to the binary cache {} failed: {}",
                        cache,
                        error_chain(&e)
                    ),
                };
            }
            let _ = report(Step::Pushed).await;
        }
        // The reports keep their order: the build's, then the copy's start.
        let started = async {
            if let Some(announce) = announce {
                announce.await;
            }
            let _ = report(Step::CopyStarted).await;
        };
        let (copied, ()) = tokio::join!(session.copy(&item.desired, item.substitute), started);
        if let Err(e) = copied {
            return failed(Reason::CopyFailed, &e);
        }
        let _ = report(Step::CopySucceeded).await;
        // Builds and copies may outlast the window that let them start;
        // outside the windows nothing is activated.
        if item
            .activate_by
            .is_some_and(|by| tokio::time::Instant::now().into_std() >= by)
        {
            return Outcome::WindowClosed;
        }
        // What to go back to if activation fails: the running system and
        // the generation the profile pointed at before it was moved.
        let previous_profile = found.profile.filter(|_| item.host.action.sets_profile());
        let reboot_for = if matches!(item.host.action, Action::Switch | Action::Test) {
            crate::plan::reboot_for(
                &found.booted_files,
                &backend.boot_files(&item.desired).await,
            )
        } else {
            Vec::new()
        };
        let previous = Previous {
            running: found.current.as_deref(),
            profile: previous_profile.as_deref(),
        };
        if !reboot_for.is_empty() {
            let auto =
                item.host.reboot() == RebootPolicy::Auto && item.host.action == Action::Switch;
            let _ = report(Step::RebootRequired {
                what: reboot_for,
                auto,
            })
            .await;
            if auto {
                return Box::pin(reboot::boot_into(backend, &session, item, previous, tx)).await;
            }
        }
        let _ = report(Step::ActivationStarted {
            action: item.host.action,
        })
        .await;
        let activated = if matches!(item.host.action, Action::Switch | Action::Test) {
            Box::pin(confirmed::activate(backend, &session, item, previous, tx)).await
        } else {
            match session.activate(&item.desired, item.host.action).await {
                Ok(_) => verify(&session, item).await,
                Err(e) if e.is_unreachable() => failed(Reason::HostUnreachable, &e),
                Err(e) => Outcome::ActivationFailed {
                    message: error_chain(&e),
                    rollback: roll_back(&session, item, previous).await,
                },
            }
        };
        let outcome = Box::pin(health::after_activation(
            &session, item, previous, activated, tx,
        ))
        .await;
        if matches!(outcome, Outcome::Converged { changed: true, .. }) {
            prune(&session, item, tx).await;
        }
        outcome
    }
    .await;
    // A host that cut its network leaves this connection hanging.
    crate::host::close(session).await;
    outcome
}

/// How `desired` differs from `current` (`None`: the host runs no system
/// yet). `local` holds the controller store's closures (of `desired`, and
/// of `current` when the store has it); what it lacks of `current` is read
/// on the host.
pub async fn closure_diff<H: Host>(
    local: &crate::plan::Closures,
    session: &H,
    current: Option<&str>,
    desired: &StorePath,
) -> Result<crate::plan::ClosureDiff, String> {
    let new = local
        .of(desired.as_str())
        .ok_or_else(|| format!("nix path-info did not list {desired}"))?;
    let old = match current {
        Some(current) => match local.of(current) {
            Some(old) => old,
            None => {
                let infos = session
                    .closure(current)
                    .await
                    .map_err(|e| error_chain(&e))?;
                crate::plan::closure_of(current, &infos)
                    .ok_or_else(|| format!("nix path-info on the host did not list {current}"))?
            }
        },
        None => crate::plan::Closure::new(),
    };
    let roots: Vec<&str> = current.into_iter().chain([desired.as_str()]).collect();
    Ok(crate::plan::diff(&old, &new, &roots))
}

/// Deletes old system generations after a successful activation.
/// Housekeeping: a failure here changes nothing about the outcome, it is
/// only said, and nothing deleted is not said at all (10,000 hosts
/// finishing together sent 10,000 reports that the controller, at the
/// busiest moment of a rollout, read only to drop).
pub(crate) async fn prune<H: Host>(session: &H, item: &WorkItem, tx: &mpsc::Sender<Report>) {
    if !item.host.action.sets_profile() {
        return;
    }
    let keep = item.host.keep_generations();
    let result = session
        .prune_generations(keep)
        .await
        .map_err(|e| error_chain(&e));
    if result == Ok(0) {
        return;
    }
    let step = Step::Pruned { keep, result };
    report_step(tx, &item.host.name, &item.revision, step).await;
}

/// Runs an operator's rollback of `host` (see [`HostSession::roll_back_generation`])
/// and reports its outcome like a reconcile.
pub async fn run_rollback<B: Backend>(
    backend: Arc<B>,
    host: HostSpec,
    revision: Revision,
    tx: mpsc::Sender<Report>,
    cancel: CancellationToken,
) {
    let name = host.name.clone();
    let work = async {
        let session = match connect(&*backend, &host).await {
            Ok(s) => s,
            Err(e) => {
                return Outcome::ManualRollback {
                    rollback: Rollback::Failed {
                        to: None,
                        message: error_chain(&e),
                    },
                }
            }
        };
        let result = match session.roll_back_generation(host.action).await {
            Err(e) => Rollback::Failed {
                to: None,
                message: error_chain(&e),
            },
            Ok(to) => match observe(&session, host.action).await {
                Ok(Some(now)) if now == to => Rollback::RolledBack { to },
                Ok(now) => Rollback::Failed {
                    message: format!("the host is on {}", now.as_deref().unwrap_or("no system")),
                    to: Some(to),
                },
                Err(e) => Rollback::Failed {
                    to: Some(to),
                    message: error_chain(&e),
                },
            },
        };
        crate::host::close(session).await;
        Outcome::ManualRollback { rollback: result }
    };
    finish(Box::pin(work), cancel, &tx, name, revision).await;
}

/// What a host ran before an activation, to go back to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Previous<'a> {
    pub running: Option<&'a str>,
    pub profile: Option<&'a str>,
}

/// What the host runs, as far as `action` is concerned: the booted-into
/// profile for `boot`, the running system otherwise.
async fn observe<H: Host>(session: &H, action: Action) -> Result<Option<String>, driver::SshError> {
    match action {
        Action::Boot => session.boot_system().await,
        _ => session.current_system().await,
    }
}

/// The system the host should be back on after undoing `action`.
pub(crate) fn rollback_target<'a>(action: Action, previous: Previous<'a>) -> Option<&'a str> {
    match action {
        Action::Boot => previous.profile,
        Action::Switch | Action::Test => previous.running,
        Action::DryActivate => None,
    }
}

/// Undoes a failed activation and checks that the host is back where it was.
pub(crate) async fn roll_back<H: Host>(
    session: &H,
    item: &WorkItem,
    previous: Previous<'_>,
) -> Rollback {
    let action = item.host.action;
    // The one rule for what to go back to; the driver only carries it out.
    let Some(to) = rollback_target(action, previous).map(str::to_string) else {
        return Rollback::NothingToRollBackTo;
    };
    if let Err(e) = session.roll_back(action, &to, previous.profile).await {
        return Rollback::Failed {
            to: Some(to),
            message: error_chain(&e),
        };
    }
    match observe(session, action).await {
        Ok(Some(now)) if now == to => Rollback::RolledBack { to },
        Ok(now) => Rollback::Failed {
            message: format!(
                "the host is on {} after rolling back",
                now.as_deref().unwrap_or("no system")
            ),
            to: Some(to),
        },
        Err(e) => Rollback::Failed {
            to: Some(to),
            message: error_chain(&e),
        },
    }
}

/// After activation, checks that the host really is on the new system, so
/// that `Converged` is never claimed on the strength of an exit code alone.
pub(crate) async fn verify<H: Host>(session: &H, item: &WorkItem) -> Outcome {
    if item.host.action == Action::DryActivate {
        return Outcome::Converged {
            system: item.desired.to_string(),
            changed: true,
        };
    }
    match observe(session, item.host.action).await {
        Ok(now) => verified(item, now),
        Err(e) => failed(Reason::HostUnreachable, &e),
    }
}

/// The outcome of an activation after which the host was found on `now`.
pub(crate) fn verified(item: &WorkItem, now: Option<String>) -> Outcome {
    match now {
        Some(now) if now == item.desired => Outcome::Converged {
            system: now,
            changed: true,
        },
        other => Outcome::Failed {
            reason: Reason::ActivationFailed,
            message: format!(
                "switch-to-configuration {} succeeded but the host is on {} instead of {}",
                item.host.action,
                other.as_deref().unwrap_or("no system"),
                item.desired
            ),
        },
    }
}

pub(crate) fn failed(reason: Reason, err: &dyn std::error::Error) -> Outcome {
    Outcome::Failed {
        reason,
        message: error_chain(err),
    }
}

/// What a panic said, for the event that reports it.
pub fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

#[cfg(test)]
mod tests;
