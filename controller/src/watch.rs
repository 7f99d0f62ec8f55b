//! The first runtime stage: notice new revisions of the watched branch.
//!
//! A local repository is watched with file-system notifications on its refs
//! (a commit is noticed within a fraction of a second); every repository is
//! also polled every `--poll-interval`. Each trigger fetches into the mirror;
//! a new head has its specs read and parsed, is pinned for nix, and is sent
//! on as a [`Found`]. Fetch failures are reported and retried with backoff,
//! and never stop the controller from reconciling what it already knows.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use notify_debouncer_full::notify::RecursiveMode;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::driver::DriverConfig;
use crate::git::Mirror;
use crate::spec::{parse_fleet, FleetSpec, SpecErrors};

/// What the watcher tells the controller.
#[derive(Debug)]
pub enum Found {
    Revision {
        revision: String,
        specs: Result<FleetSpec, SpecErrors>,
    },
    FetchFailed {
        message: String,
    },
}

#[derive(Debug, Clone)]
pub struct WatchConfig {
    pub branch: String,
    pub poll_interval: Duration,
}

/// Starts the watcher. `trigger` asks for an immediate fetch (used by
/// `cim reconcile`). The first fetch happens at once.
pub fn spawn(
    mirror: Mirror,
    local_source: Option<PathBuf>,
    cfg: WatchConfig,
    driver: Arc<DriverConfig>,
    tx: mpsc::Sender<Found>,
    trigger: Arc<Notify>,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (fs_tx, mut fs_rx) = mpsc::channel::<()>(1);
        // Kept alive for the life of the task; dropping it stops watching.
        let _debouncer = local_source.as_deref().and_then(|p| watch_refs(p, fs_tx));
        let mirror_path = mirror.path().to_path_buf();
        let mirror = Arc::new(Mutex::new(mirror));
        let mut last_sent: Option<String> = None;
        let mut retry: Option<backon::ExponentialBackoff> = None;
        let mut wait = Duration::ZERO;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
                () = trigger.notified() => {}
                Some(()) = fs_rx.recv() => {}
            }
            let m = Arc::clone(&mirror);
            let branch = cfg.branch.clone();
            let known = last_sent.clone();
            let result = tokio::task::spawn_blocking(move || check(&m, &branch, known.as_deref()))
                .await
                .unwrap_or_else(|e| Err(format!("the fetch task failed: {e}")));
            wait = cfg.poll_interval;
            let found = match result {
                Ok(None) => {
                    retry = None;
                    continue;
                }
                Ok(Some((revision, specs))) => {
                    retry = None;
                    last_sent = Some(revision.clone());
                    let flake = crate::git::flake_ref(&mirror_path, &revision);
                    let specs = match specs {
                        Ok(fleet) => against_flake(&driver, &flake, fleet).await,
                        Err(e) => Err(e),
                    };
                    Found::Revision { revision, specs }
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

/// Checks the hosts' configurations against the flake. If the flake cannot
/// even be listed, the specs pass here: building will report that error for
/// every host, with nix's message.
async fn against_flake(
    driver: &DriverConfig,
    flake: &str,
    fleet: FleetSpec,
) -> Result<FleetSpec, SpecErrors> {
    match crate::driver::configurations(driver, flake).await {
        Ok(names) => crate::spec::check_configurations(&fleet, &names).map(|()| fleet),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the flake's nixosConfigurations; leaving it to the build");
            Ok(fleet)
        }
    }
}

/// A new head and the result of validating its specs.
type NewHead = (String, Result<FleetSpec, SpecErrors>);

/// Fetches and, if the head moved since `known`, reads its specs and pins it.
fn check(
    mirror: &Mutex<Mirror>,
    branch: &str,
    known: Option<&str>,
) -> Result<Option<NewHead>, String> {
    let mirror = mirror
        .lock()
        .map_err(|_| "the mirror lock is poisoned".to_string())?;
    let head = mirror
        .fetch(branch)
        .map_err(|e| crate::reconcile::error_chain(&e))?;
    if known == Some(head.as_str()) {
        return Ok(None);
    }
    let files = mirror
        .read_specs(&head)
        .map_err(|e| crate::reconcile::error_chain(&e))?;
    let specs = parse_fleet(&files);
    if specs.is_ok() {
        mirror
            .pin(&head)
            .map_err(|e| crate::reconcile::error_chain(&e))?;
    }
    Ok(Some((head, specs)))
}

/// Watches a local repository's refs. The git directory itself is watched
/// non-recursively (it holds `packed-refs` and `HEAD`) and `refs/`
/// recursively. Returns `None` (polling still works) if watching fails.
fn watch_refs(
    repo: &Path,
    tx: mpsc::Sender<()>,
) -> Option<
    notify_debouncer_full::Debouncer<
        notify_debouncer_full::notify::RecommendedWatcher,
        notify_debouncer_full::RecommendedCache,
    >,
> {
    let git_dir = if repo.join(".git").is_dir() {
        repo.join(".git")
    } else {
        repo.to_path_buf()
    };
    let handler = move |res: notify_debouncer_full::DebounceEventResult| {
        if res.is_ok() {
            // A full channel already holds a pending trigger; that is enough.
            let _ = tx.try_send(());
        }
    };
    let mut debouncer =
        match notify_debouncer_full::new_debouncer(Duration::from_millis(100), None, handler) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the repository; polling only");
                return None;
            }
        };
    for (path, mode) in [
        (git_dir.clone(), RecursiveMode::NonRecursive),
        (git_dir.join("refs"), RecursiveMode::Recursive),
    ] {
        if let Err(e) = debouncer.watch(&path, mode) {
            tracing::warn!(path = %path.display(), error = %e, "cannot watch; polling only");
        }
    }
    Some(debouncer)
}
