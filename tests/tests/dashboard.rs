//! The dashboard in a real browser: headless Chromium (Debian's `chromium`
//! and `chromium-driver`, driven over WebDriver with fantoccini) loads the
//! page against a sandbox fleet and sees a host change phase live after a
//! commit, without a reload; a screenshot is kept as a test artifact
//! (`target/test-artifacts/dashboard.png`, and `dashboard-history.png`
//! after a host was clicked).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cim_sandbox::harness::{fleet_and_state as fleet, Cim};
use fantoccini::{ClientBuilder, Locator};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// chromedriver, killed when dropped.
struct Driver(std::process::Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_dashboard_shows_a_host_change_phase_live() {
    let (fleet, dir) = fleet(2);
    fleet.set_host_config("web-1", "{ version = 1; }").unwrap();
    let cim = Cim::start(&fleet, &dir.path().join("state"), &[]);
    cim.wait_converged(&["web-1", "web-2"], None);

    let port = free_port();
    let _driver = Driver(
        Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (scripts/setup installs chromium-driver)"),
    );
    let profile = dir.path().join("chromium");
    // fantoccini's TLS stack and cim's both bring rustls providers; the
    // WebDriver connection is plain HTTP, any provider will do.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".to_string(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1280,800",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = loop {
            match ClientBuilder::rustls()
                .expect("rustls")
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("cannot start chromium through chromedriver: {e}"),
            }
        };
        client.goto(&cim.api).await.unwrap();
        let row = |host: &str| format!("tr[data-host='{host}']");
        let phase_of = |host: &'static str| {
            let client = client.clone();
            async move {
                let cell = client
                    .find(Locator::Css(&format!("tr[data-host='{host}']")))
                    .await
                    .ok()?;
                cell.attr("data-phase").await.ok().flatten()
            }
        };
        client
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css(&row("web-1")))
            .await
            .expect("the dashboard lists web-1");
        assert_eq!(phase_of("web-1").await.as_deref(), Some("Converged"));

        // A change that takes a moment to activate: the row goes through
        // Activating (or another working phase) and back to Converged, with
        // the page never reloaded.
        fleet
            .set_host_config("web-1", "{ version = 2; activationDelay = 2; }")
            .unwrap();
        let revision = fleet.commit("web-1: version 2").unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut phases = Vec::new();
        loop {
            let phase = phase_of("web-1").await.unwrap_or_default();
            if phases.last() != Some(&phase) {
                phases.push(phase.clone());
            }
            let revision_shown = client
                .find(Locator::Id("revision"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap_or_default();
            if phase == "Converged" && revision.starts_with(&revision_shown) && phases.len() > 1 {
                break;
            }
            if Instant::now() > deadline {
                let state = client
                    .execute(
                        "return [document.getElementById('live').textContent, document.getElementById('events').children.length, document.getElementById('notice').textContent, String(window.__error || '')]",
                        vec![],
                    )
                    .await
                    .ok();
                panic!("web-1 did not change phase live: {phases:?}; page: {state:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            phases
                .iter()
                .any(|p| ["Building", "Copying", "Activating", "Verifying"].contains(&p.as_str())),
            "no working phase seen: {phases:?}"
        );
        let artifacts =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
        std::fs::create_dir_all(&artifacts).unwrap();
        let png = client.screenshot().await.unwrap();
        assert!(png.starts_with(b"\x89PNG"));
        std::fs::write(artifacts.join("dashboard.png"), &png).unwrap();
        // Clicking a host shows its history.
        client
            .find(Locator::Css(&row("web-1")))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::XPath(
                "//*[@id='events-title'][contains(., 'History of web-1')]",
            ))
            .await
            .expect("the host's history");
        let png = client.screenshot().await.unwrap();
        std::fs::write(artifacts.join("dashboard-history.png"), &png).unwrap();
        client.close().await.unwrap();
    });
}
