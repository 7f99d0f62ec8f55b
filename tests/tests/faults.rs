//! Fault injection against the real `cim` binary and a sandbox fleet: the
//! controller SIGKILLed while building and while copying, a host's sshd
//! killed mid-copy, a host's link cut mid-rollout. After each, the fleet must
//! converge with no host activated twice and the event log gap-free.

use std::time::Duration;

use cim_sandbox::harness::{host_of, Cim};
use cim_sandbox::Fleet;

fn fleet(n: usize) -> (Fleet, tempfile::TempDir) {
    cim_sandbox::harness::fleet_and_state(n)
}

/// Every host converged, on the system it reports, activated exactly once.
fn assert_converged_once(fleet: &Fleet, cim: &Cim, hosts: &[&str]) {
    let status = cim.status();
    for h in hosts {
        let on_host = fleet
            .current_system(h)
            .unwrap_or_else(|| panic!("{h} runs nothing"));
        assert_eq!(
            host_of(&status, h)["currentSystem"],
            on_host.as_str(),
            "{h}"
        );
        assert_eq!(
            fleet.profile_system(h).as_deref(),
            Some(on_host.as_str()),
            "{h} half-switched"
        );
        assert_eq!(
            fleet.activations(h),
            vec![format!("switch {on_host}")],
            "{h}"
        );
    }
}

#[test]
fn controller_killed_while_building() {
    let (fleet, dir) = fleet(2);
    let nonce = format!("{}-{:?}", std::process::id(), std::time::SystemTime::now());
    fleet
        .set_host_config(
            "web-1",
            &format!("{{ version = 1; buildDelay = 4; nonce = \"{nonce}\"; }}"),
        )
        .unwrap();
    let rev = fleet.commit("slow build").unwrap();
    let mut cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_until("the build to start", Duration::from_secs(30), |s| {
        host_of(s, "web-1")["phase"] == "Building"
    });
    cim.kill();
    cim.restart();
    cim.wait_converged(&["web-1", "web-2"], Some(&rev));
    assert_converged_once(&fleet, &cim, &["web-1", "web-2"]);
    cim.assert_gap_free();
}

#[test]
fn controller_killed_while_copying() {
    let (fleet, dir) = fleet(2);
    fleet
        .set_host_config("web-1", "{ version = 1; payloadKiB = 3072; }")
        .unwrap();
    fleet.throttle("web-1", "2mbit").unwrap();
    let rev = fleet.commit("a large closure over a slow link").unwrap();
    let mut cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_until("the copy to start", Duration::from_secs(30), |s| {
        host_of(s, "web-1")["phase"] == "Copying"
    });
    std::thread::sleep(Duration::from_millis(500));
    cim.kill();
    fleet.unthrottle("web-1").unwrap();
    cim.restart();
    cim.wait_converged(&["web-1", "web-2"], Some(&rev));
    assert_converged_once(&fleet, &cim, &["web-1", "web-2"]);
    cim.assert_gap_free();
}

#[test]
fn sshd_killed_mid_copy() {
    let (fleet, dir) = fleet(2);
    fleet
        .set_host_config("web-1", "{ version = 1; payloadKiB = 3072; }")
        .unwrap();
    fleet.throttle("web-1", "2mbit").unwrap();
    let rev = fleet.commit("a large closure over a slow link").unwrap();
    let cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_until("the copy to start", Duration::from_secs(30), |s| {
        host_of(s, "web-1")["phase"] == "Copying"
    });
    std::thread::sleep(Duration::from_millis(500));
    fleet.kill_sshd("web-1").unwrap();
    let status = cim.wait_until("the copy to fail", Duration::from_secs(60), |s| {
        host_of(s, "web-1")["phase"] == "Failed"
    });
    let web1 = host_of(&status, "web-1");
    assert!(
        web1["nextRetry"].is_string(),
        "a failed copy is retried: {web1}"
    );
    assert!(
        !cim.events_of("web-1", "CopyFailed").is_empty()
            || !cim.events_of("web-1", "HostUnreachable").is_empty()
    );
    assert!(fleet.activations("web-1").is_empty());

    fleet.unthrottle("web-1").unwrap();
    fleet.start_sshd("web-1").unwrap();
    cim.wait_converged(&["web-1", "web-2"], Some(&rev));
    assert_converged_once(&fleet, &cim, &["web-1", "web-2"]);
    cim.assert_gap_free();
}

#[test]
fn link_down_mid_rollout_then_restored() {
    let (fleet, dir) = fleet(3);
    fleet
        .set_host_config("web-1", "{ version = 1; payloadKiB = 3072; }")
        .unwrap();
    fleet.throttle("web-1", "2mbit").unwrap();
    let rev = fleet.commit("a large closure over a slow link").unwrap();
    let cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_until("the copy to start", Duration::from_secs(30), |s| {
        host_of(s, "web-1")["phase"] == "Copying"
    });
    fleet.set_link("web-1", false).unwrap();
    // The other hosts are not held up by the one that went dark.
    cim.wait_converged(&["web-2", "web-3"], Some(&rev));
    cim.wait_until("web-1 to fail", Duration::from_secs(90), |s| {
        host_of(s, "web-1")["phase"] == "Failed"
    });
    assert!(fleet.activations("web-1").is_empty());

    fleet.unthrottle("web-1").unwrap();
    fleet.set_link("web-1", true).unwrap();
    cim.wait_converged(&["web-1", "web-2", "web-3"], Some(&rev));
    assert_converged_once(&fleet, &cim, &["web-1", "web-2", "web-3"]);
    cim.assert_gap_free();
}

#[test]
fn cim_rollback_during_an_activation_waits_for_it_then_rolls_back() {
    let (fleet, dir) = fleet(1);
    let cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_converged(&["web-1"], None);
    let v1 = fleet.current_system("web-1").unwrap();
    fleet
        .set_host_config("web-1", "{ version = 2; activationDelay = 3; }")
        .unwrap();
    fleet.commit("slow version 2").unwrap();
    cim.wait_until("the activation to start", Duration::from_secs(30), |s| {
        host_of(s, "web-1")["phase"] == "Activating"
    });
    let out = cim.cli(&["rollback", "web-1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("as soon as its current reconcile ends"));
    assert_eq!(cim.host("web-1")["phase"], "Suspended");
    cim.wait_until("the rollback", Duration::from_secs(60), |_| {
        !cim.events_of("web-1", "RolledBack").is_empty()
    });
    assert_eq!(fleet.current_system("web-1").as_deref(), Some(v1.as_str()));
    let acts = fleet.activations("web-1");
    assert_eq!(acts.len(), 3, "v1, v2, then back to v1: {acts:?}");
    assert_eq!(cim.host("web-1")["phase"], "Suspended");
    cim.assert_gap_free();
}

#[test]
fn sshd_killed_mid_activation_makes_the_host_revert_itself() {
    let (fleet, dir) = fleet(2);
    let specs = format!(
        "{}---\n{}",
        cim_sandbox::host_spec(
            "web-1",
            &fleet.host("web-1").address,
            "  rollout:\n    confirmTimeout: 3s\n"
        ),
        cim_sandbox::host_spec("web-2", &fleet.host("web-2").address, "")
    );
    fleet.write("specs/fleet.yaml", &specs).unwrap();
    fleet.commit("web-1 confirms within 3s").unwrap();
    let cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_converged(&["web-1", "web-2"], None);
    let v1 = fleet.current_system("web-1").unwrap();

    fleet
        .set_host_config("web-1", "{ version = 2; activationDelay = 2; }")
        .unwrap();
    let rev = fleet.commit("slow version 2").unwrap();
    cim.wait_until("web-1's watchdog to start", Duration::from_secs(30), |_| {
        fleet.watchdog_pending("web-1")
    });
    fleet.kill_sshd("web-1").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    fleet.start_sshd("web-1").unwrap();

    cim.wait_until(
        "the unconfirmed activation to be reverted",
        Duration::from_secs(90),
        |_| {
            !cim.events_of("web-1", "RolledBack").is_empty()
                || !cim.events_of("web-1", "RollbackFailed").is_empty()
        },
    );
    assert_eq!(cim.events_of("web-1", "ConfirmationTimedOut").len(), 1);
    assert_eq!(
        cim.events_of("web-1", "RolledBack")[0]["system"],
        v1.as_str()
    );
    assert_eq!(fleet.current_system("web-1").as_deref(), Some(v1.as_str()));
    assert_eq!(
        fleet.profile_system("web-1").as_deref(),
        Some(v1.as_str()),
        "half-switched"
    );
    let web1 = cim.host("web-1");
    assert_eq!(web1["phase"], "Failed");
    assert_eq!(web1["failedRevision"], rev.as_str());
    assert_eq!(cim.host("web-2")["phase"], "Converged");
    cim.assert_gap_free();

    // The operator retries once the cause is understood.
    assert!(cim.cli(&["reconcile", "web-1"]).status.success());
    cim.wait_converged(&["web-1"], Some(&rev));
    assert!(fleet
        .current_system("web-1")
        .unwrap()
        .ends_with("nixos-system-web-1-2"));
}

#[test]
fn an_adopted_activation_is_still_health_checked() {
    let (fleet, dir) = fleet(1);
    let extra = "  healthChecks:\n    - {name: health-file, command: [grep, -q, ok, /run/cim-health], retries: 1}\n";
    fleet
        .write(
            "specs/fleet.yaml",
            &cim_sandbox::host_spec("web-1", &fleet.host("web-1").address, extra),
        )
        .unwrap();
    fleet.commit("health-checked").unwrap();
    let mut cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_converged(&["web-1"], None);
    let v1 = fleet.current_system("web-1").unwrap();

    fleet
        .set_host_config(
            "web-1",
            "{ version = 2; activationDelay = 3; healthy = false; }",
        )
        .unwrap();
    let rev = fleet.commit("slow, unhealthy version 2").unwrap();
    cim.wait_until("web-1's watchdog to start", Duration::from_secs(30), |_| {
        fleet.watchdog_pending("web-1")
    });
    cim.kill();
    cim.restart();
    cim.wait_until(
        "the adopted activation to be rolled back",
        Duration::from_secs(60),
        |_| !cim.events_of("web-1", "RolledBack").is_empty(),
    );
    assert_eq!(cim.events_of("web-1", "HealthCheckFailed").len(), 1);
    assert_eq!(fleet.current_system("web-1").as_deref(), Some(v1.as_str()));
    assert_eq!(fleet.profile_system("web-1").as_deref(), Some(v1.as_str()));
    assert_eq!(cim.host("web-1")["failedRevision"], rev.as_str());
    cim.assert_gap_free();
}

#[test]
fn controller_killed_while_waiting_for_confirmation() {
    let (fleet, dir) = fleet(1);
    let mut cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_converged(&["web-1"], None);
    let v1 = fleet.current_system("web-1").unwrap();

    fleet
        .set_host_config("web-1", "{ version = 2; activationDelay = 1; }")
        .unwrap();
    let rev = fleet.commit("version 2").unwrap();
    cim.wait_until("web-1's watchdog to start", Duration::from_secs(30), |_| {
        fleet.watchdog_pending("web-1")
    });
    // New connections now hang, so the controller cannot confirm...
    fleet.pause_sshd_listener("web-1", true).unwrap();
    cim.wait_until(
        "the activation to finish unconfirmed",
        Duration::from_secs(30),
        |_| fleet.watchdog_awaiting_confirmation("web-1"),
    );
    // ...and dies while it waits.
    cim.kill();
    fleet.pause_sshd_listener("web-1", false).unwrap();
    cim.restart();
    cim.wait_converged(&["web-1"], Some(&rev));
    let v2 = fleet.current_system("web-1").unwrap();
    assert!(v2.ends_with("nixos-system-web-1-2"), "{v2}");
    assert_eq!(
        fleet.activations("web-1"),
        vec![format!("switch {v1}"), format!("switch {v2}")]
    );
    assert!(
        !fleet.watchdog_pending("web-1"),
        "the restarted controller confirmed it"
    );
    for reason in ["ConfirmationTimedOut", "RolledBack"] {
        assert!(cim.events_of("web-1", reason).is_empty(), "{reason}");
    }
    cim.assert_gap_free();
}
