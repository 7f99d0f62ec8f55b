//! `cim run`: the controller's wiring — state and socket directories,
//! access rules, the store, the mirror, the controller task, the watcher,
//! the notifier and the notes writer, the API server — and its shutdown on
//! a signal. The rest of the CLI is in `main.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use cim::controller::{Controller, ControllerConfig};
use cim::driver::{prepare_control_dir, DriverConfig};
use cim::git::Mirror;
use cim::store::Store;
use cim::{api, spec, watch};

use crate::{init_tracing, read_token, Exit, RunArgs};

/// Control sockets must fit in a Unix socket path (about 100 bytes); a deep
/// state directory gets them under the temporary directory instead.
/// The directory for ssh control sockets: `STATE/ssh`, or, when that path
/// is too long for a socket, a new directory of a random name under the
/// temporary directory (created 0700 in one step, so nothing another user
/// planted there can be taken for it), removed on exit.
fn control_dir(state_dir: &Path) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    let preferred = state_dir.join("ssh");
    if preferred.as_os_str().len() < 60 {
        prepare_control_dir(&preferred)
            .with_context(|| format!("cannot create {}", preferred.display()))?;
        return Ok((preferred, None));
    }
    let dir = tempfile::Builder::new()
        .prefix("cim-ssh-")
        .tempdir()
        .context("cannot create a directory for ssh control sockets")?;
    Ok((dir.path().to_path_buf(), Some(dir)))
}

pub(crate) fn run(args: RunArgs) -> Exit {
    init_tracing(args.log_json);
    cim::driver::private_dir(&args.state_dir).with_context(|| {
        format!(
            "cannot create the state directory {}",
            args.state_dir.display()
        )
    })?;
    let state_dir = std::path::absolute(&args.state_dir)?;
    // `_temporary` lives as long as the controller (and is then removed).
    let (control_dir, _temporary) = control_dir(&state_dir)?;
    if let Some(cfg) = &args.ssh_config {
        if !cfg.is_file() {
            bail!("--ssh-config {} does not exist", cfg.display());
        }
    }
    let runtime = cim::priority::runtime()?;
    runtime.block_on(serve(args, state_dir, control_dir))
}

async fn serve(args: RunArgs, state_dir: PathBuf, control_dir: PathBuf) -> Exit {
    // Refused before anything starts: an API open to the network without a
    // token.
    // Loaded before anything starts: a controller told to require signed
    // commits never runs without the keys to check them.
    let signers = match &args.allowed_signers {
        Some(file) if args.require_signed_commits => {
            Some(Arc::new(cim::trust::AllowedSigners::load(file)?))
        }
        _ => None,
    };
    let access = api::access::Access::new(api::access::AccessOptions {
        listen: args.listen,
        token: args
            .api_token_file
            .as_deref()
            .map(read_token)
            .transpose()?
            .map(|t| api::access::Token::new(&t)),
        allowed_hosts: args.api_allowed_hosts.clone(),
    })?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(api::tls::server_config(cert, key)?),
        _ => None,
    };
    let store = Store::open(&state_dir)?;
    let known_hosts_dir = state_dir.join("known_hosts");
    cim::driver::private_dir(&known_hosts_dir)
        .with_context(|| format!("cannot create {}", known_hosts_dir.display()))?;
    let driver = DriverConfig {
        known_hosts_dir,
        ssh_config: args
            .ssh_config
            .as_deref()
            .map(std::path::absolute)
            .transpose()?,
        control_dir,
        nix_options: args.nix_options.clone(),
        connect_timeout: args.connect_timeout,
        eval_timeout: args.eval_timeout,
        build_timeout: args.build_timeout,
        cache: match (&args.push_to_cache, &args.cache_signing_key) {
            (Some(url), Some(key)) => Some(cim::driver::BinaryCache {
                url: url.clone(),
                signing_key: std::path::absolute(key)?,
            }),
            _ => None,
        },
        nix_cache: Some(state_dir.join("nix-cache")),
        fetch_turn: Arc::default(),
    };
    let mirror = Mirror::open(&state_dir, &args.repo, &driver.git_ssh_command())?;
    let driver_for_notes = driver.clone();
    let planner = Arc::new(cim::planner::Planner::new(
        Arc::new(driver.clone()),
        mirror.path().to_path_buf(),
        args.branch.clone(),
        Some(cim::planner::PlanSource {
            state_dir: state_dir.clone(),
            url: args.repo.clone(),
            ssh: driver.git_ssh_command(),
            timeout: args.fetch_timeout,
        }),
        args.max_parallel,
    ));
    let fetch_now = Arc::new(Notify::new());
    let mut controller = Controller::new(
        ControllerConfig {
            resync_interval: args.resync_interval,
            max_parallel: args.max_parallel.max(1),
            backoff_base: args.backoff_base,
            backoff_max: args.backoff_max,
            mirror_path: mirror.path().to_path_buf(),
            substitute_on_destination: args.substitute_on_destination
                || args.push_to_cache.is_some(),
            retention: args.event_retention.unwrap_or_default(),
            state_dir: state_dir.clone(),
            refuse_rewrites: args.refuse_rewrites,
        },
        driver,
        store,
        Arc::clone(&fetch_now),
    )?;
    let stored = controller.status().repo.revision.clone();
    if let Some(revision) = stored.as_deref().and_then(cim::types::Revision::parse) {
        match mirror.read_specs(&revision).map(|f| spec::parse_fleet(&f)) {
            Ok(Ok(fleet)) => controller.resume(revision, fleet),
            Ok(Err(e)) => {
                tracing::warn!(%revision, error = %e, "stored revision no longer validates")
            }
            Err(e) => tracing::warn!(%revision, error = %e, "cannot read the stored revision"),
        }
    }
    let cancel = CancellationToken::new();
    let notifier = if args.notify_urls.is_empty() {
        None
    } else {
        cim::notify::start_at_end(&state_dir)?;
        Some(cim::notify::spawn(
            cim::notify::NotifyConfig {
                urls: args.notify_urls.clone(),
                format: args.notify_format,
                reasons: args.notify_reasons.clone(),
                hosts: args.notify_hosts.clone(),
                state_dir: state_dir.clone(),
            },
            controller.reporter(),
            cancel.clone(),
        ))
    };
    let notes = if args.write_notes {
        cim::notes::start_at_end(&state_dir)?;
        Some(cim::notes::spawn(
            cim::notes::NotesConfig {
                state_dir: state_dir.clone(),
                mirror: mirror.path().to_path_buf(),
                push_to: args.push_notes.then(|| args.repo.clone()),
            },
            Arc::new(driver_for_notes),
            cancel.clone(),
        ))
    } else {
        None
    };
    let (found_tx, found_rx) = mpsc::channel(16);
    let (req_tx, req_rx) = mpsc::channel(64);
    let local = Path::new(&args.repo)
        .exists()
        .then(|| PathBuf::from(&args.repo));
    let watcher = watch::spawn(
        mirror,
        local,
        watch::WatchConfig {
            branch: args.branch.clone(),
            poll_interval: args.poll_interval,
            fetch_timeout: args.fetch_timeout,
            signers,
            deployed: stored.as_deref().and_then(cim::types::Revision::parse),
        },
        found_tx,
        Arc::clone(&fetch_now),
        cancel.clone(),
    );
    let api_context = api::ApiContext {
        state_dir: state_dir.clone(),
        requests: req_tx,
        events: controller.events(),
        health: controller.health(),
        committed: controller.committed(),
        status_feed: controller.status_feed(),
        metrics: controller.metrics(),
        access: Arc::new(access),
        webhook: args
            .webhook_secret_file
            .as_deref()
            .map(read_token)
            .transpose()?
            .map(|s| api::webhook::WebhookSecret::new(&s)),
        fetch_now: Arc::clone(&fetch_now),
        planner: Some(cim::planner::service(planner)),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(listen = %args.listen, repo = %args.repo, branch = %args.branch, "cim controller started");
    let api = api::serve::serve_apart(
        listener,
        move || api::router(api_context),
        tls,
        cancel.clone(),
    )
    .context("cannot start the API's thread")?;
    tokio::spawn({
        let cancel = cancel.clone();
        async move {
            shutdown_signal().await;
            tracing::info!("signal received, shutting down");
            cancel.cancel();
        }
    });
    // On a worker thread of the runtime (not block_on's), so that its
    // blocking appends hand the thread's other tasks to the others.
    let run = tokio::spawn(controller.run(found_rx, req_rx, cancel.clone()));
    let crashed = match run.await {
        Ok(Ok(())) => None,
        Ok(Err(stopped)) => Some(cim::error::error_chain(&stopped)),
        Err(e) => Some(e.to_string()),
    };
    if let Some(e) = &crashed {
        tracing::error!(error = %e, "the controller task failed");
    }
    cancel.cancel();
    let _ = watcher.await;
    if let Some(notifier) = notifier {
        let _ = notifier.await;
    }
    if let Some(notes) = notes {
        let _ = notes.await;
    }
    // Open event streams keep the server busy; do not wait for them forever.
    let _ = tokio::time::timeout(Duration::from_secs(2), api).await;
    Ok(if crashed.is_some() {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
