//! The durable event log and status projection, in SQLite (WAL mode).
//!
//! An event is acknowledged only once it is on disk. The projection's rows
//! are written behind the log, in their own transactions or with a group's,
//! always together with the repository row that names the last event they
//! hold; reading the stored status folds the events after it in, so after
//! a crash the log and the projection read never disagree. Readers (the
//! API, the CLI with `--state-dir`) open their own connections; WAL lets
//! them read while the controller writes.

mod checkpoint;
mod read;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use time::OffsetDateTime;

use crate::event::{Event, NewEvent, Phase, Reason, EVENT_SCHEMA_VERSION};
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
    #[error("cannot start the store's checkpoint thread")]
    Thread(#[source] std::io::Error),
    #[error("a failed write rolled back the whole group commit: the events appended before it in the group are not on disk")]
    GroupLost,
}

/// Which events to read.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub host: Option<String>,
    /// Only events of these hosts (a label selector's matches).
    pub hosts: Option<Vec<String>>,
    /// Asked of the API: only events of the hosts whose labels match this
    /// selector (`role=web`); the store itself does not know labels.
    pub selector: Option<String>,
    /// Only events with a larger sequence number.
    pub since: Option<u64>,
    /// At most this many, the newest ones when `since` is not given.
    pub limit: Option<u32>,
}

pub struct Store {
    conn: Connection,
    /// Between [`Store::begin_group`] and [`Store::commit_group`]: appends
    /// share one transaction (and one disk sync).
    grouped: bool,
    /// Set by [`Store::checkpoint_apart`].
    checkpointer: Option<checkpoint::Checkpointer>,
    /// The group has appended: [`Store::commit_group`] writes the
    /// repository row once, as the appends left it, rather than each.
    group_appended: bool,
    /// The hosts the group's appends changed: their rows are written once
    /// each, however many events they had.
    group_hosts: std::collections::BTreeSet<String>,
    /// What of the projection's tables lags the log: see
    /// [`Store::commit_group_with`].
    lagging: Lagging,
    /// The group's transaction is open (begun by its first append).
    group_open: bool,
    /// A failure rolled the group's transaction back whole (SQLite does so
    /// for a full disk or an I/O error): the group can only fail.
    group_lost: bool,
}

/// The projection rows that lag the log: these hosts' rows, the
/// repository row, since when.
#[derive(Debug, Default)]
struct Lagging {
    hosts: std::collections::BTreeSet<String>,
    repo: bool,
    since: Option<std::time::Instant>,
}

/// Which events `--event-retention` keeps: those younger than `max_age`
/// and, of those, the newest `max_events`. The default keeps everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Option<std::time::Duration>,
    pub max_events: Option<u64>,
}

impl Retention {
    /// `30d`, `1000000`, or both: `30d,1000000`.
    pub fn parse(s: &str) -> Result<Retention, String> {
        let mut r = Retention::default();
        for part in s.split(',').map(str::trim) {
            if let Ok(n) = part.parse::<u64>() {
                if n == 0 {
                    return Err("keeping 0 events would lose the history; give at least 1".into());
                }
                r.max_events = Some(n);
            } else {
                r.max_age = Some(crate::spec::parse_duration(part)?);
            }
        }
        Ok(r)
    }

    pub fn keeps_everything(&self) -> bool {
        self.max_age.is_none() && self.max_events.is_none()
    }
}

impl Store {
    fn on(conn: Connection) -> Store {
        Store {
            conn,
            grouped: false,
            checkpointer: None,
            group_appended: false,
            group_hosts: std::collections::BTreeSet::new(),
            group_open: false,
            group_lost: false,
            lagging: Lagging::default(),
        }
    }

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
        // Room for every statement an append runs (see `run_cached`).
        conn.set_prepared_statement_cache_capacity(32);
        let version: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(open_err)?;
        if version == 0 {
            conn.execute_batch(SCHEMA).map_err(open_err)?;
            conn.execute_batch(CURSORS).map_err(open_err)?;
            conn.pragma_update(None, "user_version", EVENT_SCHEMA_VERSION)
                .map_err(open_err)?;
        } else if version == EVENT_SCHEMA_VERSION {
            // Added after version 1 was released; harmless to repeat.
            conn.execute_batch(CURSORS).map_err(open_err)?;
        } else if version != EVENT_SCHEMA_VERSION {
            return Err(StoreError::Schema {
                path,
                found: version,
            });
        }
        Ok(Store::on(conn))
    }

    /// Checkpoints the log on a thread of its own from now on, never in
    /// this connection's commits: for the controller, whose commits
    /// everything waits for.
    pub fn checkpoint_apart(&mut self, state_dir: &Path) -> Result<(), StoreError> {
        self.checkpointer = Some(checkpoint::Checkpointer::start(
            state_dir,
            checkpoint::INTERVAL,
        )?);
        self.conn
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(StoreError::Sql)
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
        Ok(Store::on(conn))
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
        let mut events = self.append_all(status, vec![new], now)?;
        events
            .pop()
            .ok_or(StoreError::Sql(rusqlite::Error::QueryReturnedNoRows))
    }

    /// Appends events in order, in one transaction (one disk sync for all
    /// of them), with the projection rows they change. Only the rows they
    /// touch are folded, never the whole status, so the cost of an event
    /// does not grow with the fleet. `status` is only changed once the
    /// events are written (inside a group, in place: a row no reader
    /// shares is changed, not copied). Inside a group, the rows are written by
    /// [`Store::commit_group`]: a host that moves through several phases
    /// in one group (a build that succeeds and its copy that starts) has
    /// its row written once.
    pub fn append_all(
        &mut self,
        status: &mut FleetStatus,
        news: Vec<NewEvent>,
        now: OffsetDateTime,
    ) -> Result<Vec<Event>, StoreError> {
        if news.is_empty() {
            return Ok(Vec::new());
        }
        if self.group_lost {
            return Err(StoreError::GroupLost);
        }
        let events = number(status, news, now);
        if self.grouped && self.conn.is_autocommit() {
            self.run_cached("BEGIN IMMEDIATE")?;
            self.group_open = true;
        }
        // A savepoint: its own transaction outside a group, a part of the
        // group's that can fail alone inside one. One event in a group
        // needs none: its single-row insert fails before it writes
        // anything, and a savepoint made SQLite copy every page the insert
        // touched into a statement journal first (a tenth of a busy
        // controller's appends).
        let savepoint = !self.grouped || events.len() > 1;
        let written = (if savepoint {
            self.run_cached("SAVEPOINT append")
        } else {
            Ok(())
        })
        .and_then(|()| self.write_events(&events))
        .and_then(|()| match self.grouped {
            true => Ok(None),
            false => self.write_rows_alone(status, &events).map(Some),
        })
        .and_then(|after| match savepoint {
            true => self.run_cached("RELEASE append").map(|()| after),
            false => Ok(after),
        });
        match written {
            Err(e) => {
                if savepoint {
                    let _ = self.run_cached("ROLLBACK TO append");
                    let _ = self.run_cached("RELEASE append");
                }
                if self.group_open && self.conn.is_autocommit() {
                    // Lost only if earlier appends of the group went with it.
                    self.group_lost = self.group_appended;
                    self.group_open = false;
                }
                return Err(e);
            }
            Ok(Some(after)) => {
                self.lagging = Lagging::default();
                for name in events.iter().filter_map(|e| e.host.as_ref()) {
                    match after.hosts.get(name) {
                        Some(row) => status.hosts.insert(name.clone(), Arc::clone(row)),
                        None => status.hosts.remove(name),
                    };
                }
                status.repo = after.repo;
            }
            // Folded in place: a row no reader shares is changed, not
            // copied.
            Ok(None) => {
                for event in &events {
                    status.apply(event);
                    if let Some(host) = &event.host {
                        if !self.group_hosts.contains(host) {
                            self.group_hosts.insert(host.clone());
                        }
                    }
                }
                self.group_appended = true;
            }
        }
        Ok(events)
    }

    /// Outside a group: writes the rows `events` change, as they leave
    /// them, and returns them (the repository and the touched hosts, a
    /// removed host absent) for the caller to take once it commits.
    fn write_rows_alone(
        &self,
        status: &FleetStatus,
        events: &[Event],
    ) -> Result<FleetStatus, StoreError> {
        let touched: std::collections::BTreeSet<&String> =
            events.iter().filter_map(|e| e.host.as_ref()).collect();
        let mut after = FleetStatus {
            repo: status.repo.clone(),
            hosts: touched
                .iter()
                .filter_map(|name| Some(((*name).clone(), status.hosts.get(*name)?.clone())))
                .collect(),
        };
        for event in events {
            after.apply(event);
        }
        self.write_hosts(touched.iter().map(|name| (*name, after.host(name))))?;
        // The repository row says which event the rows are as of: rows
        // that lag from earlier groups go with it.
        self.write_hosts(
            self.lagging
                .hosts
                .iter()
                .filter(|name| !touched.contains(name))
                .map(|name| (name, status.host(name))),
        )?;
        self.write_repo(&after.repo)?;
        Ok(after)
    }

    /// The events of one append, inside its savepoint.
    fn write_events(&self, events: &[Event]) -> Result<(), StoreError> {
        let mut insert = self.conn.prepare_cached(
            "INSERT INTO events (seq, host, reason, body) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for event in events {
            insert.execute(params![
                event.seq,
                event.host,
                event.reason.to_string(),
                serde_json::to_string(event)?
            ])?;
        }
        Ok(())
    }

    /// Hosts' projection rows (`None`: the host was removed).
    fn write_hosts<'a>(
        &self,
        rows: impl Iterator<Item = (&'a String, Option<&'a HostStatus>)>,
    ) -> Result<(), StoreError> {
        let mut upsert = self.conn.prepare_cached(
            "INSERT INTO hosts (name, body) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET body = excluded.body",
        )?;
        let mut delete = self
            .conn
            .prepare_cached("DELETE FROM hosts WHERE name = ?1")?;
        for (name, row) in rows {
            match row {
                Some(host) => upsert.execute(params![name, serde_json::to_string(host)?])?,
                None => delete.execute(params![name])?,
            };
        }
        Ok(())
    }

    fn write_repo(&self, repo: &RepoStatus) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO repo (id, body) VALUES (1, ?1)
                 ON CONFLICT(id) DO UPDATE SET body = excluded.body",
            )?
            .execute(params![serde_json::to_string(repo)?])?;
        Ok(())
    }

    /// Runs a statement without parameters, prepared once per connection:
    /// a busy controller appends thousands of times a second, and parsing
    /// the savepoint and transaction statements again each time cost a
    /// tenth of its CPU.
    fn run_cached(&self, sql: &str) -> Result<(), StoreError> {
        self.conn.prepare_cached(sql)?.execute([])?;
        Ok(())
    }

    /// Makes the database full (SQLite's `max_page_count`) once it has
    /// grown by `pages`: a full disk, for tests.
    #[cfg(test)]
    pub(crate) fn fill_after(&self, pages: u64) {
        let count: u64 = self
            .conn
            .pragma_query_value(None, "page_count", |r| r.get(0))
            .expect("page count");
        self.conn
            .pragma_update(None, "max_page_count", count + pages)
            .expect("max page count");
    }

    /// Starts a group commit: the appends until [`Store::commit_group`]
    /// share one transaction, opened by the first of them. Each append
    /// still fails or succeeds alone (a savepoint).
    pub fn begin_group(&mut self) {
        self.grouped = true;
    }

    /// Commits the group's appends with one disk sync; returns the rows of
    /// the hosts they changed, as `status` (which the appends were given)
    /// holds them now, as JSON for the status feed. On failure the group
    /// is rolled back whole: the caller's in-memory state is then ahead of
    /// the store and must be rebuilt from it.
    pub fn commit_group(
        &mut self,
        status: &FleetStatus,
    ) -> Result<crate::feed::WrittenRows, StoreError> {
        self.commit_group_with(status, || true)
    }

    /// [`Store::commit_group`], returning the rows' JSON only if `rows()`
    /// says so once the group is committed (the status feed has a reader
    /// by then: one that follows later reads this commit from the store).
    /// The events are written at once;
    /// the projection's rows by [`Store::write_lagging`] once the
    /// controller is idle, or here when many wait or the oldest has
    /// waited long: in a burst of 10,000 hosts each group rewrote nearly
    /// every page of the hosts' table. The tables always hold the
    /// projection as of the repository row's last event (written with
    /// them), and reading them folds the events after it in.
    pub fn commit_group_with(
        &mut self,
        status: &FleetStatus,
        rows: impl FnOnce() -> bool,
    ) -> Result<crate::feed::WrittenRows, StoreError> {
        self.grouped = false;
        self.group_open = false;
        let appended = std::mem::take(&mut self.group_appended);
        let hosts = std::mem::take(&mut self.group_hosts);
        if std::mem::take(&mut self.group_lost) {
            return Err(StoreError::GroupLost);
        }
        if self.conn.is_autocommit() {
            return Ok(Vec::new());
        }
        self.lagging.hosts.extend(hosts.iter().cloned());
        self.lagging.repo |= appended;
        let since = *self
            .lagging
            .since
            .get_or_insert_with(std::time::Instant::now);
        let flush = self.lagging.hosts.len() >= FLUSH_ROWS || since.elapsed() >= FLUSH_AFTER;
        let committed = (if flush { self.flush(status) } else { Ok(()) })
            .and_then(|()| self.run_cached("COMMIT"));
        if let Err(e) = committed {
            let _ = self.run_cached("ROLLBACK");
            return Err(e);
        }
        if flush {
            self.lagging = Lagging::default();
        }
        if !rows() {
            return Ok(Vec::new());
        }
        let mut scratch = Vec::new();
        Ok(hosts
            .into_iter()
            .map(|name| {
                let json = status
                    .host(&name)
                    .map(|host| crate::feed::row_json(&mut scratch, host))
                    .transpose()?;
                Ok((name, json))
            })
            .collect::<Result<Vec<_>, serde_json::Error>>()?)
    }

    /// Whether rows lag the log (see [`Store::write_lagging`]).
    pub fn lagging(&self) -> bool {
        self.lagging.repo || !self.lagging.hosts.is_empty()
    }

    /// Writes the rows that lag the log, as `status` holds them, in a
    /// transaction of their own: the controller's, once it is idle.
    pub fn write_lagging(&mut self, status: &FleetStatus) -> Result<(), StoreError> {
        if !self.lagging() {
            return Ok(());
        }
        self.run_cached("BEGIN IMMEDIATE")?;
        match self.flush(status).and_then(|()| self.run_cached("COMMIT")) {
            Ok(()) => {
                self.lagging = Lagging::default();
                Ok(())
            }
            Err(e) => {
                let _ = self.run_cached("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Writes the rows that lag the log, as `status` holds them, and the
    /// repository row, inside the open transaction.
    fn flush(&self, status: &FleetStatus) -> Result<(), StoreError> {
        if !self.lagging() {
            return Ok(());
        }
        self.write_hosts(
            self.lagging
                .hosts
                .iter()
                .map(|name| (name, status.host(name))),
        )?;
        self.write_repo(&status.repo)
    }

    /// Deletes the events `retention` no longer keeps (never the newest
    /// one, nor one the projection's tables do not hold yet). Returns the
    /// highest deleted sequence number and how many were deleted, or `None`
    /// if nothing was. The projection is untouched: it is kept up to date
    /// as events come, never rebuilt from the log.
    pub fn trim(
        &mut self,
        retention: &Retention,
        now: OffsetDateTime,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let last = self.last_seq()?;
        let mut through = 0u64;
        if let Some(keep) = retention.max_events {
            through = through.max(last.saturating_sub(keep));
        }
        if let Some(age) = retention.max_age {
            let cutoff = (now - age)
                .format(&time::format_description::well_known::Rfc3339)
                .map_err(|e| {
                    StoreError::Sql(rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
                })?;
            let old: Option<i64> = self.conn.query_row(
                "SELECT max(seq) FROM events WHERE json_extract(body, '$.time') < ?1",
                [cutoff],
                |r| r.get(0),
            )?;
            through = through.max(old.map_or(0, |s| u64::try_from(s).unwrap_or(0)));
        }
        // Never an event the projection's tables do not hold yet.
        let through = through.min(last.saturating_sub(1)).min(self.rows_as_of()?);
        if through == 0 {
            return Ok(None);
        }
        // In chunks, so that the controller's appends never wait long for
        // the write lock.
        let mut deleted = 0u64;
        loop {
            let n = self.conn.execute(
                "DELETE FROM events WHERE seq IN
                 (SELECT seq FROM events WHERE seq <= ?1 ORDER BY seq LIMIT 10000)",
                params![through],
            )?;
            if n == 0 {
                break;
            }
            deleted += n as u64;
        }
        Ok((deleted > 0).then_some((through, deleted)))
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

    /// How far the reader `name` got in the log (0: nowhere yet).
    pub fn cursor(&self, name: &str) -> Result<u64, StoreError> {
        let seq: Option<i64> = self
            .conn
            .query_row("SELECT seq FROM cursors WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(seq.map_or(0, |s| u64::try_from(s).unwrap_or(0)))
    }

    /// Records that the reader `name` is done with every event up to `seq`.
    pub fn set_cursor(&mut self, name: &str, seq: u64) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO cursors (name, seq) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET seq = excluded.seq",
            params![name, seq],
        )?;
        Ok(())
    }
}

/// [`Store::commit_group`] writes the rows that lag the log itself when
/// this many lag, or when the oldest has lagged this long (a controller
/// never idle); otherwise the controller does once it is idle.
const FLUSH_ROWS: usize = 16_384;
const FLUSH_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// Numbers `news` after the status's last event and gives each the phase
/// its host is in before it, as the earlier events of the batch leave it
/// (what [`FleetStatus::apply`] would make of them), without folding them.
fn number(status: &FleetStatus, news: Vec<NewEvent>, now: OffsetDateTime) -> Vec<Event> {
    // The phase each host of the batch is left in so far (`None`:
    // removed); a revision adds or removes thousands in one batch.
    let mut left: std::collections::HashMap<String, Option<Phase>> =
        std::collections::HashMap::new();
    let batch = news.len() > 1;
    let mut events: Vec<Event> = Vec::with_capacity(news.len());
    for new in news {
        let seq = status.repo.last_seq + events.len() as u64 + 1;
        let from = new.host.as_deref().and_then(|host| match left.get(host) {
            Some(phase) => *phase,
            None => status.phase_of(host),
        });
        let event = new.into_event(seq, now, from);
        if let Some(host) = event.host.as_ref().filter(|_| batch) {
            let after = match event.reason {
                Reason::HostRemoved => None,
                _ => event.to_phase.or(from).or(Some(Phase::Pending)),
            };
            left.insert(host.clone(), after);
        }
        events.push(event);
    }
    events
}

/// Where readers of the log that must survive a restart (the notifier)
/// keep how far they got.
const CURSORS: &str =
    "CREATE TABLE IF NOT EXISTS cursors (name TEXT PRIMARY KEY, seq INTEGER NOT NULL)";

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
mod tests;
