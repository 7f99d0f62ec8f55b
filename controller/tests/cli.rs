//! The `cim` binary's offline commands, run as a user would. (Building this
//! test also makes cargo build the `cim` binary that the end-to-end tests in
//! `tests/` run.)

use assert_cmd::Command;

fn repo_with(spec: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("specs")).unwrap();
    std::fs::write(dir.path().join("specs/hosts.yaml"), spec).unwrap();
    dir
}

#[test]
fn validate_accepts_the_example_specs() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::cargo_bin("cim")
        .unwrap()
        .args(["validate", root])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    insta::assert_snapshot!(String::from_utf8_lossy(&out.stdout));
}

#[test]
fn validate_reports_location_and_fails() {
    let dir = repo_with(
        "apiVersion: cim/v1\nkind: Host\nmetadata:\n  name: web-1\nspec:\n  address: 10.0.0.2\n  action: reboot\n",
    );
    let out = Command::cargo_bin("cim")
        .unwrap()
        .args(["validate", dir.path().to_str().unwrap()])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("specs/hosts.yaml:7:"), "{stderr}");
    assert!(stderr.contains("reboot"), "{stderr}");
    assert!(
        stderr.contains("1 problems found") || stderr.contains("1 problem"),
        "{stderr}"
    );
}

#[test]
fn status_without_a_controller_or_store_explains_itself() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::cargo_bin("cim")
        .unwrap()
        .args(["status", "--state-dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no store at"), "{stderr}");

    let out = Command::cargo_bin("cim")
        .unwrap()
        .args(["status", "--api", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach the controller"), "{stderr}");
}

#[test]
fn completions_and_the_manual_come_from_the_same_definitions() {
    for (shell, marker) in [
        ("bash", "_cim()"),
        ("zsh", "#compdef cim"),
        ("fish", "complete -c cim"),
    ] {
        let out = Command::cargo_bin("cim")
            .unwrap()
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(marker), "{shell}: {text}");
        assert!(text.contains("reconcile"), "{shell} completes subcommands");
    }
    let out = Command::cargo_bin("cim")
        .unwrap()
        .arg("man")
        .output()
        .unwrap();
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.starts_with(".ie") && page.contains(".TH cim 1"),
        "{page}"
    );
    assert!(page.contains("reconcile"));
}

/// `cim simulate`, the benchmark's command, in each of its scenarios: every
/// host converges and the report counts the measured change's events
/// alone. (What it measures is for `cim-bench`; nothing here is timed.)
#[test]
fn simulate_reports_one_change_of_a_known_fleet_or_a_first_contact() {
    // A host's reconcile with the latencies below: build (20 ms), copy (5;
    // the summary's remote command, 1 ms, runs during it), activation
    // (start 1, switch 10, confirm over a new connection 5 + 1, prune 1);
    // a host met for the first time is looked at (6 ms) before its build.
    let reconcile = 20 + 5 + 1 + 10 + 5 + 1 + 1;
    let look = 5 + 1;
    // The mode; the events (six a host changed: build started and
    // succeeded, copy started and succeeded, activation started,
    // converged; one a host only looked at; three for the revision, and
    // the waves' starts); the critical path in ms: the evaluation (5),
    // then rounds of 20 hosts (under --policy: the canary, then the 39
    // others; with --changed 5: the 5, then 35 looks).
    for (mode, events, critical_ms) in [
        (&[][..], 40 * 6 + 3, 5 + 2 * reconcile),
        (
            &["--first-contact"][..],
            40 * 6 + 3,
            5 + 2 * (look + reconcile),
        ),
        (&["--policy"][..], 40 * 6 + 3 + 2, 5 + 3 * reconcile),
        (
            &["--changed", "5"][..],
            5 * 6 + 35 + 3,
            5 + reconcile + 2 * look,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut args = vec![
            "simulate",
            "--hosts",
            "40",
            "--max-parallel",
            "20",
            "--connect-ms",
            "5",
            "--command-ms",
            "1",
            "--copy-ms",
            "5",
            "--activate-ms",
            "10",
            "--evaluate-ms",
            "5",
            "--build-ms",
            "20",
            "--state-dir",
            state.to_str().unwrap(),
        ];
        args.extend(mode);
        let out = Command::cargo_bin("cim")
            .unwrap()
            .args(&args)
            .timeout(std::time::Duration::from_secs(120))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{mode:?}: {stdout}");
        let mut lines = stdout.lines();
        assert!(lines.next().unwrap().starts_with("api http://127.0.0.1:"));
        let report: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert_eq!(report["hosts"], 40);
        assert_eq!(report["events"], events, "{mode:?}: {report}");
        let critical = report["criticalPathSeconds"].as_f64().unwrap();
        assert!(
            (critical - f64::from(critical_ms) / 1000.0).abs() < 1e-9,
            "{mode:?}: {report}"
        );
        // The hosts changed are measured apart: the 5 in one round.
        let changed = &report["changed"];
        if mode.first() == Some(&"--changed") {
            assert_eq!(changed["hosts"], 5, "{report}");
            let critical = changed["criticalPathSeconds"].as_f64().unwrap();
            assert!((critical - f64::from(5 + reconcile) / 1000.0).abs() < 1e-9);
            assert!(changed["wallSeconds"].as_f64() <= report["wallSeconds"].as_f64());
        } else {
            assert!(changed.is_null(), "{report}");
        }
    }
}
