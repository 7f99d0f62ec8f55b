//! The first runtime stage: notice new revisions of the watched branch.
//!
//! A local repository is watched with file-system notifications on its
//! branch refs, and its branch head is read in-process: only a head that
//! really moved is fetched, so a watched repository at rest costs no process
//! and no fetch (the fetch itself reads the repository, and reacting to that
//! would loop). A notification is acted on at once; notifications arriving
//! while a check runs collapse into one more check. A remote repository is
//! fetched every `--poll-interval`. A new head is announced as
//! [`Found::Head`] as soon as it is known, then its specs are read, parsed
//! and pinned for nix and sent as [`Found::Revision`]. Fetch failures are
//! reported and retried with backoff, and never stop the controller from
//! reconciling what it already knows.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::git::{LocalSource, Mirror};
use crate::spec::{parse_fleet, FleetSpec, SpecErrors};
use crate::trust::{AllowedSigners, Verdict};
use crate::types::Revision;

/// What the watcher tells the controller.
#[derive(Debug)]
pub enum Found {
    /// The branch moved to `revision`; its specs follow in a `Revision`.
    Head {
        revision: Revision,
    },
    Revision {
        revision: Revision,
        /// Boxed: a fleet's policy is large next to the other messages.
        specs: Box<Result<FleetSpec, SpecErrors>>,
        /// The verdict on the head commit's signature.
        trust: Verdict,
        /// The head this one replaced without descending from it.
        rewritten_from: Option<Revision>,
    },
    FetchFailed {
        message: String,
    },
}

#[derive(Debug, Clone)]
pub struct WatchConfig {
    pub branch: String,
    pub poll_interval: Duration,
    /// `--fetch-timeout`: a fetch still running after this is interrupted
    /// and reported as failed; the watcher carries on.
    pub fetch_timeout: Duration,
    /// `--allowed-signers`: judge every new head's signature.
    pub signers: Option<Arc<AllowedSigners>>,
    /// The revision deployed when the controller started: a first head
    /// that does not descend from it is a rewritten history.
    pub deployed: Option<Revision>,
}

/// Why the watcher looks at the branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// The first look, a poll, or a retry after a failed fetch.
    Timer,
    /// A ref of the local repository changed.
    RefChanged,
    /// `cim reconcile --all`: fetch even if the local head looks unchanged.
    Requested,
}

/// Starts the watcher. `trigger` asks for an immediate fetch (used by
/// `cim reconcile`). The first fetch happens at once.
pub fn spawn(
    mirror: Mirror,
    local_source: Option<PathBuf>,
    cfg: WatchConfig,
    tx: mpsc::Sender<Found>,
    trigger: Arc<Notify>,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (fs_tx, mut fs_rx) = mpsc::channel::<()>(1);
        let local = local_source.as_deref().and_then(|p| match LocalSource::open(p) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the local repository; fetching on every poll");
                None
            }
        });
        // Kept alive for the life of the task; dropping it stops watching.
        let _watcher = local
            .as_ref()
            .and_then(|l| watch_refs(l.git_dir(), &cfg.branch, fs_tx));
        let mirror = Arc::new(Mutex::new(mirror));
        let mut last_sent: Option<Revision> = None;
        let mut retry: Option<backon::ExponentialBackoff> = None;
        let mut wait = Duration::ZERO;
        loop {
            let why = tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => Trigger::Timer,
                () = trigger.notified() => Trigger::Requested,
                Some(()) = fs_rx.recv() => Trigger::RefChanged,
            };
            if why != Trigger::RefChanged {
                wait = cfg.poll_interval;
            }
            if let (Some(local), false) = (&local, why == Trigger::Requested) {
                // A head that did not move needs no fetch (and no process).
                match local.head(&cfg.branch) {
                    Ok(Some(head)) if last_sent.as_deref() == Some(head.as_str()) => continue,
                    Ok(Some(head)) => {
                        if tx.send(Found::Head { revision: head }).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) | Err(_) => {}
                }
            }
            let m = Arc::clone(&mirror);
            let branch = cfg.branch.clone();
            let known = last_sent.clone();
            let previous = last_sent.clone().or_else(|| cfg.deployed.clone());
            let signers = cfg.signers.clone();
            let interrupt = Arc::new(AtomicBool::new(false));
            let stop = Arc::clone(&interrupt);
            let fetch = tokio::task::spawn_blocking(move || {
                check(
                    &m,
                    &branch,
                    known.as_deref(),
                    previous.as_ref(),
                    signers.as_deref(),
                    &stop,
                )
            });
            let result = match tokio::time::timeout(cfg.fetch_timeout, fetch).await {
                Ok(joined) => joined.unwrap_or_else(|e| Err(format!("the fetch task failed: {e}"))),
                Err(_) => {
                    // gix checks the flag between reads; the ssh options
                    // end a dead connection's reads.
                    interrupt.store(true, Ordering::Relaxed);
                    Err(format!(
                        "fetching branch `{}` did not finish within {}s (--fetch-timeout)",
                        cfg.branch,
                        cfg.fetch_timeout.as_secs()
                    ))
                }
            };
            let found = match result {
                Ok(None) => {
                    retry = None;
                    continue;
                }
                Ok(Some(new)) => {
                    retry = None;
                    last_sent = Some(new.revision.clone());
                    tracing::debug!(revision = %new.revision, "new head fetched");
                    Found::Revision {
                        revision: new.revision,
                        specs: Box::new(new.specs),
                        trust: new.trust,
                        rewritten_from: new.rewritten_from,
                    }
                }
                Err(message) => {
                    let backoff = retry.get_or_insert_with(|| {
                        ExponentialBuilder::default()
                            .with_min_delay(Duration::from_secs(1))
                            .with_max_delay(cfg.poll_interval.max(Duration::from_secs(1)))
                            .without_max_times()
                            .build()
                    });
                    wait = backoff.next().unwrap_or(cfg.poll_interval);
                    Found::FetchFailed { message }
                }
            };
            if tx.send(found).await.is_err() {
                return;
            }
        }
    })
}

/// A new head: its specs, the verdict on its signature, and the head it
/// replaced without descending from it (a rewritten history).
struct NewHead {
    revision: Revision,
    specs: Result<FleetSpec, SpecErrors>,
    trust: Verdict,
    rewritten_from: Option<Revision>,
}

/// Fetches and, if the head moved since `known`, reads its specs, judges
/// its signature and whether it descends from `previous`, and pins it.
fn check(
    mirror: &Mutex<Mirror>,
    branch: &str,
    known: Option<&str>,
    previous: Option<&Revision>,
    signers: Option<&AllowedSigners>,
    interrupt: &AtomicBool,
) -> Result<Option<NewHead>, String> {
    let mirror = match mirror.try_lock() {
        Ok(m) => m,
        Err(std::sync::TryLockError::WouldBlock) => {
            return Err("a fetch that timed out is still winding down".to_string())
        }
        Err(std::sync::TryLockError::Poisoned(_)) => {
            return Err("the mirror lock is poisoned".to_string())
        }
    };
    let head = mirror
        .fetch(branch, interrupt)
        .map_err(|e| crate::error::error_chain(&e))?;
    if known == Some(head.as_str()) {
        return Ok(None);
    }
    let files = mirror
        .read_specs(&head)
        .map_err(|e| crate::error::error_chain(&e))?;
    let specs = parse_fleet(&files);
    let trust = match signers {
        None => Verdict::NotChecked,
        Some(signers) => {
            let (signature, signed) = mirror
                .signature(&head)
                .map_err(|e| crate::error::error_chain(&e))?;
            signers.verdict(signature.as_deref(), &signed)
        }
    };
    let rewritten_from = match previous {
        Some(previous) => {
            let forward = mirror
                .descends_from(&head, previous)
                .map_err(|e| crate::error::error_chain(&e))?;
            (!forward).then(|| previous.clone())
        }
        None => None,
    };
    if specs.is_ok() {
        mirror
            .pin(&head)
            .map_err(|e| crate::error::error_chain(&e))?;
    }
    Ok(Some(NewHead {
        revision: head,
        specs,
        trust,
        rewritten_from,
    }))
}

/// Whether a notification can mean that `branch` moved: a change (not a
/// read) of the branch's loose ref or of `packed-refs`. Lock files are
/// skipped: git renames `refs/heads/B.lock` onto `refs/heads/B`, and the
/// rename is what counts.
fn moves_branch(event: &notify::Event, git_dir: &Path, branch: &str) -> bool {
    let changes = matches!(
        event.kind,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Any
    ) && !matches!(
        event.kind,
        EventKind::Modify(notify::event::ModifyKind::Metadata(_))
    );
    if !changes {
        return false;
    }
    let loose = git_dir.join("refs/heads").join(branch);
    let packed = git_dir.join("packed-refs");
    event.paths.iter().any(|p| *p == loose || *p == packed)
}

/// Watches a local repository's refs: the git directory itself
/// non-recursively (it holds `packed-refs`) and `refs/heads` recursively
/// (branch names may contain `/`). Returns `None` (polling still works) if
/// watching fails.
fn watch_refs(
    git_dir: &Path,
    branch: &str,
    tx: mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    let dir = git_dir.to_path_buf();
    let branch_name = branch.to_string();
    let handler = move |res: notify::Result<notify::Event>| {
        if res.is_ok_and(|ev| moves_branch(&ev, &dir, &branch_name)) {
            // A full channel already holds a pending check; that is enough.
            let _ = tx.try_send(());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the repository; polling only");
            return None;
        }
    };
    for (path, mode) in [
        (git_dir.to_path_buf(), RecursiveMode::NonRecursive),
        (git_dir.join("refs/heads"), RecursiveMode::Recursive),
    ] {
        if let Err(e) = watcher.watch(&path, mode) {
            tracing::warn!(path = %path.display(), error = %e, "cannot watch; polling only");
        }
    }
    Some(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, CreateKind, ModifyKind, RenameMode};

    fn event(kind: EventKind, path: &str) -> notify::Event {
        notify::Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn only_changes_of_the_branch_ref_count() {
        let dir = Path::new("/r/.git");
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert!(moves_branch(
            &event(rename, "/r/.git/refs/heads/main"),
            dir,
            "main"
        ));
        assert!(moves_branch(
            &event(EventKind::Create(CreateKind::File), "/r/.git/packed-refs"),
            dir,
            "main"
        ));
        assert!(moves_branch(
            &event(rename, "/r/.git/refs/heads/team/prod"),
            dir,
            "team/prod"
        ));
        // The fetch reading the repository, git's lock files, other
        // branches and the index are not the branch moving.
        for (kind, path) in [
            (
                EventKind::Access(AccessKind::Any),
                "/r/.git/refs/heads/main",
            ),
            (rename, "/r/.git/refs/heads/main.lock"),
            (rename, "/r/.git/refs/heads/other"),
            (EventKind::Modify(ModifyKind::Any), "/r/.git/index"),
            (
                EventKind::Modify(ModifyKind::Metadata(notify::event::MetadataKind::Any)),
                "/r/.git/refs/heads/main",
            ),
        ] {
            assert!(
                !moves_branch(&event(kind, path), dir, "main"),
                "{kind:?} {path}"
            );
        }
    }
}
