//! `simulate`: `cim simulate` — the real controller driving 10,000
//! simulated hosts through a whole-fleet change — with four clients
//! reading `GET /api/v1/status` the whole time it is busy: the whole
//! status each time, or (`--sim-since`) what changed since their last
//! answer, applied to the hosts they hold, as the dashboard does.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::controller::http_get;
use crate::{median, percentile, Options};

const CLIENTS: usize = 4;
/// Each client's pause between reads: a dashboard refreshing 20 times a
/// second, not a loop that would itself take the machine's two cores.
const THINK: std::time::Duration = std::time::Duration::from_millis(50);
/// The simulated latencies every run is given (and the report states):
/// the step, `cim simulate`'s flag, milliseconds.
const LATENCIES: [(&str, &str, u64); 6] = [
    ("connect", "--connect-ms", 50),
    ("command", "--command-ms", 10),
    ("copy", "--copy-ms", 500),
    ("activation", "--activate-ms", 1000),
    ("evaluation", "--evaluate-ms", 1000),
    ("build", "--build-ms", 200),
];

pub(crate) fn simulate(opts: &Options) -> Result<()> {
    let n = opts.sim_hosts;
    let policy = match opts.sim_policy {
        true => " under a Fleet policy (`--policy`: a 1% canary wave, then the rest, which depends on it; a 1% failure budget)",
        false => "",
    };
    println!("## Simulated fleet: {n} hosts, one whole-fleet change (`cim simulate`){policy}\n");
    let reads = match opts.sim_since {
        true => "the changes since its last answer (`?since=`)",
        false => "the whole status",
    };
    let latencies: Vec<String> = LATENCIES
        .iter()
        .map(|(step, _, ms)| format!("{step} {ms} ms"))
        .collect();
    println!("Simulated latencies: {}. Medians of {} runs (status p99: the median of the runs' own, and of every read of every run together); status read by {CLIENTS} clients throughout, each every {} ms, each time {reads}.\n", latencies.join(", "), opts.rounds, THINK.as_millis());
    // With --baseline, both controllers run in every round, alternating
    // (the order rotates), and each gets its own row.
    let mut binaries = vec![("cim", opts.cim.clone())];
    if let Some(baseline) = &opts.baseline {
        binaries.push(("cim (baseline)", baseline.clone()));
    }
    println!("| max parallel | controller | wall (s) | critical path (s) | ratio | events | events/s | CPU per event (µs) | status p99 (ms) | all reads' p99 (ms) | peak RSS (MB) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for &parallel in &opts.sim_parallel {
        let mut runs = vec![Vec::new(); binaries.len()];
        for round in 0..opts.rounds {
            for i in 0..binaries.len() {
                let which = (i + round) % binaries.len();
                runs[which].push(run(
                    &binaries[which].1,
                    n,
                    parallel,
                    opts.sim_policy,
                    opts.sim_since,
                )?);
            }
        }
        for ((label, _), runs) in binaries.iter().zip(&runs) {
            let col = |k: &str| median(runs.iter().map(|(r, _)| r[k]).collect());
            let mut reads: Vec<f64> = runs.iter().flat_map(|(_, t)| t.iter().copied()).collect();
            reads.sort_by(f64::total_cmp);
            println!(
                "| {parallel} | {label} | {:.2} | {:.2} | {:.3} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} |",
                col("wallSeconds"),
                col("criticalPathSeconds"),
                col("ratio"),
                col("events"),
                col("eventsPerSecond"),
                col("cpuMicrosPerEvent"),
                col("statusP99"),
                percentile(&reads, 0.99),
                col("peakRssMb"),
            );
        }
    }
    println!();
    Ok(())
}

/// One simulation: its report with the status p99 added, and every
/// status read's time (ms, ascending).
fn run(
    cim: &std::path::Path,
    hosts: usize,
    parallel: usize,
    policy: bool,
    since: bool,
) -> Result<(std::collections::HashMap<String, f64>, Vec<f64>)> {
    let mut child = Command::new(cim)
        .args([
            "simulate",
            "--hosts",
            &hosts.to_string(),
            "--max-parallel",
            &parallel.to_string(),
        ])
        .args(policy.then_some("--policy"))
        .args(
            LATENCIES
                .iter()
                .flat_map(|(_, flag, ms)| [flag.to_string(), ms.to_string()]),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {}", cim.display()))?;
    let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let first = lines.next().context("cim simulate printed nothing")??;
    let addr = first
        .strip_prefix("api http://")
        .with_context(|| format!("unexpected first line {first:?}"))?
        .to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (addr, stop) = (addr.clone(), Arc::clone(&stop));
            std::thread::spawn(move || -> (Vec<f64>, std::thread::JoinHandle<Reader>) {
                // The answers are applied on a thread of their own, at the
                // priority of the controller's work: a dashboard parses
                // them on its own machine, and a client parsing 5.8 MB
                // here must not be timed as the server's wait.
                let (bodies, applied) = std::sync::mpsc::channel::<Vec<u8>>();
                let applier = std::thread::spawn(move || {
                    cim::priority::lower_this_thread();
                    let mut reader = Reader::default();
                    for body in applied {
                        reader.take(&body);
                    }
                    reader
                });
                let mut times = Vec::new();
                // The first request builds the server's snapshot.
                let mut seq = http_get(&addr, "/api/v1/status").ok().and_then(|body| {
                    let seq = seq_of(&body);
                    let _ = bodies.send(body);
                    seq
                });
                while !stop.load(Ordering::Relaxed) {
                    let path = match (since, seq) {
                        (true, Some(seq)) => format!("/api/v1/status?since={seq}"),
                        _ => "/api/v1/status".to_string(),
                    };
                    let t = Instant::now();
                    let Ok(body) = http_get(&addr, &path) else {
                        break;
                    };
                    times.push(t.elapsed().as_secs_f64() * 1000.0);
                    if since {
                        seq = seq_of(&body);
                        // Without it the next request would not ask `?since=`.
                        if seq.is_none() {
                            break;
                        }
                        let _ = bodies.send(body);
                    }
                    std::thread::sleep(THINK);
                }
                drop(bodies);
                (times, applier)
            })
        })
        .collect();
    let report = lines
        .next()
        .context("cim simulate ended without a report")??;
    stop.store(true, Ordering::Relaxed);
    let status = child.wait()?;
    if !status.success() {
        bail!("cim simulate failed: {report}");
    }
    let mut times = Vec::new();
    for client in clients {
        let (client_times, applier) = client
            .join()
            .map_err(|_| anyhow::anyhow!("a status reader panicked"))?;
        let reader = applier
            .join()
            .map_err(|_| anyhow::anyhow!("a status reader panicked"))?;
        if reader.unreadable > 0 {
            bail!(
                "{} status answers were not a status, or did not follow on from the one before",
                reader.unreadable
            );
        }
        if since && (client_times.len() < 2 || reader.hosts.len() != hosts) {
            bail!(
                "a `?since=` reader ended with {} hosts of {hosts} after {} reads (an answer without a leading `seq` ends its reads)",
                reader.hosts.len(),
                client_times.len()
            );
        }
        times.extend(client_times);
    }
    times.sort_by(f64::total_cmp);
    let p99 = percentile(&times, 0.99);
    eprintln!(
        "simulate {hosts}/{parallel}: {} status reads, p50 {:.1} ms, p99 {p99:.1} ms",
        times.len(),
        percentile(&times, 0.5)
    );
    let json: serde_json::Value = serde_json::from_str(&report)?;
    let mut out: std::collections::HashMap<String, f64> = json
        .as_object()
        .context("the report is not an object")?
        .iter()
        .filter_map(|(k, v)| v.as_f64().map(|v| (k.clone(), v)))
        .collect();
    out.insert("statusP99".into(), p99);
    Ok((out, times))
}

/// The newest event an answer includes: its first field, read without
/// parsing the megabytes after it, so that the next request goes out at
/// once.
fn seq_of(body: &[u8]) -> Option<u64> {
    let rest = body.strip_prefix(b"{\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// What a reader asking `?since=` holds: the hosts, as the answers so far
/// leave them, and the newest event they include.
#[derive(Default)]
struct Reader {
    seq: Option<u64>,
    hosts: std::collections::BTreeMap<String, cim::status::HostStatus>,
    /// Answers that did not parse as a status.
    unreadable: usize,
}

impl Reader {
    /// Applies an answer as the dashboard does: a whole status replaces
    /// the hosts; a list of changes removes and puts in.
    fn take(&mut self, body: &[u8]) {
        let Ok(answer) = serde_json::from_slice::<cim::api::StatusResponse>(body) else {
            self.unreadable += 1;
            return;
        };
        if answer.since.is_some_and(|since| Some(since) != self.seq) {
            self.unreadable += 1;
        }
        if answer.since.is_none() {
            self.hosts.clear();
        }
        for name in &answer.removed {
            self.hosts.remove(name);
        }
        for host in answer.hosts {
            self.hosts.insert(host.name.clone(), host);
        }
        self.seq = Some(answer.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::seq_of;

    #[test]
    fn the_seq_is_read_from_the_answer_s_first_field() {
        assert_eq!(
            seq_of(br#"{"seq":60003,"since":59990,"hosts":[]}"#),
            Some(60003)
        );
        assert_eq!(seq_of(br#"{"since":1,"seq":2}"#), None);
        assert_eq!(seq_of(b"{\"seq\":}"), None);
        assert_eq!(seq_of(b""), None);
    }
}
