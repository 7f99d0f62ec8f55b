//! The rules about what is deployed and when it is done: signatures,
//! rewritten histories, manual approvals, completed rollouts, and a
//! requested reconcile always said. The rig is `decide/tests.rs`'s.

use super::*;

#[test]
fn unsigned_and_untrusted_heads_change_nothing_and_are_said_once() {
    let mut rig = Rig::new();
    rig.deploy("r1", two_web_hosts(), &[]);
    for _ in 0..2 {
        let effects = rig.deploy_judged("r2", two_web_hosts(), &[], Verdict::Unsigned, None);
        assert!(effects.is_empty(), "{effects:?}");
    }
    assert_eq!(
        rig.reasons()
            .iter()
            .filter(|r| *r == "UnsignedRevision")
            .count(),
        1
    );
    let untrusted = Verdict::Untrusted {
        why: "signed by SHA256:abc, which --allowed-signers does not allow".into(),
    };
    rig.deploy_judged("r3", two_web_hosts(), &[], untrusted, None);
    let ev = rig.log.last().unwrap();
    assert_eq!(ev.reason, Reason::UntrustedSigner);
    assert!(
        ev.message.contains("still reconciling 111111111111"),
        "{}",
        ev.message
    );
    assert_eq!(rig.state.current_revision(), Some(rev("r1").as_str()));
    let trusted = Verdict::Trusted {
        principal: "alice@example.org".into(),
    };
    rig.deploy_judged("r4", two_web_hosts(), &[], trusted, None);
    assert_eq!(rig.state.current_revision(), Some(rev("r4").as_str()));
}

#[test]
fn a_rewritten_history_waits_for_an_operator() {
    let mut rig = Rig::new();
    rig.deploy("r1", two_web_hosts(), &[]);
    let effects = rig.deploy_judged("r2", two_web_hosts(), &[], Verdict::NotChecked, Some("r1"));
    assert!(effects.is_empty());
    assert_eq!(rig.log.last().unwrap().reason, Reason::HistoryRewritten);
    assert_eq!(rig.state.current_revision(), Some(rev("r1").as_str()));
    let (answer, _) = rig.ask(Ask::Accept {
        revision: "3333333".into(),
    });
    assert!(answer.unwrap_err().contains("not 3333333"));
    let (answer, effects) = rig.ask(Ask::Accept {
        revision: "2222222".into(),
    });
    assert_eq!(answer.unwrap(), "deploying 222222222222");
    assert!(matches!(effects.as_slice(), [Effect::Evaluate { .. }]));
    assert!(rig.reasons().contains(&"RevisionAccepted".to_string()));
    let (answer, _) = rig.ask(Ask::Accept {
        revision: "2222222".into(),
    });
    assert!(answer.is_err(), "nothing waits any more");
}

#[test]
fn a_branch_forced_back_to_the_deployed_revision_is_reported() {
    let mut rig = Rig::new();
    rig.deploy("r1", two_web_hosts(), &[]);
    let effects = rig.deploy_judged("r1", two_web_hosts(), &[], Verdict::NotChecked, Some("r2"));
    assert!(effects.is_empty());
    let ev = rig.log.last().unwrap();
    assert_eq!(ev.reason, Reason::HistoryRewritten);
    assert!(ev.message.ends_with("nothing changes"), "{}", ev.message);
}

#[test]
fn a_rollout_that_converged_everywhere_says_so_once_with_its_duration() {
    let mut rig = Rig::new();
    rig.deploy("r1", two_web_hosts(), &[]);
    rig.tick();
    rig.converged("web-1");
    rig.tick();
    assert!(!rig.reasons().contains(&"RolloutCompleted".to_string()));
    rig.advance(Duration::from_millis(2100));
    rig.converged("web-2");
    rig.tick();
    let ev = rig.log.last().unwrap();
    assert_eq!(ev.reason, Reason::RolloutCompleted);
    assert_eq!(ev.message, "all 2 hosts converged at 111111111111 in 2.1s");
    rig.send(Msg::Resync);
    rig.tick();
    let system = rig.state.desired["web-1"].out.to_string();
    rig.done(
        "web-1",
        Outcome::Converged {
            system,
            changed: false,
        },
    );
    rig.tick();
    let completed = rig
        .reasons()
        .iter()
        .filter(|r| *r == "RolloutCompleted")
        .count();
    assert_eq!(completed, 1);
}

#[test]
fn a_manual_wave_waits_for_an_approval() {
    let policy = "  waves:\n    - {name: canary, selector: {role: canary}}\n    - {name: prod, selector: {role: web}, approval: manual}\n";
    let mut rig = Rig::new();
    rig.deploy(
        "r1",
        fleet(policy, &[("canary-1", ""), ("web-1", ""), ("web-2", "")]),
        &[],
    );
    assert_eq!(rig.tick(), ["canary-1"]);
    rig.converged("canary-1");
    assert!(rig.tick().is_empty(), "the manual wave waits");
    assert_eq!(rig.log.last().unwrap().reason, Reason::ApprovalRequired);
    let (answer, _) = rig.ask(Ask::Approve {
        revision: "2222222".into(),
        wave: None,
    });
    assert!(answer.is_err(), "not the revision rolled out");
    let (answer, _) = rig.ask(Ask::Approve {
        revision: "1111111".into(),
        wave: None,
    });
    assert_eq!(answer.unwrap(), "wave prod of 111111111111 may go ahead");
    assert_eq!(rig.tick(), ["web-1", "web-2"]);
}

/// A commit that changes one host of many: that host is handed out first,
/// before the hosts only looked at to confirm they run their system, even
/// when its name sorts last and `--max-parallel` is 1.
#[test]
fn the_hosts_a_revision_changes_go_before_those_only_looked_at() {
    let mut rig = Rig::new();
    rig.state.cfg.max_parallel = 1;
    let hosts = fleet("", &[("app-1", ""), ("app-2", ""), ("web-1", "")]);
    rig.deploy("r1", hosts.clone(), &[]);
    for host in ["app-1", "app-2", "web-1"] {
        assert_eq!(rig.tick(), [host]);
        rig.converged(host);
    }
    let effects = rig.send(Msg::Revision {
        revision: rev("r2"),
        specs: Ok(hosts),
        trust: Verdict::NotChecked,
        rewritten_from: None,
    });
    rig.evaluate_as(effects, &[], |result| {
        result
            .systems
            .insert("web-1".into(), Ok(system("web-1-with-a-fix")));
    });
    assert_eq!(rig.tick(), ["web-1"]);
    rig.converged("web-1");
    assert_eq!(rig.tick(), ["app-1"]);
}
