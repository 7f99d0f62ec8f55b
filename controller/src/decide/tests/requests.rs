//! Operators' requests and the store's refusals: a rollback (after the
//! host's run, suspending it), requests about hosts the specs do not name,
//! and what the store refuses to record (a rollback, a revision), which is
//! not carried out until it takes writes. The rig is `decide/tests.rs`'s.

use super::*;

#[test]
fn a_rollback_suspends_the_host_and_rolls_it_back_once_its_run_ends() {
    let mut rig = Rig::new();
    rig.deploy("r1", fleet("", &[("web-1", "")]), &[]);
    assert_eq!(rig.tick(), ["web-1"]);
    let (answer, effects) = rig.ask(Ask::Rollback {
        host: "web-1".into(),
    });
    assert!(answer
        .unwrap()
        .contains("as soon as its current reconcile ends"));
    assert!(effects.is_empty(), "busy: the rollback waits");
    assert_eq!(rig.phase("web-1"), Some(Phase::Suspended));
    // The run in flight ends: recorded, and the rollback starts.
    let effects = rig.converged("web-1");
    assert!(matches!(effects.as_slice(), [Effect::RollBack { .. }]));
    assert_eq!(rig.phase("web-1"), Some(Phase::Suspended));
    let effects = rig.done(
        "web-1",
        Outcome::ManualRollback {
            rollback: Rollback::RolledBack {
                to: "/nix/store/b7nkhawyf3jpg51m457xsvxfajiicixb-old".into(),
            },
        },
    );
    assert!(effects.is_empty());
    rig.send(Msg::Resync);
    assert!(rig.tick().is_empty(), "suspended until resumed");
    let (answer, _) = rig.ask(Ask::Resume {
        host: "web-1".into(),
    });
    assert!(answer.is_ok());
    assert_eq!(rig.tick(), ["web-1"]);
}

#[test]
fn requests_for_unknown_hosts_are_refused() {
    let mut rig = Rig::new();
    let (answer, effects) = rig.ask(Ask::Reconcile {
        host: None,
        selector: None,
        force_window: false,
    });
    assert_eq!(answer.unwrap(), "no valid revision yet; fetching now");
    assert!(matches!(effects.as_slice(), [Effect::Fetch]));
    rig.deploy("r1", fleet("", &[("web-1", "")]), &[]);
    let (answer, _) = rig.ask(Ask::Rollback {
        host: "nope".into(),
    });
    assert_eq!(answer.unwrap_err(), "no host `nope` in the specs");
    let (answer, _) = rig.ask(Ask::Resume {
        host: "web-1".into(),
    });
    assert!(answer.is_err());
}

#[test]
fn a_rollback_the_store_refuses_is_not_carried_out() {
    let mut rig = Rig::new();
    rig.deploy("r1", fleet("", &[("web-1", "")]), &[]);
    rig.refuse = Some("database or disk is full");
    let (answer, effects) = rig.ask(Ask::Rollback {
        host: "web-1".into(),
    });
    assert_eq!(
        answer.unwrap_err(),
        "the rollback was not carried out: the store refused to record it (database or disk is full)"
    );
    assert!(effects.is_empty(), "nothing rolled back: {effects:?}");
    assert_ne!(rig.phase("web-1"), Some(Phase::Suspended));
    assert!(rig.tick().is_empty(), "no new work while the store refuses");
    rig.refuse = None;
    rig.send(Msg::StoreWritable);
    assert_eq!(rig.tick(), ["web-1"]);
}

#[test]
fn a_revision_the_store_refused_is_deployed_once_it_takes_writes() {
    let mut rig = Rig::new();
    rig.refuse = Some("disk I/O error");
    rig.deploy("r1", fleet("", &[("web-1", "")]), &[]);
    assert!(rig.state.current_revision().is_none());
    rig.refuse = None;
    let effects = rig.send(Msg::StoreWritable);
    assert!(matches!(
        effects.as_slice(),
        [Effect::Evaluate {
            purpose: Purpose::New(_),
            ..
        }]
    ));
}
