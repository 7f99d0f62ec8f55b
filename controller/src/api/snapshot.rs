//! The serialized `GET /api/v1/status` response: read from the store
//! once, then kept up to date from the controller's status feed (the rows
//! its commits wrote, with their JSON), joining again only the blocks of
//! the body that changed hosts are in. A request on a busy 10,000-host
//! controller then costs the blocks that changed — never a read of the
//! log, a fold or a host serialized again.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use axum::body::Bytes;
use serde::Serialize;

use crate::feed::Changes;
use crate::status::FleetStatus;
use crate::store::{Store, StoreError};

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
    /// Hosts read from the store and not serialized yet.
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

    /// Takes in what the controller's commits changed since: each host's
    /// new row (with its JSON, as the store wrote it) or its removal. A
    /// change the snapshot already holds (it was read from the store after
    /// that commit) is left out.
    pub(super) fn absorb(&mut self, changes: Changes) {
        let Some(repo) = changes.repo else {
            return;
        };
        let seq = self.seq();
        if repo.last_seq <= seq {
            return;
        }
        // In name order: the maps are ordered by name, and 10,000 hosts
        // added at once are inserted next to each other, not all over.
        let mut hosts: Vec<_> = changes
            .hosts
            .into_iter()
            .filter(|(_, change)| change.seq > seq)
            .collect();
        hosts.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut relayout = false;
        for (name, change) in hosts {
            if !self.dirty.is_empty() {
                self.dirty.remove(&name);
            }
            match (change.row, self.fragments.get_mut(&name)) {
                (Some(row), Some(fragment)) => {
                    *fragment = row.json;
                    if let Some(status) = self.status.hosts.get_mut(&name) {
                        *status = row.status;
                    }
                    self.stale(&name);
                }
                (Some(row), None) => {
                    self.status.hosts.insert(name.clone(), row.status);
                    self.fragments.insert(name, row.json);
                    relayout = true;
                }
                (None, _) => {
                    self.status.hosts.remove(&name);
                    relayout |= self.fragments.remove(&name).is_some();
                }
            }
        }
        if relayout {
            self.block_of.clear();
        }
        self.status.repo = repo;
        self.head = None;
    }

    /// The block `name` is in must be joined again.
    fn stale(&mut self, name: &str) {
        if let Some(block) = self
            .block_of
            .get(name)
            .and_then(|&b| self.blocks.get_mut(b))
        {
            block.bytes = None;
        }
    }

    /// The response as of every folded event, in parts to send one after
    /// the other; only what changed since the last call is serialized.
    pub(super) fn parts(&mut self) -> Result<Vec<Bytes>, StoreError> {
        for name in std::mem::take(&mut self.dirty) {
            match self.status.hosts.get(&name) {
                Some(host) => {
                    let json = Bytes::from(serde_json::to_vec(host)?);
                    match self.fragments.insert(name.clone(), json) {
                        None => self.block_of.clear(),
                        Some(_) => self.stale(&name),
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
    use crate::feed::StatusFeed;
    use time::OffsetDateTime;

    /// One group commit of `news`, published to `feed` if given.
    fn commit(
        store: &mut Store,
        status: &mut FleetStatus,
        feed: Option<&StatusFeed>,
        news: Vec<NewEvent>,
    ) {
        store.begin_group();
        store
            .append_all(status, news, OffsetDateTime::UNIX_EPOCH)
            .unwrap();
        let written = store.commit_group(status).unwrap();
        if let Some(feed) = feed {
            feed.publish(status, written);
        }
    }

    fn served(snapshot: &mut Snapshot) -> StatusResponse {
        serde_json::from_slice(&snapshot.parts().unwrap().concat()).unwrap()
    }

    #[test]
    fn a_snapshot_fed_by_commits_is_the_status_as_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut status = FleetStatus::default();
        let feed = StatusFeed::default();
        let host = |h: &str, r: Reason| NewEvent::host(h, r, Some("r1"), "m");
        commit(
            &mut store,
            &mut status,
            Some(&feed),
            vec![
                NewEvent::repo(Reason::SpecsLoaded, Some("r1"), "3 hosts"),
                host("a", Reason::BuildStarted).phase(Phase::Building),
                host("b", Reason::BuildStarted).phase(Phase::Building),
                host("c", Reason::BuildStarted).phase(Phase::Building),
            ],
        );
        feed.follow();
        let reader = Store::open_read_only(dir.path()).unwrap();
        let mut snapshot = Snapshot::load(&reader).unwrap();
        snapshot.parts().unwrap();
        commit(
            &mut store,
            &mut status,
            Some(&feed),
            vec![
                host("a", Reason::Converged).phase(Phase::Converged),
                host("b", Reason::HostRemoved),
                host("d", Reason::BuildStarted).phase(Phase::Building),
            ],
        );
        snapshot.absorb(feed.take());
        let loaded = StatusResponse::from(reader.load_status().unwrap());
        assert_eq!(served(&mut snapshot), loaded);
        assert_eq!(loaded.hosts.len(), 3);
        assert_eq!(snapshot.status(), &reader.load_status().unwrap());

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
        let feed = StatusFeed::default();
        feed.follow();
        let host = |i: usize, r: Reason| NewEvent::host(&format!("h-{i:04}"), r, Some("r1"), "m");
        let news = (0..3 * BLOCK).map(|i| host(i, Reason::BuildStarted).phase(Phase::Building));
        commit(&mut store, &mut status, Some(&feed), news.collect());
        let reader = Store::open_read_only(dir.path()).unwrap();
        let mut snapshot = Snapshot::load(&reader).unwrap();
        snapshot.absorb(feed.take());
        snapshot.parts().unwrap();
        commit(
            &mut store,
            &mut status,
            Some(&feed),
            vec![host(BLOCK + 7, Reason::Converged).phase(Phase::Converged)],
        );
        snapshot.absorb(feed.take());
        assert_eq!(
            served(&mut snapshot),
            StatusResponse::from(reader.load_status().unwrap())
        );
    }

    #[test]
    fn a_row_older_than_the_read_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut status = FleetStatus::default();
        let feed = StatusFeed::default();
        feed.follow();
        let host = |r: Reason, p: Phase| NewEvent::host("a", r, Some("r1"), "m").phase(p);
        commit(
            &mut store,
            &mut status,
            Some(&feed),
            vec![host(Reason::BuildStarted, Phase::Building)],
        );
        // Committed, and read by the snapshot, before it is published.
        commit(
            &mut store,
            &mut status,
            None,
            vec![host(Reason::Converged, Phase::Converged)],
        );
        let reader = Store::open_read_only(dir.path()).unwrap();
        let mut snapshot = Snapshot::load(&reader).unwrap();
        snapshot.absorb(feed.take());
        let loaded = StatusResponse::from(reader.load_status().unwrap());
        assert_eq!(served(&mut snapshot), loaded);
        assert_eq!(loaded.hosts[0].phase, Phase::Converged);
    }
}
