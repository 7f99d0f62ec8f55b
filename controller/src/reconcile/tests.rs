//! One host's reconcile, confirmation and rollback against simulated hosts
//! (`host::sim`), under `tokio::time::pause()`: the paths that otherwise
//! only a sandbox fleet shows, in milliseconds.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::host::sim::{Fault, Sim, SimConfig};

const OLD: &str = "/nix/store/b7nkhawyf3jpg51m457xsvxfajiicixb-nixos-system-web-1-old";

fn r2() -> Revision {
    Revision::parse(&"2".repeat(40)).unwrap()
}

fn spec(extra: &str) -> std::sync::Arc<HostSpec> {
    let text = format!(
        "apiVersion: cim/v1\nkind: Host\nmetadata: {{name: web-1}}\nspec:\n  address: 10.0.0.2\n{extra}"
    );
    let fleet = crate::spec::parse_fleet(&[crate::spec::SpecFile {
        path: "specs/a.yaml".into(),
        contents: text.into_bytes(),
    }])
    .unwrap();
    fleet.hosts["web-1"].clone()
}

fn item(host: std::sync::Arc<HostSpec>) -> WorkItem {
    let system = Sim::system("flake-r2", "web-1");
    WorkItem {
        host,
        revision: r2(),
        desired: system.out,
        build: Some(system.drv),
        likely_current: false,
        push: false,
        substitute: false,
        activate_by: None,
    }
}

/// Runs one reconcile of `item` on `sim`; its steps and outcome.
async fn reconcile_on(sim: &Sim, item: WorkItem) -> (Vec<Step>, Outcome) {
    let (tx, mut rx) = mpsc::channel(64);
    let backend = Arc::new(sim.clone());
    let builds = Builds::spawn(Arc::clone(&backend));
    run(backend, builds, item, tx, CancellationToken::new()).await;
    let mut steps = Vec::new();
    while let Some(report) = rx.recv().await {
        match report {
            Report::Step { step, .. } => steps.push(step),
            Report::Done { outcome, .. } => return (steps, outcome),
        }
    }
    panic!("no outcome");
}

#[tokio::test(start_paused = true)]
async fn a_host_is_copied_activated_confirmed_and_converged() {
    let sim = Sim::new(SimConfig::default());
    sim.install("web-1", OLD);
    let item = item(spec(""));
    let desired = item.desired.to_string();
    let (steps, outcome) = reconcile_on(&sim, item).await;
    assert_eq!(
        outcome,
        Outcome::Converged {
            system: desired.clone(),
            changed: true
        }
    );
    assert_eq!(
        steps,
        [
            // Built while connecting and looking.
            Step::BuildStarted,
            Step::Observed {
                current: Some(OLD.into())
            },
            Step::BuildSucceeded {
                changes: Some("no package changes, ±0 B".into())
            },
            Step::CopyStarted,
            Step::CopySucceeded,
            // Two generations, within the default ten: nothing deleted,
            // nothing said.
            Step::ActivationStarted {
                action: Action::Switch
            },
        ]
    );
    assert_eq!(sim.current("web-1").as_deref(), Some(desired.as_str()));
}

#[tokio::test(start_paused = true)]
async fn a_host_already_running_its_system_is_left_alone() {
    let sim = Sim::new(SimConfig::default());
    let mut item = item(spec(""));
    sim.install("web-1", item.desired.as_str());
    item.likely_current = true;
    let (steps, outcome) = reconcile_on(&sim, item).await;
    assert!(matches!(outcome, Outcome::Converged { changed: false, .. }));
    assert_eq!(steps.len(), 1, "only looked: {steps:?}");
    assert_eq!(
        sim.counts.copies.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test(start_paused = true)]
async fn a_window_that_closes_during_the_copy_stops_the_run_before_activation() {
    let sim = Sim::new(SimConfig::default());
    sim.install("web-1", OLD);
    let mut late = item(spec(""));
    // The copy alone takes 200 ms.
    late.activate_by = Some((tokio::time::Instant::now() + Duration::from_millis(100)).into_std());
    let (steps, outcome) = reconcile_on(&sim, late).await;
    assert_eq!(outcome, Outcome::WindowClosed);
    assert_eq!(steps.last(), Some(&Step::CopySucceeded), "{steps:?}");
    assert!(!steps
        .iter()
        .any(|s| matches!(s, Step::ActivationStarted { .. })));
    assert_eq!(sim.current("web-1").as_deref(), Some(OLD));
    // Within its window, the same run activates.
    let mut in_time = item(spec(""));
    in_time.activate_by =
        Some((tokio::time::Instant::now() + Duration::from_secs(3600)).into_std());
    let (_, outcome) = reconcile_on(&sim, in_time).await;
    assert!(
        matches!(outcome, Outcome::Converged { changed: true, .. }),
        "{outcome:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_activation_is_rolled_back() {
    let sim = Sim::new(SimConfig::default());
    sim.install("web-1", OLD);
    sim.set_fault("web-1", Some(Fault::ActivationFails));
    let (_, outcome) = reconcile_on(&sim, item(spec(""))).await;
    let Outcome::ActivationFailed { rollback, .. } = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(rollback, Rollback::RolledBack { to: OLD.into() });
    assert_eq!(sim.current("web-1").as_deref(), Some(OLD));
}

#[tokio::test(start_paused = true)]
async fn a_system_that_cuts_the_network_is_not_confirmed_and_reverts_itself() {
    let sim = Sim::new(SimConfig::default());
    sim.install("web-1", OLD);
    sim.set_fault("web-1", Some(Fault::NewSystemCutsNetwork));
    let (steps, outcome) =
        reconcile_on(&sim, item(spec("  rollout: {confirmTimeout: 30s}\n"))).await;
    assert!(
        steps
            .iter()
            .any(|s| matches!(s, Step::ConfirmationTimedOut { .. })),
        "{steps:?}"
    );
    assert_eq!(
        outcome,
        Outcome::NotConfirmed {
            rollback: Rollback::RolledBack { to: OLD.into() }
        }
    );
    assert_eq!(sim.current("web-1").as_deref(), Some(OLD));
}

#[tokio::test(start_paused = true)]
async fn a_failing_health_check_rolls_the_host_back() {
    let sim = Sim::new(SimConfig::default());
    sim.install("web-1", OLD);
    let host = spec("  healthChecks:\n    - {name: up, command: [\"false\"], retries: 2}\n");
    let (steps, outcome) = reconcile_on(&sim, item(host)).await;
    assert_eq!(steps.last(), Some(&Step::Verifying));
    let Outcome::HealthCheckFailed { rollback, message } = outcome else {
        panic!("{outcome:?}");
    };
    assert!(message.starts_with("health check `up` failed"), "{message}");
    assert_eq!(rollback, Rollback::RolledBack { to: OLD.into() });
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_host_fails_its_reconcile() {
    let sim = Sim::new(SimConfig::default());
    sim.set_fault("web-1", Some(Fault::Unreachable));
    let (_, outcome) = reconcile_on(&sim, item(spec(""))).await;
    let Outcome::Failed { reason, message } = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(reason, Reason::HostUnreachable);
    assert!(message.contains("connection refused"), "{message}");
}

#[tokio::test(start_paused = true)]
async fn an_operator_rollback_goes_back_one_generation() {
    let sim = Sim::new(SimConfig::default());
    sim.install("web-1", OLD);
    let (_, _) = reconcile_on(&sim, item(spec(""))).await;
    let (tx, mut rx) = mpsc::channel(8);
    run_rollback(
        Arc::new(sim.clone()),
        HostSpec::clone(&spec("")),
        r2(),
        tx,
        CancellationToken::new(),
    )
    .await;
    let Some(Report::Done { outcome, .. }) = rx.recv().await else {
        panic!("no outcome");
    };
    assert_eq!(
        outcome,
        Outcome::ManualRollback {
            rollback: Rollback::RolledBack { to: OLD.into() }
        }
    );
    assert_eq!(sim.current("web-1").as_deref(), Some(OLD));
}

#[tokio::test(start_paused = true)]
async fn old_generations_beyond_keep_generations_are_deleted() {
    let sim = Sim::new(SimConfig::default());
    sim.install("web-1", OLD);
    let mut pruned = Vec::new();
    for version in ["r2", "r3", "r4"] {
        let mut item = item(spec("  keepGenerations: 2\n"));
        let system = Sim::system(&format!("flake-{version}"), "web-1");
        item.desired = system.out;
        item.build = Some(system.drv);
        let (steps, outcome) = reconcile_on(&sim, item).await;
        assert!(matches!(outcome, Outcome::Converged { changed: true, .. }));
        pruned.extend(steps.into_iter().filter_map(|s| match s {
            Step::Pruned { result, .. } => Some(result),
            _ => None,
        }));
    }
    assert_eq!(pruned, [Ok(1), Ok(1)], "the first run deleted nothing");
}

/// web-1 booted into OLD, and a desired system with another kernel.
fn kernel_change(sim: &Sim, extra: &str) -> WorkItem {
    sim.install("web-1", OLD);
    sim.boot("web-1");
    let item = item(spec(extra));
    sim.set_kernel(item.desired.as_str(), "linux-6.6");
    item
}

#[tokio::test(start_paused = true)]
async fn a_new_kernel_with_reboot_auto_boots_it_and_checks_what_booted() {
    let sim = Sim::new(SimConfig::default());
    let item = kernel_change(&sim, "  reboot: auto\n");
    let desired = item.desired.to_string();
    let (steps, outcome) = reconcile_on(&sim, item).await;
    assert_eq!(
        outcome,
        Outcome::Converged {
            system: desired.clone(),
            changed: true
        }
    );
    assert!(steps.contains(&Step::RebootRequired {
        what: vec!["kernel".into(), "initrd".into(), "kernel-modules".into()],
        auto: true
    }));
    assert!(steps.contains(&Step::ActivationStarted {
        action: Action::Boot
    }));
    assert!(steps.contains(&Step::Rebooting));
    assert_eq!(sim.booted("web-1").as_deref(), Some(desired.as_str()));
    assert_eq!(sim.current("web-1").as_deref(), Some(desired.as_str()));
}

#[tokio::test(start_paused = true)]
async fn a_host_that_never_comes_back_fails_with_reboot_timed_out() {
    let sim = Sim::new(SimConfig::default());
    let item = kernel_change(&sim, "  reboot: auto\n  rebootTimeout: 30s\n");
    sim.set_fault("web-1", Some(Fault::NeverComesBack));
    let started = tokio::time::Instant::now();
    let (_, outcome) = reconcile_on(&sim, item).await;
    let Outcome::Failed { reason, message } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(reason, Reason::RebootTimedOut);
    assert!(
        message.contains("did not come back within 30s"),
        "{message}"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(30) && took < Duration::from_secs(40),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_new_kernel_without_reboot_auto_is_switched_and_said() {
    let sim = Sim::new(SimConfig::default());
    let item = kernel_change(&sim, "");
    let desired = item.desired.to_string();
    let (steps, outcome) = reconcile_on(&sim, item).await;
    assert!(matches!(outcome, Outcome::Converged { changed: true, .. }));
    assert!(steps.contains(&Step::RebootRequired {
        what: vec!["kernel".into(), "initrd".into(), "kernel-modules".into()],
        auto: false
    }));
    assert!(!steps.contains(&Step::Rebooting));
    assert_eq!(sim.current("web-1").as_deref(), Some(desired.as_str()));
    assert_eq!(sim.booted("web-1").as_deref(), Some(OLD));
}

#[tokio::test(start_paused = true)]
async fn cim_reboot_reboots_into_the_profile() {
    let sim = Sim::new(SimConfig::default());
    sim.install("web-1", OLD);
    let (tx, mut rx) = mpsc::channel(64);
    run_reboot(
        Arc::new(sim.clone()),
        HostSpec::clone(&spec("")),
        r2(),
        tx,
        CancellationToken::new(),
    )
    .await;
    let mut outcome = None;
    while let Some(report) = rx.recv().await {
        if let Report::Done { outcome: o, .. } = report {
            outcome = Some(o);
        }
    }
    assert_eq!(
        outcome,
        Some(Outcome::Rebooted {
            booted: Some(OLD.to_string())
        })
    );
    assert_eq!(sim.booted("web-1").as_deref(), Some(OLD));
}

#[tokio::test(start_paused = true)]
async fn the_copy_does_not_wait_for_the_build_summary() {
    let sim = Sim::new(SimConfig::default());
    sim.install("web-1", OLD);
    let started = tokio::time::Instant::now();
    let (steps, outcome) = reconcile_on(&sim, item(spec(""))).await;
    assert!(matches!(outcome, Outcome::Converged { .. }), "{outcome:?}");
    // The simulation's model of a reconcile (the host is asked what it
    // runs during the copy), and the build batch's window: no closures
    // batch, no remote command before the copy.
    assert_eq!(
        started.elapsed(),
        SimConfig::default().reconcile_time(true) + super::builds::BATCH_WINDOW
    );
    let built = steps
        .iter()
        .position(|s| matches!(s, Step::BuildSucceeded { changes: Some(_) }));
    let copying = steps.iter().position(|s| matches!(s, Step::CopyStarted));
    assert!(built.is_some() && built < copying, "{steps:?}");
}
