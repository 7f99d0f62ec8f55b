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
use tokio_stream::wrappers::BroadcastStream;

use crate::controller::Request;
use crate::event::Event;
use crate::status::{FleetStatus, HostStatus};
use crate::store::{EventQuery, Store};

/// `GET /api/v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StatusResponse {
    /// The revision being reconciled towards (the newest valid one).
    pub revision: Option<String>,
    /// The newest revision fetched, valid or not.
    pub latest_revision: Option<String>,
    /// Why the latest revision is not being reconciled, or why fetching fails.
    pub message: Option<String>,
    /// Progress of the current revision's rollout.
    #[serde(default)]
    pub rollout: crate::rollout::Progress,
    pub hosts: Vec<HostStatus>,
}

impl From<FleetStatus> for StatusResponse {
    fn from(s: FleetStatus) -> Self {
        StatusResponse {
            rollout: crate::rollout::progress(&s),
            revision: s.repo.revision,
            latest_revision: s.repo.latest_revision,
            message: s.repo.message,
            hosts: s.hosts.into_values().collect(),
        }
    }
}

/// `POST /api/v1/reconcile` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReconcileRequest {
    #[serde(default)]
    pub host: Option<String>,
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
struct EventsParams {
    host: Option<String>,
    since: Option<u64>,
    limit: Option<u32>,
}

#[derive(Clone)]
struct AppState {
    state_dir: PathBuf,
    reader: Arc<Mutex<Option<Store>>>,
    requests: mpsc::Sender<Request>,
    events: broadcast::Sender<Event>,
}

pub fn router(
    state_dir: PathBuf,
    requests: mpsc::Sender<Request>,
    events: broadcast::Sender<Event>,
) -> Router {
    let state = AppState {
        state_dir,
        reader: Arc::new(Mutex::new(None)),
        requests,
        events,
    };
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/v1/status", get(status))
        .route("/api/v1/hosts/{name}", get(host))
        .route("/api/v1/events", get(list_events))
        .route("/api/v1/events/stream", get(stream))
        .route("/api/v1/reconcile", post(reconcile))
        .route("/api/v1/hosts/{name}/rollback", post(rollback))
        .route("/api/v1/hosts/{name}/resume", post(resume))
        .with_state(state)
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
        let reader = Arc::clone(&self.reader);
        let dir = self.state_dir.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = reader
                .lock()
                .map_err(|_| "store lock poisoned".to_string())?;
            if guard.is_none() {
                *guard = Some(Store::open_read_only(&dir).map_err(|e| e.to_string())?);
            }
            let store = guard.as_ref().ok_or("store not open")?;
            f(store).map_err(|e| crate::reconcile::error_chain(&e))
        })
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e))
    }
}

async fn status(State(app): State<AppState>) -> Response {
    match app.read(|s| s.load_status()).await {
        Ok(status) => Json(StatusResponse::from(status)).into_response(),
        Err(r) => r,
    }
}

async fn host(State(app): State<AppState>, Path(name): Path<String>) -> Response {
    match app.read(|s| s.load_status()).await {
        Ok(mut status) => match status.hosts.remove(&name) {
            Some(h) => Json(h).into_response(),
            None => error(StatusCode::NOT_FOUND, format!("no host `{name}`")),
        },
        Err(r) => r,
    }
}

async fn list_events(State(app): State<AppState>, Query(p): Query<EventsParams>) -> Response {
    let q = EventQuery {
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
    let live = BroadcastStream::new(app.events.subscribe());
    let host = p.host.clone();
    let q = EventQuery {
        host: p.host,
        since: Some(since),
        limit: None,
    };
    let backlog = match app.read(move |s| s.events(&q)).await {
        Ok(evs) => evs,
        Err(r) => return r,
    };
    let mut last = backlog.last().map_or(since, |e| e.seq);
    let live = live.filter_map(move |item| {
        let host = host.clone();
        let out = match item {
            Ok(ev) if ev.seq > last && (host.is_none() || ev.host == host) => {
                last = ev.seq;
                Some(ev)
            }
            _ => None,
        };
        async move { out }
    });
    let events = futures::stream::iter(backlog).chain(live).map(to_sse);
    sse(events).into_response()
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
    let host = body.and_then(|Json(b)| b.host);
    ask(&app, |reply| Request::Reconcile { host, reply }).await
}

async fn rollback(State(app): State<AppState>, Path(host): Path<String>) -> Response {
    ask(&app, |reply| Request::Rollback { host, reply }).await
}

async fn resume(State(app): State<AppState>, Path(host): Path<String>) -> Response {
    ask(&app, |reply| Request::Resume { host, reply }).await
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
