//! Tests of the run loop's own duties, with a real store: a worker that
//! panics, appends the store refuses inside a group, a group the disk
//! rolls back, what waits for the group's commit, the rows written at a
//! clean shutdown, retention. The rules themselves are tested in
//! `decide/tests.rs`.

use super::*;
use crate::event::{NewEvent, Reason};

fn controller(dir: &std::path::Path) -> Controller {
    let cfg = ControllerConfig {
        resync_interval: Duration::from_secs(300),
        max_parallel: 2,
        backoff_base: Duration::from_secs(1),
        backoff_max: Duration::from_secs(10),
        mirror_path: dir.join("mirror.git"),
        substitute_on_destination: false,
        retention: crate::store::Retention::default(),
        state_dir: dir.to_path_buf(),
        refuse_rewrites: false,
    };
    let store = Store::open(dir).unwrap();
    Controller::new(cfg, DriverConfig::default(), store, Arc::new(Notify::new())).unwrap()
}

fn web_1() -> crate::types::HostName {
    crate::types::HostName::parse("web-1").unwrap()
}

fn r1() -> crate::types::Revision {
    crate::types::Revision::parse(&"1".repeat(40)).unwrap()
}

fn one_host() -> FleetSpec {
    crate::spec::parse_fleet(&[crate::spec::SpecFile {
        path: "specs/a.yaml".into(),
        contents:
            b"apiVersion: cim/v1\nkind: Host\nmetadata: {name: web-1}\nspec: {address: 10.0.0.2}\n"
                .to_vec(),
    }])
    .unwrap()
}

/// Makes every append fail (as a full disk would), or undoes it.
fn break_store(dir: &std::path::Path, broken: bool) {
    let conn = rusqlite::Connection::open(dir.join(crate::store::DB_FILE)).unwrap();
    let sql = if broken {
        "ALTER TABLE events RENAME TO events_away"
    } else {
        "ALTER TABLE events_away RENAME TO events"
    };
    conn.execute_batch(sql).unwrap();
}

fn reasons(c: &Controller) -> Vec<String> {
    c.store
        .events(&crate::store::EventQuery::default())
        .unwrap()
        .iter()
        .map(|e| e.reason.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_panics_is_a_failed_reconcile_of_its_host() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = controller(dir.path());
    c.spawn_worker(&web_1(), &r1(), async { panic!("boom in a worker") });
    let joined = c.workers.join_next_with_id().await.unwrap();
    let report = c
        .worker_ended(joined)
        .expect("a report for the crashed worker");
    let Report::Done {
        host,
        revision,
        outcome,
    } = &report
    else {
        panic!("not a Done report");
    };
    assert_eq!((host.as_str(), revision), ("web-1", &r1()));
    let reconcile::Outcome::Failed { reason, message } = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(*reason, Reason::WorkerCrashed);
    assert!(message.contains("boom in a worker"), "{message}");
    assert!(c.worker_hosts.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_ends_normally_reports_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = controller(dir.path());
    c.spawn_worker(&web_1(), &r1(), async {});
    let joined = c.workers.join_next_with_id().await.unwrap();
    assert!(c.worker_ended(joined).is_none());
    assert!(c.worker_hosts.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_store_refuses_is_answered_with_why_and_not_done() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = controller(dir.path());
    c.resume(r1(), one_host());
    c.outbox.clear();
    let health = c.health();
    break_store(dir.path(), true);
    let (reply, answer) = oneshot::channel();
    let msg = c.request(Request::Rollback {
        host: "web-1".into(),
        reply,
    });
    c.group(vec![msg]).expect("the group itself commits");
    let refused = answer.await.unwrap().unwrap_err();
    assert!(
        refused.starts_with("the rollback was not carried out: the store refused to record it"),
        "{refused}"
    );
    assert!(c.workers.is_empty(), "nothing rolled back");
    assert!(health
        .borrow()
        .as_deref()
        .is_some_and(|h| h.contains("refuses writes")));
    break_store(dir.path(), false);
    c.group(vec![Msg::StoreWritable]).unwrap();
    assert!(health.borrow().is_none());
}

/// A full disk in the middle of a group rolls back its whole transaction:
/// the controller stops, nobody is told of the group's events, and the
/// store holds what it held before the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_the_disk_rolled_back_stops_the_controller_and_tells_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = controller(dir.path());
    c.group(vec![Msg::FetchFailed {
        message: "before".into(),
    }])
    .unwrap();
    let mut seen = c.events.subscribe();
    c.store.fill_after(1);
    let msgs = vec![
        Msg::FetchFailed {
            message: "fits".into(),
        },
        Msg::FetchFailed {
            message: "x".repeat(64 * 1024),
        },
        Msg::FetchFailed {
            message: "after".into(),
        },
    ];
    let stopped = c.group(msgs).expect_err("the group cannot commit");
    assert!(
        matches!(stopped.0, crate::store::StoreError::GroupLost),
        "{stopped:?}"
    );
    assert!(seen.try_recv().is_err(), "nothing broadcast");
    drop(c);
    let store = Store::open(dir.path()).unwrap();
    let log = store.events(&crate::store::EventQuery::default()).unwrap();
    assert_eq!(
        log.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(),
        ["before"]
    );
    assert_eq!(store.load_status().unwrap(), FleetStatus::replay(&log));
}

/// A controller stopped cleanly first writes the rows that lag the log:
/// the next start has nothing to fold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_writes_the_rows_behind_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = controller(dir.path());
    c.group(vec![Msg::FetchFailed {
        message: "the git server is unreachable".into(),
    }])
    .unwrap();
    assert!(c.store.lagging());
    let cancel = CancellationToken::new();
    cancel.cancel();
    let (_found, found_rx) = mpsc::channel(1);
    let (_requests, requests_rx) = mpsc::channel(1);
    c.run(found_rx, requests_rx, cancel).await.unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let status = store.load_status_to_write().unwrap();
    assert!(!store.lagging(), "rows left behind the log");
    assert!(status.repo.message.is_some(), "{:?}", status.repo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_is_one_transaction_and_is_seen_only_after_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = controller(dir.path());
    let mut seen = c.events.subscribe();
    let msgs = (0..50)
        .map(|i| Msg::FetchFailed {
            message: format!("fetch {i} failed"),
        })
        .collect();
    c.group(msgs).unwrap();
    assert_eq!(reasons(&c).len(), 50);
    let mut n = 0;
    while seen.try_recv().is_ok() {
        n += 1;
    }
    assert_eq!(n, 50, "every event is broadcast, after the commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_events_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = controller(dir.path());
    c.cfg.retention = crate::store::Retention {
        max_events: Some(2),
        max_age: None,
    };
    for _ in 0..5 {
        let status = c.state.projection();
        c.store
            .append(
                status,
                NewEvent::repo(Reason::RevisionDetected, Some("r1"), "new"),
                OffsetDateTime::now_utc(),
            )
            .unwrap();
    }
    let mut rx = c.msg_rx.take().unwrap();
    c.trim_events();
    let msg = rx.recv().await.unwrap();
    assert!(
        matches!(
            msg,
            Msg::Trimmed {
                through: 3,
                deleted: 3
            }
        ),
        "{msg:?}"
    );
    c.group(vec![msg]).unwrap();
    assert_eq!(c.status().repo.trimmed_through, 3);
    let left: Vec<u64> = c
        .store
        .events(&crate::store::EventQuery::default())
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(
        left,
        [4, 5, 6],
        "the newest two and the EventsTrimmed event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_is_in_the_status_feed_before_it_is_made_known() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = controller(dir.path());
    let feed = c.status_feed();
    feed.follow();
    let mut committed = c.committed();
    let step = Msg::Report(Report::Step {
        host: web_1(),
        revision: r1(),
        step: reconcile::Step::BuildStarted,
    });
    c.group(vec![step]).unwrap();
    assert!(committed.has_changed().unwrap());
    let seq = *committed.borrow_and_update();
    let changes = feed.take();
    assert_eq!(changes.repo.map(|r| r.last_seq), Some(seq));
    let stored = c.store.host("web-1").unwrap().expect("a row for web-1");
    let row = changes.hosts["web-1"].row.clone().expect("web-1's row");
    assert_eq!(*row.status, stored);
    assert_eq!(
        serde_json::from_slice::<crate::status::HostStatus>(&row.json).unwrap(),
        stored
    );
    assert!(c.workers.is_empty());
}
