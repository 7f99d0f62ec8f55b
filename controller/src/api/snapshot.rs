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

use std::collections::VecDeque;
use std::sync::Arc;

use axum::body::Bytes;
use serde::Serialize;

use crate::feed::{Changes, HostChange};
use crate::status::{HostStatus, RepoStatus};
use crate::store::{Store, StoreError};

/// Hosts per block of the body: a changed host re-renders its block, not
/// the whole body.
const BLOCK: usize = 256;
/// Removed hosts remembered for `?since=`; past this many the oldest are
/// forgotten, and a client asking from before them gets the whole status.
const TOMBSTONES: usize = 100_000;

/// Architecture Invariant: the hosts are one list in name order, each
/// with everything a request needs of it, so that taking a commit's rows
/// is a walk along the list (not a lookup per host in several maps: at
/// 10,000 hosts those cache misses made taking them cost 2–5 µs a host),
/// and a block of the body is a range of it.
pub(super) struct Snapshot {
    repo: RepoStatus,
    /// Every host, in name order.
    hosts: Vec<Slot>,
    /// The hosts' part of the body: block `i` is the JSON of
    /// `hosts[i * BLOCK..]`'s next [`BLOCK`] hosts (each block but the
    /// first starts with a comma); `None`, or past the end, when it must
    /// be joined again.
    blocks: Vec<Option<Bytes>>,
    /// The response up to its hosts' array, `None` when it must be
    /// rendered again.
    head: Option<Bytes>,
    /// The rollout's progress as of `hosts`, `None` when it must be
    /// counted again: every answer has it, and counting it takes a pass
    /// over the hosts.
    progress: Option<crate::rollout::Progress>,
    /// Removed hosts, oldest first, each with the newest commit taken
    /// when its removal was (so in order of that sequence number).
    removed: VecDeque<(u64, String)>,
    /// The oldest `since` a change list can be made from: the store read's
    /// commit, raised as removed hosts are forgotten.
    horizon: u64,
}

struct Slot {
    name: String,
    status: Arc<HostStatus>,
    /// `status`'s JSON; `None` for a row the store read gave until it is
    /// first served.
    json: Option<Bytes>,
    /// The commit that last wrote the row, for `?since=`; 0 for a row the
    /// store read gave.
    written_at: u64,
}

impl Slot {
    /// The host's JSON, serialized the first time it is asked for.
    fn fragment(&mut self) -> Result<&Bytes, StoreError> {
        let json = match self.json.take() {
            Some(json) => json,
            None => crate::feed::row_json(&mut Vec::new(), &self.status)?,
        };
        Ok(self.json.insert(json))
    }
}

/// A list of changes, its hosts' JSON shared with the snapshot: joining
/// a busy second's changes (megabytes) is the answer's own work, done
/// after the snapshot is let go, so that requests answered at once join
/// theirs side by side instead of one after the other. A block whose
/// every host changed is the snapshot's own block, shared: when a commit
/// changes the whole fleet (a rollout's dispatch), every reader's list is
/// the whole body, joined once instead of once per reader.
pub(super) struct ChangeList {
    head: Vec<u8>,
    pieces: Vec<Piece>,
}

/// A part of a list of changes, in name order.
enum Piece {
    /// A block of the body, every host of it changed; each block but the
    /// first starts with a comma.
    Block(Bytes),
    /// One changed host's JSON.
    Host(Bytes),
}

impl ChangeList {
    /// The response, in parts like [`Snapshot::parts`]: the blocks as
    /// they are, each run of single hosts joined into one part.
    pub(super) fn join(self) -> Vec<Bytes> {
        let mut parts = Vec::with_capacity(2 + self.pieces.len().min(64));
        parts.push(Bytes::from(self.head));
        let mut pieces = self.pieces.into_iter().peekable();
        let mut first = true;
        while let Some(piece) = pieces.next() {
            match piece {
                // Only the first block has no comma, and nothing comes
                // before it.
                Piece::Block(block) => parts.push(match first && block.first() == Some(&b',') {
                    true => block.slice(1..),
                    false => block,
                }),
                Piece::Host(host) => {
                    let mut run = vec![host];
                    while let Some(Piece::Host(next)) =
                        pieces.next_if(|p| matches!(p, Piece::Host(_)))
                    {
                        run.push(next);
                    }
                    let length = run.iter().map(|h| h.len() + 1).sum();
                    let mut body = Vec::with_capacity(length);
                    for (i, host) in run.iter().enumerate() {
                        if i > 0 || !first {
                            body.push(b',');
                        }
                        body.extend_from_slice(host);
                    }
                    parts.push(Bytes::from(body));
                }
            }
            first = false;
        }
        parts.push(Bytes::from_static(b"]}"));
        parts
    }
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
        Ok(Snapshot {
            hosts: status
                .hosts
                .into_iter()
                .map(|(name, status)| Slot {
                    name,
                    status,
                    json: None,
                    written_at: 0,
                })
                .collect(),
            blocks: Vec::new(),
            head: None,
            progress: None,
            removed: VecDeque::new(),
            horizon: status.repo.last_seq,
            repo: status.repo,
        })
    }

    /// The repository row as of every folded event.
    pub(super) fn repo(&self) -> &RepoStatus {
        &self.repo
    }

    /// The hosts as of every folded event, in name order.
    pub(super) fn hosts(&self) -> impl Iterator<Item = &HostStatus> + Clone {
        self.hosts.iter().map(|s| &*s.status)
    }

    pub(super) fn seq(&self) -> u64 {
        self.repo.last_seq
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
        let mut changes: Vec<(String, HostChange)> = changes
            .hosts
            .into_iter()
            .filter(|(_, change)| change.seq > seq)
            .collect();
        changes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        // Rows of hosts already here are replaced where they are; hosts
        // that come or go are merged in afterwards, in one pass.
        let mut gone = Vec::new();
        let mut new = Vec::new();
        let mut at = 0;
        for (name, change) in changes {
            at = seek(&self.hosts, at, &name);
            let here = self.hosts.get_mut(at).filter(|s| s.name == name);
            match (change.row, here) {
                (Some(row), Some(slot)) => {
                    slot.status = row.status;
                    slot.json = Some(row.json);
                    slot.written_at = change.seq;
                    if let Some(block) = self.blocks.get_mut(at / BLOCK) {
                        *block = None;
                    }
                }
                (Some(row), None) => new.push((
                    at,
                    Slot {
                        name,
                        status: row.status,
                        json: Some(row.json),
                        written_at: change.seq,
                    },
                )),
                (None, here) => {
                    if here.is_some() {
                        gone.push(at);
                    }
                    // Marked with the commit taken, not the one that
                    // removed it: the list stays in order for
                    // `changes_since`, which reads it from the newest.
                    self.removed.push_back((repo.last_seq, name));
                }
            }
        }
        self.merge(gone, new);
        while self.removed.len() > TOMBSTONES {
            if let Some((seq, _)) = self.removed.pop_front() {
                self.horizon = self.horizon.max(seq);
            }
        }
        self.repo = repo;
        self.head = None;
        self.progress = None;
    }

    /// Removes the hosts at `gone` and puts in `new`, each before the host
    /// at its index (both in order); the blocks from the first place the
    /// list changed on are joined again.
    fn merge(&mut self, gone: Vec<usize>, new: Vec<(usize, Slot)>) {
        let first = gone.first().copied();
        let Some(first) = first.into_iter().chain(new.first().map(|n| n.0)).min() else {
            return;
        };
        let old = std::mem::take(&mut self.hosts);
        let mut hosts = Vec::with_capacity(old.len() + new.len() - gone.len());
        let mut gone = gone.into_iter().peekable();
        let mut new = new.into_iter().peekable();
        for (i, slot) in old.into_iter().enumerate() {
            while let Some((_, slot)) = new.next_if(|(at, _)| *at <= i) {
                hosts.push(slot);
            }
            if gone.next_if_eq(&i).is_none() {
                hosts.push(slot);
            }
        }
        hosts.extend(new.map(|(_, slot)| slot));
        self.hosts = hosts;
        self.blocks.truncate(first / BLOCK);
    }

    /// What changed after commit `since`: the hosts whose rows a later
    /// commit wrote and the hosts removed since, to be joined with
    /// [`ChangeList::join`] once the snapshot is let go. `None` if the
    /// snapshot does not remember that far back (the whole status is then
    /// the answer).
    pub(super) fn changes_since(&mut self, since: u64) -> Result<Option<ChangeList>, StoreError> {
        if since < self.horizon || since > self.seq() {
            return Ok(None);
        }
        let progress = self.progress();
        let removed: Vec<&str> = self
            .removed
            .iter()
            .rev()
            .take_while(|(seq, _)| *seq > since)
            .map(|(_, name)| name.as_str())
            .collect();
        let head = self.render_head(progress, Some(since), &removed)?;
        let count = self.hosts.len().div_ceil(BLOCK);
        self.blocks.resize(count, None);
        let mut pieces = Vec::new();
        for i in 0..count {
            let range = i * BLOCK..self.hosts.len().min((i + 1) * BLOCK);
            if self.hosts[range.clone()]
                .iter()
                .all(|s| s.written_at > since)
            {
                pieces.push(Piece::Block(self.block(i)?));
                continue;
            }
            for slot in self.hosts[range]
                .iter_mut()
                .filter(|s| s.written_at > since)
            {
                pieces.push(Piece::Host(slot.fragment()?.clone()));
            }
        }
        Ok(Some(ChangeList { head, pieces }))
    }

    /// The response as of every folded event, in parts to send one after
    /// the other; only what changed since the last call is joined again.
    pub(super) fn parts(&mut self) -> Result<Vec<Bytes>, StoreError> {
        let head = match &self.head {
            Some(head) => head.clone(),
            None => {
                let progress = self.progress();
                let head = Bytes::from(self.render_head(progress, None, &[])?);
                self.head = Some(head.clone());
                head
            }
        };
        let count = self.hosts.len().div_ceil(BLOCK);
        self.blocks.resize(count, None);
        let mut parts = Vec::with_capacity(count + 2);
        parts.push(head);
        for i in 0..count {
            parts.push(self.block(i)?);
        }
        parts.push(Bytes::from_static(b"]}"));
        Ok(parts)
    }

    /// Block `i` of the hosts' part of the body, joined again if a host
    /// in it changed since it was last joined. `self.blocks` must have
    /// room for it.
    fn block(&mut self, i: usize) -> Result<Bytes, StoreError> {
        if let Some(bytes) = &self.blocks[i] {
            return Ok(bytes.clone());
        }
        let end = self.hosts.len().min((i + 1) * BLOCK);
        let chunk = &mut self.hosts[i * BLOCK..end];
        // Sized first: a block grown by doubling would keep up to twice
        // its length.
        let mut length = 0;
        for slot in chunk.iter_mut() {
            length += slot.fragment()?.len() + 1;
        }
        let mut out = Vec::with_capacity(length);
        for (j, slot) in chunk.iter().enumerate() {
            if i > 0 || j > 0 {
                out.push(b',');
            }
            out.extend_from_slice(slot.json.as_deref().unwrap_or_default());
        }
        let bytes = Bytes::from(out);
        self.blocks[i] = Some(bytes.clone());
        Ok(bytes)
    }

    /// The response without its hosts (an empty list).
    pub(super) fn fleet_part(&mut self) -> Result<Vec<Bytes>, StoreError> {
        let progress = self.progress();
        Ok(vec![
            Bytes::from(self.render_head(progress, None, &[])?),
            Bytes::from_static(b"]}"),
        ])
    }

    /// The rollout's progress, counted once per commit taken.
    fn progress(&mut self) -> crate::rollout::Progress {
        if self.progress.is_none() {
            self.progress = Some(crate::rollout::progress_of(&self.repo, self.hosts()));
        }
        self.progress.clone().unwrap_or_default()
    }

    /// Everything before the hosts' fragments; `since` and `removed` for
    /// a list of changes.
    fn render_head(
        &self,
        rollout: crate::rollout::Progress,
        since: Option<u64>,
        removed: &[&str],
    ) -> Result<Vec<u8>, StoreError> {
        let repo = &self.repo;
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

/// The first index at or after `from` whose host is not before `name` in
/// `hosts` (in name order): a search that widens from `from`, so that a
/// walk through names in order costs what the hosts between them do.
fn seek(hosts: &[Slot], from: usize, name: &str) -> usize {
    let rest = hosts.get(from..).unwrap_or_default();
    let mut bound = 1;
    while bound < rest.len() && rest[bound - 1].name.as_str() < name {
        bound *= 2;
    }
    let low = (bound / 2).min(rest.len());
    let high = bound.min(rest.len());
    from + low + rest[low..high].partition_point(|s| s.name.as_str() < name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::StatusResponse;
    use crate::event::{NewEvent, Phase, Reason};
    use crate::feed::StatusFeed;
    use crate::status::FleetStatus;
    use std::collections::BTreeMap;
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
        let read = reader.load_status().unwrap();
        assert_eq!(snapshot.repo(), &read.repo);
        assert!(snapshot.hosts().eq(read.hosts.values().map(|h| &**h)));

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
            let parts = snapshot.changes_since(since).unwrap()?.join();
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
    fn a_list_of_changes_shares_the_blocks_whose_every_host_changed() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut status = FleetStatus::default();
        let feed = StatusFeed::default();
        feed.follow();
        let hosts = 3 * BLOCK + 10;
        let host = |i: usize, r: Reason| NewEvent::host(&format!("h-{i:04}"), r, Some("r1"), "m");
        let building = |i: usize| host(i, Reason::BuildStarted).phase(Phase::Building);
        let converged = |i: usize| host(i, Reason::Converged).phase(Phase::Converged);
        commit(
            &mut store,
            &mut status,
            Some(&feed),
            (0..hosts).map(building).collect(),
        );
        let reader = Store::open_read_only(dir.path()).unwrap();
        let mut snapshot = Snapshot::load(&reader).unwrap();
        snapshot.absorb(feed.take());
        let first = served(&mut snapshot);
        let list = |snapshot: &mut Snapshot| -> (Vec<Bytes>, StatusResponse) {
            let parts = snapshot.changes_since(first.seq).unwrap().unwrap().join();
            let answer = serde_json::from_slice(&parts.concat()).unwrap();
            (parts, answer)
        };

        // Every host of the second block and of the last (short) one: the
        // list starts with a block that is not the first.
        let whole: Vec<usize> = (BLOCK..2 * BLOCK).chain(3 * BLOCK..hosts).collect();
        let news = whole.iter().map(|&i| converged(i)).collect();
        commit(&mut store, &mut status, Some(&feed), news);
        snapshot.absorb(feed.take());
        let (parts, answer) = list(&mut snapshot);
        assert_eq!(answer.hosts.len(), whole.len());
        assert_eq!(applied(&first, answer), served(&mut snapshot));
        assert_eq!(parts.len(), 4, "the head, two blocks, the end: {parts:?}");

        // And two hosts of the first block: single hosts, then the blocks.
        let news = vec![converged(5), converged(6)];
        commit(&mut store, &mut status, Some(&feed), news);
        snapshot.absorb(feed.take());
        let (parts, answer) = list(&mut snapshot);
        assert_eq!(answer.hosts.len(), whole.len() + 2);
        let now = served(&mut snapshot);
        assert_eq!(applied(&first, answer), now);
        assert_eq!(now, StatusResponse::from(reader.load_status().unwrap()));
        let blocks = snapshot.parts().unwrap();
        for block in [&blocks[2], &blocks[4]] {
            assert!(
                parts.iter().any(|p| p.as_ptr() == block.as_ptr()),
                "a changed block is the body's own, not a copy"
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Hosts that come, change and go across block boundaries, over
        /// several commits: the served body is always the store's read.
        #[test]
        fn any_commits_absorbed_are_the_status_as_loaded(
            first in proptest::collection::btree_set(0usize..700, 0..600),
            commits in proptest::collection::vec(
                proptest::collection::btree_map(0usize..700, 0u8..3, 0..300),
                1..4,
            ),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut store = Store::open(dir.path()).unwrap();
            let mut status = FleetStatus::default();
            let feed = StatusFeed::default();
            let name = |i: usize| format!("h-{i:03}");
            let building = |i: usize| {
                NewEvent::host(&name(i), Reason::BuildStarted, Some("r1"), "m").phase(Phase::Building)
            };
            let mut news: Vec<NewEvent> = first.iter().map(|&i| building(i)).collect();
            news.push(NewEvent::repo(Reason::SpecsLoaded, Some("r1"), "loaded"));
            commit(&mut store, &mut status, None, news);
            feed.follow();
            let reader = Store::open_read_only(dir.path()).unwrap();
            let mut snapshot = Snapshot::load(&reader).unwrap();
            snapshot.parts().unwrap();
            for changes in commits {
                let mut news: Vec<NewEvent> = changes
                    .into_iter()
                    .filter(|&(i, op)| op != 2 || status.hosts.contains_key(&name(i)))
                    .map(|(i, op)| match op {
                        0 => building(i),
                        1 => NewEvent::host(&name(i), Reason::Converged, Some("r1"), "m")
                            .phase(Phase::Converged),
                        _ => NewEvent::host(&name(i), Reason::HostRemoved, Some("r1"), "m"),
                    })
                    .collect();
                news.push(NewEvent::repo(Reason::SpecsLoaded, Some("r1"), "next"));
                commit(&mut store, &mut status, Some(&feed), news);
                snapshot.absorb(feed.take());
                let loaded = StatusResponse::from(reader.load_status().unwrap());
                proptest::prop_assert_eq!(served(&mut snapshot), loaded);
            }
        }
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
