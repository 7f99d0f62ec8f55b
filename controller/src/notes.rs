//! Git as the record (`--write-notes`, `--push-notes`): when a revision's
//! rollout completes or halts, a git note on that commit says where it went
//! — per host: its phase, the system it runs and since when — under
//! `refs/notes/cim` in the mirror, and, with `--push-notes`, pushed to the
//! watched repository, so that `git log --notes=cim` shows it.
//!
//! Like the notifier, the writer reads the committed log after its own
//! cursor on a task of its own: it never holds reconciliation up, and it
//! never touches a branch.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::driver::DriverConfig;
use crate::event::{Event, Reason};
use crate::status::FleetStatus;
use crate::store::{EventQuery, Store};

/// Where notes go.
#[derive(Debug, Clone)]
pub struct NotesConfig {
    pub state_dir: PathBuf,
    /// The mirror the notes are written in.
    pub mirror: PathBuf,
    /// `--push-notes`: the repository they are pushed to.
    pub push_to: Option<String>,
}

const CURSOR: &str = "notes";
const NOTES_REF: &str = "refs/notes/cim";

/// The note of `revision`: one line per host that has an outcome at it.
pub fn note(status: &FleetStatus, revision: &str, ev: &Event) -> String {
    let mut text = format!("cim: {} — {}\n", ev.reason, ev.message);
    for h in status.hosts.values() {
        if h.phase_revision.as_deref() != Some(revision)
            && h.observed_revision.as_deref() != Some(revision)
        {
            continue;
        }
        let when = h
            .last_transition_time
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        text.push_str(&format!(
            "{}: {} {} (since {when})\n",
            h.name,
            h.phase,
            h.current_system.as_deref().unwrap_or("-"),
        ));
    }
    text
}

/// Starts the writer; it ends with `cancel`.
pub fn spawn(
    cfg: NotesConfig,
    driver: Arc<DriverConfig>,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Err(e) = write_pending(&cfg, &driver).await {
                tracing::warn!(error = %e, "cannot write git notes; trying again");
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    })
}

/// Writes the notes of the rollouts that ended since the cursor.
async fn write_pending(cfg: &NotesConfig, driver: &DriverConfig) -> Result<(), String> {
    let err = |e: crate::store::StoreError| crate::error::error_chain(&e);
    let mut store = Store::open(&cfg.state_dir).map_err(err)?;
    let since = store.cursor(CURSOR).map_err(err)?;
    let events = store
        .events(&EventQuery {
            since: Some(since),
            limit: Some(1000),
            ..EventQuery::default()
        })
        .map_err(err)?;
    for ev in &events {
        let ended = matches!(ev.reason, Reason::RolloutCompleted | Reason::RolloutHalted);
        if let (true, Some(revision)) = (ended, &ev.revision) {
            let status = store.load_status().map_err(err)?;
            let text = note(&status, revision, ev);
            let add = [
                "notes", "--ref", NOTES_REF, "add", "-f", "-m", &text, revision,
            ];
            crate::driver::git(driver, &cfg.mirror, &add)
                .await
                .map_err(|e| crate::error::error_chain(&e))?;
            if let Some(remote) = &cfg.push_to {
                let refspec = format!("+{NOTES_REF}:{NOTES_REF}");
                let push = ["push", "--quiet", remote.as_str(), &refspec];
                crate::driver::git(driver, &cfg.mirror, &push)
                    .await
                    .map_err(|e| crate::error::error_chain(&e))?;
            }
        }
        store.set_cursor(CURSOR, ev.seq).map_err(err)?;
    }
    Ok(())
}

/// Where a fresh writer starts: after everything already in the store.
pub fn start_at_end(state_dir: &std::path::Path) -> Result<(), crate::store::StoreError> {
    let mut store = Store::open(state_dir)?;
    if store.cursor(CURSOR)? == 0 {
        let last = store.last_seq()?;
        store.set_cursor(CURSOR, last)?;
    }
    Ok(())
}
