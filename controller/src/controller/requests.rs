//! Operator requests to the controller task (from the API): reconcile now,
//! roll a host back to its previous generation, resume it. They run on the
//! controller task like every other message, so they see and change its
//! state without locks.

use std::sync::Arc;

use tokio::time::Instant;

use super::{short, Controller, Purpose};
use crate::event::{NewEvent, Phase, Reason};
use crate::reconcile;

impl Controller {
    /// Suspends `host` at once and rolls it back to its previous
    /// generation — right away, or as soon as a reconcile in flight ends
    /// (an emergency button must not be refused for a routine check).
    pub(super) fn on_rollback(&mut self, host: &str) -> Result<String, String> {
        let revision = self.current_revision().unwrap_or_default().to_string();
        if self.host_spec(host).is_none() {
            return Err(format!("no host `{host}` in the specs"));
        }
        if self.operator_suspended(host) && self.pending_rollbacks.contains(host) {
            return Ok(format!("a rollback of {host} is already waiting"));
        }
        let requested = NewEvent::host(
            host,
            Reason::RollbackRequested,
            Some(&revision),
            format!("suspended by `cim rollback`; switching {host} to its previous generation"),
        )
        .phase(Phase::Suspended);
        // Rolling back a host that is not durably suspended would let the
        // next resync redeploy it: nothing happens unless this is recorded.
        self.record(requested)
            .ok_or_else(|| self.not_recorded("rollback"))?;
        self.queue.forget(host);
        if self.start_rollback(host) {
            Ok(format!(
                "rolling back {host}; it stays suspended until `cim resume {host}`"
            ))
        } else {
            self.pending_rollbacks.insert(host.to_string());
            Ok(format!(
                "{host} is suspended; it rolls back as soon as its current reconcile ends, and stays suspended until `cim resume {host}`"
            ))
        }
    }

    /// Starts the rollback worker of `host` unless a worker already runs.
    pub(super) fn start_rollback(&mut self, host: &str) -> bool {
        let Some(spec) = self.host_spec(host).cloned() else {
            return false;
        };
        if !self.queue.claim(host) {
            return false;
        }
        let revision = self.current_revision().unwrap_or_default().to_string();
        let work = reconcile::run_rollback(
            Arc::clone(&self.driver),
            spec,
            revision.clone(),
            self.report_tx.clone(),
            self.worker_cancel.child_token(),
        );
        self.spawn_worker(host, &revision, work);
        true
    }

    /// The answer to a request whose event the store refused.
    fn not_recorded(&self, what: &str) -> String {
        format!(
            "the {what} was not carried out: the store refused to record it ({})",
            self.store_failure.as_deref().unwrap_or("unknown error")
        )
    }

    pub(super) fn on_resume(&mut self, host: &str) -> Result<String, String> {
        if !self.operator_suspended(host) {
            return Err(format!("host `{host}` was not suspended by `cim rollback`"));
        }
        if self.queue.is_running(host) {
            return Err(format!(
                "the rollback of `{host}` is still running; try again in a moment"
            ));
        }
        let revision = self.current_revision().map(str::to_string);
        let suspended_by_spec = self.host_spec(host).is_none_or(|h| h.suspend);
        let mut ev = NewEvent::host(
            host,
            Reason::Resumed,
            revision.as_deref(),
            "resumed by `cim resume`",
        );
        if !suspended_by_spec {
            ev = ev.phase(Phase::Pending);
        }
        self.record(ev).ok_or_else(|| self.not_recorded("resume"))?;
        if let Some(revision) = revision.filter(|_| !suspended_by_spec) {
            if self.desired.contains_key(host) {
                self.queue.schedule(host, Instant::now());
            } else {
                self.start_evaluation(&revision, Purpose::Refresh);
            }
        }
        Ok(format!("{host} is reconciled by cim again"))
    }

    pub(super) fn on_reconcile(&mut self, host: Option<String>) -> Result<String, String> {
        let Some(revision) = self.current_revision().map(str::to_string) else {
            self.fetch_now.notify_one();
            return Ok("no valid revision yet; fetching now".to_string());
        };
        let hosts = match &host {
            Some(name) => {
                let spec = self.host_spec(name).ok_or_else(|| {
                    format!("no host `{name}` in the specs at {}", short(&revision))
                })?;
                if spec.suspend {
                    return Err(format!("host `{name}` is suspended by its spec"));
                }
                if self.operator_suspended(name) {
                    return Err(format!(
                        "host `{name}` was suspended by `cim rollback`; `cim resume {name}` first"
                    ));
                }
                vec![name.clone()]
            }
            None => {
                self.fetch_now.notify_one();
                if self.status.repo.halted_revision.as_deref() == Some(revision.as_str()) {
                    self.record(NewEvent::repo(
                        Reason::RolloutResumed,
                        Some(&revision),
                        "rollout resumed by `cim reconcile --all`",
                    ))
                    .ok_or_else(|| self.not_recorded("reconcile"))?;
                }
                let mut hosts = self.active_hosts();
                hosts.retain(|h| !self.operator_suspended(h));
                hosts
            }
        };
        // ReconcileRequested clears a host's hold: without it recorded, no
        // host is worked on. One transaction for all of them.
        let news = hosts
            .iter()
            .map(|name| {
                NewEvent::host(
                    name,
                    Reason::ReconcileRequested,
                    Some(&revision),
                    "reconcile requested",
                )
            })
            .collect();
        self.record_all(news)
            .ok_or_else(|| self.not_recorded("reconcile"))?;
        let now = Instant::now();
        let mut rebuild = false;
        for name in &hosts {
            if self.desired.contains_key(name) {
                self.queue.schedule(name, now);
            } else {
                rebuild = true;
            }
        }
        if rebuild {
            self.start_evaluation(&revision, Purpose::Refresh);
        }
        Ok(match host {
            Some(name) => format!("reconciling {name} at {}", short(&revision)),
            None => format!("reconciling {} hosts at {}", hosts.len(), short(&revision)),
        })
    }
}
