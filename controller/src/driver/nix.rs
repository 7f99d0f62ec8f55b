//! Local `nix` and `nix-store` invocations: the one command builder
//! ([`NixCommand`]) that adds the experimental-feature flags, the operator's
//! `--nix-option`s and a deadline, and the operations built on it.
//!
//! A revision is evaluated **once** for the whole fleet: one `nix eval`
//! returns every wanted configuration's `drvPath` and `outPath` (each under
//! `builtins.tryEval`, so a `throw` fails only its own host), because Nix
//! evaluates the flake again for every installable of a `nix build` and real
//! configurations share an expensive nixpkgs. Each host's derivation is then
//! realised on its own (`nix-store --realise`), without evaluating again, so
//! a host's copy can start as soon as its own closure exists.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;
use tokio::process::Command;

use super::{relevant_lines, BinaryCache, CommandOutput, DriverConfig};
use crate::types::StorePath;

/// Evaluations run at once when the fleet's evaluation failed as a whole
/// and hosts are evaluated one by one to tell which fail.
const FALLBACK_PARALLELISM: usize = 2;

/// A command that did not finish within its deadline (and was stopped).
#[derive(Debug)]
pub(super) struct TimedOut;

/// A `nix` (or `nix-store`) command line with the flags every invocation
/// needs.
pub(super) struct NixCommand {
    pub(super) cmd: Command,
    /// How errors name it: `nix eval`, `nix-store --realise`, …
    name: String,
}

impl NixCommand {
    /// `nix SUBCOMMAND…` (e.g. `"store sign"`) with the experimental
    /// features and options.
    pub(super) fn new(cfg: &DriverConfig, subcommand: &'static str) -> NixCommand {
        NixCommand::program(cfg, "nix", subcommand)
    }

    /// `nix-store OPERATION`, with the operator's options.
    fn store(cfg: &DriverConfig, operation: &'static str) -> NixCommand {
        NixCommand::program(cfg, "nix-store", operation)
    }

    fn program(cfg: &DriverConfig, program: &str, subcommand: &'static str) -> NixCommand {
        // The one place a local process is started (clippy.toml bans it
        // elsewhere).
        #[allow(clippy::disallowed_methods)]
        let mut cmd = Command::new(program);
        if program == "nix" {
            cmd.arg("--extra-experimental-features")
                .arg("nix-command flakes");
        }
        for (name, value) in &cfg.nix_options {
            cmd.arg("--option").arg(name).arg(value);
        }
        // Remote builders (`--nix-option builders=…`) go through ssh too.
        cmd.env("NIX_SSHOPTS", cfg.base_sshopts().join(" "));
        if let Some(cache) = &cfg.nix_cache {
            cmd.env("XDG_CACHE_HOME", cache);
        }
        // Its own process group: nix's builders and helpers go with it
        // when it is killed (a deadline, an evaluation made moot).
        cmd.stdin(Stdio::null()).kill_on_drop(true).process_group(0);
        cmd.args(subcommand.split(' '));
        NixCommand {
            cmd,
            name: format!("{program} {subcommand}"),
        }
    }

    pub(super) fn describe(&self) -> String {
        let std = self.cmd.as_std();
        let mut parts = vec![std.get_program().to_string_lossy().into_owned()];
        parts.extend(std.get_args().map(|a| a.to_string_lossy().into_owned()));
        parts.join(" ")
    }

    /// Runs to completion within `limit`. Past it, or when the caller
    /// stops waiting, the whole process group is ended (see
    /// [`super::ProcessGroup`]) while its output pipes are still open: nix
    /// that finds them closed dies of it before stopping its builders.
    pub(super) async fn output(
        mut self,
        limit: Duration,
    ) -> Result<Result<std::process::Output, std::io::Error>, TimedOut> {
        self.cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = match self.cmd.spawn() {
            Ok(child) => child,
            Err(e) => return Ok(Err(e)),
        };
        let pid = child.id();
        let mut wait = Box::pin(child.wait_with_output());
        // Declared after `wait`, so dropped (signalled) before it.
        let group = pid.map(super::ProcessGroup);
        tokio::select! {
            out = &mut wait => {
                // Finished: its group id may soon belong to someone else.
                if let Some(group) = group {
                    group.disarm();
                }
                Ok(out)
            }
            () = tokio::time::sleep(limit) => {
                drop(group);
                let _ = tokio::time::timeout(super::GROUP_GRACE, &mut wait).await;
                Err(TimedOut)
            }
        }
    }

    /// Runs to completion; a non-zero exit is [`BuildError::Failed`] about
    /// `what`, with nix's stderr.
    async fn run(self, what: String, limit: Duration) -> Result<CommandOutput, BuildError> {
        let command = self.describe();
        let name = self.name.clone();
        tracing::debug!(%command, "running nix");
        let out = self
            .output(limit)
            .await
            .map_err(|_| BuildError::Timeout {
                command: command.clone(),
                limit,
            })?
            .map_err(|source| BuildError::Spawn { command, source })?;
        let output = CommandOutput::from_output(&out);
        if out.status.success() {
            Ok(output)
        } else {
            Err(BuildError::Failed {
                command: name,
                attribute: what,
                output,
            })
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` did not finish within {}s", .limit.as_secs())]
    Timeout { command: String, limit: Duration },
    #[error("`{command}` of {attribute} failed:\n{}", relevant_lines(&.output.stderr))]
    Failed {
        command: String,
        attribute: String,
        output: CommandOutput,
    },
    #[error("nix printed output cim cannot read: {0}")]
    Output(String),
}

/// A configuration's system, evaluated but not necessarily built.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Toplevel {
    /// The derivation that builds it.
    pub drv: StorePath,
    /// The closure it builds: what the host should run.
    pub out: StorePath,
}

/// The result of evaluating a revision for the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    /// Every name under the flake's `nixosConfigurations`.
    pub names: Vec<String>,
    /// Each wanted configuration's system, or nix's error for it. A
    /// configuration the flake lacks is absent.
    pub systems: BTreeMap<String, Result<Toplevel, String>>,
}

/// The flake output holding a host's system closure. The attribute is quoted,
/// and spec validation restricts it to characters that need no escaping.
pub fn toplevel_attribute(configuration: &str) -> String {
    format!("nixosConfigurations.\"{configuration}\".config.system.build.toplevel")
}

/// A Nix string literal of `s`.
fn nix_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' | '$' => {
                out.push('\\');
                out.push(c);
            }
            '\n' => out.push_str("\\n"),
            _ => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The `--apply` function of the fleet's evaluation: the names, and every
/// wanted configuration's `drvPath`/`outPath`, `null` where it throws.
fn fleet_expression(configurations: &[String]) -> String {
    let wanted: Vec<String> = configurations.iter().map(|c| nix_string(c)).collect();
    format!(
        "cs: let one = n: let r = builtins.tryEval (let t = cs.${{n}}.config.system.build.toplevel; \
         in builtins.deepSeq [ t.drvPath t.outPath ] {{ drv = t.drvPath; out = t.outPath; }}); \
         in if r.success then r.value else null; \
         in {{ names = builtins.attrNames cs; systems = builtins.listToAttrs (map (n: {{ name = n; \
         value = if cs ? ${{n}} then one n else null; }}) [ {} ]); }}",
        wanted.join(" ")
    )
}

#[derive(Deserialize)]
struct RawEvaluation {
    names: Vec<String>,
    systems: BTreeMap<String, Option<Toplevel>>,
}

/// Evaluates `configurations` of `flake` in one `nix eval`. Hosts whose
/// evaluation throws are evaluated again alone, only to get nix's message.
/// If the evaluation fails as a whole (an error `tryEval` cannot catch),
/// the configurations are evaluated one by one so that the error fails only
/// those it concerns; `Err` means the flake itself is broken.
pub async fn evaluate(
    cfg: &DriverConfig,
    flake: &str,
    configurations: &[String],
) -> Result<Evaluation, BuildError> {
    fetch(cfg, flake).await?;
    let mut nix = NixCommand::new(cfg, "eval");
    nix.cmd
        .arg("--json")
        .arg(format!("{flake}#nixosConfigurations"))
        .arg("--apply")
        .arg(fleet_expression(configurations));
    let raw = match nix
        .run("nixosConfigurations".to_string(), cfg.eval_timeout)
        .await
    {
        Ok(output) => serde_json::from_str::<RawEvaluation>(output.stdout.trim())
            .map_err(|e| BuildError::Output(format!("{e}: {}", output.stdout.trim())))?,
        // A hanging evaluation would hang again host by host.
        Err(e @ BuildError::Timeout { .. }) => return Err(e),
        Err(e) => {
            tracing::info!(error = %e, "the fleet's evaluation failed; evaluating hosts one by one");
            return evaluate_one_by_one(cfg, flake, configurations).await;
        }
    };
    let failed: Vec<String> = raw
        .systems
        .iter()
        .filter(|(_, v)| v.is_none())
        .map(|(k, _)| k.clone())
        .filter(|k| raw.names.contains(k))
        .collect();
    let mut systems: BTreeMap<String, Result<Toplevel, String>> = raw
        .systems
        .into_iter()
        .filter_map(|(k, v)| v.map(|t| (k, Ok(t))))
        .collect();
    for (name, result) in evaluate_each(cfg, flake, &failed).await {
        systems.insert(name, result);
    }
    Ok(Evaluation {
        names: raw.names,
        systems,
    })
}

/// Fetches `flake`'s source (and the inputs its lock file names) into the
/// store, so that evaluating it after runs no `git`.
///
/// Why a step of its own: an evaluation made moot is killed, and nix's
/// `git` killed while it makes or fills nix's git cache leaves a
/// repository every later `git fetch` into it fails on (`not a git
/// repository`): no revision would evaluate again. So the fetch is
/// detached from its caller and runs to its end (or its deadline), one at
/// a time ([`DriverConfig::fetch_turn`]). A repository of the cache left
/// unfinished anyway (a deadline, cim itself killed) is removed and the
/// fetch tried again, so that it cannot fail every revision after it. A
/// fetch that fails with the cache whole (a flake that does not parse)
/// leaves the cache alone: clearing it would make the next fetch copy the
/// whole history again.
async fn fetch(cfg: &DriverConfig, flake: &str) -> Result<(), BuildError> {
    let cfg = cfg.clone();
    let owned = flake.to_string();
    let fetching = tokio::spawn(async move {
        let flake = owned;
        let _turn = cfg.fetch_turn.clone().lock_owned().await;
        let first = fetch_once(&cfg, &flake).await;
        let (Err(error @ BuildError::Failed { .. }), Some(cache)) = (&first, &cfg.nix_cache) else {
            return first;
        };
        let git_cache = cache.join("nix").join("gitv3");
        let removed = {
            let git_cache = git_cache.clone();
            tokio::task::spawn_blocking(move || remove_unfinished_repositories(&git_cache)).await
        };
        match removed {
            Ok(Ok(0)) => first,
            Ok(Ok(n)) => {
                tracing::warn!(
                    error = %crate::error::error_chain(error),
                    cache = %git_cache.display(),
                    removed = n,
                    "fetching the flake failed on an unfinished repository of nix's git cache; removed it, fetching again"
                );
                fetch_once(&cfg, &flake).await
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, cache = %git_cache.display(), "cannot clear nix's git cache");
                first
            }
            Err(_) => first,
        }
    });
    fetching
        .await
        .unwrap_or_else(|e| Err(BuildError::Output(format!("fetching {flake} stopped: {e}"))))
}

/// Removes the repositories of nix's git cache (`gitv3`) that a `git init
/// --bare` cut short left unfinished — without `HEAD`, `config` or
/// `objects`, which every repository git makes has — and returns how many.
/// A cache that does not exist has none.
fn remove_unfinished_repositories(git_cache: &std::path::Path) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(git_cache) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let path = entry?.path();
        let unfinished = path.is_dir()
            && ["HEAD", "config", "objects"]
                .iter()
                .any(|part| !path.join(part).exists());
        if unfinished {
            std::fs::remove_dir_all(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

async fn fetch_once(cfg: &DriverConfig, flake: &str) -> Result<(), BuildError> {
    let mut nix = NixCommand::new(cfg, "flake metadata");
    nix.cmd.arg("--json").arg(flake);
    nix.run("the flake".to_string(), cfg.eval_timeout)
        .await
        .map(|_| ())
}

async fn evaluate_one_by_one(
    cfg: &DriverConfig,
    flake: &str,
    configurations: &[String],
) -> Result<Evaluation, BuildError> {
    let names = configuration_names(cfg, flake).await?;
    let present: Vec<String> = configurations
        .iter()
        .filter(|c| names.contains(c))
        .cloned()
        .collect();
    Ok(Evaluation {
        systems: evaluate_each(cfg, flake, &present).await,
        names,
    })
}

/// Evaluates configurations one by one, a few at a time.
async fn evaluate_each(
    cfg: &DriverConfig,
    flake: &str,
    configurations: &[String],
) -> BTreeMap<String, Result<Toplevel, String>> {
    futures::stream::iter(configurations.iter().cloned())
        .map(|name| async move {
            let result = evaluate_single(cfg, flake, &name)
                .await
                .map_err(|e| crate::error::error_chain(&e));
            (name, result)
        })
        .buffer_unordered(FALLBACK_PARALLELISM)
        .collect()
        .await
}

async fn evaluate_single(
    cfg: &DriverConfig,
    flake: &str,
    configuration: &str,
) -> Result<Toplevel, BuildError> {
    let attribute = toplevel_attribute(configuration);
    let mut nix = NixCommand::new(cfg, "eval");
    nix.cmd
        .arg("--json")
        .arg(format!("{flake}#{attribute}"))
        .args(["--apply", "t: { drv = t.drvPath; out = t.outPath; }"]);
    let output = nix.run(attribute, cfg.eval_timeout).await?;
    serde_json::from_str(output.stdout.trim())
        .map_err(|e| BuildError::Output(format!("{e}: {}", output.stdout.trim())))
}

/// The names under the flake's `nixosConfigurations`. `attrNames` does not
/// evaluate the configurations themselves, so this stays cheap.
async fn configuration_names(cfg: &DriverConfig, flake: &str) -> Result<Vec<String>, BuildError> {
    let mut nix = NixCommand::new(cfg, "eval");
    nix.cmd
        .arg("--json")
        .arg(format!("{flake}#nixosConfigurations"))
        .args(["--apply", "builtins.attrNames"]);
    let output = nix
        .run("nixosConfigurations".to_string(), cfg.eval_timeout)
        .await?;
    serde_json::from_str(output.stdout.trim())
        .map_err(|e| BuildError::Output(format!("{e}: {}", output.stdout.trim())))
}

/// Builds evaluated systems in one `nix-store --realise` (no evaluation)
/// and checks that it produced every closure the evaluation promised.
pub async fn realise(cfg: &DriverConfig, systems: &[Toplevel]) -> Result<(), BuildError> {
    let mut nix = NixCommand::store(cfg, "--realise");
    nix.cmd.args(systems.iter().map(|s| &s.drv));
    let what = systems
        .iter()
        .map(|s| s.drv.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let output = nix.run(what, cfg.build_timeout).await?;
    let built: std::collections::BTreeSet<&str> = output.stdout.lines().map(str::trim).collect();
    match systems.iter().find(|s| !built.contains(s.out.as_str())) {
        None => Ok(()),
        Some(missing) => Err(BuildError::Output(format!(
            "building {} did not give {}",
            missing.drv, missing.out
        ))),
    }
}

/// Every path of the closures of `roots` in the controller's store, with
/// sizes and references (one `nix path-info --json --recursive`): what a
/// plan and a build's summary compare.
pub async fn path_info(
    cfg: &DriverConfig,
    roots: &[StorePath],
) -> Result<Vec<crate::plan::PathInfo>, BuildError> {
    let mut nix = NixCommand::new(cfg, "path-info");
    nix.cmd.arg("--json").arg("--recursive");
    nix.cmd.args(roots.iter().map(StorePath::as_str));
    let what = roots
        .iter()
        .map(StorePath::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let output = nix.run(what, PATH_INFO_LIMIT).await?;
    crate::plan::parse_path_info(&output.stdout).map_err(BuildError::Output)
}

/// Longest reading a closure's path information may take.
pub(super) const PATH_INFO_LIMIT: Duration = Duration::from_secs(120);

/// Longest pushing one closure to the binary cache may take.
const PUSH_LIMIT: Duration = Duration::from_secs(3600);

/// Signs `closure` with the cache's key and copies it to the cache, so that
/// hosts substitute it from there instead of from the controller. Paths the
/// cache already has are not uploaded again.
pub async fn push_to_cache(
    cfg: &DriverConfig,
    cache: &BinaryCache,
    closure: &StorePath,
) -> Result<(), BuildError> {
    let mut sign = NixCommand::new(cfg, "store sign");
    sign.cmd
        .args(["--recursive", "--key-file"])
        .arg(&cache.signing_key)
        .arg(closure);
    sign.run(closure.to_string(), PUSH_LIMIT).await?;
    let mut copy = NixCommand::new(cfg, "copy");
    copy.cmd.arg("--to").arg(&cache.url).arg(closure);
    copy.run(closure.to_string(), PUSH_LIMIT).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_unfinished_repositories_of_the_git_cache_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("gitv3");
        assert_eq!(remove_unfinished_repositories(&cache).unwrap(), 0);
        let whole = cache.join("whole");
        std::fs::create_dir_all(whole.join("objects")).unwrap();
        for file in ["HEAD", "config", "description"] {
            std::fs::write(whole.join(file), "").unwrap();
        }
        // As a killed `git init --bare` leaves it.
        let cut_short = cache.join("cut-short");
        std::fs::create_dir_all(&cut_short).unwrap();
        std::fs::write(cut_short.join("description"), "").unwrap();
        std::fs::write(cache.join("a-file"), "").unwrap();

        assert_eq!(remove_unfinished_repositories(&cache).unwrap(), 1);
        assert!(whole.join("HEAD").exists() && cache.join("a-file").exists());
        assert!(!cut_short.exists());
        assert_eq!(remove_unfinished_repositories(&cache).unwrap(), 0);
    }

    #[test]
    fn attributes_are_quoted() {
        assert_eq!(
            toplevel_attribute("web-1"),
            "nixosConfigurations.\"web-1\".config.system.build.toplevel"
        );
    }

    #[test]
    fn nix_commands_carry_features_and_options() {
        let cfg = DriverConfig {
            nix_options: vec![("substituters".into(), String::new())],
            ..DriverConfig::default()
        };
        assert_eq!(
            NixCommand::new(&cfg, "eval").describe(),
            "nix --extra-experimental-features nix-command flakes --option substituters  eval"
        );
        assert_eq!(
            NixCommand::store(&cfg, "--realise").describe(),
            "nix-store --option substituters  --realise"
        );
    }

    #[test]
    fn the_fleet_expression_quotes_every_name() {
        let e = fleet_expression(&["web-1".into(), "a\"${x}".into()]);
        assert!(e.contains(r#"[ "web-1" "a\"\${x}" ]"#), "{e}");
        assert!(e.starts_with("cs: "));
    }

    #[test]
    fn evaluation_output_is_read() {
        let out = "/nix/store/smz0ldh5h3kwdxlgw2whndrb1k4ha03j-nixos-system-a-1";
        let drv = "/nix/store/6ihf0pnw4hyqwq5vg515a28rirb74c7a-nixos-system-a-1.drv";
        let raw: RawEvaluation = serde_json::from_str(&format!(
            r#"{{"names":["a","b"],"systems":{{"a":{{"drv":"{drv}","out":"{out}"}},"b":null}}}}"#
        ))
        .unwrap();
        assert_eq!(raw.names, ["a", "b"]);
        assert!(raw.systems["b"].is_none());
        assert_eq!(raw.systems["a"].as_ref().unwrap().out, *out);
        // What nix says is checked as it is read.
        assert!(serde_json::from_str::<RawEvaluation>(
            r#"{"names":["a"],"systems":{"a":{"drv":"/tmp/x.drv","out":"/tmp/x"}}}"#
        )
        .is_err());
    }
}
