//! End-to-end tests of what a converged fleet costs: no process while
//! nothing changes, and nothing built or copied for hosts that already run
//! their systems.

use std::time::Duration;

use cim_sandbox::harness::{fleet_and_state as fleet, Cim};

#[test]
fn a_converged_fleet_at_rest_starts_no_process() {
    let (fleet, dir) = fleet(2);
    let cim = Cim::start(
        &fleet,
        &dir.path().join("state"),
        &["--resync-interval", "1h"],
    );
    cim.wait_converged(&["web-1", "web-2"], None);
    std::thread::sleep(Duration::from_millis(500));
    // Over several polls (every 2s here), with the work tree and the git
    // directory being read and written, but the branch not moving: no
    // fetch, no nix, no ssh.
    let trace = dir.path().join("strace");
    let mut strace = std::process::Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=execve", "-o"])
        .arg(&trace)
        .args(["-p", &cim.pid().to_string()])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("strace (scripts/setup installs it)");
    std::thread::sleep(Duration::from_millis(500));
    fleet.write("notes.txt", "not committed").unwrap();
    cim_sandbox::sh(
        "git",
        &["-C", fleet.repo.to_str().unwrap(), "status", "--short"],
    )
    .unwrap();
    cim_sandbox::sh("git", &["-C", fleet.repo.to_str().unwrap(), "log", "-1"]).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let _ = strace.kill();
    let _ = strace.wait();
    let execs: Vec<String> = std::fs::read_to_string(&trace)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("execve("))
        .map(str::to_string)
        .collect();
    assert!(
        execs.is_empty(),
        "an idle controller started processes: {execs:#?}"
    );
    // The branch moving is still noticed at once.
    let rev = fleet.commit("a real change").unwrap();
    cim.wait_until("the new head", Duration::from_secs(10), |s| {
        s["latestRevision"] == rev.as_str()
    });
}

#[test]
fn a_new_controller_on_a_converged_fleet_builds_and_copies_nothing() {
    let (fleet, dir) = fleet(2);
    let rev = fleet.commit("start").unwrap();
    let mut first = Cim::start(&fleet, &dir.path().join("state"), &[]);
    first.wait_converged(&["web-1", "web-2"], Some(&rev));
    first.kill();
    // A controller with a new state directory knows nothing of the hosts;
    // it evaluates, finds them running their systems, and leaves them be.
    let cim = Cim::start(&fleet, &dir.path().join("fresh"), &[]);
    cim.wait_converged(&["web-1", "web-2"], Some(&rev));
    for h in ["web-1", "web-2"] {
        let reasons: Vec<String> = cim
            .events()
            .iter()
            .filter(|e| e["host"] == h)
            .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(reasons, ["Converged"], "{h}");
        assert_eq!(fleet.activations(h).len(), 1, "{h} was activated again");
    }
}
