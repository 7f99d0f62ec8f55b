//! The constant shell scripts cim runs on hosts, and the readers of what
//! they print. Every value reaches a script as a positional argument
//! (`sh -c SCRIPT NAME ARG…`, escaped by `openssh`), never spliced into it,
//! so a script is the same text on every host and can be reviewed here.

use super::is_store_path;

/// Where the watchdog keeps its canary, exit code and log on the host.
pub const WATCHDOG_DIR: &str = "/run/cim";

/// The confirmed-activation watchdog, run on the host as
/// `sh -c WATCHDOG cim-watchdog CLOSURE ACTION TIMEOUT TOKEN PREVIOUS PREVIOUS_PROFILE`.
/// It is a constant: every value reaches it as a positional argument.
pub const WATCHDOG: &str = r#"set -u
closure=$1 action=$2 timeout=$3 token=$4 prev=$5 prevprofile=$6
dir=/run/cim
mkdir -p "$dir"
exec </dev/null >"$dir/$token.log" 2>&1
printf '%s\n%s\n' "$prev" "$prevprofile" >"$dir/$token.prev"
canary="$dir/$token.canary"
: >"$canary"
rc=0
if [ "$action" = switch ]; then
  nix-env -p /nix/var/nix/profiles/system --set "$closure" || rc=$?
fi
if [ "$rc" = 0 ]; then
  "$closure/bin/switch-to-configuration" "$action" || rc=$?
fi
echo "$rc" >"$dir/$token.rc.tmp" && mv "$dir/$token.rc.tmp" "$dir/$token.rc"
i=0
while [ -e "$canary" ] && [ "$i" -lt "$timeout" ]; do
  sleep 1
  i=$((i + 1))
done
# Claiming the canary is one rename: either this or the controller's
# confirmation (also a rename) wins, never both.
if mv "$canary" "$dir/$token.expired" 2>/dev/null; then
  echo "cim: not confirmed within ${timeout}s, reverting" >>"$dir/$token.result"
  if [ "$action" = switch ] && [ -n "$prevprofile" ]; then
    nix-env -p /nix/var/nix/profiles/system --set "$prevprofile"
  fi
  if [ -n "$prev" ]; then
    "$prev/bin/switch-to-configuration" "$action"
  fi
fi
"#;

/// Waits on the host for a confirmed activation's exit code, run as
/// `sh -c WAIT_FOR_RESULT cim-wait TOKEN POLLS`: prints the code and the
/// activation's output once it is there, nothing if it is not within
/// POLLS × 50 ms. A constant, like [`WATCHDOG`].
pub const WAIT_FOR_RESULT: &str = r#"set -u
dir=/run/cim token=$1 polls=$2
i=0
while [ ! -e "$dir/$token.rc" ]; do
  [ "$i" -ge "$polls" ] && exit 0
  sleep 0.05
  i=$((i + 1))
done
cat "$dir/$token.rc"
cat "$dir/$token.log" 2>/dev/null
"#;

/// What a reconcile needs to know about a host before it acts, in one
/// command (`sh -c LOOK`): the running system, the system profile's
/// closure, confirmed activations still waiting for a confirmation, and
/// the booted system with its kernel, initrd and kernel modules (what a
/// new system is compared with to tell whether it needs a reboot, as
/// NixOS's `system.autoUpgrade` does). A constant, like [`WATCHDOG`].
pub const LOOK: &str = r#"readlink /run/current-system
echo --
readlink -f /nix/var/nix/profiles/system
echo --
for f in /run/cim/*.canary; do [ -e "$f" ] && echo "$f"; done
echo --
if [ -e /run/booted-system ]; then
  readlink /run/booted-system
  for f in kernel initrd kernel-modules; do readlink -f "/run/booted-system/$f" || echo; done
fi
exit 0
"#;

/// Reboots the host the way its own system does
/// (`/run/current-system/sw/bin/systemctl reboot`), first leaving a mark
/// in `/run` (a tmpfs on NixOS): a host that no longer has it has
/// rebooted. Run as root: `sh -c REBOOT cim-reboot`.
pub const REBOOT: &str = r#"set -u
mkdir -p /run/cim && : >/run/cim/rebooting || exit 1
systemctl=/run/current-system/sw/bin/systemctl
if [ ! -x "$systemctl" ]; then
  echo "no $systemctl on this host: not a NixOS system cim can reboot" >&2
  exit 1
fi
exec "$systemctl" reboot
"#;

/// After a reboot: whether [`REBOOT`]'s mark is still there (the host has
/// not gone down yet), the booted and the running system.
pub const BOOT_STATE: &str = r#"if [ -e /run/cim/rebooting ]; then echo rebooting; else echo up; fi
readlink /run/booted-system || echo
readlink /run/current-system || echo
exit 0
"#;

/// A host as [`BOOT_STATE`] found it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootState {
    /// The mark of the reboot asked for is still there: the host has not
    /// rebooted yet.
    pub rebooting: bool,
    pub booted: Option<String>,
    pub current: Option<String>,
}

pub(super) fn parse_boot_state(stdout: &str) -> BootState {
    let mut lines = stdout.lines().map(str::trim);
    let rebooting = lines.next() != Some("up");
    let mut path = || {
        lines
            .next()
            .filter(|p| is_store_path(p))
            .map(str::to_string)
    };
    let booted = path();
    let current = path();
    BootState {
        rebooting,
        booted,
        current,
    }
}

/// A host as [`LOOK`] found it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Look {
    /// What `/run/current-system` points at.
    pub current: Option<String>,
    /// What the system profile points at: what the host boots into.
    pub profile: Option<String>,
    /// Tokens of confirmed activations whose watchdog still waits.
    pub pending: Vec<String>,
    /// What `/run/booted-system` points at (`None`: the host was not
    /// booted by NixOS, or it is not said).
    pub booted: Option<String>,
    /// The booted system's kernel, initrd and kernel modules, resolved
    /// (empty when unknown).
    pub booted_files: Vec<String>,
}

pub(super) fn parse_look(stdout: &str) -> Look {
    let mut sections = stdout.split("--\n");
    let path = |s: Option<&str>| {
        s.map(str::trim)
            .filter(|p| is_store_path(p))
            .map(str::to_string)
    };
    let current = path(sections.next());
    let profile = path(sections.next());
    let pending = sections
        .next()
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix(&format!("{WATCHDOG_DIR}/"))?
                .strip_suffix(".canary")
        })
        .filter(|t| t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        .map(str::to_string)
        .collect();
    let booted_section = sections.next().unwrap_or_default();
    let mut booted_lines = booted_section.lines().map(str::trim);
    let booted = path(booted_lines.next());
    let booted_files: Vec<String> = booted_lines.take(3).map(str::to_string).collect();
    let booted_files = if booted.is_some() && booted_files.len() == 3 {
        booted_files
    } else {
        Vec::new()
    };
    Look {
        current,
        profile,
        pending,
        booted,
        booted_files,
    }
}

/// Confirms a confirmed activation and reads what the host runs, in one
/// command: `sh -c CONFIRM cim-confirm CANARY CLAIMED`. The confirmation is
/// the rename of the canary, as the watchdog's expiry is: exactly one of
/// them wins. Prints nothing if the watchdog won (it reverts the host).
pub const CONFIRM: &str = r#"mv "$1" "$2" 2>/dev/null || exit 0
echo confirmed
readlink /run/current-system
exit 0
"#;

/// Reads [`WAIT_FOR_RESULT`]'s output: the exit code on the first line,
/// then the activation's output.
pub(super) fn parse_activation_result(stdout: &str) -> Option<(i32, String)> {
    let (code, log) = stdout.split_once('\n').unwrap_or((stdout, ""));
    let code = code.trim();
    if code.is_empty() {
        return None;
    }
    Some((code.parse().unwrap_or(-1), log.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_are_read() {
        let system = "/nix/store/b7nkhawyf3jpg51m457xsvxfajiicixb-nixos-system-a-1";
        let out =
            format!("{system}\n--\n{system}\n--\n/run/cim/web-1-17.canary\n/run/cim/x;y.canary\n");
        assert_eq!(
            parse_look(&out),
            Look {
                current: Some(system.to_string()),
                profile: Some(system.to_string()),
                pending: vec!["web-1-17".to_string()],
                ..Look::default()
            }
        );
        let booted = format!(
            "{system}\n--\n{system}\n--\n--\n{system}\n/nix/store/k-linux/bzImage\n/nix/store/i-initrd/initrd\n/nix/store/m-modules\n"
        );
        let look = parse_look(&booted);
        assert_eq!(look.booted.as_deref(), Some(system));
        assert_eq!(look.booted_files.len(), 3);
        assert_eq!(look.booted_files[1], "/nix/store/i-initrd/initrd");
        // A new host: no system, no profile, nothing pending.
        assert_eq!(parse_look("--\n\n--\n"), Look::default());
        assert_eq!(parse_look(""), Look::default());
    }

    #[test]
    fn boot_states_are_read() {
        let system = "/nix/store/b7nkhawyf3jpg51m457xsvxfajiicixb-nixos-system-a-1";
        assert_eq!(
            parse_boot_state(&format!("up\n{system}\n{system}\n")),
            BootState {
                rebooting: false,
                booted: Some(system.into()),
                current: Some(system.into()),
            }
        );
        assert!(parse_boot_state(&format!("rebooting\n{system}\n{system}\n")).rebooting);
        assert!(parse_boot_state("").rebooting);
        assert_eq!(parse_boot_state("up\n\n\n").booted, None);
    }

    #[test]
    fn activation_results_are_read() {
        assert_eq!(parse_activation_result(""), None);
        assert_eq!(
            parse_activation_result("0\nactivating\ndone\n"),
            Some((0, "activating\ndone\n".to_string()))
        );
        assert_eq!(parse_activation_result("2\n"), Some((2, String::new())));
        assert_eq!(parse_activation_result("x\n"), Some((-1, String::new())));
    }
}
