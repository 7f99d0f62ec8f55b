//! End-to-end tests of deployment windows: a deny window holds a change
//! until it ends, `cim status` says so and when it opens, and `cim
//! reconcile --force-window` lets one host through, recorded; a build that
//! outlasts the allow window it started in is not activated after it.

use std::time::{Duration, Instant};

use cim_sandbox::harness::{fleet_and_state as fleet, Cim};
use time::OffsetDateTime;

/// Writes a `kind` window into the fleet's specs (not committed) that
/// opened a second ago and lasts `seconds` (cron with seconds, in UTC);
/// when it ends, by the wall clock and by this process's.
fn window_from_a_second_ago(
    fleet: &cim_sandbox::Fleet,
    kind: &str,
    seconds: i64,
) -> (OffsetDateTime, Instant) {
    let now = OffsetDateTime::now_utc();
    let opened = (now - time::Duration::seconds(1))
        .replace_nanosecond(0)
        .unwrap();
    let ends = opened + time::Duration::seconds(seconds);
    let ends_at = Instant::now() + Duration::try_from(ends - now).unwrap();
    let schedule = format!(
        "{} {} {} * * *",
        opened.second(),
        opened.minute(),
        opened.hour()
    );
    let hosts = std::fs::read_to_string(fleet.repo.join("specs/fleet.yaml")).unwrap();
    let specs = format!(
        "apiVersion: cim/v1\nkind: Fleet\nmetadata: {{name: fleet}}\nspec:\n  windows:\n    - {{kind: {kind}, schedule: '{schedule}', duration: {seconds}s, timeZone: UTC}}\n---\n{hosts}"
    );
    fleet.write("specs/fleet.yaml", &specs).unwrap();
    (ends, ends_at)
}

#[test]
fn a_deny_window_holds_activation_and_releases_it_on_time() {
    let (fleet, dir) = fleet(2);
    let cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_converged(&["web-1", "web-2"], None);

    // A deny window that opened a second ago and lasts 20s.
    let (ends, ends_at) = window_from_a_second_ago(&fleet, "deny", 20);
    fleet.set_host_config("web-1", "{ version = 2; }").unwrap();
    fleet.set_host_config("web-2", "{ version = 2; }").unwrap();
    let revision = fleet.commit("a change inside a change freeze").unwrap();

    let status = cim.wait_until("the window closed", Duration::from_secs(30), |s| {
        s["window"].is_string()
    });
    let window = status["window"].as_str().unwrap().to_string();
    assert!(window.contains("deny window"), "{window}");
    let until = ends
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert!(window.contains(&until), "{window} does not name {until}");
    let out = cim.cli(&["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("window:   CLOSED"));

    // An emergency goes through, on record.
    let out = cim.cli(&["reconcile", "web-2", "--force-window"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cim.wait_converged(&["web-2"], Some(&revision));
    assert!(!cim.events().iter().all(|e| e["reason"] != "WindowForced"));
    assert!(
        Instant::now() < ends_at,
        "too slow to tell the forced host from the window's end"
    );
    assert!(
        fleet.activations("web-1").len() == 1,
        "web-1 was activated inside the deny window: {:?}",
        fleet.activations("web-1")
    );

    cim.wait_converged(&["web-1"], Some(&revision));
    assert!(
        Instant::now() >= ends_at,
        "web-1 converged before the window ended"
    );
    let events = cim.events();
    let reasons: Vec<&str> = events.iter().filter_map(|e| e["reason"].as_str()).collect();
    let opened = reasons
        .iter()
        .position(|r| *r == "WindowOpened")
        .expect("WindowOpened");
    let closed = reasons
        .iter()
        .position(|r| *r == "WindowClosed")
        .expect("WindowClosed");
    assert!(closed < opened);
    assert!(cim.status()["window"].is_null());
}

#[test]
fn a_build_that_outlasts_its_window_is_not_activated_after_it() {
    let (fleet, dir) = fleet(1);
    let cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    let before = cim.wait_converged(&["web-1"], None);
    let running = cim_sandbox::harness::current_system(&before, "web-1");
    let activations = fleet.activations("web-1");

    // An allow window that opened a second ago and lasts 30s (time for a
    // busy machine to hand the host out inside it); the new system takes
    // 40s to build (a nonce: no store of an earlier run holds it).
    let (_, ends_at) = window_from_a_second_ago(&fleet, "allow", 30);
    let now = OffsetDateTime::now_utc();
    let nonce = format!("{}-{}", std::process::id(), now.unix_timestamp_nanos());
    fleet
        .set_host_config(
            "web-1",
            &format!("{{ version = 2; buildDelay = 40; nonce = \"{nonce}\"; }}"),
        )
        .unwrap();
    let revision = fleet.commit("a slow build late in the window").unwrap();

    let status = cim.wait_until(
        "web-1 held by the closed window",
        Duration::from_secs(120),
        |s| {
            cim_sandbox::harness::host_of(s, "web-1")["message"]
                .as_str()
                .is_some_and(|m| m.contains("nothing was activated"))
        },
    );
    assert!(Instant::now() >= ends_at, "held before the window closed");
    let host = cim_sandbox::harness::host_of(&status, "web-1");
    assert_eq!(host["phase"], "Pending", "{host:#}");
    assert_eq!(host["failures"], 0, "{host:#}");
    assert_eq!(
        cim_sandbox::harness::current_system(&status, "web-1"),
        running
    );
    // Started inside the window, stopped before activating, the host's
    // system untouched.
    let of_revision = |reason: &str| {
        cim.events_of("web-1", reason)
            .into_iter()
            .filter(|e| e["revision"] == revision.as_str())
            .count()
    };
    assert_eq!(of_revision("BuildStarted"), 1);
    assert_eq!(of_revision("CopySucceeded"), 1);
    assert_eq!(of_revision("ActivationStarted"), 0);
    assert_eq!(fleet.activations("web-1"), activations);
    // The fleet is said to be closed until tomorrow's opening.
    let status = cim.wait_until("the window closed", Duration::from_secs(10), |s| {
        s["window"].is_string()
    });
    let window = status["window"].as_str().unwrap();
    assert!(window.contains("outside allow window"), "{window}");
}
