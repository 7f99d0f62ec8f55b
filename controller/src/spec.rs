//! The desired-state contract users write: `specs/*.yaml` documents of
//! `kind: Host`, parsed and validated into a [`FleetSpec`].
//!
//! This module does no IO: callers hand it the files' names and bytes (read
//! from a git tree or a work tree), so the controller and `cim validate` run
//! exactly the same checks. Every error names the file, line and column, and
//! carries the source so that `miette` can point at it.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

mod checks;
mod error;
mod fleet;
pub use crate::types::check_dns_label;
use crate::types::HostName;
pub use checks::{check_address, check_attribute, check_user, parse_duration};
use checks::{check_label_key, health_check};
use error::first_line;
pub use error::{SpecError, SpecErrors};
pub use fleet::{selects, Dependency, MaxFailures, RolloutPolicy, Selector, Wave};

/// The only `apiVersion` this release understands.
pub const API_VERSION: &str = "cim/v1";

/// Files larger than this are refused before parsing: specs are small, and a
/// bounded input keeps a hostile commit from exhausting the controller.
pub const MAX_SPEC_FILE_BYTES: usize = 1024 * 1024;

/// One spec file as found in the tree being validated.
#[derive(Debug, Clone)]
pub struct SpecFile {
    /// Path relative to the repository root, e.g. `specs/web.yaml`.
    pub path: String,
    pub contents: Vec<u8>,
}

/// What `switch-to-configuration` is asked to do on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Switch,
    Boot,
    Test,
    DryActivate,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Switch => "switch",
            Action::Boot => "boot",
            Action::Test => "test",
            Action::DryActivate => "dry-activate",
        }
    }

    /// Whether the system profile is moved to the new closure, so that the
    /// host boots into it: `nixos-rebuild` does this for switch and boot only.
    pub fn sets_profile(self) -> bool {
        matches!(self, Action::Switch | Action::Boot)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `reboot`: whether cim reboots a host whose new system has another
/// kernel, initrd or kernel modules than the booted one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RebootPolicy {
    /// Switch, and say that a reboot is required (`RebootRequired`).
    #[default]
    Never,
    /// Switch with `boot`, reboot, wait for the host and check that it
    /// booted the new system.
    Auto,
}

/// Default of `spec.rebootTimeout`: how long a rebooting host may take to
/// come back.
pub const DEFAULT_REBOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// A validated host: every field here is safe to pass to nix and ssh as an
/// argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    pub name: HostName,
    pub labels: BTreeMap<String, String>,
    pub address: String,
    pub port: u16,
    pub user: String,
    pub configuration: String,
    pub action: Action,
    pub suspend: bool,
    pub rollout: RolloutSpec,
    /// Checks that must pass after activation before the host counts as
    /// converged.
    pub health_checks: Vec<HealthCheck>,
    /// Hosts that must be converged on the same revision first.
    pub depends_on: Vec<Dependency>,
    /// Whether the host fetches what it can from its own binary caches
    /// while its closure is copied; `None` leaves it to the Fleet document
    /// or `--substitute-on-destination`.
    pub substitute_on_destination: Option<bool>,
    /// Where `configuration` (or, defaulted, the name) was written, for
    /// errors found later against the flake.
    pub configuration_at: SpecLocation,
    /// `hostKey`: the host's SSH public key (`TYPE BASE64`), the only one
    /// accepted for it; `None` leaves it to the user's known_hosts.
    pub host_key: Option<String>,
    /// `sudo`: `user` is not root; what needs root runs under `sudo -n`.
    pub sudo: bool,
    /// `keepGenerations` (or the Fleet document's): after a successful
    /// activation, system profile generations beyond the newest this many
    /// are deleted on the host; `None`: [`DEFAULT_KEEP_GENERATIONS`].
    pub keep_generations: Option<u32>,
    /// `reboot` (or the Fleet document's; `None`: never).
    pub reboot: Option<RebootPolicy>,
    /// `rebootTimeout` (or the Fleet document's).
    pub reboot_timeout: Option<Duration>,
}

impl HostSpec {
    pub fn keep_generations(&self) -> u32 {
        self.keep_generations.unwrap_or(DEFAULT_KEEP_GENERATIONS)
    }

    pub fn reboot(&self) -> RebootPolicy {
        self.reboot.unwrap_or_default()
    }

    pub fn reboot_timeout(&self) -> Duration {
        self.reboot_timeout.unwrap_or(DEFAULT_REBOOT_TIMEOUT)
    }
}

/// Default of `spec.keepGenerations`.
pub const DEFAULT_KEEP_GENERATIONS: u32 = 10;

/// A place in a spec file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecLocation {
    pub file: String,
    pub line: u64,
    pub column: u64,
}

/// One health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub name: String,
    pub probe: Probe,
    /// Limit of one attempt.
    pub timeout: Duration,
    /// Pause between attempts.
    pub interval: Duration,
    /// Attempts before the check counts as failed.
    pub retries: u32,
}

/// What a health check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A command run on the host over SSH, as an argument vector; healthy
    /// when it exits 0.
    Command(Vec<String>),
    /// An HTTP GET made from the controller; healthy on `expected_status`.
    Http { url: String, expected_status: u16 },
}

/// How a new system is rolled out on a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutSpec {
    /// For `switch` and `test`: how long the host waits, after activating,
    /// for the controller to confirm over a new SSH connection before it
    /// reverts itself to the previous generation.
    pub confirm_timeout: Duration,
}

/// Default of `spec.rollout.confirmTimeout`.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for RolloutSpec {
    fn default() -> Self {
        RolloutSpec {
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
        }
    }
}

/// All hosts of one revision, by name, and how the revision rolls out.
/// Each host's spec is shared (with the work items made of it), never
/// copied: a rollout of 10,000 hosts would copy 10,000 of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetSpec {
    pub hosts: BTreeMap<String, std::sync::Arc<HostSpec>>,
    pub policy: RolloutPolicy,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawDocument {
    api_version: Spanned<String>,
    kind: Spanned<String>,
    metadata: RawMetadata,
    spec: RawSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetadata {
    name: Spanned<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// The fields of both kinds' `spec`; validation refuses the other kind's
/// fields with their location. (One struct rather than a tagged enum keeps
/// serde-saphyr's locations, which buffering for an enum would lose.)
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawSpec {
    #[serde(default)]
    address: Option<Spanned<String>>,
    #[serde(default)]
    port: Option<Spanned<u16>>,
    #[serde(default)]
    user: Option<Spanned<String>>,
    #[serde(default)]
    configuration: Option<Spanned<String>>,
    #[serde(default)]
    action: Option<Action>,
    #[serde(default)]
    suspend: Option<bool>,
    #[serde(default)]
    substitute_on_destination: Option<bool>,
    #[serde(default)]
    host_key: Option<Spanned<String>>,
    #[serde(default)]
    sudo: Option<bool>,
    #[serde(default)]
    keep_generations: Option<Spanned<u32>>,
    #[serde(default)]
    reboot: Option<RebootPolicy>,
    #[serde(default)]
    reboot_timeout: Option<Spanned<String>>,
    #[serde(default)]
    windows: Vec<Spanned<fleet::RawWindow>>,
    #[serde(default)]
    rollout: Option<RawRollout>,
    #[serde(default)]
    health_checks: Vec<Spanned<RawHealthCheck>>,
    #[serde(default)]
    depends_on: Vec<Spanned<fleet::RawDependency>>,
    #[serde(default)]
    max_parallel: Option<Spanned<u32>>,
    #[serde(default)]
    max_failures: Option<Spanned<fleet::RawMaxFailures>>,
    #[serde(default)]
    waves: Vec<Spanned<fleet::RawWave>>,
}

/// A validated document.
enum Doc {
    Host(Box<HostSpec>, Loc, Vec<(Dependency, Loc)>),
    Fleet(RolloutPolicy, Loc),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawHealthCheck {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    http: Option<RawHttpCheck>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    retries: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawHttpCheck {
    url: String,
    #[serde(default)]
    expected_status: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRollout {
    #[serde(default)]
    confirm_timeout: Option<Spanned<String>>,
}

/// Checks every host's `configuration` against the flake's
/// `nixosConfigurations` names.
pub fn check_configurations(fleet: &FleetSpec, available: &[String]) -> Result<(), SpecErrors> {
    // A set: 10,000 hosts against a list of 10,000 configurations took
    // 100 ms of the controller's time, between an evaluation and the work.
    let known: std::collections::HashSet<&str> = available.iter().map(String::as_str).collect();
    let errors: Vec<SpecError> = fleet
        .hosts
        .values()
        .filter(|h| !known.contains(h.configuration.as_str()))
        .map(|h| {
            SpecError::located(
                &h.configuration_at,
                format!(
                    "configuration `{}` of host `{}` is not in the flake's nixosConfigurations (it has: {})",
                    h.configuration,
                    h.name,
                    if available.is_empty() { "none".to_string() } else { available.join(", ") }
                ),
            )
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(SpecErrors { errors })
    }
}

/// Parses and validates all spec files of a revision. Files are checked in
/// the order given; all errors are collected rather than stopping at the
/// first, so that one `cim validate` run shows everything to fix.
pub fn parse_fleet(files: &[SpecFile]) -> Result<FleetSpec, SpecErrors> {
    let mut errors = Vec::new();
    let mut hosts: BTreeMap<String, HostSpec> = BTreeMap::new();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut policy: Option<(RolloutPolicy, String)> = None;
    let mut declared = Vec::new();
    for file in files {
        let source = match checked_source(file) {
            Ok(text) => text,
            Err(message) => {
                let lossy = String::from_utf8_lossy(&file.contents).into_owned();
                errors.push(SpecError::at(&file.path, &lossy, 1, 1, message));
                continue;
            }
        };
        let ctx = FileContext {
            path: &file.path,
            source,
        };
        for doc in ctx.parse(&mut errors) {
            match doc {
                Doc::Fleet(p, loc) => match &policy {
                    Some((_, first)) => errors.push(ctx.error(
                        loc,
                        format!("a second `kind: Fleet` document (the first is in {first})"),
                    )),
                    None => policy = Some((p, file.path.clone())),
                },
                Doc::Host(spec, name_loc, deps) => {
                    if let Some(first) = seen.get(spec.name.as_str()) {
                        errors.push(ctx.error(
                            name_loc,
                            format!(
                                "duplicate host name `{}` (first defined in {first})",
                                spec.name
                            ),
                        ));
                        continue;
                    }
                    seen.insert(spec.name.to_string(), file.path.clone());
                    declared.push(fleet::DeclaredDeps {
                        host: spec.name.to_string(),
                        ctx_path: &file.path,
                        ctx_source: source,
                        deps,
                    });
                    hosts.insert(spec.name.to_string(), *spec);
                }
            }
        }
    }
    fleet::check_dependencies(&hosts, &declared, &mut errors);
    let policy = policy.map(|(p, _)| p).unwrap_or_default();
    for host in hosts.values_mut() {
        if host.health_checks.is_empty() {
            host.health_checks = policy.health_checks.clone();
        }
        host.substitute_on_destination = host
            .substitute_on_destination
            .or(policy.substitute_on_destination);
        host.reboot = host.reboot.or(policy.reboot);
        host.reboot_timeout = host.reboot_timeout.or(policy.reboot_timeout);
        host.keep_generations = host.keep_generations.or(policy.keep_generations);
    }
    if errors.is_empty() {
        let hosts = hosts
            .into_iter()
            .map(|(name, host)| (name, std::sync::Arc::new(host)))
            .collect();
        Ok(FleetSpec { hosts, policy })
    } else {
        Err(SpecErrors { errors })
    }
}

fn checked_source(file: &SpecFile) -> Result<&str, String> {
    if file.contents.len() > MAX_SPEC_FILE_BYTES {
        return Err(format!(
            "file is {} bytes, more than the limit of {MAX_SPEC_FILE_BYTES}",
            file.contents.len()
        ));
    }
    std::str::from_utf8(&file.contents).map_err(|e| format!("file is not valid UTF-8: {e}"))
}

struct FileContext<'a> {
    path: &'a str,
    source: &'a str,
}

#[derive(Clone, Copy)]
pub(crate) struct Loc {
    line: u64,
    column: u64,
}

impl<T> From<&Spanned<T>> for Loc {
    fn from(s: &Spanned<T>) -> Self {
        Loc {
            line: s.referenced.line(),
            column: s.referenced.column(),
        }
    }
}

impl<'a> FileContext<'a> {
    fn error(&self, loc: Loc, message: String) -> SpecError {
        SpecError::at(self.path, self.source, loc.line, loc.column, message)
    }

    fn parse(&self, errors: &mut Vec<SpecError>) -> Vec<Doc> {
        let options = serde_saphyr::options! { with_snippet: false };
        let docs: Vec<Option<RawDocument>> =
            match serde_saphyr::from_multiple_with_options(self.source, options) {
                Ok(docs) => docs,
                Err(e) => {
                    let (line, column) = e
                        .location()
                        .map(|l| (l.line(), l.column()))
                        .unwrap_or((1, 1));
                    errors.push(SpecError::at(
                        self.path,
                        self.source,
                        line,
                        column,
                        first_line(&e.to_string()),
                    ));
                    return Vec::new();
                }
            };
        docs.into_iter()
            .flatten()
            .filter_map(|doc| match self.validate(doc) {
                Ok(host) => Some(host),
                Err(mut errs) => {
                    errors.append(&mut errs);
                    None
                }
            })
            .collect()
    }

    fn validate(&self, doc: RawDocument) -> Result<Doc, Vec<SpecError>> {
        let mut errs = Vec::new();
        if doc.api_version.value != API_VERSION {
            errs.push(self.error(
                (&doc.api_version).into(),
                format!(
                    "unsupported apiVersion `{}`, expected `{API_VERSION}`",
                    doc.api_version.value
                ),
            ));
        }
        let spec = &doc.spec;
        let mut health_checks = Vec::new();
        for (i, raw) in spec.health_checks.iter().enumerate() {
            match health_check(&raw.value, i) {
                Ok(check) => health_checks.push(check),
                Err(why) => {
                    errs.push(self.error(raw.into(), format!("invalid health check: {why}")))
                }
            }
        }
        let fleet_fields = fleet::FleetFields {
            max_parallel: &spec.max_parallel,
            max_failures: &spec.max_failures,
            waves: &spec.waves,
            windows: &spec.windows,
        };
        match doc.kind.value.as_str() {
            "Host" => {
                if let Some((field, loc)) = fleet_fields.first_present() {
                    errs.push(self.error(
                        loc,
                        format!("`{field}` belongs in a `kind: Fleet` document"),
                    ));
                }
                self.validate_host(&doc, health_checks, errs)
            }
            "Fleet" => {
                let host_only = [
                    ("address", spec.address.as_ref().map(Loc::from)),
                    ("port", spec.port.as_ref().map(Loc::from)),
                    ("user", spec.user.as_ref().map(Loc::from)),
                    ("configuration", spec.configuration.as_ref().map(Loc::from)),
                    ("dependsOn", spec.depends_on.first().map(Loc::from)),
                    ("hostKey", spec.host_key.as_ref().map(Loc::from)),
                ];
                for (field, loc) in host_only.into_iter().filter_map(|(f, l)| l.map(|l| (f, l))) {
                    errs.push(
                        self.error(loc, format!("`{field}` belongs in a `kind: Host` document")),
                    );
                }
                for (field, present) in [
                    ("action", spec.action.is_some()),
                    ("suspend", spec.suspend.is_some()),
                    ("rollout", spec.rollout.is_some()),
                    ("sudo", spec.sudo.is_some()),
                ] {
                    if present {
                        let loc = (&doc.metadata.name).into();
                        errs.push(
                            self.error(
                                loc,
                                format!("`{field}` belongs in a `kind: Host` document"),
                            ),
                        );
                    }
                }
                let mut policy =
                    self.fleet_policy(&doc.metadata.name, fleet_fields, health_checks, &mut errs);
                policy.substitute_on_destination = spec.substitute_on_destination;
                policy.reboot = spec.reboot;
                policy.reboot_timeout = self.reboot_timeout(spec, &mut errs);
                policy.keep_generations = self.keep_generations(spec, &mut errs);
                policy.windows = self.windows(&spec.windows, &mut errs);
                if errs.is_empty() {
                    Ok(Doc::Fleet(policy, (&doc.metadata.name).into()))
                } else {
                    Err(errs)
                }
            }
            other => {
                errs.push(self.error(
                    (&doc.kind).into(),
                    format!("unknown kind `{other}`, expected `Host` or `Fleet`"),
                ));
                Err(errs)
            }
        }
    }

    fn validate_host(
        &self,
        doc: &RawDocument,
        health_checks: Vec<HealthCheck>,
        mut errs: Vec<SpecError>,
    ) -> Result<Doc, Vec<SpecError>> {
        let name = &doc.metadata.name;
        let host_name = match HostName::try_from(name.value.clone()) {
            Ok(n) => Some(n),
            Err(_) => {
                let why = check_dns_label(&name.value).err().unwrap_or("invalid");
                errs.push(self.error(
                    name.into(),
                    format!("invalid host name `{}`: {why}", name.value),
                ));
                None
            }
        };
        for key in doc.metadata.labels.keys() {
            if let Err(why) = check_label_key(key) {
                errs.push(self.error(name.into(), format!("invalid label key `{key}`: {why}")));
            }
        }
        let spec = &doc.spec;
        let address = match &spec.address {
            None => {
                errs.push(self.error(name.into(), "a Host needs `spec.address`".to_string()));
                String::new()
            }
            Some(a) => {
                if let Err(why) = check_address(&a.value) {
                    errs.push(
                        self.error(a.into(), format!("invalid address `{}`: {why}", a.value)),
                    );
                }
                a.value.clone()
            }
        };
        let depends_on = self.dependencies(&spec.depends_on, &mut errs);
        if let Some(port) = &spec.port {
            if port.value == 0 {
                errs.push(self.error(port.into(), "invalid port 0".to_string()));
            }
        }
        if let Some(user) = &spec.user {
            if let Err(why) = check_user(&user.value) {
                errs.push(self.error(user.into(), format!("invalid user `{}`: {why}", user.value)));
            }
        }
        self.keep_generations(spec, &mut errs);
        let reboot_timeout = self.reboot_timeout(spec, &mut errs);
        let host_key = match &spec.host_key {
            None => None,
            Some(k) => match ssh_key::PublicKey::from_openssh(k.value.trim()) {
                // Kept as type and key only: a comment is no part of it.
                Ok(key) => key.to_openssh().ok().map(|line| {
                    line.split_whitespace()
                        .take(2)
                        .collect::<Vec<_>>()
                        .join(" ")
                }),
                Err(e) => {
                    errs.push(self.error(
                        k.into(),
                        format!("invalid hostKey: not an SSH public key ({e})"),
                    ));
                    None
                }
            },
        };
        if let Some(conf) = &spec.configuration {
            if let Err(why) = check_attribute(&conf.value) {
                errs.push(self.error(
                    conf.into(),
                    format!("invalid configuration `{}`: {why}", conf.value),
                ));
            }
        }
        let mut rollout = RolloutSpec::default();
        if let Some(t) = spec
            .rollout
            .as_ref()
            .and_then(|r| r.confirm_timeout.as_ref())
        {
            match parse_duration(&t.value) {
                Ok(d) if d >= Duration::from_secs(1) && d <= Duration::from_secs(3600) => {
                    rollout.confirm_timeout = d;
                }
                Ok(_) => errs.push(self.error(
                    t.into(),
                    format!("confirmTimeout `{}` must be between 1s and 1h", t.value),
                )),
                Err(why) => {
                    errs.push(self.error(t.into(), format!("invalid confirmTimeout: {why}")))
                }
            }
        }
        let Some(host_name) = host_name.filter(|_| errs.is_empty()) else {
            return Err(errs);
        };
        let configuration_at = {
            let loc: Loc = spec
                .configuration
                .as_ref()
                .map_or_else(|| name.into(), Loc::from);
            SpecLocation {
                file: self.path.to_string(),
                line: loc.line,
                column: loc.column,
            }
        };
        let host = HostSpec {
            configuration_at,
            substitute_on_destination: spec.substitute_on_destination,
            host_key,
            sudo: spec.sudo.unwrap_or(false),
            keep_generations: spec.keep_generations.as_ref().map(|k| k.value),
            reboot: spec.reboot,
            reboot_timeout,
            rollout,
            health_checks,
            depends_on: depends_on.iter().map(|(d, _)| d.clone()).collect(),
            name: host_name,
            labels: doc.metadata.labels.clone(),
            address,
            port: spec.port.as_ref().map_or(22, |p| p.value),
            user: spec
                .user
                .as_ref()
                .map_or_else(|| "root".to_string(), |u| u.value.clone()),
            configuration: spec
                .configuration
                .as_ref()
                .map_or_else(|| name.value.clone(), |c| c.value.clone()),
            action: spec.action.unwrap_or(Action::Switch),
            suspend: spec.suspend.unwrap_or(false),
        };
        Ok(Doc::Host(Box::new(host), name.into(), depends_on))
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod malformed_input;
