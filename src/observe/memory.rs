//! Giving memory freed by bulk work back to the OS.
//!
//! mimalloc (the binary's allocator) keeps the pages that a bulk load freed for reuse and purges
//! them only while the heap that owns them keeps allocating. A proxy that has just warmed 100 000
//! routes and then idles kept about 150 MiB it no longer used (docs/proxy.md "Route memory"):
//! after a warm-up or a reload the proxy asks for them to be purged at once.

/// Purges the pages mimalloc holds free. Costs a few milliseconds after a large load; never on a
/// request's path. Harmless when mimalloc is not the global allocator (tests).
#[allow(unsafe_code)]
pub fn release_freed() {
    // SAFETY: `mi_collect` takes no pointers and may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
