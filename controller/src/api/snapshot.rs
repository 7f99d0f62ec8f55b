//! The serialized `GET /api/v1/status` response: read from the store
//! once, then kept up to date from the controller's status feed (the rows
//! its commits wrote, with their JSON), joining again only the blocks of
//! the body that changed hosts are in. A request on a busy 10,000-host
//! controller then costs the blocks that changed — never a read of the
//! log, a fold or a host serialized again.
//!
//! It also answers `?since=SEQ`: the hosts whose rows changed after that
//! commit and the hosts removed since, so that a client polling the status
//! of a large fleet (the dashboard) fetches what changed, not 5.8 MB of
//! 10,000 hosts each time. A client asking from before what the snapshot
//! remembers gets the whole status instead, without `since`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use axum::body::Bytes;
use serde::Serialize;

use crate::feed::Changes;
use crate::status::FleetStatus;
use crate::store::{Store, StoreError};

/// Hosts per block of the body: a changed host re-renders its block, not
/// the whole body.
const BLOCK: usize = 256;
/// Removed hosts remembered for `?since=`; past this many the oldest are
/// forgotten, and a client asking from before them gets the whole status.
const TOMBSTONES: usize = 100_000;

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
    /// The rollout's progress as of `status`, `None` when it must be
    /// counted again: every answer has it, and counting it takes a pass
    /// over the hosts.
    progress: Option<crate::rollout::Progress>,
    /// The commit that last wrote each host's row, for `?since=`. Hosts
    /// the store read gave and no commit changed since are not in it.
    written_at: HashMap<String, u64>,
    /// Removed hosts, oldest first, each with the newest commit taken
    /// when its removal was (so in order of that sequence number).
    removed: VecDeque<(u64, String)>,
    /// The oldest `since` a change list can be made from: the store read's
    /// commit, raised as removed hosts are forgotten.
    horizon: u64,
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
    seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    since: Option<u64>,
    #[serde(skip_serializing_if = "<[&str]>::is_empty")]
    removed: &'a [&'a str],
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
            progress: None,
            written_at: HashMap::new(),
            removed: VecDeque::new(),
            horizon: status.repo.last_seq,
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
                    self.written_at.insert(name.clone(), change.seq);
                    self.stale(&name);
                }
                (Some(row), None) => {
                    self.status.hosts.insert(name.clone(), row.status);
                    self.written_at.insert(name.clone(), change.seq);
                    self.fragments.insert(name, row.json);
                    relayout = true;
                }
                (None, _) => {
                    self.status.hosts.remove(&name);
                    self.written_at.remove(&name);
                    relayout |= self.fragments.remove(&name).is_some();
                    // Marked with the commit taken, not the one that
                    // removed it: the list stays in order for
                    // `changes_since`, which reads it from the newest.
                    self.removed.push_back((repo.last_seq, name));
                }
            }
        }
        if relayout {
            self.block_of.clear();
        }
        while self.removed.len() > TOMBSTONES {
            if let Some((seq, _)) = self.removed.pop_front() {
                self.horizon = self.horizon.max(seq);
            }
        }
        self.status.repo = repo;
        self.head = None;
        self.progress = None;
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

    /// What changed after commit `since`: the hosts whose rows a later
    /// commit wrote and the hosts removed since, in parts like
    /// [`Snapshot::parts`]. `None` if the snapshot does not remember that
    /// far back (the whole status is then the answer).
    pub(super) fn changes_since(&mut self, since: u64) -> Result<Option<Vec<Bytes>>, StoreError> {
        if since < self.horizon || since > self.seq() {
            return Ok(None);
        }
        let progress = self.progress();
        let mut changed: Vec<&String> = self
            .written_at
            .iter()
            .filter(|(_, &seq)| seq > since)
            .map(|(name, _)| name)
            .collect();
        changed.sort_unstable();
        let removed: Vec<&str> = self
            .removed
            .iter()
            .rev()
            .take_while(|(seq, _)| *seq > since)
            .map(|(_, name)| name.as_str())
            .collect();
        let mut head = self.render_head(progress, Some(since), &removed)?;
        let mut body = Vec::with_capacity(head.len() + changed.len() * 600 + 2);
        body.append(&mut head);
        for (i, name) in changed.into_iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            if let Some(fragment) = self.fragments.get(name.as_str()) {
                body.extend_from_slice(fragment);
            }
        }
        body.extend_from_slice(b"]}");
        Ok(Some(vec![Bytes::from(body)]))
    }

    /// The response as of every folded event, in parts to send one after
    /// the other; only what changed since the last call is serialized.
    pub(super) fn parts(&mut self) -> Result<Vec<Bytes>, StoreError> {
        for name in std::mem::take(&mut self.dirty) {
            match self.status.hosts.get(&name) {
                Some(host) => {
                    let json = Bytes::from(serde_json::to_vec(&**host)?);
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
                let progress = self.progress();
                let head = Bytes::from(self.render_head(progress, None, &[])?);
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
        let progress = self.progress();
        Ok(vec![
            Bytes::from(self.render_head(progress, None, &[])?),
            Bytes::from_static(b"]}"),
        ])
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

    /// The rollout's progress, counted once per commit taken.
    fn progress(&mut self) -> crate::rollout::Progress {
        self.progress
            .get_or_insert_with(|| crate::rollout::progress(&self.status))
            .clone()
    }

    /// Everything before the hosts' fragments; `since` and `removed` for
    /// a list of changes.
    fn render_head(
        &self,
        rollout: crate::rollout::Progress,
        since: Option<u64>,
        removed: &[&str],
    ) -> Result<Vec<u8>, StoreError> {
        let repo = &self.status.repo;
        let mut head = serde_json::to_vec(&Header {
            seq: repo.last_seq,
            since,
            removed,
            revision: &repo.revision,
            latest_revision: &repo.latest_revision,
            message: &repo.message,
            window: &repo.window,
            rollout,
            trimmed_through: repo.trimmed_through,
        })?;
        head.pop(); // the closing brace
        head.extend_from_slice(br#","hosts":["#);
        Ok(head)
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

    /// `then` with a list of changes applied, as a client applies it.
    fn applied(then: &StatusResponse, changes: StatusResponse) -> StatusResponse {
        let mut hosts: BTreeMap<String, crate::status::HostStatus> = then
            .hosts
            .iter()
            .map(|h| (h.name.clone(), h.clone()))
            .collect();
        for name in &changes.removed {
            hosts.remove(name);
        }
        for host in changes.hosts {
            hosts.insert(host.name.clone(), host);
        }
        StatusResponse {
            since: None,
            removed: Vec::new(),
            hosts: hosts.into_values().collect(),
            ..changes
        }
    }

    #[test]
    fn the_changes_since_a_status_applied_to_it_are_the_status_now() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut status = FleetStatus::default();
        let feed = StatusFeed::default();
        let host = |h: &str, r: Reason| NewEvent::host(h, r, Some("r1"), "m");
        let building = |h: &str| host(h, Reason::BuildStarted).phase(Phase::Building);
        commit(
            &mut store,
            &mut status,
            None,
            vec![building("a"), building("b"), building("c")],
        );
        feed.follow();
        let reader = Store::open_read_only(dir.path()).unwrap();
        let mut snapshot = Snapshot::load(&reader).unwrap();
        let first = served(&mut snapshot);
        assert_eq!(first.seq, 3);
        commit(&mut store, &mut status, Some(&feed), vec![building("e")]);
        snapshot.absorb(feed.take());
        let second = served(&mut snapshot);
        commit(
            &mut store,
            &mut status,
            Some(&feed),
            vec![
                host("a", Reason::Converged).phase(Phase::Converged),
                host("b", Reason::HostRemoved),
                building("d"),
                host("e", Reason::HostRemoved),
                building("e"),
            ],
        );
        snapshot.absorb(feed.take());
        let now = served(&mut snapshot);
        let changes = |snapshot: &mut Snapshot, since| -> Option<StatusResponse> {
            let parts = snapshot.changes_since(since).unwrap()?;
            Some(serde_json::from_slice(&parts.concat()).unwrap())
        };

        let since_first = changes(&mut snapshot, first.seq).unwrap();
        assert_eq!(since_first.since, Some(first.seq));
        let names: Vec<&str> = since_first.hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["a", "d", "e"], "only what changed, in name order");
        assert_eq!(since_first.removed, ["b"], "e came back in the same commit");
        assert_eq!(applied(&first, since_first), now);
        assert_eq!(
            applied(&second, changes(&mut snapshot, second.seq).unwrap()),
            now
        );

        let none = changes(&mut snapshot, now.seq).unwrap();
        assert!(none.hosts.is_empty() && none.removed.is_empty());
        assert_eq!(applied(&now, none), now);
        assert!(
            changes(&mut snapshot, first.seq - 1).is_none(),
            "from before the store was read: the whole status"
        );
        assert!(changes(&mut snapshot, now.seq + 1).is_none());
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
