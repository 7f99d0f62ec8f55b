//! The per-host work queue, after client-go's workqueue: a host is queued at
//! most once, never handed out twice at once, and a host re-queued while it
//! is being worked on runs again only after the current run ends. Among
//! hosts due at once, those with something to change go before those only
//! looked at (client-go's priority queue does the same for its informers).
//! Time is a type parameter so that the queue stays pure and is tested with
//! integers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// Which of the hosts due at the same time go first. A commit that
/// changes one host of 10,000 queues all of them (each is looked at, to
/// confirm it runs its system at the new revision); the one whose system
/// changes must not wait behind 9,999 looks `--max-parallel` at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Urgency {
    /// Something to change: a new system, a retry, an operator's request.
    Change,
    /// Only a look: a host that should already run its system, a resync.
    Check,
}

#[derive(Debug, Clone)]
struct Item<T> {
    /// The host's name, shared with the ordered index.
    name: Arc<str>,
    /// When the host should next be worked on, if it is queued.
    due: Option<T>,
    /// What the queued request is for (the most urgent of those merged).
    urgency: Urgency,
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
    /// `(due, urgency, host)` of every item that is queued and not running.
    waiting: BTreeSet<(T, Urgency, Arc<str>)>,
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
    /// Sets `host`'s due time to what `due` makes of the current one, and
    /// its request's urgency to the most urgent of the pending one (if
    /// any) and `urgency`, keeping the ordered index in step.
    fn set_due(&mut self, host: &str, urgency: Urgency, due: impl FnOnce(Option<T>) -> Option<T>) {
        let item = match self.items.get_mut(host) {
            Some(item) => item,
            None => {
                let name: Arc<str> = Arc::from(host);
                self.items.entry(Arc::clone(&name)).or_insert(Item {
                    name,
                    due: None,
                    urgency,
                    running: false,
                })
            }
        };
        let old = (item.due, item.urgency);
        item.due = due(old.0);
        item.urgency = match old.0 {
            Some(_) => old.1.min(urgency),
            None => urgency,
        };
        if item.running || old == (item.due, item.urgency) {
            return;
        }
        if let Some(due) = old.0 {
            self.waiting.remove(&(due, old.1, Arc::clone(&item.name)));
        }
        if let Some(new) = item.due {
            self.waiting
                .insert((new, item.urgency, Arc::clone(&item.name)));
        }
    }

    /// Asks for `host` to be worked on at `at`, to change something. An
    /// earlier request wins, so a burst of requests collapses into one run.
    pub fn enqueue(&mut self, host: &str, at: T) {
        self.request(host, at, Urgency::Change);
    }

    /// Asks for `host` to be worked on at `at` as [`WorkQueue::enqueue`]
    /// does, with `urgency`.
    pub fn request(&mut self, host: &str, at: T, urgency: Urgency) {
        self.set_due(host, urgency, |due| {
            Some(match due {
                Some(due) if due <= at => due,
                _ => at,
            })
        });
    }

    /// Like [`WorkQueue::enqueue`], but replaces a pending time: used for
    /// backoff, where the retry time is deliberately later.
    pub fn schedule(&mut self, host: &str, at: T) {
        self.set_due(host, Urgency::Change, |_| Some(at));
    }

    /// Hands out up to `limit` hosts that are due and not already running,
    /// earliest first, and marks them running.
    pub fn pop_ready(&mut self, now: T, limit: usize) -> Vec<String> {
        let mut ready = Vec::new();
        while ready.len() < limit {
            match self.waiting.first() {
                Some((due, _, _)) if *due <= now => {}
                _ => break,
            }
            let Some((_, _, name)) = self.waiting.pop_first() else {
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
        self.set_due(host, Urgency::Change, |_| None);
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
                    self.waiting
                        .insert((due, item.urgency, Arc::clone(&item.name)));
                }
            }
        }
    }

    /// Drops a host's pending request (it may still be running).
    pub fn forget(&mut self, host: &str) {
        if self.items.contains_key(host) {
            self.set_due(host, Urgency::Check, |_| None);
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
        self.waiting.first().map(|(due, _, _)| *due)
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
    fn hosts_with_something_to_change_go_first_among_those_due_at_once() {
        let mut q = WorkQueue::default();
        for h in ["a", "b", "c", "d"] {
            q.request(h, 0, Urgency::Check);
        }
        q.request("c", 0, Urgency::Change);
        // A look asked for after a change does not make it wait.
        q.request("d", 0, Urgency::Change);
        q.request("d", 0, Urgency::Check);
        assert_eq!(q.pop_ready(0, 3), vec!["c", "d", "a"]);
        // Time still comes first: a change due later waits.
        q.request("e", 1, Urgency::Change);
        q.request("f", 0, Urgency::Check);
        assert_eq!(q.pop_ready(1, 10), vec!["b", "f", "e"]);
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
        fn never_two_runs_of_one_host(ops in proptest::collection::vec((0u8..8, 0usize..3, 0u32..20), 1..200)) {
            let hosts = ["a", "b", "c"];
            let mut q = WorkQueue::default();
            let mut running = std::collections::BTreeSet::new();
            for (op, h, t) in ops {
                match op {
                    0 => q.enqueue(hosts[h], t),
                    7 => q.request(hosts[h], t, Urgency::Check),
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
                    6 => {
                        if q.claim(hosts[h]) {
                            prop_assert!(running.insert(hosts[h].to_string()));
                        }
                    }
                    _ => unreachable!(),
                }
                prop_assert_eq!(q.running(), running.len());
                // The ordered index holds exactly the waiting items, each
                // with its current time and urgency.
                let index: std::collections::BTreeSet<_> = q
                    .items
                    .values()
                    .filter(|i| !i.running)
                    .filter_map(|i| i.due.map(|d| (d, i.urgency, Arc::clone(&i.name))))
                    .collect();
                prop_assert_eq!(&q.waiting, &index);
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
