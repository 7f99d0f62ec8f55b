//! Checkpoints of the store's write-ahead log, on a thread of their own.
//! SQLite otherwise checkpoints inside the commit that crosses its
//! threshold, on the controller's task: every few groups one commit took
//! 7–9 ms instead of 1–2, while 10,000 workers' reports waited behind it.
//! A passive checkpoint from another connection copies the log into the
//! database while the controller keeps appending.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::Connection;

use super::{StoreError, DB_FILE};

/// How often the log is checkpointed.
pub const INTERVAL: Duration = Duration::from_millis(250);

/// The checkpointing thread; dropping it stops the thread (after the
/// checkpoint in progress, if any).
pub struct Checkpointer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts checkpointing the store in `state_dir` every `every`.
    pub(super) fn start(state_dir: &Path, every: Duration) -> Result<Checkpointer, StoreError> {
        let path = state_dir.join(DB_FILE);
        let conn = Connection::open(&path).map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("cim-checkpoint".to_string())
            .spawn(move || {
                crate::priority::lower_this_thread();
                let mut failing = false;
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    match checkpoint(&conn) {
                        Ok(()) => failing = false,
                        // Once per streak: the controller's own writes say
                        // more if the store is really gone.
                        Err(e) if !failing => {
                            failing = true;
                            tracing::warn!(error = %crate::error::error_chain(&e), "cannot checkpoint the store's log");
                        }
                        Err(_) => {}
                    }
                }
            })
            .map_err(StoreError::Thread)?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Copies what it can of the log into the database without waiting for
/// the writer or readers.
fn checkpoint(conn: &Connection) -> Result<(), StoreError> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
    Ok(())
}
