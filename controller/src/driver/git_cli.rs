//! The `git` command line, for what gix does not do here: notes on the
//! mirror's commits and pushing them. Same rules as every process cim
//! starts: arguments as arguments, a deadline, ssh with cim's settings
//! (`GIT_SSH_COMMAND`, each argument quoted for the shell git uses).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use super::{CommandOutput, DriverConfig};

/// Longest one git command may take.
const GIT_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum GitCliError {
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` did not finish within {}s", GIT_LIMIT.as_secs())]
    Timeout { command: String },
    #[error("`{command}` failed:\n{}", .output.stderr.trim())]
    Failed {
        command: String,
        output: CommandOutput,
    },
}

/// Runs `git --git-dir GIT_DIR ARGS…` as cim (its own identity, its ssh).
pub async fn git(
    cfg: &DriverConfig,
    git_dir: &Path,
    args: &[&str],
) -> Result<CommandOutput, GitCliError> {
    // The one place git is started (clippy.toml bans it elsewhere).
    #[allow(clippy::disallowed_methods)]
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("--git-dir")
        .arg(git_dir)
        .args(["-c", "user.name=cim", "-c", "user.email=cim@localhost"])
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Ok(ssh) = shlex::try_join(cfg.git_ssh_command().iter().map(String::as_str)) {
        cmd.env("GIT_SSH_COMMAND", ssh);
    }
    let command = format!("git {}", args.join(" "));
    let out = tokio::time::timeout(GIT_LIMIT, cmd.output())
        .await
        .map_err(|_| GitCliError::Timeout {
            command: command.clone(),
        })?
        .map_err(|source| GitCliError::Spawn {
            command: command.clone(),
            source,
        })?;
    let output = CommandOutput::from_output(&out);
    if out.status.success() {
        Ok(output)
    } else {
        Err(GitCliError::Failed { command, output })
    }
}
