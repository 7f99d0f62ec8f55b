//! A `cim run` under the benchmarks: started on a state directory, asked
//! through its own CLI, killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Result};
use cim_sandbox::Fleet;
use serde_json::Value;

pub(crate) fn parse_time(s: &str) -> Option<SystemTime> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    let nanos = t.unix_timestamp_nanos();
    Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(nanos).ok()?))
}

pub(crate) struct CimRun {
    child: Option<Child>,
    bin: PathBuf,
    pub(crate) api: String,
}

impl CimRun {
    pub(crate) fn start(bin: &Path, fleet: &Fleet, state: &Path, extra: &[&str]) -> Result<CimRun> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let listen = format!("127.0.0.1:{port}");
        std::fs::create_dir_all(state)?;
        let log = std::fs::File::create(state.join("cim.log"))?;
        let child = Command::new(bin)
            .arg("run")
            .arg("--repo")
            .arg(&fleet.repo)
            .arg("--state-dir")
            .arg(state.join("state"))
            .args(["--listen", &listen, "--ssh-config"])
            .arg(&fleet.ssh_config)
            .args(["--nix-option", "substituters="])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let run = CimRun {
            child: Some(child),
            bin: bin.to_path_buf(),
            api: format!("http://{listen}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while run.json(&["status", "-o", "json"]).is_err() {
            if Instant::now() > deadline {
                bail!("cim did not start; see {}", state.join("cim.log").display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(run)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub(crate) fn json(&self, args: &[&str]) -> Result<Value> {
        let out = Command::new(&self.bin)
            .args(args)
            .env("CIM_API", &self.api)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("cim {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    pub(crate) fn events(&self) -> Result<Vec<Value>> {
        match self.json(&["events", "--all", "-o", "json"])? {
            Value::Array(a) => Ok(a),
            other => bail!("unexpected events: {other}"),
        }
    }

    pub(crate) fn wait_converged(&self, n: usize, rev: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(s) = self.json(&["status", "-o", "json"]) {
                let done = s["hosts"].as_array().is_some_and(|hs| {
                    hs.len() == n
                        && hs
                            .iter()
                            .all(|h| h["phase"] == "Converged" && h["observedRevision"] == rev)
                });
                if done {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!("cim did not converge on {rev}: {s:#}");
                }
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub(crate) fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for CimRun {
    fn drop(&mut self) {
        self.stop();
    }
}
