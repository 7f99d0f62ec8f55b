//! Deployment windows: outside them no host is worked on, the closing and
//! the opening are said once each, hosts wait for the opening on a timer,
//! and `cim reconcile --force-window` goes through, recorded. The rig is
//! `decide/tests.rs`'s; its clock starts at 1970-01-01 00:00 UTC.

use super::*;

/// Two web hosts, allowed to be worked on 09:00–10:00 UTC every day.
fn nine_to_ten() -> FleetSpec {
    fleet(
        "  windows:\n    - {kind: allow, schedule: '0 9 * * *', duration: 1h}\n",
        &[("web-1", ""), ("web-2", "")],
    )
}

#[test]
fn outside_an_allow_window_no_host_runs_until_it_opens() {
    let mut rig = Rig::new();
    let effects = rig.deploy("r1", nine_to_ten(), &[]);
    assert!(runs(&effects).is_empty(), "{effects:?}");
    // Builds run ahead of the opening, once.
    let built_ahead: Vec<String> = effects
        .iter()
        .chain(&rig.send(Msg::Tick))
        .flat_map(|e| match e {
            Effect::Prebuild(systems) => systems.iter().map(|s| s.out.to_string()).collect(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(built_ahead.len(), 2, "{built_ahead:?}");
    assert!(rig.tick().is_empty());
    assert_eq!(
        rig.reasons()
            .iter()
            .filter(|r| *r == "WindowClosed")
            .count(),
        1
    );
    let closed = rig
        .log
        .iter()
        .find(|e| e.reason == Reason::WindowClosed)
        .unwrap();
    assert!(
        closed.message.contains("until 1970-01-01T09:00:00Z"),
        "{}",
        closed.message
    );
    assert_eq!(
        rig.state.status.repo.window.as_deref(),
        Some(closed.message.as_str())
    );
    // The hosts wait for the opening, on a timer.
    assert_eq!(
        rig.state.next_dispatch(),
        Some(rig.at + Duration::from_secs(9 * 3600))
    );
    rig.advance(Duration::from_secs(9 * 3600 - 1));
    assert!(rig.tick().is_empty());
    rig.advance(Duration::from_secs(1));
    let mut started = rig.tick();
    started.sort();
    assert_eq!(started, ["web-1", "web-2"]);
    assert_eq!(
        rig.reasons()
            .iter()
            .filter(|r| *r == "WindowOpened")
            .count(),
        1
    );
    assert_eq!(rig.state.status.repo.window, None);
}

#[test]
fn force_window_lets_the_asked_hosts_through_and_is_recorded() {
    let mut rig = Rig::new();
    rig.deploy("r1", nine_to_ten(), &[]);
    assert!(rig.tick().is_empty());
    let (answer, effects) = rig.ask(Ask::Reconcile {
        host: Some("web-1".into()),
        selector: None,
        force_window: true,
    });
    assert!(answer.is_ok(), "{answer:?}");
    let mut effects = effects;
    effects.extend(rig.send(Msg::Tick));
    assert_eq!(runs(&effects), ["web-1"]);
    // Forced through, it is not stopped before activation either.
    assert!(effects
        .iter()
        .all(|e| !matches!(e, Effect::Run(item) if item.activate_by.is_some())));
    assert!(rig.reasons().contains(&"WindowForced".to_string()));
    let forced = rig
        .log
        .iter()
        .find(|e| e.reason == Reason::WindowForced)
        .unwrap();
    assert_eq!(forced.event_type, crate::event::EventType::Warning);
    // Once its run ends, web-1 is held by the window again.
    rig.converged("web-1");
    rig.state.queue.schedule("web-1", rig.at);
    assert!(rig.tick().is_empty());
}

#[test]
fn a_fleet_without_windows_never_says_anything_about_them() {
    let mut rig = Rig::new();
    let effects = rig.deploy("r1", two_web_hosts(), &[]);
    let mut started = runs(&effects);
    started.extend(rig.tick());
    assert_eq!(started.len(), 2);
    assert!(!rig.reasons().iter().any(|r| r.starts_with("Window")));
}

/// Two web hosts, allowed to be worked on 00:00–01:00 UTC every day: open
/// when the rig's clock starts.
fn midnight_to_one() -> FleetSpec {
    fleet(
        "  windows:\n    - {kind: allow, schedule: '0 0 * * *', duration: 1h}\n",
        &[("web-1", ""), ("web-2", "")],
    )
}

#[test]
fn a_run_let_through_an_open_window_must_activate_before_it_closes() {
    let mut rig = Rig::new();
    let mut effects = rig.deploy("r1", midnight_to_one(), &[]);
    effects.extend(rig.send(Msg::Tick));
    let deadlines: Vec<_> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Run(item) => Some(item.activate_by),
            _ => None,
        })
        .collect();
    assert_eq!(
        deadlines,
        [Some(rig.at + Duration::from_secs(3600)); 2],
        "{effects:?}"
    );
    // A fleet without windows sets no such deadline.
    let mut free = Rig::new();
    let mut effects = free.deploy("r1", two_web_hosts(), &[]);
    effects.extend(free.send(Msg::Tick));
    assert_eq!(runs(&effects).len(), 2);
    assert!(effects
        .iter()
        .all(|e| !matches!(e, Effect::Run(item) if item.activate_by.is_some())));
}

#[test]
fn a_run_that_outlasts_its_window_is_held_until_the_next_opening() {
    let mut rig = Rig::new();
    let mut started = runs(&rig.deploy("r1", midnight_to_one(), &[]));
    started.extend(rig.tick());
    assert_eq!(started.len(), 2);
    // web-1 converges in time; web-2's build and copy outlast the window.
    rig.advance(Duration::from_secs(1800));
    rig.converged("web-1");
    rig.advance(Duration::from_secs(3600));
    let effects = rig.done("web-2", Outcome::WindowClosed);
    assert!(runs(&effects).is_empty(), "{effects:?}");
    assert_eq!(rig.phase("web-2"), Some(Phase::Pending));
    let held = rig
        .log
        .iter()
        .find(|e| e.reason == Reason::WindowClosed && e.host.is_some())
        .expect("a host event");
    assert!(
        held.message.contains("nothing was activated"),
        "{}",
        held.message
    );
    assert_eq!(held.event_type, crate::event::EventType::Normal);
    // Not a failure: no backoff, no failed revision.
    let status = &rig.state.status.hosts["web-2"];
    assert_eq!(
        (status.failures, status.failed_revision.as_ref()),
        (0, None)
    );
    // Handed out again, it is held by the closed windows, said once for the
    // fleet, until the next opening.
    assert!(rig.tick().is_empty());
    let closed = rig
        .log
        .iter()
        .find(|e| e.reason == Reason::WindowClosed && e.host.is_none())
        .expect("the fleet's event");
    assert!(
        closed.message.contains("until 1970-01-02T00:00:00Z"),
        "{}",
        closed.message
    );
    assert_eq!(
        rig.state.next_dispatch(),
        Some(rig.at + Duration::from_secs(24 * 3600 - 5400))
    );
    rig.advance(Duration::from_secs(24 * 3600 - 5400));
    assert_eq!(rig.tick(), ["web-2"]);
}
