//! Reboots: `cim reboot HOST` recorded, then carried out by a worker of
//! its own (never while another works on the host); a reboot that
//! needs doing is part of the host's status until it reboots. The rig is
//! `decide/tests.rs`'s.

use super::*;

#[test]
fn cim_reboot_is_recorded_then_carried_out_and_the_host_looked_at_again() {
    let mut rig = Rig::new();
    let effects = rig.deploy("r1", two_web_hosts(), &[]);
    let mut started = runs(&effects);
    started.extend(rig.tick());
    // Busy hosts are not rebooted under a running reconcile.
    let (answer, _) = rig.ask(Ask::Reboot {
        host: "web-1".into(),
    });
    assert!(answer.unwrap_err().contains("being worked on"));
    rig.converged("web-1");
    let (answer, effects) = rig.ask(Ask::Reboot {
        host: "web-1".into(),
    });
    assert!(answer.unwrap().contains("rebooting web-1"));
    assert!(matches!(effects.as_slice(), [Effect::Reboot { host, .. }] if host.name == "web-1"));
    assert!(rig.reasons().contains(&"RebootRequested".to_string()));
    rig.send(Msg::Report(Report::Step {
        host: HostName::parse("web-1").unwrap(),
        revision: rev("r1"),
        step: Step::Rebooting,
    }));
    assert_eq!(rig.phase("web-1"), Some(Phase::Rebooting));
    rig.done(
        "web-1",
        Outcome::Rebooted {
            booted: Some("/nix/store/smz0ldh5h3kwdxlgw2whndrb1k4ha03j-web-1".into()),
        },
    );
    assert_eq!(rig.reasons().last().map(String::as_str), Some("Rebooted"));
    // Level-triggered: it is looked at again at once.
    assert_eq!(rig.tick(), ["web-1"]);
    let (answer, _) = rig.ask(Ask::Reboot {
        host: "db-9".into(),
    });
    assert!(answer.unwrap_err().contains("no host `db-9`"));
}

#[test]
fn a_required_reboot_stays_in_the_status_until_the_host_reboots() {
    let mut rig = Rig::new();
    let effects = rig.deploy("r1", two_web_hosts(), &[]);
    let mut started = runs(&effects);
    started.extend(rig.tick());
    let step = |step| {
        Msg::Report(Report::Step {
            host: HostName::parse("web-1").unwrap(),
            revision: rev("r1"),
            step,
        })
    };
    rig.send(step(Step::CopyStarted));
    rig.send(step(Step::RebootRequired {
        what: vec!["kernel".into()],
        auto: false,
    }));
    rig.converged("web-1");
    let required = rig.state.status.hosts["web-1"].reboot_required.clone();
    assert!(required.unwrap().contains("`cim reboot web-1`"));
    // A reboot (by an operator, or by the next auto one) clears it.
    let (answer, _) = rig.ask(Ask::Reboot {
        host: "web-1".into(),
    });
    assert!(answer.is_ok());
    rig.done("web-1", Outcome::Rebooted { booted: None });
    assert_eq!(rig.state.status.hosts["web-1"].reboot_required, None);
}

#[test]
fn an_auto_reboot_is_said_before_the_convergence() {
    let mut rig = Rig::new();
    let effects = rig.deploy("r1", two_web_hosts(), &[]);
    let mut started = runs(&effects);
    started.extend(rig.tick());
    rig.send(Msg::Report(Report::Step {
        host: HostName::parse("web-1").unwrap(),
        revision: rev("r1"),
        step: Step::Rebooting,
    }));
    rig.converged("web-1");
    let tail: Vec<String> = rig.reasons().iter().rev().take(2).rev().cloned().collect();
    assert_eq!(tail, ["Rebooted", "Converged"]);
    assert_eq!(rig.phase("web-1"), Some(Phase::Converged));
}

#[test]
fn a_host_that_never_came_back_spends_the_failure_budget() {
    let policy = "  maxParallel: 1\n  maxFailures: 1\n  reboot: auto\n";
    let mut rig = Rig::new();
    rig.deploy("r1", fleet(policy, &[("web-1", ""), ("web-2", "")]), &[]);
    assert_eq!(rig.tick(), ["web-1"], "one reboot at a time (maxParallel)");
    rig.send(Msg::Report(Report::Step {
        host: HostName::parse("web-1").unwrap(),
        revision: rev("r1"),
        step: Step::Rebooting,
    }));
    rig.done(
        "web-1",
        Outcome::Failed {
            reason: Reason::RebootTimedOut,
            message: "web-1 did not come back within 600s of rebooting".into(),
        },
    );
    assert_eq!(rig.phase("web-1"), Some(Phase::Failed));
    assert!(rig.tick().is_empty(), "web-2 is not rebooted too");
    assert_eq!(rig.log.last().unwrap().reason, Reason::RolloutHalted);
}
