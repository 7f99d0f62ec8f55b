//! The status feed: what each group commit wrote to the projection — the
//! repository row and the changed hosts' rows, as the store serialized
//! them — handed from the controller to the API's status snapshot.
//!
//! The controller publishes after a group's commit and before it makes
//! the commit's sequence number known, so a reader that takes the feed
//! after learning of a commit holds that commit. The feed coalesces: a
//! host keeps only its newest row, so however far a reader falls behind
//! the feed holds at most one row per host, never loses a change, and
//! never sends the reader back to the store. Until somebody follows it
//! the feed keeps no rows at all (a controller nobody reads costs
//! nothing). The rows' JSON is the store's own: the API serves it as it
//! is, never serializing a host again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::status::{FleetStatus, HostStatus, RepoStatus};

/// A host's row as a commit left it.
#[derive(Debug, Clone)]
pub struct HostRow {
    /// Shared with the controller's projection, not copied.
    pub status: std::sync::Arc<HostStatus>,
    /// `status` as the store wrote it (and as `GET /api/v1/status` sends
    /// it).
    pub json: Bytes,
}

/// A host's change: its new row, or `None` when it was removed.
#[derive(Debug, Clone)]
pub struct HostChange {
    /// The sequence number of the last event of the commit that wrote it.
    pub seq: u64,
    pub row: Option<HostRow>,
}

/// What a group commit wrote: the hosts' rows it changed, each as the JSON
/// the store wrote (`None`: the host's row was deleted).
pub type WrittenRows = Vec<(String, Option<Bytes>)>;

/// A host's row as JSON, in an allocation of its own length: `scratch` is
/// reused from row to row. A row serialized straight into its own buffer
/// keeps the buffer's last doubling (1 KiB for a row of 550 bytes), and
/// the status snapshot holds one per host.
pub fn row_json(scratch: &mut Vec<u8>, host: &HostStatus) -> serde_json::Result<Bytes> {
    scratch.clear();
    serde_json::to_writer(&mut *scratch, host)?;
    Ok(Bytes::copy_from_slice(scratch))
}

/// The changes published since a reader last took them.
#[derive(Debug, Default)]
pub struct Changes {
    /// The repository row as of the newest commit (`None`: no commit).
    pub repo: Option<RepoStatus>,
    pub hosts: HashMap<String, HostChange>,
}

/// The feed; cheap to clone (every clone is the same feed).
#[derive(Clone, Default)]
pub struct StatusFeed {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Whether a reader follows the feed; until one does, rows are not
    /// kept.
    followed: AtomicBool,
    pending: Mutex<Changes>,
}

impl StatusFeed {
    fn pending(&self) -> MutexGuard<'_, Changes> {
        self.inner.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes a commit: `written` are the rows it wrote, `status` the
    /// projection it left (whose rows they are). Called after the commit,
    /// before its sequence number is made known.
    pub fn publish(&self, status: &FleetStatus, written: WrittenRows) {
        if !self.inner.followed.load(Ordering::Acquire) {
            return;
        }
        let seq = status.repo.last_seq;
        // The rows are made outside the lock: a reader taking the feed
        // waits for the map's inserts only.
        let rows: Vec<(String, HostChange)> = written
            .into_iter()
            .map(|(name, json)| {
                let row = match (json, status.hosts.get(&name)) {
                    (Some(json), Some(host)) => Some(HostRow {
                        status: host.clone(),
                        json,
                    }),
                    _ => None,
                };
                (name, HostChange { seq, row })
            })
            .collect();
        let repo = status.repo.clone();
        let mut pending = self.pending();
        pending.repo = Some(repo);
        pending.hosts.extend(rows);
    }

    /// Starts keeping rows for a reader, from the next commit on: a
    /// reader follows, then reads the store, then takes the feed (the
    /// rows it has that the store's read already holds are older than
    /// it, by their sequence numbers).
    pub fn follow(&self) {
        self.inner.followed.store(true, Ordering::Release);
    }

    /// Whether a reader follows (and the commits' rows are wanted).
    pub fn is_followed(&self) -> bool {
        self.inner.followed.load(Ordering::Acquire)
    }

    /// Takes every change published since the last take.
    pub fn take(&self) -> Changes {
        std::mem::take(&mut *self.pending())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{NewEvent, Phase, Reason};

    fn commit(status: &mut FleetStatus, host: &str, reason: Reason) -> WrittenRows {
        let seq = status.repo.last_seq + 1;
        let event = NewEvent::host(host, reason, Some("r"), "")
            .phase(Phase::Building)
            .into_event(seq, time::OffsetDateTime::UNIX_EPOCH, status.phase_of(host));
        status.apply(&event);
        vec![(
            host.to_string(),
            status
                .host(host)
                .map(|h| row_json(&mut Vec::new(), h).unwrap()),
        )]
    }

    #[test]
    fn nothing_is_kept_until_somebody_follows() {
        let feed = StatusFeed::default();
        let mut status = FleetStatus::default();
        let rows = commit(&mut status, "a", Reason::BuildStarted);
        feed.publish(&status, rows);
        let taken = feed.take();
        assert!(taken.repo.is_none() && taken.hosts.is_empty());
    }

    #[test]
    fn a_host_keeps_its_newest_row_and_a_removal() {
        let feed = StatusFeed::default();
        feed.follow();
        let mut status = FleetStatus::default();
        for reason in [Reason::BuildStarted, Reason::BuildSucceeded] {
            let rows = commit(&mut status, "a", reason);
            feed.publish(&status, rows);
        }
        let rows = commit(&mut status, "b", Reason::BuildStarted);
        feed.publish(&status, rows);
        let rows = commit(&mut status, "b", Reason::HostRemoved);
        feed.publish(&status, rows);

        let taken = feed.take();
        assert_eq!(taken.repo.map(|r| r.last_seq), Some(4));
        let a = &taken.hosts["a"];
        assert_eq!(a.seq, 2);
        let row = a.row.as_ref().unwrap();
        assert_eq!(row.status, status.hosts["a"]);
        assert_eq!(
            &row.json[..],
            serde_json::to_vec(&*status.hosts["a"]).unwrap()
        );
        assert!(taken.hosts["b"].row.is_none());
        // Taken once.
        assert!(feed.take().hosts.is_empty());
    }
}
