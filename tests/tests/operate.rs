//! End-to-end tests of day-to-day operation: hosts that stay healthy over
//! time (old generations deleted after each activation).

use cim_sandbox::harness::{fleet_and_state as fleet, Cim};

#[test]
fn old_system_generations_are_deleted_beyond_keep_generations() {
    let (fleet, dir) = fleet(1);
    let spec = cim_sandbox::host_spec(
        "web-1",
        &fleet.host("web-1").address,
        "  keepGenerations: 2\n",
    );
    fleet.write("specs/fleet.yaml", &spec).unwrap();
    let first = fleet.commit("web-1 keeps two generations").unwrap();
    let cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_converged(&["web-1"], Some(&first));
    for version in 2..=4 {
        fleet
            .set_host_config("web-1", &format!("{{ version = {version}; }}"))
            .unwrap();
        let revision = fleet.commit(&format!("version {version}")).unwrap();
        cim.wait_converged(&["web-1"], Some(&revision));
    }
    let profiles = fleet.host("web-1").root.join("nix/var/nix/profiles");
    let generations: Vec<String> = std::fs::read_dir(&profiles)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("system-") && n.ends_with("-link"))
        .collect();
    assert_eq!(generations.len(), 2, "{generations:?}");
    let pruned = cim.events_of("web-1", "GenerationsPruned");
    assert!(!pruned.is_empty());
    assert!(
        pruned[0]["message"]
            .as_str()
            .unwrap_or("")
            .contains("keeping the newest 2"),
        "{pruned:?}"
    );
    // The running system and the one before it are still there.
    assert!(fleet.current_system("web-1").is_some());
}
