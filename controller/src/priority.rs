//! Which of the controller's threads the kernel runs first when the
//! machine is busy. The controller's runtime (its decisions, the workers,
//! the store's group commits and checkpoints, and the `nix` and `ssh`
//! processes they start, which inherit it) is throughput work; the API's
//! thread answers people and dashboards, whose wait is what they see. So
//! the runtime's threads run at a lower priority than the API's: on a
//! machine the controller fills, an answer waits for its own work, not
//! for a turn. NixOS gives `nix-daemon` the same advice
//! (`nix.daemonCPUSchedPolicy`), here applied inside one process.

/// The nice value of the runtime's threads. Linux keeps one per thread,
/// and an unprivileged thread may only raise its own, so the API's thread
/// must be started from a thread still at the process's priority (the
/// one that calls `block_on`), never from a runtime thread.
pub const RUNTIME_NICE: i32 = 10;

/// The multi-threaded runtime `cim run` and `cim simulate` run on, its
/// worker and blocking threads at [`RUNTIME_NICE`].
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(lower_this_thread)
        .build()
}

/// Lowers the calling thread (only it) to [`RUNTIME_NICE`], unless it is
/// lower already: for the runtime's threads, and threads of the
/// controller's own (the store's checkpoints). A failure leaves it as it
/// was: only slower answers.
pub fn lower_this_thread() {
    // SAFETY: getpriority/setpriority take no pointers; `who` is this
    // thread's id.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        *libc::__errno_location() = 0;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        if *libc::__errno_location() == 0 && now < RUNTIME_NICE {
            libc::setpriority(libc::PRIO_PROCESS, tid, RUNTIME_NICE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice_of_this_thread() -> i32 {
        // SAFETY: as above.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[test]
    fn the_runtime_threads_are_lowered_and_the_caller_is_not() {
        std::thread::spawn(|| {
            let caller = nice_of_this_thread();
            let runtime = runtime().unwrap();
            let worker = runtime
                .block_on(async { tokio::spawn(async { nice_of_this_thread() }).await.unwrap() });
            let blocking = runtime.block_on(async {
                tokio::task::spawn_blocking(nice_of_this_thread)
                    .await
                    .unwrap()
            });
            assert_eq!(worker, RUNTIME_NICE.max(caller));
            assert_eq!(blocking, RUNTIME_NICE.max(caller));
            assert_eq!(
                nice_of_this_thread(),
                caller,
                "block_on's thread keeps its own"
            );
        })
        .join()
        .unwrap();
    }
}
