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

#[test]
fn rollouts_are_recorded_as_git_notes_and_pushed() {
    let (fleet, dir) = fleet(2);
    let cim = Cim::start(
        &fleet,
        &dir.path().join("state"),
        &["--write-notes", "--push-notes"],
    );
    cim.wait_converged(&["web-1", "web-2"], None);
    fleet.set_host_config("web-1", "{ version = 2; }").unwrap();
    let revision = fleet.commit("web-1: version 2").unwrap();
    cim.wait_converged(&["web-1", "web-2"], Some(&revision));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let note = loop {
        let note = fleet
            .git(&["log", "--notes=cim", "-1", "--format=%N", &revision])
            .unwrap_or_default();
        if note.contains("web-1: Converged") || std::time::Instant::now() > deadline {
            break note;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(note.contains("RolloutCompleted"), "{note}");
    assert!(note.contains("web-1: Converged /nix/store/"), "{note}");
    assert!(note.contains("web-2: Converged"), "{note}");
    // The branch itself is untouched.
    assert_eq!(fleet.head().unwrap(), revision);
}

#[test]
fn a_wave_with_manual_approval_waits_for_cim_approve() {
    let (fleet, dir) = fleet(2);
    let canary = cim_sandbox::host_spec("web-1", &fleet.host("web-1").address, "")
        .replace("{role: web}", "{role: canary}");
    let specs = format!(
        "apiVersion: cim/v1\nkind: Fleet\nmetadata: {{name: fleet}}\nspec:\n  waves:\n    - {{name: canary, selector: {{role: canary}}}}\n    - {{name: prod, selector: {{role: web}}, approval: manual}}\n---\n{canary}---\n{}",
        cim_sandbox::host_spec("web-2", &fleet.host("web-2").address, "")
    );
    fleet.write("specs/fleet.yaml", &specs).unwrap();
    let revision = fleet.commit("prod waits for an approval").unwrap();
    let cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_converged(&["web-1"], Some(&revision));
    cim.wait_until(
        "the approval asked for",
        std::time::Duration::from_secs(30),
        |_| {
            cim.events()
                .iter()
                .any(|e| e["reason"] == "ApprovalRequired")
        },
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(
        fleet.activations("web-2").is_empty(),
        "prod went ahead unapproved"
    );
    let out = cim.cli(&["approve", &revision[..12]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("wave prod"));
    cim.wait_converged(&["web-1", "web-2"], Some(&revision));
}
