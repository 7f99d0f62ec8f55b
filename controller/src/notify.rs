//! Notifications (`--notify URL`): Warning events and rollout outcomes
//! (a revision converged everywhere, halted, a host rolled back), posted
//! as a generic JSON webhook or a Slack-compatible message, filtered by
//! reason and host.
//!
//! The notifier is a task of its own that reads committed events from the
//! store after its cursor (kept in the store) and moves the cursor only
//! after every URL took the event: the controller never waits for it, and
//! a restart neither loses nor repeats a notification. A URL that keeps
//! refusing is retried with backoff (the queue waits: nothing is dropped)
//! and its failure is reported as a `NotificationFailed` event, once per
//! streak.

use std::path::PathBuf;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::decide::Msg;
use crate::event::{short, Event, EventType, Reason};
use crate::store::{EventQuery, Store};

/// The payload's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The event itself, as the API's JSON.
    Json,
    /// `{"text": …}`, for Slack's (and Mattermost's) incoming webhooks.
    Slack,
}

/// What to notify, and where.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    pub urls: Vec<String>,
    pub format: Format,
    /// Only these reasons (empty: every Warning and every outcome).
    pub reasons: Vec<String>,
    /// Only events of these hosts (empty: all; repository events always).
    pub hosts: Vec<String>,
    pub state_dir: PathBuf,
}

/// Rollout outcomes notified although they are not warnings.
const OUTCOMES: &[Reason] = &[Reason::RolloutCompleted, Reason::RolledBack];

/// The cursor's name in the store.
const CURSOR: &str = "notify";

impl NotifyConfig {
    /// Whether `ev` is to be sent.
    pub fn wanted(&self, ev: &Event) -> bool {
        // The notifier's own failures would only feed themselves.
        if ev.reason == Reason::NotificationFailed {
            return false;
        }
        let reason_ok = if self.reasons.is_empty() {
            ev.event_type == EventType::Warning || OUTCOMES.contains(&ev.reason)
        } else {
            self.reasons.iter().any(|r| *r == ev.reason.to_string())
        };
        let host_ok = match &ev.host {
            None => true,
            Some(h) => self.hosts.is_empty() || self.hosts.iter().any(|w| w == h),
        };
        reason_ok && host_ok
    }

    /// The body posted for `ev`.
    pub fn payload(&self, ev: &Event) -> Result<String, serde_json::Error> {
        match self.format {
            Format::Json => serde_json::to_string(ev),
            Format::Slack => {
                #[derive(Serialize)]
                struct Slack {
                    text: String,
                }
                let icon = match ev.event_type {
                    EventType::Warning => ":warning:",
                    EventType::Normal => ":white_check_mark:",
                };
                let mut text = format!("{icon} *{}*", ev.reason);
                if let Some(host) = &ev.host {
                    text.push_str(&format!(" {host}"));
                }
                if let Some(revision) = &ev.revision {
                    text.push_str(&format!(" at `{}`", short(revision)));
                }
                text.push_str(&format!(": {}", ev.message));
                serde_json::to_string(&Slack { text })
            }
        }
    }
}

/// Starts the notifier; it ends with `cancel`. `report` takes its
/// failures to the controller.
pub fn spawn(
    cfg: NotifyConfig,
    report: mpsc::Sender<Msg>,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // Failures in a row wait longer each time; a delivery starts the
        // next failure from the beginning.
        let mut retry: Option<backon::ExponentialBackoff> = None;
        let mut failing = false;
        loop {
            let cfg2 = cfg.clone();
            let round = tokio::task::spawn_blocking(move || deliver(&cfg2)).await;
            let next = match round {
                Ok(Ok(())) => {
                    failing = false;
                    retry = None;
                    POLL
                }
                Ok(Err(error)) => {
                    if !failing {
                        failing = true;
                        let _ = report.send(Msg::NotifyFailed { error }).await;
                    }
                    next_retry(&mut retry)
                }
                Err(e) => {
                    tracing::error!(error = %e, "the notifier crashed");
                    next_retry(&mut retry)
                }
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(next) => {}
            }
        }
    })
}

/// How often the notifier looks for new events.
const POLL: Duration = Duration::from_millis(500);
/// The wait after a first failed delivery, and the longest.
const RETRY_FIRST: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// The wait before the next delivery after one more failure in a row
/// (2 s, 4 s, … 5 min), through `backon` as the watcher's fetches.
fn next_retry(retry: &mut Option<backon::ExponentialBackoff>) -> Duration {
    retry
        .get_or_insert_with(|| {
            ExponentialBuilder::default()
                .with_min_delay(RETRY_FIRST)
                .with_max_delay(RETRY_MAX)
                .without_max_times()
                .build()
        })
        .next()
        .unwrap_or(RETRY_MAX)
}

/// Sends every wanted event after the cursor, in order; the cursor moves
/// past each one once every URL took it. `Err` names what refused.
fn deliver(cfg: &NotifyConfig) -> Result<(), String> {
    let mut store = Store::open(&cfg.state_dir).map_err(|e| crate::error::error_chain(&e))?;
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .redirects(0)
        .build();
    loop {
        let since = store
            .cursor(CURSOR)
            .map_err(|e| crate::error::error_chain(&e))?;
        let events = store
            .events(&EventQuery {
                hosts: None,
                selector: None,
                host: None,
                since: Some(since),
                limit: Some(500),
            })
            .map_err(|e| crate::error::error_chain(&e))?;
        let Some(last) = events.last().map(|e| e.seq) else {
            return Ok(());
        };
        for ev in &events {
            if cfg.wanted(ev) {
                let body = cfg.payload(ev).map_err(|e| e.to_string())?;
                for url in &cfg.urls {
                    agent
                        .post(url)
                        .set("Content-Type", "application/json")
                        .send_string(&body)
                        .map_err(|e| format!("POST {url} failed: {e}"))?;
                }
            }
            store
                .set_cursor(CURSOR, ev.seq)
                .map_err(|e| crate::error::error_chain(&e))?;
        }
        if events.len() < 500 || last == since {
            return Ok(());
        }
    }
}

/// Where a fresh notifier starts: after every event already in the store
/// (a first start does not flood the channel with the history).
pub fn start_at_end(state_dir: &std::path::Path) -> Result<(), crate::store::StoreError> {
    let mut store = Store::open(state_dir)?;
    if store.cursor(CURSOR)? == 0 {
        let last = store.last_seq()?;
        store.set_cursor(CURSOR, last)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_deliveries_wait_twice_as_long_each_time_up_to_five_minutes() {
        let mut retry = None;
        let waits: Vec<u64> = (0..10).map(|_| next_retry(&mut retry).as_secs()).collect();
        assert_eq!(waits, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        // A delivery in between starts over.
        let mut retry = None;
        assert_eq!(next_retry(&mut retry).as_secs(), 2);
    }
    use crate::event::NewEvent;
    use time::OffsetDateTime;

    fn cfg(reasons: &[&str], hosts: &[&str], format: Format) -> NotifyConfig {
        NotifyConfig {
            urls: vec![],
            format,
            reasons: reasons.iter().map(|r| r.to_string()).collect(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            state_dir: PathBuf::new(),
        }
    }

    fn ev(host: Option<&str>, reason: Reason) -> Event {
        let new = match host {
            Some(h) => NewEvent::host(h, reason, Some("0123456789abcdef"), "it broke"),
            None => NewEvent::repo(reason, Some("0123456789abcdef"), "it broke"),
        };
        new.into_event(1, OffsetDateTime::UNIX_EPOCH, None)
    }

    #[test]
    fn warnings_and_outcomes_are_sent_by_default_and_filters_narrow_them() {
        let all = cfg(&[], &[], Format::Json);
        assert!(all.wanted(&ev(Some("web-1"), Reason::HostUnreachable)));
        assert!(all.wanted(&ev(None, Reason::RolloutCompleted)));
        assert!(!all.wanted(&ev(Some("web-1"), Reason::CopyStarted)));
        assert!(!all.wanted(&ev(None, Reason::NotificationFailed)));
        let narrow = cfg(&["RolloutHalted"], &["web-2"], Format::Json);
        assert!(!narrow.wanted(&ev(Some("web-1"), Reason::HostUnreachable)));
        assert!(narrow.wanted(&ev(None, Reason::RolloutHalted)));
    }

    #[test]
    fn slack_gets_one_line_of_text() {
        let slack = cfg(&[], &[], Format::Slack);
        let body = slack
            .payload(&ev(Some("web-1"), Reason::HostUnreachable))
            .unwrap();
        assert_eq!(
            body,
            r#"{"text":":warning: *HostUnreachable* web-1 at `0123456789ab`: it broke"}"#
        );
    }
}
