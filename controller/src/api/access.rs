//! Who may use the API, checked before any handler runs.
//!
//! - **The Host header** must name the controller (its listen address,
//!   `localhost`, or a name given with `--api-allowed-host`): a web page
//!   that rebinds its own DNS name to 127.0.0.1 gets nothing back.
//! - **Requests that change something** (every `POST`) must carry
//!   `Content-Type: application/json` and must not come from another site
//!   (`Origin`, `Sec-Fetch-Site`): an HTML form or a `no-cors` fetch from
//!   any page cannot send them.
//! - **A token** (`--api-token-file`), when set, is required for every
//!   request that changes something, and for every request when the API
//!   listens beyond loopback (it refuses to start there without one). It is
//!   compared in constant time (as SHA-256 digests, so not even its length
//!   leaks) and never logged.
//!
//! `/healthz` is open to probes: it says only whether the controller works.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Where git hosts send push hooks.
pub const HOOK_PATH: &str = "/hooks/git";

/// A secret compared in constant time; its `Debug` shows nothing.
#[derive(Clone)]
pub struct Token([u8; 32]);

impl Token {
    pub fn new(secret: &str) -> Token {
        Token(Sha256::digest(secret.as_bytes()).into())
    }

    /// Whether `offered` is this secret (compared in constant time).
    pub fn matches_secret(&self, offered: &str) -> bool {
        self.matches(offered)
    }

    fn matches(&self, offered: &str) -> bool {
        let offered: [u8; 32] = Sha256::digest(offered.as_bytes()).into();
        self.0.ct_eq(&offered).into()
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

/// How the API is exposed.
#[derive(Debug, Clone)]
pub struct AccessOptions {
    pub listen: SocketAddr,
    pub token: Option<Token>,
    /// `--api-allowed-host`: names (with or without a port) the API is
    /// reached by, besides its listen address and `localhost`.
    pub allowed_hosts: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("--listen {0} is reachable from other machines: give it a token with --api-token-file (or listen on 127.0.0.1)")]
    OpenWithoutToken(SocketAddr),
}

/// The checks, made once from [`AccessOptions`].
#[derive(Debug)]
pub struct Access {
    token: Option<Token>,
    /// Every request needs the token (the API listens beyond loopback).
    reads_need_token: bool,
    /// Accepted `Host` values, lowercase; a name without a port matches any
    /// port. Empty: any host (only with a token for everything).
    hosts: Vec<String>,
}

impl Access {
    pub fn new(opts: AccessOptions) -> Result<Access, AccessError> {
        let loopback = opts.listen.ip().is_loopback();
        if !loopback && opts.token.is_none() {
            return Err(AccessError::OpenWithoutToken(opts.listen));
        }
        let mut hosts: Vec<String> = opts
            .allowed_hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        if loopback || !opts.listen.ip().is_unspecified() {
            let port = opts.listen.port();
            hosts.push(opts.listen.to_string());
            hosts.push(format!("localhost:{port}"));
            if loopback {
                hosts.push(format!("127.0.0.1:{port}"));
                hosts.push(format!("[::1]:{port}"));
            }
        }
        Ok(Access {
            token: opts.token,
            reads_need_token: !loopback,
            hosts,
        })
    }

    /// Why `method` with `headers` is refused, if it is.
    fn refuse(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<(StatusCode, String)> {
        if let Some(refused) = self.wrong_host(headers) {
            return Some(refused);
        }
        let changes = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        // A plan reads, but runs commands on every host and copies closures
        // to them: it takes what a change takes, except a body.
        let works = path == PLAN_PATH;
        if changes || works {
            if let Some(why) = self.cross_site(headers) {
                return Some((StatusCode::FORBIDDEN, why));
            }
        }
        if changes {
            let json = header_str(headers, header::CONTENT_TYPE)
                .and_then(|c| c.split(';').next())
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("application/json"));
            if !json {
                return Some((
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "requests that change something must be `Content-Type: application/json`"
                        .to_string(),
                ));
            }
        }
        if let Some(token) = &self.token {
            if changes || works || self.reads_need_token {
                let offered = header_str(headers, header::AUTHORIZATION)
                    .and_then(|a| a.strip_prefix("Bearer "))
                    .map(str::trim);
                match offered {
                    Some(offered) if token.matches(offered) => {}
                    Some(_) => {
                        return Some((StatusCode::UNAUTHORIZED, "wrong API token".to_string()))
                    }
                    None => {
                        return Some((
                            StatusCode::UNAUTHORIZED,
                            "this needs the API token (`Authorization: Bearer …`; the CLI reads CIM_API_TOKEN or --api-token-file)".to_string(),
                        ))
                    }
                }
            }
        }
        None
    }

    /// Why the Host header does not name this controller, if it does not.
    fn wrong_host(&self, headers: &HeaderMap) -> Option<(StatusCode, String)> {
        let host = header_str(headers, header::HOST).map(str::to_ascii_lowercase);
        if self.hosts.is_empty() || host.as_deref().is_some_and(|h| self.host_allowed(h)) {
            return None;
        }
        Some((
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "the Host header {} does not name this controller (see --api-allowed-host)",
                host.as_deref().unwrap_or("(none)")
            ),
        ))
    }

    /// Whether `host` (`name` or `name:port`) is accepted: exactly, or by
    /// its name when the allowed entry has no port.
    fn host_allowed(&self, host: &str) -> bool {
        let name = strip_port(host);
        self.hosts
            .iter()
            .any(|allowed| allowed == host || allowed == name)
    }

    /// Why a request looks like it comes from another site's page.
    fn cross_site(&self, headers: &HeaderMap) -> Option<String> {
        if let Some(site) = header_str(headers, "sec-fetch-site") {
            if !matches!(site, "same-origin" | "none") {
                return Some(format!(
                    "cross-site requests are refused (Sec-Fetch-Site: {site})"
                ));
            }
        }
        if let Some(origin) = header_str(headers, header::ORIGIN) {
            let host = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                .map(str::to_ascii_lowercase);
            let same = host.is_some_and(|h| self.hosts.is_empty() || self.host_allowed(&h));
            if !same {
                return Some(format!(
                    "cross-origin requests are refused (Origin: {origin})"
                ));
            }
        }
        None
    }
}

fn header_str(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `name` of `name:port` (an IPv6 literal keeps its brackets).
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// The middleware: refuses what [`Access`] refuses, with a JSON error.
pub async fn guard(State(access): State<Arc<Access>>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if path == HOOK_PATH {
        // A git host proves itself with the hook's signature instead (see
        // `webhook`); only the Host header is checked here.
        if let Some((code, why)) = access.wrong_host(request.headers()) {
            return super::error(code, why);
        }
    } else if path != "/healthz" {
        if let Some((code, why)) = access.refuse(request.method(), path, request.headers()) {
            tracing::info!(%why, path = %request.uri().path(), "API request refused");
            return super::error(code, why);
        }
    }
    let request = match read_body(request).await {
        Ok(request) => request,
        Err(refused) => return refused,
    };
    next.run(request).await
}

/// Where plans are asked for.
pub const PLAN_PATH: &str = "/api/v1/plan";

/// Longest a client may take to send a request's body.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The largest body accepted (requests and push hooks are small).
pub const BODY_LIMIT: usize = 1 << 20;

/// Reads a request's body within [`BODY_TIMEOUT`] and [`BODY_LIMIT`], so
/// that a client trickling a body cannot hold a connection slot.
async fn read_body(request: Request) -> Result<Request, Response> {
    if matches!(*request.method(), Method::GET | Method::HEAD) {
        return Ok(request);
    }
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, BODY_LIMIT)).await {
        Ok(Ok(bytes)) => Ok(Request::from_parts(parts, axum::body::Body::from(bytes))),
        Ok(Err(_)) => Err(super::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request's body is over {BODY_LIMIT} bytes or broken"),
        )),
        Err(_) => Err(super::error(
            StatusCode::REQUEST_TIMEOUT,
            format!("the request's body took over {}s", BODY_TIMEOUT.as_secs()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(listen: &str, token: Option<&str>, allowed: &[&str]) -> Access {
        Access::new(AccessOptions {
            listen: listen.parse().unwrap(),
            token: token.map(Token::new),
            allowed_hosts: allowed.iter().map(|h| h.to_string()).collect(),
        })
        .unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    const LOCAL: (&str, &str) = ("host", "127.0.0.1:7878");
    const JSON: (&str, &str) = ("content-type", "application/json");

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_comes_is_cut_off() {
        let trickle = futures::stream::pending::<Result<axum::body::Bytes, std::io::Error>>();
        let request = Request::post("/api/v1/reconcile")
            .body(axum::body::Body::from_stream(trickle))
            .unwrap();
        let refused = read_body(request).await.unwrap_err();
        assert_eq!(refused.status(), StatusCode::REQUEST_TIMEOUT);
        let small = Request::post("/api/v1/reconcile")
            .body(axum::body::Body::from("{}"))
            .unwrap();
        assert!(read_body(small).await.is_ok());
    }

    #[test]
    fn a_rebound_host_name_gets_nothing() {
        let a = access("127.0.0.1:7878", None, &[]);
        assert!(a.refuse(&Method::GET, "/x", &headers(&[LOCAL])).is_none());
        assert!(a
            .refuse(&Method::GET, "/x", &headers(&[("host", "localhost:7878")]))
            .is_none());
        let (code, _) = a
            .refuse(
                &Method::GET,
                "/x",
                &headers(&[("host", "evil.example:7878")]),
            )
            .unwrap();
        assert_eq!(code, StatusCode::MISDIRECTED_REQUEST);
        assert!(a.refuse(&Method::GET, "/x", &HeaderMap::new()).is_some());
        let named = access("127.0.0.1:7878", None, &["cim.example.org"]);
        assert!(named
            .refuse(
                &Method::GET,
                "/x",
                &headers(&[("host", "cim.example.org:443")])
            )
            .is_none());
    }

    #[test]
    fn forms_and_cross_site_posts_are_refused() {
        let a = access("127.0.0.1:7878", None, &[]);
        let form = headers(&[LOCAL, ("content-type", "application/x-www-form-urlencoded")]);
        assert_eq!(
            a.refuse(&Method::POST, "/x", &form).unwrap().0,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        assert_eq!(
            a.refuse(&Method::POST, "/x", &headers(&[LOCAL])).unwrap().0,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a no-cors fetch sends no JSON content type"
        );
        let cross = headers(&[LOCAL, JSON, ("origin", "https://evil.example")]);
        assert_eq!(
            a.refuse(&Method::POST, "/x", &cross).unwrap().0,
            StatusCode::FORBIDDEN
        );
        let fetch = headers(&[LOCAL, JSON, ("sec-fetch-site", "cross-site")]);
        assert_eq!(
            a.refuse(&Method::POST, "/x", &fetch).unwrap().0,
            StatusCode::FORBIDDEN
        );
        let same = headers(&[LOCAL, JSON, ("origin", "http://127.0.0.1:7878")]);
        assert!(a.refuse(&Method::POST, "/x", &same).is_none());
        assert!(a
            .refuse(&Method::POST, "/x", &headers(&[LOCAL, JSON]))
            .is_none());
    }

    #[test]
    fn a_plan_takes_what_a_change_takes_but_a_body() {
        let a = access("127.0.0.1:7878", Some("s3cret"), &[]);
        assert!(a
            .refuse(&Method::GET, "/api/v1/status", &headers(&[LOCAL]))
            .is_none());
        assert_eq!(
            a.refuse(&Method::GET, PLAN_PATH, &headers(&[LOCAL]))
                .unwrap()
                .0,
            StatusCode::UNAUTHORIZED
        );
        let right = headers(&[LOCAL, ("authorization", "Bearer s3cret")]);
        assert!(a.refuse(&Method::GET, PLAN_PATH, &right).is_none());
        let open = access("127.0.0.1:7878", None, &[]);
        let cross = headers(&[LOCAL, ("sec-fetch-site", "cross-site")]);
        assert_eq!(
            open.refuse(&Method::GET, PLAN_PATH, &cross).unwrap().0,
            StatusCode::FORBIDDEN
        );
        assert!(open
            .refuse(&Method::GET, PLAN_PATH, &headers(&[LOCAL]))
            .is_none());
    }

    #[test]
    fn a_token_guards_changes_and_everything_beyond_loopback() {
        let a = access("127.0.0.1:7878", Some("s3cret"), &[]);
        assert!(a.refuse(&Method::GET, "/x", &headers(&[LOCAL])).is_none());
        assert_eq!(
            a.refuse(&Method::POST, "/x", &headers(&[LOCAL, JSON]))
                .unwrap()
                .0,
            StatusCode::UNAUTHORIZED
        );
        let wrong = headers(&[LOCAL, JSON, ("authorization", "Bearer s3cre")]);
        assert_eq!(
            a.refuse(&Method::POST, "/x", &wrong).unwrap().1,
            "wrong API token"
        );
        let right = headers(&[LOCAL, JSON, ("authorization", "Bearer s3cret")]);
        assert!(a.refuse(&Method::POST, "/x", &right).is_none());

        let open = access("0.0.0.0:7878", Some("s3cret"), &[]);
        let read = headers(&[("host", "10.0.0.5:7878")]);
        assert_eq!(
            open.refuse(&Method::GET, "/x", &read).unwrap().0,
            StatusCode::UNAUTHORIZED
        );
        let read = headers(&[
            ("host", "10.0.0.5:7878"),
            ("authorization", "Bearer s3cret"),
        ]);
        assert!(open.refuse(&Method::GET, "/x", &read).is_none());
        assert!(matches!(
            Access::new(AccessOptions {
                listen: "0.0.0.0:7878".parse().unwrap(),
                token: None,
                allowed_hosts: Vec::new(),
            }),
            Err(AccessError::OpenWithoutToken(_))
        ));
        assert_eq!(format!("{:?}", Token::new("s3cret")), "Token(…)");
    }
}
