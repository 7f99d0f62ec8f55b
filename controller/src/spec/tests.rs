//! Tests of spec parsing and validation (hostile input is in
//! `malformed_input.rs`).

use super::error::offset_of;
use super::*;

fn file(path: &str, text: &str) -> SpecFile {
    SpecFile {
        path: path.to_string(),
        contents: text.as_bytes().to_vec(),
    }
}

fn errors_of(files: &[SpecFile]) -> Vec<String> {
    parse_fleet(files)
        .unwrap_err()
        .errors
        .iter()
        .map(ToString::to_string)
        .collect()
}

const WEB: &str = "apiVersion: cim/v1
kind: Host
metadata:
  name: web-1
  labels: {role: web}
spec:
  address: 10.0.0.2
";

#[test]
fn defaults_are_applied() {
    let fleet = parse_fleet(&[file("specs/web.yaml", WEB)]).unwrap();
    let host = &fleet.hosts["web-1"];
    assert_eq!(host.port, 22);
    assert_eq!(host.user, "root");
    assert_eq!(host.configuration, "web-1");
    assert_eq!(host.action, Action::Switch);
    assert!(!host.suspend);
    assert_eq!(host.labels["role"], "web");
}

#[test]
fn several_documents_per_file() {
    let text = format!(
        "{WEB}---\napiVersion: cim/v1\nkind: Host\nmetadata: {{name: db-1}}\nspec:\n  address: db.example.org\n  port: 2222\n  user: deploy\n  configuration: database\n  action: dry-activate\n  suspend: true\n---\n"
    );
    let fleet = parse_fleet(&[file("specs/all.yaml", &text)]).unwrap();
    assert_eq!(fleet.hosts.len(), 2);
    let db = &fleet.hosts["db-1"];
    assert_eq!(db.port, 2222);
    assert_eq!(db.user, "deploy");
    assert_eq!(db.configuration, "database");
    assert_eq!(db.action, Action::DryActivate);
    assert!(db.suspend);
    assert_eq!(db.rollout.confirm_timeout, DEFAULT_CONFIRM_TIMEOUT);
}

#[test]
fn unknown_field_names_file_line_and_column() {
    let text = WEB.replace(
        "  address: 10.0.0.2\n",
        "  address: 10.0.0.2\n  adress: x\n",
    );
    let errs = errors_of(&[file("specs/web.yaml", &text)]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].starts_with("specs/web.yaml:8:"), "{}", errs[0]);
    assert!(errs[0].contains("adress"), "{}", errs[0]);
    assert!(
        !errs[0].contains("at line"),
        "location repeated: {}",
        errs[0]
    );
}

#[test]
fn wrong_type_and_unknown_action_are_located() {
    let text = WEB.replace(
        "  address: 10.0.0.2\n",
        "  address: 10.0.0.2\n  port: many\n",
    );
    let errs = errors_of(&[file("specs/web.yaml", &text)]);
    assert!(errs[0].starts_with("specs/web.yaml:8:"), "{}", errs[0]);

    let text = WEB.replace(
        "  address: 10.0.0.2\n",
        "  address: 10.0.0.2\n  action: reboot\n",
    );
    let errs = errors_of(&[file("specs/web.yaml", &text)]);
    assert!(errs[0].starts_with("specs/web.yaml:8:"), "{}", errs[0]);
    assert!(errs[0].contains("reboot"), "{}", errs[0]);
}

#[test]
fn confirm_timeouts_are_parsed_and_bounded() {
    let with = |t: &str| format!("{WEB}  rollout:\n    confirmTimeout: {t}\n");
    let fleet = parse_fleet(&[file("specs/web.yaml", &with("90s"))]).unwrap();
    assert_eq!(
        fleet.hosts["web-1"].rollout.confirm_timeout,
        Duration::from_secs(90)
    );
    let errs = errors_of(&[file("specs/web.yaml", &with("2w"))]);
    assert!(
        errs[0].starts_with("specs/web.yaml:9:21: invalid confirmTimeout"),
        "{}",
        errs[0]
    );
    let errs = errors_of(&[file("specs/web.yaml", &with("2h"))]);
    assert!(errs[0].contains("between 1s and 1h"), "{}", errs[0]);
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert!(parse_duration("m").is_err());
    assert!(parse_duration("99999999999999999999h").is_err());
}

#[test]
fn health_checks_are_parsed_and_checked() {
    let text = format!(
        "{WEB}  healthChecks:\n    - name: nginx\n      command: [systemctl, is-active, nginx]\n      retries: 5\n    - http: {{url: 'http://10.0.0.2/health', expectedStatus: 204}}\n      timeout: 1s\n      interval: 500ms\n"
    );
    let fleet = parse_fleet(&[file("specs/web.yaml", &text)]).unwrap();
    let checks = &fleet.hosts["web-1"].health_checks;
    assert_eq!(checks.len(), 2);
    assert_eq!(checks[0].name, "nginx");
    assert_eq!(
        checks[0].probe,
        Probe::Command(vec!["systemctl".into(), "is-active".into(), "nginx".into()])
    );
    assert_eq!(checks[0].retries, 5);
    assert_eq!(checks[0].timeout, Duration::from_secs(5));
    assert_eq!(checks[1].name, "check-2");
    assert_eq!(
        checks[1].probe,
        Probe::Http {
            url: "http://10.0.0.2/health".into(),
            expected_status: 204
        }
    );
    assert_eq!(checks[1].interval, Duration::from_millis(500));

    for (bad, why) in [
        ("{command: []}", "needs a program"),
        ("{name: x}", "exactly one"),
        ("{command: [a], http: {url: 'http://a/'}}", "exactly one"),
        ("{http: {url: 'https://a/'}}", "http://"),
        ("{command: [a], retries: 0}", "retries"),
        ("{command: [a], timeout: 0s}", "timeout"),
    ] {
        let text = format!("{WEB}  healthChecks:\n    - {bad}\n");
        let errs = errors_of(&[file("specs/web.yaml", &text)]);
        assert!(
            errs[0].starts_with("specs/web.yaml:9:7: invalid health check"),
            "{bad}: {}",
            errs[0]
        );
        assert!(errs[0].contains(why), "{bad}: {}", errs[0]);
    }
}

#[test]
fn configurations_are_checked_against_the_flake() {
    let text = format!("{WEB}  configuration: web-9\n");
    let fleet = parse_fleet(&[file("specs/web.yaml", &text)]).unwrap();
    let errs = check_configurations(&fleet, &["web-1".into(), "web-2".into()]).unwrap_err();
    let e = errs.errors[0].to_string();
    assert!(
        e.starts_with("specs/web.yaml:8:18: configuration `web-9` of host `web-1`"),
        "{e}"
    );
    assert!(e.contains("it has: web-1, web-2"), "{e}");
    // Defaulted to the name: located at the name.
    let fleet = parse_fleet(&[file("specs/web.yaml", WEB)]).unwrap();
    let e = check_configurations(&fleet, &[]).unwrap_err().errors[0].to_string();
    assert!(e.starts_with("specs/web.yaml:4:9:"), "{e}");
    assert!(check_configurations(&fleet, &["web-1".into()]).is_ok());
}

#[test]
fn bad_and_duplicate_names() {
    let bad = WEB.replace("web-1", "Web_1");
    let errs = errors_of(&[file("specs/bad.yaml", &bad)]);
    assert!(
        errs[0].starts_with("specs/bad.yaml:4:9: invalid host name `Web_1`"),
        "{}",
        errs[0]
    );

    let errs = errors_of(&[file("specs/a.yaml", WEB), file("specs/b.yaml", WEB)]);
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("specs/b.yaml:4:9: duplicate host name `web-1`"),
        "{}",
        errs[0]
    );
    assert!(errs[0].contains("specs/a.yaml"), "{}", errs[0]);
}

#[test]
fn shell_metacharacters_never_pass() {
    for (field, value) in [
        ("address", "-oProxyCommand=touch /tmp/x"),
        ("address", "a;rm -rf /"),
        ("user", "root$(id)"),
        ("configuration", "x\"; builtins.abort \""),
    ] {
        let text = format!("{WEB}  {field}: '{value}'\n")
            .replace("  address: 10.0.0.2\n  address", "  address");
        let res = parse_fleet(&[file("specs/x.yaml", &text)]);
        assert!(res.is_err(), "{field}={value} was accepted");
    }
}

#[test]
fn invalid_utf8_and_huge_files_are_errors() {
    let errs = errors_of(&[SpecFile {
        path: "specs/bin.yaml".into(),
        contents: vec![0xff, 0xfe, b'a'],
    }]);
    assert!(errs[0].contains("not valid UTF-8"), "{}", errs[0]);

    let errs = errors_of(&[SpecFile {
        path: "specs/huge.yaml".into(),
        contents: vec![b' '; MAX_SPEC_FILE_BYTES + 1],
    }]);
    assert!(errs[0].contains("limit"), "{}", errs[0]);
}

#[test]
fn syntax_errors_are_located() {
    let errs = errors_of(&[file("specs/x.yaml", "apiVersion: cim/v1\nkind: [Host\n")]);
    assert!(errs[0].starts_with("specs/x.yaml:"), "{}", errs[0]);
}

#[test]
fn empty_documents_are_skipped() {
    let fleet = parse_fleet(&[file("specs/e.yaml", "---\n# nothing\n")]).unwrap();
    assert!(fleet.hosts.is_empty());
}

#[test]
fn offsets_follow_lines_and_characters() {
    assert_eq!(offset_of("ab\ncd", 2, 2), Some(4));
    assert_eq!(offset_of("ab\ncd", 1, 1), Some(0));
    assert_eq!(offset_of("ab", 5, 1), None);
}

#[test]
fn reboots_generations_and_windows_have_fleet_defaults() {
    let fleet_doc = "apiVersion: cim/v1
kind: Fleet
metadata: {name: fleet}
spec:
  reboot: auto
  rebootTimeout: 5m
  keepGenerations: 4
  windows:
    - {kind: allow, schedule: '0 22 * * *', duration: 8h, timeZone: Europe/Berlin}
    - {kind: deny, schedule: '0 0 24 12 *', duration: 48h}
---
";
    let own = WEB.replace("web-1", "web-2") + "  reboot: never\n  keepGenerations: 3\n";
    let text = format!("{fleet_doc}{WEB}---\n{own}");
    let fleet = parse_fleet(&[file("specs/f.yaml", &text)]).unwrap();
    let web1 = &fleet.hosts["web-1"];
    assert_eq!(web1.reboot(), RebootPolicy::Auto);
    assert_eq!(web1.reboot_timeout(), Duration::from_secs(300));
    assert_eq!(web1.keep_generations(), 4);
    let web2 = &fleet.hosts["web-2"];
    assert_eq!(web2.reboot(), RebootPolicy::Never);
    assert_eq!(web2.keep_generations(), 3);
    assert_eq!(fleet.policy.windows.len(), 2);
    let bare = parse_fleet(&[file("specs/web.yaml", WEB)]).unwrap();
    let web = &bare.hosts["web-1"];
    assert_eq!(web.reboot(), RebootPolicy::Never);
    assert_eq!(web.reboot_timeout(), DEFAULT_REBOOT_TIMEOUT);
    assert_eq!(web.keep_generations(), DEFAULT_KEEP_GENERATIONS);
}

#[test]
fn bad_windows_and_reboot_settings_are_located() {
    let text = "apiVersion: cim/v1
kind: Fleet
metadata: {name: fleet}
spec:
  rebootTimeout: soon
  windows:
    - {kind: allow, schedule: 'every day', duration: 8h}
    - {kind: deny, schedule: '0 9 * * *', duration: 1h, timeZone: Nowhere/Land}
";
    let errors = errors_of(&[file("specs/f.yaml", text)]);
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("specs/f.yaml:5:") && e.contains("rebootTimeout")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("specs/f.yaml:7:") && e.contains("not a cron schedule")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("specs/f.yaml:8:") && e.contains("unknown time zone")),
        "{errors:?}"
    );
    let host = format!("{WEB}  windows: []\n  reboot: sometimes\n");
    assert!(parse_fleet(&[file("specs/h.yaml", &host)]).is_err());
}

#[test]
fn host_only_fields_in_a_fleet_document_are_refused_not_ignored() {
    let text = "apiVersion: cim/v1
kind: Fleet
metadata: {name: fleet}
spec:
  sudo: true
  hostKey: ssh-ed25519 AAAA
";
    let errors = errors_of(&[file("specs/f.yaml", text)]);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("`sudo` belongs in a `kind: Host` document")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("specs/f.yaml:6:") && e.contains("`hostKey` belongs")),
        "{errors:?}"
    );
}

#[test]
fn a_selector_selects_the_hosts_with_every_one_of_its_labels() {
    let labels = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let web_eu = labels(&[("role", "web"), ("region", "eu")]);
    assert!(selects(&labels(&[]), &web_eu), "empty: every host");
    assert!(selects(&labels(&[("role", "web")]), &web_eu));
    assert!(selects(&web_eu, &web_eu));
    assert!(!selects(&labels(&[("role", "db")]), &web_eu));
    assert!(!selects(
        &labels(&[("role", "web"), ("tier", "1")]),
        &web_eu
    ));
    assert!(!selects(&labels(&[("role", "web")]), &labels(&[])));
}
