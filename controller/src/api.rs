//! The HTTP API (`/api/v1`, JSON): the router and the state its handlers
//! share. Reads come from the store through a pool of read-only
//! connections, so they always show what is durable; the status comes
//! from its snapshot (`status`), the event log and stream from `events`;
//! operator requests (reconcile, rollback, …) are sent to the controller
//! task.
//!
//! The response types here are the API's wire format: versioned by the URL
//! path, camelCase, only ever extended.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::controller::Request;
use crate::event::Event;
use crate::status::{FleetStatus, HostStatus};
use crate::store::Store;

pub mod access;
mod dashboard;
mod events;
pub mod serve;
mod snapshot;
mod status;
pub mod tls;
pub mod webhook;
use events::{list_events, stream};
use snapshot::Snapshot;
use status::{keep_snapshot_current, metrics_text, status};

/// `GET /api/v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StatusResponse {
    /// The newest event this status includes: `?since=` it for what
    /// changes next.
    #[serde(default)]
    pub seq: u64,
    /// Present when this is a list of changes (`?since=`): the commit they
    /// are after. `hosts` then holds only the hosts whose status changed
    /// after it and `removed` the hosts removed since; a client removes
    /// those, then puts these in. Absent: the whole status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
    /// The revision being reconciled towards (the newest valid one).
    pub revision: Option<String>,
    /// The newest revision fetched, valid or not.
    pub latest_revision: Option<String>,
    /// Why the latest revision is not being reconciled, or why fetching fails.
    pub message: Option<String>,
    /// Why the deployment windows are closed and until when (absent:
    /// open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// Progress of the current revision's rollout.
    #[serde(default)]
    pub rollout: crate::rollout::Progress,
    /// Events up to this sequence number were deleted by
    /// `--event-retention` (0: none).
    #[serde(default)]
    pub trimmed_through: u64,
    pub hosts: Vec<HostStatus>,
}

impl From<FleetStatus> for StatusResponse {
    fn from(s: FleetStatus) -> Self {
        StatusResponse {
            seq: s.repo.last_seq,
            since: None,
            removed: Vec::new(),
            rollout: crate::rollout::progress(&s),
            trimmed_through: s.repo.trimmed_through,
            revision: s.repo.revision,
            latest_revision: s.repo.latest_revision,
            message: s.repo.message,
            window: s.repo.window,
            hosts: s.hosts.into_values().map(Arc::unwrap_or_clone).collect(),
        }
    }
}

/// `POST /api/v1/reconcile` body: one host, the hosts whose labels match
/// `selector`, or (neither) every host.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReconcileRequest {
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<crate::spec::Selector>,
    /// Work on the hosts although the deployment windows are closed
    /// (recorded as `WindowForced`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force_window: bool,
}

/// A label selector as the CLI and the query strings write it:
/// `role=web,tier=front`.
pub fn parse_selector(text: &str) -> Result<crate::spec::Selector, String> {
    text.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| format!("`{pair}` is not KEY=VALUE"))
        })
        .collect()
}

/// `POST /api/v1/approve` body: the revision and (optionally) the wave,
/// by name or 1-based number.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApproveRequest {
    pub revision: String,
    #[serde(default)]
    pub wave: Option<String>,
}

/// `POST /api/v1/accept` body: the rewritten revision to deploy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AcceptRequest {
    pub revision: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReconcileResponse {
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: String,
}

#[derive(Debug, Deserialize)]
struct SelectParams {
    selector: String,
}

#[derive(Clone)]
struct AppState {
    state_dir: PathBuf,
    /// Idle read-only connections; a reader takes one (or opens one) and
    /// puts it back, so reads run concurrently instead of in turn.
    readers: Arc<Mutex<Vec<Store>>>,
    /// The status response, serialized and kept up to date from the
    /// status feed: a request costs the hosts that changed, not the fleet.
    status_cache: Arc<Mutex<Option<Snapshot>>>,
    feed: crate::feed::StatusFeed,
    /// The sequence number of the newest committed event.
    committed: tokio::sync::watch::Receiver<u64>,
    metrics: Arc<crate::metrics::Metrics>,
    requests: mpsc::Sender<Request>,
    events: broadcast::Sender<Event>,
    planner: Option<crate::planner::PlanService>,
}

/// What the API needs of the controller it serves.
pub struct ApiContext {
    /// Where the store is (read through read-only connections).
    pub state_dir: PathBuf,
    /// Operator requests go here.
    pub requests: mpsc::Sender<Request>,
    /// Committed events, as they are committed.
    pub events: broadcast::Sender<Event>,
    /// Why the controller cannot work, if it cannot.
    pub health: tokio::sync::watch::Receiver<Option<String>>,
    /// The newest committed event's sequence number.
    pub committed: tokio::sync::watch::Receiver<u64>,
    /// The rows each commit writes, published before `committed` moves.
    pub status_feed: crate::feed::StatusFeed,
    /// Who may ask what.
    pub access: Arc<access::Access>,
    /// `--webhook-secret-file`: push hooks proven to know it fetch at once.
    pub webhook: Option<webhook::WebhookSecret>,
    /// Makes the watcher fetch now.
    pub fetch_now: Arc<tokio::sync::Notify>,
    /// What `/metrics` shows.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Makes plans (`GET /api/v1/plan`); `None`: this controller cannot.
    pub planner: Option<crate::planner::PlanService>,
}

pub fn router(ctx: ApiContext) -> Router {
    let ApiContext {
        state_dir,
        requests,
        events,
        health,
        committed,
        status_feed,
        access,
        webhook,
        fetch_now,
        metrics,
        planner,
    } = ctx;
    let state = AppState {
        state_dir,
        readers: Arc::new(Mutex::new(Vec::new())),
        status_cache: Arc::new(Mutex::new(None)),
        feed: status_feed,
        committed,
        metrics,
        requests,
        events,
        planner,
    };
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(keep_snapshot_current(state.clone()));
    }
    Router::new()
        .route("/healthz", get(move || healthz(health.clone())))
        .route("/", get(dashboard::page))
        .route("/api/v1/status", get(status))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/hosts", get(select_hosts))
        .route("/api/v1/hosts/{name}", get(host))
        .route("/api/v1/events", get(list_events))
        .route("/api/v1/events/stream", get(stream))
        .route("/api/v1/reconcile", post(reconcile))
        .route("/api/v1/hosts/{name}/rollback", post(rollback))
        .route("/api/v1/hosts/{name}/resume", post(resume))
        .route("/api/v1/hosts/{name}/reboot", post(reboot))
        .route("/api/v1/accept", post(accept))
        .route("/api/v1/approve", post(approve))
        .route(access::PLAN_PATH, get(plan))
        .route(
            access::HOOK_PATH,
            post(move |headers: HeaderMap, body: axum::body::Bytes| {
                hook(webhook.clone(), Arc::clone(&fetch_now), headers, body)
            }),
        )
        .layer(axum::middleware::from_fn_with_state(access, access::guard))
        .with_state(state)
}

/// `ok`, or 503 with why the controller cannot work (a store refusing
/// writes): what a liveness probe or an operator looks at.
async fn healthz(health: tokio::sync::watch::Receiver<Option<String>>) -> Response {
    match health.borrow().clone() {
        None => "ok".into_response(),
        Some(why) => error(StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (
        code,
        Json(ErrorResponse {
            error: message.into(),
        }),
    )
        .into_response()
}

#[cfg(test)]
impl AppState {
    /// A state over the store in `state_dir` with no controller behind it
    /// (requests go nowhere), for the handlers' tests.
    fn for_tests(
        state_dir: PathBuf,
        feed: crate::feed::StatusFeed,
        committed: tokio::sync::watch::Receiver<u64>,
        events: broadcast::Sender<Event>,
    ) -> AppState {
        AppState {
            state_dir,
            readers: Arc::new(Mutex::new(Vec::new())),
            status_cache: Arc::new(Mutex::new(None)),
            feed,
            committed,
            metrics: Arc::default(),
            requests: mpsc::channel(1).0,
            events,
            planner: None,
        }
    }
}

/// Read-only connections kept open for the next reads.
const MAX_IDLE_READERS: usize = 4;

impl AppState {
    /// Runs `f` against the read-only store connection on a blocking thread,
    /// opening the connection on first use.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, crate::store::StoreError> + Send + 'static,
    ) -> Result<T, Response> {
        let app = self.clone();
        tokio::task::spawn_blocking(move || {
            app.read_now(f).map_err(|e| crate::error::error_chain(&e))
        })
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e))
    }

    /// Runs `f` against an idle read-only connection (or a new one), on
    /// the calling thread.
    fn read_now<T>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, crate::store::StoreError>,
    ) -> Result<T, crate::store::StoreError> {
        let idle = self.readers.lock().ok().and_then(|mut pool| pool.pop());
        let store = match idle {
            Some(store) => store,
            None => Store::open_read_only(&self.state_dir)?,
        };
        let result = f(&store);
        if let Ok(mut pool) = self.readers.lock() {
            if pool.len() < MAX_IDLE_READERS {
                pool.push(store);
            }
        }
        result
    }
}

async fn host(State(app): State<AppState>, Path(name): Path<String>) -> Response {
    let wanted = name.clone();
    match app.read(move |s| s.host(&wanted)).await {
        Ok(Some(h)) => Json(h).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no host `{name}`")),
        Err(r) => r,
    }
}

async fn reconcile(State(app): State<AppState>, body: Option<Json<ReconcileRequest>>) -> Response {
    let Json(body) = body.unwrap_or_default();
    ask(&app, |reply| Request::Reconcile {
        host: body.host,
        selector: body.selector,
        force_window: body.force_window,
        reply,
    })
    .await
}

/// `GET /api/v1/hosts?selector=role=web`: the names of the matching hosts.
async fn select_hosts(State(app): State<AppState>, Query(p): Query<SelectParams>) -> Response {
    match selected(&app, &p.selector).await {
        Ok(names) => Json(names).into_response(),
        Err(r) => r,
    }
}

/// The names of the hosts `selector` (a query parameter) matches, asked of
/// the controller, which holds the specs and their labels.
async fn selected(app: &AppState, selector: &str) -> Result<Vec<String>, Response> {
    let selector = parse_selector(selector).map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
    let (reply, answer) = oneshot::channel();
    app.requests
        .send(Request::Select { selector, reply })
        .await
        .map_err(|_| {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the controller is shutting down",
            )
        })?;
    match answer.await {
        Ok(Ok(names)) => Ok(names.lines().map(str::to_string).collect()),
        Ok(Err(e)) => Err(error(StatusCode::CONFLICT, e)),
        Err(_) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller is shutting down",
        )),
    }
}

async fn rollback(State(app): State<AppState>, Path(host): Path<String>) -> Response {
    ask(&app, |reply| Request::Rollback { host, reply }).await
}

async fn reboot(State(app): State<AppState>, Path(host): Path<String>) -> Response {
    ask(&app, |reply| Request::Reboot { host, reply }).await
}

async fn resume(State(app): State<AppState>, Path(host): Path<String>) -> Response {
    ask(&app, |reply| Request::Resume { host, reply }).await
}

/// `POST /hooks/git` (see `webhook`).
async fn hook(
    secret: Option<webhook::WebhookSecret>,
    fetch_now: Arc<tokio::sync::Notify>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(secret) = secret else {
        return error(
            StatusCode::NOT_FOUND,
            "push hooks are off (start with --webhook-secret-file)",
        );
    };
    let verified = secret.verifies(&headers, &body);
    if verified {
        fetch_now.notify_one();
    } else {
        tracing::warn!("a push hook with a wrong signature was ignored");
    }
    let (code, message) = webhook::answer(verified);
    if verified {
        (
            code,
            Json(ReconcileResponse {
                message: message.to_string(),
            }),
        )
            .into_response()
    } else {
        error(code, message)
    }
}

#[derive(Debug, Deserialize)]
struct PlanParams {
    revision: Option<String>,
    host: Option<String>,
    /// `false`: compare closures only, copy nothing to the hosts.
    activation: Option<bool>,
}

/// What a revision would do to every host (or one): see `plan`.
async fn plan(State(app): State<AppState>, Query(p): Query<PlanParams>) -> Response {
    use crate::planner::{PlanError, PlanRequest};
    let Some(planner) = app.planner.clone() else {
        return error(
            StatusCode::NOT_IMPLEMENTED,
            "this controller cannot make plans",
        );
    };
    let request = PlanRequest {
        revision: p.revision.filter(|r| !r.is_empty()),
        host: p.host.filter(|h| !h.is_empty()),
        activation: p.activation.unwrap_or(true),
    };
    match planner(request).await {
        Ok(plan) => Json(plan).into_response(),
        Err(e @ PlanError::NoSuchHost(_)) => {
            error(StatusCode::NOT_FOUND, crate::error::error_chain(&e))
        }
        Err(e @ (PlanError::Git(_) | PlanError::NoRevision { .. } | PlanError::Specs { .. })) => {
            error(StatusCode::BAD_REQUEST, crate::error::error_chain(&e))
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            crate::error::error_chain(&e),
        ),
    }
}

async fn approve(State(app): State<AppState>, Json(body): Json<ApproveRequest>) -> Response {
    let (revision, wave) = (body.revision, body.wave);
    ask(&app, |reply| Request::Approve {
        revision,
        wave,
        reply,
    })
    .await
}

async fn accept(State(app): State<AppState>, Json(body): Json<AcceptRequest>) -> Response {
    let revision = body.revision;
    ask(&app, |reply| Request::Accept { revision, reply }).await
}

/// Sends a request to the controller task and turns its answer into a
/// response: 202 with a message, or 409 with the reason it was refused.
async fn ask(
    app: &AppState,
    request: impl FnOnce(oneshot::Sender<Result<String, String>>) -> Request,
) -> Response {
    let (reply, answer) = oneshot::channel();
    if app.requests.send(request(reply)).await.is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller is shutting down",
        );
    }
    match answer.await {
        Ok(Ok(message)) => {
            (StatusCode::ACCEPTED, Json(ReconcileResponse { message })).into_response()
        }
        Ok(Err(message)) => error(StatusCode::CONFLICT, message),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller is shutting down",
        ),
    }
}
