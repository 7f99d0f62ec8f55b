//! Human output of the CLI: `kubectl`/`flux`-style tables for status and
//! events. Pure functions of the data and the current time, so that their
//! output is pinned by snapshot tests.

use comfy_table::presets::NOTHING;
use comfy_table::{ContentArrangement, Table};
use time::OffsetDateTime;

use crate::api::StatusResponse;
use crate::event::Event;
use crate::status::HostStatus;

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().copied());
    t
}

/// Trims every line's trailing padding, which comfy-table leaves behind.
fn finish(t: &Table) -> String {
    let text = t.to_string();
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end()).collect();
    // NOTHING still indents by one space; drop it so columns start at 0.
    let lines: Vec<&str> = lines
        .iter()
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect();
    lines.join("\n")
}

/// `5s`, `3m`, `2h`, `4d`: how long ago (or, negative, how far ahead).
pub fn age(then: OffsetDateTime, now: OffsetDateTime) -> String {
    let secs = (now - then).whole_seconds();
    let (sign, secs) = if secs < 0 { ("in ", -secs) } else { ("", secs) };
    let text = match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    };
    format!("{sign}{text}")
}

fn short_rev(r: Option<&str>) -> String {
    r.map_or_else(|| "-".to_string(), |r| crate::event::short(r).to_string())
}

/// The store path's name without its hash: what people recognise.
fn short_system(p: Option<&str>) -> String {
    match p {
        None => "-".to_string(),
        Some(p) => p
            .strip_prefix("/nix/store/")
            .and_then(|rest| rest.get(33..))
            .unwrap_or(p)
            .to_string(),
    }
}

/// `text` with control characters (a host's output may hold terminal
/// escape sequences) shown as escapes instead of acted on by the terminal.
pub fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let shown: Vec<char> = if c.is_control() && c != '\t' {
                c.escape_unicode().collect()
            } else {
                vec![c]
            };
            shown
        })
        .collect()
}

fn one_line(message: &str, max: usize) -> String {
    let first = printable(message.lines().next().unwrap_or(""));
    let mut line: String = first.chars().take(max).collect();
    if first.chars().count() > max || message.lines().nth(1).is_some() {
        line.push('…');
    }
    line
}

fn host_row(h: &HostStatus, now: OffsetDateTime) -> Vec<String> {
    let retry = match (h.failures, h.next_retry, &h.failed_revision) {
        (0, _, _) => "-".to_string(),
        (n, Some(at), _) => format!("{n} (next {})", age(at, now)),
        (n, None, Some(_)) => format!("{n} (held)"),
        (n, None, None) => n.to_string(),
    };
    let phase = match &h.reboot_required {
        Some(_) => format!("{} (reboot)", h.phase),
        None => h.phase.to_string(),
    };
    vec![
        h.name.clone(),
        phase,
        short_rev(h.observed_revision.as_deref()),
        short_system(h.current_system.as_deref()),
        retry,
        age(h.last_transition_time, now),
        one_line(&h.message, 80),
    ]
}

pub fn status(s: &StatusResponse, now: OffsetDateTime) -> String {
    let mut out = format!(
        "revision: {}",
        s.revision.as_deref().unwrap_or("none (no valid specs yet)")
    );
    if s.latest_revision.is_some() && s.latest_revision != s.revision {
        out.push_str(&format!(
            "\nlatest:   {}",
            short_rev(s.latest_revision.as_deref())
        ));
    }
    if let Some(m) = &s.message {
        out.push_str(&format!("\nmessage:  {}", one_line(m, 200)));
    }
    if let Some(w) = &s.window {
        out.push_str(&format!("\nwindow:   CLOSED: {}", one_line(w, 200)));
    }
    let converged = s
        .hosts
        .iter()
        .filter(|h| h.phase == crate::event::Phase::Converged)
        .count();
    out.push_str(&format!(
        "\nhosts:    {converged}/{} converged",
        s.hosts.len()
    ));
    let r = &s.rollout;
    if r.revision.is_some() {
        let mut line = format!(
            "{} done, {} failed, {} pending",
            r.done, r.failed, r.pending
        );
        if let Some(w) = &r.wave {
            line = format!("wave {w}: {line}");
        }
        if r.halted {
            line.push_str(" — HALTED (`cim reconcile --all` resumes)");
        }
        out.push_str(&format!("\nrollout:  {line}"));
    }
    out.push_str("\n\n");
    let mut t = table(&[
        "NAME", "PHASE", "REVISION", "SYSTEM", "FAILURES", "AGE", "MESSAGE",
    ]);
    for h in &s.hosts {
        t.add_row(host_row(h, now));
    }
    out.push_str(&finish(&t));
    out
}

/// One host in detail, like `kubectl describe`.
pub fn host(h: &HostStatus, now: OffsetDateTime) -> String {
    let fmt_time = |t: OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    let mut lines = vec![
        format!("Name:               {}", h.name),
        format!(
            "Phase:              {} (for {})",
            h.phase,
            age(h.last_transition_time, now)
        ),
        format!(
            "Observed revision:  {}",
            h.observed_revision.as_deref().unwrap_or("-")
        ),
        format!(
            "Current system:     {}",
            h.current_system.as_deref().unwrap_or("-")
        ),
        format!(
            "Desired system:     {}",
            h.desired_system.as_deref().unwrap_or("-")
        ),
        format!("Failures:           {}", h.failures),
    ];
    if let Some(at) = h.next_retry {
        lines.push(format!(
            "Next retry:         {} ({})",
            fmt_time(at),
            age(at, now)
        ));
    }
    if let Some(why) = &h.reboot_required {
        lines.push(format!("Reboot required:    {}", printable(why)));
    }
    lines.push("Message:".to_string());
    lines.extend(h.message.lines().map(|l| format!("  {}", printable(l))));
    lines.join("\n")
}

/// The events table. Repeats of one event (same host, revision, reason and
/// message, as a host unreachable for an hour makes) are folded into their
/// latest row, the way `flux events` does: "(x17 over 8m)". The same step
/// at another revision is another event: folded, a host's activation at
/// the first revision would read as a second one at the next.
pub fn events(evs: &[Event], now: OffsetDateTime) -> String {
    let mut t = table(&[
        "SEQ", "AGE", "TYPE", "REASON", "HOST", "REVISION", "MESSAGE",
    ]);
    for (e, count, first) in fold_repeats(evs) {
        let mut row = event_row(e, now);
        if count > 1 {
            let span = age(first, e.time);
            if let Some(message) = row.last_mut() {
                message.push_str(&format!(" (x{count} over {span})"));
            }
        }
        t.add_row(row);
    }
    finish(&t)
}

/// One repeated event: where it last occurred, how often, since when.
type Repeats = (usize, usize, OffsetDateTime);

/// What makes two events repeats of one: host, revision, reason, message.
type RepeatKey<'a> = (Option<&'a str>, Option<&'a str>, String, &'a str);

/// Each distinct (host, revision, reason, message) once, at its latest
/// occurrence, with how often it happened and when first; in log order.
fn fold_repeats(evs: &[Event]) -> Vec<(&Event, usize, OffsetDateTime)> {
    let mut seen: std::collections::HashMap<RepeatKey<'_>, Repeats> =
        std::collections::HashMap::new();
    for (i, e) in evs.iter().enumerate() {
        let key = (
            e.host.as_deref(),
            e.revision.as_deref(),
            e.reason.to_string(),
            e.message.as_str(),
        );
        let entry = seen.entry(key).or_insert((i, 0, e.time));
        entry.0 = i;
        entry.1 += 1;
    }
    let mut rows: Vec<Repeats> = seen.into_values().collect();
    rows.sort_by_key(|(i, _, _)| *i);
    rows.into_iter()
        .map(|(i, count, first)| (&evs[i], count, first))
        .collect()
}

fn event_row(e: &Event, now: OffsetDateTime) -> Vec<String> {
    vec![
        e.seq.to_string(),
        age(e.time, now),
        format!("{:?}", e.event_type),
        e.reason.to_string(),
        e.host.clone().unwrap_or_else(|| "-".to_string()),
        short_rev(e.revision.as_deref()),
        one_line(&e.message, 100),
    ]
}

/// One event as a line, for `cim events --follow`.
pub fn event_line(e: &Event) -> String {
    let time = e
        .time
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    format!(
        "{:>5}  {time}  {:<7}  {:<17}  {:<12}  {}",
        e.seq,
        format!("{:?}", e.event_type),
        e.reason.to_string(),
        e.host.as_deref().unwrap_or("-"),
        one_line(&e.message, 100)
    )
}

/// `cim plan`: per host, whether the revision changes it and how.
pub fn plan(p: &crate::plan::Plan) -> String {
    let changing = p.hosts.iter().filter(|h| h.changes).count();
    let mut lines = vec![format!(
        "Plan for revision {}: {changing} of {} hosts change",
        crate::event::short(&p.revision),
        p.hosts.len()
    )];
    for h in &p.hosts {
        lines.push(String::new());
        lines.extend(host_plan(h));
    }
    lines.join("\n")
}

/// One host's plan, as lines.
pub fn host_plan(h: &crate::plan::HostPlan) -> Vec<String> {
    use crate::plan::{signed_size, ChangeKind};
    let mut lines = Vec::new();
    let verdict = match (&h.error, h.changes) {
        (Some(_), false) if h.current.is_none() => "unknown",
        (_, true) => "changes",
        (_, false) => "unchanged",
    };
    lines.push(format!("{}: {verdict}", printable(&h.host)));
    if h.changes {
        lines.push(format!(
            "  {} -> {}",
            h.current.as_deref().unwrap_or("no system"),
            h.desired.as_deref().unwrap_or("-")
        ));
    }
    if let Some(diff) = &h.diff {
        lines.push(format!("  {}", diff.summary()));
        for p in &diff.packages {
            let (from, to) = (p.from.join(", "), p.to.join(", "));
            let change = match p.kind() {
                ChangeKind::Added => format!("added {to}"),
                ChangeKind::Removed => format!("removed {from}"),
                ChangeKind::Upgraded | ChangeKind::Downgraded => format!("{from} -> {to}"),
            };
            lines.push(format!(
                "    {:<28} {:<30} {}",
                printable(&p.name),
                printable(&change),
                signed_size(p.size_delta)
            ));
        }
    }
    if let Some(a) = &h.activation {
        if a.is_empty() {
            lines.push("  activation would change no unit".to_string());
        }
        for (verb, units) in [
            ("stop", &a.stop),
            ("restart", &a.restart),
            ("reload", &a.reload),
            ("start", &a.start),
        ] {
            if !units.is_empty() {
                lines.push(format!(
                    "  activation would {verb}: {}",
                    printable(&units.join(", "))
                ));
            }
        }
        for other in &a.other {
            lines.push(format!("  {}", printable(other)));
        }
    }
    if !h.reboot_for.is_empty() {
        lines.push(format!(
            "  reboot needed: {} differ from the booted system's",
            h.reboot_for.join(", ")
        ));
    }
    if let Some(e) = &h.error {
        lines.extend(e.lines().map(|l| format!("  error: {}", printable(l))));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{NewEvent, Phase, Reason};
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-24 12:00:00 UTC);
    const SYS: &str = "/nix/store/b7nkhawyf3jpg51m457xsvxfajiicixb-nixos-system-web-1-2";

    fn host(name: &str, phase: Phase, failures: u32, message: &str) -> HostStatus {
        HostStatus {
            name: name.to_string(),
            phase,
            current_system: Some(SYS.to_string()),
            desired_system: Some(SYS.to_string()),
            observed_revision: Some("0123456789abcdef0123456789abcdef01234567".to_string()),
            message: message.to_string(),
            last_transition_time: NOW - time::Duration::seconds(95),
            failures,
            next_retry: (failures > 0).then(|| NOW + time::Duration::seconds(30)),
            failed_revision: None,
            phase_revision: None,
            operator_suspended: false,
            reboot_required: None,
        }
    }

    #[test]
    fn status_table() {
        let s = StatusResponse {
            seq: 0,
            since: None,
            removed: Vec::new(),
            trimmed_through: 0,
            revision: Some("0123456789abcdef0123456789abcdef01234567".into()),
            latest_revision: Some("fedcba9876543210fedcba9876543210fedcba98".into()),
            message: Some(
                "specs at fedcba987654 are invalid: specs/web.yaml:3:1: unknown field `foo`".into(),
            ),
            window: None,
            rollout: crate::rollout::Progress {
                revision: Some("0123456789abcdef0123456789abcdef01234567".into()),
                done: 1,
                failed: 1,
                pending: 0,
                halted: true,
                wave: Some("canary".into()),
            },
            hosts: vec![
                host("web-1", Phase::Converged, 0, "switched to /nix/store/…"),
                host(
                    "web-2",
                    Phase::Failed,
                    2,
                    "cannot connect to root@10.0.0.3: connection refused\nmore",
                ),
            ],
        };
        insta::assert_snapshot!(status(&s, NOW));
    }

    #[test]
    fn host_detail() {
        insta::assert_snapshot!(super::host(
            &host(
                "web-2",
                Phase::Failed,
                1,
                "`switch-to-configuration switch` exited with 1:\nerror: boom"
            ),
            NOW
        ));
    }

    #[test]
    fn events_table() {
        let evs = vec![
            NewEvent::repo(
                Reason::RevisionDetected,
                Some("0123456789abcdef"),
                "new head",
            )
            .into_event(1, NOW - time::Duration::minutes(5), None),
            NewEvent::host(
                "web-1",
                Reason::ActivationFailed,
                Some("0123456789abcdef"),
                "exit 1\nerror: boom",
            )
            .phase(Phase::Failed)
            .into_event(2, NOW - time::Duration::seconds(3), Some(Phase::Activating)),
        ];
        insta::assert_snapshot!(events(&evs, NOW));
        insta::assert_snapshot!(event_line(&evs[1]));
    }

    #[test]
    fn a_hosts_terminal_escapes_are_shown_not_obeyed() {
        let shown = one_line("failed: \u{1b}]0;pwned\u{7}\u{1b}[2J done", 100);
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(shown.contains("\\u{1b}"), "{shown}");
        let h = host("web-1", Phase::Failed, 1, "line\u{1b}[31mred");
        assert!(!super::host(&h, OffsetDateTime::UNIX_EPOCH)
            .lines()
            .any(|l| l.chars().any(char::is_control)));
    }

    #[test]
    fn repeated_events_are_folded_into_their_latest() {
        let at = |s: i64| OffsetDateTime::from_unix_timestamp(1_000_000 + s).unwrap();
        let unreachable = |seq: u64, s: i64| {
            NewEvent::host(
                "web-1",
                Reason::HostUnreachable,
                Some("r1"),
                "no route to host",
            )
            .into_event(seq, at(s), None)
        };
        let evs = vec![
            unreachable(1, 0),
            NewEvent::host("web-2", Reason::Converged, Some("r1"), "switched").into_event(
                2,
                at(10),
                None,
            ),
            unreachable(3, 240),
            unreachable(4, 480),
        ];
        let table = events(&evs, at(500));
        assert_eq!(
            table
                .lines()
                .filter(|l| l.contains("HostUnreachable"))
                .count(),
            1
        );
        assert!(table.contains("no route to host (x3 over 8m)"), "{table}");
        let seqs: Vec<&str> = table
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(seqs, ["2", "4"], "in log order, at the latest occurrence");
    }

    #[test]
    fn the_same_step_at_another_revision_is_not_folded() {
        let at = |s: i64| NOW - time::Duration::seconds(600 - s);
        let started = |seq: u64, revision: &str| {
            NewEvent::host(
                "web-2",
                Reason::ActivationStarted,
                Some(revision),
                "running switch-to-configuration switch",
            )
            .into_event(seq, at(seq as i64), None)
        };
        let evs = vec![started(1, "r1"), started(2, "r2")];
        let table = events(&evs, at(500));
        assert_eq!(
            table
                .lines()
                .filter(|l| l.contains("ActivationStarted"))
                .count(),
            2,
            "{table}"
        );
        assert!(!table.contains("(x2"), "{table}");
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(age(NOW - time::Duration::seconds(5), NOW), "5s");
        assert_eq!(age(NOW - time::Duration::minutes(3), NOW), "3m");
        assert_eq!(age(NOW - time::Duration::hours(5), NOW), "5h");
        assert_eq!(age(NOW - time::Duration::days(3), NOW), "3d");
        assert_eq!(age(NOW + time::Duration::seconds(30), NOW), "in 30s");
    }

    #[test]
    fn a_host_that_needs_a_reboot_says_so() {
        let mut h = host("web-3", Phase::Converged, 0, "switched");
        h.reboot_required = Some("kernel changed: switched, but …".into());
        assert!(host_row(&h, NOW)[1].ends_with("(reboot)"));
        assert!(super::host(&h, NOW).contains("Reboot required:    kernel changed"));
    }

    #[test]
    fn plan_table() {
        use crate::plan::{Activation, ClosureDiff, HostPlan, PackageChange, Plan};
        let change = |name: &str, from: &[&str], to: &[&str], size_delta| PackageChange {
            name: name.into(),
            from: from.iter().map(|v| v.to_string()).collect(),
            to: to.iter().map(|v| v.to_string()).collect(),
            size_delta,
        };
        let plan = Plan {
            revision: "0123456789abcdef0123456789abcdef01234567".into(),
            hosts: vec![
                HostPlan {
                    host: "web-1".into(),
                    desired: Some(SYS.replace("web-1-2", "web-1-3")),
                    current: Some(SYS.into()),
                    changes: true,
                    diff: Some(ClosureDiff {
                        packages: vec![
                            change("curl", &["8.0"], &[], -317_440),
                            change("hello", &["2.10"], &["2.12"], 12_288),
                            change("jq", &[], &["1.7"], 1_572_864),
                        ],
                        old_size: 100 << 20,
                        new_size: (100 << 20) + 1_267_712,
                        new_paths: 3,
                    }),
                    activation: Some(Activation {
                        stop: vec!["cron.service".into()],
                        restart: vec!["nginx.service".into()],
                        start: vec!["metrics.service".into()],
                        reload: vec![],
                        other: vec!["would activate the configuration...".into()],
                    }),
                    reboot_for: vec!["kernel".into(), "initrd".into()],
                    error: None,
                },
                HostPlan {
                    host: "web-2".into(),
                    desired: Some(SYS.into()),
                    current: Some(SYS.into()),
                    changes: false,
                    diff: None,
                    activation: None,
                    reboot_for: vec![],
                    error: None,
                },
                HostPlan {
                    host: "web-3".into(),
                    desired: Some(SYS.into()),
                    current: None,
                    changes: false,
                    diff: None,
                    activation: None,
                    reboot_for: vec![],
                    error: Some("cannot connect to root@10.0.0.4: Connection refused".into()),
                },
            ],
        };
        insta::assert_snapshot!(super::plan(&plan));
    }
}
