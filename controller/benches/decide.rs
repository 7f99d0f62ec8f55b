//! Criterion benchmark of the controller's decisions alone (no store, no
//! tokio): a revision of a 10,000-host fleet, from its specs to the 10,000
//! work items handed out, the way the run loop drives `decide::handle`.
//! This is the serial work between an evaluation's end and the first
//! worker's start. `cargo bench -p cim --bench decide`.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use time::OffsetDateTime;

use cim::decide::{handle, Config, Effect, Msg, Now, State};
use cim::driver::Evaluation;
use cim::host::sim::Sim;
use cim::spec::{parse_fleet, FleetSpec};
use cim::status::FleetStatus;
use cim::types::Revision;

const FLEET: usize = 10_000;

fn fleet() -> FleetSpec {
    let names: Vec<String> = (0..FLEET).map(|i| format!("sim-{i:05}")).collect();
    parse_fleet(&cim::simulate::spec_files(&names, false)).expect("specs")
}

/// Handles `msg` as the run loop does: appends are folded into the
/// projection and answered `Committed`; the other effects are returned.
fn send(state: &mut State, msg: Msg, now: Now) -> Vec<Effect> {
    let mut rest = Vec::new();
    for effect in handle(state, msg, now) {
        match effect {
            Effect::Append { events, then } => {
                for new in events {
                    let status = state.projection();
                    let from = new.host.as_deref().and_then(|h| status.phase_of(h));
                    let ev = new.into_event(status.repo.last_seq + 1, now.wall, from);
                    status.apply(&ev);
                }
                rest.extend(send(state, Msg::Committed { then }, now));
            }
            other => rest.push(other),
        }
    }
    rest
}

fn revision_handed_out(c: &mut Criterion) {
    let fleet = fleet();
    let revision = Revision::parse(&"5".repeat(40)).expect("revision");
    let flake = "flake-r5";
    let evaluation = Evaluation {
        names: fleet
            .hosts
            .values()
            .map(|h| h.configuration.clone())
            .collect(),
        systems: fleet
            .hosts
            .values()
            .map(|h| {
                (
                    h.configuration.clone(),
                    Ok(Sim::system(flake, &h.configuration)),
                )
            })
            .collect(),
    };
    let cfg = || Config {
        max_parallel: FLEET,
        backoff_base: Duration::from_secs(1),
        backoff_max: Duration::from_secs(60),
        substitute_on_destination: false,
        push_to_cache: false,
        refuse_rewrites: false,
    };
    let mut group = c.benchmark_group("decide");
    group.sample_size(20);
    group.bench_function(
        "a revision of 10,000 hosts, from its specs to every host handed out",
        |b| {
            b.iter_batched(
                || {
                    (
                        State::new(cfg(), FleetStatus::default()),
                        fleet.clone(),
                        evaluation.clone(),
                    )
                },
                |(mut state, fleet, evaluation)| {
                    let now = Now {
                        at: Instant::now(),
                        wall: OffsetDateTime::UNIX_EPOCH,
                    };
                    let effects = send(
                        &mut state,
                        Msg::Revision {
                            revision: revision.clone(),
                            specs: Ok(fleet),
                            trust: cim::trust::Verdict::NotChecked,
                            rewritten_from: None,
                        },
                        now,
                    );
                    let purpose = effects
                        .into_iter()
                        .find_map(|e| match e {
                            Effect::Evaluate { purpose, .. } => Some(purpose),
                            _ => None,
                        })
                        .expect("an evaluation");
                    let mut effects = send(
                        &mut state,
                        Msg::Evaluated {
                            revision: revision.clone(),
                            purpose,
                            result: Ok(evaluation),
                        },
                        now,
                    );
                    effects.extend(send(&mut state, Msg::Tick, now));
                    let runs = effects
                        .iter()
                        .filter(|e| matches!(e, Effect::Run(_)))
                        .count();
                    assert_eq!(runs, FLEET);
                    (state, effects)
                },
                BatchSize::LargeInput,
            )
        },
    );
    group.finish();
}

criterion_group!(benches, revision_handed_out);
criterion_main!(benches);
