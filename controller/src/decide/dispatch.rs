//! Handing out work: the rollout moving on (its failure budget, its
//! waves, its completion) once per group, the hosts due now that its gate
//! and the deployment windows let through, as work items, and the resync
//! that queues every host again.

use super::{append, Effect, Now, State, Then};
use crate::event::{short, NewEvent, Phase, Reason};
use crate::queue::Urgency;
use crate::reconcile::WorkItem;
use crate::rollout;
use crate::spec::Action;

impl State {
    /// After any host's state changed: halt the rollout if its failure
    /// budget is spent, announce a new wave, and let gated hosts be
    /// re-evaluated.
    pub(super) fn advance_rollout(&mut self, now: Now, then: Then, out: &mut Vec<Effect>) {
        let Some((revision, fleet)) = self.specs.as_ref() else {
            append(out, Vec::new(), then);
            return;
        };
        let mut news = Vec::new();
        if let Some(failed) = rollout::over_budget(fleet, &self.status, revision) {
            news.push(NewEvent::repo(
                Reason::RolloutHalted,
                Some(revision),
                format!(
                    "rollout of {} halted: {} failed ({}); hosts not yet touched stay as they are until a new revision or `cim reconcile --all`",
                    short(revision),
                    failed.join(", "),
                    fleet.policy.max_failures
                ),
            ));
        }
        let waves = fleet.policy.waves.len();
        if let Some(w) = rollout::current_wave(fleet, &self.status, revision)
            .filter(|w| self.status.repo.wave.as_deref() != Some(w.name.as_str()))
        {
            let mut ev = NewEvent::repo(
                Reason::WaveStarted,
                Some(revision),
                format!(
                    "wave {} of {}: {} ({})",
                    w.index + 1,
                    waves + 1,
                    w.name,
                    w.members.join(", ")
                ),
            );
            let manual = fleet.policy.waves.get(w.index).is_some_and(|x| x.manual)
                && self.status.repo.approvals.get(&w.name).map(String::as_str)
                    != Some(revision.as_str());
            ev.wave = Some(w.name.clone());
            news.push(ev);
            if manual {
                let mut ask = NewEvent::repo(
                    Reason::ApprovalRequired,
                    Some(revision),
                    format!(
                        "wave {} ({}) waits for `cim approve {} --wave {}`",
                        w.index + 1,
                        w.name,
                        short(revision),
                        w.name
                    ),
                );
                ask.wave = Some(w.name);
                news.push(ask);
            }
        }
        // Complete: every host converged (checked only when no work is
        // left, so that a busy rollout does not scan the fleet per host).
        let announced = self.status.repo.completed_revision.as_deref() == Some(revision.as_str());
        if !announced && self.queue.running() == 0 && self.queue.next_due().is_none() {
            if let Some(n) = rollout::completed(fleet, &self.status, revision) {
                let took = self
                    .rollout_started
                    .map(|t| format!(" in {:.1}s", (now.wall - t).as_seconds_f64()))
                    .unwrap_or_default();
                news.push(NewEvent::repo(
                    Reason::RolloutCompleted,
                    Some(revision),
                    format!("all {n} hosts converged at {}{took}", short(revision)),
                ));
            }
        }
        for host in std::mem::take(&mut self.gated) {
            self.queue.enqueue(&host, now.at);
        }
        append(out, news, then);
    }

    /// Hands due hosts to workers, within `--max-parallel` and the rollout
    /// policy.
    pub(super) fn dispatch(&mut self, now: Now, out: &mut Vec<Effect>) {
        if self.store_failure.is_some() {
            return;
        }
        let free = self.free_slots();
        if free == 0 {
            return;
        }
        let popped = self.queue.pop_ready(now.at, free);
        let mut ready = Vec::with_capacity(popped.len());
        {
            // What holds hosts back, found once for all of them: the
            // status does not change while work is handed out.
            let gate = self
                .specs
                .as_ref()
                .map(|(revision, fleet)| rollout::Gate::new(fleet, &self.status, revision));
            for host in popped {
                let Some(item) = self.work_item(&host).filter(|_| !self.held(&host)) else {
                    self.queue.done(&host);
                    continue;
                };
                if gate
                    .as_ref()
                    .is_some_and(|gate| gate.wait(&item.host).is_some())
                {
                    self.queue.done(&host);
                    self.gated.insert(host);
                    continue;
                }
                ready.push((host, item));
            }
        }
        let mut window = None;
        let mut closes = None;
        let mut ahead = Vec::new();
        for (host, mut item) in ready {
            if !self.forced.contains(&host) {
                let verdict = window.get_or_insert_with(|| self.windows_at(now, out));
                if let crate::window::Verdict::Closed { until, .. } = verdict {
                    self.queue.done(&host);
                    // Outside the windows nothing is activated; builds run
                    // ahead, so that the opening is spent on the hosts.
                    if !self.built.contains(&item.desired)
                        && self.prebuilt.insert(item.desired.clone())
                    {
                        if let Some(system) = self.desired.get(&host) {
                            ahead.push(system.clone());
                        }
                    }
                    if let Some(until) = until {
                        let wait =
                            std::time::Duration::try_from(*until - now.wall).unwrap_or_default();
                        self.queue.schedule(&host, now.at + wait);
                    }
                    continue;
                }
                item.activate_by = *closes.get_or_insert_with(|| self.windows_close(now));
            }
            out.push(Effect::Run(item));
        }
        if !ahead.is_empty() {
            out.push(Effect::Prebuild(ahead));
        }
    }

    pub(super) fn work_item(&self, host: &str) -> Option<WorkItem> {
        let (revision, fleet) = self.specs.as_ref()?;
        let desired = self.desired.get(host)?;
        let spec = fleet.hosts.get(host).filter(|h| !h.suspend)?;
        Some(WorkItem {
            host: std::sync::Arc::clone(spec),
            revision: revision.clone(),
            desired: desired.out.clone(),
            build: (!self.built.contains(&desired.out)).then(|| desired.drv.clone()),
            // Also for a host cim knows nothing of yet (a new state
            // directory on a running fleet): looking costs one connection,
            // building what it already runs could cost minutes.
            likely_current: self
                .status
                .hosts
                .get(host)
                .is_none_or(|h| h.current_system.as_deref() == Some(desired.out.as_str())),
            push: self.cfg.push_to_cache && !self.pushed.contains(&desired.out),
            substitute: spec
                .substitute_on_destination
                .unwrap_or(self.cfg.substitute_on_destination),
            activate_by: None,
        })
    }

    /// Re-checks every host that is not already waiting for a retry.
    pub(super) fn resync(&mut self, now: Now) {
        let hosts: Vec<String> = self.desired.keys().cloned().collect();
        for host in hosts {
            let Some(spec) = self.host_spec(&host) else {
                continue;
            };
            if spec.suspend || self.queue.is_queued(&host) || self.held(&host) {
                continue;
            }
            // dry-activate changes nothing on the host, so there is nothing
            // to re-check once it has run.
            if spec.action == Action::DryActivate
                && self.status.phase_of(&host) == Some(Phase::Converged)
            {
                continue;
            }
            self.queue.request(&host, now.at, Urgency::Check);
        }
    }
}
