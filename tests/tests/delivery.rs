//! End-to-end tests of how closures reach hosts besides the controller's
//! own `nix copy`: a real HTTP binary cache the controller pushes to and
//! hosts substitute from, and Nix's remote builders as a pass-through.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cim_sandbox::harness::Cim;
use cim_sandbox::{sh, Fleet};

/// A static directory served over HTTP on the fleet's bridge: a real binary
/// cache, as `nix copy --to file://…` lays it out. Stopped when dropped.
struct HttpCache {
    child: Child,
    url: String,
    log: std::path::PathBuf,
}

impl HttpCache {
    fn serve(fleet: &Fleet, dir: &std::path::Path, log: &std::path::Path) -> HttpCache {
        let addr = fleet.bridge_address();
        let port = std::net::TcpListener::bind((addr.as_str(), 0))
            .and_then(|l| l.local_addr())
            .expect("free port on the bridge")
            .port();
        let stderr = std::fs::File::create(log).expect("log");
        let child = Command::new("python3")
            .args([
                "-u",
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                &addr,
                "--directory",
            ])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("python3 (scripts/setup installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((addr.as_str(), port)).is_err() {
            assert!(Instant::now() < deadline, "the cache server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        HttpCache {
            child,
            url: format!("http://{addr}:{port}"),
            log: log.to_path_buf(),
        }
    }

    /// `(client address, path)` of every GET the server answered with 200.
    fn gets(&self) -> Vec<(String, String)> {
        let file = std::fs::File::open(&self.log).expect("log");
        BufReader::new(file)
            .lines()
            .map_while(Result::ok)
            .filter(|l| l.contains("\" 200 "))
            .filter_map(|l| {
                let client = l.split_whitespace().next()?.to_string();
                let path = l
                    .split("\"GET ")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .to_string();
                Some((client, path))
            })
            .collect()
    }
}

impl Drop for HttpCache {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nonce() -> String {
    format!("{}-{:?}", std::process::id(), std::time::SystemTime::now())
}

#[test]
fn hosts_substitute_from_the_binary_cache_the_controller_pushes_to() {
    let (fleet, dir) = cim_sandbox::harness::fleet_and_state(2);
    let secret = dir.path().join("cache.sec");
    let key = sh(
        "nix",
        &[
            "--extra-experimental-features",
            "nix-command",
            "key",
            "generate-secret",
            "--key-name",
            "cim-sandbox-cache-1",
        ],
    )
    .unwrap();
    std::fs::write(&secret, &key).unwrap();
    let public = Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "key",
            "convert-secret-to-public",
        ])
        .stdin(std::fs::File::open(&secret).unwrap())
        .output()
        .unwrap();
    let public = String::from_utf8_lossy(&public.stdout).trim().to_string();
    assert!(public.starts_with("cim-sandbox-cache-1:"), "{public}");
    let cache_dir = dir.path().join("cache");
    std::fs::create_dir_all(&cache_dir).unwrap();
    let cache = HttpCache::serve(&fleet, &cache_dir, &dir.path().join("http.log"));
    let n = nonce();
    for h in ["web-1", "web-2"] {
        fleet
            .set_host_nix_conf(
                h,
                &format!(
                    "substituters = {}\ntrusted-public-keys = {public}\n",
                    cache.url
                ),
            )
            .unwrap();
        fleet
            .set_host_config(
                h,
                &format!("{{ version = 1; payloadKiB = 64; nonce = \"{n}\"; }}"),
            )
            .unwrap();
    }
    let rev = fleet.commit("closures through the binary cache").unwrap();
    let push = format!("file://{}", cache_dir.display());
    let cim = Cim::start(
        &fleet,
        &dir.path().join("state"),
        &[
            "--push-to-cache",
            &push,
            "--cache-signing-key",
            secret.to_str().unwrap(),
        ],
    );
    let status = cim.wait_converged(&["web-1", "web-2"], Some(&rev));
    let gets = cache.gets();
    for h in ["web-1", "web-2"] {
        let system = cim_sandbox::harness::current_system(&status, h);
        let hash = system
            .trim_start_matches("/nix/store/")
            .split('-')
            .next()
            .unwrap();
        // Pushed once, signed with the cache's key.
        let narinfo = std::fs::read_to_string(cache_dir.join(format!("{hash}.narinfo"))).unwrap();
        assert!(narinfo.contains("Sig: cim-sandbox-cache-1:"), "{narinfo}");
        // The host fetched its closure from the cache, not over the
        // controller's connection.
        let addr = &fleet.host(h).address;
        assert!(
            gets.iter()
                .any(|(c, p)| c == addr && p == &format!("/{hash}.narinfo")),
            "{h} did not ask the cache for {system}: {gets:?}"
        );
        assert!(
            gets.iter()
                .any(|(c, p)| c == addr && p.starts_with("/nar/")),
            "{h} did not download from the cache: {gets:?}"
        );
        assert_eq!(fleet.current_system(h).as_deref(), Some(system.as_str()));
    }
    // The controller never downloads from its own cache.
    let bridge = fleet.bridge_address();
    assert!(gets.iter().all(|(c, _)| *c != bridge), "{gets:?}");
}

#[test]
fn remote_builders_are_a_pass_through_to_nix() {
    let (fleet, dir) = cim_sandbox::harness::fleet_and_state(2);
    let n = nonce();
    fleet
        .set_host_config("web-1", &format!("{{ version = 1; nonce = \"{n}\"; }}"))
        .unwrap();
    let rev = fleet.commit("build web-1 on web-2").unwrap();
    let builder = format!("ssh://root@{} x86_64-linux", fleet.host("web-2").address);
    // max-jobs=0: nothing may be built locally, so web-1's system can only
    // come from the remote builder (reached with cim's ssh settings).
    let cim = Cim::start(
        &fleet,
        &dir.path().join("state"),
        &[
            "--nix-option",
            &format!("builders={builder}"),
            "--nix-option",
            "max-jobs=0",
        ],
    );
    let status = cim.wait_converged(&["web-1", "web-2"], Some(&rev));
    let system = cim_sandbox::harness::current_system(&status, "web-1");
    let name = system.trim_start_matches("/nix/store/").to_string();
    assert!(
        fleet.store_paths("web-2", &name).contains(&name),
        "web-1's system was not built on web-2"
    );
}
