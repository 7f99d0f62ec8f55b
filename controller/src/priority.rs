//! Which of the controller's threads the kernel runs first when the
//! machine is busy. The controller's runtime (its decisions, the workers,
//! the store's group commits and checkpoints, and the `nix` and `ssh`
//! processes they start, which inherit it) is throughput work; the API's
//! thread answers people and dashboards, whose wait is what they see. So
//! the runtime's threads run at a lower priority than the API's: on a
//! machine the controller fills, an answer waits for its own work, not
//! for a turn. NixOS gives `nix-daemon` the same advice
//! (`nix.daemonCPUSchedPolicy`), here applied inside one process.

/// How much lower than the process's own priority the runtime's threads
/// run (in nice steps: nice 0 → 10). Linux keeps a nice value per thread,
/// and an unprivileged thread may only lower its own priority, so the
/// API's thread must be started from a thread still at the process's
/// priority (the one that calls `block_on`), never from a runtime thread.
pub const RUNTIME_NICE_STEP: i32 = 10;

/// The lowest priority Linux has.
const NICE_MAX: i32 = 19;

/// The nice value the runtime's threads get: the process's own (as the
/// first runtime's creator had it) plus [`RUNTIME_NICE_STEP`], at most
/// [`NICE_MAX`]. Kept once, because threads inherit their creator's value
/// and the runtime's threads are created by each other.
static LOWERED: std::sync::OnceLock<i32> = std::sync::OnceLock::new();

/// The multi-threaded runtime `cim run` and `cim simulate` run on, its
/// worker and blocking threads [`RUNTIME_NICE_STEP`] below the caller's
/// priority: an operator who starts `cim` at nice 5 gets its API at 5 and
/// its work at 15.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    lowered();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(lower_this_thread)
        .build()
}

fn lowered() -> i32 {
    *LOWERED.get_or_init(|| {
        nice_of_this_thread().map_or(RUNTIME_NICE_STEP, |n| {
            n.saturating_add(RUNTIME_NICE_STEP).min(NICE_MAX)
        })
    })
}

/// This thread's nice value (`None`: it cannot be read).
fn nice_of_this_thread() -> Option<i32> {
    // SAFETY: getpriority takes no pointers; `who` is this thread's id.
    // -1 is a valid priority, so errno tells a failure apart.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        *libc::__errno_location() = 0;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        (*libc::__errno_location() == 0).then_some(now)
    }
}

/// Lowers the calling thread (only it) to the runtime's priority, unless
/// it is lower already: for the runtime's threads, and threads of the
/// controller's own (the store's checkpoints). A failure leaves it as it
/// was: only slower answers.
pub fn lower_this_thread() {
    let target = lowered();
    if nice_of_this_thread().is_some_and(|now| now < target) {
        // SAFETY: setpriority takes no pointers; `who` is this thread's id.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, target);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_threads_are_lowered_and_the_caller_is_not() {
        std::thread::spawn(|| {
            let caller = nice_of_this_thread().unwrap();
            let runtime = runtime().unwrap();
            let worker = runtime
                .block_on(async { tokio::spawn(async { nice_of_this_thread() }).await.unwrap() });
            let blocking = runtime.block_on(async {
                tokio::task::spawn_blocking(nice_of_this_thread)
                    .await
                    .unwrap()
            });
            // Other tests may have made the first runtime: its creator's
            // priority is the process's, as this thread's is.
            let lowered = (caller + RUNTIME_NICE_STEP).min(NICE_MAX);
            assert_eq!(worker, Some(lowered));
            assert_eq!(blocking, Some(lowered));
            assert_eq!(
                nice_of_this_thread(),
                Some(caller),
                "block_on's thread keeps its own"
            );
        })
        .join()
        .unwrap();
    }
}
