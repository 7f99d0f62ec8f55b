//! The NixOS activation protocol on a host, over a [`HostSession`]: point
//! the system profile at a closure and run its `switch-to-configuration`,
//! the confirmed ("magic") activation under the host-side watchdog (start,
//! wait for its result, confirm over a new connection, read what it would
//! revert to), rolling back, and reading what the host runs. The scripts
//! it runs are the constants of `driver::scripts`; `driver` itself is the
//! SSH transport.

use std::time::Duration;

use super::scripts::{parse_activation_result, parse_boot_state, parse_look};
use super::{
    describe, is_store_path, ActivateError, BootState, CommandOutput, ConfirmedRun, HostSession,
    Look, SshError, BOOT_STATE, CONFIRM, LOOK, REBOOT, REMOTE_COMMAND_GRACE, WAIT_FOR_RESULT,
    WATCHDOG, WATCHDOG_DIR,
};
use crate::spec::Action;
use crate::types::StorePath;

impl HostSession {
    /// Points the system profile at `closure` (for switch and boot) and runs
    /// its `switch-to-configuration`.
    pub async fn activate(
        &self,
        closure: &StorePath,
        action: Action,
    ) -> Result<CommandOutput, ActivateError> {
        if action.sets_profile() {
            let args = [
                "-p",
                "/nix/var/nix/profiles/system",
                "--set",
                closure.as_str(),
            ];
            self.checked("nix-env", &args).await?;
        }
        let program = format!("{closure}/bin/switch-to-configuration");
        self.checked(&program, &[action.as_str()]).await
    }

    /// Starts a confirmed activation: [`WATCHDOG`] runs on the host in its
    /// own session (it survives this connection dropping), activates
    /// `closure`, and reverts to the previous generation unless
    /// [`HostSession::confirm`] removes its canary within `timeout`.
    pub async fn start_confirmed_activation(
        &self,
        run: &ConfirmedRun<'_>,
    ) -> Result<(), ActivateError> {
        let timeout = run.timeout.as_secs().max(1).to_string();
        let args = [
            "-f",
            "sh",
            "-c",
            WATCHDOG,
            "cim-watchdog",
            run.closure.as_str(),
            run.action.as_str(),
            &timeout,
            run.token,
            run.previous_running.unwrap_or(""),
            run.previous_profile.unwrap_or(""),
        ];
        self.checked("setsid", &args).await.map(|_| ())
    }

    /// The exit code and output of a confirmed activation's
    /// `switch-to-configuration`, waiting on the host up to `within` for it
    /// to finish (`None`: still running). Waiting on the host instead of
    /// polling from here answers within 50 ms of the activation's end, in
    /// one round trip.
    pub async fn activation_result(
        &self,
        token: &str,
        within: Duration,
    ) -> Result<Option<(i32, String)>, SshError> {
        let polls = (within.as_millis() / 50).max(1).to_string();
        let args = ["-c", WAIT_FOR_RESULT, "cim-wait", token, &polls];
        let out = self
            .run_within("sh", &args, within + REMOTE_COMMAND_GRACE)
            .await?;
        if out.status != Some(0) {
            return Ok(None);
        }
        Ok(parse_activation_result(&out.stdout))
    }

    /// The running system, the profile and pending confirmations, in one
    /// round trip (see [`LOOK`]).
    pub async fn look(&self) -> Result<Look, SshError> {
        let out = self.run("sh", &["-c", LOOK]).await?;
        Ok(parse_look(&out.stdout))
    }

    /// Confirms a confirmed activation over this connection and returns
    /// what the host runs now (`Some(None)`: no system); `None` if the host
    /// had already given up waiting and reverted.
    pub async fn confirm_and_read(&self, token: &str) -> Result<Option<Option<String>>, SshError> {
        let canary = format!("{WATCHDOG_DIR}/{token}.canary");
        let claimed = format!("{WATCHDOG_DIR}/{token}.confirmed");
        let args = ["-c", CONFIRM, "cim-confirm", &canary, &claimed];
        let out = self.run_as_root("sh", &args, REMOTE_COMMAND_GRACE).await?;
        let mut lines = out.stdout.lines().map(str::trim);
        if lines.next() != Some("confirmed") {
            return Ok(None);
        }
        Ok(Some(
            lines
                .next()
                .filter(|p| is_store_path(p))
                .map(str::to_string),
        ))
    }

    /// What a confirmed activation would revert to: the running system and
    /// the profile's generation before it (empty when there was none).
    pub async fn activation_previous(
        &self,
        token: &str,
    ) -> Result<(Option<String>, Option<String>), SshError> {
        let out = self
            .run("cat", &[&format!("{WATCHDOG_DIR}/{token}.prev")])
            .await?;
        let mut lines = out.stdout.lines().map(str::trim);
        let mut next = || {
            lines
                .next()
                .filter(|l| is_store_path(l))
                .map(str::to_string)
        };
        Ok((next(), next()))
    }

    /// Confirms a confirmed activation (the same atomic claim of the
    /// canary as [`CONFIRM`]); false if the watchdog had already claimed
    /// it (and reverts the host).
    pub async fn confirm(&self, token: &str) -> Result<bool, SshError> {
        let canary = format!("{WATCHDOG_DIR}/{token}.canary");
        let claimed = format!("{WATCHDOG_DIR}/{token}.confirmed");
        let out = self
            .run_as_root("mv", &[&canary, &claimed], REMOTE_COMMAND_GRACE)
            .await?;
        Ok(out.status == Some(0))
    }

    /// Puts the host back on `target` after a failed activation: the
    /// profile back to `previous_profile` (for switch and boot), then
    /// `target`'s `switch-to-configuration` (the caller decides what
    /// `target` is: `reconcile::rollback_target`).
    pub async fn roll_back(
        &self,
        action: Action,
        target: &str,
        previous_profile: Option<&str>,
    ) -> Result<(), ActivateError> {
        if action.sets_profile() {
            if let Some(profile) = previous_profile {
                let args = ["-p", "/nix/var/nix/profiles/system", "--set", profile];
                self.checked("nix-env", &args).await?;
            }
        }
        let program = format!("{target}/bin/switch-to-configuration");
        self.checked(&program, &[action.as_str()]).await?;
        Ok(())
    }

    /// Deletes system profile generations beyond the newest `keep` (never
    /// the running one nor, with `keep` ≥ 2, the one before it); returns
    /// how many were deleted.
    pub async fn prune_generations(&self, keep: u32) -> Result<u32, ActivateError> {
        let keep = format!("+{}", keep.max(2));
        let out = self
            .checked(
                "nix-env",
                &[
                    "-p",
                    "/nix/var/nix/profiles/system",
                    "--delete-generations",
                    &keep,
                ],
            )
            .await?;
        let text = format!("{}{}", out.stdout, out.stderr);
        Ok(text.lines().filter(|l| l.contains("removing")).count() as u32)
    }

    /// An operator's rollback: the system profile back one generation, and
    /// that generation activated (`boot` for boot hosts, else `switch`).
    /// Returns the closure the host is back on.
    pub async fn roll_back_generation(&self, action: Action) -> Result<String, ActivateError> {
        self.checked(
            "nix-env",
            &["-p", "/nix/var/nix/profiles/system", "--rollback"],
        )
        .await?;
        let previous = self
            .boot_system()
            .await?
            .ok_or_else(|| ActivateError::Failed {
                destination: self.destination.clone(),
                command: "readlink -f /nix/var/nix/profiles/system".to_string(),
                output: CommandOutput {
                    status: None,
                    stdout: String::new(),
                    stderr: "the system profile points at no store path".to_string(),
                },
            })?;
        let how = if action == Action::Boot {
            "boot"
        } else {
            "switch"
        };
        self.checked(&format!("{previous}/bin/switch-to-configuration"), &[how])
            .await?;
        Ok(previous)
    }

    /// Every path of `root`'s closure in the host's store, with sizes and
    /// references: the running system's side of a plan.
    pub async fn path_info(&self, root: &str) -> Result<Vec<crate::plan::PathInfo>, SshError> {
        let args = [
            "--extra-experimental-features",
            "nix-command",
            "path-info",
            "--json",
            "--recursive",
            root,
        ];
        let out = self.run("nix", &args).await?;
        let command = || describe("nix", &args);
        if out.status != Some(0) {
            return Err(SshError::Failed {
                destination: self.destination.clone(),
                command: command(),
                output: out,
            });
        }
        crate::plan::parse_path_info(&out.stdout).map_err(|message| SshError::Failed {
            destination: self.destination.clone(),
            command: command(),
            output: CommandOutput {
                status: out.status,
                stdout: String::new(),
                stderr: message,
            },
        })
    }

    /// Asks the host to reboot (see [`REBOOT`]). The connection may drop
    /// before the command answers: that is a reboot under way too.
    pub async fn reboot(&self) -> Result<(), ActivateError> {
        let args = ["-c", REBOOT, "cim-reboot"];
        match self.run_as_root("sh", &args, REMOTE_COMMAND_GRACE).await {
            // Gone or silent: the host is going down.
            Err(SshError::Timeout { .. } | SshError::Command { .. }) => Ok(()),
            Err(e) => Err(ActivateError::Ssh(e)),
            Ok(out) if out.status == Some(0) => Ok(()),
            Ok(out) if matches!(out.status, Some(255) | None) && out.stderr.trim().is_empty() => {
                Ok(())
            }
            Ok(output) => Err(ActivateError::Failed {
                destination: self.destination.clone(),
                command: "sh -c REBOOT (systemctl reboot)".to_string(),
                output,
            }),
        }
    }

    /// Whether the host rebooted, and what it booted and runs (see
    /// [`BOOT_STATE`]).
    pub async fn boot_state(&self) -> Result<BootState, SshError> {
        let out = self.run("sh", &["-c", BOOT_STATE]).await?;
        Ok(parse_boot_state(&out.stdout))
    }
}
