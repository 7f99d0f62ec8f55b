//! The event log over HTTP: `GET /api/v1/events` (a page of the store's
//! log) and `GET /api/v1/events/stream` (server-sent events: the backlog
//! from the store, then the controller's broadcast, going back to the
//! store when a subscriber falls behind).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use tokio::sync::broadcast;

use super::{selected, AppState};
use crate::event::Event;
use crate::store::EventQuery;

#[derive(Debug, Deserialize)]
pub(super) struct EventsParams {
    host: Option<String>,
    since: Option<u64>,
    limit: Option<u32>,
    /// `role=web,…`: only events of the hosts whose labels match.
    selector: Option<String>,
}

pub(super) async fn list_events(
    State(app): State<AppState>,
    Query(p): Query<EventsParams>,
) -> Response {
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
pub(super) async fn stream(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{NewEvent, Reason};
    use crate::status::FleetStatus;
    use crate::store::Store;

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
        // A backlog longer than a page.
        append(&mut store, &mut status, &tx, PAGE as usize + 7);
        let app = AppState::for_tests(
            dir.path().to_path_buf(),
            crate::feed::StatusFeed::default(),
            tokio::sync::watch::Sender::new(0).subscribe(),
            tx.clone(),
        );
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
}
