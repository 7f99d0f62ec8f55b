//! The `kind: Fleet` document (rollout policy: parallelism, waves, failure
//! budget, default health checks) and hosts' `dependsOn`, with their
//! validation. One Fleet document per repository at most; without one, all
//! hosts form a single wave with no failure budget.

use std::collections::{BTreeMap, HashMap};

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{check_dns_label, FileContext, HealthCheck, HostSpec, Loc, SpecError};

/// Label `key: value` pairs that must all match.
pub type Selector = BTreeMap<String, String>;

/// Whether `labels` match every `key: value` of `selector` (an empty
/// selector matches every host). The one rule for selectors: waves,
/// `dependsOn` and the API's selections all ask it.
pub fn selects(selector: &Selector, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// How a revision rolls out across the fleet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RolloutPolicy {
    /// Hosts worked on at once (besides `--max-parallel`).
    pub max_parallel: Option<usize>,
    pub max_failures: MaxFailures,
    /// Ordered; a wave starts when every host of the earlier ones is done.
    pub waves: Vec<Wave>,
    /// Checks for hosts that declare none of their own.
    pub health_checks: Vec<HealthCheck>,
    /// `substituteOnDestination` for hosts that do not set it.
    pub substitute_on_destination: Option<bool>,
    /// `reboot`, `rebootTimeout` and `keepGenerations` for hosts that do
    /// not set them.
    pub reboot: Option<super::RebootPolicy>,
    pub reboot_timeout: Option<std::time::Duration>,
    pub keep_generations: Option<u32>,
    /// When hosts may be worked on (none: always).
    pub windows: Vec<crate::window::Window>,
}

/// When a revision's rollout halts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MaxFailures {
    #[default]
    Unlimited,
    Count(u32),
    /// Of the fleet's hosts, rounded up.
    Percent(u32),
}

impl std::fmt::Display for MaxFailures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MaxFailures::Unlimited => f.write_str("no maxFailures"),
            MaxFailures::Count(n) => write!(f, "maxFailures {n}"),
            MaxFailures::Percent(p) => write!(f, "maxFailures {p}%"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wave {
    pub name: String,
    pub selector: Selector,
    /// `approval: manual`: the wave waits for `cim approve REV` before its
    /// hosts are touched.
    pub manual: bool,
}

/// `approval` of a wave.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawApproval {
    #[default]
    Auto,
    Manual,
}

/// Another host (or hosts) that must be converged on the same revision
/// first.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dependency {
    Host(String),
    Selector(Selector),
}

impl Dependency {
    pub fn matches(&self, host: &HostSpec) -> bool {
        match self {
            Dependency::Host(name) => *name == host.name,
            Dependency::Selector(sel) => selects(sel, &host.labels),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWave {
    name: String,
    selector: Selector,
    #[serde(default)]
    approval: RawApproval,
}

/// One of `windows`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawWindow {
    kind: RawWindowKind,
    schedule: String,
    duration: String,
    #[serde(default)]
    time_zone: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawWindowKind {
    Allow,
    Deny,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDependency {
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    selector: Option<Selector>,
}

/// `maxFailures`: a count (`2`) or a percentage (`"25%"`).
pub(super) struct RawMaxFailures(String);

impl<'de> Deserialize<'de> for RawMaxFailures {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawMaxFailures;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a count like 2 or a percentage like 25%")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(RawMaxFailures(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(RawMaxFailures(v.to_string()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RawMaxFailures(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

fn max_failures(raw: &str) -> Result<MaxFailures, String> {
    let bad = || format!("maxFailures `{raw}` must be a count like 2 or a percentage like 25%");
    match raw.strip_suffix('%') {
        Some(p) => match p.trim().parse::<u32>() {
            Ok(p) if (1..=100).contains(&p) => Ok(MaxFailures::Percent(p)),
            _ => Err(bad()),
        },
        None => match raw.trim().parse::<u32>() {
            Ok(n) if n >= 1 => Ok(MaxFailures::Count(n)),
            _ => Err(bad()),
        },
    }
}

/// The Fleet-only fields of a spec.
pub(super) struct FleetFields<'a> {
    pub max_parallel: &'a Option<Spanned<u32>>,
    pub max_failures: &'a Option<Spanned<RawMaxFailures>>,
    pub waves: &'a [Spanned<RawWave>],
    pub windows: &'a [Spanned<RawWindow>],
}

impl FleetFields<'_> {
    /// The location of the first Fleet-only field present, for refusing it
    /// in a Host document.
    pub fn first_present(&self) -> Option<(&'static str, Loc)> {
        if let Some(v) = self.max_parallel {
            return Some(("maxParallel", v.into()));
        }
        if let Some(v) = self.max_failures {
            return Some(("maxFailures", v.into()));
        }
        if let Some(w) = self.windows.first() {
            return Some(("windows", w.into()));
        }
        self.waves.first().map(|w| ("waves", w.into()))
    }
}

impl FileContext<'_> {
    /// `windows`, validated.
    pub(super) fn windows(
        &self,
        raw: &[Spanned<RawWindow>],
        errs: &mut Vec<SpecError>,
    ) -> Vec<crate::window::Window> {
        use crate::window::{Window, WindowKind};
        let mut windows = Vec::new();
        for w in raw {
            let kind = match w.value.kind {
                RawWindowKind::Allow => WindowKind::Allow,
                RawWindowKind::Deny => WindowKind::Deny,
            };
            let made = super::parse_duration(&w.value.duration)
                .map_err(|e| format!("window duration: {e}"))
                .and_then(|d| {
                    Window::new(kind, &w.value.schedule, d, w.value.time_zone.as_deref())
                });
            match made {
                Ok(window) => windows.push(window),
                Err(why) => errs.push(self.error(w.into(), why)),
            }
        }
        windows
    }

    /// `rebootTimeout`, validated.
    pub(super) fn reboot_timeout(
        &self,
        spec: &super::RawSpec,
        errs: &mut Vec<SpecError>,
    ) -> Option<std::time::Duration> {
        let raw = spec.reboot_timeout.as_ref()?;
        match super::parse_duration(&raw.value) {
            Ok(d) if d >= std::time::Duration::from_secs(1) => Some(d),
            Ok(_) => {
                errs.push(self.error(raw.into(), "rebootTimeout must be at least 1s".to_string()));
                None
            }
            Err(why) => {
                errs.push(self.error(raw.into(), format!("rebootTimeout: {why}")));
                None
            }
        }
    }

    /// `keepGenerations`, validated.
    pub(super) fn keep_generations(
        &self,
        spec: &super::RawSpec,
        errs: &mut Vec<SpecError>,
    ) -> Option<u32> {
        let k = spec.keep_generations.as_ref()?;
        if k.value < 2 {
            errs.push(self.error(
                k.into(),
                "keepGenerations must be at least 2 (the running generation and the one to roll back to)".to_string(),
            ));
        }
        Some(k.value)
    }

    pub(super) fn fleet_policy(
        &self,
        name: &Spanned<String>,
        fields: FleetFields<'_>,
        health_checks: Vec<HealthCheck>,
        errs: &mut Vec<SpecError>,
    ) -> RolloutPolicy {
        if let Err(why) = check_dns_label(&name.value) {
            errs.push(self.error(
                name.into(),
                format!("invalid fleet name `{}`: {why}", name.value),
            ));
        }
        let mut policy = RolloutPolicy {
            health_checks,
            ..RolloutPolicy::default()
        };
        if let Some(p) = fields.max_parallel {
            if p.value == 0 {
                errs.push(self.error(p.into(), "maxParallel must be at least 1".to_string()));
            }
            policy.max_parallel = Some(p.value as usize);
        }
        if let Some(m) = fields.max_failures {
            match max_failures(&m.value.0) {
                Ok(v) => policy.max_failures = v,
                Err(why) => errs.push(self.error(m.into(), why)),
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for w in fields.waves {
            if let Err(why) = check_dns_label(&w.value.name) {
                errs.push(self.error(
                    w.into(),
                    format!("invalid wave name `{}`: {why}", w.value.name),
                ));
            } else if !names.insert(w.value.name.clone()) {
                errs.push(self.error(w.into(), format!("duplicate wave `{}`", w.value.name)));
            }
            if w.value.selector.is_empty() {
                errs.push(self.error(
                    w.into(),
                    format!("wave `{}` has an empty selector", w.value.name),
                ));
            }
            policy.waves.push(Wave {
                name: w.value.name.clone(),
                selector: w.value.selector.clone(),
                manual: w.value.approval == RawApproval::Manual,
            });
        }
        policy
    }

    pub(super) fn dependencies(
        &self,
        raw: &[Spanned<RawDependency>],
        errs: &mut Vec<SpecError>,
    ) -> Vec<(Dependency, Loc)> {
        let mut deps = Vec::new();
        for d in raw {
            match (&d.value.host, &d.value.selector) {
                (Some(h), None) => deps.push((Dependency::Host(h.clone()), d.into())),
                (None, Some(s)) if !s.is_empty() => {
                    deps.push((Dependency::Selector(s.clone()), d.into()))
                }
                _ => errs.push(
                    self.error(
                        d.into(),
                        "a dependency needs exactly one of `host` and a non-empty `selector`"
                            .to_string(),
                    ),
                ),
            }
        }
        deps
    }
}

/// A host's dependencies, with where each was written.
pub(super) struct DeclaredDeps<'a> {
    pub host: String,
    pub ctx_path: &'a str,
    pub ctx_source: &'a str,
    pub deps: Vec<(Dependency, Loc)>,
}

/// Checks that every dependency names hosts that exist, and that no host
/// waits on itself through a cycle (which would never roll out).
pub(super) fn check_dependencies(
    hosts: &BTreeMap<String, HostSpec>,
    declared: &[DeclaredDeps<'_>],
    errs: &mut Vec<SpecError>,
) {
    // Each distinct dependency is resolved once: a selector that 10,000
    // hosts depend on scans the fleet once, not 10,000 times (twice each:
    // here and in the search for cycles).
    let mut resolved: HashMap<&Dependency, Vec<&str>> = HashMap::new();
    for dep in hosts.values().flat_map(|h| &h.depends_on) {
        resolved.entry(dep).or_insert_with(|| match dep {
            Dependency::Host(name) => hosts
                .get_key_value(name.as_str())
                .map(|(name, _)| name.as_str())
                .into_iter()
                .collect(),
            Dependency::Selector(_) => hosts
                .values()
                .filter(|h| dep.matches(h))
                .map(|h| h.name.as_str())
                .collect(),
        });
    }
    for d in declared {
        let ctx = FileContext {
            path: d.ctx_path,
            source: d.ctx_source,
        };
        for (dep, loc) in &d.deps {
            let targets = resolved.get(dep).map_or(&[][..], Vec::as_slice);
            if !targets.iter().any(|t| *t != d.host) {
                let what = match dep {
                    Dependency::Host(h) => format!("no host `{h}`"),
                    Dependency::Selector(s) => format!("no other host matches selector {s:?}"),
                };
                errs.push(ctx.error(*loc, format!("host `{}` depends on {what}", d.host)));
            }
        }
    }
    // Depth-first search for a cycle in "waits for" edges.
    fn visit<'h>(
        name: &'h str,
        hosts: &'h BTreeMap<String, HostSpec>,
        resolved: &HashMap<&Dependency, Vec<&'h str>>,
        state: &mut BTreeMap<&'h str, u8>,
        path: &mut Vec<&'h str>,
    ) -> Option<Vec<String>> {
        match state.get(name) {
            Some(1) => {
                let start = path.iter().position(|p| *p == name).unwrap_or(0);
                let mut cycle: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
                cycle.push(name.to_string());
                return Some(cycle);
            }
            Some(_) => return None,
            None => {}
        }
        state.insert(name, 1);
        path.push(name);
        let host = &hosts[name];
        let waits_for = host
            .depends_on
            .iter()
            .filter_map(|d| resolved.get(d))
            .flatten()
            .filter(|other| host.name != **other);
        for other in waits_for {
            if let Some(c) = visit(other, hosts, resolved, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(name, 2);
        None
    }
    let mut state = BTreeMap::new();
    for name in hosts.keys() {
        if let Some(cycle) = visit(name, hosts, &resolved, &mut state, &mut Vec::new()) {
            let first = &cycle[0];
            if let Some(d) = declared.iter().find(|d| &d.host == first) {
                let ctx = FileContext {
                    path: d.ctx_path,
                    source: d.ctx_source,
                };
                let loc = d
                    .deps
                    .first()
                    .map_or(Loc { line: 1, column: 1 }, |(_, l)| *l);
                errs.push(ctx.error(loc, format!("dependency cycle: {}", cycle.join(" -> "))));
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parse_fleet, SpecFile};
    use super::*;

    const HOST: &str = "apiVersion: cim/v1\nkind: Host\nmetadata: {name: web-1, labels: {role: web}}\nspec:\n  address: 10.0.0.2\n";
    const DB: &str = "apiVersion: cim/v1\nkind: Host\nmetadata: {name: db-1, labels: {role: db}}\nspec:\n  address: 10.0.0.3\n";

    fn parse(text: &str) -> Result<crate::spec::FleetSpec, Vec<String>> {
        parse_fleet(&[SpecFile {
            path: "specs/f.yaml".into(),
            contents: text.as_bytes().to_vec(),
        }])
        .map_err(|e| e.errors.iter().map(ToString::to_string).collect())
    }

    fn fleet_doc(spec: &str) -> String {
        format!("apiVersion: cim/v1\nkind: Fleet\nmetadata: {{name: prod}}\nspec:\n{spec}")
    }

    #[test]
    fn a_fleet_document_sets_the_policy() {
        let text = format!(
            "{}---\n{HOST}",
            fleet_doc("  maxParallel: 2\n  maxFailures: 25%\n  waves:\n    - {name: canary, selector: {role: canary}}\n  healthChecks:\n    - command: [true]\n")
        );
        let fleet = parse(&text).unwrap();
        assert_eq!(fleet.policy.max_parallel, Some(2));
        assert_eq!(fleet.policy.max_failures, MaxFailures::Percent(25));
        assert_eq!(fleet.policy.waves[0].name, "canary");
        // Fleet health checks are defaults for hosts without their own.
        assert_eq!(fleet.hosts["web-1"].health_checks.len(), 1);
        assert_eq!(
            parse(&fleet_doc("  maxFailures: 2\n"))
                .unwrap()
                .policy
                .max_failures,
            MaxFailures::Count(2)
        );
    }

    #[test]
    fn fields_of_the_other_kind_are_refused_with_their_location() {
        let errs = parse(&format!("{HOST}  waves: []\n  maxParallel: 3\n")).unwrap_err();
        assert!(
            errs[0].starts_with("specs/f.yaml:7:16: `maxParallel` belongs in a `kind: Fleet`"),
            "{errs:?}"
        );
        let errs = parse(&fleet_doc("  address: 10.0.0.1\n")).unwrap_err();
        assert!(
            errs[0].starts_with("specs/f.yaml:5:12: `address` belongs in a `kind: Host`"),
            "{errs:?}"
        );
        let errs = parse("apiVersion: cim/v1\nkind: Host\nmetadata: {name: a}\nspec: {port: 22}\n")
            .unwrap_err();
        assert!(errs[0].contains("needs `spec.address`"), "{errs:?}");
    }

    #[test]
    fn bad_policies_are_located() {
        for (spec, why) in [
            ("  maxFailures: 0\n", "maxFailures `0`"),
            ("  maxFailures: 150%\n", "maxFailures `150%`"),
            ("  maxParallel: 0\n", "maxParallel must be at least 1"),
            (
                "  waves:\n    - {name: a, selector: {}}\n",
                "empty selector",
            ),
            (
                "  waves:\n    - {name: a, selector: {x: y}}\n    - {name: a, selector: {x: z}}\n",
                "duplicate wave",
            ),
        ] {
            let errs = parse(&fleet_doc(spec)).unwrap_err();
            assert!(errs[0].starts_with("specs/f.yaml:"), "{errs:?}");
            assert!(errs[0].contains(why), "{spec}: {errs:?}");
        }
        let errs = parse(&format!(
            "{}---\n{}",
            fleet_doc("  maxParallel: 1\n"),
            fleet_doc("  maxParallel: 2\n")
        ))
        .unwrap_err();
        assert!(
            errs[0].contains("a second `kind: Fleet` document"),
            "{errs:?}"
        );
    }

    #[test]
    fn dependencies_must_exist_and_not_loop() {
        let ok = format!("{HOST}  dependsOn:\n    - {{host: db-1}}\n---\n{DB}");
        let fleet = parse(&ok).unwrap();
        assert_eq!(
            fleet.hosts["web-1"].depends_on,
            vec![Dependency::Host("db-1".into())]
        );

        let errs = parse(&format!("{HOST}  dependsOn:\n    - {{host: nope}}\n")).unwrap_err();
        assert!(
            errs[0].starts_with("specs/f.yaml:7:7: host `web-1` depends on no host `nope`"),
            "{errs:?}"
        );

        let looped = format!(
            "{HOST}  dependsOn:\n    - {{selector: {{role: db}}}}\n---\n{DB}  dependsOn:\n    - {{host: web-1}}\n"
        );
        let errs = parse(&looped).unwrap_err();
        assert!(
            errs.iter().any(|e| e.contains("dependency cycle")),
            "{errs:?}"
        );

        let errs = parse(&format!(
            "{HOST}  dependsOn:\n    - {{host: db-1, selector: {{role: db}}}}\n---\n{DB}"
        ))
        .unwrap_err();
        assert!(errs[0].contains("exactly one of `host`"), "{errs:?}");
    }
}
