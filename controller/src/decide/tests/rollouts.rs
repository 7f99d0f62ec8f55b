//! Rollout policies: waves in order, `dependsOn`, and a failure budget
//! that halts the rollout until `cim reconcile --all`. The rig is
//! `decide/tests.rs`'s.

use super::*;

#[test]
fn waves_run_in_order() {
    let policy = "  waves:\n    - {name: canary, selector: {role: canary}}\n";
    let mut rig = Rig::new();
    rig.deploy(
        "r1",
        fleet(policy, &[("canary-1", ""), ("web-1", ""), ("web-2", "")]),
        &[],
    );
    assert_eq!(rig.tick(), ["canary-1"], "later waves wait");
    rig.converged("canary-1");
    // The rollout moves on at the group's dispatch.
    assert_eq!(rig.tick(), ["web-1", "web-2"]);
    assert_eq!(
        rig.log.last().unwrap().message,
        "wave 2 of 2: rest (web-1, web-2)"
    );
}

#[test]
fn a_host_waits_for_what_it_depends_on() {
    let mut rig = Rig::new();
    rig.deploy(
        "r1",
        fleet(
            "",
            &[
                ("db-1", ""),
                ("web-1", "  dependsOn:\n    - {host: db-1}\n"),
            ],
        ),
        &[],
    );
    assert_eq!(rig.tick(), ["db-1"]);
    rig.converged("db-1");
    assert_eq!(rig.tick(), ["web-1"]);
}

#[test]
fn a_spent_failure_budget_halts_the_rollout_until_reconcile_all() {
    let policy = "  maxParallel: 1\n  maxFailures: 1\n";
    let mut rig = Rig::new();
    rig.deploy(
        "r1",
        fleet(policy, &[("web-1", ""), ("web-2", ""), ("web-3", "")]),
        &[],
    );
    assert_eq!(rig.tick(), ["web-1"]);
    rig.converged("web-1");
    assert_eq!(rig.tick(), ["web-2"]);
    rig.done(
        "web-2",
        Outcome::BuildFailed {
            message: "boom".into(),
        },
    );
    assert!(rig.tick().is_empty(), "web-3 is not touched");
    assert_eq!(rig.log.last().unwrap().reason, Reason::RolloutHalted);
    let (answer, effects) = rig.ask(Ask::Reconcile {
        host: None,
        selector: None,
        force_window: false,
    });
    assert!(answer.is_ok());
    assert!(matches!(effects[0], Effect::Fetch));
    assert!(rig.reasons().contains(&"RolloutResumed".to_string()));
}
