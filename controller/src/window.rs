//! Deployment windows (`windows:` in `kind: Fleet`), Argo CD's sync
//! windows for a fleet: each opens on a cron schedule in a time zone and
//! stays open for a duration. With any `allow` window, hosts are worked on
//! only while one is open; an open `deny` window closes everything. Pure:
//! the time comes in, the verdict (and when it changes) goes out.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use time::OffsetDateTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    Allow,
    Deny,
}

/// One validated window.
#[derive(Debug, Clone)]
pub struct Window {
    pub kind: WindowKind,
    /// As written, for messages.
    pub schedule: String,
    cron: croner::Cron,
    pub duration: Duration,
    pub zone: Tz,
}

impl PartialEq for Window {
    fn eq(&self, other: &Window) -> bool {
        self.kind == other.kind
            && self.schedule == other.schedule
            && self.duration == other.duration
            && self.zone == other.zone
    }
}

impl Eq for Window {}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            WindowKind::Allow => "allow",
            WindowKind::Deny => "deny",
        };
        write!(
            f,
            "{kind} `{}` for {} ({})",
            self.schedule,
            span(self.duration),
            self.zone
        )
    }
}

/// A duration as a spec would write it: "8h", "90m", "1h30m", "45s".
fn span(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    for (n, unit) in [(h, "h"), (m, "m"), (s, "s")] {
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    if out.is_empty() {
        out.push_str("0s");
    }
    out
}

impl Window {
    /// A window from its spec fields; `Err` says what is wrong.
    pub fn new(
        kind: WindowKind,
        schedule: &str,
        duration: Duration,
        zone: Option<&str>,
    ) -> Result<Window, String> {
        // Five fields as cron writes them; a sixth, leading, for seconds.
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .build()
            .parse(schedule.trim())
            .map_err(|e| format!("schedule `{schedule}` is not a cron schedule: {e}"))?;
        let zone = match zone {
            None => Tz::UTC,
            Some(z) => z.parse::<Tz>().map_err(|_| {
                format!("unknown time zone `{z}` (an IANA name like Europe/Berlin)")
            })?,
        };
        if duration < Duration::from_secs(1) {
            return Err("a window's duration must be at least 1s".to_string());
        }
        Ok(Window {
            kind,
            schedule: schedule.trim().to_string(),
            cron,
            duration,
            zone,
        })
    }

    /// When the occurrence of this window that covers `at` ends, if one
    /// does.
    fn open_until(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = at.with_timezone(&self.zone);
        let start = self.cron.find_previous_occurrence(&local, true).ok()?;
        let end = start.with_timezone(&Utc) + chrono::Duration::from_std(self.duration).ok()?;
        (at < end).then_some(end)
    }

    /// When this window next opens after `at`.
    fn next_start(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = at.with_timezone(&self.zone);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// Whether hosts may be worked on at a moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Open,
    /// Closed by `because`; opens again at `until` (`None`: never, as far
    /// as a year ahead shows).
    Closed {
        because: String,
        until: Option<OffsetDateTime>,
    },
}

fn to_chrono(t: OffsetDateTime) -> DateTime<Utc> {
    Utc.timestamp_opt(t.unix_timestamp(), t.nanosecond())
        .single()
        .unwrap_or_default()
}

fn to_time(t: DateTime<Utc>) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(t.timestamp()).ok()
}

/// Why `windows` are closed at `at`, if they are.
fn closed_because(windows: &[Window], at: DateTime<Utc>) -> Option<(String, Vec<DateTime<Utc>>)> {
    let denying: Vec<(&Window, DateTime<Utc>)> = windows
        .iter()
        .filter(|w| w.kind == WindowKind::Deny)
        .filter_map(|w| w.open_until(at).map(|end| (w, end)))
        .collect();
    if let Some((w, _)) = denying.first() {
        return Some((
            format!("deny window {w} is open"),
            denying.iter().map(|(_, end)| *end).collect(),
        ));
    }
    let allows: Vec<&Window> = windows
        .iter()
        .filter(|w| w.kind == WindowKind::Allow)
        .collect();
    if allows.is_empty() || allows.iter().any(|w| w.open_until(at).is_some()) {
        return None;
    }
    let why = if allows.len() == 1 {
        format!("outside allow window {}", allows[0])
    } else {
        format!("outside all {} allow windows", allows.len())
    };
    Some((
        why,
        allows.iter().filter_map(|w| w.next_start(at)).collect(),
    ))
}

/// Whether hosts may be worked on at `at`, and if not, until when.
pub fn verdict(windows: &[Window], at: OffsetDateTime) -> Verdict {
    let at = to_chrono(at);
    let Some((because, candidates)) = closed_because(windows, at) else {
        return Verdict::Open;
    };
    // The earliest moment at which nothing closes them: a deny window's
    // end may fall outside every allow window, an allow window may open
    // inside a deny window.
    let until = first_moment(at, candidates, |t| match closed_because(windows, t) {
        None => Ok(()),
        Some((_, more)) => Err(more),
    });
    Verdict::Closed {
        because,
        until: until.and_then(to_time),
    }
}

/// When `windows`, open at `at`, next close (`None`: there are no
/// windows, or none closes them within a year). A run let through while
/// they are open must not activate past it.
pub fn closes_at(windows: &[Window], at: OffsetDateTime) -> Option<OffsetDateTime> {
    let at = to_chrono(at);
    // An allow window's end may fall inside another allow window; a deny
    // window's start is always a closing.
    first_moment(at, closing_moments(windows, at), |t| {
        match closed_because(windows, t) {
            Some(_) => Ok(()),
            None => Err(closing_moments(windows, t)),
        }
    })
    .and_then(to_time)
}

/// The earliest of `candidates` (moments after `at`) that `found` accepts,
/// within a year; a moment it refuses names the later moments to try.
fn first_moment(
    at: DateTime<Utc>,
    mut candidates: Vec<DateTime<Utc>>,
    found: impl Fn(DateTime<Utc>) -> Result<(), Vec<DateTime<Utc>>>,
) -> Option<DateTime<Utc>> {
    let horizon = at + chrono::Duration::days(366);
    for _ in 0..64 {
        candidates.sort();
        candidates.dedup();
        let next = candidates.first().copied().filter(|t| *t <= horizon)?;
        candidates.remove(0);
        match found(next) {
            Ok(()) => return Some(next),
            Err(more) => candidates.extend(more.into_iter().filter(|t| *t > next)),
        }
    }
    None
}

/// The moments after `at` at which `windows` may close: the ends of the
/// allow windows open at `at` and the next starts of the deny windows.
fn closing_moments(windows: &[Window], at: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    windows
        .iter()
        .filter_map(|w| match w.kind {
            WindowKind::Allow => w.open_until(at),
            WindowKind::Deny => w.next_start(at),
        })
        .filter(|t| *t > at)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> OffsetDateTime {
        OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap()
    }

    fn window(kind: WindowKind, schedule: &str, minutes: u64, zone: Option<&str>) -> Window {
        Window::new(kind, schedule, Duration::from_secs(minutes * 60), zone).unwrap()
    }

    #[test]
    fn no_windows_means_always_open() {
        assert_eq!(verdict(&[], at("2026-11-25T12:00:00Z")), Verdict::Open);
    }

    #[test]
    fn an_allow_window_opens_on_schedule_for_its_duration() {
        // Every night 22:00–06:00 UTC.
        let w = [window(WindowKind::Allow, "0 22 * * *", 8 * 60, None)];
        assert_eq!(verdict(&w, at("2026-11-25T23:30:00Z")), Verdict::Open);
        assert_eq!(verdict(&w, at("2026-11-26T05:59:00Z")), Verdict::Open);
        assert_eq!(verdict(&w, at("2026-11-25T22:00:00Z")), Verdict::Open);
        let Verdict::Closed { because, until } = verdict(&w, at("2026-11-25T12:00:00Z")) else {
            panic!("open at noon")
        };
        assert_eq!(until, Some(at("2026-11-25T22:00:00Z")));
        assert!(because.contains("outside allow window allow `0 22 * * *` for 8h (UTC)"));
    }

    #[test]
    fn time_zones_move_the_window() {
        // 09:00 in Berlin is 08:00 UTC in winter.
        let w = [window(
            WindowKind::Allow,
            "0 9 * * 1-5",
            60,
            Some("Europe/Berlin"),
        )];
        assert_eq!(verdict(&w, at("2026-11-25T08:30:00Z")), Verdict::Open);
        let Verdict::Closed { until, .. } = verdict(&w, at("2026-11-25T09:30:00Z")) else {
            panic!("open after the hour")
        };
        assert_eq!(until, Some(at("2026-11-26T08:00:00Z")));
        // Friday afternoon: the next opening is Monday.
        let Verdict::Closed { until, .. } = verdict(&w, at("2026-11-27T12:00:00Z")) else {
            panic!()
        };
        assert_eq!(until, Some(at("2026-11-30T08:00:00Z")));
    }

    #[test]
    fn a_deny_window_wins_and_its_end_may_not_be_an_opening() {
        let w = [
            window(WindowKind::Allow, "0 8 * * *", 10 * 60, None),
            window(WindowKind::Deny, "0 12 * * *", 60, None),
        ];
        assert_eq!(verdict(&w, at("2026-11-25T09:00:00Z")), Verdict::Open);
        let Verdict::Closed { because, until } = verdict(&w, at("2026-11-25T12:30:00Z")) else {
            panic!("open in the deny window")
        };
        assert!(because.starts_with("deny window"), "{because}");
        assert_eq!(until, Some(at("2026-11-25T13:00:00Z")));
        // A deny window ending outside the allow window: closed until the
        // allow window opens again.
        let w = [
            window(WindowKind::Allow, "0 8 * * *", 60, None),
            window(WindowKind::Deny, "30 8 * * *", 120, None),
        ];
        let Verdict::Closed { until, .. } = verdict(&w, at("2026-11-25T08:45:00Z")) else {
            panic!()
        };
        assert_eq!(until, Some(at("2026-11-26T08:00:00Z")));
    }

    #[test]
    fn a_deny_only_window_closes_only_while_open() {
        let w = [window(WindowKind::Deny, "0 0 * * 6", 48 * 60, None)];
        // Saturday and Sunday are frozen.
        assert!(matches!(
            verdict(&w, at("2026-11-28T10:00:00Z")),
            Verdict::Closed { .. }
        ));
        assert_eq!(verdict(&w, at("2026-11-30T10:00:00Z")), Verdict::Open);
    }

    #[test]
    fn schedules_may_name_seconds() {
        let w = [window(WindowKind::Deny, "30 0 12 * * *", 1, None)];
        assert_eq!(verdict(&w, at("2026-11-25T12:00:29Z")), Verdict::Open);
        assert_eq!(
            verdict(&w, at("2026-11-25T12:00:45Z")),
            Verdict::Closed {
                because: "deny window deny `30 0 12 * * *` for 1m (UTC) is open".to_string(),
                until: Some(at("2026-11-25T12:01:30Z")),
            }
        );
    }

    #[test]
    fn bad_windows_say_why() {
        let d = Duration::from_secs(3600);
        assert!(Window::new(WindowKind::Allow, "nope", d, None)
            .unwrap_err()
            .contains("not a cron schedule"));
        assert!(
            Window::new(WindowKind::Allow, "0 9 * * *", d, Some("Mars/Base"))
                .unwrap_err()
                .contains("unknown time zone")
        );
        assert!(
            Window::new(WindowKind::Allow, "0 9 * * *", Duration::ZERO, None)
                .unwrap_err()
                .contains("at least 1s")
        );
    }

    #[test]
    fn open_windows_say_when_they_close() {
        assert_eq!(closes_at(&[], at("2026-11-25T12:00:00Z")), None);
        // 22:00–06:00 UTC: open at 23:30, closing at 06:00.
        let night = window(WindowKind::Allow, "0 22 * * *", 8 * 60, None);
        assert_eq!(
            closes_at(std::slice::from_ref(&night), at("2026-11-25T23:30:00Z")),
            Some(at("2026-11-26T06:00:00Z"))
        );
        // A second allow window that covers 06:00 carries it on to 07:00.
        let morning = window(WindowKind::Allow, "0 5 * * *", 2 * 60, None);
        assert_eq!(
            closes_at(&[night.clone(), morning], at("2026-11-25T23:30:00Z")),
            Some(at("2026-11-26T07:00:00Z"))
        );
        // A deny window that starts inside it closes it early.
        let freeze = window(WindowKind::Deny, "0 2 * * *", 30, None);
        assert_eq!(
            closes_at(&[night, freeze.clone()], at("2026-11-25T23:30:00Z")),
            Some(at("2026-11-26T02:00:00Z"))
        );
        // With deny windows only, the next one closes them.
        assert_eq!(
            closes_at(&[freeze], at("2026-11-25T12:00:00Z")),
            Some(at("2026-11-26T02:00:00Z"))
        );
    }
}
