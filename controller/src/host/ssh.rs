//! The real backend: nix on the controller (`driver`'s evaluation, builds
//! and cache pushes, configured by [`DriverConfig`]) and hosts over
//! OpenSSH ([`HostSession`]).

use std::time::Duration;

use super::{Backend, Host};
use crate::driver::{
    self, ActivateError, BootState, BuildError, CommandOutput, ConfirmedRun, CopyError,
    DriverConfig, Evaluation, HostSession, Look, SshError, Toplevel,
};
use crate::plan::PathInfo;
use crate::spec::{Action, HostSpec};
use crate::types::StorePath;

impl Backend for DriverConfig {
    type Session = HostSession;

    async fn connect(&self, host: &HostSpec) -> Result<HostSession, SshError> {
        HostSession::connect(self, host).await
    }

    fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    async fn evaluate(
        &self,
        flake: &str,
        configurations: &[String],
    ) -> Result<Evaluation, BuildError> {
        driver::evaluate(self, flake, configurations).await
    }

    async fn realise(&self, systems: &[Toplevel]) -> Result<(), BuildError> {
        driver::realise(self, systems).await
    }

    fn cache(&self) -> Option<&str> {
        self.cache.as_ref().map(|c| c.url.as_str())
    }

    async fn push(&self, closure: &StorePath) -> Result<(), BuildError> {
        match &self.cache {
            Some(cache) => driver::push_to_cache(self, cache, closure).await,
            None => Ok(()),
        }
    }

    async fn closures(&self, roots: &[StorePath]) -> Result<Vec<PathInfo>, BuildError> {
        driver::path_info(self, roots).await
    }

    async fn boot_files(&self, system: &StorePath) -> Vec<String> {
        let files: Vec<String> = crate::plan::BOOT_FILES
            .iter()
            .filter_map(|f| std::fs::canonicalize(format!("{system}/{f}")).ok())
            .map(|p| p.display().to_string())
            .collect();
        if files.len() == crate::plan::BOOT_FILES.len() {
            files
        } else {
            Vec::new()
        }
    }
}

impl Host for HostSession {
    async fn look(&self) -> Result<Look, SshError> {
        HostSession::look(self).await
    }

    async fn current_system(&self) -> Result<Option<String>, SshError> {
        HostSession::current_system(self).await
    }

    async fn boot_system(&self) -> Result<Option<String>, SshError> {
        HostSession::boot_system(self).await
    }

    async fn copy(&self, closure: &StorePath, substitute: bool) -> Result<(), CopyError> {
        HostSession::copy(self, closure, substitute).await
    }

    async fn activate(
        &self,
        closure: &StorePath,
        action: Action,
    ) -> Result<CommandOutput, ActivateError> {
        HostSession::activate(self, closure, action).await
    }

    async fn start_confirmed_activation(
        &self,
        run: &ConfirmedRun<'_>,
    ) -> Result<(), ActivateError> {
        HostSession::start_confirmed_activation(self, run).await
    }

    async fn activation_result(
        &self,
        token: &str,
        within: Duration,
    ) -> Result<Option<(i32, String)>, SshError> {
        HostSession::activation_result(self, token, within).await
    }

    async fn activation_previous(
        &self,
        token: &str,
    ) -> Result<(Option<String>, Option<String>), SshError> {
        HostSession::activation_previous(self, token).await
    }

    async fn confirm(&self, token: &str) -> Result<bool, SshError> {
        HostSession::confirm(self, token).await
    }

    async fn confirm_and_read(&self, token: &str) -> Result<Option<Option<String>>, SshError> {
        HostSession::confirm_and_read(self, token).await
    }

    async fn roll_back(
        &self,
        action: Action,
        to: &str,
        previous_profile: Option<&str>,
    ) -> Result<(), ActivateError> {
        HostSession::roll_back(self, action, to, previous_profile).await
    }

    async fn roll_back_generation(&self, action: Action) -> Result<String, ActivateError> {
        HostSession::roll_back_generation(self, action).await
    }

    async fn prune_generations(&self, keep: u32) -> Result<u32, ActivateError> {
        HostSession::prune_generations(self, keep).await
    }

    async fn closure(&self, root: &str) -> Result<Vec<PathInfo>, SshError> {
        HostSession::path_info(self, root).await
    }

    async fn reboot(&self) -> Result<(), ActivateError> {
        HostSession::reboot(self).await
    }

    async fn boot_state(&self) -> Result<BootState, SshError> {
        HostSession::boot_state(self).await
    }

    async fn run_check(&self, argv: &[String], limit: Duration) -> Result<CommandOutput, SshError> {
        HostSession::run_check(self, argv, limit).await
    }

    async fn close(self) {
        HostSession::close(self).await
    }
}
