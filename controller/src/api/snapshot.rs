//! The serialized `GET /api/v1/status` response, kept up to date by
//! folding events (the same fold the controller uses) as the controller
//! broadcasts them, and from the store for any it missed, re-serializing
//! only the hosts they touched. A request on a busy 10,000-host controller
//! then costs a check of the newest sequence number and a copy of the
//! body, not a reload and serialization of every host.

use std::collections::{BTreeMap, BTreeSet};

use axum::body::Bytes;
use serde::Serialize;

use crate::event::Event;
use crate::status::FleetStatus;
use crate::store::{EventQuery, Store, StoreError};

/// Events folded per read while catching up.
const PAGE: u32 = 10_000;

pub(super) struct Snapshot {
    status: FleetStatus,
    /// Each host's JSON, in the response's order.
    fragments: BTreeMap<String, Vec<u8>>,
    /// Hosts folded since the body was rendered.
    dirty: BTreeSet<String>,
    /// Whether the body shows every folded event.
    rendered: bool,
    body: Bytes,
}

/// The response without its hosts: serialized first, then the hosts'
/// fragments are spliced in (see [`Snapshot::render`]).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Header<'a> {
    revision: &'a Option<String>,
    latest_revision: &'a Option<String>,
    message: &'a Option<String>,
    rollout: crate::rollout::Progress,
    trimmed_through: u64,
}

impl Snapshot {
    /// The whole status, read afresh.
    pub(super) fn load(store: &Store) -> Result<Snapshot, StoreError> {
        let status = store.load_status()?;
        let dirty = status.hosts.keys().cloned().collect();
        Ok(Snapshot {
            fragments: BTreeMap::new(),
            body: Bytes::new(),
            rendered: false,
            dirty,
            status,
        })
    }

    pub(super) fn seq(&self) -> u64 {
        self.status.repo.last_seq
    }

    /// The response as of every folded event.
    pub(super) fn body(&mut self) -> Result<Bytes, StoreError> {
        if !self.rendered {
            self.render()?;
        }
        Ok(self.body.clone())
    }

    /// Folds the next event; one the snapshot already has is skipped, and
    /// one after a gap is refused (`false`): the store fills the gap.
    pub(super) fn apply(&mut self, event: &Event) -> bool {
        if event.seq <= self.seq() {
            return true;
        }
        if event.seq != self.seq() + 1 {
            return false;
        }
        self.status.apply(event);
        if let Some(host) = &event.host {
            self.dirty.insert(host.clone());
        }
        self.rendered = false;
        true
    }

    /// Folds the events appended since the snapshot was made. `false` when
    /// some of them are gone (deleted by retention): load afresh then.
    pub(super) fn catch_up(&mut self, store: &Store) -> Result<bool, StoreError> {
        loop {
            let events = store.events(&EventQuery {
                host: None,
                since: Some(self.seq()),
                limit: Some(PAGE),
            })?;
            for event in &events {
                if !self.apply(event) {
                    return Ok(false);
                }
            }
            if events.len() < PAGE as usize {
                return Ok(true);
            }
        }
    }

    /// Re-serializes the hosts that changed and the response around them.
    fn render(&mut self) -> Result<(), StoreError> {
        for name in std::mem::take(&mut self.dirty) {
            match self.status.hosts.get(&name) {
                Some(host) => {
                    self.fragments.insert(name, serde_json::to_vec(host)?);
                }
                None => {
                    self.fragments.remove(&name);
                }
            }
        }
        let repo = &self.status.repo;
        let mut body = serde_json::to_vec(&Header {
            revision: &repo.revision,
            latest_revision: &repo.latest_revision,
            message: &repo.message,
            rollout: crate::rollout::progress(&self.status),
            trimmed_through: repo.trimmed_through,
        })?;
        body.pop(); // the closing brace
        let size: usize = self.fragments.values().map(|f| f.len() + 1).sum();
        body.reserve(size + 16);
        body.extend_from_slice(br#","hosts":["#);
        for (i, fragment) in self.fragments.values().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(fragment);
        }
        body.extend_from_slice(b"]}");
        self.body = Bytes::from(body);
        self.rendered = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::StatusResponse;
    use crate::event::{NewEvent, Phase, Reason};
    use time::OffsetDateTime;

    fn append(store: &mut Store, status: &mut FleetStatus, news: Vec<NewEvent>) {
        store
            .append_all(status, news, OffsetDateTime::UNIX_EPOCH)
            .unwrap();
    }

    #[test]
    fn a_caught_up_snapshot_is_the_status_as_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut status = FleetStatus::default();
        let host = |h: &str, r: Reason| NewEvent::host(h, r, Some("r1"), "m");
        append(
            &mut store,
            &mut status,
            vec![
                NewEvent::repo(Reason::SpecsLoaded, Some("r1"), "3 hosts"),
                host("a", Reason::BuildStarted).phase(Phase::Building),
                host("b", Reason::BuildStarted).phase(Phase::Building),
                host("c", Reason::BuildStarted).phase(Phase::Building),
            ],
        );
        let reader = Store::open_read_only(dir.path()).unwrap();
        let mut snapshot = Snapshot::load(&reader).unwrap();
        append(
            &mut store,
            &mut status,
            vec![
                host("a", Reason::Converged).phase(Phase::Converged),
                host("b", Reason::HostRemoved),
                host("d", Reason::BuildStarted).phase(Phase::Building),
            ],
        );
        assert!(snapshot.catch_up(&reader).unwrap());
        let served: StatusResponse = serde_json::from_slice(&snapshot.body().unwrap()).unwrap();
        let loaded = StatusResponse::from(reader.load_status().unwrap());
        assert_eq!(served, loaded);
        assert_eq!(served.hosts.len(), 3);
    }

    #[test]
    fn a_snapshot_behind_trimmed_events_asks_for_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut status = FleetStatus::default();
        let ev = || NewEvent::repo(Reason::RevisionDetected, Some("r1"), "new");
        append(&mut store, &mut status, vec![ev()]);
        let reader = Store::open_read_only(dir.path()).unwrap();
        let mut snapshot = Snapshot::load(&reader).unwrap();
        append(&mut store, &mut status, vec![ev(), ev(), ev()]);
        let retention = crate::store::Retention {
            max_events: Some(1),
            max_age: None,
        };
        store.trim(&retention, OffsetDateTime::UNIX_EPOCH).unwrap();
        assert!(!snapshot.catch_up(&reader).unwrap());
    }
}
