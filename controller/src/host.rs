//! What the controller does outside its own process, as two traits: a
//! [`Backend`] evaluates and builds systems and connects to hosts, and a
//! [`Host`] is one connection to a host (look, copy, activate, confirm,
//! roll back, run a health check). The real implementations are nix and
//! OpenSSH (`host/ssh.rs`, over `driver`); the simulated ones (`host/sim.rs`)
//! have configurable latencies and failure rates and start no process, the
//! way kwok simulates Kubernetes nodes — for benchmarks of the controller
//! with thousands of hosts, and for unit tests of the reconcile, confirm
//! and rollback paths under `tokio::time::pause()`.

use std::future::Future;
use std::time::Duration;

use crate::driver::{
    ActivateError, BootState, BuildError, CommandOutput, ConfirmedRun, CopyError, Evaluation, Look,
    SshError, Toplevel,
};
use crate::plan::PathInfo;
use crate::spec::{Action, HostSpec};
use crate::types::StorePath;

pub mod sim;
mod ssh;

/// Evaluation, builds, the binary cache and connections to hosts.
pub trait Backend: Send + Sync + 'static {
    type Session: Host;

    /// Opens a connection to `host`.
    fn connect(
        &self,
        host: &HostSpec,
    ) -> impl Future<Output = Result<Self::Session, SshError>> + Send;

    /// How long opening a connection may take.
    fn connect_timeout(&self) -> Duration;

    /// Evaluates every listed configuration of `flake` at once.
    fn evaluate(
        &self,
        flake: &str,
        configurations: &[String],
    ) -> impl Future<Output = Result<Evaluation, BuildError>> + Send;

    /// Builds `systems` (already evaluated) in one go.
    fn realise(&self, systems: &[Toplevel]) -> impl Future<Output = Result<(), BuildError>> + Send;

    /// The binary cache closures are pushed to before copying, if any.
    fn cache(&self) -> Option<&str>;

    /// Pushes `closure` to [`Backend::cache`].
    fn push(&self, closure: &StorePath) -> impl Future<Output = Result<(), BuildError>> + Send;

    /// The kernel, initrd and kernel modules of `system` in the
    /// controller's store, resolved (empty when unknown): compared with
    /// the booted system's to tell whether it needs a reboot.
    fn boot_files(&self, system: &StorePath) -> impl Future<Output = Vec<String>> + Send;

    /// The closures of `roots` (valid in the controller's store), as one
    /// list of paths with sizes and references.
    fn closures(
        &self,
        roots: &[StorePath],
    ) -> impl Future<Output = Result<Vec<PathInfo>, BuildError>> + Send;
}

/// One connection to one host, for one reconcile.
pub trait Host: Send + Sync + 'static {
    /// What the host runs and boots, and confirmations still pending.
    fn look(&self) -> impl Future<Output = Result<Look, SshError>> + Send;
    /// What `/run/current-system` points at.
    fn current_system(&self) -> impl Future<Output = Result<Option<String>, SshError>> + Send;
    /// What the system profile points at.
    fn boot_system(&self) -> impl Future<Output = Result<Option<String>, SshError>> + Send;
    /// Copies `closure` to the host.
    fn copy(
        &self,
        closure: &StorePath,
        substitute: bool,
    ) -> impl Future<Output = Result<(), CopyError>> + Send;
    /// Sets the profile (for switch and boot) and runs
    /// `switch-to-configuration action`, unconfirmed.
    fn activate(
        &self,
        closure: &StorePath,
        action: Action,
    ) -> impl Future<Output = Result<CommandOutput, ActivateError>> + Send;
    /// Starts a confirmed activation that reverts itself unless confirmed.
    fn start_confirmed_activation(
        &self,
        run: &ConfirmedRun<'_>,
    ) -> impl Future<Output = Result<(), ActivateError>> + Send;
    /// A confirmed activation's exit code and log, waiting up to `within`.
    fn activation_result(
        &self,
        token: &str,
        within: Duration,
    ) -> impl Future<Output = Result<Option<(i32, String)>, SshError>> + Send;
    /// What a confirmed activation would revert to.
    fn activation_previous(
        &self,
        token: &str,
    ) -> impl Future<Output = Result<(Option<String>, Option<String>), SshError>> + Send;
    /// Confirms a confirmed activation; false if there was nothing to
    /// confirm.
    fn confirm(&self, token: &str) -> impl Future<Output = Result<bool, SshError>> + Send;
    /// Confirms and reads what the host runs now (`None`: it had already
    /// reverted).
    fn confirm_and_read(
        &self,
        token: &str,
    ) -> impl Future<Output = Result<Option<Option<String>>, SshError>> + Send;
    /// Goes back to `to` after a failed `action`.
    fn roll_back(
        &self,
        action: Action,
        to: &str,
        previous_profile: Option<&str>,
    ) -> impl Future<Output = Result<(), ActivateError>> + Send;
    /// An operator's rollback: the generation before the current one.
    fn roll_back_generation(
        &self,
        action: Action,
    ) -> impl Future<Output = Result<String, ActivateError>> + Send;
    /// Deletes system profile generations beyond the newest `keep`;
    /// returns how many were deleted.
    fn prune_generations(
        &self,
        keep: u32,
    ) -> impl Future<Output = Result<u32, ActivateError>> + Send;
    /// `root`'s closure in the host's store (paths, sizes, references).
    fn closure(&self, root: &str) -> impl Future<Output = Result<Vec<PathInfo>, SshError>> + Send;
    /// Reboots the host, marking `/run` first (see
    /// [`crate::driver::REBOOT`]).
    fn reboot(&self) -> impl Future<Output = Result<(), ActivateError>> + Send;
    /// Whether the host rebooted since [`Host::reboot`], and what it
    /// booted and runs.
    fn boot_state(&self) -> impl Future<Output = Result<BootState, SshError>> + Send;
    /// Runs a health-check command within `limit`.
    fn run_check(
        &self,
        argv: &[String],
        limit: Duration,
    ) -> impl Future<Output = Result<CommandOutput, SshError>> + Send;
    /// Closes the connection.
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// How long closing a session may take: the work is done by then, and a
/// host that does not answer the goodbye must not hold a worker.
const CLOSE_LIMIT: Duration = Duration::from_secs(3);

/// Closes `session` within [`CLOSE_LIMIT`].
pub async fn close<H: Host>(session: H) {
    let _ = tokio::time::timeout(CLOSE_LIMIT, session.close()).await;
}
