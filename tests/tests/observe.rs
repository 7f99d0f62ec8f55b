//! End-to-end tests of what an operator watches: `/metrics` checked by
//! `promtool` and scraped by a real Prometheus server, and the alerting
//! rules shipped in `contrib/`.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cim_sandbox::harness::{fleet_and_state as fleet, Cim};

fn get(api: &str, path: &str) -> String {
    let addr = api.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

#[test]
fn metrics_pass_promtool_and_a_real_prometheus_scrapes_them() {
    let (fleet, dir) = fleet(2);
    let cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_converged(&["web-1", "web-2"], None);
    let text = get(&cim.api, "/metrics");
    for wanted in [
        "cim_hosts{phase=\"Converged\"} 2",
        "cim_host_info{",
        "cim_events_total{reason=\"Converged\",type=\"Normal\"} 2",
        "cim_step_duration_seconds_bucket{step=\"copy\"",
        "cim_reconcile_duration_seconds_count{outcome=\"converged\"} 2",
        "cim_store_commit_duration_seconds_count",
        "cim_revision_info{",
        "cim_rollout_hosts{state=\"done\"} 2",
    ] {
        assert!(text.contains(wanted), "no {wanted} in\n{text}");
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/setup installs prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // A real Prometheus, scraping every second.
    let prom_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let target = cim.api.trim_start_matches("http://");
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contrib/prometheus/cim-alerts.yml");
    std::fs::write(
        prom_dir.join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [{}]\nscrape_configs:\n  - job_name: cim\n    static_configs: [{{targets: ['{target}']}}]\n",
            rules.display()
        ),
    )
    .unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut prometheus = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            prom_dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            prom_dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(prom_dir.join("log")).unwrap())
        .spawn()
        .expect("prometheus (scripts/setup installs it)");
    let api = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = loop {
        let q = std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| {
                let body = std::panic::catch_unwind(|| get(&api, "/api/v1/query?query=cim_hosts"));
                body.unwrap_or_default()
            });
        if let Some(body) = q.filter(|b| b.contains("\"phase\":\"Converged\"")) {
            break body;
        }
        if Instant::now() > deadline {
            let _ = prometheus.kill();
            panic!(
                "Prometheus did not scrape cim: {}",
                std::fs::read_to_string(prom_dir.join("log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    assert!(answer.contains("\"value\":["), "{answer}");
}

#[test]
fn the_shipped_alerting_rules_check() {
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contrib/prometheus/cim-alerts.yml");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("promtool (scripts/setup installs prometheus)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let dashboard = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contrib/grafana/cim-dashboard.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dashboard).unwrap()).unwrap();
    assert!(json["panels"].as_array().is_some_and(|p| !p.is_empty()));
}

/// A local HTTP receiver of notifications: every body it was sent; it
/// answers 503 while `down` holds.
struct Receiver {
    url: String,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (b, d) = (bodies.clone(), down.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if std::io::BufRead::read_line(&mut reader, &mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                let status = if d.load(std::sync::atomic::Ordering::SeqCst) {
                    "503 Service Unavailable"
                } else {
                    b.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&body).to_string());
                    "200 OK"
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
            }
        });
        Receiver { url, bodies, down }
    }

    fn reasons(&self) -> Vec<String> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .filter_map(|b| serde_json::from_str::<serde_json::Value>(b).ok())
            .map(|v| v["reason"].as_str().unwrap_or("").to_string())
            .collect()
    }
}

#[test]
fn notifications_arrive_once_survive_restarts_and_report_failures() {
    let (fleet, dir) = fleet(2);
    let receiver = Receiver::start();
    let mut cim = Cim::start(
        &fleet,
        &dir.path().join("state"),
        &["--notify", &receiver.url],
    );
    cim.wait_converged(&["web-1", "web-2"], None);
    cim.wait_until(
        "the completed rollout notified",
        Duration::from_secs(30),
        |_| receiver.reasons().contains(&"RolloutCompleted".to_string()),
    );
    // A failed activation: the failure and the rollback are notified.
    fleet
        .set_host_config("web-1", "{ version = 2; activationExitCode = 3; }")
        .unwrap();
    fleet.commit("web-1 breaks").unwrap();
    cim.wait_until("the rollback notified", Duration::from_secs(60), |_| {
        receiver.reasons().contains(&"RolledBack".to_string())
    });
    assert!(receiver.reasons().contains(&"ActivationFailed".to_string()));
    assert!(
        !receiver.reasons().iter().any(|r| r == "CopyStarted"),
        "Normal events are not sent"
    );

    // A restart repeats nothing.
    let before = receiver.reasons().len();
    cim.restart();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(receiver.reasons().len(), before, "{:?}", receiver.reasons());

    // The receiver refuses: reported once, and nothing is lost.
    receiver
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    fleet.set_host_config("web-1", "{ version = 3; }").unwrap();
    let fixed = fleet.commit("web-1 fixed").unwrap();
    cim.wait_converged(&["web-1", "web-2"], Some(&fixed));
    cim.wait_until("the refusal reported", Duration::from_secs(30), |_| {
        cim.events()
            .iter()
            .any(|e| e["reason"] == "NotificationFailed")
    });
    receiver
        .down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    cim.wait_until(
        "the held notification delivered",
        Duration::from_secs(30),
        |_| {
            receiver
                .reasons()
                .iter()
                .filter(|r| *r == "RolloutCompleted")
                .count()
                == 2
        },
    );
}

#[test]
fn reconcile_wait_says_how_it_ended_in_its_exit_code() {
    let (fleet, dir) = fleet(2);
    let cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_converged(&["web-1", "web-2"], None);
    let out = cim.cli(&["reconcile", "--all", "--wait", "--timeout", "60s"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("web-1: Converged — already running"),
        "{stdout}"
    );
    assert!(stdout.contains("2 of 2 hosts converged in"), "{stdout}");

    // A host whose activation fails: exit 1, and the summary names it.
    fleet
        .set_host_config("web-1", "{ version = 2; activationExitCode = 3; }")
        .unwrap();
    fleet.commit("web-1 breaks").unwrap();
    cim.wait_until("web-1 failed", Duration::from_secs(60), |_| {
        !cim.events_of("web-1", "ActivationFailed").is_empty()
    });
    let out = cim.cli(&["reconcile", "web-1", "--wait", "--timeout", "60s"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("failed: web-1 (ActivationFailed)"),
        "{stdout}"
    );

    // One that takes longer than --timeout: exit 2.
    fleet
        .set_host_config("web-2", "{ version = 2; activationDelay = 5; }")
        .unwrap();
    fleet.commit("web-2 is slow").unwrap();
    cim.wait_until(
        "web-2 activating version 2",
        Duration::from_secs(60),
        |_| cim.events_of("web-2", "ActivationStarted").len() == 2,
    );
    let out = cim.cli(&["reconcile", "web-2", "--wait", "--timeout", "1s"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains("still waiting: web-2"), "{stdout}");
}

#[test]
fn status_watch_redraws_when_the_fleet_changes() {
    let (fleet, dir) = fleet(1);
    let cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_converged(&["web-1"], None);
    let mut watch = Command::new(cim_sandbox::harness::cim_bin())
        .args(["status", "--watch"])
        .env("CIM_API", &cim.api)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            if tx.send(line.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    fleet.set_host_config("web-1", "{ version = 2; }").unwrap();
    let revision = fleet.commit("version 2").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut redraws = 0;
    let mut seen = false;
    while Instant::now() < deadline && !seen {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(1)) else {
            continue;
        };
        redraws += usize::from(line == "---");
        seen = redraws > 0 && line.contains(&revision[..12]) && line.contains("Converged");
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(seen, "no redraw showed web-1 converged at {revision}");
}

#[test]
fn label_selectors_narrow_status_events_and_reconcile() {
    let (fleet, dir) = fleet(2);
    let db = cim_sandbox::host_spec("web-2", &fleet.host("web-2").address, "")
        .replace("{role: web}", "{role: db}");
    let specs = format!(
        "{}---\n{db}",
        cim_sandbox::host_spec("web-1", &fleet.host("web-1").address, "")
    );
    fleet.write("specs/fleet.yaml", &specs).unwrap();
    let revision = fleet.commit("web-2 is the database").unwrap();
    let cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_converged(&["web-1", "web-2"], Some(&revision));
    let json = |args: &[&str]| -> serde_json::Value {
        let out = cim.cli(args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let status = json(&["status", "-l", "role=db", "-o", "json"]);
    let names: Vec<&str> = status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web-2"]);
    let events = json(&["events", "-l", "role=db", "--all", "-o", "json"]);
    let events = events.as_array().unwrap();
    assert!(!events.is_empty());
    assert!(events.iter().all(|e| e["host"] == "web-2"), "{events:?}");
    let out = cim.cli(&["reconcile", "-l", "role=db"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("reconciling 1 hosts"));
    cim.wait_until("web-2's reconcile handled", Duration::from_secs(30), |_| {
        !cim.events_of("web-2", "ReconcileRequested").is_empty()
    });
    assert!(cim.events_of("web-1", "ReconcileRequested").is_empty());
}
