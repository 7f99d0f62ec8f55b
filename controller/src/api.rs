//! The HTTP API (`/api/v1`, JSON). Reads come straight from the store
//! through a read-only connection, so they always show what is durable;
//! the event stream replays from the store and then follows the controller's
//! broadcast; reconcile requests are sent to the controller task.
//!
//! The response types here are the API's wire format: versioned by the URL
//! path, camelCase, only ever extended.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::controller::Request;
use crate::event::Event;
use crate::status::{FleetStatus, HostStatus};
use crate::store::{EventQuery, Store};

pub mod access;
mod dashboard;
pub mod serve;
mod snapshot;
pub mod tls;
pub mod webhook;
use snapshot::Snapshot;

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
struct StatusParams {
    /// `false`: the fleet's part only, no hosts (what `cim status HOST`
    /// needs of it: the revision; 5.5 MB less with 10,000 hosts).
    hosts: Option<bool>,
    /// Only what changed after this event (`seq` of an earlier answer).
    since: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct EventsParams {
    host: Option<String>,
    since: Option<u64>,
    limit: Option<u32>,
    /// `role=web,…`: only events of the hosts whose labels match.
    selector: Option<String>,
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

async fn status(State(app): State<AppState>, Query(p): Query<StatusParams>) -> Response {
    let hosts = p.hosts.unwrap_or(true);
    let since = p.since;
    let answer = move |s: &mut Snapshot| match (hosts, since) {
        (false, _) => s.fleet_part().map(Ok),
        (true, Some(since)) => match s.changes_since(since)? {
            Some(changes) => Ok(Err(changes)),
            None => s.parts().map(Ok),
        },
        (true, None) => s.parts().map(Ok),
    };
    let joined = |answer: Result<_, snapshot::ChangeList>| answer.unwrap_or_else(|c| c.join());
    match with_snapshot(&app, answer, joined).await {
        Ok(parts) => json_parts(parts),
        Err(r) => r,
    }
}

/// `GET /metrics`: the Prometheus text format, with the gauges of the
/// fleet as the status snapshot has it.
async fn metrics_text(State(app): State<AppState>) -> Response {
    let registry = Arc::clone(&app.metrics);
    let render = move |s: &mut Snapshot| Ok(registry.render(s.repo(), s.hosts()));
    let text = with_snapshot(&app, render, |text| text).await;
    match text {
        Ok(Err(e)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            crate::error::error_chain(&e),
        ),
        Ok(Ok(text)) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(r) => r,
    }
}

/// Runs `f` on the status snapshot once it holds every event committed
/// before the request came: the controller publishes a commit's rows
/// before it makes the commit known, so taking the feed brings the
/// snapshot there; only the first request (or one served without a
/// controller feeding it) reads the store. On a blocking thread: taking a
/// busy second's rows and joining the body again take milliseconds, which
/// the API's thread spends sending other answers meanwhile. `then`
/// finishes `f`'s answer there once the snapshot is let go: what one
/// request alone needs is not done while the others wait for it.
async fn with_snapshot<T, U: Send + 'static>(
    app: &AppState,
    f: impl FnOnce(&mut Snapshot) -> Result<T, crate::store::StoreError> + Send + 'static,
    then: impl FnOnce(T) -> U + Send + 'static,
) -> Result<U, Response> {
    let committed = *app.committed.borrow();
    let app = app.clone();
    tokio::task::spawn_blocking(move || {
        let answer = snapshot_answer(&app, committed, f)?;
        Ok(then(answer))
    })
    .await
    .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e: crate::store::StoreError| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            crate::error::error_chain(&e),
        )
    })
}

/// Takes each commit into the status snapshot as it is made known, once
/// a request has made the snapshot: a request then finds the busy
/// second's rows already taken instead of taking them while it (and the
/// requests queued behind it) waits. Never waits for a request holding
/// the snapshot (that request takes the feed itself), and a commit made
/// while the last one was being taken is taken with the next.
async fn keep_snapshot_current(app: AppState) {
    let mut committed = app.committed.clone();
    while committed.changed().await.is_ok() {
        committed.borrow_and_update();
        let app = app.clone();
        let taken = tokio::task::spawn_blocking(move || {
            if let Ok(mut cached) = app.status_cache.try_lock() {
                if let Some(snapshot) = cached.as_mut() {
                    snapshot.absorb(app.feed.take());
                }
            }
        });
        if taken.await.is_err() {
            return;
        }
    }
}

/// [`with_snapshot`]'s turn with the snapshot, on the calling thread.
fn snapshot_answer<T>(
    app: &AppState,
    committed: u64,
    f: impl FnOnce(&mut Snapshot) -> Result<T, crate::store::StoreError>,
) -> Result<T, crate::store::StoreError> {
    // Requests take turns: the first one reads the store, the others
    // find the snapshot it made (two reads would each take a part of
    // the feed).
    let mut cached = app.status_cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(snapshot) = cached.as_mut() {
        snapshot.absorb(app.feed.take());
        if snapshot.seq() >= committed {
            return f(snapshot);
        }
    }
    // Followed before the store is read: every commit after the read
    // is in the feed (and any before it that the feed also has is
    // left out by its sequence number).
    app.feed.follow();
    let mut snapshot = app.read_now(Snapshot::load)?;
    snapshot.absorb(app.feed.take());
    f(cached.insert(snapshot))
}

/// A JSON response sent in parts (the status snapshot's blocks), with its
/// length known up front.
fn json_parts(parts: Vec<axum::body::Bytes>) -> Response {
    let length: usize = parts.iter().map(|p| p.len()).sum();
    let body = axum::body::Body::from_stream(futures::stream::iter(
        parts.into_iter().map(Ok::<_, Infallible>),
    ));
    (
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/json".to_string(),
            ),
            (axum::http::header::CONTENT_LENGTH, length.to_string()),
        ],
        body,
    )
        .into_response()
}

async fn host(State(app): State<AppState>, Path(name): Path<String>) -> Response {
    let wanted = name.clone();
    match app.read(move |s| s.host(&wanted)).await {
        Ok(Some(h)) => Json(h).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no host `{name}`")),
        Err(r) => r,
    }
}

async fn list_events(State(app): State<AppState>, Query(p): Query<EventsParams>) -> Response {
    let hosts = match &p.selector {
        Some(selector) => match selected(&app, selector).await {
            Ok(names) => Some(names),
            Err(r) => return r,
        },
        None => None,
    };
    let q = EventQuery {
        hosts,
        selector: None,
        host: p.host,
        since: p.since,
        limit: p.limit,
    };
    match app.read(move |s| s.events(&q)).await {
        Ok(evs) => Json(evs).into_response(),
        Err(r) => r,
    }
}

/// Server-sent events: first the stored events after `Last-Event-ID` (or
/// `?since=`), then live ones. Subscribing before reading the backlog, and
/// skipping what was already sent, means no event is lost or repeated.
async fn stream(
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(p): Query<EventsParams>,
) -> Response {
    let since = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .or(p.since)
        .unwrap_or(0);
    // Subscribed before the store is read, so that nothing committed in
    // between is missed.
    let feed = Feed {
        live: app.events.subscribe(),
        app,
        host: p.host,
        last: since,
        buffer: std::collections::VecDeque::new(),
        caught_up: false,
    };
    let events = futures::stream::unfold(feed, Feed::next).map(to_sse);
    sse(events).into_response()
}

/// Events read from the store in pages this long.
const PAGE: u32 = 500;
/// Read-only connections kept open for the next reads.
const MAX_IDLE_READERS: usize = 4;

/// One SSE subscriber's position. It reads from the store, page by page,
/// until it has caught up, then follows the live broadcast; if it falls so
/// far behind that the broadcast drops events for it, it goes back to the
/// store where it left off. Every event is committed before it is
/// broadcast, so the store always has what the broadcast had: no gaps, and
/// memory bounded by a page whatever the log's size.
struct Feed {
    app: AppState,
    live: broadcast::Receiver<Event>,
    host: Option<String>,
    /// The last event sent (or skipped by the host filter).
    last: u64,
    buffer: std::collections::VecDeque<Event>,
    caught_up: bool,
}

impl Feed {
    async fn next(mut self) -> Option<(Event, Feed)> {
        loop {
            if let Some(ev) = self.buffer.pop_front() {
                self.last = ev.seq;
                return Some((ev, self));
            }
            if !self.caught_up {
                let q = EventQuery {
                    hosts: None,
                    selector: None,
                    host: self.host.clone(),
                    since: Some(self.last),
                    limit: Some(PAGE),
                };
                let page = self.app.read(move |s| s.events(&q)).await.ok()?;
                self.caught_up = page.len() < PAGE as usize;
                self.buffer.extend(page);
                continue;
            }
            match self.live.recv().await {
                Ok(ev) if ev.seq <= self.last => {}
                Ok(ev) if self.host.is_none() || ev.host == self.host => self.buffer.push_back(ev),
                Ok(ev) => self.last = ev.seq,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(
                        missed,
                        "an event stream fell behind; reading it from the store"
                    );
                    self.caught_up = false;
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

fn sse(
    events: impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

fn to_sse(ev: Event) -> Result<SseEvent, Infallible> {
    let data = serde_json::to_string(&ev).unwrap_or_default();
    Ok(SseEvent::default()
        .id(ev.seq.to_string())
        .event(ev.reason.to_string())
        .data(data))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{NewEvent, Reason};
    use crate::status::FleetStatus;

    /// Appends `n` events to the store and broadcasts them, as the
    /// controller does (commit first, then broadcast).
    fn append(
        store: &mut Store,
        status: &mut FleetStatus,
        tx: &broadcast::Sender<Event>,
        n: usize,
    ) {
        let news = (0..n)
            .map(|i| {
                NewEvent::host(
                    &format!("h{}", i % 3),
                    Reason::ReconcileRequested,
                    Some("r"),
                    "",
                )
            })
            .collect();
        let evs = store
            .append_all(status, news, time::OffsetDateTime::UNIX_EPOCH)
            .unwrap();
        for ev in evs {
            let _ = tx.send(ev);
        }
    }

    #[tokio::test]
    async fn an_event_stream_has_no_gaps_even_when_it_falls_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut status = FleetStatus::default();
        // A tiny broadcast buffer, so that a slow subscriber lags.
        let (tx, _) = broadcast::channel(4);
        let (requests, _rx) = mpsc::channel(1);
        // A backlog longer than a page.
        append(&mut store, &mut status, &tx, PAGE as usize + 7);
        let app = AppState {
            state_dir: dir.path().to_path_buf(),
            readers: Arc::new(Mutex::new(Vec::new())),
            status_cache: Arc::new(Mutex::new(None)),
            feed: crate::feed::StatusFeed::default(),
            committed: tokio::sync::watch::Sender::new(0).subscribe(),
            metrics: Arc::default(),
            requests,
            events: tx.clone(),
            planner: None,
        };
        let feed = Feed {
            live: tx.subscribe(),
            app,
            host: None,
            last: 0,
            buffer: std::collections::VecDeque::new(),
            caught_up: false,
        };
        let mut events = Box::pin(futures::stream::unfold(feed, Feed::next));
        let mut seen = Vec::new();
        for _ in 0..PAGE + 7 {
            seen.push(events.next().await.unwrap().seq);
        }
        // Now live, then far behind: 100 events into a buffer of 4.
        append(&mut store, &mut status, &tx, 1);
        seen.push(events.next().await.unwrap().seq);
        append(&mut store, &mut status, &tx, 100);
        for _ in 0..100 {
            seen.push(events.next().await.unwrap().seq);
        }
        let total = PAGE as u64 + 7 + 101;
        assert_eq!(seen, (1..=total).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn the_status_snapshot_takes_commits_without_a_request() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut status = FleetStatus::default();
        let feed = crate::feed::StatusFeed::default();
        let (commits, committed) = tokio::sync::watch::channel(0);
        let (requests, _rx) = mpsc::channel(1);
        let app = AppState {
            state_dir: dir.path().to_path_buf(),
            readers: Arc::new(Mutex::new(Vec::new())),
            status_cache: Arc::new(Mutex::new(None)),
            feed: feed.clone(),
            committed,
            metrics: Arc::default(),
            requests,
            events: broadcast::channel(4).0,
            planner: None,
        };
        let mut commit = |host: &str| {
            store.begin_group();
            let news = vec![NewEvent::host(host, Reason::BuildStarted, Some("r"), "")];
            store
                .append_all(&mut status, news, time::OffsetDateTime::UNIX_EPOCH)
                .unwrap();
            let written = store.commit_group(&status).unwrap();
            feed.publish(&status, written);
            commits.send_replace(status.repo.last_seq);
        };
        commit("a");
        tokio::spawn(keep_snapshot_current(app.clone()));
        let seq = |app: &AppState| app.status_cache.lock().unwrap().as_ref().map(|s| s.seq());
        assert_eq!(seq(&app), None, "no snapshot until a request makes one");
        with_snapshot(&app, |_| Ok(()), |()| ()).await.unwrap();
        assert_eq!(seq(&app), Some(1));
        commit("b");
        tokio::time::timeout(Duration::from_secs(10), async {
            while seq(&app) != Some(2) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the commit is taken in the background");
    }
}
