//! What a change would do to a host, said before it lands: the difference
//! between two system closures grouped by package (what `nix store
//! diff-closures` and `nvd` show: packages added, removed, upgraded and
//! downgraded with their versions, and the closure's size delta), what
//! `switch-to-configuration dry-activate` says activation would do, and
//! whether the new system needs a reboot. Pure: the closures and the
//! host's answers come in as text; `planner` and the reconcile fetch them.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

/// Every path of a closure with its NAR size in bytes.
pub type Closure = BTreeMap<String, u64>;

/// One store path as `nix path-info --json` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: String,
    pub nar_size: u64,
    pub references: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawInfo {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    nar_size: Option<u64>,
    #[serde(default)]
    references: Vec<String>,
    /// Nix before 2.19 lists an invalid path with `"valid": false`.
    #[serde(default)]
    valid: Option<bool>,
}

/// Reads `nix path-info --json` of any Nix version: a list of objects with
/// a `path` (Nix ≤ 2.18) or an object keyed by path (later; `null` for an
/// invalid path). References may be full paths or base names.
pub fn parse_path_info(json: &str) -> Result<Vec<PathInfo>, String> {
    let value: serde_json::Value =
        serde_json::from_str(json.trim()).map_err(|e| format!("unreadable path-info: {e}"))?;
    let entries: Vec<(Option<String>, serde_json::Value)> = match value {
        serde_json::Value::Array(items) => items.into_iter().map(|v| (None, v)).collect(),
        serde_json::Value::Object(map) => map.into_iter().map(|(k, v)| (Some(k), v)).collect(),
        _ => return Err("path-info is neither a list nor an object".to_string()),
    };
    let mut infos = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        if value.is_null() {
            continue;
        }
        let raw: RawInfo =
            serde_json::from_value(value).map_err(|e| format!("unreadable path-info: {e}"))?;
        if raw.valid == Some(false) {
            continue;
        }
        let Some(path) = raw.path.or(key) else {
            return Err("a path-info entry names no path".to_string());
        };
        let references = raw
            .references
            .into_iter()
            .map(|r| {
                if r.starts_with('/') {
                    r
                } else {
                    format!("/nix/store/{r}")
                }
            })
            .collect();
        infos.push(PathInfo {
            path,
            nar_size: raw.nar_size.unwrap_or(0),
            references,
        });
    }
    Ok(infos)
}

/// Paths' information by path: what `nix path-info --recursive` of
/// several roots said, indexed once for every closure taken from it.
#[derive(Debug, Clone, Default)]
pub struct Closures {
    by_path: HashMap<String, PathInfo>,
}

impl From<Vec<PathInfo>> for Closures {
    fn from(infos: Vec<PathInfo>) -> Closures {
        Closures {
            by_path: infos.into_iter().map(|i| (i.path.clone(), i)).collect(),
        }
    }
}

impl Closures {
    /// The closure of `root`, if `root` is listed.
    pub fn of(&self, root: &str) -> Option<Closure> {
        closure_in(root, &self.by_path)
    }
}

/// The closure of `root` among `infos` (which must hold it: `nix path-info
/// --recursive` of several roots gives their union).
pub fn closure_of(root: &str, infos: &[PathInfo]) -> Option<Closure> {
    let by_path: HashMap<String, PathInfo> =
        infos.iter().map(|i| (i.path.clone(), i.clone())).collect();
    closure_in(root, &by_path)
}

fn closure_in(root: &str, by_path: &HashMap<String, PathInfo>) -> Option<Closure> {
    by_path.get(root)?;
    let mut closure = Closure::new();
    let mut todo = vec![root];
    while let Some(path) = todo.pop() {
        let Some(info) = by_path.get(path) else {
            continue;
        };
        if closure.insert(path.to_string(), info.nar_size).is_none() {
            todo.extend(info.references.iter().map(String::as_str));
        }
    }
    Some(closure)
}

/// A store path's package name and version, the way `nix store
/// diff-closures` groups paths: the output name (`-bin`, `-man`, …) is
/// dropped, and the version starts at the first dash not followed by a
/// letter.
pub fn package_of(path: &str) -> (String, String) {
    let base = path.rsplit('/').next().unwrap_or(path);
    let name = base.split_once('-').map_or(base, |(_, name)| name);
    let name = match name.rsplit_once('-') {
        Some((stem, output))
            if !stem.is_empty()
                && (output.bytes().all(|b| b.is_ascii_lowercase()) && !output.is_empty()
                    || output == "lib32"
                    || output == "lib64") =>
        {
            stem
        }
        _ => name,
    };
    let bytes = name.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'-' && bytes.get(i + 1).is_some_and(|c| !c.is_ascii_alphabetic()) {
            return (name[..i].to_string(), name[i + 1..].to_string());
        }
    }
    (name.to_string(), String::new())
}

/// Nix's version order (`builtins.compareVersions`): components are runs
/// of digits or of other characters, split at `.` and `-`; numbers compare
/// as numbers, `pre` sorts before anything, a number after a word.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (ca, cb) = (components(a), components(b));
    for i in 0..ca.len().max(cb.len()) {
        let x = ca.get(i).copied().unwrap_or("");
        let y = cb.get(i).copied().unwrap_or("");
        if component_lt(x, y) {
            return Ordering::Less;
        }
        if component_lt(y, x) {
            return Ordering::Greater;
        }
    }
    Ordering::Equal
}

fn components(v: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let bytes = v.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'.' || bytes[i] == b'-' {
            i += 1;
            continue;
        }
        let digit = bytes[i].is_ascii_digit();
        let start = i;
        while i < bytes.len()
            && bytes[i] != b'.'
            && bytes[i] != b'-'
            && bytes[i].is_ascii_digit() == digit
        {
            i += 1;
        }
        out.push(&v[start..i]);
    }
    out
}

fn component_lt(a: &str, b: &str) -> bool {
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.trim_start_matches('0').to_string())
    };
    match (number(a), number(b)) {
        (Some(x), Some(y)) => (x.len(), x) < (y.len(), y),
        _ if a.is_empty() && number(b).is_some() => true,
        _ if a == "pre" && b != "pre" => true,
        _ if b == "pre" => false,
        (_, Some(_)) => true,
        (Some(_), _) => false,
        _ => a < b,
    }
}

/// One package whose versions differ between two closures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageChange {
    pub name: String,
    /// Its versions in the old closure (empty: added).
    pub from: Vec<String>,
    /// Its versions in the new closure (empty: removed).
    pub to: Vec<String>,
    /// Its size in the new closure minus in the old one, in bytes.
    pub size_delta: i64,
}

impl PackageChange {
    pub fn kind(&self) -> ChangeKind {
        let newest = |vs: &[String]| {
            vs.iter()
                .max_by(|a, b| compare_versions(a, b))
                .cloned()
                .unwrap_or_default()
        };
        match (self.from.is_empty(), self.to.is_empty()) {
            (true, _) => ChangeKind::Added,
            (_, true) => ChangeKind::Removed,
            _ => match compare_versions(&newest(&self.from), &newest(&self.to)) {
                Ordering::Greater => ChangeKind::Downgraded,
                _ => ChangeKind::Upgraded,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Added,
    Removed,
    Upgraded,
    Downgraded,
}

/// How one system closure differs from another.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClosureDiff {
    /// Packages whose versions differ, by name.
    pub packages: Vec<PackageChange>,
    /// Bytes.
    pub old_size: u64,
    pub new_size: u64,
    /// Paths only in the new closure: what copying it transfers at most.
    pub new_paths: usize,
}

/// The difference between the closures `old` and `new`. `roots` (the
/// systems themselves, which always differ) count in the sizes but are no
/// package.
pub fn diff(old: &Closure, new: &Closure, roots: &[&str]) -> ClosureDiff {
    type Grouped = BTreeMap<String, (BTreeSet<String>, u64)>;
    let group = |closure: &Closure| {
        let mut grouped = Grouped::new();
        for (path, size) in closure {
            if roots.contains(&path.as_str()) {
                continue;
            }
            let (name, version) = package_of(path);
            let entry = grouped.entry(name).or_default();
            if !version.is_empty() {
                entry.0.insert(version);
            }
            entry.1 += size;
        }
        grouped
    };
    let (before, after) = (group(old), group(new));
    let names: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    let mut packages = Vec::new();
    for name in names {
        let (from, from_size) = before.get(name).cloned().unwrap_or_default();
        let (to, to_size) = after.get(name).cloned().unwrap_or_default();
        let present = (before.contains_key(name), after.contains_key(name));
        if from == to && present.0 == present.1 {
            continue;
        }
        packages.push(PackageChange {
            name: name.clone(),
            from: from.into_iter().collect(),
            to: to.into_iter().collect(),
            size_delta: to_size as i64 - from_size as i64,
        });
    }
    ClosureDiff {
        packages,
        old_size: old.values().sum(),
        new_size: new.values().sum(),
        new_paths: new.keys().filter(|p| !old.contains_key(*p)).count(),
    }
}

impl ClosureDiff {
    pub fn size_delta(&self) -> i64 {
        self.new_size as i64 - self.old_size as i64
    }

    pub fn count(&self, kind: ChangeKind) -> usize {
        self.packages.iter().filter(|p| p.kind() == kind).count()
    }

    /// One line: "3 packages upgraded, 1 added, +12.0 MiB".
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        for (kind, word) in [
            (ChangeKind::Upgraded, "upgraded"),
            (ChangeKind::Downgraded, "downgraded"),
            (ChangeKind::Added, "added"),
            (ChangeKind::Removed, "removed"),
        ] {
            let n = self.count(kind);
            if n > 0 {
                let noun = if parts.is_empty() {
                    if n == 1 {
                        " package"
                    } else {
                        " packages"
                    }
                } else {
                    ""
                };
                parts.push(format!("{n}{noun} {word}"));
            }
        }
        if parts.is_empty() {
            parts.push("no package changes".to_string());
        }
        parts.push(signed_size(self.size_delta()));
        parts.join(", ")
    }
}

/// A size delta for people: "+12.0 MiB", "-512 B", "±0 B".
pub fn signed_size(bytes: i64) -> String {
    let sign = match bytes.cmp(&0) {
        Ordering::Greater => "+",
        Ordering::Less => "-",
        Ordering::Equal => "±",
    };
    format!("{sign}{}", size(bytes.unsigned_abs()))
}

/// A size for people: "512 B", "4.0 KiB", "1.2 GiB".
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// What `switch-to-configuration dry-activate` says activation would do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activation {
    pub stop: Vec<String>,
    pub restart: Vec<String>,
    pub start: Vec<String>,
    pub reload: Vec<String>,
    /// Its other "would …" lines, as they were.
    pub other: Vec<String>,
}

/// Reads the "would stop the following units: a, b" lines NixOS's
/// `switch-to-configuration dry-activate` prints (both the Perl and the
/// Rust implementation print them, on stderr).
pub fn parse_dry_activate(output: &str) -> Activation {
    let mut activation = Activation::default();
    for line in output.lines().map(str::trim) {
        if !line.starts_with("would ") {
            continue;
        }
        let list = |verb: &str| {
            line.strip_prefix(&format!("would {verb} the following units: "))
                .map(|units| {
                    units
                        .split(',')
                        .map(str::trim)
                        .filter(|u| !u.is_empty())
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                })
        };
        if let Some(units) = list("stop") {
            activation.stop.extend(units);
        } else if let Some(units) = list("restart") {
            activation.restart.extend(units);
        } else if let Some(units) = list("start") {
            activation.start.extend(units);
        } else if let Some(units) = list("reload") {
            activation.reload.extend(units);
        } else {
            activation.other.push(line.to_string());
        }
    }
    activation
}

impl Activation {
    pub fn is_empty(&self) -> bool {
        self.stop.is_empty()
            && self.restart.is_empty()
            && self.start.is_empty()
            && self.reload.is_empty()
            && self.other.is_empty()
    }
}

/// What a revision would do to one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPlan {
    pub host: String,
    /// The system the revision builds for it (absent: its evaluation or
    /// build failed, see `error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<String>,
    /// What it runs now, if it could be asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    /// Whether the revision would change what it runs.
    pub changes: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<ClosureDiff>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<Activation>,
    /// Which of kernel, initrd and kernel modules differ from the booted
    /// system's: a reboot is needed to run them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reboot_for: Vec<String>,
    /// Why some of this could not be found out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a revision would do to the fleet (`cim plan`, `GET /api/v1/plan`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub revision: String,
    pub hosts: Vec<HostPlan>,
}

/// What a system boots, in this order.
pub const BOOT_FILES: [&str; 3] = ["kernel", "initrd", "kernel-modules"];

/// Which of [`BOOT_FILES`] differ between the booted system's (`booted`,
/// resolved) and a new system's (`new`): a switch cannot run them, a
/// reboot is needed. Either unknown (not three paths): nothing to say.
pub fn reboot_for(booted: &[String], new: &[String]) -> Vec<String> {
    if booted.len() != BOOT_FILES.len() || new.len() != BOOT_FILES.len() {
        return Vec::new();
    }
    BOOT_FILES
        .iter()
        .zip(booted.iter().zip(new))
        .filter(|(_, (a, b))| a != b)
        .map(|(name, _)| name.to_string())
        .collect()
}

#[cfg(test)]
mod tests;
