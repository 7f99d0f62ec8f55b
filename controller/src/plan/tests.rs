use super::*;

fn closure(paths: &[(&str, u64)]) -> Closure {
    paths
        .iter()
        .map(|(p, s)| (format!("/nix/store/{p}"), *s))
        .collect()
}

#[test]
fn package_names_follow_nix() {
    let cases = [
        ("/nix/store/abc-hello-2.12.1", ("hello", "2.12.1")),
        ("/nix/store/abc-openssl-3.0.8-bin", ("openssl", "3.0.8")),
        ("/nix/store/abc-linux-6.1-modules", ("linux", "6.1")),
        ("/nix/store/abc-etc", ("etc", "")),
        (
            "/nix/store/abc-unit-nginx.service",
            ("unit-nginx.service", ""),
        ),
        (
            "/nix/store/abc-nixos-system-web-1-3",
            ("nixos-system-web", "1-3"),
        ),
        (
            "/nix/store/abc-python3.11-requests-2.31.0",
            ("python3.11-requests", "2.31.0"),
        ),
        ("no-slash", ("slash", "")),
        ("", ("", "")),
    ];
    for (path, (name, version)) in cases {
        assert_eq!(
            package_of(path),
            (name.to_string(), version.to_string()),
            "{path}"
        );
    }
}

#[test]
fn versions_compare_like_nix() {
    use std::cmp::Ordering::*;
    for (a, b, want) in [
        ("1.0", "2.3", Less),
        ("2.1", "2.3", Less),
        ("2.3", "2.3", Equal),
        ("2.5", "2.3", Greater),
        ("3.1", "3.1.1", Less),
        ("2.3pre1", "2.3", Less),
        ("2.3.1", "2.3a", Greater),
        ("2.10", "2.9", Greater),
        ("6.1.55", "6.6.1", Less),
        ("", "1", Less),
    ] {
        assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
    }
}

#[test]
fn a_diff_lists_upgrades_additions_removals_and_the_size() {
    let old = closure(&[
        ("a-hello-2.10", 1000),
        ("b-curl-8.0", 2000),
        ("c-gone-1.0", 500),
        ("d-etc", 10),
    ]);
    let new = closure(&[
        ("e-hello-2.12", 1200),
        ("b-curl-8.0", 2000),
        ("f-fresh-0.1", 300),
        ("g-etc", 10),
        ("h-jq-1.6", 100),
    ]);
    let d = diff(&old, &new, &[]);
    let kinds: Vec<(&str, ChangeKind)> = d
        .packages
        .iter()
        .map(|p| (p.name.as_str(), p.kind()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("fresh", ChangeKind::Added),
            ("gone", ChangeKind::Removed),
            ("hello", ChangeKind::Upgraded),
            ("jq", ChangeKind::Added),
        ]
    );
    assert_eq!(d.size_delta(), 100);
    assert_eq!(d.new_paths, 4);
    assert_eq!(
        d.summary(),
        "1 package upgraded, 2 added, 1 removed, +100 B"
    );
    let hello = &d.packages[2];
    assert_eq!(
        (hello.from.clone(), hello.to.clone()),
        (vec!["2.10".into()], vec!["2.12".into()])
    );
}

#[test]
fn the_systems_themselves_are_no_package() {
    let old = closure(&[("a-nixos-system-web-1", 10), ("b-hello-1.0", 5)]);
    let new = closure(&[("c-nixos-system-web-2", 12), ("b-hello-1.0", 5)]);
    let roots = [
        "/nix/store/a-nixos-system-web-1",
        "/nix/store/c-nixos-system-web-2",
    ];
    assert_eq!(
        diff(&old, &new, &roots).summary(),
        "no package changes, +2 B"
    );
}

#[test]
fn a_downgrade_is_called_one_and_no_change_says_so() {
    let old = closure(&[("a-hello-2.12", 1000)]);
    let new = closure(&[("b-hello-2.10", 1000)]);
    assert_eq!(
        diff(&old, &new, &[]).summary(),
        "1 package downgraded, ±0 B"
    );
    assert_eq!(diff(&old, &old, &[]).summary(), "no package changes, ±0 B");
    let big = closure(&[("b-hello-2.12", 1000 + 12 * 1024 * 1024)]);
    assert_eq!(
        diff(&old, &big, &[]).summary(),
        "no package changes, +12.0 MiB"
    );
}

#[test]
fn path_info_of_old_and_new_nix_gives_the_same_closure() {
    let old_format = r#"[
      {"path":"/nix/store/aaa-sys","narSize":10,"references":["/nix/store/bbb-hello-1.0"]},
      {"path":"/nix/store/bbb-hello-1.0","narSize":5,"references":["/nix/store/bbb-hello-1.0"]},
      {"path":"/nix/store/ccc-other","narSize":7,"references":[]}
    ]"#;
    let new_format = r#"{
      "/nix/store/aaa-sys":{"narSize":10,"references":["bbb-hello-1.0"]},
      "/nix/store/bbb-hello-1.0":{"narSize":5,"references":["bbb-hello-1.0"]},
      "/nix/store/ccc-other":{"narSize":7,"references":[]},
      "/nix/store/ddd-invalid":null
    }"#;
    let want = closure(&[("aaa-sys", 10), ("bbb-hello-1.0", 5)]);
    for json in [old_format, new_format] {
        let infos = parse_path_info(json).unwrap();
        assert_eq!(closure_of("/nix/store/aaa-sys", &infos), Some(want.clone()));
        assert_eq!(closure_of("/nix/store/zzz-missing", &infos), None);
    }
    assert!(parse_path_info("not json").is_err());
    assert!(parse_path_info("42").is_err());
}

#[test]
fn dry_activate_output_is_read_into_units() {
    let out = "stopping the following units: x\n\
        would stop the following units: old.service\n\
        would NOT stop the following changed units: dbus.service\n\
        would activate the configuration...\n\
        would restart the following units: nginx.service, sshd.service\n\
        would start the following units: new.service\n\
        would reload the following units: cron.service\n";
    let a = parse_dry_activate(out);
    assert_eq!(a.stop, ["old.service"]);
    assert_eq!(a.restart, ["nginx.service", "sshd.service"]);
    assert_eq!(a.start, ["new.service"]);
    assert_eq!(a.reload, ["cron.service"]);
    assert_eq!(
        a.other,
        [
            "would NOT stop the following changed units: dbus.service",
            "would activate the configuration..."
        ]
    );
    assert!(parse_dry_activate("").is_empty());
}

#[test]
fn a_reboot_is_needed_when_what_boots_changes() {
    let files = |k: &str, i: &str, m: &str| vec![k.to_string(), i.to_string(), m.to_string()];
    let booted = files("/k1", "/i1", "/m1");
    assert!(reboot_for(&booted, &booted).is_empty());
    assert_eq!(
        reboot_for(&booted, &files("/k2", "/i2", "/m1")),
        ["kernel", "initrd"]
    );
    assert_eq!(
        reboot_for(&booted, &files("/k1", "/i1", "/m2")),
        ["kernel-modules"]
    );
    // Unknown on either side: nothing to say.
    assert!(reboot_for(&[], &booted).is_empty());
    assert!(reboot_for(&booted, &[]).is_empty());
}

#[test]
fn sizes_read_well() {
    assert_eq!(size(0), "0 B");
    assert_eq!(size(2048), "2.0 KiB");
    assert_eq!(signed_size(-3 * 1024 * 1024 * 1024), "-3.0 GiB");
}
