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
    let mut started = runs(&effects);
    started.extend(rig.tick());
    assert_eq!(started, ["web-1"]);
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
