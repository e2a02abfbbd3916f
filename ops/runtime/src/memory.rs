//! Giving the system back what glibc's malloc keeps after a peak.
//!
//! glibc returns freed memory only from the top of a heap: after a peak (a coordinator taking
//! the agents of a peer that died, then handing them back) the pages below a live allocation
//! stay resident, free but kept. bench-chaos measured a coordinator at 35 MB with 176 agents
//! linked, 48 MB with 288, and still 48 MB once back at 172. `malloc_trim(0)` hands every
//! whole free page of every arena back (`MADV_DONTNEED`); live allocations are untouched.
//!
//! This is the project's one `unsafe` block (the lint denies it everywhere else): a call with
//! no pointer and no precondition, which no safe crate offers.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often a daemon hands free memory back.
pub const RELEASE_EVERY: Duration = Duration::from_secs(30);

/// Asks glibc's allocator to return the free pages of every arena to the system; true if it
/// gave any back. Elsewhere (musl, other systems) nothing: their allocators return memory
/// themselves or have no such call.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_free_memory() -> bool {
    // SAFETY: `malloc_trim` takes no pointer and only reorganises glibc's own free lists,
    // under each arena's lock, like any malloc or free running beside it.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Asks the allocator to return free memory; nothing to do off glibc.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() -> bool {
    false
}

/// Hands free memory back every `every` until `shutdown`.
pub async fn release_periodically(every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let gave = release_free_memory();
                tracing::debug!(gave, "free memory handed back to the system");
            }
        }
    }
}
