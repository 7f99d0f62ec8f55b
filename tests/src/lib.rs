//! The sandbox fleet: simulated NixOS hosts on one Linux machine, for the
//! demo and the end-to-end tests.
//!
//! Each host is a network namespace with a veth on a per-fleet bridge and a
//! real `sshd` running in a private mount namespace where `/nix` and `/run`
//! are the host's own directories: it has its own store, its own
//! `/run/current-system`, its own host key and address. The fleet's git
//! repository has a flake with no inputs whose "systems" are small
//! derivations; their `switch-to-configuration` records each activation in
//! `/run/cim-activations` and points `/run/current-system` at itself.
//!
//! Fleets never collide: each claims a free index by creating its bridge
//! (the kernel makes that atomic), and its names and subnet derive from the
//! index. A fleet is torn down when dropped, so a failing test cleans up.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod harness;
use serde::{Deserialize, Serialize};

const FLAKE: &str = include_str!("../fleet/flake.nix");
const BUILDER: &str = include_str!("../fleet/builder.sh");

/// A sandbox host's init, run in the host's network namespace and its own
/// mount namespace as `sh -c HOST_INIT cim-sandbox-init ROOT SSHD_CONFIG`:
/// it gives the host its `/nix`, `/run` and `/root`, runs sshd, and
/// reboots the host when its `systemctl reboot` (from the sandbox system)
/// asks through `/nix/var/cim-sandbox/reboot`: every process of the host
/// ends, `/run` is emptied, and after `/nix/var/cim-sandbox/boot-delay`
/// seconds (default 1) the system profile is booted (`/run/booted-system`,
/// its `activate` making it `/run/current-system`) and sshd comes back.
const HOST_INIT: &str = r#"set -u
root=$1 config=$2
mount --bind "$root/nix" /nix && mount --bind "$root/run" /run && mount --bind "$root/home" /root || exit 1
mkdir -p /nix/var/cim-sandbox
fifo=/nix/var/cim-sandbox/reboot
rm -f "$fifo" && mkfifo "$fifo" || exit 1
me=$(readlink /proc/$$/ns/net)
while :; do
  mkdir -p /run/sshd
  /usr/sbin/sshd -D -e -f "$config" &
  read -r _ <"$fifo" || true
  echo "cim-sandbox: rebooting" >&2
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [ "$p" = "$$" ] && continue
    [ "$(readlink "$d/ns/net" 2>/dev/null)" = "$me" ] && kill -9 "$p" 2>/dev/null
  done
  wait
  find /run -mindepth 1 -delete
  delay=$(cat /nix/var/cim-sandbox/boot-delay 2>/dev/null || echo 1)
  sleep "$delay"
  sys=$(readlink -f /nix/var/nix/profiles/system || true)
  if [ -n "$sys" ] && [ -x "$sys/activate" ]; then
    ln -sfn "$sys" /run/booted-system
    "$sys/activate"
  fi
  echo "cim-sandbox: booted ${sys:-nothing}" >&2
done
"#;

/// One simulated host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    pub netns: String,
    pub address: String,
    /// Holds the host's `nix/`, `run/` and `etc/` (sshd config and key).
    pub root: PathBuf,
    /// The bridge side of the host's link.
    #[serde(default)]
    pub veth: String,
}

/// A running sandbox fleet.
#[derive(Debug, Serialize, Deserialize)]
pub struct Fleet {
    pub dir: PathBuf,
    pub index: u16,
    pub bridge: String,
    pub hosts: Vec<Host>,
    /// The fleet's git repository (branch `main`).
    pub repo: PathBuf,
    /// ssh_config with the fleet's client key and known hosts.
    pub ssh_config: PathBuf,
    #[serde(skip)]
    owned: bool,
    #[serde(skip)]
    _tmp: Option<tempfile::TempDir>,
}

/// `GET path` of the API at `addr` over plain HTTP/1.1, as a client other
/// than the CLI asks it; the body of a 200 answer. The request goes in
/// one write: split, Nagle's algorithm can hold its tail for a delayed
/// ACK (40 ms), which a timed read would count.
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<Vec<u8>> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    s.read_to_end(&mut response)?;
    if !response.starts_with(b"HTTP/1.1 200") {
        bail!(
            "GET {path}: {}",
            String::from_utf8_lossy(&response[..response.len().min(200)])
        );
    }
    // The body: after the headers (the API sends a length, never chunks).
    let body = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(response.len(), |at| at + 4);
    response.drain(..body);
    Ok(response)
}

/// Runs a command and fails with its stderr if it does not succeed.
pub fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn git(repo: &Path, args: &[&str]) -> Result<String> {
    let mut full = vec![
        "-C",
        repo.to_str().context("repo path is not UTF-8")?,
        "-c",
        "user.name=cim sandbox",
        "-c",
        "user.email=sandbox@cim.invalid",
    ];
    full.extend_from_slice(args);
    sh("git", &full)
}

/// The host names of an `n`-host fleet.
pub fn host_names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("web-{i}")).collect()
}

/// The spec document of one host.
pub fn host_spec(name: &str, address: &str, extra: &str) -> String {
    format!(
        "apiVersion: cim/v1\nkind: Host\nmetadata:\n  name: {name}\n  labels: {{role: web}}\nspec:\n  address: {address}\n{extra}"
    )
}

impl Fleet {
    /// Starts `n` hosts in a new temporary directory.
    pub fn start(n: usize) -> Result<Fleet> {
        let tmp = tempfile::Builder::new().prefix("cim-fleet-").tempdir()?;
        let dir = tmp.path().to_path_buf();
        let mut fleet = Fleet::start_in(&dir, n)?;
        fleet._tmp = Some(tmp);
        Ok(fleet)
    }

    /// Starts `n` hosts with their files under `dir`.
    pub fn start_in(dir: &Path, n: usize) -> Result<Fleet> {
        for tool in [
            "ip",
            "unshare",
            "/usr/sbin/sshd",
            "ssh-keygen",
            "nix",
            "git",
        ] {
            if Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .map(|s| !s.success())
                .unwrap_or(true)
            {
                bail!("`{tool}` is missing: run scripts/setup (installs nix-bin, openssh-server, iproute2)");
            }
        }
        fs::create_dir_all(dir)?;
        let dir = std::path::absolute(dir)?;
        let index = claim_index()?;
        let mut fleet = Fleet {
            dir: dir.clone(),
            index,
            bridge: bridge_name(index),
            hosts: Vec::new(),
            repo: dir.join("repo"),
            ssh_config: dir.join("client/ssh_config"),
            owned: true,
            _tmp: None,
        };
        // From here on, Drop tears down whatever was set up.
        fleet.setup(n)?;
        Ok(fleet)
    }

    fn setup(&mut self, n: usize) -> Result<()> {
        let subnet = format!("10.231.{}", self.index);
        sh(
            "ip",
            &[
                "addr",
                "add",
                &format!("{subnet}.1/24"),
                "dev",
                &self.bridge,
            ],
        )?;
        sh("ip", &["link", "set", &self.bridge, "up"])?;
        let client = self.dir.join("client");
        fs::create_dir_all(&client)?;
        let key = client.join("id_ed25519");
        if !key.exists() {
            sh(
                "ssh-keygen",
                &[
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    "cim-sandbox",
                    "-f",
                    path(&key)?,
                ],
            )?;
        }
        let mut known_hosts = String::new();
        for (i, name) in host_names(n).into_iter().enumerate() {
            let host = Host {
                netns: format!("cim{}-{}", self.index, name),
                address: format!("{subnet}.{}", i + 2),
                root: self.dir.join("hosts").join(&name),
                veth: format!("cim{}v{}", self.index, i),
                name,
            };
            self.add_host(&host, &key)?;
            let pubkey = fs::read_to_string(host.root.join("etc/ssh_host_ed25519_key.pub"))?;
            let mut fields = pubkey.split_whitespace();
            let (kind, data) = (fields.next().unwrap_or(""), fields.next().unwrap_or(""));
            known_hosts.push_str(&format!("{} {kind} {data}\n", host.address));
            self.hosts.push(host);
        }
        fs::write(client.join("known_hosts"), known_hosts)?;
        fs::write(
            &self.ssh_config,
            format!(
                "Host *\n  User root\n  IdentityFile {key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {kh}\n  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n  BatchMode yes\n  ConnectTimeout 3\n",
                key = key.display(),
                kh = client.join("known_hosts").display()
            ),
        )?;
        for host in self.hosts.clone() {
            self.start_sshd(&host.name)?;
        }
        self.init_repo()?;
        Ok(())
    }

    fn add_host(&self, host: &Host, client_key: &Path) -> Result<()> {
        let etc = host.root.join("etc");
        // `home` becomes the host's /root: the machine's own root home (its
        // shell start-up files, caches) must not leak into the hosts.
        for d in ["nix/store", "nix/var/nix/profiles", "run", "etc", "home"] {
            fs::create_dir_all(host.root.join(d))?;
        }
        let host_key = etc.join("ssh_host_ed25519_key");
        if !host_key.exists() {
            sh(
                "ssh-keygen",
                &["-q", "-t", "ed25519", "-N", "", "-f", path(&host_key)?],
            )?;
        }
        fs::copy(
            client_key.with_extension("pub"),
            etc.join("authorized_keys"),
        )?;
        fs::write(
            etc.join("sshd_config"),
            format!(
                "ListenAddress {addr}\nPort 22\nHostKey {key}\nAuthorizedKeysFile {ak}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\nMaxStartups 100\nMaxSessions 100\n",
                addr = host.address,
                key = host_key.display(),
                ak = etc.join("authorized_keys").display()
            ),
        )?;
        sh("ip", &["netns", "add", &host.netns])?;
        let veth = host.veth.as_str();
        sh(
            "ip",
            &[
                "link",
                "add",
                veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &host.netns,
            ],
        )?;
        sh("ip", &["link", "set", veth, "master", &self.bridge, "up"])?;
        sh(
            "ip",
            &[
                "-n",
                &host.netns,
                "addr",
                "add",
                &format!("{}/24", host.address),
                "dev",
                "eth0",
            ],
        )?;
        sh("ip", &["-n", &host.netns, "link", "set", "eth0", "up"])?;
        sh("ip", &["-n", &host.netns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no sandbox host {name}"))
    }

    /// Starts the host's init and waits until its sshd accepts
    /// connections (see [`HOST_INIT`]).
    pub fn start_sshd(&self, name: &str) -> Result<()> {
        let host = self.host(name);
        let root = host.root.display().to_string();
        let config = format!("{root}/etc/sshd_config");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(host.root.join("sshd.log"))?;
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &host.netns,
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                HOST_INIT,
                "cim-sandbox-init",
                &root,
                &config,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start sshd")?;
        let addr: SocketAddr = format!("{}:22", host.address).parse()?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "sshd of {name} did not come up; see {}",
                    host.root.join("sshd.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Makes the host's sshd refuse root and accept only the `cim-sandbox`
    /// user (made by `scripts/setup`, allowed to sudo), and restarts it.
    pub fn refuse_root(&self, name: &str) -> Result<()> {
        let config = self.host(name).root.join("etc/sshd_config");
        let text = fs::read_to_string(&config)?.replace(
            "PermitRootLogin prohibit-password",
            "PermitRootLogin no\nAllowUsers cim-sandbox",
        );
        fs::write(&config, text)?;
        self.stop_sshd(name)?;
        self.start_sshd(name)
    }

    /// The host's SSH public key, as `TYPE BASE64`.
    pub fn host_key(&self, name: &str) -> Result<String> {
        let public = fs::read_to_string(self.host(name).root.join("etc/ssh_host_ed25519_key.pub"))?;
        Ok(public
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" "))
    }

    /// Gives the host a new SSH host key and restarts its sshd, as a
    /// reinstalled machine (or one answering in its place) would.
    pub fn swap_host_key(&self, name: &str) -> Result<()> {
        let key = self.host(name).root.join("etc/ssh_host_ed25519_key");
        fs::remove_file(&key)?;
        fs::remove_file(key.with_extension("pub"))?;
        sh(
            "ssh-keygen",
            &["-q", "-t", "ed25519", "-N", "", "-f", path(&key)?],
        )?;
        self.stop_sshd(name)?;
        self.start_sshd(name)
    }

    /// Kills every process of the host (its sshd and all sessions), as if it
    /// went down.
    pub fn stop_sshd(&self, name: &str) -> Result<()> {
        kill_netns(&self.host(name).netns);
        Ok(())
    }

    /// Kills the host's sshd (listener and sessions) but nothing else: the
    /// host stays up, only unreachable.
    pub fn kill_sshd(&self, name: &str) -> Result<()> {
        let pids = sh("ip", &["netns", "pids", &self.host(name).netns])?;
        for pid in pids.split_whitespace() {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "sshd" {
                let _ = sh("kill", &["-9", pid]);
            }
        }
        Ok(())
    }

    /// Freezes (`SIGSTOP`) or thaws (`SIGCONT`) the host's sshd listener:
    /// open sessions keep working, new connections hang.
    pub fn pause_sshd_listener(&self, name: &str, paused: bool) -> Result<()> {
        let pids = sh("ip", &["netns", "pids", &self.host(name).netns])?;
        for pid in pids.split_whitespace() {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains("sshd") && cmdline.contains(" -D ") {
                sh("kill", &[if paused { "-STOP" } else { "-CONT" }, pid])?;
            }
        }
        Ok(())
    }

    /// Whether a confirmed activation on the host has finished (its exit
    /// code is written) but is not confirmed yet.
    pub fn watchdog_awaiting_confirmation(&self, name: &str) -> bool {
        let dir = self.host(name).root.join("run/cim");
        let names: Vec<String> = fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.iter().any(|n| {
            n.strip_suffix(".canary")
                .is_some_and(|token| names.contains(&format!("{token}.rc")))
        })
    }

    /// Limits the host's link to `rate` (e.g. `4mbit`), to make copies slow.
    pub fn throttle(&self, name: &str, rate: &str) -> Result<()> {
        let veth = &self.host(name).veth;
        sh(
            "tc",
            &[
                "qdisc", "replace", "dev", veth, "root", "tbf", "rate", rate, "burst", "32kbit",
                "latency", "400ms",
            ],
        )?;
        Ok(())
    }

    pub fn unthrottle(&self, name: &str) -> Result<()> {
        let _ = sh(
            "tc",
            &["qdisc", "del", "dev", &self.host(name).veth, "root"],
        );
        Ok(())
    }

    /// Takes the host's link down (`false`) or up (`true`).
    pub fn set_link(&self, name: &str, up: bool) -> Result<()> {
        sh(
            "ip",
            &[
                "link",
                "set",
                &self.host(name).veth,
                if up { "up" } else { "down" },
            ],
        )?;
        Ok(())
    }

    /// The controller's address on the fleet's bridge, as the hosts reach
    /// it (where a test serves a binary cache, for instance).
    pub fn bridge_address(&self) -> String {
        format!("10.231.{}.1", self.index)
    }

    /// Writes the host's own nix configuration (`~/.config/nix/nix.conf`
    /// of its root, which is private to the host), read by the nix commands
    /// run on it, such as the receiving end of `nix copy`.
    pub fn set_host_nix_conf(&self, name: &str, conf: &str) -> Result<()> {
        let dir = self.host(name).root.join("home/.config/nix");
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("nix.conf"), conf)?;
        Ok(())
    }

    /// Store paths in the host's own store whose name contains `part`.
    pub fn store_paths(&self, name: &str, part: &str) -> Vec<String> {
        fs::read_dir(self.host(name).root.join("nix/store"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains(part))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What the host's `/run/current-system` points at.
    pub fn current_system(&self, name: &str) -> Option<String> {
        fs::read_link(self.host(name).root.join("run/current-system"))
            .ok()
            .map(|p| p.display().to_string())
    }

    /// What the host's system profile (`/nix/var/nix/profiles/system`)
    /// points at: the generation it boots into.
    pub fn profile_system(&self, name: &str) -> Option<String> {
        let profiles = self.host(name).root.join("nix/var/nix/profiles");
        let generation = fs::read_link(profiles.join("system")).ok()?;
        fs::read_link(profiles.join(generation))
            .ok()
            .map(|p| p.display().to_string())
    }

    /// Points the host's `/run/current-system` somewhere else, as an
    /// operator switching it by hand would.
    pub fn switch_by_hand(&self, name: &str, target: &str) -> Result<()> {
        let link = self.host(name).root.join("run/current-system");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(target, &link)?;
        Ok(())
    }

    /// Whether a confirmed activation's watchdog is waiting on the host.
    pub fn watchdog_pending(&self, name: &str) -> bool {
        fs::read_dir(self.host(name).root.join("run/cim"))
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".canary"))
            })
            .unwrap_or(false)
    }

    /// How long the host takes to boot after a reboot, in seconds (read at
    /// each reboot).
    pub fn set_boot_delay(&self, name: &str, seconds: u64) -> Result<()> {
        let dir = self.host(name).root.join("nix/var/cim-sandbox");
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("boot-delay"), format!("{seconds}\n"))?;
        Ok(())
    }

    /// What the host booted (`/run/booted-system`), if it booted anything.
    pub fn booted_system(&self, name: &str) -> Option<String> {
        fs::read_link(self.host(name).root.join("run/booted-system"))
            .ok()
            .map(|p| p.display().to_string())
    }

    /// The activations recorded by the host's systems: `ACTION CLOSURE`.
    pub fn activations(&self, name: &str) -> Vec<String> {
        fs::read_to_string(self.host(name).root.join("run/cim-activations"))
            .map(|s| s.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    fn init_repo(&self) -> Result<()> {
        fs::create_dir_all(self.repo.join("sandbox"))?;
        fs::create_dir_all(self.repo.join("specs"))?;
        fs::create_dir_all(self.repo.join("hosts"))?;
        fs::write(self.repo.join("flake.nix"), FLAKE)?;
        fs::write(self.repo.join("sandbox/builder.sh"), BUILDER)?;
        let mut specs = String::new();
        for (i, host) in self.hosts.iter().enumerate() {
            if i > 0 {
                specs.push_str("---\n");
            }
            specs.push_str(&host_spec(&host.name, &host.address, ""));
            self.set_host_config(&host.name, "{ version = 1; }")?;
        }
        fs::write(self.repo.join("specs/fleet.yaml"), specs)?;
        sh("git", &["init", "-q", "-b", "main", path(&self.repo)?])?;
        self.commit("sandbox fleet")?;
        Ok(())
    }

    /// Writes `hosts/NAME.nix` of the fleet repository (not committed).
    pub fn set_host_config(&self, name: &str, nix: &str) -> Result<()> {
        fs::write(
            self.repo.join("hosts").join(format!("{name}.nix")),
            format!("{nix}\n"),
        )?;
        Ok(())
    }

    /// Writes a file of the fleet repository (not committed).
    /// Writes `specs/fleet.yaml` with one Host document for each of
    /// `hosts` (name, and lines added to its spec), at its sandbox address.
    pub fn write_host_specs(&self, hosts: &[(&str, &str)]) -> Result<()> {
        let docs: Vec<String> = hosts
            .iter()
            .map(|(name, extra)| host_spec(name, &self.host(name).address, extra))
            .collect();
        self.write("specs/fleet.yaml", &docs.join("---\n"))
    }

    pub fn write(&self, rel: &str, contents: &str) -> Result<()> {
        let p = self.repo.join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(p, contents)?;
        Ok(())
    }

    /// Commits everything in the repository; returns the new revision.
    pub fn commit(&self, message: &str) -> Result<String> {
        git(&self.repo, &["add", "-A"])?;
        git(
            &self.repo,
            &["commit", "-q", "--allow-empty", "-m", message],
        )?;
        git(&self.repo, &["rev-parse", "HEAD"])
    }

    /// Commits everything, signed with the SSH private key `key` (as `git
    /// commit -S` with `gpg.format=ssh` does); returns the new revision.
    pub fn commit_signed(&self, message: &str, key: &Path) -> Result<String> {
        git(&self.repo, &["add", "-A"])?;
        let key = format!("user.signingkey={}", key.display());
        git(
            &self.repo,
            &[
                "-c",
                "gpg.format=ssh",
                "-c",
                &key,
                "commit",
                "-q",
                "-S",
                "--allow-empty",
                "-m",
                message,
            ],
        )?;
        git(&self.repo, &["rev-parse", "HEAD"])
    }

    /// Runs git in the fleet repository (e.g. to rewrite its history).
    pub fn git(&self, args: &[&str]) -> Result<String> {
        git(&self.repo, args)
    }

    /// The repository's current head.
    pub fn head(&self) -> Result<String> {
        git(&self.repo, &["rev-parse", "HEAD"])
    }

    /// Saves the fleet's description, for `cim-sandbox down`.
    pub fn save(&self) -> Result<()> {
        fs::write(
            self.dir.join("fleet.json"),
            serde_json::to_string_pretty(self)?,
        )?;
        Ok(())
    }

    pub fn load(dir: &Path) -> Result<Fleet> {
        let text = fs::read_to_string(dir.join("fleet.json"))
            .with_context(|| format!("no sandbox fleet in {}", dir.display()))?;
        let mut fleet: Fleet = serde_json::from_str(&text)?;
        fleet.owned = true;
        Ok(fleet)
    }

    /// Leaves the fleet running when this value is dropped.
    pub fn detach(mut self) {
        self.owned = false;
    }

    /// Stops every host and removes the namespaces and the bridge.
    pub fn teardown(&mut self) {
        if !self.owned {
            return;
        }
        self.owned = false;
        for (i, host) in self.hosts.iter().enumerate() {
            kill_netns(&host.netns);
            // Deleting can fail with EBUSY while a dying mount namespace of
            // the host still holds the netns mount; it clears in a moment.
            let deadline = Instant::now() + Duration::from_secs(5);
            while sh("ip", &["netns", "del", &host.netns]).is_err()
                && Path::new("/run/netns").join(&host.netns).exists()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            // The veth pair normally goes with the namespace, but the kernel
            // may keep a dead namespace around for a while; remove it now.
            let _ = sh("ip", &["link", "del", &format!("cim{}v{i}", self.index)]);
        }
        let _ = sh("ip", &["link", "del", &self.bridge]);
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn path(p: &Path) -> Result<&str> {
    p.to_str().context("path is not UTF-8")
}

fn bridge_name(index: u16) -> String {
    format!("cimbr{index}")
}

/// Claims a free fleet index by creating its bridge: creation fails if the
/// bridge exists, so two fleets can never get the same index.
fn claim_index() -> Result<u16> {
    let start = (std::process::id() % 200) as u16;
    for k in 0..230u16 {
        let index = 20 + (start + k) % 230;
        if sh(
            "ip",
            &["link", "add", &bridge_name(index), "type", "bridge"],
        )
        .is_ok()
        {
            return Ok(index);
        }
    }
    bail!("no free sandbox fleet index (are old fleets still running? `ip link | grep cimbr`)")
}

fn kill_netns(netns: &str) {
    if let Ok(pids) = sh("ip", &["netns", "pids", netns]) {
        for pid in pids.split_whitespace() {
            let _ = sh("kill", &["-9", pid]);
        }
    }
    // Killed processes take a moment to leave the namespace.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sh("ip", &["netns", "pids", netns]).is_ok_and(|p| !p.is_empty())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}
