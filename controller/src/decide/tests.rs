//! The controller's rules, one by one, as plain function calls: no tokio,
//! no SQLite, no processes. [`Rig`] plays the run loop — it folds appended
//! events into the status (or refuses them, as a full disk would) and
//! feeds continuations back — and hands every other effect to the test.

use std::time::{Duration, Instant};

use time::OffsetDateTime;

use super::*;
use crate::driver::Evaluation;
use crate::event::Event;
use crate::reconcile::{Outcome, Rollback, Step};
use crate::trust::Verdict;
use crate::types::{HostName, Revision};

/// A test revision: `r1` is `1111…`, `r2` is `2222…`.
fn rev(name: &str) -> Revision {
    let digit = name.trim_start_matches('r');
    Revision::parse(&digit.repeat(40)).unwrap()
}

struct Rig {
    state: State,
    at: Instant,
    wall: OffsetDateTime,
    log: Vec<Event>,
    /// Why the store refuses appends, when it does.
    refuse: Option<&'static str>,
    next_request: u64,
}

impl Rig {
    fn new() -> Rig {
        Rig::restarted(FleetStatus::default())
    }

    /// A controller starting on a store that holds `status`.
    fn restarted(status: FleetStatus) -> Rig {
        let cfg = Config {
            max_parallel: 10,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            substitute_on_destination: false,
            push_to_cache: false,
            refuse_rewrites: true,
        };
        Rig {
            state: State::new(cfg, status),
            at: Instant::now(),
            wall: OffsetDateTime::UNIX_EPOCH,
            log: Vec::new(),
            refuse: None,
            next_request: 0,
        }
    }

    fn now(&self) -> Now {
        Now {
            at: self.at,
            wall: self.wall,
        }
    }

    fn advance(&mut self, d: Duration) {
        self.at += d;
        self.wall += d;
    }

    /// Handles `msg` the way the run loop does; returns the effects that
    /// are not appends.
    fn send(&mut self, msg: Msg) -> Vec<Effect> {
        let mut rest = Vec::new();
        let now = self.now();
        for effect in handle(&mut self.state, msg, now) {
            match effect {
                Effect::Append { events, then } => {
                    let next = match self.refuse {
                        Some(why) => Msg::AppendFailed {
                            error: why.to_string(),
                            then,
                        },
                        None => {
                            for new in events {
                                let status = self.state.projection();
                                let from = new.host.as_deref().and_then(|h| status.phase_of(h));
                                let ev = new.into_event(status.repo.last_seq + 1, self.wall, from);
                                status.apply(&ev);
                                self.log.push(ev);
                            }
                            Msg::Committed { then }
                        }
                    };
                    rest.extend(self.send(next));
                }
                other => rest.push(other),
            }
        }
        rest
    }

    fn tick(&mut self) -> Vec<String> {
        runs(&self.send(Msg::Tick))
    }

    /// Deploys `fleet` as `revision`: its specs, then its evaluation, with
    /// `broken` configurations failing to evaluate.
    fn deploy(&mut self, revision: &str, fleet: FleetSpec, broken: &[&str]) -> Vec<Effect> {
        self.deploy_judged(revision, fleet, broken, Verdict::NotChecked, None)
    }

    /// Like [`Rig::deploy`], for a head judged `trust` that replaced
    /// `rewritten_from` without descending from it; the effects that follow
    /// if it is evaluated.
    fn deploy_judged(
        &mut self,
        revision: &str,
        fleet: FleetSpec,
        broken: &[&str],
        trust: Verdict,
        rewritten_from: Option<&str>,
    ) -> Vec<Effect> {
        let names: Vec<String> = fleet
            .hosts
            .values()
            .map(|h| h.configuration.clone())
            .collect();
        let effects = self.send(Msg::Revision {
            revision: rev(revision),
            specs: Ok(fleet),
            trust,
            rewritten_from: rewritten_from.map(rev),
        });
        self.evaluate(effects, names, broken)
    }

    /// Answers the evaluation among `effects` (if any).
    fn evaluate(
        &mut self,
        effects: Vec<Effect>,
        names: Vec<String>,
        broken: &[&str],
    ) -> Vec<Effect> {
        self.evaluate_as(effects, broken, |result| result.names = names)
    }

    /// Like [`Rig::evaluate`], with the result as `edit` makes it.
    fn evaluate_as(
        &mut self,
        effects: Vec<Effect>,
        broken: &[&str],
        edit: impl FnOnce(&mut Evaluation),
    ) -> Vec<Effect> {
        if effects.is_empty() {
            return effects;
        }
        let [Effect::Evaluate {
            revision,
            purpose,
            configurations,
        }] = <[Effect; 1]>::try_from(effects).expect("one evaluation")
        else {
            panic!("not an evaluation");
        };
        let mut result = evaluation(&configurations, broken);
        edit(&mut result);
        self.send(Msg::Evaluated {
            revision,
            purpose,
            result: Ok(result),
        })
    }

    fn done(&mut self, host: &str, outcome: Outcome) -> Vec<Effect> {
        let revision = self.state.current().cloned().unwrap_or_else(|| rev("r1"));
        self.send(Msg::Report(Report::Done {
            host: HostName::parse(host).unwrap(),
            revision,
            outcome,
        }))
    }

    fn converged(&mut self, host: &str) -> Vec<Effect> {
        let system = self.state.desired[host].out.to_string();
        self.done(
            host,
            Outcome::Converged {
                system,
                changed: true,
            },
        )
    }

    fn ask(&mut self, ask: Ask) -> (Result<String, String>, Vec<Effect>) {
        self.next_request += 1;
        let id = RequestId(self.next_request);
        let mut effects = self.send(Msg::Request { id, ask });
        let at = effects
            .iter()
            .position(|e| matches!(e, Effect::Reply { id: i, .. } if *i == id))
            .expect("an answer");
        let Effect::Reply { result, .. } = effects.remove(at) else {
            unreachable!()
        };
        (result, effects)
    }

    fn reasons(&self) -> Vec<String> {
        self.log.iter().map(|e| e.reason.to_string()).collect()
    }

    fn phase(&self, host: &str) -> Option<Phase> {
        self.state.status.phase_of(host)
    }
}

fn runs(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Run(item) => Some(item.host.name.to_string()),
            _ => None,
        })
        .collect()
}

/// A fleet from a `kind: Fleet` spec body (may be empty) and hosts with
/// extra spec lines.
fn fleet(policy: &str, hosts: &[(&str, &str)]) -> FleetSpec {
    let mut text = String::new();
    if !policy.is_empty() {
        text.push_str(&format!(
            "apiVersion: cim/v1\nkind: Fleet\nmetadata: {{name: fleet}}\nspec:\n{policy}"
        ));
    }
    for (name, extra) in hosts {
        text.push_str(&format!(
            "---\napiVersion: cim/v1\nkind: Host\nmetadata: {{name: {name}, labels: {{role: {}}}}}\nspec:\n  address: 10.0.0.1\n{extra}",
            name.split('-').next().unwrap_or(name)
        ));
    }
    crate::spec::parse_fleet(&[crate::spec::SpecFile {
        path: "specs/f.yaml".into(),
        contents: text.into_bytes(),
    }])
    .unwrap()
}

fn system(name: &str) -> Toplevel {
    let hash = "smz0ldh5h3kwdxlgw2whndrb1k4ha03j";
    Toplevel {
        drv: StorePath::parse(&format!("/nix/store/{hash}-{name}.drv")).unwrap(),
        out: StorePath::parse(&format!("/nix/store/{hash}-{name}")).unwrap(),
    }
}

fn evaluation(configurations: &[String], broken: &[&str]) -> Evaluation {
    Evaluation {
        names: configurations.to_vec(),
        systems: configurations
            .iter()
            .map(|c| {
                let system = if broken.contains(&c.as_str()) {
                    Err(format!("error: attribute missing in {c}"))
                } else {
                    Ok(system(c))
                };
                (c.clone(), system)
            })
            .collect(),
    }
}

fn two_web_hosts() -> FleetSpec {
    fleet("", &[("web-1", ""), ("web-2", "")])
}

#[test]
fn a_new_revision_is_evaluated_once_and_its_hosts_run() {
    let mut rig = Rig::new();
    let effects = rig.deploy("r1", two_web_hosts(), &[]);
    assert!(effects.is_empty(), "{effects:?}");
    assert_eq!(rig.reasons(), ["RevisionDetected", "SpecsLoaded"]);
    assert_eq!(rig.tick(), ["web-1", "web-2"]);
    // Handed out once: a second tick starts nothing.
    assert!(rig.tick().is_empty());
}

#[test]
fn a_host_whose_configuration_does_not_evaluate_fails_alone() {
    let mut rig = Rig::new();
    rig.deploy("r1", two_web_hosts(), &["web-2"]);
    assert_eq!(rig.phase("web-2"), Some(Phase::Failed));
    assert!(rig.reasons().contains(&"BuildFailed".to_string()));
    assert_eq!(rig.tick(), ["web-1"]);
}

#[test]
fn a_revision_naming_a_missing_configuration_is_refused_whole() {
    let mut rig = Rig::new();
    let effects = rig.send(Msg::Revision {
        revision: rev("r1"),
        specs: Ok(fleet("", &[("web-1", "  configuration: nope\n")])),
        trust: Verdict::NotChecked,
        rewritten_from: None,
    });
    let [Effect::Evaluate {
        revision, purpose, ..
    }] = <[Effect; 1]>::try_from(effects).unwrap()
    else {
        panic!()
    };
    rig.send(Msg::Evaluated {
        revision,
        purpose,
        result: Ok(Evaluation {
            names: vec!["web-1".into()],
            systems: Default::default(),
        }),
    });
    assert_eq!(rig.reasons(), ["RevisionDetected", "SpecInvalid"]);
    assert!(rig.state.current_revision().is_none());
    assert!(rig.tick().is_empty());
}

#[test]
fn invalid_specs_are_reported_once_and_the_current_revision_stays() {
    let mut rig = Rig::new();
    rig.deploy("r1", two_web_hosts(), &[]);
    let bad = || {
        crate::spec::parse_fleet(&[crate::spec::SpecFile {
            path: "specs/f.yaml".into(),
            contents: b"apiVersion: cim/v1\nkind: Host\nmetadata: {name: x}\nspec: {}\n".to_vec(),
        }])
    };
    for _ in 0..2 {
        rig.send(Msg::Revision {
            revision: rev("r2"),
            specs: bad(),
            trust: Verdict::NotChecked,
            rewritten_from: None,
        });
    }
    let invalid = rig.reasons().iter().filter(|r| *r == "SpecInvalid").count();
    assert_eq!(invalid, 1);
    assert_eq!(rig.state.current_revision(), Some(rev("r1").as_str()));
}

#[test]
fn a_converged_host_is_recorded_and_not_run_again_until_resync() {
    let mut rig = Rig::new();
    rig.deploy("r1", two_web_hosts(), &[]);
    rig.tick();
    rig.converged("web-1");
    assert_eq!(rig.phase("web-1"), Some(Phase::Converged));
    assert!(rig.tick().is_empty());
    rig.send(Msg::Resync);
    // web-2 is still running; only web-1 is checked again.
    assert_eq!(rig.tick(), ["web-1"]);
}

#[test]
fn an_unchanged_host_that_stays_converged_says_nothing() {
    let mut rig = Rig::new();
    rig.deploy("r1", two_web_hosts(), &[]);
    rig.tick();
    rig.converged("web-1");
    let before = rig.log.len();
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
    assert_eq!(rig.log.len(), before, "{:?}", &rig.reasons()[before..]);
}

#[test]
fn a_failed_reconcile_is_retried_with_backoff() {
    let mut rig = Rig::new();
    rig.deploy("r1", fleet("", &[("web-1", "")]), &[]);
    rig.tick();
    let failed = || Outcome::Failed {
        reason: Reason::HostUnreachable,
        message: "ssh: connect to host 10.0.0.1 port 22: No route to host".into(),
    };
    rig.done("web-1", failed());
    let ev = rig.log.last().unwrap();
    assert_eq!(ev.reason, Reason::HostUnreachable);
    assert_eq!(ev.next_retry, Some(rig.wall + Duration::from_secs(1)));
    assert!(rig.tick().is_empty(), "not before the backoff");
    rig.advance(Duration::from_secs(1));
    assert_eq!(rig.tick(), ["web-1"]);
    // The second failure waits twice as long.
    rig.done("web-1", failed());
    rig.advance(Duration::from_secs(1));
    assert!(rig.tick().is_empty());
    rig.advance(Duration::from_secs(1));
    assert_eq!(rig.tick(), ["web-1"]);
}

#[test]
fn a_failed_activation_holds_the_host_until_asked_again() {
    let mut rig = Rig::new();
    rig.deploy("r1", fleet("", &[("web-1", "")]), &[]);
    rig.tick();
    let previous = "/nix/store/b7nkhawyf3jpg51m457xsvxfajiicixb-nixos-system-web-1-0";
    rig.done(
        "web-1",
        Outcome::ActivationFailed {
            message: "switch-to-configuration exited with 4".into(),
            rollback: Rollback::RolledBack {
                to: previous.into(),
            },
        },
    );
    assert_eq!(
        &rig.reasons()[rig.log.len() - 2..],
        ["ActivationFailed", "RolledBack"]
    );
    rig.send(Msg::Resync);
    rig.advance(Duration::from_secs(3600));
    assert!(rig.tick().is_empty(), "held: not retried on a timer");
    let (answer, _) = rig.ask(Ask::Reconcile {
        host: Some("web-1".into()),
        selector: None,
        force_window: false,
    });
    assert!(answer.unwrap().starts_with("reconciling web-1"));
    assert_eq!(rig.tick(), ["web-1"]);
}

#[test]
fn a_build_failure_waits_for_a_new_revision_or_a_request() {
    let mut rig = Rig::new();
    rig.deploy("r1", fleet("", &[("web-1", "")]), &[]);
    rig.tick();
    rig.done(
        "web-1",
        Outcome::BuildFailed {
            message: "builder for '/nix/store/…-web-1.drv' failed".into(),
        },
    );
    rig.send(Msg::Resync);
    assert!(rig.tick().is_empty());
    // Its system is gone: a reconcile evaluates again.
    let (answer, effects) = rig.ask(Ask::Reconcile {
        host: Some("web-1".into()),
        selector: None,
        force_window: false,
    });
    assert!(answer.is_ok());
    assert!(matches!(
        effects.as_slice(),
        [Effect::Evaluate {
            purpose: Purpose::Refresh,
            ..
        }]
    ));
}

#[test]
fn a_refresh_evaluates_only_the_hosts_left_without_a_system() {
    let mut rig = Rig::new();
    let hosts = fleet("", &[("web-1", ""), ("web-2", ""), ("web-3", "")]);
    rig.deploy("r1", hosts, &["web-2"]);
    assert_eq!(rig.phase("web-2"), Some(Phase::Failed));
    assert_eq!(rig.tick(), ["web-1", "web-3"]);
    let (answer, effects) = rig.ask(Ask::Reconcile {
        host: None,
        selector: None,
        force_window: false,
    });
    assert!(answer.is_ok());
    let refreshes: Vec<&Vec<String>> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Evaluate {
                purpose: Purpose::Refresh,
                configurations,
                ..
            } => Some(configurations),
            _ => None,
        })
        .collect();
    let [configurations] = refreshes.as_slice() else {
        panic!("one refresh: {effects:?}");
    };
    assert_eq!(*configurations, &["web-2"]);
    let result = evaluation(configurations, &[]);
    // A host that loses its system meanwhile was not evaluated: the
    // refresh says nothing of it.
    rig.done(
        "web-1",
        Outcome::BuildFailed {
            message: "builder for '/nix/store/…-web-1.drv' failed".into(),
        },
    );
    rig.send(Msg::Evaluated {
        revision: rev("r1"),
        purpose: Purpose::Refresh,
        result: Ok(result),
    });
    let failed: Vec<&str> = rig
        .log
        .iter()
        .filter(|e| e.reason == Reason::BuildFailed)
        .filter_map(|e| e.host.as_deref())
        .collect();
    assert_eq!(failed, ["web-2", "web-1"]);
    assert_eq!(rig.tick(), ["web-2"]);
    rig.converged("web-2");
    rig.converged("web-3");
    // Once every host that can have one has its system, nothing but
    // web-1's configuration is evaluated again.
    let (_, effects) = rig.ask(Ask::Reconcile {
        host: None,
        selector: None,
        force_window: false,
    });
    let refreshed: Vec<&Vec<String>> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Evaluate { configurations, .. } => Some(configurations),
            _ => None,
        })
        .collect();
    assert_eq!(refreshed, [&vec!["web-1".to_string()]], "{effects:?}");
}

#[test]
fn drift_on_a_converged_host_is_an_event() {
    let mut rig = Rig::new();
    rig.deploy("r1", fleet("", &[("web-1", "")]), &[]);
    rig.tick();
    rig.converged("web-1");
    let elsewhere = "/nix/store/b7nkhawyf3jpg51m457xsvxfajiicixb-hand-made".to_string();
    rig.send(Msg::Report(Report::Step {
        host: HostName::parse("web-1").unwrap(),
        revision: rev("r1"),
        step: Step::Observed {
            current: Some(elsewhere.clone()),
        },
    }));
    let ev = rig.log.last().unwrap();
    assert_eq!(ev.reason, Reason::DriftDetected);
    assert_eq!(ev.system.as_deref(), Some(elsewhere.as_str()));
    assert_eq!(rig.phase("web-1"), Some(Phase::Pending));
}

#[test]
fn hosts_suspended_by_their_spec_are_left_alone() {
    let mut rig = Rig::new();
    rig.deploy(
        "r1",
        fleet("", &[("web-1", ""), ("web-2", "  suspend: true\n")]),
        &[],
    );
    assert_eq!(
        rig.phase("web-2"),
        Some(Phase::Suspended),
        "{:?}",
        rig.reasons()
    );
    assert_eq!(rig.tick(), ["web-1"]);
    let (answer, _) = rig.ask(Ask::Reconcile {
        host: Some("web-2".into()),
        selector: None,
        force_window: false,
    });
    assert_eq!(answer.unwrap_err(), "host `web-2` is suspended by its spec");
}

#[test]
fn a_crashed_worker_frees_its_slot_and_is_retried() {
    let mut rig = Rig::new();
    rig.deploy(
        "r1",
        fleet("  maxParallel: 1\n", &[("web-1", ""), ("web-2", "")]),
        &[],
    );
    assert_eq!(rig.tick(), ["web-1"]);
    rig.done(
        "web-1",
        Outcome::Failed {
            reason: Reason::WorkerCrashed,
            message: "the worker reconciling this host crashed: boom".into(),
        },
    );
    assert_eq!(rig.phase("web-1"), Some(Phase::Failed));
    assert_eq!(rig.tick(), ["web-2"], "the slot is free");
}

#[test]
fn a_restart_looks_at_hosts_before_building_anything() {
    let mut first = Rig::new();
    first.deploy("r1", fleet("", &[("web-1", "")]), &[]);
    first.tick();
    first.converged("web-1");
    // A new controller on the same store: the stored revision is
    // evaluated once, and each host is looked at first (which also adopts
    // an activation the old controller left in flight).
    let mut rig = Rig::restarted(first.state.status.clone());
    let effects = rig.state.resume(rev("r1"), fleet("", &[("web-1", "")]));
    let [Effect::Evaluate {
        revision,
        purpose,
        configurations,
    }] = <[Effect; 1]>::try_from(effects).unwrap()
    else {
        panic!()
    };
    rig.send(Msg::Evaluated {
        revision,
        purpose,
        result: Ok(evaluation(&configurations, &[])),
    });
    let effects = rig.send(Msg::Tick);
    let [Effect::Run(item)] = effects.as_slice() else {
        panic!("{effects:?}")
    };
    assert!(item.likely_current);
    assert!(
        rig.log.is_empty(),
        "nothing new to say: {:?}",
        rig.reasons()
    );
}

#[test]
fn a_newer_revision_reaches_a_host_that_was_busy() {
    let mut rig = Rig::new();
    rig.deploy("r1", fleet("", &[("web-1", "")]), &[]);
    rig.tick();
    let mut fleet2 = fleet("", &[("web-1", "")]);
    std::sync::Arc::make_mut(fleet2.hosts.get_mut("web-1").unwrap()).configuration =
        "web-1-v2".into();
    rig.deploy("r2", fleet2, &[]);
    assert!(rig.tick().is_empty(), "never two runs of one host");
    rig.done(
        "web-1",
        Outcome::Converged {
            system: system("web-1").out.to_string(),
            changed: true,
        },
    );
    assert_eq!(rig.tick(), ["web-1"]);
    let item = match rig.send(Msg::Resync).as_slice() {
        [] => rig.state.work_item("web-1").unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(item.revision, rev("r2"));
}

#[test]
fn removed_hosts_are_forgotten() {
    let mut rig = Rig::new();
    rig.deploy("r1", two_web_hosts(), &[]);
    rig.tick();
    rig.converged("web-1");
    rig.converged("web-2");
    rig.deploy("r2", fleet("", &[("web-1", "")]), &[]);
    assert!(rig.reasons().contains(&"HostRemoved".to_string()));
    assert!(!rig.state.status.hosts.contains_key("web-2"));
    assert_eq!(rig.tick(), ["web-1"]);
}

#[test]
fn with_every_slot_taken_no_timer_is_asked_for() {
    let mut rig = Rig::new();
    rig.deploy(
        "r1",
        fleet("  maxParallel: 1\n", &[("web-1", ""), ("web-2", "")]),
        &[],
    );
    assert_eq!(rig.tick(), ["web-1"]);
    // web-2 is due, but only web-1's report can free a slot.
    assert_eq!(rig.state.next_dispatch(), None);
    rig.converged("web-1");
    assert_eq!(rig.state.next_dispatch(), Some(rig.at));
}

mod reboots;
mod requests;
mod revisions;
mod rollouts;
mod windows;
