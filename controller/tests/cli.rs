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
    // The mode, whether hosts are looked at first, the rounds of 20 hosts
    // (under --policy: the canary, then the 39 others), the events beyond
    // six a host and three for the revision (the waves' starts).
    for (mode, look_first, rounds, waves) in [
        (None, false, 2.0, 0),
        (Some("--first-contact"), true, 2.0, 0),
        (Some("--policy"), false, 3.0, 2),
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
        // Six events a host (build started and succeeded, copy started and
        // succeeded, activation started, converged) and three for the
        // revision: the first revision's looks are not counted.
        assert_eq!(report["events"], 40 * 6 + 3 + waves, "{mode:?}: {report}");
        // Two rounds of one reconcile each, plus the evaluation; a host
        // met for the first time is looked at (6 ms) before its build. The
        // summary's remote command (1 ms) runs during the copy (5 ms).
        let reconcile = 20 + 5 + 1 + 10 + 5 + 1 + 1 + if look_first { 6 } else { 0 };
        let critical = report["criticalPathSeconds"].as_f64().unwrap();
        assert!(
            (critical - (0.005 + rounds * f64::from(reconcile) / 1000.0)).abs() < 1e-9,
            "{mode:?}: {report}"
        );
    }
}
