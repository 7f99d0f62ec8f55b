//! Health checks after activation: commands run on the host over SSH and
//! HTTP GETs made from the controller, each retried. A host counts as
//! converged only once they all pass; a failing check rolls it back like a
//! failed activation.

use std::time::Duration;

use tokio::sync::mpsc;

use super::{roll_back, Outcome, Previous, Report, Step, WorkItem};
use crate::driver::tail;
use crate::host::Host;
use crate::spec::{Action, HealthCheck, Probe};

/// Runs the host's checks after a successful activation; any other outcome
/// passes through unchanged.
pub(super) async fn after_activation<H: Host>(
    session: &H,
    item: &WorkItem,
    previous: Previous<'_>,
    activated: Outcome,
    tx: &mpsc::Sender<Report>,
) -> Outcome {
    let checks = &item.host.health_checks;
    let activated_now = matches!(activated, Outcome::Converged { changed: true, .. });
    if !activated_now || checks.is_empty() || item.host.action == Action::DryActivate {
        return activated;
    }
    super::report_step(tx, &item.host.name, &item.revision, Step::Verifying).await;
    for check in checks {
        if let Err(why) = run(session, check).await {
            return Outcome::HealthCheckFailed {
                message: format!("health check `{}` failed: {why}", check.name),
                rollback: roll_back(session, item, previous).await,
            };
        }
    }
    activated
}

/// One check, with its retries: `Ok` as soon as an attempt passes.
async fn run<H: Host>(session: &H, check: &HealthCheck) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 1..=check.retries {
        let result = match &check.probe {
            Probe::Command(argv) => command(session, argv, check.timeout).await,
            Probe::Http {
                url,
                expected_status,
            } => http(url, *expected_status, check.timeout).await,
        };
        match result {
            Ok(()) => return Ok(()),
            Err(why) => last = why,
        }
        if attempt < check.retries {
            tokio::time::sleep(check.interval).await;
        }
    }
    Err(format!("{last} (after {} attempts)", check.retries))
}

async fn command<H: Host>(session: &H, argv: &[String], timeout: Duration) -> Result<(), String> {
    let out = session
        .run_check(argv, timeout)
        .await
        .map_err(|e| crate::error::error_chain(&e))?;
    if out.status == Some(0) {
        return Ok(());
    }
    let mut output = out.stdout.clone();
    output.push_str(&out.stderr);
    Err(format!(
        "`{}` exited with {}: {}",
        argv.join(" "),
        out.status
            .map_or_else(|| "a signal".to_string(), |c| c.to_string()),
        tail(&output, 5)
    ))
}

/// An HTTP GET from the controller. ureq blocks, so it runs on a blocking
/// thread, bounded by `timeout`.
pub(crate) async fn http(url: &str, expected: u16, timeout: Duration) -> Result<(), String> {
    let target = url.to_string();
    let status = tokio::task::spawn_blocking(move || {
        // A redirect is an answer like any other: following it could make
        // the controller fetch whatever the host points it at.
        let agent = ureq::AgentBuilder::new()
            .timeout(timeout)
            .redirects(0)
            .build();
        match agent.get(&target).call() {
            Ok(resp) => Ok(resp.status()),
            Err(ureq::Error::Status(code, _)) => Ok(code),
            Err(ureq::Error::Transport(t)) => Err(t.to_string()),
        }
    })
    .await
    .map_err(|e| e.to_string())??;
    if status == expected {
        Ok(())
    } else {
        Err(format!("GET {url} answered {status}, expected {expected}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A one-shot HTTP server on loopback answering `status`.
    fn serve(status: u16) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut conn, _)) = listener.accept() {
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf);
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
            }
        });
        format!("http://{addr}/health")
    }

    #[tokio::test]
    async fn http_checks_compare_the_status() {
        assert_eq!(http(&serve(200), 200, Duration::from_secs(5)).await, Ok(()));
        let err = http(&serve(503), 200, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.contains("answered 503, expected 200"), "{err}");
        let err = http(&serve(302), 200, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.contains("answered 302"), "not followed: {err}");
        let err = http("http://127.0.0.1:9/", 200, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(!err.is_empty());
    }
}
