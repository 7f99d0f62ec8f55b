//! Criterion benchmarks of the event log and the status projection: the
//! cost of one host transition, appended durably with its projection row,
//! when transitions come one at a time and when many come at once, and the
//! fold itself. `cargo bench -p cim --bench store`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use time::OffsetDateTime;

use cim::event::{NewEvent, Phase, Reason};
use cim::status::FleetStatus;
use cim::store::Store;

const FLEET: usize = 10_000;

/// A store and status holding `FLEET` converged hosts.
fn fleet() -> (tempfile::TempDir, Store, FleetStatus) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path()).expect("store");
    let mut status = FleetStatus::default();
    let news = (0..FLEET)
        .map(|i| {
            NewEvent::host(&format!("h-{i}"), Reason::Converged, Some("r1"), "switched")
                .phase(Phase::Converged)
                .system("/nix/store/b7nkhawyf3jpg51m457xsvxfajiicixb-nixos-system-h-1")
        })
        .collect();
    store
        .append_all(&mut status, news, OffsetDateTime::UNIX_EPOCH)
        .expect("append");
    (dir, store, status)
}

fn transition(i: usize) -> NewEvent {
    NewEvent::host(
        &format!("h-{}", i % FLEET),
        Reason::ReconcileRequested,
        Some("r2"),
        "reconcile requested",
    )
}

fn appends(c: &mut Criterion) {
    let mut group = c.benchmark_group("append");
    group.sample_size(20);
    let (_dir, mut store, mut status) = fleet();
    let next = std::cell::Cell::new(0usize);
    group.throughput(Throughput::Elements(1));
    group.bench_function(
        "one transition, its own transaction (10k-host fleet)",
        |b| {
            b.iter(|| {
                next.set(next.get() + 1);
                store
                    .append(
                        &mut status,
                        transition(next.get()),
                        OffsetDateTime::UNIX_EPOCH,
                    )
                    .expect("append")
            })
        },
    );
    for batch in [100usize, 1000] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(
            format!("{batch} transitions, one transaction (10k-host fleet)"),
            |b| {
                b.iter_batched(
                    || {
                        (0..batch)
                            .map(|k| transition(next.get() + k))
                            .collect::<Vec<_>>()
                    },
                    |news| {
                        next.set(next.get() + batch);
                        store
                            .append_all(&mut status, news, OffsetDateTime::UNIX_EPOCH)
                            .expect("append")
                    },
                    BatchSize::SmallInput,
                )
            },
        );
    }
    group.finish();
}

/// What the controller's run loop does with a burst of outcomes: one
/// group (an append per host, as each report is decided, one commit), and
/// each host's row written once behind it (as the controller does once
/// idle), the hosts spread over the fleet as workers that finish together
/// are.
fn group_commit(c: &mut Criterion) {
    const GROUP: usize = 2048;
    let mut group = c.benchmark_group("group commit");
    group.sample_size(20);
    let (dir, mut store, mut status) = fleet();
    // As the controller's store: the log is checkpointed by a thread of
    // its own, never inside a commit.
    store.checkpoint_apart(dir.path()).expect("checkpointer");
    let next = std::cell::Cell::new(0usize);
    group.throughput(Throughput::Elements(GROUP as u64));
    group.bench_function(
        format!("{GROUP} convergences, one group (10k-host fleet)"),
        |b| {
            b.iter(|| {
                store.begin_group();
                for _ in 0..GROUP {
                    let n = next.get();
                    next.set(n + 1);
                    // A stride coprime with the fleet's size visits every
                    // host, in no order the tables are kept in.
                    let host = format!("h-{}", (n * 7919) % FLEET);
                    let system =
                        format!("/nix/store/a2d7fyjd8hwymgg93c448m6l75xdn3gk-nixos-system-{host}");
                    let new = NewEvent::host(
                        &host,
                        Reason::Converged,
                        Some("5111111111111111111111111111111111111111"),
                        format!("switched to {system}: no package changes, ±0 B"),
                    )
                    .phase(Phase::Converged)
                    .system(system);
                    store
                        .append(&mut status, new, OffsetDateTime::UNIX_EPOCH)
                        .expect("append");
                }
                let rows = store.commit_group(&status).expect("commit");
                store.write_lagging(&status).expect("rows");
                rows
            })
        },
    );
    group.finish();
}

fn projection(c: &mut Criterion) {
    let (_dir, mut store, mut status) = fleet();
    let events = store
        .append_all(
            &mut status,
            (0..1000).map(transition).collect(),
            OffsetDateTime::UNIX_EPOCH,
        )
        .expect("append");
    let mut group = c.benchmark_group("projection");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("fold 1000 events into a 10k-host status", |b| {
        b.iter_batched(
            || status.clone(),
            |mut s| {
                for ev in &events {
                    s.apply(ev);
                }
                s
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("load a 10k-host status from the store", |b| {
        b.iter(|| store.load_status().expect("load"))
    });
    group.finish();
}

criterion_group!(benches, appends, group_commit, projection);
criterion_main!(benches);
