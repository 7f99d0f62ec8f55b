//! What the controller makes of its workers' reports: each step becomes
//! an event (drift found on looking at a host, a build, a copy, an
//! activation), and each run's outcome becomes the host's new state —
//! converged, failed and retried with backoff, or held after a failed
//! activation and its rollback.

use super::{append, Effect, Now, State, Then};
use crate::event::{NewEvent, Phase, Reason};
use crate::queue::backoff;
use crate::reconcile::{Outcome, Rollback, Step};

impl State {
    pub(super) fn on_step(
        &mut self,
        host: &str,
        revision: &str,
        step: Step,
        out: &mut Vec<Effect>,
    ) {
        let status = self.status.hosts.get(host);
        let desired = self
            .desired
            .get(host)
            .map(|d| d.out.to_string())
            .unwrap_or_default();
        let ev = match step {
            Step::Observed { current } => {
                // A host cim has not seen yet cannot have drifted.
                let Some(known) = status.and_then(|s| {
                    (s.phase == Phase::Converged)
                        .then_some(s.current_system.as_ref())
                        .flatten()
                }) else {
                    return;
                };
                if current.as_ref() == Some(known) {
                    return;
                }
                let found = current.clone().unwrap_or_else(|| "no system".to_string());
                let mut ev = NewEvent::host(
                    host,
                    Reason::DriftDetected,
                    Some(revision),
                    format!("host runs {found}, not {}; converging it again", known),
                )
                .phase(Phase::Pending);
                ev.system = current;
                ev
            }
            Step::BuildStarted => NewEvent::host(
                host,
                Reason::BuildStarted,
                Some(revision),
                format!("building {desired}"),
            )
            .phase(Phase::Building),
            Step::BuildSucceeded { changes } => {
                if let Some(d) = self.desired.get(host) {
                    self.built.insert(d.out.clone());
                }
                let message = match &changes {
                    Some(changes) => format!("built {desired}: {changes}"),
                    None => format!("built {desired}"),
                };
                if let Some(changes) = changes {
                    self.changes.insert(host.to_string(), changes);
                }
                NewEvent::host(host, Reason::BuildSucceeded, Some(revision), message)
                    .system(desired)
            }
            Step::Compared { changes } => {
                self.changes.insert(host.to_string(), changes);
                return;
            }
            Step::Pushed => {
                if let Some(d) = self.desired.get(host) {
                    self.pushed.insert(d.out.clone());
                }
                return;
            }
            Step::CopyStarted => NewEvent::host(
                host,
                Reason::CopyStarted,
                Some(revision),
                format!("copying {desired}"),
            )
            .phase(Phase::Copying),
            Step::Verifying => {
                let names: Vec<&str> = self
                    .host_spec(host)
                    .map(|h| h.health_checks.iter().map(|c| c.name.as_str()).collect())
                    .unwrap_or_default();
                NewEvent::host(
                    host,
                    Reason::HealthChecksStarted,
                    Some(revision),
                    format!("running health checks: {}", names.join(", ")),
                )
                .phase(Phase::Verifying)
            }
            Step::Pruned { keep, result } => match result {
                Ok(0) => return,
                Ok(n) => NewEvent::host(
                    host,
                    Reason::GenerationsPruned,
                    Some(revision),
                    format!("deleted {n} old system generations, keeping the newest {keep}"),
                ),
                Err(e) => NewEvent::host(
                    host,
                    Reason::PruneFailed,
                    Some(revision),
                    format!("deleting old system generations failed: {e}"),
                ),
            },
            Step::ConfirmationTimedOut { message } => {
                NewEvent::host(host, Reason::ConfirmationTimedOut, Some(revision), message)
            }
            Step::CopySucceeded => NewEvent::host(
                host,
                Reason::CopySucceeded,
                Some(revision),
                format!("copied {desired}"),
            ),
            Step::ActivationStarted { action } => NewEvent::host(
                host,
                Reason::ActivationStarted,
                Some(revision),
                format!("running switch-to-configuration {action}"),
            )
            .phase(Phase::Activating),
            Step::RebootRequired { what, auto } => {
                let what = what.join(", ");
                let message = if auto {
                    format!("{what} changed: switching with `boot` and rebooting (reboot: auto)")
                } else {
                    format!("{what} changed: switched, but the host runs the new {what} only after a reboot (`cim reboot {host}`, or reboot: auto)")
                };
                NewEvent::host(host, Reason::RebootRequired, Some(revision), message)
            }
            Step::Rebooting => {
                self.rebooting.insert(host.to_string());
                NewEvent::host(
                    host,
                    Reason::Rebooting,
                    Some(revision),
                    format!("rebooting {host} and waiting for it to come back"),
                )
                .phase(Phase::Rebooting)
            }
        };
        append(out, vec![ev], Then::Nothing);
    }

    /// A worker's run ended: its host's new state, in one append, then the
    /// rollout moves on.
    pub(super) fn on_done(
        &mut self,
        host: &str,
        revision: &str,
        outcome: Outcome,
        now: Now,
        out: &mut Vec<Effect>,
    ) {
        self.queue.done(host);
        let asked = self.requested.remove(host);
        let mut news = self.handle_outcome(host, revision, outcome, now, out, asked);
        self.changes.remove(host);
        self.forced.remove(host);
        self.rebooting.remove(host);
        if asked && news.is_empty() {
            // Asked for and handled, with nothing else to say (a build
            // failure was already recorded, a cancelled run): say so.
            news.push(NewEvent::host(
                host,
                Reason::ReconcileHandled,
                Some(revision),
                "the requested reconcile ended",
            ));
        }
        append(out, news, Then::AdvanceRollout);
    }

    fn handle_outcome(
        &mut self,
        host: &str,
        revision: &str,
        outcome: Outcome,
        now: Now,
        out: &mut Vec<Effect>,
        asked: bool,
    ) -> Vec<NewEvent> {
        let mut news = Vec::new();
        if self.host_spec(host).is_none_or(|h| h.suspend) {
            return news;
        }
        if self.operator_suspended(host) && !matches!(outcome, Outcome::ManualRollback { .. }) {
            // A reconcile that was in flight when `cim rollback` came in:
            // record what it changed on the host, keep the host suspended,
            // and run the waiting rollback now.
            if let Outcome::Converged {
                system,
                changed: true,
            } = outcome
            {
                news.push(
                    NewEvent::host(
                        host,
                        Reason::Converged,
                        Some(revision),
                        format!("switched to {system}"),
                    )
                    .system(system),
                );
            }
            if self.pending_rollbacks.remove(host) {
                self.start_rollback(host, out);
            }
            return news;
        }
        match outcome {
            Outcome::Cancelled => {}
            Outcome::WindowClosed => {
                news.push(
                    NewEvent::host(
                        host,
                        Reason::WindowClosed,
                        Some(revision),
                        "the deployment windows closed before it was activated: nothing was activated; it waits for the next opening",
                    )
                    .phase(Phase::Pending),
                );
                // Handed out again, the windows hold it until they open
                // (and say so once, with the opening).
                self.queue.schedule(host, now.at);
            }
            Outcome::BuildFailed { message } => {
                news.push(self.build_failed(host, revision, message));
            }
            Outcome::Converged { system, changed } => {
                if self.rebooting.remove(host) {
                    news.push(
                        NewEvent::host(
                            host,
                            Reason::Rebooted,
                            Some(revision),
                            format!("came back booted into {system}"),
                        )
                        .system(&system),
                    );
                }
                let worth_saying = changed
                    || asked
                    || self.status.hosts.get(host).is_none_or(|status| {
                        status.phase != Phase::Converged
                            || status.observed_revision.as_deref() != Some(revision)
                            || status.current_system.as_deref() != Some(system.as_str())
                    });
                if worth_saying {
                    let message = if changed {
                        match self.changes.remove(host) {
                            Some(changes) => format!("switched to {system}: {changes}"),
                            None => format!("switched to {system}"),
                        }
                    } else {
                        format!("already running {system}")
                    };
                    news.push(
                        NewEvent::host(host, Reason::Converged, Some(revision), message)
                            .phase(Phase::Converged)
                            .system(system),
                    );
                }
            }
            Outcome::Failed { reason, message } => {
                let failures = self.status.hosts.get(host).map_or(0, |h| h.failures) + 1;
                let delay = backoff(failures, self.cfg.backoff_base, self.cfg.backoff_max);
                news.push(
                    NewEvent::host(host, reason, Some(revision), message)
                        .phase(Phase::Failed)
                        .next_retry(now.wall + delay),
                );
                self.queue.schedule(host, now.at + delay);
            }
            Outcome::ActivationFailed { message, rollback } => {
                let failure = (Reason::ActivationFailed, message);
                news.extend(self.activation_failed(host, revision, Some(failure), rollback));
            }
            Outcome::HealthCheckFailed { message, rollback } => {
                let failure = (Reason::HealthCheckFailed, message);
                news.extend(self.activation_failed(host, revision, Some(failure), rollback));
            }
            Outcome::Rebooted { booted } => {
                self.rebooting.remove(host);
                news.push(
                    NewEvent::host(
                        host,
                        Reason::Rebooted,
                        Some(revision),
                        format!(
                            "came back booted into {}",
                            booted.as_deref().unwrap_or("no system")
                        ),
                    )
                    .phase(Phase::Pending),
                );
                // Level-triggered: look at what it runs now.
                self.queue.schedule(host, now.at);
            }
            Outcome::ManualRollback { rollback } => {
                let ev = match rollback {
                    Rollback::RolledBack { to } => NewEvent::host(
                        host,
                        Reason::RolledBack,
                        Some(revision),
                        format!("rolled back to the previous generation {to}; suspended until `cim resume {host}`"),
                    )
                    .system(to),
                    Rollback::Failed { to, message } => NewEvent::host(
                        host,
                        Reason::RollbackFailed,
                        Some(revision),
                        format!(
                            "rolling back to {} failed: {message}",
                            Rollback::target(&to)
                        ),
                    ),
                    Rollback::NothingToRollBackTo => NewEvent::host(
                        host,
                        Reason::RollbackFailed,
                        Some(revision),
                        "no previous generation to roll back to",
                    ),
                };
                news.push(ev);
                return news;
            }
            Outcome::NotConfirmed { rollback } => {
                news.extend(self.activation_failed(host, revision, None, rollback));
            }
        }
        // A newer revision may have arrived while this host was busy.
        if self.current_revision() != Some(revision) && self.desired.contains_key(host) {
            self.queue.enqueue(host, now.at);
        }
        news
    }

    /// Records a failed activation and its rollback. The host is held: it
    /// is not retried for this revision (its status carries
    /// `failedRevision`) until a new revision or `cim reconcile HOST`.
    fn activation_failed(
        &mut self,
        host: &str,
        revision: &str,
        failure: Option<(Reason, String)>,
        rollback: Rollback,
    ) -> Vec<NewEvent> {
        let mut news = Vec::new();
        let desired = self
            .desired
            .get(host)
            .map(|d| d.out.to_string())
            .unwrap_or_default();
        // The failure event already says when there is nothing to go back to.
        let announced_nothing = failure.is_some() && rollback == Rollback::NothingToRollBackTo;
        if let Some((reason, message)) = failure {
            let outcome = match &rollback {
                Rollback::NothingToRollBackTo => "no previous system to roll back to".to_string(),
                Rollback::RolledBack { to } => format!("rolled back to {to}"),
                Rollback::Failed { to, .. } => {
                    format!("rolling back to {} failed", Rollback::target(to))
                }
            };
            news.push(
                NewEvent::host(
                    host,
                    reason,
                    Some(revision),
                    format!("{message}\n{outcome}"),
                )
                .phase(Phase::Failed),
            );
        }
        let held = format!("held until a new revision or `cim reconcile {host}`");
        let ev = match rollback {
            Rollback::NothingToRollBackTo => NewEvent::host(
                host,
                Reason::RollbackFailed,
                Some(revision),
                format!("no previous system to roll back to from {desired}; {held}"),
            ),
            Rollback::RolledBack { to } => NewEvent::host(
                host,
                Reason::RolledBack,
                Some(revision),
                format!("rolled back from {desired} to {to}; {held}"),
            )
            .system(to),
            Rollback::Failed { to, message } => NewEvent::host(
                host,
                Reason::RollbackFailed,
                Some(revision),
                format!(
                    "rolling back from {desired} to {} failed: {message}; {held}",
                    Rollback::target(&to)
                ),
            ),
        };
        if !announced_nothing {
            news.push(ev.phase(Phase::Failed));
        }
        self.queue.forget(host);
        news
    }
}
