//! The durable event log and status projection, in SQLite (WAL mode).
//!
//! Appending an event and writing the projection rows it changes happen in one
//! transaction, so after a crash the log and the projection never disagree,
//! and an event is acknowledged only once it is on disk. Readers (the API, the
//! CLI with `--state-dir`) open their own connections; WAL lets them read while
//! the controller writes.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use time::OffsetDateTime;

use crate::event::{Event, NewEvent, EVENT_SCHEMA_VERSION};
use crate::status::{FleetStatus, HostStatus, RepoStatus};

/// File name of the database inside the state directory.
pub const DB_FILE: &str = "cim.db";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("no store at {0}: has `cim run` used this state directory?")]
    Missing(PathBuf),
    #[error("the store at {path} has schema version {found}, this cim understands {EVENT_SCHEMA_VERSION}")]
    Schema { path: PathBuf, found: u32 },
    #[error("store query failed")]
    Sql(#[from] rusqlite::Error),
    #[error("a stored record does not parse")]
    Corrupt(#[from] serde_json::Error),
}

/// Which events to read.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub host: Option<String>,
    /// Only events with a larger sequence number.
    pub since: Option<u64>,
    /// At most this many, the newest ones when `since` is not given.
    pub limit: Option<u32>,
}

pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if needed) the store in `state_dir` for writing.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let path = state_dir.join(DB_FILE);
        let open_err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        let version: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(open_err)?;
        if version == 0 {
            conn.execute_batch(SCHEMA).map_err(open_err)?;
            conn.pragma_update(None, "user_version", EVENT_SCHEMA_VERSION)
                .map_err(open_err)?;
        } else if version != EVENT_SCHEMA_VERSION {
            return Err(StoreError::Schema {
                path,
                found: version,
            });
        }
        Ok(Store { conn })
    }

    /// Opens an existing store read-only, for the CLI and the API.
    pub fn open_read_only(state_dir: &Path) -> Result<Store, StoreError> {
        let path = state_dir.join(DB_FILE);
        if !path.exists() {
            return Err(StoreError::Missing(path));
        }
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Store { conn })
    }

    /// Appends `new` to the log and folds it into `status`, writing the
    /// changed projection rows in the same transaction. `status` is only
    /// changed if the transaction commits.
    pub fn append(
        &mut self,
        status: &mut FleetStatus,
        new: NewEvent,
        now: OffsetDateTime,
    ) -> Result<Event, StoreError> {
        let seq = status.repo.last_seq + 1;
        let from = new.host.as_deref().and_then(|h| status.phase_of(h));
        let event = new.into_event(seq, now, from);
        let mut next = status.clone();
        next.apply(&event);

        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO events (seq, host, reason, body) VALUES (?1, ?2, ?3, ?4)",
            params![
                event.seq,
                event.host,
                event.reason.to_string(),
                serde_json::to_string(&event)?
            ],
        )?;
        if let Some(name) = &event.host {
            match next.hosts.get(name) {
                Some(host) => {
                    tx.execute(
                        "INSERT INTO hosts (name, body) VALUES (?1, ?2)
                         ON CONFLICT(name) DO UPDATE SET body = excluded.body",
                        params![name, serde_json::to_string(host)?],
                    )?;
                }
                None => {
                    tx.execute("DELETE FROM hosts WHERE name = ?1", params![name])?;
                }
            }
        }
        tx.execute(
            "INSERT INTO repo (id, body) VALUES (1, ?1)
             ON CONFLICT(id) DO UPDATE SET body = excluded.body",
            params![serde_json::to_string(&next.repo)?],
        )?;
        tx.commit()?;
        *status = next;
        Ok(event)
    }

    /// Whether the store takes writes (after one failed): rewrites the
    /// repository row as it is, in a real transaction.
    pub fn check_writable(&mut self) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute("UPDATE repo SET body = body WHERE id = 1", [])?;
        tx.prepare("SELECT seq FROM events LIMIT 0")?;
        tx.commit()?;
        Ok(())
    }

    /// The stored projection.
    pub fn load_status(&self) -> Result<FleetStatus, StoreError> {
        let repo: Option<String> = self
            .conn
            .query_row("SELECT body FROM repo WHERE id = 1", [], |r| r.get(0))
            .optional()?;
        let repo = match repo {
            Some(body) => serde_json::from_str::<RepoStatus>(&body)?,
            None => RepoStatus::default(),
        };
        let mut stmt = self.conn.prepare("SELECT body FROM hosts ORDER BY name")?;
        let bodies = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let mut hosts = std::collections::BTreeMap::new();
        for body in bodies {
            let host: HostStatus = serde_json::from_str(&body)?;
            hosts.insert(host.name.clone(), host);
        }
        Ok(FleetStatus { repo, hosts })
    }

    /// Events in sequence order.
    pub fn events(&self, q: &EventQuery) -> Result<Vec<Event>, StoreError> {
        let since = q.since.unwrap_or(0);
        let limit = q.limit.map_or(-1, i64::from);
        // Without `since`, a limit means "the newest N", as `kubectl get
        // events` shows the recent past; with it, "the next N" for paging.
        let newest_first = q.since.is_none() && q.limit.is_some();
        let sql = format!(
            "SELECT body FROM events WHERE seq > ?1 AND (?2 IS NULL OR host = ?2)
             ORDER BY seq {} LIMIT ?3",
            if newest_first { "DESC" } else { "ASC" }
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let bodies = stmt
            .query_map(params![since, q.host, limit], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let mut events = bodies
            .iter()
            .map(|b| serde_json::from_str::<Event>(b))
            .collect::<Result<Vec<_>, _>>()?;
        if newest_first {
            events.reverse();
        }
        Ok(events)
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq    INTEGER PRIMARY KEY,
    host   TEXT,
    reason TEXT NOT NULL,
    body   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_host ON events (host, seq);
CREATE TABLE IF NOT EXISTS hosts (
    name TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS repo (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    body TEXT NOT NULL
);
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Phase, Reason};

    fn t(s: i64) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(s)
    }

    fn sample(store: &mut Store, status: &mut FleetStatus) {
        let evs = vec![
            NewEvent::repo(Reason::RevisionDetected, Some("r1"), "new head"),
            NewEvent::repo(Reason::SpecsLoaded, Some("r1"), "2 hosts"),
            NewEvent::host("a", Reason::BuildStarted, Some("r1"), "").phase(Phase::Building),
            NewEvent::host("b", Reason::BuildStarted, Some("r1"), "").phase(Phase::Building),
            NewEvent::host("a", Reason::BuildSucceeded, Some("r1"), "")
                .phase(Phase::Pending)
                .system("/nix/store/a"),
            NewEvent::host("b", Reason::BuildFailed, Some("r1"), "error: boom")
                .phase(Phase::Failed),
            NewEvent::host("a", Reason::Converged, Some("r1"), "")
                .phase(Phase::Converged)
                .system("/nix/store/a"),
            NewEvent::host("b", Reason::HostRemoved, Some("r1"), "gone"),
        ];
        for (i, ev) in evs.into_iter().enumerate() {
            store.append(status, ev, t(i as i64)).unwrap();
        }
    }

    #[test]
    fn the_projection_is_rebuilt_from_events_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut status = FleetStatus::default();
        sample(&mut store, &mut status);

        let stored = Store::open_read_only(dir.path())
            .unwrap()
            .load_status()
            .unwrap();
        let events = store.events(&EventQuery::default()).unwrap();
        assert_eq!(events.len(), 8);
        assert_eq!(FleetStatus::replay(&events), stored);
        assert_eq!(stored, status);
        assert_eq!(stored.hosts.len(), 1);
    }

    #[test]
    fn a_reopened_store_carries_on_without_gaps() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = Store::open(dir.path()).unwrap();
            sample(&mut store, &mut FleetStatus::default());
        }
        let mut store = Store::open(dir.path()).unwrap();
        let mut status = store.load_status().unwrap();
        let ev = store
            .append(
                &mut status,
                NewEvent::repo(Reason::RevisionDetected, Some("r2"), ""),
                t(9),
            )
            .unwrap();
        assert_eq!(ev.seq, 9);
        let seqs: Vec<u64> = store
            .events(&EventQuery::default())
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, (1..=9).collect::<Vec<_>>());
    }

    #[test]
    fn queries_filter_by_host_since_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        sample(&mut store, &mut FleetStatus::default());
        let q = |host: Option<&str>, since, limit| EventQuery {
            host: host.map(str::to_string),
            since,
            limit,
        };
        let seqs = |q| -> Vec<u64> { store.events(&q).unwrap().iter().map(|e| e.seq).collect() };
        assert_eq!(seqs(q(Some("a"), None, None)), vec![3, 5, 7]);
        assert_eq!(seqs(q(None, Some(6), None)), vec![7, 8]);
        assert_eq!(seqs(q(None, None, Some(2))), vec![7, 8]);
        assert_eq!(seqs(q(None, Some(2), Some(2))), vec![3, 4]);
    }

    #[test]
    fn read_only_open_of_a_missing_store_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let err = Store::open_read_only(dir.path()).err().unwrap();
        assert!(err.to_string().starts_with("no store at"), "{err}");
    }
}
