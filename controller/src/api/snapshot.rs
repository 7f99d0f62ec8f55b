//! The serialized `GET /api/v1/status` response, kept up to date by
//! folding events (the same fold the controller uses) as the controller
//! broadcasts them, and from the store for any it missed, re-serializing
//! only the hosts they touched and the blocks of the body they are in. A
//! request on a busy 10,000-host controller then costs the blocks that
//! changed, not a reload and serialization of every host.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use axum::body::Bytes;
use serde::Serialize;

use crate::event::Event;
use crate::status::FleetStatus;
use crate::store::{EventQuery, Store, StoreError};

/// Events folded per read while catching up.
const PAGE: u32 = 10_000;
/// Hosts per block of the body: a changed host re-renders its block, not
/// the whole body.
const BLOCK: usize = 256;

pub(super) struct Snapshot {
    status: FleetStatus,
    /// Each host's JSON.
    fragments: BTreeMap<String, Bytes>,
    /// The hosts' part of the body, in name order, in blocks of [`BLOCK`]
    /// hosts (each block but the first starts with a comma).
    blocks: Vec<Block>,
    /// Which block each host is in; emptied when a host comes or goes, so
    /// that the blocks are laid out again.
    block_of: HashMap<String, usize>,
    /// Hosts folded since the body was rendered.
    dirty: BTreeSet<String>,
    /// The response up to its hosts' array, `None` when it must be
    /// rendered again.
    head: Option<Bytes>,
}

struct Block {
    hosts: Vec<String>,
    bytes: Option<Bytes>,
}

/// The response without its hosts: serialized first, then the hosts'
/// fragments are spliced in (see [`Snapshot::parts`]).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Header<'a> {
    revision: &'a Option<String>,
    latest_revision: &'a Option<String>,
    message: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    window: &'a Option<String>,
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
            blocks: Vec::new(),
            block_of: HashMap::new(),
            head: None,
            dirty,
            status,
        })
    }

    /// The status as of every folded event.
    pub(super) fn status(&self) -> &FleetStatus {
        &self.status
    }

    pub(super) fn seq(&self) -> u64 {
        self.status.repo.last_seq
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
        self.head = None;
        true
    }

    /// Folds the events appended since the snapshot was made. `false` when
    /// some of them are gone (deleted by retention): load afresh then.
    pub(super) fn catch_up(&mut self, store: &Store) -> Result<bool, StoreError> {
        loop {
            let events = store.events(&EventQuery {
                hosts: None,
                selector: None,
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

    /// The response as of every folded event, in parts to send one after
    /// the other; only what changed since the last call is serialized.
    pub(super) fn parts(&mut self) -> Result<Vec<Bytes>, StoreError> {
        for name in std::mem::take(&mut self.dirty) {
            match self.status.hosts.get(&name) {
                Some(host) => {
                    let json = Bytes::from(serde_json::to_vec(host)?);
                    if self.fragments.insert(name.clone(), json).is_none() {
                        self.block_of.clear();
                    }
                    if let Some(block) = self
                        .block_of
                        .get(&name)
                        .and_then(|&b| self.blocks.get_mut(b))
                    {
                        block.bytes = None;
                    }
                }
                None => {
                    if self.fragments.remove(&name).is_some() {
                        self.block_of.clear();
                    }
                }
            }
        }
        if self.block_of.is_empty() && !self.fragments.is_empty() {
            self.lay_out();
        }
        let head = match &self.head {
            Some(head) => head.clone(),
            None => {
                let head = self.render_head()?;
                self.head = Some(head.clone());
                head
            }
        };
        let mut parts = Vec::with_capacity(self.blocks.len() + 2);
        parts.push(head);
        for (i, block) in self.blocks.iter_mut().enumerate() {
            let bytes = block.bytes.get_or_insert_with(|| {
                let mut out = Vec::new();
                for (j, name) in block.hosts.iter().enumerate() {
                    if i > 0 || j > 0 {
                        out.push(b',');
                    }
                    if let Some(fragment) = self.fragments.get(name) {
                        out.extend_from_slice(fragment);
                    }
                }
                Bytes::from(out)
            });
            parts.push(bytes.clone());
        }
        parts.push(Bytes::from_static(b"]}"));
        Ok(parts)
    }

    /// The response without its hosts (an empty list).
    pub(super) fn fleet_part(&mut self) -> Result<Vec<Bytes>, StoreError> {
        Ok(vec![self.render_head()?, Bytes::from_static(b"]}")])
    }

    /// Splits the hosts into blocks again (a host came or went).
    fn lay_out(&mut self) {
        let names: Vec<String> = self.fragments.keys().cloned().collect();
        self.blocks = names
            .chunks(BLOCK)
            .map(|chunk| Block {
                hosts: chunk.to_vec(),
                bytes: None,
            })
            .collect();
        self.block_of = self
            .blocks
            .iter()
            .enumerate()
            .flat_map(|(i, b)| b.hosts.iter().map(move |h| (h.clone(), i)))
            .collect();
    }

    /// Everything before the hosts' fragments.
    fn render_head(&self) -> Result<Bytes, StoreError> {
        let repo = &self.status.repo;
        let mut head = serde_json::to_vec(&Header {
            revision: &repo.revision,
            latest_revision: &repo.latest_revision,
            message: &repo.message,
            window: &repo.window,
            rollout: crate::rollout::progress(&self.status),
            trimmed_through: repo.trimmed_through,
        })?;
        head.pop(); // the closing brace
        head.extend_from_slice(br#","hosts":["#);
        Ok(Bytes::from(head))
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
        snapshot.parts().unwrap();
        assert!(snapshot.catch_up(&reader).unwrap());
        let body: Vec<u8> = snapshot.parts().unwrap().concat();
        let served: StatusResponse = serde_json::from_slice(&body).unwrap();
        let loaded = StatusResponse::from(reader.load_status().unwrap());
        assert_eq!(served, loaded);
        assert_eq!(served.hosts.len(), 3);

        let fleet: StatusResponse =
            serde_json::from_slice(&snapshot.fleet_part().unwrap().concat()).unwrap();
        assert!(fleet.hosts.is_empty());
        assert_eq!(fleet.revision, loaded.revision);
        assert_eq!(fleet.rollout, loaded.rollout);
    }

    #[test]
    fn a_change_in_one_block_of_a_large_fleet_is_the_status_as_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut status = FleetStatus::default();
        let host = |i: usize, r: Reason| NewEvent::host(&format!("h-{i:04}"), r, Some("r1"), "m");
        let news = (0..3 * BLOCK).map(|i| host(i, Reason::BuildStarted).phase(Phase::Building));
        append(&mut store, &mut status, news.collect());
        let reader = Store::open_read_only(dir.path()).unwrap();
        let mut snapshot = Snapshot::load(&reader).unwrap();
        snapshot.parts().unwrap();
        append(
            &mut store,
            &mut status,
            vec![host(BLOCK + 7, Reason::Converged).phase(Phase::Converged)],
        );
        assert!(snapshot.catch_up(&reader).unwrap());
        let body: Vec<u8> = snapshot.parts().unwrap().concat();
        let served: StatusResponse = serde_json::from_slice(&body).unwrap();
        assert_eq!(served, StatusResponse::from(reader.load_status().unwrap()));
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
