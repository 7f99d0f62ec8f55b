//! Evaluating a revision for the fleet: one `nix eval` per revision in a
//! background task, and what the controller does with its result — refuse
//! specs naming configurations the flake lacks, load the revision's specs,
//! record hosts whose configuration does not evaluate, and queue the rest
//! with the system they should run. Building happens later, per host, in
//! the host's worker (and not at all for a host already running it).

use std::sync::Arc;

use tokio::time::Instant;

use super::{short, Controller, Msg};
use crate::driver::{self, Evaluation};
use crate::spec::FleetSpec;

/// Why a revision is evaluated.
#[derive(Debug)]
pub(crate) enum Purpose {
    /// A new revision with valid specs: deployed once its configurations
    /// check out against the flake.
    New(FleetSpec),
    /// The current revision again: after a restart, or for hosts without a
    /// system (their build failed and a reconcile was asked for).
    Refresh,
}

impl Controller {
    /// Whether an evaluation is under way (its results will come).
    pub(super) fn evaluating(&self) -> bool {
        self.evaluation
            .as_ref()
            .is_some_and(|(_, h)| !h.is_finished())
    }

    /// Evaluates `revision` in the background. A new revision replaces any
    /// evaluation in flight (it is moot); a refresh waits for one.
    pub(super) fn start_evaluation(&mut self, revision: &str, purpose: Purpose) {
        if matches!(purpose, Purpose::Refresh) && self.evaluating() {
            return;
        }
        if let Some((_, old)) = self.evaluation.take() {
            old.abort();
        }
        let fleet = match &purpose {
            Purpose::New(fleet) => fleet,
            Purpose::Refresh => match self.specs.as_ref() {
                Some((_, fleet)) => fleet,
                None => return,
            },
        };
        let mut configurations: Vec<String> = fleet
            .hosts
            .values()
            .filter(|h| !h.suspend)
            .map(|h| h.configuration.clone())
            .collect();
        configurations.sort();
        configurations.dedup();
        let flake = crate::git::flake_ref(&self.cfg.mirror_path, revision);
        let driver = Arc::clone(&self.driver);
        let tx = self.msg_tx.clone();
        let revision = revision.to_string();
        let handle = tokio::spawn({
            let revision = revision.clone();
            async move {
                let result = driver::evaluate(&driver, &flake, &configurations)
                    .await
                    .map_err(|e| crate::error::error_chain(&e));
                let _ = tx
                    .send(Msg::Evaluated {
                        revision,
                        purpose,
                        result,
                    })
                    .await;
            }
        });
        self.evaluation = Some((revision, handle));
    }

    pub(super) fn on_evaluated(
        &mut self,
        revision: String,
        purpose: Purpose,
        result: Result<Evaluation, String>,
    ) {
        if self.evaluation.as_ref().map(|(r, _)| r.as_str()) != Some(revision.as_str()) {
            return;
        }
        self.evaluation = None;
        match purpose {
            Purpose::New(fleet) => {
                if let Ok(evaluation) = &result {
                    if let Err(errors) =
                        crate::spec::check_configurations(&fleet, &evaluation.names)
                    {
                        self.spec_invalid(&revision, &errors);
                        return;
                    }
                }
                if !self.apply_specs(revision.clone(), fleet.clone()) {
                    // The store refused the revision: it is evaluated
                    // again once the store takes writes.
                    self.unapplied = Some((revision, fleet));
                    return;
                }
                self.set_desired(&revision, &result, false);
            }
            Purpose::Refresh => {
                if self.current_revision() == Some(revision.as_str()) {
                    self.set_desired(&revision, &result, true);
                }
            }
        }
        self.advance_rollout();
    }

    /// Gives every active host its system from `result` and queues it, or
    /// records why it has none. On a refresh, hosts that already have their
    /// system are left as they are.
    fn set_desired(&mut self, revision: &str, result: &Result<Evaluation, String>, refresh: bool) {
        let now = Instant::now();
        let hosts: Vec<(String, String)> = self
            .specs
            .as_ref()
            .map(|(_, fleet)| {
                fleet
                    .hosts
                    .values()
                    .filter(|h| !h.suspend)
                    .map(|h| (h.name.clone(), h.configuration.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for (host, configuration) in hosts {
            if refresh && self.desired.contains_key(&host) {
                continue;
            }
            let system = match result {
                Err(message) => Err(message.clone()),
                Ok(evaluation) => evaluation
                    .systems
                    .get(&configuration)
                    .cloned()
                    .unwrap_or_else(|| {
                        Err(format!(
                            "configuration `{configuration}` is not in the flake at {}",
                            short(revision)
                        ))
                    }),
            };
            match system {
                Ok(system) => {
                    self.desired.insert(host.clone(), system);
                    if !self.held(&host) {
                        self.queue.enqueue(&host, now);
                    }
                }
                Err(message) => self.build_failed(&host, revision, message),
            }
        }
    }
}
