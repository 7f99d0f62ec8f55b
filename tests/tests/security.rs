//! End-to-end tests of cim's trust boundaries with the real binary: who may
//! drive the API (a token, no cross-site requests, no rebound host names,
//! no open listener without a token).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use cim_sandbox::harness::{cim_bin, fleet_and_state as fleet, Cim};

/// A raw HTTP/1.1 request; the status code and body.
fn http(api: &str, request_line: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let addr = api.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!("{request_line} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    // A server that drops the connection (TLS expected) answers nothing.
    let _ = s.read_to_end(&mut raw);
    let out = String::from_utf8_lossy(&raw);
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (code, body)
}

#[test]
fn the_api_refuses_other_sites_forms_and_missing_tokens() {
    let (fleet, dir) = fleet(1);
    let token_file = dir.path().join("api-token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let cim = Cim::start(
        &fleet,
        &dir.path().join("state"),
        &["--api-token-file", token_file.to_str().unwrap()],
    );
    let json = ("Content-Type", "application/json");
    let bearer = ("Authorization", "Bearer s3cret-token");

    // An HTML form posted from any page.
    let form = ("Content-Type", "application/x-www-form-urlencoded");
    let (code, _) = http(
        &cim.api,
        "POST /api/v1/hosts/web-1/rollback",
        &[form, bearer],
        "",
    );
    assert_eq!(code, 415);
    // A cross-site fetch, even one that somehow had the token.
    let origin = ("Origin", "https://evil.example");
    let (code, body) = http(
        &cim.api,
        "POST /api/v1/reconcile",
        &[json, origin, bearer],
        "{}",
    );
    assert_eq!(code, 403, "{body}");
    let fetch = ("Sec-Fetch-Site", "cross-site");
    let (code, _) = http(
        &cim.api,
        "POST /api/v1/reconcile",
        &[json, fetch, bearer],
        "{}",
    );
    assert_eq!(code, 403);
    // No token, a wrong one.
    let (code, body) = http(&cim.api, "POST /api/v1/reconcile", &[json], "{}");
    assert_eq!(code, 401, "{body}");
    let wrong = ("Authorization", "Bearer s3cret-tokeN");
    let (code, _) = http(&cim.api, "POST /api/v1/reconcile", &[json, wrong], "{}");
    assert_eq!(code, 401);
    // A page whose name was rebound to 127.0.0.1 reads nothing.
    let port = cim.api.rsplit(':').next().unwrap().to_string();
    let rebound = format!("evil.example:{port}");
    let (code, _) = http(&cim.api, "GET /api/v1/status", &[("Host", &rebound)], "");
    assert_eq!(code, 421);
    // Reads on loopback need no token; the right token is accepted.
    let (code, _) = http(&cim.api, "GET /api/v1/status", &[], "");
    assert_eq!(code, 200);
    let (code, body) = http(&cim.api, "POST /api/v1/reconcile", &[json, bearer], "{}");
    assert!(code == 202 || code == 409, "{code} {body}");
    // Nothing was rolled back or requested by the refused requests.
    assert!(cim.events_of("web-1", "RollbackRequested").is_empty());

    // The CLI shows the token from CIM_API_TOKEN, or refuses without it.
    let cli = |token: Option<&str>| {
        let mut c = Command::new(cim_bin());
        c.args(["reconcile", "--all"])
            .env("CIM_API", &cim.api)
            .env_remove("CIM_API_TOKEN")
            .stdin(Stdio::null());
        if let Some(t) = token {
            c.env("CIM_API_TOKEN", t);
        }
        c.output().unwrap()
    };
    let refused = cli(None);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("API token"));
    let out = cli(Some("s3cret-token"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The token appears in no log line.
    assert!(!cim.log().contains("s3cret-token"));
}

#[test]
fn an_api_open_to_the_network_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(cim_bin())
        .args([
            "run",
            "--repo",
            "/nonexistent",
            "--listen",
            "0.0.0.0:0",
            "--state-dir",
        ])
        .arg(dir.path().join("state"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--api-token-file"), "{stderr}");
}

#[test]
fn a_hanging_evaluation_times_out_and_the_next_commit_deploys() {
    let (fleet, dir) = fleet(1);
    let cim = Cim::start(&fleet, &dir.path().join("state"), &["--eval-timeout", "4s"]);
    cim.wait_converged(&["web-1"], None);
    // An import-from-derivation whose build takes far longer than the
    // evaluation may: the evaluation waits for it.
    fleet
        .set_host_config(
            "web-1",
            r#"let hang = derivation { name = "hang"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "/bin/sleep 120" ]; };
               in { version = builtins.readFile "${hang}"; }"#,
        )
        .unwrap();
    fleet.commit("web-1: an evaluation that hangs").unwrap();
    cim.wait_until("the evaluation timed out", Duration::from_secs(60), |_| {
        cim.events_of("web-1", "BuildFailed").iter().any(|e| {
            e["message"]
                .as_str()
                .unwrap_or("")
                .contains("did not finish within 4s")
        })
    });
    fleet.set_host_config("web-1", "{ version = 2; }").unwrap();
    let fixed = fleet.commit("web-1: version 2").unwrap();
    cim.wait_converged(&["web-1"], Some(&fixed));
    // The hanging build was stopped with the evaluation, not orphaned.
    assert!(!processes().iter().any(|c| c.contains("/bin/sleep 120")));
}

/// Every process's command line.
fn processes() -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .collect()
}

/// A new ed25519 key pair `DIR/NAME`, `DIR/NAME.pub`; the public key line.
fn ssh_key(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, String) {
    let key = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    (key, public.trim().to_string())
}

#[test]
fn only_commits_signed_by_an_allowed_key_are_deployed_and_rewrites_wait() {
    let (fleet, dir) = fleet(1);
    let (alice, alice_pub) = ssh_key(dir.path(), "alice");
    let (mallory, _) = ssh_key(dir.path(), "mallory");
    let signers = dir.path().join("allowed_signers");
    std::fs::write(&signers, format!("alice@example.org {alice_pub}\n")).unwrap();
    let unsigned = fleet.head().unwrap();
    let cim = Cim::start(
        &fleet,
        &dir.path().join("state"),
        &[
            "--require-signed-commits",
            "--allowed-signers",
            signers.to_str().unwrap(),
            "--refuse-rewrites",
        ],
    );
    // The fleet's first commit is not signed: nothing is deployed.
    cim.wait_until("the unsigned head refused", Duration::from_secs(30), |s| {
        s["message"]
            .as_str()
            .is_some_and(|m| m.contains("is not signed"))
    });
    assert!(cim.events_of("web-1", "Converged").is_empty());
    assert!(fleet.activations("web-1").is_empty());

    // Signed by alice: deployed.
    let signed = fleet.commit_signed("signed by alice", &alice).unwrap();
    cim.wait_converged(&["web-1"], Some(&signed));

    // Signed by a key nobody allowed: refused, the host stays.
    fleet.set_host_config("web-1", "{ version = 2; }").unwrap();
    let forged = fleet.commit_signed("signed by mallory", &mallory).unwrap();
    cim.wait_until(
        "the untrusted signer refused",
        Duration::from_secs(30),
        |s| {
            s["latestRevision"] == forged.as_str()
                && s["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("does not allow"))
        },
    );
    assert_eq!(cim.status()["revision"], signed.as_str());

    // A new commit on alice's, and the branch forced onto it in one move:
    // it no longer descends from mallory's head, so it waits for `cim
    // accept`.
    fleet.git(&["checkout", "-q", "--detach", &signed]).unwrap();
    fleet.set_host_config("web-1", "{ version = 3; }").unwrap();
    let rewritten = fleet.commit_signed("version 3, signed", &alice).unwrap();
    fleet
        .git(&["checkout", "-q", "-B", "main", &rewritten])
        .unwrap();
    cim.wait_until("the rewrite reported", Duration::from_secs(30), |s| {
        s["latestRevision"] == rewritten.as_str()
            && s["message"]
                .as_str()
                .is_some_and(|m| m.contains("cim accept"))
    });
    assert_eq!(cim.status()["revision"], signed.as_str());
    let out = cim.cli(&["accept", &rewritten[..12]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cim.wait_converged(&["web-1"], Some(&rewritten));
    assert_ne!(unsigned, rewritten);
}

#[test]
fn a_host_presenting_another_key_is_never_deployed_to() {
    let (fleet, dir) = fleet(3);
    // web-1 pins its key in its spec; web-2 relies on the known_hosts of
    // the ssh config; web-3 pins a key it does not have (web-1's), which
    // the pin refuses although the ssh config's known_hosts has its own.
    let pinned = fleet.host_key("web-1").unwrap();
    let pin = format!("  hostKey: \"{pinned}\"\n");
    let specs = [
        cim_sandbox::host_spec("web-1", &fleet.host("web-1").address, &pin),
        cim_sandbox::host_spec("web-2", &fleet.host("web-2").address, ""),
        cim_sandbox::host_spec("web-3", &fleet.host("web-3").address, &pin),
    ]
    .join("---\n");
    fleet.write("specs/fleet.yaml", &specs).unwrap();
    let first = fleet.commit("web-1 pins its host key").unwrap();
    let cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_converged(&["web-1", "web-2"], Some(&first));
    cim.wait_until("web-3's wrong pin refused", Duration::from_secs(30), |_| {
        !cim.events_of("web-3", "HostKeyMismatch").is_empty()
    });
    assert!(fleet.activations("web-3").is_empty());

    fleet.swap_host_key("web-1").unwrap();
    fleet.swap_host_key("web-2").unwrap();
    let before = (fleet.activations("web-1"), fleet.activations("web-2"));
    fleet.set_host_config("web-1", "{ version = 2; }").unwrap();
    fleet.set_host_config("web-2", "{ version = 2; }").unwrap();
    fleet.commit("both hosts change").unwrap();
    cim.wait_until("both keys refused", Duration::from_secs(60), |_| {
        ["web-1", "web-2"]
            .iter()
            .all(|h| !cim.events_of(h, "HostKeyMismatch").is_empty())
    });
    let refused = &cim.events_of("web-1", "HostKeyMismatch")[0];
    assert_eq!(refused["type"], "Warning");
    assert!(
        refused["nextRetry"].is_string(),
        "retried with backoff: {refused}"
    );
    assert_eq!(
        (fleet.activations("web-1"), fleet.activations("web-2")),
        before,
        "nothing was deployed to a host with another key"
    );
}

#[test]
fn a_signed_push_hook_fetches_at_once_and_a_forged_one_is_ignored() {
    let (fleet, dir) = fleet(1);
    let secret = dir.path().join("hook-secret");
    std::fs::write(&secret, "hook-secret\n").unwrap();
    // A URL, so the repository is polled (hourly), not watched.
    let url = format!("file://{}", fleet.repo.display());
    let cim = Cim::start_from(
        &fleet,
        url.as_ref(),
        &dir.path().join("state"),
        &[
            "--poll-interval",
            "1h",
            "--webhook-secret-file",
            secret.to_str().unwrap(),
        ],
    );
    cim.wait_converged(&["web-1"], None);
    fleet.set_host_config("web-1", "{ version = 2; }").unwrap();
    let pushed = fleet.commit("version 2").unwrap();
    let body = r#"{"ref":"refs/heads/main"}"#;
    let hmac = |key: &str| {
        let out = Command::new("openssl")
            .args(["dgst", "-sha256", "-hmac", key, "-hex"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().unwrap().write_all(body.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        format!("sha256={}", text.split_whitespace().last().unwrap())
    };
    let json = ("Content-Type", "application/json");
    let forged = hmac("guess");
    let (code, _) = http(
        &cim.api,
        "POST /hooks/git",
        &[json, ("X-Hub-Signature-256", &forged)],
        body,
    );
    assert_eq!(code, 401);
    std::thread::sleep(Duration::from_secs(2));
    assert_ne!(
        cim.status()["latestRevision"],
        pushed.as_str(),
        "a forged hook fetched"
    );
    let signed = hmac("hook-secret");
    let (code, body) = http(
        &cim.api,
        "POST /hooks/git",
        &[
            json,
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &signed),
        ],
        body,
    );
    assert_eq!(code, 202, "{body}");
    cim.wait_converged(&["web-1"], Some(&pushed));
}

#[test]
fn a_host_that_refuses_root_is_deployed_to_through_sudo() {
    let (fleet, dir) = fleet(1);
    fleet.refuse_root("web-1").unwrap();
    let spec = cim_sandbox::host_spec(
        "web-1",
        &fleet.host("web-1").address,
        "  user: cim-sandbox\n  sudo: true\n",
    );
    fleet.write("specs/fleet.yaml", &spec).unwrap();
    let revision = fleet.commit("web-1 logs in as cim-sandbox").unwrap();
    // Root really is refused there.
    let root = Command::new("ssh")
        .arg("-F")
        .arg(&fleet.ssh_config)
        .arg(format!("root@{}", fleet.host("web-1").address))
        .arg("true")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!root.status.success(), "root may still log in");
    let cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_converged(&["web-1"], Some(&revision));
    assert_eq!(fleet.activations("web-1").len(), 1);
    // A confirmed activation and its confirmation went through sudo too.
    fleet.set_host_config("web-1", "{ version = 2; }").unwrap();
    let second = fleet.commit("version 2").unwrap();
    cim.wait_converged(&["web-1"], Some(&second));
    assert!(!fleet.watchdog_pending("web-1"));
}

#[test]
fn the_api_can_be_served_over_tls() {
    let (fleet, dir) = fleet(1);
    // A CA, and the API's certificate for 127.0.0.1 signed by it.
    let file = |name: &str| dir.path().join(name);
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p256 = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let path = |name: &str| file(name).to_str().unwrap().to_string();
    let (ca, ca_key, csr, cert, key, ext) = (
        path("ca.crt"),
        path("ca.key"),
        path("api.csr"),
        path("api.crt"),
        path("api.key"),
        path("api.ext"),
    );
    openssl(
        &[
            &["req", "-x509"][..],
            &p256,
            &[
                "-days",
                "1",
                "-subj",
                "/CN=cim test CA",
                "-keyout",
                &ca_key,
                "-out",
                &ca,
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &p256,
            &["-subj", "/CN=cim", "-keyout", &key, "-out", &csr],
        ]
        .concat(),
    );
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &ext,
        "-out",
        &cert,
    ]);
    let cim = Cim::start_tls(
        &fleet,
        &dir.path().join("state"),
        &file("api.crt"),
        &file("api.key"),
        &file("ca.crt"),
    );
    cim.wait_converged(&["web-1"], None);
    // Plain HTTP gets no answer; a client that does not trust the
    // certificate is refused.
    let addr = cim.api.trim_start_matches("https://");
    let (code, _) = http(&format!("http://{addr}"), "GET /api/v1/status", &[], "");
    assert_ne!(code, 200);
    let untrusting = Command::new(cim_bin())
        .args(["status"])
        .env("CIM_API", &cim.api)
        .env_remove("CIM_API_CA_FILE")
        .output()
        .unwrap();
    assert!(!untrusting.status.success());
}
