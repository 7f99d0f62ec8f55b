//! Where the CLI gets its answers: a running controller's HTTP API, or (with
//! `--state-dir`) the store directly when no controller is running. Both
//! give the same types, so the CLI renders them the same way.

use std::io::BufRead;
use std::path::PathBuf;

use crate::api::{ErrorResponse, ReconcileRequest, ReconcileResponse, StatusResponse};
use crate::event::Event;
use crate::status::HostStatus;
use crate::store::{EventQuery, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the controller at {url} (is `cim run` running? set --api or CIM_API, or read a store with --state-dir)")]
    Unreachable {
        url: String,
        #[source]
        source: Box<ureq::Transport>,
    },
    #[error("{url} answered {code}: {message}")]
    Status {
        url: String,
        code: u16,
        message: String,
    },
    #[error("cannot read the answer of {url}")]
    Body {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no host `{0}`")]
    NoHost(String),
    #[error("this needs a running controller (--api), not a store (--state-dir)")]
    NeedsController,
}

/// The source of truth the CLI reads.
pub enum Source {
    Api(Api),
    Store(PathBuf),
}

/// A controller's API, and the token to show it (`None`: none).
pub struct Api {
    pub base: String,
    pub token: Option<String>,
    pub agent: ureq::Agent,
}

/// The HTTP client: for https, trusting `ca` if given (else the public
/// roots).
pub fn agent(ca: Option<&std::path::Path>) -> Result<ureq::Agent, crate::api::tls::TlsError> {
    let builder = ureq::AgentBuilder::new();
    Ok(match ca {
        Some(ca) => builder.tls_config(crate::api::tls::client_config(ca)?),
        None => builder,
    }
    .build())
}

impl Api {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base.trim_end_matches('/'))
    }

    fn request(&self, method: &str, url: &str) -> ureq::Request {
        let request = self.agent.request(method, url);
        match &self.token {
            Some(token) => request.set("Authorization", &format!("Bearer {token}")),
            None => request,
        }
    }
}

impl Source {
    fn get<T: serde::de::DeserializeOwned>(api: &Api, path: &str) -> Result<T, ClientError> {
        Self::get_with(api, path, &[])
    }

    /// GET with query parameters (ureq encodes them).
    fn get_with<T: serde::de::DeserializeOwned>(
        api: &Api,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, ClientError> {
        let url = api.url(path);
        let request = query
            .iter()
            .fold(api.request("GET", &url), |r, (k, v)| r.query(k, v));
        let resp = request.call().map_err(|e| http_error(&url, e))?;
        resp.into_json()
            .map_err(|source| ClientError::Body { url, source })
    }

    pub fn status(&self) -> Result<StatusResponse, ClientError> {
        match self {
            Source::Api(api) => Self::get(api, "/api/v1/status"),
            Source::Store(dir) => Ok(Store::open_read_only(dir)?.load_status()?.into()),
        }
    }

    /// The fleet's status without its hosts (`hosts` is empty).
    pub fn fleet_status(&self) -> Result<StatusResponse, ClientError> {
        match self {
            Source::Api(api) => Self::get(api, "/api/v1/status?hosts=false"),
            Source::Store(dir) => {
                // Converted first: the rollout's progress counts the hosts.
                let mut status = StatusResponse::from(Store::open_read_only(dir)?.load_status()?);
                status.hosts.clear();
                Ok(status)
            }
        }
    }

    pub fn host(&self, name: &str) -> Result<HostStatus, ClientError> {
        match self {
            Source::Api(api) => Self::get(api, &format!("/api/v1/hosts/{name}")),
            Source::Store(dir) => Store::open_read_only(dir)?
                .host(name)?
                .ok_or_else(|| ClientError::NoHost(name.to_string())),
        }
    }

    pub fn events(&self, q: &EventQuery) -> Result<Vec<Event>, ClientError> {
        match self {
            Source::Api(api) => {
                let mut params = Vec::new();
                if let Some(h) = &q.host {
                    params.push(("host", h.clone()));
                }
                if let Some(s) = q.since {
                    params.push(("since", s.to_string()));
                }
                if let Some(l) = q.limit {
                    params.push(("limit", l.to_string()));
                }
                if let Some(selector) = &q.selector {
                    params.push(("selector", selector.clone()));
                }
                Self::get_with(api, "/api/v1/events", &params)
            }
            Source::Store(dir) => Ok(Store::open_read_only(dir)?.events(q)?),
        }
    }

    /// Follows the event stream, calling `on_event` for each event until the
    /// stream ends or `on_event` returns false. From a store, polls it.
    pub fn follow(
        &self,
        q: &EventQuery,
        mut on_event: impl FnMut(&Event) -> bool,
    ) -> Result<(), ClientError> {
        match self {
            Source::Api(api) => {
                let mut path = format!("/api/v1/events/stream?since={}", q.since.unwrap_or(0));
                if let Some(h) = &q.host {
                    path.push_str(&format!("&host={h}"));
                }
                let url = api.url(&path);
                let resp = api
                    .request("GET", &url)
                    .call()
                    .map_err(|e| http_error(&url, e))?;
                let reader = std::io::BufReader::new(resp.into_reader());
                for line in reader.lines() {
                    let line = line.map_err(|source| ClientError::Body {
                        url: url.clone(),
                        source,
                    })?;
                    if let Some(data) = line.strip_prefix("data:") {
                        if let Ok(ev) = serde_json::from_str::<Event>(data.trim()) {
                            if !on_event(&ev) {
                                return Ok(());
                            }
                        }
                    }
                }
                Ok(())
            }
            Source::Store(dir) => {
                let store = Store::open_read_only(dir)?;
                let mut since = q.since.unwrap_or(0);
                loop {
                    let batch = store.events(&EventQuery {
                        hosts: None,
                        selector: None,
                        host: q.host.clone(),
                        since: Some(since),
                        limit: None,
                    })?;
                    for ev in &batch {
                        since = ev.seq;
                        if !on_event(ev) {
                            return Ok(());
                        }
                    }
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
            }
        }
    }

    pub fn reconcile(&self, request: &ReconcileRequest) -> Result<String, ClientError> {
        self.post("/api/v1/reconcile", request)
    }

    pub fn rollback(&self, host: &str) -> Result<String, ClientError> {
        self.post(
            &format!("/api/v1/hosts/{host}/rollback"),
            ReconcileRequest::default(),
        )
    }

    pub fn reboot(&self, host: &str) -> Result<String, ClientError> {
        self.post(
            &format!("/api/v1/hosts/{host}/reboot"),
            serde_json::json!({}),
        )
    }

    pub fn resume(&self, host: &str) -> Result<String, ClientError> {
        self.post(
            &format!("/api/v1/hosts/{host}/resume"),
            ReconcileRequest::default(),
        )
    }

    /// The sequence number of the newest event (0: none yet): where a
    /// command that waits for what follows starts reading.
    pub fn newest_seq(&self) -> Result<u64, ClientError> {
        let newest = self.events(&EventQuery {
            limit: Some(1),
            ..EventQuery::default()
        })?;
        Ok(newest.last().map_or(0, |e| e.seq))
    }

    /// The hosts whose labels match `selector` (`role=web,…`); only a
    /// running controller knows the labels.
    pub fn select(&self, selector: &str) -> Result<Vec<String>, ClientError> {
        match self {
            Source::Api(api) => {
                Self::get_with(api, "/api/v1/hosts", &[("selector", selector.to_string())])
            }
            Source::Store(_) => Err(ClientError::NeedsController),
        }
    }

    pub fn approve(&self, revision: &str, wave: Option<String>) -> Result<String, ClientError> {
        self.post(
            "/api/v1/approve",
            crate::api::ApproveRequest {
                revision: revision.to_string(),
                wave,
            },
        )
    }

    pub fn accept(&self, revision: &str) -> Result<String, ClientError> {
        self.post(
            "/api/v1/accept",
            crate::api::AcceptRequest {
                revision: revision.to_string(),
            },
        )
    }

    /// What `revision` (default: the branch head) would do to the fleet or
    /// to `host`; only a running controller can say.
    pub fn plan(
        &self,
        revision: Option<&str>,
        host: Option<&str>,
        activation: bool,
    ) -> Result<crate::plan::Plan, ClientError> {
        let Source::Api(api) = self else {
            return Err(ClientError::NeedsController);
        };
        let mut query = vec![("activation", activation.to_string())];
        if let Some(revision) = revision {
            query.push(("revision", revision.to_string()));
        }
        if let Some(host) = host {
            query.push(("host", host.to_string()));
        }
        Self::get_with(api, crate::api::access::PLAN_PATH, &query)
    }

    /// Asks the controller to act; only a running controller can.
    fn post(&self, path: &str, body: impl serde::Serialize) -> Result<String, ClientError> {
        let Source::Api(api) = self else {
            return Err(ClientError::NeedsController);
        };
        let url = api.url(path);
        let resp = api
            .request("POST", &url)
            .send_json(body)
            .map_err(|e| http_error(&url, e))?;
        let body: ReconcileResponse = resp
            .into_json()
            .map_err(|source| ClientError::Body { url, source })?;
        Ok(body.message)
    }
}

fn http_error(url: &str, e: ureq::Error) -> ClientError {
    match e {
        ureq::Error::Status(code, resp) => {
            let message = resp
                .into_json::<ErrorResponse>()
                .map(|b| b.error)
                .unwrap_or_else(|_| "no details".to_string());
            ClientError::Status {
                url: url.to_string(),
                code,
                message,
            }
        }
        ureq::Error::Transport(t) => ClientError::Unreachable {
            url: url.to_string(),
            source: Box::new(t),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{NewEvent, Phase, Reason};
    use crate::status::FleetStatus;

    #[test]
    fn the_fleet_part_from_the_store_counts_every_host_and_lists_none() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut status = FleetStatus::default();
        let r1 = "1".repeat(40);
        let news = vec![
            NewEvent::repo(Reason::SpecsLoaded, Some(&r1), "2 hosts"),
            NewEvent::host("a", Reason::Converged, Some(&r1), "").phase(Phase::Converged),
            NewEvent::host("b", Reason::BuildStarted, Some(&r1), "").phase(Phase::Building),
        ];
        store
            .append_all(&mut status, news, time::OffsetDateTime::UNIX_EPOCH)
            .unwrap();
        drop(store);
        let src = Source::Store(dir.path().to_path_buf());
        let whole = src.status().unwrap();
        let fleet = src.fleet_status().unwrap();
        assert!(fleet.hosts.is_empty());
        assert_eq!(whole.hosts.len(), 2);
        assert_eq!(fleet.rollout, whole.rollout);
        assert_eq!(fleet.revision, whole.revision);
    }
}
