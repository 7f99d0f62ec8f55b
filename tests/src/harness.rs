//! Runs the real `cim` binary against a sandbox fleet, for the end-to-end
//! tests: start and kill the controller, ask it through its own CLI, and wait
//! for conditions with a deadline that reports everything on failure.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::Fleet;

/// The `cim` binary: `$CIM_BIN`, or the one cargo built next to this test.
pub fn cim_bin() -> PathBuf {
    if let Ok(p) = std::env::var("CIM_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("cim");
    assert!(
        bin.exists(),
        "{} does not exist: build it first (`cargo build -p cim`) or set CIM_BIN",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A new sandbox fleet of `n` hosts and a temporary directory for the
/// controller's state (`DIR/state`).
pub fn fleet_and_state(n: usize) -> (Fleet, tempfile::TempDir) {
    let fleet = Fleet::start(n).expect("sandbox fleet");
    let state = tempfile::Builder::new()
        .prefix("cim-state-")
        .tempdir()
        .expect("state dir");
    (fleet, state)
}

/// A running `cim run`, killed when dropped.
pub struct Cim {
    child: Option<Child>,
    pub api: String,
    pub state_dir: PathBuf,
    listen: String,
    args: Vec<String>,
    /// What `--repo` is: the fleet's repository path, or a URL of it.
    repo: std::ffi::OsString,
    ssh_config: PathBuf,
    /// The certificate the CLI trusts when the API is served over TLS.
    ca: Option<PathBuf>,
}

impl Cim {
    /// The event log has no gaps and no duplicates: 1, 2, … in order.
    pub fn assert_gap_free(&self) {
        let seqs: Vec<u64> = self
            .events()
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "gaps or duplicates"
        );
    }

    /// Starts `cim run` on `fleet` with fast timings for tests, plus `extra`.
    pub fn start(fleet: &Fleet, state_dir: &Path, extra: &[&str]) -> Cim {
        Cim::start_from(fleet, fleet.repo.as_os_str(), state_dir, extra)
    }

    /// Like [`Cim::start`], with the API served over TLS with `cert` (for
    /// 127.0.0.1) and `key`; the CLI trusts the CA `ca`.
    pub fn start_tls(fleet: &Fleet, state_dir: &Path, cert: &Path, key: &Path, ca: &Path) -> Cim {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut cim = Cim {
            child: None,
            api: format!("https://{listen}"),
            state_dir: state_dir.to_path_buf(),
            listen,
            args: vec![
                "--tls-cert".to_string(),
                cert.display().to_string(),
                "--tls-key".to_string(),
                key.display().to_string(),
            ],
            repo: fleet.repo.as_os_str().to_os_string(),
            ssh_config: fleet.ssh_config.clone(),
            ca: Some(ca.to_path_buf()),
        };
        cim.spawn();
        cim
    }

    /// Like [`Cim::start`], with `--repo repo` (e.g. a `file://` URL of the
    /// fleet's repository, which is polled instead of watched).
    pub fn start_from(
        fleet: &Fleet,
        repo: &std::ffi::OsStr,
        state_dir: &Path,
        extra: &[&str],
    ) -> Cim {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut cim = Cim {
            child: None,
            api: format!("http://{listen}"),
            state_dir: state_dir.to_path_buf(),
            listen,
            args: extra.iter().map(|s| s.to_string()).collect(),
            repo: repo.to_os_string(),
            ssh_config: fleet.ssh_config.clone(),
            ca: None,
        };
        cim.spawn();
        cim
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state_dir.with_extension("log"))
            .expect("log file");
        let child = Command::new(cim_bin())
            .arg("run")
            .arg("--repo")
            .arg(&self.repo)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--listen")
            .arg(&self.listen)
            .arg("--ssh-config")
            .arg(&self.ssh_config)
            .args(["--nix-option", "substituters=", "--poll-interval", "2s"])
            .args([
                "--backoff-base",
                "1s",
                "--backoff-max",
                "3s",
                "--connect-timeout",
                "3s",
            ])
            .args(&self.args)
            .env("CIM_LOG", "info,cim=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start cim");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.try_cli(&["status", "-o", "json"]).is_none() {
            assert!(
                Instant::now() < deadline,
                "cim did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the controller again on the same state directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.with_extension("log")).unwrap_or_default()
    }

    /// The controller's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Runs a `cim` client command against this controller.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cli = Command::new(cim_bin());
        cli.args(args)
            .env("CIM_API", &self.api)
            .env_remove("CIM_API_CA_FILE")
            .stdin(Stdio::null());
        if let Some(ca) = &self.ca {
            cli.env("CIM_API_CA_FILE", ca);
        }
        cli.output().expect("run cim")
    }

    fn try_cli(&self, args: &[&str]) -> Option<Value> {
        let out = self.cli(args);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `GET path` of the API over plain HTTP, as a client other than the
    /// CLI would ask it; the answer's JSON.
    pub fn api_get(&self, path: &str) -> Value {
        let addr = self.api.trim_start_matches("http://");
        let body = crate::http_get(addr, path, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("GET {path}: {e:#}"));
        serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("GET {path}: {e}: {}", String::from_utf8_lossy(&body)))
    }

    pub fn status(&self) -> Value {
        self.try_cli(&["status", "-o", "json"])
            .unwrap_or_else(|| panic!("cim status failed:\n{}", self.log()))
    }

    pub fn events(&self) -> Vec<Value> {
        match self.try_cli(&["events", "--all", "-o", "json"]) {
            Some(Value::Array(evs)) => evs,
            other => panic!("cim events failed: {other:?}\n{}", self.log()),
        }
    }

    /// Events of `host` with `reason`.
    pub fn events_of(&self, host: &str, reason: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["host"] == host && e["reason"] == reason)
            .collect()
    }

    /// The status entry of `host`.
    pub fn host(&self, host: &str) -> Value {
        host_of(&self.status(), host)
    }

    /// Polls the status until `pred` holds; on timeout, panics showing the
    /// status, the events and the controller's log.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_cli(&["status", "-o", "json"]) {
                if pred(&status) {
                    return status;
                }
                if Instant::now() > deadline {
                    let events = self.cli(&["events", "--all"]);
                    panic!(
                        "timed out waiting for {what}\nstatus: {status:#}\nevents:\n{}\nlog:\n{}",
                        String::from_utf8_lossy(&events.stdout),
                        self.log()
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until every named host is Converged at `revision` (or at any
    /// revision if `None`).
    pub fn wait_converged(&self, hosts: &[&str], revision: Option<&str>) -> Value {
        self.wait_until(
            &format!("{hosts:?} converged at {revision:?}"),
            Duration::from_secs(90),
            |s| {
                hosts.iter().all(|h| {
                    let h = host_of(s, h);
                    h["phase"] == "Converged" && revision.is_none_or(|r| h["observedRevision"] == r)
                })
            },
        )
    }
}

impl Drop for Cim {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What `host` runs, as `status` (a `GET /api/v1/status` body) says.
pub fn current_system(status: &Value, host: &str) -> String {
    host_of(status, host)["currentSystem"]
        .as_str()
        .unwrap_or_else(|| panic!("{host} has no current system in {status}"))
        .to_string()
}

/// The status entry of `host` in a status document (`Null` if absent).
pub fn host_of(status: &Value, host: &str) -> Value {
    status["hosts"]
        .as_array()
        .and_then(|hs| hs.iter().find(|h| h["name"] == host))
        .cloned()
        .unwrap_or(Value::Null)
}
