//! End-to-end tests of the rollout policy against sandbox fleets: waves in
//! order, a failing canary halting the rest, `dependsOn`.

use std::time::Duration;

use cim_sandbox::harness::{fleet_and_state as fleet, Cim};

#[test]
fn waves_roll_out_in_order_and_a_failing_canary_halts_the_rest() {
    let (fleet, dir) = fleet(3);
    let host = |name: &str, role: &str| {
        format!(
            "apiVersion: cim/v1\nkind: Host\nmetadata:\n  name: {name}\n  labels: {{role: {role}}}\nspec:\n  address: {}\n",
            fleet.host(name).address
        )
    };
    let specs = format!(
        "apiVersion: cim/v1\nkind: Fleet\nmetadata: {{name: sandbox}}\nspec:\n  maxFailures: 1\n  waves:\n    - {{name: canary, selector: {{role: canary}}}}\n    - {{name: web, selector: {{role: web}}}}\n---\n{}---\n{}---\n{}",
        host("web-1", "canary"),
        host("web-2", "web"),
        host("web-3", "web")
    );
    fleet.write("specs/fleet.yaml", &specs).unwrap();
    let rev1 = fleet.commit("waves").unwrap();
    let cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_converged(&["web-1", "web-2", "web-3"], Some(&rev1));
    let seq = |host: &str, reason: &str| cim.events_of(host, reason)[0]["seq"].as_u64().unwrap();
    assert!(
        seq("web-2", "CopyStarted") > seq("web-1", "Converged"),
        "web wave started before the canary converged"
    );
    let waves: Vec<String> = cim
        .events()
        .iter()
        .filter(|e| e["reason"] == "WaveStarted")
        .map(|e| e["wave"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(waves, ["canary", "web"]);

    // A revision whose canary fails: the web wave is never touched.
    fleet
        .set_host_config("web-1", "{ version = 2; activationExitCode = 1; }")
        .unwrap();
    fleet.set_host_config("web-2", "{ version = 2; }").unwrap();
    fleet.set_host_config("web-3", "{ version = 2; }").unwrap();
    let rev2 = fleet.commit("version 2, broken canary").unwrap();
    let status = cim.wait_until("the rollout to halt", Duration::from_secs(60), |s| {
        s["rollout"]["halted"] == true && s["rollout"]["revision"] == rev2.as_str()
    });
    assert_eq!(status["rollout"]["failed"], 1);
    assert_eq!(status["rollout"]["pending"], 2);
    let halted: Vec<_> = cim
        .events()
        .into_iter()
        .filter(|e| e["reason"] == "RolloutHalted")
        .collect();
    assert_eq!(halted.len(), 1);
    assert!(halted[0]["message"].as_str().unwrap().contains("web-1"));
    std::thread::sleep(Duration::from_secs(3));
    for h in ["web-2", "web-3"] {
        assert_eq!(fleet.activations(h).len(), 1, "{h} was touched");
        assert!(fleet.current_system(h).unwrap().ends_with("-1"));
    }
    let table = String::from_utf8_lossy(&cim.cli(&["status"]).stdout).to_string();
    assert!(table.contains("HALTED"), "{table}");

    // A fixed revision rolls out through both waves.
    fleet.set_host_config("web-1", "{ version = 3; }").unwrap();
    fleet.set_host_config("web-2", "{ version = 3; }").unwrap();
    fleet.set_host_config("web-3", "{ version = 3; }").unwrap();
    let rev3 = fleet.commit("version 3").unwrap();
    let status = cim.wait_converged(&["web-1", "web-2", "web-3"], Some(&rev3));
    assert_eq!(status["rollout"]["halted"], false);
    assert_eq!(status["rollout"]["done"], 3);
}

#[test]
fn a_host_waits_for_the_hosts_it_depends_on() {
    let (fleet, dir) = fleet(3);
    fleet
        .set_host_config("web-1", "{ version = 1; activationDelay = 2; }")
        .unwrap();
    fleet
        .write_host_specs(&[
            ("web-1", ""),
            ("web-2", "  dependsOn:\n    - {host: web-1}\n"),
            ("web-3", ""),
        ])
        .unwrap();
    let rev = fleet.commit("web-2 depends on web-1").unwrap();
    let cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_converged(&["web-1", "web-2", "web-3"], Some(&rev));
    let seq = |host: &str, reason: &str| cim.events_of(host, reason)[0]["seq"].as_u64().unwrap();
    assert!(
        seq("web-2", "CopyStarted") > seq("web-1", "Converged"),
        "web-2 did not wait for web-1"
    );
    assert!(
        seq("web-3", "CopyStarted") < seq("web-1", "Converged"),
        "web-3 waited for nothing"
    );
}
