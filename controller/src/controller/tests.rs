//! Unit tests of the controller's rules that need its task's state:
//! worker crashes, a store that refuses writes, retention, what follows a
//! revision's evaluation, retries with backoff, holds after a failed
//! activation.

use super::*;

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
    };
    let store = Store::open(dir).unwrap();
    Controller::new(cfg, DriverConfig::default(), store, Arc::new(Notify::new())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_panics_is_a_failed_reconcile_of_its_host() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = controller(dir.path());
    assert!(c.queue.claim("web-1"));
    c.spawn_worker("web-1", "r1", async { panic!("boom in a worker") });
    let joined = c.workers.join_next_with_id().await.unwrap();
    let report = c
        .worker_ended(joined)
        .expect("a report for the crashed worker");
    let Report::Done {
        host,
        revision,
        outcome,
    } = report
    else {
        panic!("not a Done report");
    };
    assert_eq!((host.as_str(), revision.as_str()), ("web-1", "r1"));
    let reconcile::Outcome::Failed { reason, message } = &outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(*reason, Reason::WorkerCrashed);
    assert!(message.contains("boom in a worker"), "{message}");
    // Handled like any report: the slot is free again.
    c.handle(Msg::Report(Report::Done {
        host,
        revision,
        outcome,
    }));
    assert!(!c.queue.is_running("web-1"));
    assert!(c.worker_hosts.is_empty());
}

fn one_host(c: &mut Controller) {
    let fleet = crate::spec::parse_fleet(&[crate::spec::SpecFile {
        path: "specs/a.yaml".into(),
        contents:
            b"apiVersion: cim/v1\nkind: Host\nmetadata: {name: web-1}\nspec: {address: 10.0.0.2}\n"
                .to_vec(),
    }])
    .unwrap();
    c.specs = Some(("r1".to_string(), fleet));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_the_store_refuses_is_not_carried_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = controller(dir.path());
    one_host(&mut c);
    break_store(dir.path(), true);
    let health = c.health();
    let answer = c.on_rollback("web-1");
    let err = answer.expect_err("the request must fail");
    assert!(err.contains("not carried out"), "{err}");
    assert!(health
        .borrow()
        .as_deref()
        .is_some_and(|why| why.contains("refuses writes")));
    // Not suspended, not rolled back, and no new work starts.
    assert!(!c.operator_suspended("web-1"));
    assert!(c.workers.is_empty());
    c.queue.enqueue("web-1", Instant::now());
    c.dispatch();
    assert!(c.workers.is_empty() && !c.queue.is_running("web-1"));
    // Once the store takes writes again, work resumes and the request
    // can be made again.
    c.check_store();
    assert!(c.store_failure.is_some(), "the store is still broken");
    break_store(dir.path(), false);
    c.check_store();
    assert!(c.store_failure.is_none());
    assert!(health.borrow().is_none());
    // (Busy, so that the rollback waits instead of connecting.)
    assert!(c.queue.claim("web-1"));
    assert!(c.on_rollback("web-1").is_ok());
    assert!(c.operator_suspended("web-1"));
    assert!(c.pending_rollbacks.contains("web-1"));
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
        c.record(NewEvent::repo(Reason::RevisionDetected, Some("r1"), "new"));
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
    c.handle(msg);
    assert_eq!(c.status.repo.trimmed_through, 3);
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
async fn a_worker_that_ends_normally_reports_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = controller(dir.path());
    c.spawn_worker("web-1", "r1", async {});
    let joined = c.workers.join_next_with_id().await.unwrap();
    assert!(c.worker_ended(joined).is_none());
    assert!(c.worker_hosts.is_empty());
}

fn fleet_of(hosts: &[(&str, &str)]) -> FleetSpec {
    let text: String = hosts
        .iter()
        .map(|(name, conf)| {
            format!(
                "---\napiVersion: cim/v1\nkind: Host\nmetadata: {{name: {name}}}\nspec: {{address: 10.0.0.2, configuration: {conf}}}\n"
            )
        })
        .collect();
    crate::spec::parse_fleet(&[crate::spec::SpecFile {
        path: "specs/a.yaml".into(),
        contents: text.into_bytes(),
    }])
    .unwrap()
}

fn system(name: &str) -> crate::driver::Toplevel {
    let hash = "smz0ldh5h3kwdxlgw2whndrb1k4ha03j";
    crate::driver::Toplevel {
        drv: StorePath::parse(&format!("/nix/store/{hash}-{name}.drv")).unwrap(),
        out: StorePath::parse(&format!("/nix/store/{hash}-{name}")).unwrap(),
    }
}

/// Hands the controller the result of its evaluation of `revision`.
fn evaluated(
    c: &mut Controller,
    revision: &str,
    purpose: Purpose,
    result: Result<driver::Evaluation, String>,
) {
    c.evaluation = Some((revision.to_string(), tokio::spawn(async {})));
    c.on_evaluated(revision.to_string(), purpose, result);
}

fn reasons(c: &Controller) -> Vec<String> {
    c.store
        .events(&crate::store::EventQuery::default())
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}{}",
                e.reason,
                e.host
                    .as_deref()
                    .map(|h| format!(" {h}"))
                    .unwrap_or_default()
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_naming_a_missing_configuration_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = controller(dir.path());
    let fleet = fleet_of(&[("web-1", "web-1"), ("web-2", "web-9")]);
    let evaluation = driver::Evaluation {
        names: vec!["web-1".into(), "web-2".into()],
        systems: [("web-1".to_string(), Ok(system("web-1")))].into(),
    };
    evaluated(&mut c, "r1", Purpose::New(fleet), Ok(evaluation));
    assert_eq!(reasons(&c), ["SpecInvalid"]);
    assert!(c.specs.is_none() && c.desired.is_empty());
    assert_eq!(
        c.queue.next_due(),
        None,
        "nothing of the revision is queued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evaluated_revision_queues_its_hosts_and_fails_only_the_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = controller(dir.path());
    let fleet = fleet_of(&[("web-1", "web-1"), ("web-2", "web-2")]);
    let evaluation = driver::Evaluation {
        names: vec!["web-1".into(), "web-2".into()],
        systems: [
            ("web-1".to_string(), Ok(system("web-1"))),
            ("web-2".to_string(), Err("error: boom in web-2".to_string())),
        ]
        .into(),
    };
    evaluated(&mut c, "r1", Purpose::New(fleet), Ok(evaluation));
    assert_eq!(reasons(&c), ["SpecsLoaded", "BuildFailed web-2"]);
    assert_eq!(c.desired["web-1"], system("web-1"));
    assert!(!c.desired.contains_key("web-2"));
    assert!(c.queue.is_queued("web-1") && !c.queue.is_queued("web-2"));
    // A stale result (of a revision no longer evaluated) changes nothing.
    c.on_evaluated("r0".into(), Purpose::Refresh, Err("late".into()));
    assert_eq!(reasons(&c).len(), 2);
}

/// `web-1` at revision r1, with its system evaluated, and a worker on it.
fn working_on_web_1(dir: &std::path::Path) -> Controller {
    let mut c = controller(dir);
    c.specs = Some(("r1".to_string(), fleet_of(&[("web-1", "web-1")])));
    c.desired.insert("web-1".into(), system("web-1"));
    assert!(c.queue.claim("web-1"));
    c
}

fn done(c: &mut Controller, outcome: reconcile::Outcome) {
    c.handle(Msg::Report(Report::Done {
        host: "web-1".into(),
        revision: "r1".into(),
        outcome,
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reconcile_is_retried_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = working_on_web_1(dir.path());
    let before = Instant::now();
    done(
        &mut c,
        reconcile::Outcome::Failed {
            reason: Reason::HostUnreachable,
            message: "connection refused".into(),
        },
    );
    let h = &c.status.hosts["web-1"];
    assert_eq!((h.phase, h.failures), (crate::event::Phase::Failed, 1));
    assert!(h.next_retry.is_some());
    assert!(!c.queue.is_running("web-1"));
    let due = c.queue.next_due().expect("a retry is scheduled");
    assert!(
        due >= before + c.cfg.backoff_base,
        "retried after the backoff"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_activation_holds_the_host_until_asked_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = working_on_web_1(dir.path());
    let previous = "/nix/store/b7nkhawyf3jpg51m457xsvxfajiicixb-nixos-system-web-1-0";
    done(
        &mut c,
        reconcile::Outcome::ActivationFailed {
            message: "switch-to-configuration exited with 1".into(),
            rollback: reconcile::Rollback::RolledBack {
                to: previous.into(),
            },
        },
    );
    assert_eq!(reasons(&c), ["ActivationFailed web-1", "RolledBack web-1"]);
    assert!(c.held("web-1"));
    assert_eq!(
        c.status.hosts["web-1"].current_system.as_deref(),
        Some(previous)
    );
    // Resyncs leave a held host alone; an operator's reconcile does not.
    c.resync();
    assert!(!c.queue.is_queued("web-1"));
    assert!(c.on_reconcile(Some("web-1".into())).is_ok());
    assert!(!c.held("web-1"));
    assert!(c.queue.is_queued("web-1"));
}
