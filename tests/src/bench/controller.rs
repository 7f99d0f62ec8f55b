//! What the controller costs by itself: commit → event latency, idle CPU
//! and processes, 10,000 hosts in one commit (with status latency and
//! memory), and a restart on a long event log.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cim_sandbox::Fleet;

use crate::cim_run::{parse_time, CimRun};
use crate::{median, Options};

/// Commit → `RevisionDetected`, measured from the moment git moved the
/// branch (the ref file's modification time) to the event's timestamp.
pub(crate) fn latency(opts: &Options) -> Result<()> {
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
pub(crate) fn idle(opts: &Options) -> Result<()> {
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
pub(crate) fn scale(opts: &Options) -> Result<()> {
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
    Ok(crate::percentile(&all, 0.99))
}

/// A plain HTTP/1.1 GET of the API; the body.
pub(crate) fn http_get(addr: &str, path: &str) -> Result<Vec<u8>> {
    cim_sandbox::http_get(addr, path, Duration::from_secs(30))
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
pub(crate) fn restart(opts: &Options) -> Result<()> {
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
