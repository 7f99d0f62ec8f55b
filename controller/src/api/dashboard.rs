//! `GET /`: the dashboard, one page embedded in the binary (no JavaScript
//! toolchain to build it, no CDN to load it): the fleet at a glance, kept
//! live by the event stream, with the reconcile, rollback and resume
//! buttons going through the API's own access rules.

use axum::http::header;
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("dashboard/index.html");

pub async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Nothing but this page's own script and the same origin.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; frame-ancestors 'none'",
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        PAGE,
    )
        .into_response()
}
