//! The status projection: what the event log says about the repository and
//! every host right now. [`FleetStatus::apply`] is the only way status
//! changes, so folding the whole log from the start always gives the stored
//! projection back (a test in `store` checks exactly that).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::event::{Event, Phase, Reason};

/// Repository-level status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RepoStatus {
    /// The revision whose specs are valid and being reconciled towards.
    pub revision: Option<String>,
    /// The newest revision fetched, valid or not.
    pub latest_revision: Option<String>,
    /// Why `latest_revision` is not `revision`, or why fetching fails.
    pub message: Option<String>,
    /// Sequence number of the last event folded in.
    pub last_seq: u64,
    /// The revision whose rollout the failure budget halted.
    #[serde(default)]
    pub halted_revision: Option<String>,
    /// The wave being rolled out (named in the last `WaveStarted`).
    #[serde(default)]
    pub wave: Option<String>,
    /// Events up to this sequence number were deleted by
    /// `--event-retention` (0: the whole history is there).
    #[serde(default)]
    pub trimmed_through: u64,
    /// The revision whose rollout completed (every host converged).
    #[serde(default)]
    pub completed_revision: Option<String>,
    /// Waves with `approval: manual`, by name, and the revision each was
    /// approved for (`cim approve`).
    #[serde(default)]
    pub approvals: std::collections::BTreeMap<String, String>,
    /// Why the deployment windows are closed and until when (`None`:
    /// open).
    #[serde(default)]
    pub window: Option<String>,
}

/// One host's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostStatus {
    pub name: String,
    pub phase: Phase,
    /// The revision of the event that set `phase`: a host `Failed` at an
    /// older revision has not failed the current one.
    #[serde(default)]
    pub phase_revision: Option<String>,
    pub current_system: Option<String>,
    pub desired_system: Option<String>,
    /// The revision the host last converged to.
    pub observed_revision: Option<String>,
    pub message: String,
    #[serde(with = "time::serde::rfc3339")]
    pub last_transition_time: OffsetDateTime,
    /// Consecutive failures since the last convergence.
    pub failures: u32,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub next_retry: Option<OffsetDateTime>,
    /// A revision whose activation failed on this host: it is not retried
    /// until a new revision or an explicit reconcile.
    #[serde(default)]
    pub failed_revision: Option<String>,
    /// Suspended by `cim rollback` (not by its spec): stays suspended until
    /// `cim resume`.
    #[serde(default)]
    pub operator_suspended: bool,
    /// Why the host needs a reboot to run its system (its kernel, initrd
    /// or modules changed), until it reboots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot_required: Option<String>,
}

/// The whole projection. Each host's row is shared (`Arc`): the
/// controller hands a commit's rows to the API's snapshot without copying
/// them, and a row is copied only when an event changes it while the
/// snapshot still holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetStatus {
    pub repo: RepoStatus,
    pub hosts: BTreeMap<String, Arc<HostStatus>>,
}

impl FleetStatus {
    /// `host`'s row.
    pub fn host(&self, host: &str) -> Option<&HostStatus> {
        self.hosts.get(host).map(|h| &**h)
    }

    pub fn phase_of(&self, host: &str) -> Option<Phase> {
        self.hosts.get(host).map(|h| h.phase)
    }

    /// Folds one event in. Returns the name of the host it touched, so the
    /// store can write just that row.
    pub fn apply(&mut self, ev: &Event) {
        self.repo.last_seq = ev.seq;
        let Some(name) = &ev.host else {
            self.apply_repo(ev);
            return;
        };
        if ev.reason == Reason::HostRemoved {
            self.hosts.remove(name);
            return;
        }
        let host = self.hosts.entry(name.clone()).or_insert_with(|| {
            Arc::new(HostStatus {
                name: name.clone(),
                phase: Phase::Pending,
                phase_revision: None,
                current_system: None,
                desired_system: None,
                observed_revision: None,
                message: String::new(),
                last_transition_time: ev.time,
                failures: 0,
                next_retry: None,
                failed_revision: None,
                operator_suspended: false,
                reboot_required: None,
            })
        });
        let host = Arc::make_mut(host);
        if let Some(to) = ev.to_phase {
            host.phase_revision = ev.revision.clone();
            if to != host.phase {
                host.phase = to;
                host.last_transition_time = ev.time;
            }
        }
        host.message = ev.message.clone();
        match ev.reason {
            Reason::BuildSucceeded => host.desired_system = ev.system.clone(),
            Reason::BuildFailed => host.desired_system = None,
            Reason::Converged => {
                host.current_system = ev.system.clone();
                host.desired_system = ev.system.clone();
                host.observed_revision = ev.revision.clone();
                host.failures = 0;
                host.next_retry = None;
                host.failed_revision = None;
            }
            Reason::DriftDetected | Reason::RolledBack => host.current_system = ev.system.clone(),
            Reason::ActivationFailed | Reason::ConfirmationTimedOut | Reason::HealthCheckFailed => {
                host.failed_revision = ev.revision.clone();
            }
            Reason::RollbackRequested => {
                host.operator_suspended = true;
                host.next_retry = None;
            }
            Reason::Resumed => {
                host.operator_suspended = false;
                host.next_retry = None;
                host.failed_revision = None;
            }
            Reason::RebootRequired => host.reboot_required = Some(ev.message.clone()),
            Reason::CopyStarted | Reason::Rebooted => host.reboot_required = None,
            Reason::Suspended | Reason::ReconcileRequested => {
                host.next_retry = None;
                host.failed_revision = None;
            }
            _ => {}
        }
        if ev.reason.is_failure() {
            host.failures = host.failures.saturating_add(1);
            host.next_retry = ev.next_retry;
        }
    }

    fn apply_repo(&mut self, ev: &Event) {
        match ev.reason {
            Reason::RevisionDetected => {
                self.repo.latest_revision = ev.revision.clone();
                self.repo.message = None;
            }
            Reason::SpecsLoaded => {
                self.repo.revision = ev.revision.clone();
                self.repo.message = None;
                self.repo.halted_revision = None;
                self.repo.wave = None;
            }
            Reason::RolloutHalted => {
                self.repo.halted_revision = ev.revision.clone();
                self.repo.message = Some(ev.message.clone());
            }
            Reason::RolloutResumed => {
                self.repo.halted_revision = None;
                self.repo.message = None;
            }
            Reason::WaveStarted => self.repo.wave = ev.wave.clone(),
            Reason::RolloutCompleted => self.repo.completed_revision = ev.revision.clone(),
            Reason::WaveApproved => {
                if let (Some(wave), Some(revision)) = (&ev.wave, &ev.revision) {
                    self.repo.approvals.insert(wave.clone(), revision.clone());
                }
                self.repo.message = None;
            }
            Reason::ApprovalRequired => self.repo.message = Some(ev.message.clone()),
            Reason::WindowClosed => self.repo.window = Some(ev.message.clone()),
            Reason::WindowOpened => self.repo.window = None,
            Reason::EventsTrimmed => {
                self.repo.trimmed_through = ev.trimmed_through.unwrap_or_default();
            }
            Reason::SpecInvalid
            | Reason::FetchFailed
            | Reason::UnsignedRevision
            | Reason::UntrustedSigner
            | Reason::HistoryRewritten => {
                self.repo.message = Some(ev.message.clone());
            }
            _ => {}
        }
    }

    /// Rebuilds the projection from the log alone.
    pub fn replay<'a>(events: impl IntoIterator<Item = &'a Event>) -> Self {
        let mut status = FleetStatus::default();
        for ev in events {
            status.apply(ev);
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NewEvent;

    fn fold(events: Vec<NewEvent>) -> FleetStatus {
        let mut status = FleetStatus::default();
        for (i, ev) in events.into_iter().enumerate() {
            let from = ev.host.as_deref().and_then(|h| status.phase_of(h));
            let t = OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(i as i64);
            status.apply(&ev.into_event(i as u64 + 1, t, from));
        }
        status
    }

    #[test]
    fn a_host_walks_through_its_phases() {
        let s = fold(vec![
            NewEvent::repo(Reason::RevisionDetected, Some("r1"), "new"),
            NewEvent::repo(Reason::SpecsLoaded, Some("r1"), "ok"),
            NewEvent::host("a", Reason::BuildStarted, Some("r1"), "").phase(Phase::Building),
            NewEvent::host("a", Reason::BuildSucceeded, Some("r1"), "")
                .phase(Phase::Pending)
                .system("/nix/store/x"),
            NewEvent::host("a", Reason::CopyStarted, Some("r1"), "").phase(Phase::Copying),
            NewEvent::host("a", Reason::CopyFailed, Some("r1"), "no route")
                .phase(Phase::Failed)
                .next_retry(OffsetDateTime::UNIX_EPOCH + time::Duration::hours(1)),
        ]);
        assert_eq!(s.repo.revision.as_deref(), Some("r1"));
        let a = &s.hosts["a"];
        assert_eq!(a.phase, Phase::Failed);
        assert_eq!(a.failures, 1);
        assert!(a.next_retry.is_some());
        assert_eq!(a.desired_system.as_deref(), Some("/nix/store/x"));
        assert_eq!(a.message, "no route");
        assert_eq!(a.last_transition_time.unix_timestamp(), 5);

        let s = fold(vec![
            NewEvent::host("a", Reason::HostUnreachable, Some("r1"), "down").phase(Phase::Failed),
            NewEvent::host("a", Reason::Converged, Some("r1"), "ok")
                .phase(Phase::Converged)
                .system("/nix/store/x"),
        ]);
        let a = &s.hosts["a"];
        assert_eq!(a.failures, 0);
        assert_eq!(a.current_system.as_deref(), Some("/nix/store/x"));
        assert_eq!(a.observed_revision.as_deref(), Some("r1"));
    }

    #[test]
    fn invalid_specs_keep_the_last_valid_revision() {
        let s = fold(vec![
            NewEvent::repo(Reason::SpecsLoaded, Some("r1"), "ok"),
            NewEvent::repo(Reason::RevisionDetected, Some("r2"), "new"),
            NewEvent::repo(Reason::SpecInvalid, Some("r2"), "specs/a.yaml:1:1: bad"),
        ]);
        assert_eq!(s.repo.revision.as_deref(), Some("r1"));
        assert_eq!(s.repo.latest_revision.as_deref(), Some("r2"));
        assert_eq!(s.repo.message.as_deref(), Some("specs/a.yaml:1:1: bad"));
    }

    #[test]
    fn removed_hosts_leave_the_projection() {
        let s = fold(vec![
            NewEvent::host("a", Reason::Suspended, None, "").phase(Phase::Suspended),
            NewEvent::host("a", Reason::HostRemoved, None, "gone"),
        ]);
        assert!(s.hosts.is_empty());
        assert_eq!(s.repo.last_seq, 2);
    }
}
