//! Reboots: a host whose new system boots another kernel, initrd or
//! kernel modules (`reboot: auto`) is switched with `boot`, rebooted,
//! waited for within `rebootTimeout`, and counts as converged only once it
//! booted and runs the new system; `cim reboot HOST` reboots one by hand.
//! A reboot is told from the mark `driver::REBOOT` leaves in `/run`: a
//! host that answers without it has rebooted.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{connect, health, Outcome, Previous, Report, Step, WorkItem};
use crate::driver::BootState;
use crate::error::error_chain;
use crate::event::Reason;
use crate::host::{Backend, Host};
use crate::spec::{Action, HostSpec};
use crate::types::Revision;

/// First wait before looking for the host again, and the longest.
const FIRST_POLL: Duration = Duration::from_secs(1);
const LONGEST_POLL: Duration = Duration::from_secs(5);

/// Switches `item`'s host to its new system by booting it: the profile and
/// the boot loader with `switch-to-configuration boot`, a reboot, then the
/// checks on the new connection. `session` is dead afterwards.
pub(super) async fn boot_into<B: Backend>(
    backend: &B,
    session: &B::Session,
    item: &WorkItem,
    previous: Previous<'_>,
    tx: &mpsc::Sender<Report>,
) -> Outcome {
    let report = |step| super::report_step(tx, &item.host.name, &item.revision, step);
    let _ = report(Step::ActivationStarted {
        action: Action::Boot,
    })
    .await;
    if let Err(e) = session.activate(&item.desired, Action::Boot).await {
        if e.is_unreachable() {
            return super::failed(Reason::HostUnreachable, &e);
        }
        return Outcome::ActivationFailed {
            message: error_chain(&e),
            rollback: back_to_profile(session, previous).await,
        };
    }
    let _ = report(Step::Rebooting).await;
    let (after, state) = match reboot_and_wait(backend, session, &item.host).await {
        Ok(back) => back,
        Err(outcome) => return outcome,
    };
    let desired = item.desired.as_str();
    let outcome =
        if state.booted.as_deref() == Some(desired) && state.current.as_deref() == Some(desired) {
            let converged = Outcome::Converged {
                system: desired.to_string(),
                changed: true,
            };
            let outcome = health::after_activation(&after, item, previous, converged, tx).await;
            if matches!(outcome, Outcome::Converged { .. }) {
                super::prune(&after, item, tx).await;
            }
            outcome
        } else {
            Outcome::Failed {
                reason: Reason::ActivationFailed,
                message: format!(
                    "after rebooting, the host booted {} and runs {} instead of {desired}",
                    state.booted.as_deref().unwrap_or("no system"),
                    state.current.as_deref().unwrap_or("no system"),
                ),
            }
        };
    crate::host::close(after).await;
    outcome
}

/// Puts the system profile (what boots) back after a failed `boot`.
async fn back_to_profile<H: Host>(session: &H, previous: Previous<'_>) -> super::Rollback {
    use super::Rollback;
    let Some(to) = previous.profile else {
        return Rollback::NothingToRollBackTo;
    };
    match session.roll_back(Action::Boot, to, Some(to)).await {
        Ok(()) => Rollback::RolledBack { to: to.to_string() },
        Err(e) => Rollback::Failed {
            to: Some(to.to_string()),
            message: error_chain(&e),
        },
    }
}

/// Reboots the host and waits, within its `rebootTimeout`, until it
/// answers without the mark: a new connection and what it booted.
pub(super) async fn reboot_and_wait<B: Backend>(
    backend: &B,
    session: &B::Session,
    host: &HostSpec,
) -> Result<(B::Session, BootState), Outcome> {
    if let Err(e) = session.reboot().await {
        return Err(Outcome::Failed {
            reason: Reason::ActivationFailed,
            message: format!("asking the host to reboot failed: {}", error_chain(&e)),
        });
    }
    let timeout = host.reboot_timeout();
    let deadline = Instant::now() + timeout;
    let mut polls = ExponentialBuilder::default()
        .with_min_delay(FIRST_POLL)
        .with_max_delay(LONGEST_POLL)
        .without_max_times()
        .build();
    let mut last = "it never answered".to_string();
    loop {
        let poll = polls.next().unwrap_or(LONGEST_POLL);
        tokio::time::sleep(poll.min(deadline.saturating_duration_since(Instant::now()))).await;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Outcome::Failed {
                reason: Reason::RebootTimedOut,
                message: format!(
                    "{} did not come back within {}s of rebooting ({last})",
                    host.name,
                    timeout.as_secs()
                ),
            });
        }
        let again = match tokio::time::timeout(left, connect(backend, host)).await {
            Ok(Ok(again)) => again,
            Ok(Err(e)) => {
                last = error_chain(&e);
                continue;
            }
            Err(_) => continue,
        };
        match again.boot_state().await {
            Ok(state) if !state.rebooting => return Ok((again, state)),
            Ok(_) => last = "it had not gone down yet".to_string(),
            Err(e) => last = error_chain(&e),
        }
        crate::host::close(again).await;
    }
}

/// `cim reboot HOST`: reboots the host and checks that it came back
/// running what its profile boots; reports like a reconcile.
pub async fn run_reboot<B: Backend>(
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
            Err(e) => return super::failed(Reason::HostUnreachable, &e),
        };
        super::report_step(&tx, &name, &revision, Step::Rebooting).await;
        let profile = match session.boot_system().await {
            Ok(p) => p,
            Err(e) => return super::failed(Reason::HostUnreachable, &e),
        };
        let outcome = match reboot_and_wait(&*backend, &session, &host).await {
            Err(outcome) => outcome,
            Ok((after, state)) => {
                crate::host::close(after).await;
                match (&profile, &state.booted) {
                    (Some(p), Some(b)) if p != b => Outcome::Failed {
                        reason: Reason::ActivationFailed,
                        message: format!("the host booted {b} instead of its profile's {p}"),
                    },
                    _ => Outcome::Rebooted {
                        booted: state.booted,
                    },
                }
            }
        };
        crate::host::close(session).await;
        outcome
    };
    super::finish(Box::pin(work), cancel, &tx, name.clone(), revision.clone()).await;
}
