//! Confirmed ("magic") activation for `switch` and `test`: the host runs the
//! activation under a watchdog detached from the SSH session, and reverts
//! itself unless the controller confirms over a *new* connection within the
//! host's `confirmTimeout`. This proves that the new system still lets the
//! controller in; a system that breaks networking or sshd undoes itself.

use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::mpsc;

use super::{
    failed, observe, roll_back, rollback_target, Outcome, Previous, Report, Rollback, Step,
    WorkItem,
};
use crate::driver::{tail, ConfirmedRun};
use crate::event::Reason;
use crate::host::{Backend, Host};

/// How long `switch-to-configuration` may run before the controller stops
/// waiting for its exit code.
const ACTIVATION_LIMIT: Duration = Duration::from_secs(600);
/// How long one command waits on the host for an activation to finish.
const RESULT_WAIT: Duration = Duration::from_secs(5);
/// A single remote command that takes longer means the connection is gone.
const COMMAND_LIMIT: Duration = Duration::from_secs(10);
/// How long after the host should have reverted the controller keeps trying
/// to reach it to verify.
const VERIFY_WINDOW: Duration = Duration::from_secs(60);

pub(super) async fn activate<B: Backend>(
    backend: &B,
    session: &B::Session,
    item: &WorkItem,
    previous: Previous<'_>,
    tx: &mpsc::Sender<Report>,
) -> Outcome {
    let token = format!(
        "{}-{}",
        item.host.name,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let timeout = item.host.rollout.confirm_timeout;
    let run = ConfirmedRun {
        closure: &item.desired,
        action: item.host.action,
        timeout,
        token: &token,
        previous_running: previous.running,
        previous_profile: previous.profile,
    };
    let started = Instant::now();
    if let Err(e) = session.start_confirmed_activation(&run).await {
        let reason = if e.is_unreachable() {
            Reason::HostUnreachable
        } else {
            Reason::ActivationFailed
        };
        return failed(reason, &e);
    }
    match wait_for_exit(session, &token).await {
        Some((0, _)) => {
            if let Some(outcome) = confirm_over_new_connection(backend, item, &token).await {
                return outcome;
            }
        }
        Some((code, log)) => {
            // Stop the watchdog from reverting on its own, and undo the
            // activation now rather than after the timeout.
            let _ = session.confirm(&token).await;
            let rollback = roll_back(session, item, previous).await;
            return Outcome::ActivationFailed {
                message: format!(
                    "`switch-to-configuration {}` on {} exited with {code}:\n{}",
                    item.host.action,
                    crate::driver::destination(&item.host),
                    tail(&log, 20)
                ),
                rollback,
            };
        }
        None => {}
    }
    let message = format!(
        "could not confirm {} over a new SSH connection; the host reverts itself {}s after activating",
        item.desired,
        timeout.as_secs()
    );
    let step = Step::ConfirmationTimedOut { message };
    super::report_step(tx, &item.host.name, &item.revision, step).await;
    let rollback = verify_reverted(backend, item, previous, started + timeout).await;
    Outcome::NotConfirmed { rollback }
}

/// Finishes what a controller that died mid-activation started: waits for
/// any in-flight confirmed activation on the host and, since this is a new
/// connection, confirms it. If the host ends up on the desired closure the
/// reconcile is done, with no second activation. `None` means carry on
/// normally.
pub(super) async fn adopt<H: Host>(
    session: &H,
    item: &WorkItem,
    pending: &[String],
) -> Option<Adopted> {
    let mut previous = (None, None);
    for token in pending {
        match wait_for_exit(session, token).await {
            Some((0, _)) => {
                previous = session.activation_previous(token).await.unwrap_or_default();
                let _ = session.confirm(token).await;
            }
            Some((code, log)) => {
                // Leave the watchdog to revert the failed activation.
                return Some(Adopted {
                    outcome: Outcome::Failed {
                        reason: Reason::ActivationFailed,
                        message: format!(
                            "an activation started before a controller restart exited with {code}; the host reverts itself:\n{}",
                            tail(&log, 20)
                        ),
                    },
                    previous_running: None,
                    previous_profile: None,
                });
            }
            None => return None,
        }
    }
    match observe(session, item.host.action).await {
        Ok(Some(now)) if now == item.desired => Some(Adopted {
            outcome: Outcome::Converged {
                system: now,
                changed: true,
            },
            previous_running: previous.0,
            previous_profile: previous.1,
        }),
        _ => None,
    }
}

/// An activation finished on behalf of a controller that died, and what the
/// host ran before it (for rolling back if its health checks fail).
pub(super) struct Adopted {
    pub outcome: Outcome,
    pub previous_running: Option<String>,
    pub previous_profile: Option<String>,
}

/// Waits for the activation's exit code over the existing connection, on
/// the host, a few seconds per command: a connection that stops answering
/// (the new system may have cut it) is noticed within [`COMMAND_LIMIT`] plus
/// that. `None` then, or when the activation runs too long.
async fn wait_for_exit<H: Host>(session: &H, token: &str) -> Option<(i32, String)> {
    let deadline = Instant::now() + ACTIVATION_LIMIT;
    while Instant::now() < deadline {
        let wait = session.activation_result(token, RESULT_WAIT);
        match tokio::time::timeout(RESULT_WAIT + COMMAND_LIMIT, wait).await {
            Ok(Ok(Some(result))) => return Some(result),
            Ok(Ok(None)) => {}
            Ok(Err(_)) | Err(_) => return None,
        }
    }
    None
}

/// Confirms over a fresh connection and verifies the host. `None` means it
/// could not be confirmed (the watchdog will revert).
async fn confirm_over_new_connection<B: Backend>(
    backend: &B,
    item: &WorkItem,
    token: &str,
) -> Option<Outcome> {
    let attempt = async {
        let fresh = super::connect(backend, &item.host).await.ok()?;
        let outcome = match fresh.confirm_and_read(token).await {
            Ok(Some(now)) => Some(super::verified(item, now)),
            Ok(None) => None,
            Err(e) => Some(failed(Reason::HostUnreachable, &e)),
        };
        crate::host::close(fresh).await;
        outcome
    };
    tokio::time::timeout(backend.connect_timeout() + COMMAND_LIMIT, attempt)
        .await
        .ok()
        .flatten()
}

/// Waits until the host should have reverted, then reconnects (retrying
/// for a while) and checks that it is back on its previous system.
async fn verify_reverted<B: Backend>(
    backend: &B,
    item: &WorkItem,
    previous: Previous<'_>,
    reverts_by: Instant,
) -> Rollback {
    let Some(to) = rollback_target(item.host.action, previous).map(str::to_string) else {
        return Rollback::NothingToRollBackTo;
    };
    tokio::time::sleep_until(reverts_by + Duration::from_secs(1)).await;
    let give_up = Instant::now() + VERIFY_WINDOW;
    let mut last = "the host did not answer".to_string();
    while Instant::now() < give_up {
        let attempt = async {
            let s = super::connect(backend, &item.host)
                .await
                .map_err(|e| crate::error::error_chain(&e))?;
            let now = observe(&s, item.host.action)
                .await
                .map_err(|e| crate::error::error_chain(&e));
            crate::host::close(s).await;
            now
        };
        match tokio::time::timeout(backend.connect_timeout() + COMMAND_LIMIT, attempt).await {
            Ok(Ok(Some(now))) if now == to => return Rollback::RolledBack { to },
            Ok(Ok(now)) => {
                last = format!("the host is on {}", now.as_deref().unwrap_or("no system"))
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = "the host did not answer in time".to_string(),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Rollback::Failed {
        to: Some(to),
        message: last,
    }
}
