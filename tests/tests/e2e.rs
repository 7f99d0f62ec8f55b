//! End-to-end tests: the real `cim` binary, real nix, real sshd, against a
//! sandbox fleet per test (tests run in parallel; fleets never collide and
//! are torn down even when a test fails).

use std::time::Duration;

use cim_sandbox::harness::{current_system, host_of, Cim};
use cim_sandbox::{host_spec, Fleet};

fn fleet(n: usize) -> (Fleet, tempfile::TempDir) {
    cim_sandbox::harness::fleet_and_state(n)
}

fn state(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("state")
}

#[test]
fn first_convergence_of_three_hosts() {
    let (fleet, dir) = fleet(3);
    let rev = fleet.commit("noop").unwrap();
    let cim = Cim::start(&fleet, &state(&dir), &[]);
    let status = cim.wait_converged(&["web-1", "web-2", "web-3"], Some(&rev));
    assert_eq!(status["revision"], rev.as_str());
    for name in ["web-1", "web-2", "web-3"] {
        let h = host_of(&status, name);
        let on_host = fleet
            .current_system(name)
            .expect("host has a current system");
        assert_eq!(h["currentSystem"], on_host.as_str());
        assert_eq!(h["desiredSystem"], on_host.as_str());
        assert!(
            on_host.ends_with(&format!("nixos-system-{name}-1")),
            "{on_host}"
        );
        assert_eq!(fleet.activations(name), vec![format!("switch {on_host}")]);
        assert_eq!(h["failures"], 0);
    }
    let web1: Vec<String> = cim
        .events()
        .iter()
        .filter(|e| e["host"] == "web-1")
        .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        web1,
        [
            "BuildStarted",
            "BuildSucceeded",
            "CopyStarted",
            "CopySucceeded",
            "ActivationStarted",
            "Converged"
        ]
    );
    let table = cim.cli(&["status"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("3/3 converged"), "{table}");
}

#[test]
fn a_commit_that_changes_one_host_touches_only_that_host() {
    let (fleet, dir) = fleet(3);
    let cim = Cim::start(&fleet, &state(&dir), &[]);
    let first = cim.wait_converged(&["web-1", "web-2", "web-3"], None);
    let seq_before = cim.events().len();

    fleet.set_host_config("web-2", "{ version = 2; }").unwrap();
    let rev = fleet.commit("web-2: version 2").unwrap();
    let status = cim.wait_converged(&["web-1", "web-2", "web-3"], Some(&rev));

    let web2 = fleet.current_system("web-2").unwrap();
    assert!(web2.ends_with("nixos-system-web-2-2"), "{web2}");
    assert_eq!(fleet.activations("web-2").len(), 2);
    for name in ["web-1", "web-3"] {
        assert_eq!(
            fleet.activations(name).len(),
            1,
            "{name} was activated again"
        );
        assert_eq!(
            host_of(&status, name)["currentSystem"],
            host_of(&first, name)["currentSystem"]
        );
    }
    let later = &cim.events()[seq_before..];
    for e in later {
        if e["host"] == "web-1" || e["host"] == "web-3" {
            assert!(
                !["BuildStarted", "CopyStarted", "ActivationStarted"]
                    .contains(&e["reason"].as_str().unwrap()),
                "unchanged host was built or worked on: {e}"
            );
        }
    }
}

#[test]
fn a_commit_with_an_invalid_spec_is_refused() {
    let (fleet, dir) = fleet(2);
    let cim = Cim::start(&fleet, &state(&dir), &[]);
    let good = fleet.commit("start").unwrap();
    cim.wait_converged(&["web-1", "web-2"], Some(&good));

    let h = fleet.host("web-1");
    let bad = format!(
        "{}  colour: blue\n---\n{}",
        host_spec("web-1", &h.address, ""),
        host_spec("web-2", &fleet.host("web-2").address, "")
    );
    fleet.write("specs/fleet.yaml", &bad).unwrap();
    fleet.set_host_config("web-1", "{ version = 2; }").unwrap();
    let rev = fleet.commit("typo").unwrap();
    // The new head is announced before its specs are read; refusing it
    // sets the message.
    let status = cim.wait_until(
        "the invalid revision to be refused",
        Duration::from_secs(30),
        |s| s["latestRevision"] == rev.as_str() && s["message"].is_string(),
    );
    assert_eq!(
        status["revision"],
        good.as_str(),
        "the invalid revision must not be deployed"
    );
    let invalid: Vec<_> = cim
        .events()
        .into_iter()
        .filter(|e| e["reason"] == "SpecInvalid")
        .collect();
    assert_eq!(invalid.len(), 1);
    let msg = invalid[0]["message"].as_str().unwrap();
    assert!(msg.contains("specs/fleet.yaml:8:3"), "{msg}");
    assert!(msg.contains("colour"), "{msg}");
    assert_eq!(invalid[0]["type"], "Warning");
    assert!(status["message"].as_str().unwrap().contains("colour"));

    // Nothing changes on the hosts, even after a while.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(fleet.activations("web-1").len(), 1);
    assert!(fleet.current_system("web-1").unwrap().ends_with("-1"));

    // The next valid commit is picked up.
    fleet
        .write(
            "specs/fleet.yaml",
            &format!(
                "{}---\n{}",
                host_spec("web-1", &h.address, ""),
                host_spec("web-2", &fleet.host("web-2").address, "")
            ),
        )
        .unwrap();
    let fixed = fleet.commit("fix").unwrap();
    cim.wait_converged(&["web-1", "web-2"], Some(&fixed));
    assert!(fleet
        .current_system("web-1")
        .unwrap()
        .ends_with("nixos-system-web-1-2"));

    // `cim validate` gives the same message offline.
    fleet.write("specs/fleet.yaml", &bad).unwrap();
    let out = cim.cli(&["validate", fleet.repo.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("colour"), "{stderr}");
}

#[test]
fn an_evaluation_error_fails_only_that_host() {
    let (fleet, dir) = fleet(3);
    fleet
        .set_host_config("web-2", "throw \"simulated evaluation error in web-2\"")
        .unwrap();
    let rev = fleet.commit("break web-2").unwrap();
    let cim = Cim::start(&fleet, &state(&dir), &[]);
    cim.wait_converged(&["web-1", "web-3"], Some(&rev));
    let status = cim.wait_until("web-2 to fail", Duration::from_secs(60), |s| {
        host_of(s, "web-2")["phase"] == "Failed"
    });
    let web2 = host_of(&status, "web-2");
    assert!(
        web2["message"]
            .as_str()
            .unwrap()
            .contains("simulated evaluation error in web-2"),
        "{web2}"
    );
    let failed = cim.events_of("web-2", "BuildFailed");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["toPhase"], "Failed");
    assert!(fleet.current_system("web-2").is_none());
    assert!(cim.events_of("web-1", "BuildFailed").is_empty());
}

#[test]
fn an_unreachable_host_is_retried_and_converges_when_back() {
    let (fleet, dir) = fleet(3);
    fleet.stop_sshd("web-2").unwrap();
    let rev = fleet.commit("start").unwrap();
    let cim = Cim::start(&fleet, &state(&dir), &[]);
    cim.wait_converged(&["web-1", "web-3"], Some(&rev));
    let status = cim.wait_until("web-2 to be retried", Duration::from_secs(60), |s| {
        host_of(s, "web-2")["failures"].as_u64().unwrap_or(0) >= 2
    });
    let web2 = host_of(&status, "web-2");
    assert_eq!(web2["phase"], "Failed");
    let unreachable = cim.events_of("web-2", "HostUnreachable");
    assert!(unreachable.len() >= 2);
    let msg = unreachable[0]["message"].as_str().unwrap();
    assert!(msg.contains(&fleet.host("web-2").address), "{msg}");

    fleet.start_sshd("web-2").unwrap();
    let status = cim.wait_converged(&["web-2"], Some(&rev));
    assert_eq!(host_of(&status, "web-2")["failures"], 0);
    assert!(fleet.current_system("web-2").is_some());
}

#[test]
fn drift_is_detected_and_repaired_by_resync() {
    let (fleet, dir) = fleet(2);
    let cim = Cim::start(&fleet, &state(&dir), &["--resync-interval", "2s"]);
    let status = cim.wait_converged(&["web-1", "web-2"], None);
    let desired = current_system(&status, "web-1");
    let other = fleet.current_system("web-2").unwrap();
    fleet.switch_by_hand("web-1", &other).unwrap();

    cim.wait_until("drift to be detected", Duration::from_secs(30), |_| {
        !cim.events_of("web-1", "DriftDetected").is_empty()
    });
    cim.wait_until("web-1 back on its system", Duration::from_secs(30), |s| {
        host_of(s, "web-1")["phase"] == "Converged"
            && fleet.current_system("web-1").as_deref() == Some(desired.as_str())
    });
    let drift = &cim.events_of("web-1", "DriftDetected")[0];
    assert_eq!(drift["system"], other.as_str());
    assert_eq!(drift["type"], "Warning");
    assert!(cim.events_of("web-2", "DriftDetected").is_empty());
}

#[test]
fn a_restarted_controller_resumes_from_its_store() {
    let (fleet, dir) = fleet(3);
    let rev = fleet.commit("start").unwrap();
    let mut cim = Cim::start(&fleet, &state(&dir), &[]);
    cim.wait_until("work to start", Duration::from_secs(60), |_| {
        cim.events().iter().any(|e| e["reason"] == "BuildSucceeded")
    });
    cim.kill();
    cim.restart();
    cim.wait_converged(&["web-1", "web-2", "web-3"], Some(&rev));

    cim.assert_gap_free();
    let events = cim.events();
    // The restart did not see the same revision as new.
    assert_eq!(
        events
            .iter()
            .filter(|e| e["reason"] == "RevisionDetected")
            .count(),
        1
    );
    for name in ["web-1", "web-2", "web-3"] {
        assert!(
            fleet.activations(name).len() <= 2,
            "{name}: {:?}",
            fleet.activations(name)
        );
    }

    // With no controller running, the store answers directly.
    cim.kill();
    let out = cim.cli(&[
        "status",
        "-o",
        "json",
        "--state-dir",
        cim.state_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stored["revision"], rev.as_str());
    assert_eq!(host_of(&stored, "web-1")["phase"], "Converged");
}

#[test]
fn suspend_resume_and_removal_follow_the_specs() {
    let (fleet, dir) = fleet(3);
    let cim = Cim::start(&fleet, &state(&dir), &[]);
    cim.wait_converged(&["web-1", "web-2", "web-3"], None);
    let specs = |web3_extra: &str, with_web2: bool| {
        let mut s = host_spec("web-1", &fleet.host("web-1").address, "");
        if with_web2 {
            s.push_str("---\n");
            s.push_str(&host_spec("web-2", &fleet.host("web-2").address, ""));
        }
        s.push_str("---\n");
        s.push_str(&host_spec(
            "web-3",
            &fleet.host("web-3").address,
            web3_extra,
        ));
        s
    };

    // Suspended: a new system for web-3 is not deployed.
    fleet
        .write("specs/fleet.yaml", &specs("  suspend: true\n", true))
        .unwrap();
    fleet.set_host_config("web-3", "{ version = 2; }").unwrap();
    let rev = fleet.commit("suspend web-3").unwrap();
    cim.wait_until("web-3 suspended", Duration::from_secs(30), |s| {
        s["revision"] == rev.as_str() && host_of(s, "web-3")["phase"] == "Suspended"
    });
    assert_eq!(cim.events_of("web-3", "Suspended").len(), 1);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(fleet.activations("web-3").len(), 1);
    let out = cim.cli(&["reconcile", "web-3"]);
    assert!(
        !out.status.success(),
        "reconciling a suspended host must be refused"
    );

    // Removed: web-2 leaves the status but keeps running.
    let before = cim.api_get("/api/v1/status");
    fleet
        .write("specs/fleet.yaml", &specs("  suspend: true\n", false))
        .unwrap();
    let rev = fleet.commit("remove web-2").unwrap();
    cim.wait_until("web-2 removed", Duration::from_secs(30), |s| {
        s["revision"] == rev.as_str() && host_of(s, "web-2").is_null()
    });
    assert_eq!(cim.events_of("web-2", "HostRemoved").len(), 1);
    assert!(
        fleet.current_system("web-2").is_some(),
        "a removed host is left running"
    );
    // A client polling the status asks for what changed since its last
    // answer: the removal, and no row of the removed host.
    let since = before["seq"]
        .as_u64()
        .expect("every status answer has its seq");
    let changes = cim.api_get(&format!("/api/v1/status?since={since}"));
    assert_eq!(changes["since"], since, "{changes}");
    assert!(changes["seq"].as_u64().unwrap() > since, "{changes}");
    assert_eq!(
        changes["removed"],
        serde_json::json!(["web-2"]),
        "{changes}"
    );
    let changed = changes["hosts"].as_array().unwrap();
    assert!(changed.iter().all(|h| h["name"] != "web-2"), "{changes}");

    // Resumed: web-3 gets its new system.
    fleet.write("specs/fleet.yaml", &specs("", false)).unwrap();
    let rev = fleet.commit("resume web-3").unwrap();
    cim.wait_converged(&["web-1", "web-3"], Some(&rev));
    assert_eq!(cim.events_of("web-3", "Resumed").len(), 1);
    assert!(fleet
        .current_system("web-3")
        .unwrap()
        .ends_with("nixos-system-web-3-2"));
}

#[test]
fn reconcile_on_request_and_the_event_stream() {
    let (fleet, dir) = fleet(2);
    fleet
        .set_host_config("web-2", "throw \"broken web-2\"")
        .unwrap();
    let rev = fleet.commit("start").unwrap();
    let cim = Cim::start(&fleet, &state(&dir), &[]);
    cim.wait_converged(&["web-1"], Some(&rev));
    cim.wait_until("web-2 build failure", Duration::from_secs(30), |s| {
        host_of(s, "web-2")["phase"] == "Failed"
    });

    // A build failure is only retried on request.
    let out = cim.cli(&["reconcile", "web-2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("reconciling web-2"));
    cim.wait_until("a second build failure", Duration::from_secs(30), |_| {
        cim.events_of("web-2", "BuildFailed").len() == 2
    });
    assert_eq!(cim.events_of("web-2", "ReconcileRequested").len(), 1);
    let out = cim.cli(&["reconcile", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no host `nope`"));

    // The stream resumes after Last-Event-ID, then follows live events.
    let addr = cim.api.trim_start_matches("http://").to_string();
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    use std::io::{BufRead, Write};
    write!(
        stream,
        "GET /api/v1/events/stream HTTP/1.1\r\nHost: {addr}\r\nLast-Event-ID: 3\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut reader = std::io::BufReader::new(stream);
    let total = cim.events().len() as u64;
    let mut ids = Vec::new();
    let mut line = String::new();
    let mut requested = false;
    while ids.last().copied().unwrap_or(0) <= total {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if let Some(id) = line.trim().strip_prefix("id:") {
            ids.push(id.trim().parse::<u64>().unwrap());
        }
        if !requested && ids.last() == Some(&total) {
            // Everything stored was replayed; now cause a live event.
            assert!(cim.cli(&["reconcile", "web-1"]).status.success());
            requested = true;
        }
    }
    assert_eq!(
        ids.first(),
        Some(&4),
        "replay must start after Last-Event-ID"
    );
    assert_eq!(
        ids,
        (4..=ids.len() as u64 + 3).collect::<Vec<_>>(),
        "gaps or repeats"
    );
    assert!(*ids.last().unwrap() > total, "no live event arrived");

    // `cim events --follow` prints the log and keeps going.
    let mut follow = std::process::Command::new(cim_sandbox::harness::cim_bin())
        .args(["events", "--follow", "--api", &cim.api])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(follow.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(first.contains("RevisionDetected"), "{first}");
}

#[test]
fn fetch_failures_are_reported_and_do_not_stop_reconciling() {
    let (fleet, dir) = fleet(1);
    let cim = Cim::start(&fleet, &state(&dir), &["--resync-interval", "2s"]);
    cim.wait_converged(&["web-1"], None);
    let moved = fleet.repo.with_extension("moved");
    std::fs::rename(&fleet.repo, &moved).unwrap();
    let status = cim.wait_until("a fetch failure", Duration::from_secs(30), |s| {
        s["message"]
            .as_str()
            .is_some_and(|m| m.contains("fetching branch `main`"))
    });
    let failed: Vec<_> = cim
        .events()
        .into_iter()
        .filter(|e| e["reason"] == "FetchFailed")
        .collect();
    assert!(!failed.is_empty(), "{status}");
    assert_eq!(failed[0]["type"], "Warning");

    // Drift is still repaired while git is unreachable.
    fleet
        .switch_by_hand(
            "web-1",
            "/nix/store/00000000000000000000000000000000-elsewhere",
        )
        .unwrap();
    cim.wait_until("drift repaired without git", Duration::from_secs(30), |s| {
        host_of(s, "web-1")["phase"] == "Converged"
            && fleet
                .current_system("web-1")
                .is_some_and(|c| c.ends_with("nixos-system-web-1-1"))
            && !cim.events_of("web-1", "DriftDetected").is_empty()
    });

    std::fs::rename(&moved, &fleet.repo).unwrap();
    fleet.set_host_config("web-1", "{ version = 2; }").unwrap();
    let rev = fleet.commit("back").unwrap();
    cim.wait_converged(&["web-1"], Some(&rev));
}

#[test]
fn a_commit_that_fails_evaluation_everywhere_touches_nothing() {
    let (fleet, dir) = fleet(2);
    let cim = Cim::start(&fleet, &state(&dir), &[]);
    cim.wait_converged(&["web-1", "web-2"], None);
    let before: Vec<_> = ["web-1", "web-2"]
        .iter()
        .map(|h| fleet.current_system(h))
        .collect();

    fleet
        .write(
            "flake.nix",
            "{ outputs = { self }: throw \"the whole flake is broken\"; }\n",
        )
        .unwrap();
    let bad = fleet.commit("break the flake").unwrap();
    cim.wait_until(
        "both hosts to fail their build",
        Duration::from_secs(60),
        |s| {
            ["web-1", "web-2"]
                .iter()
                .all(|h| host_of(s, h)["phase"] == "Failed" && s["revision"] == bad.as_str())
        },
    );
    for (i, h) in ["web-1", "web-2"].iter().enumerate() {
        let failed = cim.events_of(h, "BuildFailed");
        assert!(failed[0]["message"]
            .as_str()
            .unwrap()
            .contains("the whole flake is broken"));
        assert_eq!(fleet.current_system(h), before[i], "{h} was touched");
        assert_eq!(fleet.activations(h).len(), 1);
        assert!(
            cim.events_of(h, "CopyStarted").len() == 1,
            "{h} was copied to again"
        );
    }
}

#[test]
fn a_spec_naming_a_missing_configuration_is_refused() {
    let (fleet, dir) = fleet(2);
    let cim = Cim::start(&fleet, &state(&dir), &[]);
    let good = cim.wait_converged(&["web-1", "web-2"], None)["revision"]
        .as_str()
        .unwrap()
        .to_string();
    fleet
        .write_host_specs(&[("web-1", "  configuration: web-9\n"), ("web-2", "")])
        .unwrap();
    fleet.set_host_config("web-2", "{ version = 2; }").unwrap();
    let bad = fleet
        .commit("point web-1 at a configuration that does not exist")
        .unwrap();
    let status = cim.wait_until("the revision to be refused", Duration::from_secs(30), |s| {
        s["latestRevision"] == bad.as_str() && s["message"].is_string()
    });
    assert_eq!(
        status["revision"],
        good.as_str(),
        "nothing of the bad revision is deployed"
    );
    let invalid: Vec<_> = cim
        .events()
        .into_iter()
        .filter(|e| e["reason"] == "SpecInvalid")
        .collect();
    let msg = invalid[0]["message"].as_str().unwrap();
    assert!(
        msg.contains("specs/fleet.yaml:8:18: configuration `web-9` of host `web-1`"),
        "{msg}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        fleet.activations("web-2").len(),
        1,
        "web-2 must not get version 2 either"
    );
}
