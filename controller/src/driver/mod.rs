//! The only module that runs processes: `nix` locally, and commands on hosts
//! over the system OpenSSH client (through the `openssh` crate, multiplexed).
//!
//! Every `nix` invocation is made by [`NixCommand`], which adds the
//! experimental-feature flags and the operator's `--nix-option`s; every remote
//! command goes through [`HostSession`], whose arguments are shell-escaped by
//! `openssh`. Nothing is ever spliced into a shell string, and the user's
//! `--ssh-config` applies to every ssh connection, including those `nix copy`
//! makes (through `NIX_SSHOPTS`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openssh::{KnownHosts, Session, SessionBuilder};

use crate::spec::{Action, HostSpec};
use crate::types::StorePath;

mod activation;
mod git_cli;
mod nix;
mod scripts;

pub use git_cli::{git, GitCliError};
use nix::NixCommand;
pub use nix::{
    evaluate, path_info, push_to_cache, realise, toplevel_attribute, BuildError, Evaluation,
    Toplevel,
};
pub use scripts::{
    BootState, Look, BOOT_STATE, CONFIRM, LOOK, REBOOT, WAIT_FOR_RESULT, WATCHDOG, WATCHDOG_DIR,
};

/// How `nix` and `ssh` are run; shared by every invocation.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Passed as `-F` to every ssh invocation.
    pub ssh_config: Option<PathBuf>,
    /// Where ssh control sockets live; kept short because socket paths are
    /// limited to about 100 bytes.
    pub control_dir: PathBuf,
    /// Extra `--option NAME VALUE` pairs for every nix invocation.
    pub nix_options: Vec<(String, String)>,
    pub connect_timeout: Duration,
    /// Where the known_hosts files of hosts with a pinned `hostKey` are
    /// written (one per host, managed by cim).
    pub known_hosts_dir: PathBuf,
    /// Longest the fleet's evaluation may take (`--eval-timeout`).
    pub eval_timeout: Duration,
    /// Longest one build may take (`--build-timeout`).
    pub build_timeout: Duration,
    /// Where built closures are pushed for hosts to substitute from.
    pub cache: Option<BinaryCache>,
    /// nix's cache directory (`XDG_CACHE_HOME`) for every nix cim runs:
    /// cim's own, so that it may clear the git cache a killed `git` left
    /// half made (see `nix::fetch`). `None`: the user's.
    pub nix_cache: Option<PathBuf>,
    /// Taken by each fetch of a flake's source, one at a time, and held
    /// until that fetch ends even if nobody waits for it any more: two
    /// `git` processes of nix's in one cache repository break it.
    pub fetch_turn: Arc<tokio::sync::Mutex<()>>,
}

impl Default for DriverConfig {
    fn default() -> DriverConfig {
        DriverConfig {
            ssh_config: None,
            control_dir: PathBuf::new(),
            known_hosts_dir: PathBuf::new(),
            nix_options: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            eval_timeout: Duration::from_secs(30 * 60),
            build_timeout: Duration::from_secs(4 * 3600),
            cache: None,
            nix_cache: None,
            fetch_turn: Arc::default(),
        }
    }
}

/// A binary cache the controller pushes to (`--push-to-cache`).
#[derive(Debug, Clone)]
pub struct BinaryCache {
    /// A nix store URL: `file:///srv/cache`, `s3://bucket`, `ssh://host`, …
    pub url: String,
    /// Nix secret key the pushed paths are signed with.
    pub signing_key: PathBuf,
}

impl DriverConfig {
    /// The ssh options for ssh connections nix makes on its own (remote
    /// builders): the same config and host-key checking as every other ssh
    /// call. Split on whitespace by nix, hence no spaces in paths.
    fn base_sshopts(&self) -> Vec<String> {
        let mut opts = vec![
            "-o".to_string(),
            "BatchMode=yes".to_string(),
            "-o".to_string(),
            "StrictHostKeyChecking=yes".to_string(),
        ];
        if let Some(config) = &self.ssh_config {
            opts.push("-F".to_string());
            opts.push(config.display().to_string());
        }
        opts
    }

    /// The ssh command line the git mirror fetches ssh remotes with: the
    /// same config and host-key checking as every other ssh call, and a
    /// connection that stops answering ends (so a fetch cannot hang).
    pub fn git_ssh_command(&self) -> Vec<String> {
        let mut command = vec!["ssh".to_string()];
        command.extend(self.base_sshopts());
        command.extend(
            [
                format!("ConnectTimeout={}", self.connect_timeout.as_secs().max(1)),
                "ServerAliveInterval=5".to_string(),
                "ServerAliveCountMax=3".to_string(),
            ]
            .into_iter()
            .flat_map(|o| ["-o".to_string(), o]),
        );
        command
    }
}

/// A process group led by a child cim started, ended when dropped, so that
/// nothing it started outlives a deadline or a moot operation: SIGTERM
/// first (nix then stops the builds it runs in sessions of their own),
/// SIGKILL for what is left [`GROUP_GRACE`] later.
pub(crate) struct ProcessGroup(pub u32);

/// How long a process group has between SIGTERM and SIGKILL.
pub(crate) const GROUP_GRACE: Duration = Duration::from_secs(2);

impl ProcessGroup {
    /// The leader finished: leave the group alone.
    pub(crate) fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        let Ok(pgid) = libc::pid_t::try_from(self.0) else {
            return;
        };
        // SAFETY: kill(2) with a negative pid signals that process group;
        // it touches no memory of ours. A group already gone is ESRCH.
        if unsafe { libc::kill(-pgid, libc::SIGTERM) } != 0 {
            return;
        }
        std::thread::spawn(move || {
            std::thread::sleep(GROUP_GRACE);
            // SAFETY: as above.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        });
    }
}

/// Output of a finished command, kept for error messages.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    pub(crate) fn from_output(out: &std::process::Output) -> CommandOutput {
        CommandOutput {
            status: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn exit(&self) -> String {
        self.status
            .map_or_else(|| "a signal".to_string(), |c| c.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("cannot connect to {destination}: {}", connect_message(.source))]
    Connect {
        destination: String,
        source: openssh::Error,
    },
    #[error("cannot write the pinned host key of {destination}")]
    Pin {
        destination: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` on {destination} did not finish within {}s", .limit.as_secs())]
    Timeout {
        destination: String,
        command: String,
        limit: Duration,
    },
    #[error("running `{command}` on {destination} failed")]
    Command {
        destination: String,
        command: String,
        #[source]
        source: openssh::Error,
    },
    #[error("`{command}` on {destination} exited with {}:\n{}", .output.exit(), tail(&.output.stderr, 20))]
    Failed {
        destination: String,
        command: String,
        output: CommandOutput,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`nix copy` to {destination} did not finish within {}s", .limit.as_secs())]
    Timeout {
        destination: String,
        limit: Duration,
    },
    #[error("`nix copy` to {destination} exited with {}:\n{}", .output.exit(), tail(&.output.stderr, 20))]
    Failed {
        destination: String,
        output: CommandOutput,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error("`{command}` on {destination} exited with {}:\n{}", .output.exit(), tail(&combined(.output), 20))]
    Failed {
        destination: String,
        command: String,
        output: CommandOutput,
    },
}

impl SshError {
    /// Whether the host presented a key other than the one pinned or
    /// known for it: never to be deployed to.
    pub fn is_host_key_mismatch(&self) -> bool {
        let text = crate::error::error_chain(self);
        [
            "Host key verification failed",
            "REMOTE HOST IDENTIFICATION HAS CHANGED",
            "host key for",
            "No ED25519 host key is known",
            "No RSA host key is known",
            "No ECDSA host key is known",
        ]
        .iter()
        .any(|m| text.contains(m))
    }
}

/// Writes the known_hosts file that makes `key` the only key accepted for
/// `host`; returns its path.
fn pinned_known_hosts(cfg: &DriverConfig, host: &HostSpec, key: &str) -> std::io::Result<PathBuf> {
    let pattern = if host.port == 22 {
        host.address.clone()
    } else {
        format!("[{}]:{}", host.address, host.port)
    };
    let file = cfg.known_hosts_dir.join(host.name.as_str());
    let line = format!("{pattern} {key}\n");
    if std::fs::read_to_string(&file).ok().as_deref() != Some(line.as_str()) {
        std::fs::write(&file, line)?;
    }
    Ok(file)
}

impl ActivateError {
    /// Whether the host went away rather than the command failing.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ActivateError::Ssh(_))
    }
}

/// Longest a short remote command (readlink, cat, rm) may take.
const REMOTE_COMMAND_LIMIT: Duration = Duration::from_secs(60);
/// How much longer than the time it waits on the host a waiting command
/// may take before the connection is taken for dead.
const REMOTE_COMMAND_GRACE: Duration = Duration::from_secs(10);
/// Longest `nix-env --set` or a `switch-to-configuration` may take.
const ACTIVATION_LIMIT: Duration = Duration::from_secs(600);
/// Longest a `nix copy` may take.
const COPY_LIMIT: Duration = Duration::from_secs(3600);

/// One confirmed activation.
#[derive(Debug, Clone)]
pub struct ConfirmedRun<'a> {
    pub closure: &'a StorePath,
    pub action: Action,
    pub timeout: Duration,
    /// Names this attempt's files under [`WATCHDOG_DIR`].
    pub token: &'a str,
    pub previous_running: Option<&'a str>,
    pub previous_profile: Option<&'a str>,
}

/// `user@address`, as ssh and nix store URLs want it.
pub fn destination(host: &HostSpec) -> String {
    if host.address.contains(':') {
        format!("{}@[{}]", host.user, host.address)
    } else {
        format!("{}@{}", host.user, host.address)
    }
}

/// A multiplexed SSH connection to one host, reused for all of that host's
/// commands in one reconcile.
pub struct HostSession {
    session: Session,
    destination: String,
    port: u16,
    /// For the `nix copy` to this host.
    cfg: DriverConfig,
    /// The pinned key's known_hosts file, if the host has one.
    known_hosts: Option<PathBuf>,
    /// `spec.sudo`: commands that need root run under `sudo -n`.
    sudo: bool,
}

impl HostSession {
    pub async fn connect(cfg: &DriverConfig, host: &HostSpec) -> Result<HostSession, SshError> {
        let mut builder = SessionBuilder::default();
        builder
            .user(host.user.clone())
            .port(host.port)
            // openssh always passes StrictHostKeyChecking; `yes` never
            // weakens what the user's own ssh config asks for.
            .known_hosts_check(KnownHosts::Strict)
            .connect_timeout(cfg.connect_timeout)
            .server_alive_interval(Duration::from_secs(5))
            .control_directory(&cfg.control_dir);
        if let Some(config) = &cfg.ssh_config {
            builder.config_file(config);
        }
        let destination = destination(host);
        let known_hosts = match &host.host_key {
            Some(key) => {
                let file = pinned_known_hosts(cfg, host, key).map_err(|source| SshError::Pin {
                    destination: destination.clone(),
                    source,
                })?;
                builder.user_known_hosts_file(&file);
                Some(file)
            }
            None => None,
        };
        let session =
            builder
                .connect_mux(&host.address)
                .await
                .map_err(|source| SshError::Connect {
                    destination: destination.clone(),
                    source,
                })?;
        Ok(HostSession {
            session,
            destination,
            port: host.port,
            cfg: cfg.clone(),
            known_hosts,
            sudo: host.sudo,
        })
    }

    /// Runs a command that needs root: under `sudo -n` (never prompting)
    /// for a host that logs in as another user (`spec.sudo`).
    pub(super) async fn run_as_root(
        &self,
        program: &str,
        args: &[&str],
        limit: Duration,
    ) -> Result<CommandOutput, SshError> {
        if !self.sudo {
            return self.run_within(program, args, limit).await;
        }
        let mut sudo = vec!["-n", "--", program];
        sudo.extend_from_slice(args);
        self.run_within("sudo", &sudo, limit).await
    }

    pub(super) async fn run(
        &self,
        program: &str,
        args: &[&str],
    ) -> Result<CommandOutput, SshError> {
        self.run_within(program, args, REMOTE_COMMAND_LIMIT).await
    }

    /// Runs a command on the host; a host that stops answering (a hung
    /// command, a dead link) fails it after `limit` instead of blocking the
    /// worker forever.
    pub(super) async fn run_within(
        &self,
        program: &str,
        args: &[&str],
        limit: Duration,
    ) -> Result<CommandOutput, SshError> {
        let mut command = self.session.command(program);
        command.args(args).stdin(openssh::Stdio::null());
        let out = tokio::time::timeout(limit, command.output())
            .await
            .map_err(|_| SshError::Timeout {
                destination: self.destination.clone(),
                command: describe(program, args),
                limit,
            })?
            .map_err(|source| SshError::Command {
                destination: self.destination.clone(),
                command: describe(program, args),
                source,
            })?;
        Ok(CommandOutput::from_output(&out))
    }

    /// Runs a health-check command (an argument vector from a validated
    /// spec) within `limit`.
    pub async fn run_check(
        &self,
        argv: &[String],
        limit: Duration,
    ) -> Result<CommandOutput, SshError> {
        let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
        self.run_within(&argv[0], &args, limit).await
    }

    /// The closure `/run/current-system` points at, or `None` on a host that
    /// has none yet.
    pub async fn current_system(&self) -> Result<Option<String>, SshError> {
        let out = self.run("readlink", &["/run/current-system"]).await?;
        let path = out.stdout.trim();
        Ok((out.status == Some(0) && is_store_path(path)).then(|| path.to_string()))
    }

    /// The closure the system profile points at: what the host boots into.
    pub async fn boot_system(&self) -> Result<Option<String>, SshError> {
        let out = self
            .run("readlink", &["-f", "/nix/var/nix/profiles/system"])
            .await?;
        let path = out.stdout.trim();
        Ok((out.status == Some(0) && is_store_path(path)).then(|| path.to_string()))
    }

    /// Copies `closure` to the host over this session's connection. With
    /// `substitute`, the host first fetches what it can from its own binary
    /// caches, and only the rest crosses this connection.
    pub async fn copy(&self, closure: &StorePath, substitute: bool) -> Result<(), CopyError> {
        let cfg = &self.cfg;
        let mut nix = NixCommand::new(cfg, "copy");
        if substitute {
            nix.cmd.arg("--substitute-on-destination");
        }
        // As another user, the host's store is written through sudo.
        let store = if self.sudo {
            format!(
                "ssh://{}?remote-program=sudo%20-n%20nix-store",
                self.destination
            )
        } else {
            format!("ssh://{}", self.destination)
        };
        nix.cmd
            .arg("--to")
            .arg(store)
            .arg(closure)
            .env("NIX_SSHOPTS", self.nix_sshopts(cfg));
        let command = nix.describe();
        tracing::debug!(%command, "copying");
        let out = nix
            .output(COPY_LIMIT)
            .await
            .map_err(|_| CopyError::Timeout {
                destination: self.destination.clone(),
                limit: COPY_LIMIT,
            })?
            .map_err(|source| CopyError::Spawn { command, source })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(CopyError::Failed {
                destination: self.destination.clone(),
                output: CommandOutput::from_output(&out),
            })
        }
    }

    /// NIX_SSHOPTS is split on whitespace by nix, so paths in it must not
    /// contain spaces; the control socket is under our state directory.
    fn nix_sshopts(&self, cfg: &DriverConfig) -> String {
        let mut opts = vec![
            "-p".to_string(),
            self.port.to_string(),
            "-S".to_string(),
            self.session.control_socket().display().to_string(),
        ];
        opts.extend(cfg.base_sshopts());
        if let Some(file) = &self.known_hosts {
            opts.push("-o".to_string());
            opts.push(format!("UserKnownHostsFile={}", file.display()));
        }
        opts.join(" ")
    }

    pub(super) async fn checked(
        &self,
        program: &str,
        args: &[&str],
    ) -> Result<CommandOutput, ActivateError> {
        let output = self.run_as_root(program, args, ACTIVATION_LIMIT).await?;
        match output.status {
            Some(0) => Ok(output),
            // ssh reports a lost connection as exit status 255.
            Some(255) | None if output.stderr.is_empty() => {
                Err(ActivateError::Ssh(SshError::Command {
                    destination: self.destination.clone(),
                    command: describe(program, args),
                    source: openssh::Error::Disconnected,
                }))
            }
            _ => Err(ActivateError::Failed {
                destination: self.destination.clone(),
                command: describe(program, args),
                output,
            }),
        }
    }

    pub async fn close(self) {
        if let Err(e) = self.session.close().await {
            tracing::debug!(destination = %self.destination, error = %e, "closing ssh session");
        }
    }
}

fn describe(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

/// openssh puts ssh's own stderr in the source error; show it, since it is
/// what tells an operator why (refused, timed out, host key mismatch).
fn connect_message(err: &openssh::Error) -> String {
    use std::error::Error as _;
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !text.trim().is_empty() && !msg.contains(text.trim()) {
            msg.push_str(": ");
            msg.push_str(text.trim());
        }
        source = s.source();
    }
    msg
}

fn combined(out: &CommandOutput) -> String {
    let mut s = out.stdout.clone();
    if !s.is_empty() && !s.ends_with('\n') {
        s.push('\n');
    }
    s.push_str(&out.stderr);
    s
}

/// The last `n` non-empty lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The lines of nix's stderr worth showing: from the first `error:` on,
/// without build-progress noise, at most 20 lines.
pub fn relevant_lines(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("error"))
        .filter(|l| !l.trim().is_empty())
        .collect();
    if lines.is_empty() {
        return tail(stderr, 20);
    }
    lines
        .iter()
        .take(20)
        .copied()
        .collect::<Vec<_>>()
        .join("\n")
}

pub use crate::types::is_store_path;

/// Creates the control directory (mode 0700: it holds live connections)
/// and removes what a previous controller left there. Called once at start,
/// before any session exists: sessions must never clean each other's.
pub fn prepare_control_dir(dir: &Path) -> std::io::Result<()> {
    private_dir(dir)?;
    for entry in std::fs::read_dir(dir)?.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(".ssh-connection")
        {
            // A leftover master of a killed controller exits once its
            // socket is gone and its connection idles out.
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

/// Makes `dir` a directory only this user can enter (mode 0700), or
/// checks that an existing one is: a real directory (not a symlink), owned
/// by this user, closed to group and others. Anything else is refused,
/// never fixed up: another local user may have planted it.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    let refuse = |why: &str| {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{} {why}; refusing to use it", dir.display()),
        ))
    };
    if !meta.file_type().is_dir() {
        return refuse("exists and is not a directory (or is a symlink)");
    }
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return refuse(&format!(
            "belongs to uid {}, not to this user ({me})",
            meta.uid()
        ));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        // Ours, merely too open (an older cim made it so): close it.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_dirs_are_made_closed_and_planted_ones_refused() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("state");
        private_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // Again: fine.
        private_dir(&dir).unwrap();
        // A symlink planted where the directory should be.
        let planted = root.path().join("planted");
        std::os::unix::fs::symlink(root.path(), &planted).unwrap();
        let err = private_dir(&planted).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        // A file.
        let file = root.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(private_dir(&file).is_err());
    }

    #[test]
    fn nix_errors_keep_the_error_lines() {
        let stderr = "building '/nix/store/x.drv'...\nwarning: foo\nerror: boom in web-2\n\n       (use '--show-trace')\n";
        assert_eq!(
            relevant_lines(stderr),
            "error: boom in web-2\n       (use '--show-trace')"
        );
        assert_eq!(tail("a\nb\n\nc\n", 2), "b\nc");
    }
}
