//! The event vocabulary: one [`Event`] per state change, serialized into the
//! store, the API and the tracing log. These types are a boundary format:
//! fields are only ever added (optional, with defaults), never renamed, and
//! the store records the schema version alongside them.

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Schema version of the serialized [`Event`]; bump on incompatible change.
pub const EVENT_SCHEMA_VERSION: u32 = 1;

/// Kubernetes-style severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    Normal,
    Warning,
}

/// Where a host stands in its reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Pending,
    Building,
    Copying,
    Activating,
    /// Rebooting into the new system (`reboot: auto`, `cim reboot`).
    Rebooting,
    /// Health checks run after activation.
    Verifying,
    Converged,
    Failed,
    Suspended,
}

impl Phase {
    /// Every phase, in the order a host goes through them.
    pub const ALL: [Phase; 9] = [
        Phase::Pending,
        Phase::Building,
        Phase::Copying,
        Phase::Activating,
        Phase::Rebooting,
        Phase::Verifying,
        Phase::Converged,
        Phase::Failed,
        Phase::Suspended,
    ];
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Why an event was recorded. Serialized as its CamelCase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reason {
    /// A new head of the watched branch was fetched.
    RevisionDetected,
    /// The specs of a revision validated; it is now the desired revision.
    SpecsLoaded,
    SpecInvalid,
    FetchFailed,
    BuildStarted,
    BuildSucceeded,
    BuildFailed,
    CopyStarted,
    CopySucceeded,
    CopyFailed,
    ActivationStarted,
    ActivationFailed,
    Converged,
    HostUnreachable,
    DriftDetected,
    HostRemoved,
    Suspended,
    Resumed,
    /// An operator asked for a reconcile through the API or CLI.
    ReconcileRequested,
    /// After a failed activation the host was put back on its previous
    /// system; `system` is the closure it is back on.
    RolledBack,
    /// Putting the host back on its previous system failed too.
    RollbackFailed,
    /// The revision's failure budget (`maxFailures`) is spent: hosts not yet
    /// touched stay as they are.
    RolloutHalted,
    /// A halted rollout was resumed by `cim reconcile` (all hosts).
    RolloutResumed,
    /// A wave of the rollout started (`kind: Fleet` waves).
    WaveStarted,
    /// Activation succeeded; the host's health checks are running.
    HealthChecksStarted,
    /// A health check failed after activation; the host is rolled back.
    HealthCheckFailed,
    /// An operator ran `cim rollback`: the host is suspended and switched
    /// to its previous generation.
    RollbackRequested,
    /// A confirmed activation was not confirmed over a new SSH connection
    /// in time; the host reverts itself.
    ConfirmationTimedOut,
    /// The worker reconciling the host crashed (a bug in cim); the host is
    /// retried with backoff like any failure.
    WorkerCrashed,
    /// `--event-retention` deleted old events (`trimmedThrough` says up to
    /// which); the status projection is unaffected.
    EventsTrimmed,
    /// With `--require-signed-commits`, the new head carries no signature;
    /// nothing changes.
    UnsignedRevision,
    /// With `--require-signed-commits`, the new head is signed by a key the
    /// allowed signers do not hold, or its signature does not verify.
    UntrustedSigner,
    /// The branch moved to a commit that does not descend from the one
    /// before (a force-push); with `--refuse-rewrites` it waits for
    /// `cim accept`.
    HistoryRewritten,
    /// An operator accepted a rewritten revision with `cim accept`.
    RevisionAccepted,
    /// A wave with `approval: manual` waits for `cim approve REV`.
    ApprovalRequired,
    /// An operator approved a wave (`cim approve`); its hosts go ahead.
    WaveApproved,
    /// Old system generations were deleted on the host (`keepGenerations`).
    GenerationsPruned,
    /// Deleting old system generations failed (the host is converged all
    /// the same).
    PruneFailed,
    /// A reconcile an operator asked for ended without any other event to
    /// say so.
    ReconcileHandled,
    /// Every host of the revision converged: the rollout is complete (its
    /// message says how long it took).
    RolloutCompleted,
    /// A `--notify` URL refused notifications; they are retried (none is
    /// dropped).
    NotificationFailed,
    /// The host presented an SSH key other than its pinned `hostKey` (or
    /// the one the user's known_hosts holds); it is retried with backoff
    /// and never deployed to.
    HostKeyMismatch,
    /// The deployment windows are closed: no host is worked on until the
    /// time the message (and the status) names. For a host: they closed
    /// while its system was built and copied, and it stopped before
    /// activating.
    WindowClosed,
    /// The deployment windows opened again.
    WindowOpened,
    /// An operator ran `cim reconcile --force-window`: hosts are worked on
    /// although the windows are closed.
    WindowForced,
    /// The host's new system has another kernel, initrd or kernel modules
    /// than the booted one: it runs them only after a reboot.
    RebootRequired,
    /// cim rebooted the host (`reboot: auto`, or `cim reboot`).
    Rebooting,
    /// The host came back from a reboot running the system it should boot.
    Rebooted,
    /// The host did not come back from a reboot within `rebootTimeout`.
    RebootTimedOut,
    /// An operator asked for a reboot with `cim reboot`.
    RebootRequested,
}

/// The first 12 characters of a revision, as people read commit ids.
/// Never panics, whatever the input.
pub fn short(revision: &str) -> &str {
    revision
        .char_indices()
        .nth(12)
        .map_or(revision, |(i, _)| &revision[..i])
}

impl Reason {
    pub fn event_type(self) -> EventType {
        match self {
            Reason::SpecInvalid
            | Reason::FetchFailed
            | Reason::BuildFailed
            | Reason::CopyFailed
            | Reason::ActivationFailed
            | Reason::HostUnreachable
            | Reason::DriftDetected
            | Reason::RolledBack
            | Reason::RollbackFailed
            | Reason::ConfirmationTimedOut
            | Reason::RollbackRequested
            | Reason::HealthCheckFailed
            | Reason::RolloutHalted
            | Reason::WorkerCrashed
            | Reason::UnsignedRevision
            | Reason::UntrustedSigner
            | Reason::HistoryRewritten
            | Reason::HostKeyMismatch
            | Reason::NotificationFailed
            | Reason::PruneFailed
            | Reason::WindowForced
            | Reason::RebootTimedOut => EventType::Warning,
            _ => EventType::Normal,
        }
    }

    /// Failures count towards a host's backoff.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Reason::BuildFailed
                | Reason::CopyFailed
                | Reason::ActivationFailed
                | Reason::HostUnreachable
                | Reason::WorkerCrashed
                | Reason::HostKeyMismatch
                | Reason::RebootTimedOut
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One recorded state change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Monotonic, gap-free position in the log, assigned by the store.
    pub seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// Absent for repository-level events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    #[serde(rename = "type")]
    pub event_type: EventType,
    pub reason: Reason,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_phase: Option<Phase>,
    /// The system closure the event is about: the one built for
    /// `BuildSucceeded`, the one found running for `Converged` and
    /// `DriftDetected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// When a failed host will be tried again.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub next_retry: Option<OffsetDateTime>,
    /// The rollout wave a `WaveStarted` event is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<String>,
    /// For `EventsTrimmed`: events up to this sequence number are deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trimmed_through: Option<u64>,
}

/// An event before the store has given it a sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub host: Option<String>,
    pub revision: Option<String>,
    pub reason: Reason,
    pub message: String,
    pub to_phase: Option<Phase>,
    pub system: Option<String>,
    pub next_retry: Option<OffsetDateTime>,
    pub wave: Option<String>,
    pub trimmed_through: Option<u64>,
}

impl NewEvent {
    pub fn repo(reason: Reason, revision: Option<&str>, message: impl Into<String>) -> Self {
        NewEvent {
            host: None,
            revision: revision.map(str::to_string),
            reason,
            message: message.into(),
            to_phase: None,
            system: None,
            next_retry: None,
            wave: None,
            trimmed_through: None,
        }
    }

    pub fn host(
        host: &str,
        reason: Reason,
        revision: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        NewEvent {
            host: Some(host.to_string()),
            ..NewEvent::repo(reason, revision, message)
        }
    }

    pub fn phase(mut self, phase: Phase) -> Self {
        self.to_phase = Some(phase);
        self
    }

    pub fn system(mut self, system: impl Into<String>) -> Self {
        self.system = Some(system.into());
        self
    }

    pub fn next_retry(mut self, at: OffsetDateTime) -> Self {
        self.next_retry = Some(at);
        self
    }

    /// Completes the event; `from` is the host's phase before it, which is
    /// recorded only when the event changes the phase.
    pub fn into_event(self, seq: u64, time: OffsetDateTime, from: Option<Phase>) -> Event {
        let changes_phase = self.to_phase.is_some() && self.to_phase != from;
        Event {
            seq,
            time,
            host: self.host,
            revision: self.revision,
            event_type: self.reason.event_type(),
            reason: self.reason,
            message: self.message,
            from_phase: if changes_phase { from } else { None },
            to_phase: if changes_phase { self.to_phase } else { None },
            system: self.system,
            next_retry: self.next_retry,
            wave: self.wave,
            trimmed_through: self.trimmed_through,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_are_shortened_without_panicking() {
        assert_eq!(short("0123456789abcdef"), "0123456789ab");
        assert_eq!(short("abc"), "abc");
        assert_eq!(
            short("\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}"),
            "\u{e9}".repeat(12)
        );
    }

    #[test]
    fn json_shape_is_stable() {
        let ev = NewEvent::host("web-1", Reason::ActivationFailed, Some("abc"), "boom")
            .phase(Phase::Failed)
            .into_event(
                7,
                time::macros::datetime!(2026-01-02 03:04:05 UTC),
                Some(Phase::Activating),
            );
        let json = serde_json::to_string(&ev).unwrap();
        assert_eq!(
            json,
            r#"{"seq":7,"time":"2026-01-02T03:04:05Z","host":"web-1","revision":"abc","type":"Warning","reason":"ActivationFailed","message":"boom","fromPhase":"Activating","toPhase":"Failed"}"#
        );
        let back: Event = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ev);
    }

    #[test]
    fn same_phase_is_not_a_transition() {
        let ev = NewEvent::host("a", Reason::Converged, None, "ok")
            .phase(Phase::Converged)
            .into_event(1, OffsetDateTime::UNIX_EPOCH, Some(Phase::Converged));
        assert_eq!(ev.from_phase, None);
        assert_eq!(ev.to_phase, None);
    }
}
