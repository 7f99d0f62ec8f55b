//! The store's unit tests: appends, groups, replay, queries, retention
//! and checkpoints, against real SQLite files.

use super::*;
use crate::event::{Phase, Reason};

fn t(s: i64) -> OffsetDateTime {
    OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(s)
}

fn all_seqs(store: &Store) -> Vec<u64> {
    store
        .events(&EventQuery::default())
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect()
}

fn sample_events() -> Vec<NewEvent> {
    vec![
        NewEvent::repo(Reason::RevisionDetected, Some("r1"), "new head"),
        NewEvent::repo(Reason::SpecsLoaded, Some("r1"), "2 hosts"),
        NewEvent::host("a", Reason::BuildStarted, Some("r1"), "").phase(Phase::Building),
        NewEvent::host("b", Reason::BuildStarted, Some("r1"), "").phase(Phase::Building),
        NewEvent::host("a", Reason::BuildSucceeded, Some("r1"), "")
            .phase(Phase::Pending)
            .system("/nix/store/a"),
        NewEvent::host("b", Reason::BuildFailed, Some("r1"), "error: boom").phase(Phase::Failed),
        NewEvent::host("a", Reason::Converged, Some("r1"), "")
            .phase(Phase::Converged)
            .system("/nix/store/a"),
        NewEvent::host("b", Reason::HostRemoved, Some("r1"), "gone"),
    ]
}

fn sample(store: &mut Store, status: &mut FleetStatus) {
    for (i, ev) in sample_events().into_iter().enumerate() {
        store.append(status, ev, t(i as i64)).unwrap();
    }
}

#[test]
fn the_projection_is_rebuilt_from_events_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let mut status = FleetStatus::default();
    sample(&mut store, &mut status);

    let stored = Store::open_read_only(dir.path())
        .unwrap()
        .load_status()
        .unwrap();
    let events = store.events(&EventQuery::default()).unwrap();
    assert_eq!(events.len(), 8);
    assert_eq!(FleetStatus::replay(&events), stored);
    assert_eq!(stored, status);
    assert_eq!(stored.hosts.len(), 1);
}

#[test]
fn a_reopened_store_carries_on_without_gaps() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut store = Store::open(dir.path()).unwrap();
        sample(&mut store, &mut FleetStatus::default());
    }
    let mut store = Store::open(dir.path()).unwrap();
    let mut status = store.load_status().unwrap();
    let ev = store
        .append(
            &mut status,
            NewEvent::repo(Reason::RevisionDetected, Some("r2"), ""),
            t(9),
        )
        .unwrap();
    assert_eq!(ev.seq, 9);
    let seqs = all_seqs(&store);
    assert_eq!(seqs, (1..=9).collect::<Vec<_>>());
}

#[test]
fn queries_filter_by_host_since_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    sample(&mut store, &mut FleetStatus::default());
    let q = |host: Option<&str>, since, limit| EventQuery {
        hosts: None,
        selector: None,
        host: host.map(str::to_string),
        since,
        limit,
    };
    let seqs = |q| -> Vec<u64> { store.events(&q).unwrap().iter().map(|e| e.seq).collect() };
    assert_eq!(seqs(q(Some("a"), None, None)), vec![3, 5, 7]);
    assert_eq!(seqs(q(None, Some(6), None)), vec![7, 8]);
    assert_eq!(seqs(q(None, None, Some(2))), vec![7, 8]);
    assert_eq!(seqs(q(None, Some(2), Some(2))), vec![3, 4]);
}

#[test]
fn events_of_one_reason_and_where_the_next_read_starts() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    sample(&mut store, &mut FleetStatus::default());
    let (newest, builds) = store.events_of(Reason::BuildStarted, 0).unwrap();
    assert_eq!(newest, 8);
    assert_eq!(builds.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4]);
    let (newest, converged) = store.events_of(Reason::Converged, 6).unwrap();
    assert_eq!((newest, converged[0].seq, converged.len()), (8, 7, 1));
    assert_eq!(
        store.events_of(Reason::Converged, 8).unwrap(),
        (8, Vec::new())
    );
}

#[test]
fn a_batch_is_the_same_as_its_events_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut one_by_one = Store::open(dir.path()).unwrap();
    let mut expected = FleetStatus::default();
    sample(&mut one_by_one, &mut expected);

    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let mut status = FleetStatus::default();
    let mut news = sample_events();
    let rest = news.split_off(3);
    store.append_all(&mut status, news, t(0)).unwrap();
    let events = store.append_all(&mut status, rest, t(1)).unwrap();
    assert_eq!(events.last().map(|e| e.seq), Some(8));
    let stored = store.load_status().unwrap();
    let log = store.events(&EventQuery::default()).unwrap();
    assert_eq!(FleetStatus::replay(&log), stored);
    assert_eq!(stored, status);
    // The same projection as one event at a time (but for the times).
    let mut a = (*status.hosts["a"]).clone();
    a.last_transition_time = expected.hosts["a"].last_transition_time;
    assert_eq!(a, *expected.hosts["a"]);
    assert_eq!(status.hosts.len(), expected.hosts.len());
    assert_eq!(status.repo, expected.repo);
}

#[test]
fn a_failed_batch_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let mut status = FleetStatus::default();
    sample(&mut store, &mut status);
    let before = status.clone();
    store.conn.execute_batch("DROP TABLE hosts").unwrap();
    let news = vec![
        NewEvent::host("c", Reason::Suspended, Some("r1"), "").phase(Phase::Suspended),
        NewEvent::host("a", Reason::DriftDetected, Some("r1"), "").phase(Phase::Pending),
    ];
    assert!(store.append_all(&mut status, news, t(20)).is_err());
    assert_eq!(status, before);
    assert_eq!(store.events(&EventQuery::default()).unwrap().len(), 8);
}

#[test]
fn a_failed_append_in_a_group_leaves_the_others_to_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let mut status = FleetStatus::default();
    let mut news = sample_events().into_iter();
    store.begin_group();
    store
        .append(&mut status, news.next().unwrap(), t(0))
        .unwrap();
    // A status behind the log: its next sequence number is taken.
    let mut stale = FleetStatus::default();
    assert!(store
        .append(&mut stale, news.next().unwrap(), t(1))
        .is_err());
    assert_eq!(stale, FleetStatus::default());
    for (i, new) in news.enumerate() {
        store.append(&mut status, new, t(2 + i as i64)).unwrap();
    }
    store.commit_group(&status).unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    let log = store.events(&EventQuery::default()).unwrap();
    assert_eq!(log.len(), 7);
    assert_eq!(store.load_status().unwrap(), status);
    assert_eq!(FleetStatus::replay(&log), status);
}

/// SQLite answers a full disk (or an I/O error) in the middle of a
/// transaction by rolling all of it back, the group's earlier appends with
/// it: the group must then fail, never commit what came after as if they
/// had been kept.
#[test]
fn a_group_whose_transaction_the_disk_rolled_back_does_not_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let mut status = FleetStatus::default();
    let mut news = sample_events().into_iter();
    store
        .append(&mut status, news.next().unwrap(), t(0))
        .unwrap();
    let durable = status.clone();
    store.begin_group();
    store
        .append(&mut status, news.next().unwrap(), t(1))
        .unwrap();
    store.fill_after(0);
    let big = NewEvent::repo(Reason::FetchFailed, None, "x".repeat(64 * 1024));
    let before = status.clone();
    assert!(store.append(&mut status, big, t(2)).is_err());
    assert_eq!(status, before);
    store
        .conn
        .pragma_update(None, "max_page_count", 1 << 30)
        .unwrap();
    assert!(
        store
            .append(&mut status, news.next().unwrap(), t(3))
            .is_err(),
        "an append after the group was lost"
    );
    assert!(store.commit_group(&status).is_err());
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    let log = store.events(&EventQuery::default()).unwrap();
    assert_eq!(store.load_status().unwrap(), durable);
    assert_eq!(FleetStatus::replay(&log), durable);
}

#[test]
fn the_log_is_checkpointed_apart_from_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    store
        .conn
        .pragma_update(None, "wal_autocheckpoint", 0)
        .unwrap();
    let size = || std::fs::metadata(dir.path().join(DB_FILE)).unwrap().len();
    let before = size();
    let mut status = FleetStatus::default();
    let news = (0..500)
        .map(|i| {
            NewEvent::host(
                &format!("h{i}"),
                Reason::Suspended,
                Some("r1"),
                "x".repeat(200),
            )
        })
        .collect();
    store.append_all(&mut status, news, t(0)).unwrap();
    assert_eq!(size(), before, "nothing is checkpointed by the writer");
    store.checkpointer = Some(
        checkpoint::Checkpointer::start(dir.path(), std::time::Duration::from_millis(10)).unwrap(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while size() == before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        size() > before,
        "the checkpoint thread copied the log into the database"
    );
    drop(store); // stops and joins the thread
}

#[test]
fn retention_deletes_old_events_and_keeps_the_projection() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let mut status = FleetStatus::default();
    sample(&mut store, &mut status); // 8 events at t(0)..t(7)
    let before = store.load_status().unwrap();
    assert_eq!(Retention::parse("3").unwrap().max_events, Some(3));
    let both = Retention::parse("2d,5").unwrap();
    assert_eq!(
        both.max_age,
        Some(std::time::Duration::from_secs(2 * 86_400))
    );
    assert!(Retention::parse("0").is_err() && Retention::parse("soon").is_err());
    assert!(Retention::default().keeps_everything());
    // Keep the newest 5.
    let r = Retention {
        max_events: Some(5),
        max_age: None,
    };
    assert_eq!(store.trim(&r, t(100)).unwrap(), Some((3, 3)));
    assert_eq!(store.trim(&r, t(100)).unwrap(), None);
    // Keep what is younger than 2.5 s at t(7.5): t(5), t(6), t(7).
    let r = Retention {
        max_events: None,
        max_age: Some(std::time::Duration::from_millis(2500)),
    };
    let now = t(7) + time::Duration::milliseconds(500);
    assert_eq!(store.trim(&r, now).unwrap(), Some((5, 2)));
    let seqs = all_seqs(&store);
    assert_eq!(seqs, [6, 7, 8]);
    // Never the newest event, and the projection is untouched.
    let r = Retention {
        max_events: Some(1),
        max_age: Some(std::time::Duration::ZERO),
    };
    assert_eq!(store.trim(&r, t(1000)).unwrap(), Some((7, 2)));
    assert_eq!(store.events(&EventQuery::default()).unwrap().len(), 1);
    assert_eq!(store.load_status().unwrap(), before);
}

#[test]
fn read_only_open_of_a_missing_store_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let err = Store::open_read_only(dir.path()).err().unwrap();
    assert!(err.to_string().starts_with("no store at"), "{err}");
}

/// One append of several events, in a group or alone, records what
/// appending them one at a time does: the same phases each leaves, the
/// same rows.
#[test]
fn a_batch_is_recorded_as_its_events_one_at_a_time() {
    let batch = || {
        vec![
            NewEvent::host("a", Reason::BuildStarted, Some("r1"), "").phase(Phase::Building),
            NewEvent::host("a", Reason::DriftDetected, Some("r1"), ""),
            NewEvent::host("b", Reason::BuildStarted, Some("r1"), "").phase(Phase::Building),
            NewEvent::host("a", Reason::BuildSucceeded, Some("r1"), "")
                .phase(Phase::Pending)
                .system("/nix/store/a"),
            NewEvent::host("b", Reason::HostRemoved, Some("r1"), "gone"),
            NewEvent::host("b", Reason::BuildStarted, Some("r1"), "").phase(Phase::Building),
            NewEvent::repo(Reason::SpecsLoaded, Some("r1"), "2 hosts"),
        ]
    };
    let record = |how: u8| {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut status = FleetStatus::default();
        match how {
            0 => {
                for new in batch() {
                    store.append(&mut status, new, t(1)).unwrap();
                }
            }
            1 => {
                store.append_all(&mut status, batch(), t(1)).unwrap();
            }
            _ => {
                store.begin_group();
                store.append_all(&mut status, batch(), t(1)).unwrap();
                store.commit_group(&status).unwrap();
            }
        }
        let log = store.events(&EventQuery::default()).unwrap();
        assert_eq!(store.load_status().unwrap(), status);
        assert_eq!(FleetStatus::replay(&log), status);
        (log, status)
    };
    let one_at_a_time = record(0);
    assert_eq!(record(1), one_at_a_time);
    assert_eq!(record(2), one_at_a_time);
    assert_eq!(
        one_at_a_time
            .0
            .iter()
            .map(|e| e.from_phase)
            .collect::<Vec<_>>(),
        [None, None, None, Some(Phase::Building), None, None, None],
        "a phase left, said only by the events that change it"
    );
}

/// A burst's groups write their events and leave the hosts' rows to a
/// later group: every read folds the events the tables lag by, retention
/// keeps them, and a new writer writes the rows with its next group.
#[test]
fn rows_left_to_a_later_group_are_read_as_the_log_leaves_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let mut status = FleetStatus::default();
    store.begin_group();
    for i in 0..300 {
        let host = format!("h{i}");
        let new =
            NewEvent::host(&host, Reason::BuildStarted, Some("r1"), "").phase(Phase::Building);
        store.append(&mut status, new, t(1)).unwrap();
    }
    store.commit_group(&status).unwrap();
    assert!(
        store.read_tables().unwrap().hosts.is_empty(),
        "the rows lag"
    );

    let reader = Store::open_read_only(dir.path()).unwrap();
    assert_eq!(reader.load_status().unwrap(), status);
    assert_eq!(reader.host("h7").unwrap().as_ref(), status.host("h7"));
    assert_eq!(reader.host("nobody").unwrap(), None);
    let keep_one = Retention {
        max_events: Some(1),
        max_age: None,
    };
    let mut trimmer = Store::open(dir.path()).unwrap();
    assert_eq!(trimmer.trim(&keep_one, t(2)).unwrap(), None, "all lag");

    drop(store);
    let mut store = Store::open(dir.path()).unwrap();
    let mut status = store.load_status_to_write().unwrap();
    assert_eq!(status, reader.load_status().unwrap());
    store.begin_group();
    let new = NewEvent::host("h0", Reason::BuildSucceeded, Some("r1"), "").phase(Phase::Pending);
    store.append(&mut status, new, t(3)).unwrap();
    store.commit_group(&status).unwrap();
    assert!(store.lagging());
    store.write_lagging(&status).unwrap();
    assert!(!store.lagging());
    assert_eq!(store.read_tables().unwrap(), status, "written once idle");
    assert_eq!(reader.load_status().unwrap(), status);
    let last = status.repo.last_seq;
    assert_eq!(
        trimmer.trim(&keep_one, t(4)).unwrap(),
        Some((last - 1, last - 1))
    );
    assert_eq!(reader.load_status().unwrap(), status);
}
