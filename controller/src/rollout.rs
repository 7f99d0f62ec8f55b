//! Rollout policy decisions: which hosts may be worked on now for the
//! current revision (waves, `dependsOn`), and whether the revision's failure
//! budget is spent. Pure functions of the specs and the status projection,
//! so the controller asks and the tests check without any IO.

use crate::event::Phase;
use crate::spec::{Dependency, FleetSpec, HostSpec, MaxFailures, Selector};
use crate::status::{FleetStatus, HostStatus, RepoStatus};

/// The wave a host belongs to: the first whose selector matches it; hosts
/// matching none roll out after the last wave.
pub fn wave_of(fleet: &FleetSpec, host: &HostSpec) -> usize {
    fleet
        .policy
        .waves
        .iter()
        .position(|w| crate::spec::selects(&w.selector, &host.labels))
        .unwrap_or(fleet.policy.waves.len())
}

/// Done with `revision`: converged at it (or left alone by a suspension).
fn done(status: Option<&HostStatus>, revision: &str) -> bool {
    match status {
        Some(h) if h.phase == Phase::Suspended => true,
        Some(h) => h.phase == Phase::Converged && h.observed_revision.as_deref() == Some(revision),
        None => false,
    }
}

/// Why a host must wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// The failure budget halted the revision's rollout.
    Halted,
    /// A host of an earlier wave is not done.
    EarlierWave,
    /// Its wave has `approval: manual` and no `cim approve` yet.
    Approval(String),
    /// A host it depends on is not done.
    Dependencies,
}

/// What holds hosts back at one moment (the rollout policy against the
/// status), for a dispatch that asks about many hosts: the earliest open
/// wave is found once, and each selector's hosts not yet done once,
/// however many hosts ask (10,000 hosts depending on one selector would
/// otherwise scan the fleet 10,000 times).
pub struct Gate<'a> {
    fleet: &'a FleetSpec,
    status: &'a FleetStatus,
    revision: &'a str,
    open: std::cell::OnceCell<Option<usize>>,
    /// Per selector asked about: up to two of the hosts it matches that
    /// are not done (a host's own match is no dependency, so one more
    /// than itself tells).
    undone: std::cell::RefCell<std::collections::HashMap<Selector, Vec<&'a str>>>,
}

impl<'a> Gate<'a> {
    pub fn new(fleet: &'a FleetSpec, status: &'a FleetStatus, revision: &'a str) -> Gate<'a> {
        Gate {
            fleet,
            status,
            revision,
            open: std::cell::OnceCell::new(),
            undone: std::cell::RefCell::default(),
        }
    }

    fn done(&self, host: &str) -> bool {
        done(self.status.host(host), self.revision)
    }

    /// Why `host` must wait, or `None` if it may be worked on now (a host
    /// already done with the revision is only being re-checked).
    pub fn wait(&self, host: &HostSpec) -> Option<Wait> {
        let (fleet, status, revision) = (self.fleet, self.status, self.revision);
        if self.done(host.name.as_str()) {
            return None;
        }
        if status.repo.halted_revision.as_deref() == Some(revision) {
            return Some(Wait::Halted);
        }
        let wave = wave_of(fleet, host);
        if wave > 0 {
            let open = *self.open.get_or_init(|| open_wave(fleet, status, revision));
            if open.is_some_and(|open| open < wave) {
                return Some(Wait::EarlierWave);
            }
        }
        if let Some(w) = fleet.policy.waves.get(wave).filter(|w| w.manual) {
            if status.repo.approvals.get(&w.name).map(String::as_str) != Some(revision) {
                return Some(Wait::Approval(w.name.clone()));
            }
        }
        let waits = host.depends_on.iter().any(|d| match d {
            Dependency::Host(name) => {
                *name != host.name && fleet.hosts.contains_key(name.as_str()) && !self.done(name)
            }
            Dependency::Selector(selector) => {
                let mut undone = self.undone.borrow_mut();
                if !undone.contains_key(selector) {
                    let names = fleet
                        .hosts
                        .values()
                        .filter(|h| crate::spec::selects(selector, &h.labels))
                        .filter(|h| !self.done(h.name.as_str()))
                        .map(|h| h.name.as_str())
                        .take(2)
                        .collect();
                    undone.insert(selector.clone(), names);
                }
                undone
                    .get(selector)
                    .is_some_and(|names| names.iter().any(|name| *name != host.name.as_str()))
            }
        });
        waits.then_some(Wait::Dependencies)
    }
}

/// The earliest wave with a host not yet done with `revision`
/// (`waves.len()`: the hosts no wave matches); `None` without waves or
/// when every host is done.
pub fn open_wave(fleet: &FleetSpec, status: &FleetStatus, revision: &str) -> Option<usize> {
    if fleet.policy.waves.is_empty() {
        return None;
    }
    fleet
        .hosts
        .values()
        .filter(|h| !done(status.host(h.name.as_str()), revision))
        .map(|h| wave_of(fleet, h))
        .min()
}

/// The hosts that failed the current revision, if they exhaust the failure
/// budget (and the rollout is not already halted).
pub fn over_budget(fleet: &FleetSpec, status: &FleetStatus, revision: &str) -> Option<Vec<String>> {
    if status.repo.halted_revision.as_deref() == Some(revision) {
        return None;
    }
    let limit = match fleet.policy.max_failures {
        MaxFailures::Unlimited => return None,
        MaxFailures::Count(n) => n,
        MaxFailures::Percent(p) => {
            let total = fleet.hosts.len() as u64;
            // Rounded up, and at least one: "25%" of 3 hosts is 1.
            u32::try_from((total * u64::from(p)).div_ceil(100).max(1)).unwrap_or(u32::MAX)
        }
    };
    let failed: Vec<String> = fleet
        .hosts
        .keys()
        .filter(|h| {
            status.hosts.get(*h).is_some_and(|s| {
                s.phase == Phase::Failed && s.phase_revision.as_deref() == Some(revision)
            })
        })
        .cloned()
        .collect();
    (failed.len() as u64 >= u64::from(limit)).then_some(failed)
}

/// How many hosts converged at `revision`, if every active host of the
/// fleet did (the rollout is complete).
pub fn completed(fleet: &FleetSpec, status: &FleetStatus, revision: &str) -> Option<usize> {
    let mut converged = 0;
    for host in fleet.hosts.values().filter(|h| !h.suspend) {
        let h = status.hosts.get(host.name.as_str())?;
        if h.phase != Phase::Converged || h.observed_revision.as_deref() != Some(revision) {
            return None;
        }
        converged += 1;
    }
    (converged > 0).then_some(converged)
}

/// The wave a rollout is at: the earliest wave with a host not yet done
/// with `revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentWave {
    /// 0-based; `waves.len()` is the implicit last wave of unmatched hosts.
    pub index: usize,
    pub name: String,
    pub members: Vec<String>,
}

/// `None` without waves, or when every host is done with `revision`.
pub fn current_wave(
    fleet: &FleetSpec,
    status: &FleetStatus,
    revision: &str,
) -> Option<CurrentWave> {
    let index = open_wave(fleet, status, revision)?;
    let name = fleet
        .policy
        .waves
        .get(index)
        .map_or_else(|| "rest".to_string(), |w| w.name.clone());
    let members = fleet
        .hosts
        .values()
        .filter(|h| wave_of(fleet, h) == index)
        .map(|h| h.name.to_string())
        .collect();
    Some(CurrentWave {
        index,
        name,
        members,
    })
}

/// Progress of the current revision's rollout, for the status API.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub revision: Option<String>,
    pub done: usize,
    pub failed: usize,
    pub pending: usize,
    /// Set when the failure budget halted the rollout.
    pub halted: bool,
    /// The wave being rolled out, as recorded by the last `WaveStarted`.
    pub wave: Option<String>,
}

/// Counts hosts by where they stand relative to the current revision.
pub fn progress(status: &FleetStatus) -> Progress {
    progress_of(&status.repo, status.hosts.values().map(|h| &**h))
}

/// [`progress`] of the hosts `hosts` and the repository row `repo`.
pub fn progress_of<'a>(
    repo: &RepoStatus,
    hosts: impl IntoIterator<Item = &'a HostStatus>,
) -> Progress {
    let Some(revision) = repo.revision.clone() else {
        return Progress::default();
    };
    let mut p = Progress {
        halted: repo.halted_revision.as_deref() == Some(revision.as_str()),
        wave: repo.wave.clone(),
        revision: Some(revision.clone()),
        ..Progress::default()
    };
    for h in hosts {
        match h.phase {
            Phase::Failed if h.phase_revision.as_deref() == Some(revision.as_str()) => {
                p.failed += 1
            }
            _ if done(Some(h), &revision) => p.done += 1,
            _ => p.pending += 1,
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{NewEvent, Reason};
    use crate::spec::{parse_fleet, SpecFile};
    use time::OffsetDateTime;

    fn fleet(extra_fleet: &str, hosts: &[(&str, &str, &str)]) -> FleetSpec {
        let spec = if extra_fleet.is_empty() {
            " {}\n"
        } else {
            "\n"
        };
        let mut text = format!(
            "apiVersion: cim/v1\nkind: Fleet\nmetadata: {{name: fleet}}\nspec:{spec}{extra_fleet}"
        );
        for (name, role, extra) in hosts {
            text.push_str(&format!(
                "---\napiVersion: cim/v1\nkind: Host\nmetadata: {{name: {name}, labels: {{role: {role}}}}}\nspec:\n  address: 10.0.0.1\n{extra}"
            ));
        }
        parse_fleet(&[SpecFile {
            path: "specs/f.yaml".into(),
            contents: text.into_bytes(),
        }])
        .unwrap()
    }

    fn status(events: Vec<NewEvent>) -> FleetStatus {
        let mut s = FleetStatus::default();
        for (i, ev) in events.into_iter().enumerate() {
            let from = ev.host.as_deref().and_then(|h| s.phase_of(h));
            s.apply(&ev.into_event(i as u64 + 1, OffsetDateTime::UNIX_EPOCH, from));
        }
        s
    }

    fn converged(host: &str) -> NewEvent {
        NewEvent::host(host, Reason::Converged, Some("r"), "")
            .phase(Phase::Converged)
            .system("/nix/store/x")
    }

    fn failed(host: &str) -> NewEvent {
        NewEvent::host(host, Reason::ActivationFailed, Some("r"), "").phase(Phase::Failed)
    }

    const WAVES: &str = "  maxFailures: 1\n  waves:\n    - {name: canary, selector: {role: canary}}\n    - {name: web, selector: {role: web}}\n";

    #[test]
    fn waves_go_in_order() {
        let f = fleet(
            WAVES,
            &[
                ("c-1", "canary", ""),
                ("w-1", "web", ""),
                ("x-1", "other", ""),
            ],
        );
        assert_eq!(wave_of(&f, &f.hosts["c-1"]), 0);
        assert_eq!(wave_of(&f, &f.hosts["w-1"]), 1);
        assert_eq!(wave_of(&f, &f.hosts["x-1"]), 2);
        let s = status(vec![]);
        assert_eq!(wait(&f, &s, "r", "c-1"), None);
        assert_eq!(wait(&f, &s, "r", "w-1"), Some(Wait::EarlierWave));
        let s0 = status(vec![]);
        let wave = current_wave(&f, &s0, "r").unwrap();
        assert_eq!(
            (wave.index, wave.name.as_str(), wave.members.as_slice()),
            (0, "canary", &["c-1".to_string()][..])
        );
        let s = status(vec![converged("c-1")]);
        assert_eq!(wait(&f, &s, "r", "w-1"), None);
        assert_eq!(current_wave(&f, &s, "r").unwrap().name, "web");
        let all = status(vec![converged("c-1"), converged("w-1"), converged("x-1")]);
        assert_eq!(current_wave(&f, &all, "r"), None);
        assert_eq!(wait(&f, &s, "r", "x-1"), Some(Wait::EarlierWave));
        // Converged at an older revision does not count.
        assert_eq!(wait(&f, &s, "r2", "w-1"), Some(Wait::EarlierWave));
    }

    #[test]
    fn dependencies_by_name_and_selector() {
        let f = fleet(
            "",
            &[
                ("db-1", "db", ""),
                ("app-1", "app", "  dependsOn:\n    - {host: db-1}\n"),
                (
                    "web-1",
                    "web",
                    "  dependsOn:\n    - {selector: {role: app}}\n",
                ),
            ],
        );
        let s = status(vec![]);
        assert_eq!(wait(&f, &s, "r", "db-1"), None);
        assert_eq!(wait(&f, &s, "r", "app-1"), Some(Wait::Dependencies));
        assert_eq!(wait(&f, &s, "r", "web-1"), Some(Wait::Dependencies));
        let s = status(vec![converged("db-1")]);
        assert_eq!(wait(&f, &s, "r", "app-1"), None);
        assert_eq!(wait(&f, &s, "r", "web-1"), Some(Wait::Dependencies));
        let s = status(vec![converged("db-1"), converged("app-1")]);
        assert_eq!(wait(&f, &s, "r", "web-1"), None);
    }

    #[test]
    fn failures_of_an_older_revision_do_not_spend_the_budget() {
        let f = fleet(WAVES, &[("c-1", "canary", ""), ("w-1", "web", "")]);
        // c-1 failed revision r; the rollout of r2 has not touched it yet.
        let s = status(vec![failed("c-1")]);
        assert_eq!(over_budget(&f, &s, "r2"), None);
        assert_eq!(over_budget(&f, &s, "r"), Some(vec!["c-1".to_string()]));
        let mut s = s;
        s.repo.revision = Some("r2".to_string());
        let p = progress(&s);
        assert_eq!((p.failed, p.pending), (0, 1));
    }

    #[test]
    fn the_failure_budget_halts_and_blocks_untouched_hosts() {
        let f = fleet(
            WAVES,
            &[
                ("c-1", "canary", ""),
                ("w-1", "web", ""),
                ("w-2", "web", ""),
            ],
        );
        assert_eq!(over_budget(&f, &status(vec![]), "r"), None);
        let s = status(vec![failed("c-1")]);
        assert_eq!(over_budget(&f, &s, "r"), Some(vec!["c-1".to_string()]));
        let halted = status(vec![
            converged("w-1"),
            failed("c-1"),
            NewEvent::repo(Reason::RolloutHalted, Some("r"), "halted"),
        ]);
        assert_eq!(over_budget(&f, &halted, "r"), None, "halting twice");
        assert_eq!(wait(&f, &halted, "r", "w-2"), Some(Wait::Halted));
        assert_eq!(
            wait(&f, &halted, "r", "w-1"),
            None,
            "done hosts may be resynced"
        );
        let p = progress(&FleetStatus {
            repo: crate::status::RepoStatus {
                revision: Some("r".into()),
                ..halted.repo.clone()
            },
            hosts: halted.hosts.clone(),
        });
        assert_eq!((p.done, p.failed, p.pending, p.halted), (1, 1, 0, true));
    }

    #[test]
    fn percentages_round_up() {
        let f = fleet(
            "  maxFailures: 25%\n",
            &[("a", "x", ""), ("b", "x", ""), ("c", "x", "")],
        );
        assert!(over_budget(&f, &status(vec![failed("a")]), "r").is_some());
        let f = fleet(
            "  maxFailures: 50%\n",
            &[("a", "x", ""), ("b", "x", ""), ("c", "x", "")],
        );
        assert!(over_budget(&f, &status(vec![failed("a")]), "r").is_none());
        assert!(over_budget(&f, &status(vec![failed("a"), failed("b")]), "r").is_some());
    }

    fn wait(f: &FleetSpec, s: &FleetStatus, revision: &str, host: &str) -> Option<Wait> {
        Gate::new(f, s, revision).wait(&f.hosts[host])
    }

    fn approved(wave: &str) -> NewEvent {
        let mut ev = NewEvent::repo(Reason::WaveApproved, Some("r"), "");
        ev.wave = Some(wave.to_string());
        ev
    }

    /// One gate asked about many hosts answers each as a gate of its own
    /// would (what it finds once is the same for all of them), as the
    /// rollout goes on; a manual wave waits for its approval.
    #[test]
    fn one_gate_for_many_hosts_answers_as_one_per_host() {
        let f = fleet(
            "  maxFailures: 1\n  waves:\n    - {name: canary, selector: {role: canary}}\n    - {name: web, selector: {role: web}, approval: manual}\n",
            &[
                ("c-1", "canary", ""),
                ("c-2", "canary", ""),
                ("w-1", "web", "  dependsOn:\n    - {selector: {role: canary}}\n"),
                ("w-2", "web", "  dependsOn:\n    - {selector: {role: canary}}\n"),
                ("w-3", "web", "  dependsOn:\n    - {host: w-1}\n"),
                ("x-1", "other", ""),
            ],
        );
        let steps = [
            vec![],
            vec![converged("c-1")],
            vec![converged("c-1"), converged("c-2")],
            vec![converged("c-1"), converged("c-2"), approved("web")],
            vec![
                converged("c-1"),
                converged("c-2"),
                approved("web"),
                converged("w-1"),
            ],
            vec![
                converged("c-1"),
                NewEvent::repo(Reason::RolloutHalted, Some("r"), ""),
            ],
        ];
        let mut seen = Vec::new();
        for events in steps {
            let s = status(events);
            let gate = Gate::new(&f, &s, "r");
            let shared: Vec<Option<Wait>> = f.hosts.values().map(|h| gate.wait(h)).collect();
            let alone: Vec<Option<Wait>> = f
                .hosts
                .values()
                .map(|h| Gate::new(&f, &s, "r").wait(h))
                .collect();
            assert_eq!(shared, alone);
            seen.push(shared);
        }
        // c-1 c-2 w-1 w-2 w-3 x-1, at the third step: the web wave waits
        // for its approval.
        assert_eq!(seen[2][2], Some(Wait::Approval("web".to_string())));
        // Approved: w-1 and w-2 go (the canaries they depend on are
        // done), w-3 waits for w-1, x-1 for the web wave.
        assert_eq!(
            seen[3][2..],
            [
                None,
                None,
                Some(Wait::Dependencies),
                Some(Wait::EarlierWave)
            ]
        );
        assert_eq!(seen[4][4], None, "w-3's dependency is done");
        assert_eq!(seen[5][1], Some(Wait::Halted));
    }
}
