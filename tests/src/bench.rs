//! `cim-bench`: the benchmarks behind `BENCHMARKS.md`, against sandbox
//! fleets with real nix and sshd. `scripts/bench` builds and runs it.
//!
//! - `converge`: a change of every host, made by `cim`, by the floor (one
//!   evaluation of every host's `drvPath`, one realise, then every host's
//!   `nix copy` + `nix-env --set` + `switch-to-configuration` at once) and by
//!   an `xargs -P10` loop of per-host `nix build`/`nix copy`/switch, in
//!   alternating order, with and without a shared evaluation cost.
//! - `latency`: commit → `RevisionDetected` on a local repository.
//! - `idle`: the controller's CPU and process starts on a converged fleet.
//!
//! Every figure is a median over rounds, printed as a markdown table.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use cim_sandbox::{host_names, sh, Fleet};
use serde_json::Value;

struct Options {
    sizes: Vec<usize>,
    rounds: usize,
    eval_costs: Vec<u64>,
    idle_hosts: usize,
    idle_seconds: u64,
    latency_commits: usize,
    scale_hosts: usize,
    cim: PathBuf,
    baseline: Option<PathBuf>,
    only: Option<String>,
}

fn main() -> Result<()> {
    let mut opts = Options {
        sizes: vec![10, 50],
        rounds: 3,
        eval_costs: vec![0, 4_000_000],
        idle_hosts: 100,
        idle_seconds: 30,
        latency_commits: 20,
        scale_hosts: 10_000,
        // target/release/cim next to target/release/cim-bench.
        cim: std::env::current_exe()?.with_file_name("cim"),
        baseline: None,
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().context("missing value");
        match a.as_str() {
            "--sizes" => {
                opts.sizes = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--rounds" => opts.rounds = value()?.parse()?,
            "--eval-costs" => {
                opts.eval_costs = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--idle-hosts" => opts.idle_hosts = value()?.parse()?,
            "--idle-seconds" => opts.idle_seconds = value()?.parse()?,
            "--latency-commits" => opts.latency_commits = value()?.parse()?,
            "--scale-hosts" => opts.scale_hosts = value()?.parse()?,
            "--cim" => opts.cim = value()?.into(),
            "--baseline" => opts.baseline = Some(value()?.into()),
            "--only" => opts.only = Some(value()?),
            other => bail!(
                "unknown argument {other}; see scripts/bench (--sizes 10,50 --rounds 3 --eval-costs 0,4000000 --idle-hosts N --idle-seconds S --latency-commits N --cim BIN --baseline BIN --scale-hosts N --only converge|latency|idle|scale|restart)"
            ),
        }
    }
    let wanted = |what: &str| opts.only.as_deref().is_none_or(|o| o == what);
    println!("# cim benchmarks\n");
    println!("machine: {}\n", machine());
    if wanted("converge") {
        converge(&opts)?;
    }
    if wanted("latency") {
        latency(&opts)?;
    }
    if wanted("idle") {
        idle(&opts)?;
    }
    if wanted("scale") {
        scale(&opts)?;
    }
    if wanted("restart") {
        restart(&opts)?;
    }
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let nix = sh("nix", &["--version"]).unwrap_or_default();
    format!("{cores} cores ({cpu}), {nix}")
}

fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

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

fn converge(opts: &Options) -> Result<()> {
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

fn parse_time(s: &str) -> Option<SystemTime> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    let nanos = t.unix_timestamp_nanos();
    Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(nanos).ok()?))
}

struct CimRun {
    child: Option<Child>,
    bin: PathBuf,
    api: String,
}

impl CimRun {
    fn start(bin: &Path, fleet: &Fleet, state: &Path, extra: &[&str]) -> Result<CimRun> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let listen = format!("127.0.0.1:{port}");
        std::fs::create_dir_all(state)?;
        let log = std::fs::File::create(state.join("cim.log"))?;
        let child = Command::new(bin)
            .arg("run")
            .arg("--repo")
            .arg(&fleet.repo)
            .arg("--state-dir")
            .arg(state.join("state"))
            .args(["--listen", &listen, "--ssh-config"])
            .arg(&fleet.ssh_config)
            .args(["--nix-option", "substituters="])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let run = CimRun {
            child: Some(child),
            bin: bin.to_path_buf(),
            api: format!("http://{listen}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while run.json(&["status", "-o", "json"]).is_err() {
            if Instant::now() > deadline {
                bail!("cim did not start; see {}", state.join("cim.log").display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(run)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn json(&self, args: &[&str]) -> Result<Value> {
        let out = Command::new(&self.bin)
            .args(args)
            .env("CIM_API", &self.api)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("cim {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn events(&self) -> Result<Vec<Value>> {
        match self.json(&["events", "--all", "-o", "json"])? {
            Value::Array(a) => Ok(a),
            other => bail!("unexpected events: {other}"),
        }
    }

    fn wait_converged(&self, n: usize, rev: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(s) = self.json(&["status", "-o", "json"]) {
                let done = s["hosts"].as_array().is_some_and(|hs| {
                    hs.len() == n
                        && hs
                            .iter()
                            .all(|h| h["phase"] == "Converged" && h["observedRevision"] == rev)
                });
                if done {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!("cim did not converge on {rev}: {s:#}");
                }
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for CimRun {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Commit → `RevisionDetected`, measured from the moment git moved the
/// branch (the ref file's modification time) to the event's timestamp.
fn latency(opts: &Options) -> Result<()> {
    let mut bins = vec![("cim", opts.cim.clone())];
    if let Some(b) = &opts.baseline {
        bins.push(("cim (baseline)", b.clone()));
    }
    let fleet = Fleet::start(3)?;
    let state = tempfile::Builder::new().prefix("cim-bench-").tempdir()?;
    let mut runs: Vec<CimRun> = Vec::new();
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); bins.len()];
    // Every controller watches the same repository, so each commit is
    // measured by all of them at once.
    for (i, (_, bin)) in bins.iter().enumerate() {
        let cim = CimRun::start(bin, &fleet, &state.path().join(format!("l{i}")), &[])?;
        let head = fleet.head()?;
        cim.wait_converged(3, &head, Duration::from_secs(120))?;
        runs.push(cim);
    }
    let refs = fleet.repo.join(".git/refs/heads/main");
    for k in 0..opts.latency_commits {
        let rev = fleet.commit(&format!("bench: latency {k}"))?;
        let moved = std::fs::metadata(&refs)?.modified()?;
        std::thread::sleep(Duration::from_millis(1500));
        for (i, cim) in runs.iter().enumerate() {
            let detected = cim
                .events()?
                .iter()
                .find(|e| e["reason"] == "RevisionDetected" && e["revision"] == rev.as_str())
                .and_then(|e| e["time"].as_str().and_then(parse_time));
            if let Some(at) = detected {
                results[i]
                    .push(at.duration_since(moved).unwrap_or_default().as_secs_f64() * 1000.0);
            }
        }
    }
    println!(
        "## Commit → RevisionDetected, local repository ({} commits, ms)\n",
        opts.latency_commits
    );
    println!("| controller | median | max | detected |\n| --- | --- | --- | --- |");
    for (i, (name, _)) in bins.iter().enumerate() {
        let xs = &results[i];
        let max = xs.iter().copied().fold(f64::NAN, f64::max);
        println!(
            "| {name} | {:.1} | {max:.1} | {}/{} |",
            median(xs.clone()),
            xs.len(),
            opts.latency_commits
        );
    }
    println!();
    Ok(())
}

/// CPU (own and children's, from /proc) and processes started (execve, by
/// strace) of a controller with nothing to do.
fn idle(opts: &Options) -> Result<()> {
    let mut bins = vec![("cim", opts.cim.clone())];
    if let Some(b) = &opts.baseline {
        bins.push(("cim (baseline)", b.clone()));
    }
    let n = opts.idle_hosts;
    let fleet = Fleet::start(n)?;
    let state = tempfile::Builder::new().prefix("cim-bench-").tempdir()?;
    println!(
        "## Idle: converged fleet of {n} hosts, nothing to do ({} s window)\n",
        opts.idle_seconds
    );
    println!("| controller | CPU (% of a core) | processes started |\n| --- | --- | --- |");
    let head = fleet.head()?;
    for (i, (name, bin)) in bins.iter().enumerate() {
        let cim = CimRun::start(
            bin,
            &fleet,
            &state.path().join(format!("i{i}")),
            &["--max-parallel", "20"],
        )?;
        cim.wait_converged(n, &head, Duration::from_secs(900))?;
        std::thread::sleep(Duration::from_secs(2));
        let pid = cim.pid();
        let trace = state.path().join(format!("strace-{i}"));
        let mut strace = Command::new("strace")
            .args(["-f", "-qq", "-e", "trace=execve", "-o"])
            .arg(&trace)
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("strace (scripts/bench installs it)")?;
        let before = cpu_ticks(pid)?;
        std::thread::sleep(Duration::from_secs(opts.idle_seconds));
        let after = cpu_ticks(pid)?;
        let _ = strace.kill();
        let _ = strace.wait();
        let execs = std::fs::read_to_string(&trace)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("execve(") && !l.contains("resumed"))
            .count();
        let hz = 100.0;
        let pct = (after - before) as f64 / hz / opts.idle_seconds as f64 * 100.0;
        println!("| {name} | {pct:.2} | {execs} |");
        drop(cim);
    }
    println!();
    Ok(())
}

/// utime + stime + cutime + cstime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14-17 of stat(5); `rest` starts at field 3.
    let get = |i: usize| {
        fields
            .get(i - 3)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(get(14) + get(15) + get(16) + get(17))
}

/// A commit adding `--scale-hosts` suspended hosts, then one removing them:
/// the controller's own cost per host transition (nothing is contacted or
/// built for a suspended host). Timed by polling the status until it shows
/// the change.
fn scale(opts: &Options) -> Result<()> {
    let mut bins = vec![("cim", opts.cim.clone())];
    if let Some(b) = &opts.baseline {
        bins.push(("cim (baseline)", b.clone()));
    }
    let n = opts.scale_hosts;
    let fleet = Fleet::start(1)?;
    let state = tempfile::Builder::new().prefix("cim-bench-").tempdir()?;
    let real = cim_sandbox::host_spec("web-1", &fleet.host("web-1").address, "");
    // Spec files are limited to 1 MiB each: 1,000 hosts per file.
    let files: Vec<String> = (0..n.div_ceil(1000))
        .map(|f| {
            (f * 1000..n.min(f * 1000 + 1000))
                .map(|i| {
                    format!(
                        "---\napiVersion: cim/v1\nkind: Host\nmetadata: {{name: s-{i}}}\nspec: {{address: 10.254.{}.{}, configuration: web-1, suspend: true}}\n",
                        i / 250,
                        i % 250 + 1
                    )
                })
                .collect()
        })
        .collect();
    println!("## Scale: a commit adding {n} suspended hosts, then one removing them (seconds)\n");
    println!("| controller | add | remove | status p99 (ms), 4 clients | peak RSS (MB) |\n| --- | --- | --- | --- | --- |");
    for (k, (name, bin)) in bins.iter().enumerate() {
        fleet.write("specs/fleet.yaml", &real)?;
        fleet.commit("bench: scale, one host")?;
        let cim = CimRun::start(bin, &fleet, &state.path().join(format!("s{k}")), &[])?;
        cim.wait_converged(1, &fleet.head()?, Duration::from_secs(120))?;
        let hosts = |c: &CimRun| -> usize {
            c.json(&["status", "-o", "json"])
                .ok()
                .and_then(|s| s["hosts"].as_array().map(Vec::len))
                .unwrap_or(0)
        };
        let mut timed = Vec::new();
        for (add, want, what) in [(true, n + 1, "add"), (false, 1, "remove")] {
            for (f, text) in files.iter().enumerate() {
                let path = format!("specs/scale-{f}.yaml");
                if add {
                    fleet.write(&path, text)?;
                } else {
                    std::fs::remove_file(fleet.repo.join(&path))?;
                }
            }
            fleet.commit(&format!("bench: scale, {what}"))?;
            let t = Instant::now();
            let deadline = t + Duration::from_secs(180);
            while hosts(&cim) != want {
                if Instant::now() > deadline {
                    bail!("{name} did not {what} {n} hosts within 180 s");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            timed.push(t.elapsed().as_secs_f64());
            if add {
                let p99 = status_p99(&cim.api, 4, 50)?;
                timed.push(p99);
                timed.push(peak_rss_mb(cim.pid()));
            }
        }
        println!(
            "| {name} | {:.2} | {:.2} | {:.1} | {:.0} |",
            timed[0], timed[3], timed[1], timed[2]
        );
    }
    println!();
    Ok(())
}

/// The 99th percentile of `GET /api/v1/status`, in milliseconds, with
/// `clients` clients each making `requests` requests at once.
fn status_p99(api: &str, clients: usize, requests: usize) -> Result<f64> {
    let addr = api.trim_start_matches("http://").to_string();
    // The first request after a change reloads and serializes the status
    // once (its time is reported apart); these measure the steady state.
    http_get(&addr, "/api/v1/status")?;
    // Each client's first request is not measured either: it warms the
    // server's pool of store connections, as any running controller has.
    let ready = std::sync::Arc::new(std::sync::Barrier::new(clients));
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let addr = addr.clone();
            let ready = std::sync::Arc::clone(&ready);
            std::thread::spawn(move || -> Result<Vec<f64>> {
                http_get(&addr, "/api/v1/status")?;
                ready.wait();
                let mut times = Vec::new();
                for _ in 0..requests {
                    let t = Instant::now();
                    http_get(&addr, "/api/v1/status")?;
                    times.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                Ok(times)
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.join().map_err(|_| anyhow::anyhow!("client panicked"))??);
    }
    all.sort_by(f64::total_cmp);
    eprintln!(
        "status latency over {} requests: p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms",
        all.len(),
        all[all.len() / 2],
        all[all.len() * 9 / 10],
        all[all.len() - 1]
    );
    let i = ((all.len() as f64) * 0.99).ceil() as usize;
    Ok(all[i.saturating_sub(1).min(all.len() - 1)])
}

/// A plain HTTP/1.1 GET; the body is read to the end and dropped.
fn http_get(addr: &str, path: &str) -> Result<()> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)?;
    if !body.starts_with(b"HTTP/1.1 200") {
        bail!(
            "GET {path}: {}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        );
    }
    Ok(())
}

/// The process's peak resident set (VmHWM), in MB.
fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// A controller started on a store whose log holds 1,000,000 events (of
/// 1,000 hosts): the time until its API answers.
fn restart(opts: &Options) -> Result<()> {
    use cim::event::{NewEvent, Phase, Reason};
    const EVENTS: usize = 1_000_000;
    let fleet = Fleet::start(1)?;
    let state = tempfile::Builder::new().prefix("cim-bench-").tempdir()?;
    let dir = state.path().join("r/state");
    std::fs::create_dir_all(&dir)?;
    {
        let mut store = cim::store::Store::open(&dir)?;
        let mut status = cim::status::FleetStatus::default();
        for chunk in 0..EVENTS / 10_000 {
            let news = (0..10_000)
                .map(|i| {
                    let n = chunk * 10_000 + i;
                    NewEvent::host(
                        &format!("h-{}", n % 1000),
                        Reason::ReconcileRequested,
                        Some("r1"),
                        "",
                    )
                    .phase(if n % 2 == 0 {
                        Phase::Pending
                    } else {
                        Phase::Converged
                    })
                })
                .collect();
            store.append_all(&mut status, news, time::OffsetDateTime::now_utc())?;
        }
    }
    println!("## Restart with {EVENTS} events in the log\n");
    let t = Instant::now();
    let cim = CimRun::start(&opts.cim, &fleet, &state.path().join("r"), &[])?;
    let answered = t.elapsed().as_secs_f64();
    drop(cim);
    println!("| controller | start → API answers (s) |\n| --- | --- |\n| cim | {answered:.2} |\n");
    Ok(())
}
