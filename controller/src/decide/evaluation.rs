//! Decisions about revisions: a new head, a revision's specs, its one
//! evaluation for the whole fleet, and what follows — refuse specs naming
//! configurations the flake lacks, record the revision's specs, record
//! hosts whose configuration does not evaluate, and queue the rest with
//! the system they should run.

use super::{append, short, Effect, Now, Purpose, RequestId, State, Then};
use crate::driver::Evaluation;
use crate::event::{NewEvent, Phase, Reason};
use crate::queue::Urgency;
use crate::spec::FleetSpec;
use crate::trust::Verdict;
use crate::types::Revision;

impl State {
    /// The branch moved: said at once, before specs are read or anything
    /// is evaluated.
    pub(super) fn on_head(&mut self, revision: &Revision, out: &mut Vec<Effect>) {
        if self.status.repo.latest_revision.as_deref() == Some(revision.as_str())
            || self.current_revision() == Some(revision.as_str())
        {
            return;
        }
        append(
            out,
            vec![NewEvent::repo(
                Reason::RevisionDetected,
                Some(revision),
                format!("new head {} of the watched branch", short(revision)),
            )],
            Then::Nothing,
        );
    }

    /// A new head: judged (its signature, whether it rewrites history)
    /// before its specs are.
    pub(super) fn on_new_head(
        &mut self,
        revision: Revision,
        specs: Result<FleetSpec, crate::spec::SpecErrors>,
        trust: Verdict,
        rewritten_from: Option<Revision>,
        out: &mut Vec<Effect>,
    ) {
        let current = self.current_revision() == Some(revision.as_str());
        if current && rewritten_from.is_none() {
            return;
        }
        self.on_head(&revision, out);
        let refused = match trust {
            Verdict::NotChecked | Verdict::Trusted { .. } => None,
            Verdict::Unsigned => Some((
                Reason::UnsignedRevision,
                format!("{} is not signed", short(&revision)),
            )),
            Verdict::Untrusted { why } => Some((
                Reason::UntrustedSigner,
                format!("{} is not trusted: {why}", short(&revision)),
            )),
        };
        if let Some((reason, why)) = refused {
            if self.judged.as_ref() != Some(&revision) {
                self.judged = Some(revision.clone());
                let message = format!("{why}; {}", self.keeping());
                append(
                    out,
                    vec![NewEvent::repo(reason, Some(&revision), message)],
                    Then::Nothing,
                );
            }
            return;
        }
        if let Some(from) = rewritten_from {
            let mut message = format!(
                "the branch moved from {} to {}, which does not descend from it (history was rewritten)",
                short(&from),
                short(&revision)
            );
            if current {
                message.push_str("; it is the revision deployed, nothing changes");
            } else if self.cfg.refuse_rewrites {
                message.push_str(&format!(
                    "; not deployed until `cim accept {}`; {}",
                    short(&revision),
                    self.keeping()
                ));
            }
            append(
                out,
                vec![NewEvent::repo(
                    Reason::HistoryRewritten,
                    Some(&revision),
                    message,
                )],
                Then::Nothing,
            );
            if current {
                return;
            }
            if self.cfg.refuse_rewrites {
                self.awaiting_accept = Some((revision, specs));
                return;
            }
        }
        self.awaiting_accept = None;
        self.on_revision(revision, specs, out);
    }

    /// What stays deployed while a revision is refused, for its message.
    fn keeping(&self) -> String {
        self.current_revision()
            .map_or("nothing is deployed".to_string(), |r| {
                format!("still reconciling {}", short(r))
            })
    }

    /// `cim accept REV`: deploys the rewritten revision that waits for it.
    pub(super) fn on_accept(
        &mut self,
        id: RequestId,
        wanted: &str,
        out: &mut Vec<Effect>,
    ) -> Result<(), String> {
        let Some((revision, _)) = self.awaiting_accept.as_ref() else {
            return Err("no rewritten revision is waiting to be accepted".to_string());
        };
        if wanted.len() < 7 || !revision.as_str().starts_with(wanted) {
            return Err(format!(
                "the revision waiting to be accepted is {revision}, not {wanted}"
            ));
        }
        let Some((revision, specs)) = self.awaiting_accept.take() else {
            return Ok(());
        };
        append(
            out,
            vec![NewEvent::repo(
                Reason::RevisionAccepted,
                Some(&revision),
                format!(
                    "{} accepted by `cim accept` despite the rewritten history",
                    short(&revision)
                ),
            )],
            Then::Accepted {
                id,
                revision,
                specs,
            },
        );
        Ok(())
    }

    /// A revision cleared for deployment: its specs, then its evaluation.
    pub(super) fn on_revision(
        &mut self,
        revision: Revision,
        specs: Result<FleetSpec, crate::spec::SpecErrors>,
        out: &mut Vec<Effect>,
    ) {
        match specs {
            Err(errors) => self.spec_invalid(&revision, &errors, out),
            Ok(fleet) => self.start_evaluation(&revision, Purpose::New(fleet), out),
        }
    }

    /// Reports a revision whose specs do not validate (once per revision);
    /// the current one stays deployed.
    fn spec_invalid(
        &mut self,
        revision: &Revision,
        errors: &crate::spec::SpecErrors,
        out: &mut Vec<Effect>,
    ) {
        if self.judged.as_ref() == Some(revision) {
            return;
        }
        self.judged = Some(revision.clone());
        let keeping = self.keeping();
        append(
            out,
            vec![NewEvent::repo(
                Reason::SpecInvalid,
                Some(revision),
                format!(
                    "specs at {} are invalid, {keeping}: {errors}",
                    short(revision)
                ),
            )],
            Then::Nothing,
        );
    }

    /// Evaluates `revision`. A new revision replaces any evaluation in
    /// flight (it is moot); a refresh waits for one.
    pub(super) fn start_evaluation(
        &mut self,
        revision: &Revision,
        purpose: Purpose,
        out: &mut Vec<Effect>,
    ) {
        if matches!(purpose, Purpose::Refresh) && self.evaluating.is_some() {
            return;
        }
        let fleet = match &purpose {
            Purpose::New(fleet) => fleet,
            Purpose::Refresh => match self.specs.as_ref() {
                Some((_, fleet)) => fleet,
                None => return,
            },
        };
        let refresh = matches!(purpose, Purpose::Refresh);
        // A refresh is for the hosts left without a system (their
        // evaluation or build failed): evaluating the whole fleet again
        // for one of them would cost what the revision's evaluation did.
        let mut configurations: Vec<String> = fleet
            .hosts
            .values()
            .filter(|h| !h.suspend && (!refresh || !self.desired.contains_key(h.name.as_str())))
            .map(|h| h.configuration.clone())
            .collect();
        if refresh && configurations.is_empty() {
            return;
        }
        configurations.sort();
        configurations.dedup();
        if refresh {
            self.refreshing.clone_from(&configurations);
        }
        self.evaluating = Some(revision.clone());
        out.push(Effect::Evaluate {
            revision: revision.clone(),
            purpose,
            configurations,
        });
    }

    pub(super) fn on_evaluated(
        &mut self,
        revision: Revision,
        purpose: Purpose,
        result: Result<Evaluation, String>,
        now: Now,
        out: &mut Vec<Effect>,
    ) {
        if self.evaluating.as_ref() != Some(&revision) {
            return;
        }
        self.evaluating = None;
        match purpose {
            Purpose::New(fleet) => {
                if let Ok(evaluation) = &result {
                    if let Err(errors) =
                        crate::spec::check_configurations(&fleet, &evaluation.names)
                    {
                        self.spec_invalid(&revision, &errors, out);
                        return;
                    }
                }
                self.apply_specs(revision, fleet, result, out);
            }
            Purpose::Refresh => {
                if self.current_revision() == Some(revision.as_str()) {
                    let failures = self.set_desired(&revision, &result, true, now);
                    append(out, failures, Then::AdvanceRollout);
                }
            }
        }
    }

    /// Records `fleet` as the current specs: one batch of events (loaded,
    /// removed, suspended and resumed hosts), in one transaction. Nothing
    /// changes until it commits.
    fn apply_specs(
        &mut self,
        revision: Revision,
        fleet: FleetSpec,
        result: Result<Evaluation, String>,
        out: &mut Vec<Effect>,
    ) {
        let mut news = vec![NewEvent::repo(
            Reason::SpecsLoaded,
            Some(&revision),
            format!("{} hosts at {}", fleet.hosts.len(), short(&revision)),
        )];
        let removed: Vec<String> = self
            .status
            .hosts
            .keys()
            .filter(|h| !fleet.hosts.contains_key(*h))
            .cloned()
            .collect();
        for host in &removed {
            news.push(NewEvent::host(
                host,
                Reason::HostRemoved,
                Some(&revision),
                "no longer in the specs; the host is left running as it is",
            ));
        }
        let mut suspended = Vec::new();
        for host in fleet.hosts.values() {
            let phase = self.status.phase_of(&host.name);
            if host.suspend && phase != Some(Phase::Suspended) {
                suspended.push(host.name.to_string());
                news.push(
                    NewEvent::host(
                        &host.name,
                        Reason::Suspended,
                        Some(&revision),
                        "suspended by its spec",
                    )
                    .phase(Phase::Suspended),
                );
            } else if !host.suspend
                && phase == Some(Phase::Suspended)
                && !self.operator_suspended(&host.name)
            {
                news.push(
                    NewEvent::host(
                        &host.name,
                        Reason::Resumed,
                        Some(&revision),
                        "resumed by its spec",
                    )
                    .phase(Phase::Pending),
                );
            }
        }
        append(
            out,
            news,
            Then::SpecsApplied {
                revision,
                fleet,
                removed,
                suspended,
                result,
            },
        );
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn specs_applied(
        &mut self,
        revision: Revision,
        fleet: FleetSpec,
        removed: Vec<String>,
        suspended: Vec<String>,
        result: Result<Evaluation, String>,
        now: Now,
        out: &mut Vec<Effect>,
    ) {
        for host in removed {
            self.queue.remove(&host);
        }
        for host in suspended {
            self.queue.forget(&host);
        }
        self.specs = Some((revision.clone(), fleet));
        self.desired.clear();
        self.rollout_started = Some(now.wall);
        let failures = self.set_desired(&revision, &result, false, now);
        append(out, failures, Then::AdvanceRollout);
    }

    /// Gives every active host its system from `result` and queues it;
    /// returns the events of hosts that have none. On a refresh, only the
    /// hosts it evaluated, still without a system, take its result.
    fn set_desired(
        &mut self,
        revision: &Revision,
        result: &Result<Evaluation, String>,
        refresh: bool,
        now: Now,
    ) -> Vec<NewEvent> {
        let hosts: Vec<std::sync::Arc<crate::spec::HostSpec>> = self
            .specs
            .as_ref()
            .map(|(_, fleet)| {
                fleet
                    .hosts
                    .values()
                    .filter(|h| !h.suspend)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let mut failures = Vec::new();
        for spec in hosts {
            let (host, configuration) = (spec.name.as_str(), &spec.configuration);
            // A host that lost its system while the refresh ran (a build
            // failed) was not evaluated by it: it waits for the next one.
            if refresh
                && (self.desired.contains_key(host)
                    || self.refreshing.binary_search(configuration).is_err())
            {
                continue;
            }
            let system = match result {
                Err(message) => Err(message.clone()),
                Ok(evaluation) => evaluation
                    .systems
                    .get(configuration)
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
                    // A host already running it is only looked at: it goes
                    // after the hosts this revision changes.
                    let urgency = match self.status.hosts.get(host) {
                        Some(row)
                            if row.phase == Phase::Converged
                                && row.current_system.as_deref() == Some(system.out.as_str()) =>
                        {
                            Urgency::Check
                        }
                        _ => Urgency::Change,
                    };
                    match self.desired.get_mut(host) {
                        Some(desired) => *desired = system,
                        None => {
                            self.desired.insert(host.to_string(), system);
                        }
                    }
                    if !self.held(host) {
                        self.queue.request(host, now.at, urgency);
                    }
                }
                Err(message) => failures.push(self.build_failed(host, revision, message)),
            }
        }
        failures
    }
}
