//! The per-host work queue, after client-go's workqueue: a host is queued at
//! most once, never handed out twice at once, and a host re-queued while it
//! is being worked on runs again only after the current run ends. Time is a
//! type parameter so that the queue stays pure and is tested with integers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
struct Item<T> {
    /// The host's name, shared with the ordered index.
    name: Arc<str>,
    /// When the host should next be worked on, if it is queued.
    due: Option<T>,
    running: bool,
}

/// Per-host queue keyed by host name. Hosts that are due and not running
/// are also kept ordered by due time, so that handing out the next hosts
/// and finding the next due time cost O(log n), not a scan of the fleet.
/// Each name is allocated once and shared by both: a revision of 10,000
/// hosts queues and hands out every one of them at once, and a name
/// allocated per lookup was a third of that work.
#[derive(Debug, Clone)]
pub struct WorkQueue<T> {
    items: BTreeMap<Arc<str>, Item<T>>,
    /// `(due, host)` of every item that is queued and not running.
    waiting: BTreeSet<(T, Arc<str>)>,
    running: usize,
}

impl<T> Default for WorkQueue<T> {
    fn default() -> Self {
        WorkQueue {
            items: BTreeMap::new(),
            waiting: BTreeSet::new(),
            running: 0,
        }
    }
}

impl<T: Ord + Copy> WorkQueue<T> {
    /// Sets `host`'s due time to what `due` makes of the current one,
    /// keeping the ordered index in step.
    fn set_due(&mut self, host: &str, due: impl FnOnce(Option<T>) -> Option<T>) {
        let item = match self.items.get_mut(host) {
            Some(item) => item,
            None => {
                let name: Arc<str> = Arc::from(host);
                self.items.entry(Arc::clone(&name)).or_insert(Item {
                    name,
                    due: None,
                    running: false,
                })
            }
        };
        let old = item.due;
        item.due = due(old);
        if item.running || old == item.due {
            return;
        }
        if let Some(old) = old {
            self.waiting.remove(&(old, Arc::clone(&item.name)));
        }
        if let Some(new) = item.due {
            self.waiting.insert((new, Arc::clone(&item.name)));
        }
    }

    /// Asks for `host` to be worked on at `at`. An earlier request wins, so a
    /// burst of requests collapses into one run.
    pub fn enqueue(&mut self, host: &str, at: T) {
        self.set_due(host, |due| {
            Some(match due {
                Some(due) if due <= at => due,
                _ => at,
            })
        });
    }

    /// Like [`WorkQueue::enqueue`], but replaces a pending time: used for
    /// backoff, where the retry time is deliberately later.
    pub fn schedule(&mut self, host: &str, at: T) {
        self.set_due(host, |_| Some(at));
    }

    /// Hands out up to `limit` hosts that are due and not already running,
    /// earliest first, and marks them running.
    pub fn pop_ready(&mut self, now: T, limit: usize) -> Vec<String> {
        let mut ready = Vec::new();
        while ready.len() < limit {
            match self.waiting.first() {
                Some((due, _)) if *due <= now => {}
                _ => break,
            }
            let Some((_, name)) = self.waiting.pop_first() else {
                break;
            };
            if let Some(item) = self.items.get_mut(&name) {
                item.running = true;
                item.due = None;
                self.running += 1;
            }
            ready.push(name.to_string());
        }
        ready
    }

    /// Marks `host` running outside the normal hand-out (an operator's
    /// rollback); false if it is already running.
    pub fn claim(&mut self, host: &str) -> bool {
        if self.is_running(host) {
            return false;
        }
        self.set_due(host, |_| None);
        if let Some(item) = self.items.get_mut(host) {
            item.running = true;
            self.running += 1;
        }
        true
    }

    /// Marks a run finished. A request that arrived during the run stays
    /// queued and is handed out by a later [`WorkQueue::pop_ready`].
    pub fn done(&mut self, host: &str) {
        if let Some(item) = self.items.get_mut(host) {
            if item.running {
                item.running = false;
                self.running -= 1;
                if let Some(due) = item.due {
                    self.waiting.insert((due, Arc::clone(&item.name)));
                }
            }
        }
    }

    /// Drops a host's pending request (it may still be running).
    pub fn forget(&mut self, host: &str) {
        if self.items.contains_key(host) {
            self.set_due(host, |_| None);
        }
    }

    pub fn remove(&mut self, host: &str) {
        self.forget(host);
        if let Some(item) = self.items.remove(host) {
            if item.running {
                self.running -= 1;
            }
        }
    }

    pub fn is_queued(&self, host: &str) -> bool {
        self.items.get(host).is_some_and(|i| i.due.is_some())
    }

    pub fn is_running(&self, host: &str) -> bool {
        self.items.get(host).is_some_and(|i| i.running)
    }

    pub fn running(&self) -> usize {
        self.running
    }

    /// The earliest time a host that is not running becomes due.
    pub fn next_due(&self) -> Option<T> {
        self.waiting.first().map(|(due, _)| *due)
    }
}

/// Exponential backoff for a host that failed `failures` times in a row:
/// `base · 2^(failures-1)`, capped at `max`.
pub fn backoff(failures: u32, base: Duration, max: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(32);
    base.checked_mul(1u32 << exp.min(31))
        .unwrap_or(max)
        .min(max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_burst_collapses_into_one_run() {
        let mut q = WorkQueue::default();
        q.enqueue("a", 5);
        q.enqueue("a", 3);
        q.enqueue("a", 9);
        assert_eq!(q.pop_ready(2, 10), Vec::<String>::new());
        assert_eq!(q.pop_ready(3, 10), vec!["a"]);
        assert_eq!(q.pop_ready(10, 10), Vec::<String>::new());
    }

    #[test]
    fn a_running_host_is_not_handed_out_twice() {
        let mut q = WorkQueue::default();
        q.enqueue("a", 0);
        assert_eq!(q.pop_ready(0, 10), vec!["a"]);
        q.enqueue("a", 1);
        assert_eq!(q.pop_ready(5, 10), Vec::<String>::new());
        assert_eq!(q.next_due(), None);
        q.done("a");
        assert_eq!(q.next_due(), Some(1));
        assert_eq!(q.pop_ready(5, 10), vec!["a"]);
    }

    #[test]
    fn the_limit_bounds_parallelism() {
        let mut q = WorkQueue::default();
        for h in ["a", "b", "c"] {
            q.enqueue(h, 0);
        }
        assert_eq!(q.pop_ready(0, 2).len(), 2);
        assert_eq!(q.running(), 2);
        assert_eq!(q.pop_ready(0, 2 - q.running()), Vec::<String>::new());
    }

    #[test]
    fn schedule_replaces_an_earlier_time() {
        let mut q = WorkQueue::default();
        q.enqueue("a", 1);
        q.schedule("a", 10);
        assert_eq!(q.next_due(), Some(10));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let s = Duration::from_secs;
        assert_eq!(backoff(1, s(2), s(60)), s(2));
        assert_eq!(backoff(2, s(2), s(60)), s(4));
        assert_eq!(backoff(5, s(2), s(60)), s(32));
        assert_eq!(backoff(6, s(2), s(60)), s(60));
        assert_eq!(backoff(1000, s(2), s(60)), s(60));
    }

    proptest! {
        #[test]
        fn never_two_runs_of_one_host(ops in proptest::collection::vec((0u8..7, 0usize..3, 0u32..20), 1..200)) {
            let hosts = ["a", "b", "c"];
            let mut q = WorkQueue::default();
            let mut running = std::collections::BTreeSet::new();
            for (op, h, t) in ops {
                match op {
                    0 => q.enqueue(hosts[h], t),
                    1 => q.schedule(hosts[h], t),
                    2 => {
                        for name in q.pop_ready(t, 2) {
                            prop_assert!(running.insert(name.clone()), "{} handed out twice", name);
                        }
                        prop_assert!(running.len() <= 3);
                    }
                    3 => {
                        q.done(hosts[h]);
                        running.remove(hosts[h]);
                    }
                    4 => q.forget(hosts[h]),
                    5 => {
                        q.remove(hosts[h]);
                        running.remove(hosts[h]);
                    }
                    _ => {
                        if q.claim(hosts[h]) {
                            prop_assert!(running.insert(hosts[h].to_string()));
                        }
                    }
                }
                prop_assert_eq!(q.running(), running.len());
                let naive = q.items.values().filter(|i| !i.running).filter_map(|i| i.due).min();
                prop_assert_eq!(q.next_due(), naive);
            }
        }

        #[test]
        fn backoff_is_monotonic_and_bounded(f in 0u32..100) {
            let base = Duration::from_millis(100);
            let max = Duration::from_secs(300);
            prop_assert!(backoff(f, base, max) <= backoff(f + 1, base, max));
            prop_assert!(backoff(f, base, max) <= max);
        }
    }
}
