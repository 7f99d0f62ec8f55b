//! Operator requests: reconcile now, roll a host back to its previous
//! generation, resume it. Each is recorded before anything is done for it;
//! the answer comes once the record is durable (or says why it is not).

use super::{append, short, Ask, Effect, Now, Purpose, RequestId, State, Then};
use crate::event::{NewEvent, Phase, Reason};
use crate::types::Revision;

impl State {
    pub(super) fn on_request(&mut self, id: RequestId, ask: Ask, out: &mut Vec<Effect>) {
        let refused = match ask {
            Ask::Reconcile {
                host,
                selector,
                force_window,
            } => self.on_reconcile(id, host, selector, force_window, out),
            Ask::Select { selector } => {
                out.push(Effect::Reply {
                    id,
                    result: Ok(self.selected(&selector).join("\n")),
                });
                Ok(())
            }
            Ask::Rollback { host } => self.on_rollback(id, &host, out),
            Ask::Reboot { host } => self.on_reboot(id, &host, out),
            Ask::Resume { host } => self.on_resume(id, &host, out),
            Ask::Accept { revision } => self.on_accept(id, &revision, out),
            Ask::Approve { revision, wave } => self.on_approve(id, &revision, wave, out),
        };
        if let Err(message) = refused {
            out.push(Effect::Reply {
                id,
                result: Err(message),
            });
        }
    }

    /// Suspends `host` and rolls it back to its previous generation — right
    /// away, or as soon as a reconcile in flight ends (an emergency button
    /// must not be refused for a routine check).
    fn on_rollback(
        &mut self,
        id: RequestId,
        host: &str,
        out: &mut Vec<Effect>,
    ) -> Result<(), String> {
        let revision = self.current_revision().unwrap_or_default().to_string();
        if self.host_spec(host).is_none() {
            return Err(format!("no host `{host}` in the specs"));
        }
        if self.operator_suspended(host) && self.pending_rollbacks.contains(host) {
            out.push(Effect::Reply {
                id,
                result: Ok(format!("a rollback of {host} is already waiting")),
            });
            return Ok(());
        }
        // Rolling back a host that is not durably suspended would let the
        // next resync redeploy it: nothing happens unless this is recorded.
        let requested = NewEvent::host(
            host,
            Reason::RollbackRequested,
            Some(&revision),
            format!("suspended by `cim rollback`; switching {host} to its previous generation"),
        )
        .phase(Phase::Suspended);
        append(
            out,
            vec![requested],
            Then::RollbackRecorded {
                id,
                host: host.to_string(),
            },
        );
        Ok(())
    }

    /// `cim reboot HOST`: recorded, then the host is rebooted by a worker
    /// of its own — not while another works on it.
    fn on_reboot(
        &mut self,
        id: RequestId,
        host: &str,
        out: &mut Vec<Effect>,
    ) -> Result<(), String> {
        let spec = self
            .host_spec(host)
            .ok_or_else(|| format!("no host `{host}` in the specs"))?;
        if spec.suspend {
            return Err(format!("host `{host}` is suspended by its spec"));
        }
        if self.queue.is_running(host) {
            return Err(format!(
                "`{host}` is being worked on; ask again when it is done"
            ));
        }
        let revision = self.current_revision().unwrap_or_default().to_string();
        let requested = NewEvent::host(
            host,
            Reason::RebootRequested,
            Some(&revision),
            "reboot requested by `cim reboot`",
        );
        append(
            out,
            vec![requested],
            Then::RebootRecorded {
                id,
                host: host.to_string(),
            },
        );
        Ok(())
    }

    pub(super) fn reboot_recorded(&mut self, id: RequestId, host: &str, out: &mut Vec<Effect>) {
        let (Some(spec), Some(revision)) = (self.host_spec(host).cloned(), self.current().cloned())
        else {
            return out.push(Effect::Reply {
                id,
                result: Err(format!("no host `{host}` in the specs")),
            });
        };
        if !self.queue.claim(host) {
            return out.push(Effect::Reply {
                id,
                result: Err(format!(
                    "`{host}` is being worked on; ask again when it is done"
                )),
            });
        }
        out.push(Effect::Reboot {
            host: spec,
            revision,
        });
        out.push(Effect::Reply {
            id,
            result: Ok(format!(
                "rebooting {host}; `cim status {host}` shows when it is back"
            )),
        });
    }

    pub(super) fn rollback_recorded(&mut self, id: RequestId, host: &str, out: &mut Vec<Effect>) {
        self.queue.forget(host);
        let message = if self.start_rollback(host, out) {
            format!("rolling back {host}; it stays suspended until `cim resume {host}`")
        } else {
            self.pending_rollbacks.insert(host.to_string());
            format!(
                "{host} is suspended; it rolls back as soon as its current reconcile ends, and stays suspended until `cim resume {host}`"
            )
        };
        out.push(Effect::Reply {
            id,
            result: Ok(message),
        });
    }

    /// `cim approve REV [--wave W]`: records the approval; the rollout
    /// moves on once it is durable.
    fn on_approve(
        &mut self,
        id: RequestId,
        wanted: &str,
        wave: Option<String>,
        out: &mut Vec<Effect>,
    ) -> Result<(), String> {
        let Some((revision, fleet)) = self.specs.as_ref() else {
            return Err("no revision is being rolled out".to_string());
        };
        if wanted.len() < 7 || !revision.as_str().starts_with(wanted) {
            return Err(format!(
                "the revision being rolled out is {revision}, not {wanted}"
            ));
        }
        let waves = &fleet.policy.waves;
        let chosen = match &wave {
            Some(w) => w
                .parse::<usize>()
                .ok()
                .and_then(|n| n.checked_sub(1))
                .and_then(|i| waves.get(i))
                .or_else(|| waves.iter().find(|x| x.name == *w)),
            None => crate::rollout::current_wave(fleet, &self.status, revision)
                .and_then(|c| waves.get(c.index)),
        };
        let Some(chosen) = chosen else {
            return Err(match wave {
                Some(w) => format!("no wave `{w}`"),
                None => "no wave is waiting".to_string(),
            });
        };
        if !chosen.manual {
            return Err(format!("wave {} does not need an approval", chosen.name));
        }
        let mut ev = NewEvent::repo(
            Reason::WaveApproved,
            Some(revision),
            format!("wave {} approved by `cim approve`", chosen.name),
        );
        ev.wave = Some(chosen.name.clone());
        let message = format!("wave {} of {} may go ahead", chosen.name, short(revision));
        append(out, vec![ev], Then::Approved { id, message });
        Ok(())
    }

    /// Starts the rollback worker of `host` unless a worker already runs.
    pub(super) fn start_rollback(&mut self, host: &str, out: &mut Vec<Effect>) -> bool {
        let Some(spec) = self.host_spec(host).cloned() else {
            return false;
        };
        if !self.queue.claim(host) {
            return false;
        }
        let Some(revision) = self.current().cloned() else {
            return false;
        };
        out.push(Effect::RollBack {
            host: spec,
            revision,
        });
        true
    }

    fn on_resume(
        &mut self,
        id: RequestId,
        host: &str,
        out: &mut Vec<Effect>,
    ) -> Result<(), String> {
        if !self.operator_suspended(host) {
            return Err(format!("host `{host}` was not suspended by `cim rollback`"));
        }
        if self.queue.is_running(host) {
            return Err(format!(
                "the rollback of `{host}` is still running; try again in a moment"
            ));
        }
        let revision = self.current().cloned();
        let suspended_by_spec = self.host_spec(host).is_none_or(|h| h.suspend);
        let mut ev = NewEvent::host(
            host,
            Reason::Resumed,
            revision.as_ref().map(Revision::as_str),
            "resumed by `cim resume`",
        );
        if !suspended_by_spec {
            ev = ev.phase(Phase::Pending);
        }
        append(
            out,
            vec![ev],
            Then::Resumed {
                id,
                host: host.to_string(),
                revision: revision.filter(|_| !suspended_by_spec),
            },
        );
        Ok(())
    }

    pub(super) fn resumed(
        &mut self,
        id: RequestId,
        host: &str,
        revision: Option<Revision>,
        now: Now,
        out: &mut Vec<Effect>,
    ) {
        if let Some(revision) = revision {
            if self.desired.contains_key(host) {
                self.queue.schedule(host, now.at);
            } else {
                self.start_evaluation(&revision, Purpose::Refresh, out);
            }
        }
        out.push(Effect::Reply {
            id,
            result: Ok(format!("{host} is reconciled by cim again")),
        });
    }

    /// Hosts of the current specs whose labels match `selector`.
    fn selected(&self, selector: &crate::spec::Selector) -> Vec<String> {
        self.specs
            .as_ref()
            .map(|(_, fleet)| {
                fleet
                    .hosts
                    .values()
                    .filter(|h| crate::spec::selects(selector, &h.labels))
                    .map(|h| h.name.to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn on_reconcile(
        &mut self,
        id: RequestId,
        host: Option<String>,
        selector: Option<crate::spec::Selector>,
        force_window: bool,
        out: &mut Vec<Effect>,
    ) -> Result<(), String> {
        let Some(revision) = self.current().cloned() else {
            out.push(Effect::Fetch);
            out.push(Effect::Reply {
                id,
                result: Ok("no valid revision yet; fetching now".to_string()),
            });
            return Ok(());
        };
        let mut news = Vec::new();
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
            None if selector.is_some() => {
                let selector = selector.unwrap_or_default();
                let mut hosts = self.selected(&selector);
                hosts.retain(|h| {
                    !self.operator_suspended(h) && self.host_spec(h).is_some_and(|s| !s.suspend)
                });
                if hosts.is_empty() {
                    return Err(format!("no host to reconcile matches {selector:?}"));
                }
                hosts
            }
            None => {
                out.push(Effect::Fetch);
                if self.status.repo.halted_revision.as_deref() == Some(revision.as_str()) {
                    news.push(NewEvent::repo(
                        Reason::RolloutResumed,
                        Some(&revision),
                        "rollout resumed by `cim reconcile --all`",
                    ));
                }
                let mut hosts = self.active_hosts();
                hosts.retain(|h| !self.operator_suspended(h));
                hosts
            }
        };
        // ReconcileRequested clears a host's hold: without it recorded, no
        // host is worked on. One transaction for all of them.
        news.extend(hosts.iter().map(|name| {
            NewEvent::host(
                name,
                Reason::ReconcileRequested,
                Some(&revision),
                "reconcile requested",
            )
        }));
        if force_window {
            news.push(NewEvent::repo(
                Reason::WindowForced,
                Some(&revision),
                format!(
                    "`cim reconcile --force-window`: {} worked on whatever the deployment windows say",
                    match &host {
                        Some(name) => name.clone(),
                        None => format!("{} hosts", hosts.len()),
                    }
                ),
            ));
        }
        append(
            out,
            news,
            Then::ReconcileRecorded {
                id,
                one: host,
                hosts,
                revision,
                force_window,
            },
        );
        Ok(())
    }

    pub(super) fn reconcile_recorded(
        &mut self,
        id: RequestId,
        one: Option<String>,
        hosts: &[String],
        revision: &Revision,
        now: Now,
        out: &mut Vec<Effect>,
    ) {
        let mut refresh = false;
        for name in hosts {
            // Its outcome is said even when nothing changed: someone waits.
            self.requested.insert(name.clone());
            if self.desired.contains_key(name) {
                self.queue.schedule(name, now.at);
            } else {
                refresh = true;
            }
        }
        if refresh {
            self.start_evaluation(revision, Purpose::Refresh, out);
        }
        let message = match one {
            Some(name) => format!("reconciling {name} at {}", short(revision)),
            None => format!("reconciling {} hosts at {}", hosts.len(), short(revision)),
        };
        out.push(Effect::Reply {
            id,
            result: Ok(message),
        });
    }
}
