//! End-to-end tests of activations that go wrong and how hosts are put
//! back: a failed activation held and rolled back, a system that cuts the
//! network reverting itself, a controller killed mid-activation, `cim
//! rollback`, a failing health check. Real `cim`, nix and sshd against a
//! sandbox fleet per test.

use std::time::Duration;

use cim_sandbox::harness::{current_system, host_of, Cim};
use cim_sandbox::Fleet;

fn fleet(n: usize) -> (Fleet, tempfile::TempDir) {
    cim_sandbox::harness::fleet_and_state(n)
}

fn state(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("state")
}

#[test]
fn a_failing_first_activation_is_held_until_asked_again() {
    let (fleet, dir) = fleet(3);
    fleet
        .set_host_config("web-3", "{ version = 1; activationExitCode = 1; }")
        .unwrap();
    let rev = fleet.commit("web-3 fails to activate").unwrap();
    let cim = Cim::start(&fleet, &state(&dir), &["--resync-interval", "1s"]);
    cim.wait_converged(&["web-1", "web-2"], Some(&rev));
    let status = cim.wait_until("web-3 to fail", Duration::from_secs(60), |s| {
        host_of(s, "web-3")["phase"] == "Failed"
    });
    let web3 = host_of(&status, "web-3");
    assert_eq!(web3["failedRevision"], rev.as_str());
    assert!(web3["nextRetry"].is_null(), "{web3}");
    let failed = cim.events_of("web-3", "ActivationFailed");
    let msg = failed[0]["message"].as_str().unwrap();
    assert!(msg.contains("exited with 1"), "{msg}");
    assert!(
        msg.contains("simulated activation failure of web-3"),
        "{msg}"
    );
    assert!(msg.contains("no previous system"), "{msg}");
    assert!(fleet.current_system("web-3").is_none());

    // Held: resyncs do not retry the same revision...
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(cim.events_of("web-3", "ActivationFailed").len(), 1);
    assert_eq!(fleet.activations("web-3").len(), 1);
    // ...until an operator asks.
    assert!(cim.cli(&["reconcile", "web-3"]).status.success());
    cim.wait_until("a second attempt", Duration::from_secs(30), |_| {
        cim.events_of("web-3", "ActivationFailed").len() == 2
    });
}

#[test]
fn a_failing_activation_is_rolled_back_to_the_previous_system() {
    let (fleet, dir) = fleet(2);
    let cim = Cim::start(&fleet, &state(&dir), &["--resync-interval", "1s"]);
    let status = cim.wait_converged(&["web-1", "web-2"], None);
    let old = current_system(&status, "web-2");

    fleet
        .set_host_config("web-2", "{ version = 2; activationExitCode = 1; }")
        .unwrap();
    let bad = fleet.commit("web-2: broken version 2").unwrap();
    cim.wait_until("web-2 rolled back", Duration::from_secs(60), |_| {
        !cim.events_of("web-2", "RolledBack").is_empty()
    });
    let rolled = &cim.events_of("web-2", "RolledBack")[0];
    assert_eq!(rolled["system"], old.as_str());
    assert_eq!(rolled["revision"], bad.as_str());
    let msg = rolled["message"].as_str().unwrap();
    assert!(
        msg.contains(&old) && msg.contains("nixos-system-web-2-2"),
        "{msg}"
    );

    // Verified on the host: running system, boot profile and activations.
    assert_eq!(fleet.current_system("web-2").as_deref(), Some(old.as_str()));
    assert_eq!(fleet.profile_system("web-2").as_deref(), Some(old.as_str()));
    let acts = fleet.activations("web-2");
    assert_eq!(acts.len(), 3, "{acts:?}");
    assert!(acts[1].ends_with("nixos-system-web-2-2"), "{acts:?}");
    assert_eq!(acts[2], format!("switch {old}"));
    let web2 = cim.host("web-2");
    assert_eq!(web2["phase"], "Failed");
    assert_eq!(web2["currentSystem"], old.as_str());
    assert_eq!(web2["failedRevision"], bad.as_str());

    // Not retried for the same revision; a fixed revision goes through.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(fleet.activations("web-2").len(), 3);
    fleet.set_host_config("web-2", "{ version = 3; }").unwrap();
    let fixed = fleet.commit("web-2: version 3").unwrap();
    cim.wait_converged(&["web-1", "web-2"], Some(&fixed));
    assert!(fleet
        .current_system("web-2")
        .unwrap()
        .ends_with("nixos-system-web-2-3"));
    assert!(cim.host("web-2")["failedRevision"].is_null());
}

#[test]
fn a_system_that_cuts_the_network_reverts_itself() {
    let (fleet, dir) = fleet(2);
    fleet
        .write_host_specs(&[
            ("web-1", ""),
            ("web-2", "  rollout:\n    confirmTimeout: 3s\n"),
        ])
        .unwrap();
    fleet.commit("web-2 confirms within 3s").unwrap();
    let cim = Cim::start(&fleet, &state(&dir), &["--resync-interval", "2s"]);
    let status = cim.wait_converged(&["web-1", "web-2"], None);
    let old = current_system(&status, "web-2");

    fleet
        .set_host_config("web-2", "{ version = 2; breakNetwork = true; }")
        .unwrap();
    let bad = fleet
        .commit("web-2: a system that takes eth0 down")
        .unwrap();
    cim.wait_until("web-2 to revert", Duration::from_secs(90), |_| {
        !cim.events_of("web-2", "RolledBack").is_empty()
            || !cim.events_of("web-2", "RollbackFailed").is_empty()
    });
    let timed_out = cim.events_of("web-2", "ConfirmationTimedOut");
    assert_eq!(timed_out.len(), 1);
    assert_eq!(timed_out[0]["type"], "Warning");
    let rolled = &cim.events_of("web-2", "RolledBack")[0];
    assert_eq!(rolled["system"], old.as_str());
    assert_eq!(rolled["revision"], bad.as_str());

    // On the host: back on the old system, and reachable again.
    assert_eq!(fleet.current_system("web-2").as_deref(), Some(old.as_str()));
    assert_eq!(fleet.profile_system("web-2").as_deref(), Some(old.as_str()));
    let acts = fleet.activations("web-2");
    assert!(
        acts.last().unwrap().ends_with(&old)
            && acts[acts.len() - 2].ends_with("nixos-system-web-2-2"),
        "{acts:?}"
    );
    let web2 = cim.host("web-2");
    assert_eq!(web2["phase"], "Failed");
    assert_eq!(web2["failedRevision"], bad.as_str());

    // Held: the resync neither retries nor calls it drift; web-1 is untouched.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(cim.events_of("web-2", "ConfirmationTimedOut").len(), 1);
    assert!(cim.events_of("web-2", "DriftDetected").is_empty());
    assert_eq!(fleet.activations("web-1").len(), 1);
    assert_eq!(cim.host("web-1")["phase"], "Converged");
}

#[test]
fn a_controller_killed_mid_activation_does_not_activate_twice() {
    let (fleet, dir) = fleet(2);
    fleet
        .write_host_specs(&[
            ("web-1", "  rollout:\n    confirmTimeout: 3s\n"),
            ("web-2", ""),
        ])
        .unwrap();
    fleet.commit("web-1 confirms within 3s").unwrap();
    let mut cim = Cim::start(&fleet, &state(&dir), &["--resync-interval", "2s"]);
    cim.wait_converged(&["web-1", "web-2"], None);
    let v1 = fleet.current_system("web-1").unwrap();

    fleet
        .set_host_config("web-1", "{ version = 2; activationDelay = 3; }")
        .unwrap();
    let rev = fleet.commit("web-1: slow version 2").unwrap();
    cim.wait_until(
        "web-1's watchdog to start on the host",
        Duration::from_secs(60),
        |_| fleet.watchdog_pending("web-1") && fleet.activations("web-1").len() == 1,
    );
    cim.kill();
    cim.restart();
    let status = cim.wait_converged(&["web-1", "web-2"], Some(&rev));
    let v2 = fleet.current_system("web-1").unwrap();
    assert!(v2.ends_with("nixos-system-web-1-2"), "{v2}");
    assert_eq!(host_of(&status, "web-1")["currentSystem"], v2.as_str());

    // Well past the confirm timeout: the restarted controller confirmed the
    // activation it inherited, so the host did not revert, and it was not
    // activated a second time.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(fleet.current_system("web-1").as_deref(), Some(v2.as_str()));
    assert_eq!(
        fleet.activations("web-1"),
        vec![format!("switch {v1}"), format!("switch {v2}")],
        "activated twice or reverted"
    );
    for reason in ["ConfirmationTimedOut", "RolledBack", "DriftDetected"] {
        assert!(cim.events_of("web-1", reason).is_empty(), "{reason}");
    }
    cim.assert_gap_free();
}

#[test]
fn cim_rollback_suspends_and_switches_to_the_previous_generation() {
    let (fleet, dir) = fleet(2);
    let cim = Cim::start(&fleet, &state(&dir), &["--resync-interval", "2s"]);
    cim.wait_converged(&["web-1", "web-2"], None);
    let v1 = fleet.current_system("web-1").unwrap();
    fleet.set_host_config("web-1", "{ version = 2; }").unwrap();
    let rev2 = fleet.commit("web-1: version 2").unwrap();
    cim.wait_converged(&["web-1", "web-2"], Some(&rev2));
    let v2 = fleet.current_system("web-1").unwrap();
    assert_ne!(v1, v2);

    let out = cim.cli(&["rollback", "web-1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cim.wait_until("the rollback to finish", Duration::from_secs(30), |_| {
        !cim.events_of("web-1", "RolledBack").is_empty()
    });
    assert_eq!(cim.events_of("web-1", "RollbackRequested").len(), 1);
    assert_eq!(
        cim.events_of("web-1", "RolledBack")[0]["system"],
        v1.as_str()
    );
    assert_eq!(fleet.current_system("web-1").as_deref(), Some(v1.as_str()));
    assert_eq!(fleet.profile_system("web-1").as_deref(), Some(v1.as_str()));
    let web1 = cim.host("web-1");
    assert_eq!(web1["phase"], "Suspended");
    assert_eq!(web1["currentSystem"], v1.as_str());
    assert_eq!(web1["operatorSuspended"], true);

    // Suspended: neither resync (drift) nor a new commit touches it.
    fleet.set_host_config("web-1", "{ version = 3; }").unwrap();
    fleet.set_host_config("web-2", "{ version = 3; }").unwrap();
    let rev3 = fleet.commit("version 3").unwrap();
    cim.wait_converged(&["web-2"], Some(&rev3));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(fleet.current_system("web-1").as_deref(), Some(v1.as_str()));
    assert!(cim.events_of("web-1", "DriftDetected").is_empty());
    let out = cim.cli(&["reconcile", "web-1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cim resume web-1"));

    // Resumed: it converges to the newest revision.
    let out = cim.cli(&["resume", "web-1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cim.wait_converged(&["web-1"], Some(&rev3));
    assert!(fleet
        .current_system("web-1")
        .unwrap()
        .ends_with("nixos-system-web-1-3"));
    assert_eq!(cim.host("web-1")["operatorSuspended"], false);
}

#[test]
fn a_failing_health_check_rolls_the_host_back() {
    let (fleet, dir) = fleet(2);
    let check = "  healthChecks:\n    - name: health-file\n      command: [grep, -q, ok, /run/cim-health]\n      retries: 2\n      interval: 500ms\n";
    fleet
        .write_host_specs(&[("web-1", check), ("web-2", "")])
        .unwrap();
    fleet.commit("web-1 is health-checked").unwrap();
    let cim = Cim::start(&fleet, &state(&dir), &[]);
    cim.wait_converged(&["web-1", "web-2"], None);
    assert_eq!(cim.events_of("web-1", "HealthChecksStarted").len(), 1);
    assert_eq!(
        cim.events_of("web-1", "HealthChecksStarted")[0]["toPhase"],
        "Verifying"
    );
    let v1 = fleet.current_system("web-1").unwrap();

    fleet
        .set_host_config("web-1", "{ version = 2; healthy = false; }")
        .unwrap();
    let bad = fleet.commit("web-1: an unhealthy version 2").unwrap();
    cim.wait_until("web-1 rolled back", Duration::from_secs(60), |_| {
        !cim.events_of("web-1", "RolledBack").is_empty()
    });
    let failed = cim.events_of("web-1", "HealthCheckFailed");
    assert_eq!(failed.len(), 1);
    let msg = failed[0]["message"].as_str().unwrap();
    assert!(msg.contains("health check `health-file` failed"), "{msg}");
    assert!(msg.contains("after 2 attempts"), "{msg}");
    assert_eq!(failed[0]["fromPhase"], "Verifying");
    assert_eq!(fleet.current_system("web-1").as_deref(), Some(v1.as_str()));
    let web1 = cim.host("web-1");
    assert_eq!(web1["phase"], "Failed");
    assert_eq!(web1["failedRevision"], bad.as_str());
    assert_eq!(web1["currentSystem"], v1.as_str());
}
