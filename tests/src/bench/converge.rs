//! The whole-fleet change: `cim` against the floor (raw commands at once)
//! and an `xargs -P10` loop, alternating, with and without a shared
//! evaluation cost.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use cim_sandbox::{host_names, sh, Fleet};
use serde_json::Value;

use crate::cim_run::{parse_time, CimRun};
use crate::{median, Options};

/// How a change is carried out.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Method {
    Floor,
    Loop,
    Cim,
    Baseline,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Floor => "floor",
            Method::Loop => "xargs -P10 loop",
            Method::Cim => "cim",
            Method::Baseline => "cim (baseline)",
        }
    }
}

pub(crate) fn converge(opts: &Options) -> Result<()> {
    let mut methods = vec![Method::Cim, Method::Floor, Method::Loop];
    if opts.baseline.is_some() {
        methods.push(Method::Baseline);
    }
    println!(
        "## Whole-fleet change, commit → every host switched (median of {} rounds, seconds)\n",
        opts.rounds
    );
    let mut header = "| hosts | eval cost |".to_string();
    let mut rule = "| --- | --- |".to_string();
    for m in &methods {
        header.push_str(&format!(" {} |", m.name()));
        rule.push_str(" --- |");
    }
    header.push_str(" cim / floor | loop / cim |");
    rule.push_str(" --- | --- |");
    let mut rows = Vec::new();
    for &n in &opts.sizes {
        let fleet = Fleet::start(n)?;
        let state = tempfile::Builder::new().prefix("cim-bench-").tempdir()?;
        for &cost in &opts.eval_costs {
            fleet.write("sandbox/eval-cost.nix", &format!("{cost}\n"))?;
            let mut times: Vec<Vec<f64>> = vec![Vec::new(); methods.len()];
            let mut trial = 0;
            // Brings every host onto the current commit first, so that every
            // method starts from a converged fleet.
            set_all(&fleet, n, "warm-up")?;
            fleet.commit("bench: warm-up")?;
            floor(&fleet, n)?;
            for round in 0..opts.rounds {
                for k in 0..methods.len() {
                    let m = methods[(k + round) % methods.len()];
                    trial += 1;
                    set_all(&fleet, n, &format!("{}-{trial}", std::process::id()))?;
                    let secs =
                        run_method(opts, m, &fleet, n, &state.path().join(format!("s{trial}")))?;
                    eprintln!(
                        "{n} hosts, cost {cost}, round {round}: {} {secs:.2}s",
                        m.name()
                    );
                    times[methods.iter().position(|x| *x == m).unwrap_or(0)].push(secs);
                }
            }
            let med: Vec<f64> = times.into_iter().map(median).collect();
            let at = |m: Method| {
                methods
                    .iter()
                    .position(|x| *x == m)
                    .map_or(f64::NAN, |i| med[i])
            };
            let mut row = format!(
                "| {n} | {} |",
                if cost == 0 {
                    "none".to_string()
                } else {
                    format!("{:.2}s", eval_seconds(&fleet)?)
                }
            );
            for v in &med {
                row.push_str(&format!(" {v:.2} |"));
            }
            row.push_str(&format!(
                " {:.2}× | {:.2}× |",
                at(Method::Cim) / at(Method::Floor),
                at(Method::Loop) / at(Method::Cim)
            ));
            rows.push(row);
        }
    }
    println!("\n{header}\n{rule}");
    for r in rows {
        println!("{r}");
    }
    println!();
    Ok(())
}

/// Gives every host a new system (a fresh nonce, so nothing is in any
/// store yet) and commits it.
fn set_all(fleet: &Fleet, n: usize, nonce: &str) -> Result<()> {
    for h in host_names(n) {
        fleet.set_host_config(&h, &format!("{{ version = 1; nonce = \"{nonce}\"; }}"))?;
    }
    Ok(())
}

/// How long one evaluation of one host takes with the current eval cost.
fn eval_seconds(fleet: &Fleet) -> Result<f64> {
    let flake = format!("git+file://{}", fleet.repo.display());
    let t = Instant::now();
    nix(&[
        "eval",
        "--raw",
        &format!("{flake}#nixosConfigurations.web-1.config.system.build.toplevel.drvPath"),
    ])?;
    Ok(t.elapsed().as_secs_f64())
}

fn nix(args: &[&str]) -> Result<String> {
    let mut full = vec![
        "--extra-experimental-features",
        "nix-command flakes",
        "--option",
        "substituters",
        "",
    ];
    full.extend_from_slice(args);
    sh("nix", &full)
}

fn run_method(opts: &Options, m: Method, fleet: &Fleet, n: usize, state: &Path) -> Result<f64> {
    match m {
        Method::Floor => {
            fleet.commit("bench: floor")?;
            let t = Instant::now();
            floor(fleet, n)?;
            Ok(t.elapsed().as_secs_f64())
        }
        Method::Loop => {
            fleet.commit("bench: loop")?;
            let t = Instant::now();
            shell_loop(fleet, n)?;
            Ok(t.elapsed().as_secs_f64())
        }
        Method::Cim => with_cim(&opts.cim, fleet, n, state),
        Method::Baseline => with_cim(
            opts.baseline.as_deref().context("no baseline")?,
            fleet,
            n,
            state,
        ),
    }
}

/// The floor: one evaluation, one realise, then every host at once.
fn floor(fleet: &Fleet, n: usize) -> Result<()> {
    let flake = format!("git+file://{}", fleet.repo.display());
    let drvs: serde_json::Map<String, Value> = serde_json::from_str(&nix(&[
        "eval",
        "--json",
        &format!("{flake}#nixosConfigurations"),
        "--apply",
        "cs: builtins.mapAttrs (n: c: c.config.system.build.toplevel.drvPath) cs",
    ])?)?;
    let names = host_names(n);
    let drv_list: Vec<String> = names
        .iter()
        .map(|h| {
            drvs.get(h)
                .and_then(Value::as_str)
                .map(str::to_string)
                .context("no drv")
        })
        .collect::<Result<_>>()?;
    let mut realise = vec!["--option", "substituters", "", "--realise"];
    realise.extend(drv_list.iter().map(String::as_str));
    let outs: Vec<String> = sh("nix-store", &realise)?
        .lines()
        .map(str::to_string)
        .collect();
    if outs.len() != n {
        bail!("realise gave {} paths for {n} hosts", outs.len());
    }
    let sshopts = format!("-F {}", fleet.ssh_config.display());
    let children: Vec<(String, Child)> = names
        .iter()
        .zip(&outs)
        .map(|(h, out)| {
            let addr = &fleet.host(h).address;
            let script = "nix --extra-experimental-features nix-command copy --option substituters '' --to ssh://root@$1 $2 && ssh -F $3 root@$1 nix-env -p /nix/var/nix/profiles/system --set $2 '&&' $2/bin/switch-to-configuration switch";
            let child = Command::new("sh")
                .args(["-c", script, "floor", addr, out, &fleet.ssh_config.display().to_string()])
                .env("NIX_SSHOPTS", &sshopts)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("spawn")?;
            Ok((h.clone(), child))
        })
        .collect::<Result<_>>()?;
    for (h, child) in children {
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "floor: {h} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

/// The per-host loop an operator would write around `nixos-rebuild
/// --target-host`: build, copy, set the profile, switch; ten at a time.
fn shell_loop(fleet: &Fleet, n: usize) -> Result<()> {
    let flake = format!("git+file://{}", fleet.repo.display());
    let script = r#"h=$1 addr=$2 flake=$3 cfg=$4
out=$(nix --extra-experimental-features 'nix-command flakes' build --option substituters '' --no-link --json "$flake#nixosConfigurations.$h.config.system.build.toplevel" | sed -n 's/.*"out":"\([^"]*\)".*/\1/p')
[ -n "$out" ] || exit 1
NIX_SSHOPTS="-F $cfg" nix --extra-experimental-features nix-command copy --option substituters '' --to "ssh://root@$addr" "$out" || exit 1
ssh -F "$cfg" "root@$addr" nix-env -p /nix/var/nix/profiles/system --set "$out" || exit 1
ssh -F "$cfg" "root@$addr" "$out/bin/switch-to-configuration" switch
"#;
    // xargs -L1 appends each line's words to the command: name, address,
    // flake, ssh config.
    let input: String = host_names(n)
        .iter()
        .map(|h| {
            format!(
                "{h} {} {flake} {}\n",
                fleet.host(h).address,
                fleet.ssh_config.display()
            )
        })
        .collect();
    let mut child = Command::new("xargs")
        .args(["-P10", "-L1", "sh", "-c", script, "loop"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("loop failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A `cim run` for one trial: started on a fresh state directory, waited
/// for until it has looked at the (already converged) fleet, then the
/// change is committed and the time to the last `Converged` is measured
/// from the event log.
fn with_cim(bin: &Path, fleet: &Fleet, n: usize, state: &Path) -> Result<f64> {
    let mut cim = CimRun::start(bin, fleet, state, &["--max-parallel", &n.to_string()])?;
    let head = fleet.head()?;
    cim.wait_converged(n, &head, Duration::from_secs(300))?;
    let rev = fleet.commit("bench: cim")?;
    let t0 = SystemTime::now();
    cim.wait_converged(n, &rev, Duration::from_secs(600))?;
    let last = cim
        .events()?
        .iter()
        .filter(|e| e["reason"] == "Converged" && e["revision"] == rev.as_str())
        .filter_map(|e| e["time"].as_str().and_then(parse_time))
        .max()
        .context("no Converged event")?;
    cim.stop();
    Ok(last.duration_since(t0).unwrap_or_default().as_secs_f64())
}
