//! `GET /api/v1/status` and `GET /metrics`: answered from the status
//! snapshot (`snapshot`), which a request brings up to every commit made
//! before it and a task keeps current between requests; its work runs on
//! the API runtime's blocking threads.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::snapshot::{self, Snapshot};
use super::{error, AppState};

#[derive(Debug, Deserialize)]
pub(super) struct StatusParams {
    /// `false`: the fleet's part only, no hosts (what `cim status HOST`
    /// needs of it: the revision; 5.5 MB less with 10,000 hosts).
    hosts: Option<bool>,
    /// Only what changed after this event (`seq` of an earlier answer).
    since: Option<u64>,
}

pub(super) async fn status(State(app): State<AppState>, Query(p): Query<StatusParams>) -> Response {
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
pub(super) async fn metrics_text(State(app): State<AppState>) -> Response {
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
pub(super) async fn keep_snapshot_current(app: AppState) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{NewEvent, Reason};
    use crate::status::FleetStatus;
    use crate::store::Store;
    use std::time::Duration;
    use tokio::sync::broadcast;

    #[tokio::test]
    async fn the_status_snapshot_takes_commits_without_a_request() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut status = FleetStatus::default();
        let feed = crate::feed::StatusFeed::default();
        let (commits, committed) = tokio::sync::watch::channel(0);
        let app = AppState::for_tests(
            dir.path().to_path_buf(),
            feed.clone(),
            committed,
            broadcast::channel(4).0,
        );
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
