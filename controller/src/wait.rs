//! `cim reconcile --wait`: what the event log says about the hosts a
//! reconcile was asked for, until each has an outcome. Pure: the CLI feeds
//! it the events that follow the request and shows what it returns, as
//! progress bars on a terminal and as plain lines elsewhere.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::event::{Event, Reason};

/// Where one host stands since the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostState {
    /// Its request is not in the log yet.
    Asked,
    /// Being worked on; the latest step's reason.
    Working(Reason),
    Converged,
    Failed(Reason),
}

impl HostState {
    fn ended(&self) -> bool {
        matches!(self, HostState::Converged | HostState::Failed(_))
    }
}

/// The hosts asked about, and what the log said of them.
#[derive(Debug, Clone)]
pub struct Tracker {
    hosts: BTreeMap<String, HostState>,
    /// Hosts whose request was seen (only events after it count).
    requested: std::collections::BTreeSet<String>,
}

/// Reasons that end a host's reconcile badly.
fn failure(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::BuildFailed
            | Reason::CopyFailed
            | Reason::ActivationFailed
            | Reason::HostUnreachable
            | Reason::HealthCheckFailed
            | Reason::HostKeyMismatch
            | Reason::WorkerCrashed
            | Reason::RollbackFailed
            | Reason::RebootTimedOut
    )
}

impl Tracker {
    pub fn new(hosts: impl IntoIterator<Item = String>) -> Tracker {
        Tracker {
            hosts: hosts.into_iter().map(|h| (h, HostState::Asked)).collect(),
            requested: Default::default(),
        }
    }

    /// Takes in one event; returns the line to show for it, if it is about
    /// a host waited for.
    pub fn observe(&mut self, ev: &Event) -> Option<String> {
        // What holds every host up is said too.
        if ev.host.is_none() && matches!(ev.reason, Reason::WindowClosed | Reason::WindowOpened) {
            let first = ev.message.lines().next().unwrap_or("");
            return Some(format!("{} — {first}", ev.reason));
        }
        let host = ev.host.as_ref()?;
        let state = self.hosts.get_mut(host)?;
        if ev.reason == Reason::ReconcileRequested {
            self.requested.insert(host.clone());
            return None;
        }
        if !self.requested.contains(host) || state.ended() {
            return None;
        }
        *state = match ev.reason {
            Reason::Converged => HostState::Converged,
            Reason::ReconcileHandled => match state {
                HostState::Failed(r) => HostState::Failed(*r),
                _ => HostState::Converged,
            },
            r if failure(r) => HostState::Failed(r),
            r => HostState::Working(r),
        };
        let first = ev.message.lines().next().unwrap_or("");
        Some(format!("{host}: {} — {first}", ev.reason))
    }

    pub fn state(&self, host: &str) -> Option<&HostState> {
        self.hosts.get(host)
    }

    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        self.hosts.keys().map(String::as_str)
    }

    /// Hosts with an outcome.
    pub fn ended(&self) -> usize {
        self.hosts.values().filter(|s| s.ended()).count()
    }

    pub fn total(&self) -> usize {
        self.hosts.len()
    }

    pub fn done(&self) -> bool {
        self.ended() == self.total()
    }

    /// Hosts that did not converge (failed, or not done yet).
    pub fn not_converged(&self) -> Vec<&str> {
        self.hosts
            .iter()
            .filter(|(_, s)| **s != HostState::Converged)
            .map(|(h, _)| h.as_str())
            .collect()
    }

    /// The closing line.
    pub fn summary(&self, took: Duration) -> String {
        let converged = self.total() - self.not_converged().len();
        let mut line = format!(
            "{converged} of {} hosts converged in {:.1}s",
            self.total(),
            took.as_secs_f64()
        );
        let failed: Vec<String> = self
            .hosts
            .iter()
            .filter_map(|(h, s)| match s {
                HostState::Failed(r) => Some(format!("{h} ({r})")),
                _ => None,
            })
            .collect();
        if !failed.is_empty() {
            line.push_str(&format!("; failed: {}", failed.join(", ")));
        }
        let waiting: Vec<&str> = self
            .hosts
            .iter()
            .filter(|(_, s)| !s.ended())
            .map(|(h, _)| h.as_str())
            .collect();
        if !waiting.is_empty() {
            line.push_str(&format!("; still waiting: {}", waiting.join(", ")));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NewEvent;
    use time::OffsetDateTime;

    #[test]
    fn a_waited_reconcile_reads_like_this() {
        let mut t = Tracker::new(["web-1".to_string(), "web-2".to_string()]);
        let mut lines = Vec::new();
        for (seq, (host, reason, message)) in [
            (
                "web-1",
                Reason::Converged,
                "an earlier run, before the request",
            ),
            ("web-1", Reason::ReconcileRequested, "reconcile requested"),
            ("web-2", Reason::ReconcileRequested, "reconcile requested"),
            ("web-1", Reason::BuildStarted, "building /nix/store/…-web-1"),
            ("web-3", Reason::CopyStarted, "not waited for"),
            (
                "web-2",
                Reason::Converged,
                "already running /nix/store/…-web-2",
            ),
            ("web-1", Reason::BuildSucceeded, "built /nix/store/…-web-1"),
            (
                "web-1",
                Reason::ActivationFailed,
                "switch-to-configuration exited with 4\nrolled back",
            ),
            (
                "web-1",
                Reason::RolledBack,
                "rolled back to /nix/store/…-web-1-old",
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let ev = NewEvent::host(host, reason, Some("r1"), message).into_event(
                seq as u64 + 1,
                OffsetDateTime::UNIX_EPOCH,
                None,
            );
            lines.extend(t.observe(&ev));
        }
        assert!(t.done());
        lines.push(t.summary(Duration::from_millis(2100)));
        insta::assert_snapshot!(lines.join("\n"));
    }

    #[test]
    fn closed_windows_and_hosts_that_never_came_back_are_said() {
        let mut t = Tracker::new(["web-1".to_string()]);
        let ev = |seq, ev: NewEvent| ev.into_event(seq, OffsetDateTime::UNIX_EPOCH, None);
        t.observe(&ev(
            1,
            NewEvent::host("web-1", Reason::ReconcileRequested, Some("r1"), "asked"),
        ));
        let closed = t.observe(&ev(
            2,
            NewEvent::repo(Reason::WindowClosed, Some("r1"), "outside allow window …"),
        ));
        assert_eq!(
            closed.as_deref(),
            Some("WindowClosed — outside allow window …")
        );
        t.observe(&ev(
            3,
            NewEvent::host("web-1", Reason::RebootTimedOut, Some("r1"), "gone"),
        ));
        assert_eq!(
            t.state("web-1"),
            Some(&HostState::Failed(Reason::RebootTimedOut))
        );
        assert!(t.done());
    }
}
