//! Reading the store: the status as the log leaves it (the projection's
//! tables and the events they lag by, folded in), one host, the log
//! itself.

use std::sync::Arc;

use rusqlite::{params, OptionalExtension};

use super::{EventQuery, Lagging, Store, StoreError};
use crate::event::{Event, Reason};
use crate::status::{FleetStatus, HostStatus, RepoStatus};

impl Store {
    /// The sequence number of the newest event folded into the stored
    /// projection (0 for an empty store); cheap, for caches.
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT coalesce(max(seq), 0) FROM events", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|s| u64::try_from(s).unwrap_or(0))?)
    }

    /// The stored projection, read in one transaction (one consistent
    /// snapshot of the repository row and the host rows).
    pub fn load_status(&self) -> Result<FleetStatus, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let status = self.read_status()?;
        tx.finish()?;
        Ok(status)
    }

    /// The tables' projection, and the events after it folded in.
    fn read_status(&self) -> Result<FleetStatus, StoreError> {
        Ok(self.read_lagging()?.0)
    }

    /// [`Store::read_status`], and what of the tables lags the log: the
    /// hosts the events after them name, and the repository row if there
    /// are any.
    fn read_lagging(&self) -> Result<(FleetStatus, Lagging), StoreError> {
        let mut status = self.read_tables()?;
        let mut stmt = self
            .conn
            .prepare_cached("SELECT body FROM events WHERE seq > ?1 ORDER BY seq")?;
        let mut rows = stmt.query([status.repo.last_seq])?;
        let mut lagging = Lagging::default();
        while let Some(row) = rows.next()? {
            let event = serde_json::from_str::<Event>(&row.get::<_, String>(0)?)?;
            status.apply(&event);
            lagging.hosts.extend(event.host);
            lagging.repo = true;
        }
        Ok((status, lagging))
    }

    /// [`Store::load_status`] for the connection that writes: the rows that
    /// lag the log are written with its next flush.
    pub fn load_status_to_write(&mut self) -> Result<FleetStatus, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let (status, lagging) = self.read_lagging()?;
        tx.finish()?;
        if lagging.repo {
            self.lagging = Lagging {
                since: Some(std::time::Instant::now()),
                ..lagging
            };
        }
        Ok(status)
    }

    pub(super) fn read_tables(&self) -> Result<FleetStatus, StoreError> {
        let repo = self.read_repo()?;
        let mut stmt = self.conn.prepare("SELECT body FROM hosts ORDER BY name")?;
        let bodies = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let mut hosts = std::collections::BTreeMap::new();
        for body in bodies {
            let host: HostStatus = serde_json::from_str(&body)?;
            hosts.insert(host.name.clone(), Arc::new(host));
        }
        Ok(FleetStatus { repo, hosts })
    }

    /// One host's status, without reading the others: its row and its
    /// events after the one the rows are as of.
    pub fn host(&self, name: &str) -> Result<Option<HostStatus>, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let body: Option<String> = self
            .conn
            .query_row("SELECT body FROM hosts WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        let mut status = FleetStatus::default();
        if let Some(body) = body {
            let host: HostStatus = serde_json::from_str(&body)?;
            status.hosts.insert(name.to_string(), Arc::new(host));
        }
        let mut stmt = self
            .conn
            .prepare_cached("SELECT body FROM events WHERE host = ?1 AND seq > ?2 ORDER BY seq")?;
        let mut rows = stmt.query(params![name, self.rows_as_of()?])?;
        while let Some(row) = rows.next()? {
            status.apply(&serde_json::from_str::<Event>(&row.get::<_, String>(0)?)?);
        }
        drop(rows);
        drop(stmt);
        tx.finish()?;
        Ok(status.hosts.remove(name).map(Arc::unwrap_or_clone))
    }

    /// The event the projection's tables are as of (the repository row's).
    pub(super) fn rows_as_of(&self) -> Result<u64, StoreError> {
        Ok(self.read_repo()?.last_seq)
    }

    fn read_repo(&self) -> Result<RepoStatus, StoreError> {
        let body: Option<String> = self
            .conn
            .query_row("SELECT body FROM repo WHERE id = 1", [], |r| r.get(0))
            .optional()?;
        Ok(match body {
            Some(body) => serde_json::from_str::<RepoStatus>(&body)?,
            None => RepoStatus::default(),
        })
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
             AND (?4 IS NULL OR host IN (SELECT value FROM json_each(?4)))
             ORDER BY seq {} LIMIT ?3",
            if newest_first { "DESC" } else { "ASC" }
        );
        let hosts = q.hosts.as_ref().map(serde_json::to_string).transpose()?;
        let mut stmt = self.conn.prepare(&sql)?;
        let bodies = stmt
            .query_map(params![since, q.host, limit, hosts], |r| {
                r.get::<_, String>(0)
            })?
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

    /// The events of one reason after `since`, in order, without parsing
    /// the others, and the newest sequence number looked at (where the
    /// next call starts): `cim simulate` waits for every host's
    /// `Converged` this way, at a fraction of the CPU of reading the log.
    pub fn events_of(&self, reason: Reason, since: u64) -> Result<(u64, Vec<Event>), StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, CASE WHEN reason = ?2 THEN body END FROM events WHERE seq > ?1 ORDER BY seq",
        )?;
        let mut rows = stmt.query(params![since, reason.to_string()])?;
        let (mut newest, mut events) = (since, Vec::new());
        while let Some(row) = rows.next()? {
            newest = row.get(0)?;
            if let Some(body) = row.get::<_, Option<String>>(1)? {
                events.push(serde_json::from_str::<Event>(&body)?);
            }
        }
        Ok((newest, events))
    }
}
