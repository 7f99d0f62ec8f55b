//! The controller's Prometheus metrics (`GET /metrics`, the text format).
//!
//! Counters and histograms are fed every committed event by the run loop
//! (events by reason and type, fetch failures, halts, how long each step
//! and each reconcile took, from the events' own times) and the time of
//! each group commit. Gauges of where the fleet stands (hosts by phase, one
//! info series per host, the rollout) are computed from the status when
//! scraped. Labels stay bounded: reasons, types, phases, steps; store
//! paths and revisions appear only on the per-host and per-revision info
//! series.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::event::{Event, EventType, Phase, Reason};
use crate::status::{HostStatus, RepoStatus};

/// What a step's start is ended by.
const STEPS: &[(&str, Reason, &[Reason])] = &[
    (
        "build",
        Reason::BuildStarted,
        &[Reason::BuildSucceeded, Reason::BuildFailed],
    ),
    (
        "copy",
        Reason::CopyStarted,
        &[Reason::CopySucceeded, Reason::CopyFailed],
    ),
    (
        "activate",
        Reason::ActivationStarted,
        &[
            Reason::HealthChecksStarted,
            Reason::Converged,
            Reason::ActivationFailed,
            Reason::ConfirmationTimedOut,
            Reason::HostUnreachable,
        ],
    ),
    (
        "verify",
        Reason::HealthChecksStarted,
        &[Reason::Converged, Reason::HealthCheckFailed],
    ),
];

/// When a host's steps (in [`STEPS`]' order) and its run ([`RUN`])
/// started: one entry per host, looked up by name once per event (a key
/// per step made the controller copy the host's name for each lookup).
type Starts = [Option<f64>; STEPS.len() + 1];
const RUN: usize = STEPS.len();

/// Events that end a host's reconcile, and how.
fn run_end(reason: Reason) -> Option<&'static str> {
    match reason {
        Reason::Converged => Some("converged"),
        Reason::BuildFailed
        | Reason::CopyFailed
        | Reason::ActivationFailed
        | Reason::HostUnreachable
        | Reason::HealthCheckFailed
        | Reason::RollbackFailed
        | Reason::HostKeyMismatch
        | Reason::WorkerCrashed => Some("failed"),
        _ => None,
    }
}

/// Every metric, in one registry.
pub struct Metrics {
    registry: Registry,
    events: IntCounterVec,
    fetch_failures: IntCounter,
    halts: IntCounter,
    reconcile_seconds: HistogramVec,
    step_seconds: HistogramVec,
    revision_detected: Gauge,
    commit_seconds: Histogram,
    hosts: IntGaugeVec,
    host_info: IntGaugeVec,
    revision_info: IntGaugeVec,
    rollout_hosts: IntGaugeVec,
    rollout_halted: IntGauge,
    window_closed: IntGauge,
    reboot_required: IntGauge,
    /// When each host's steps and run started (event time, seconds).
    started: Mutex<HashMap<String, Starts>>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot encode the metrics")]
pub struct MetricsError(#[source] prometheus::Error);

impl Metrics {
    pub fn new() -> Metrics {
        let buckets = prometheus::exponential_buckets(0.05, 2.0, 16).unwrap_or_default();
        let commit_buckets = prometheus::exponential_buckets(0.000_1, 2.0, 16).unwrap_or_default();
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric options")
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric options")
        };
        let metrics = Metrics {
            events: counter_vec(
                "cim_events_total",
                "Events recorded, by reason and type.",
                &["reason", "type"],
            ),
            fetch_failures: IntCounter::new(
                "cim_fetch_failures_total",
                "Failed fetches of the watched branch.",
            )
            .expect("valid metric options"),
            halts: IntCounter::new(
                "cim_rollout_halts_total",
                "Rollouts halted by their failure budget.",
            )
            .expect("valid metric options"),
            reconcile_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "cim_reconcile_duration_seconds",
                    "How long a host's reconcile took, from its first step to its outcome.",
                )
                .buckets(buckets.clone()),
                &["outcome"],
            )
            .expect("valid metric options"),
            step_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "cim_step_duration_seconds",
                    "How long one step of a reconcile took (build, copy, activate, verify).",
                )
                .buckets(buckets),
                &["step"],
            )
            .expect("valid metric options"),
            revision_detected: Gauge::new(
                "cim_revision_detected_timestamp_seconds",
                "When the newest revision of the branch was detected (Unix time).",
            )
            .expect("valid metric options"),
            commit_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "cim_store_commit_duration_seconds",
                    "How long a group commit of events to the store took.",
                )
                .buckets(commit_buckets),
            )
            .expect("valid metric options"),
            hosts: gauge_vec("cim_hosts", "Hosts by phase.", &["phase"]),
            host_info: gauge_vec(
                "cim_host_info",
                "One series per host: its phase, revision and systems.",
                &[
                    "host",
                    "phase",
                    "revision",
                    "current_system",
                    "desired_system",
                ],
            ),
            revision_info: gauge_vec(
                "cim_revision_info",
                "The revision being reconciled (desired) and the newest one fetched (latest).",
                &["revision", "role"],
            ),
            rollout_hosts: gauge_vec(
                "cim_rollout_hosts",
                "Hosts of the current revision's rollout, by state (done, failed, pending).",
                &["state"],
            ),
            rollout_halted: IntGauge::new(
                "cim_rollout_halted",
                "1 while the current revision's rollout is halted by its failure budget.",
            )
            .expect("valid metric options"),
            window_closed: IntGauge::new(
                "cim_window_closed",
                "1 while the deployment windows keep hosts from being worked on.",
            )
            .expect("valid metric options"),
            reboot_required: IntGauge::new(
                "cim_hosts_reboot_required",
                "Hosts running a system whose kernel, initrd or modules need a reboot.",
            )
            .expect("valid metric options"),
            started: Mutex::new(HashMap::new()),
            registry,
        };
        for c in [
            Box::new(metrics.events.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.fetch_failures.clone()),
            Box::new(metrics.halts.clone()),
            Box::new(metrics.reconcile_seconds.clone()),
            Box::new(metrics.step_seconds.clone()),
            Box::new(metrics.revision_detected.clone()),
            Box::new(metrics.commit_seconds.clone()),
            Box::new(metrics.hosts.clone()),
            Box::new(metrics.host_info.clone()),
            Box::new(metrics.revision_info.clone()),
            Box::new(metrics.rollout_hosts.clone()),
            Box::new(metrics.rollout_halted.clone()),
            Box::new(metrics.window_closed.clone()),
            Box::new(metrics.reboot_required.clone()),
        ] {
            // Names are distinct constants: registration cannot collide.
            let _ = metrics.registry.register(c);
        }
        metrics
    }

    /// Counts a committed event and times what it ends.
    pub fn observe(&self, ev: &Event) {
        let kind = match ev.event_type {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        };
        self.events
            .with_label_values(&[&ev.reason.to_string(), kind])
            .inc();
        let at = ev.time.unix_timestamp_nanos() as f64 / 1e9;
        match ev.reason {
            Reason::FetchFailed => self.fetch_failures.inc(),
            Reason::RolloutHalted => self.halts.inc(),
            Reason::RevisionDetected => self.revision_detected.set(at),
            _ => {}
        }
        let Some(host) = &ev.host else {
            return;
        };
        let mut started = self.started.lock().unwrap_or_else(|e| e.into_inner());
        let begins = STEPS.iter().position(|(_, start, _)| *start == ev.reason);
        let starts = match started.get_mut(host.as_str()) {
            Some(starts) => starts,
            None if begins.is_some() => started.entry(host.clone()).or_default(),
            None => return,
        };
        for (i, (step, _, ends)) in STEPS.iter().enumerate() {
            if ends.contains(&ev.reason) {
                if let Some(from) = starts[i].take() {
                    self.step_seconds
                        .with_label_values(&[step])
                        .observe((at - from).max(0.0));
                }
            }
        }
        if let Some(i) = begins {
            starts[i] = Some(at);
            starts[RUN].get_or_insert(at);
        }
        if let Some(outcome) = run_end(ev.reason) {
            if let Some(from) = starts[RUN].take() {
                self.reconcile_seconds
                    .with_label_values(&[outcome])
                    .observe((at - from).max(0.0));
            }
        }
        if ev.reason == Reason::HostRemoved {
            started.remove(host.as_str());
        }
    }

    /// Times a group commit.
    pub fn observe_commit(&self, seconds: f64) {
        self.commit_seconds.observe(seconds);
    }

    /// The metrics in the Prometheus text format, with the gauges of where
    /// the repository (`repo`) and the hosts (`hosts`) stand.
    pub fn render<'a>(
        &self,
        repo: &RepoStatus,
        hosts: impl Iterator<Item = &'a HostStatus> + Clone,
    ) -> Result<String, MetricsError> {
        self.hosts.reset();
        for phase in Phase::ALL {
            self.hosts.with_label_values(&[&phase.to_string()]).set(0);
        }
        self.host_info.reset();
        for h in hosts.clone() {
            self.hosts.with_label_values(&[&h.phase.to_string()]).inc();
            self.host_info
                .with_label_values(&[
                    &h.name,
                    &h.phase.to_string(),
                    h.observed_revision.as_deref().unwrap_or(""),
                    h.current_system.as_deref().unwrap_or(""),
                    h.desired_system.as_deref().unwrap_or(""),
                ])
                .set(1);
        }
        self.revision_info.reset();
        if let Some(r) = &repo.revision {
            self.revision_info.with_label_values(&[r, "desired"]).set(1);
        }
        if let Some(r) = &repo.latest_revision {
            self.revision_info.with_label_values(&[r, "latest"]).set(1);
        }
        let progress = crate::rollout::progress_of(repo, hosts.clone());
        self.rollout_hosts
            .with_label_values(&["done"])
            .set(progress.done as i64);
        self.rollout_hosts
            .with_label_values(&["failed"])
            .set(progress.failed as i64);
        self.rollout_hosts
            .with_label_values(&["pending"])
            .set(progress.pending as i64);
        self.rollout_halted.set(i64::from(progress.halted));
        self.window_closed.set(i64::from(repo.window.is_some()));
        let rebooting = hosts.filter(|h| h.reboot_required.is_some()).count();
        self.reboot_required.set(rebooting as i64);
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .map_err(MetricsError)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NewEvent;
    use time::OffsetDateTime;

    fn ev(seq: u64, at: i64, host: &str, reason: Reason) -> Event {
        let mut new = NewEvent::host(host, reason, Some("r1"), "m");
        if reason == Reason::Converged {
            new = new.phase(Phase::Converged);
        }
        new.into_event(seq, OffsetDateTime::from_unix_timestamp(at).unwrap(), None)
    }

    #[test]
    fn steps_and_reconciles_are_timed_from_events() {
        let m = Metrics::new();
        let mut status = crate::status::FleetStatus::default();
        for (i, (at, reason)) in [
            (100, Reason::BuildStarted),
            (103, Reason::BuildSucceeded),
            (103, Reason::CopyStarted),
            (104, Reason::CopySucceeded),
            (104, Reason::ActivationStarted),
            (106, Reason::Converged),
        ]
        .into_iter()
        .enumerate()
        {
            let e = ev(i as u64 + 1, at, "web-1", reason);
            status.apply(&e);
            m.observe(&e);
        }
        let text = m
            .render(&status.repo, status.hosts.values().map(|h| &**h))
            .unwrap();
        assert!(
            text.contains("cim_step_duration_seconds_sum{step=\"build\"} 3"),
            "{text}"
        );
        assert!(text.contains("cim_step_duration_seconds_sum{step=\"copy\"} 1"));
        assert!(text.contains("cim_step_duration_seconds_sum{step=\"activate\"} 2"));
        assert!(text.contains("cim_reconcile_duration_seconds_sum{outcome=\"converged\"} 6"));
        assert!(text.contains("cim_events_total{reason=\"Converged\",type=\"Normal\"} 1"));
        assert!(text.contains("cim_hosts{phase=\"Converged\"} 1"));
        assert!(text.contains("cim_hosts{phase=\"Failed\"} 0"));
        assert!(text.contains("cim_host_info{current_system=\"\",desired_system=\"\",host=\"web-1\",phase=\"Converged\",revision=\"r1\"} 1"), "{text}");
    }
}
