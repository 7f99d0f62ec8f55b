//! End-to-end tests of reboots on the sandbox fleet, whose hosts reboot
//! faithfully (every process ends, `/run` is emptied, the system profile
//! is booted, sshd comes back after a delay): a kernel change reboots a
//! `reboot: auto` host and checks what it booted, a `reboot: never` host
//! is switched and told to need a reboot, `cim reboot` reboots by hand, and
//! a host that never comes back fails with `RebootTimedOut`.

use std::time::Duration;

use cim_sandbox::harness::{fleet_and_state as fleet, Cim};
use serde_json::Value;

fn reasons_of(cim: &Cim, host: &str) -> Vec<String> {
    cim.events()
        .iter()
        .filter(|e| e["host"] == host)
        .filter_map(|e| e["reason"].as_str().map(str::to_string))
        .collect()
}

/// Reboots `host` with `cim reboot` and waits until it is back.
fn reboot_by_hand(cim: &Cim, host: &str) {
    let before = cim.events_of(host, "Rebooted").len();
    let out = cim.cli(&["reboot", host]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cim.wait_until(&format!("{host} rebooted"), Duration::from_secs(60), |_| {
        cim.events_of(host, "Rebooted").len() > before
    });
}

#[test]
fn a_kernel_change_reboots_auto_hosts_and_is_said_of_the_others() {
    let (fleet, dir) = fleet(2);
    let specs = format!(
        "{}  reboot: auto\n  rebootTimeout: 60s\n---\n{}",
        cim_sandbox::host_spec("web-1", &fleet.host("web-1").address, ""),
        cim_sandbox::host_spec("web-2", &fleet.host("web-2").address, "")
    );
    fleet.write("specs/fleet.yaml", &specs).unwrap();
    let first = fleet.commit("web-1 reboots by itself").unwrap();
    let cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_converged(&["web-1", "web-2"], Some(&first));
    // The sandbox hosts start with no booted system: boot them once.
    for host in ["web-1", "web-2"] {
        reboot_by_hand(&cim, host);
        assert_eq!(fleet.booted_system(host), fleet.current_system(host));
    }
    cim.wait_converged(&["web-1", "web-2"], Some(&first));

    for host in ["web-1", "web-2"] {
        fleet
            .set_host_config(host, r#"{ version = 2; kernel = "6.6"; }"#)
            .unwrap();
    }
    let revision = fleet.commit("linux 6.6").unwrap();
    let status = cim.wait_converged(&["web-1", "web-2"], Some(&revision));

    // web-1 booted its new system, and runs it.
    let web1 = cim_sandbox::harness::host_of(&status, "web-1");
    let desired = web1["currentSystem"].as_str().unwrap().to_string();
    assert_eq!(
        fleet.booted_system("web-1").as_deref(),
        Some(desired.as_str())
    );
    assert_eq!(
        fleet.current_system("web-1").as_deref(),
        Some(desired.as_str())
    );
    // (The record of its `boot` went with /run at the reboot.)
    let reasons = reasons_of(&cim, "web-1");
    let at = |r: &str| {
        reasons
            .iter()
            .rposition(|x| x == r)
            .unwrap_or_else(|| panic!("no {r} in {reasons:?}"))
    };
    assert!(at("RebootRequired") < at("Rebooting"));
    assert!(at("Rebooting") < at("Rebooted"));
    assert!(at("Rebooted") < at("Converged"));
    assert!(web1["rebootRequired"].is_null(), "{web1:#}");

    // web-2 (reboot: never) was switched, and needs a reboot to run it.
    let web2 = cim_sandbox::harness::host_of(&status, "web-2");
    let web2_system = web2["currentSystem"].as_str().unwrap().to_string();
    assert_ne!(
        fleet.booted_system("web-2").as_deref(),
        Some(web2_system.as_str())
    );
    let required = web2["rebootRequired"].as_str().unwrap_or_default();
    assert!(
        required.contains("kernel, initrd, kernel-modules changed"),
        "{web2:#}"
    );
    let out = cim.cli(&["status", "web-2"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Reboot required:"));
    reboot_by_hand(&cim, "web-2");
    assert_eq!(
        fleet.booted_system("web-2").as_deref(),
        Some(web2_system.as_str())
    );
    let web2: Value = cim.host("web-2");
    assert!(web2["rebootRequired"].is_null(), "{web2:#}");
}

#[test]
fn a_host_that_never_comes_back_fails_with_reboot_timed_out() {
    let (fleet, dir) = fleet(1);
    let specs = cim_sandbox::host_spec("web-1", &fleet.host("web-1").address, "")
        + "  reboot: auto\n  rebootTimeout: 8s\n";
    fleet.write("specs/fleet.yaml", &specs).unwrap();
    let first = fleet.commit("web-1 reboots by itself").unwrap();
    let cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_converged(&["web-1"], Some(&first));
    reboot_by_hand(&cim, "web-1");

    fleet.set_boot_delay("web-1", 3600).unwrap();
    fleet
        .set_host_config("web-1", r#"{ version = 2; kernel = "6.6"; }"#)
        .unwrap();
    fleet
        .commit("linux 6.6 on a host that hangs at boot")
        .unwrap();
    cim.wait_until("web-1 failed", Duration::from_secs(90), |s| {
        cim_sandbox::harness::host_of(s, "web-1")["phase"] == "Failed"
    });
    let timed_out = cim.events_of("web-1", "RebootTimedOut");
    let message = timed_out[0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("did not come back within 8s"), "{message}");
    assert_eq!(timed_out[0]["type"], "Warning");
}
