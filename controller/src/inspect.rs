//! The commands that look without changing anything: `cim status` (once,
//! or redrawn on every change) and `cim plan`.

use std::time::Duration;

use cim::store::EventQuery;
use cim::{render, status::HostStatus};

use crate::{emit, print_json, source, Exit, Output, SourceArgs};

pub fn status(host: Option<String>, selector: Option<&str>, args: &SourceArgs) -> Exit {
    let src = source(args)?;
    let now = time::OffsetDateTime::now_utc();
    match host {
        Some(name) => {
            let h = src.host(&name)?;
            match args.output {
                Output::Json => print_json(&h)?,
                Output::Table => {
                    emit(&render::host(&h, now));
                    if let Some(revision) = waiting(&src, &h) {
                        emit(&format!(
                            "Plan of revision {}:",
                            cim::event::short(&revision)
                        ));
                        let plan = src.plan(Some(&revision), Some(&name), false);
                        match plan.as_ref().map(|p| p.hosts.first()) {
                            Ok(Some(plan)) => {
                                for line in render::host_plan(plan).iter().skip(1) {
                                    emit(line);
                                }
                            }
                            Ok(None) => {}
                            Err(e) => emit(&format!("  cannot plan: {e}")),
                        }
                    }
                }
            }
        }
        None => {
            let mut s = src.status()?;
            if let Some(selector) = selector {
                let names: std::collections::BTreeSet<String> =
                    src.select(selector)?.into_iter().collect();
                s.hosts.retain(|h| names.contains(&h.name));
            }
            match args.output {
                Output::Json => print_json(&s)?,
                Output::Table => emit(&render::status(&s, now)),
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// `cim status --watch`: the status again after every burst of events
/// (on a terminal the screen is cleared first, like `watch`).
pub fn watch_status(host: Option<String>, selector: Option<&str>, args: &SourceArgs) -> Exit {
    use std::io::IsTerminal;
    let follow = source(args)?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let since = follow.newest_seq().unwrap_or(0);
        let _ = follow.follow(
            &EventQuery {
                since: Some(since),
                ..EventQuery::default()
            },
            |_| tx.send(()).is_ok(),
        );
    });
    let terminal = std::io::stdout().is_terminal();
    loop {
        if terminal {
            print!("\x1b[2J\x1b[H");
        }
        status(host.clone(), selector, args)?;
        // One redraw per burst: wait for an event, then let the rest of
        // the burst arrive.
        if rx.recv().is_err() {
            return Ok(std::process::ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(200));
        while rx.try_recv().is_ok() {}
        if !terminal {
            emit("---");
        }
    }
}

/// The revision `h` waits for, if it waits for one (behind an earlier
/// wave, an approval, a window, or still to be reached): a plan says what
/// it will change.
fn waiting(src: &cim::client::Source, h: &HostStatus) -> Option<String> {
    if !matches!(src, cim::client::Source::Api(_)) {
        return None;
    }
    let fleet = src.fleet_status().ok()?.revision?;
    let behind = h.observed_revision.as_deref() != Some(fleet.as_str())
        || h.current_system.is_none()
        || h.current_system != h.desired_system;
    (behind && h.phase != cim::event::Phase::Suspended).then_some(fleet)
}

/// `cim plan`.
pub fn plan(
    revision: Option<String>,
    host: Option<String>,
    activation: bool,
    args: &SourceArgs,
) -> Exit {
    let plan = source(args)?.plan(revision.as_deref(), host.as_deref(), activation)?;
    match args.output {
        Output::Json => print_json(&plan)?,
        Output::Table => emit(&render::plan(&plan)),
    }
    let failed = plan.hosts.iter().any(|h| h.error.is_some());
    Ok(if failed {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    })
}
