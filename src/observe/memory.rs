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

/// mimalloc's `mi_option_arena_eager_commit` (the fifth entry of `mi_option_e` in its
/// `mimalloc.h`; `libmimalloc-sys` does not name it).
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Makes mimalloc commit its arenas' memory as it is used instead of all at once when an arena is
/// reserved. Committed at once (mimalloc's default on Linux), memory a thread freed stayed
/// resident: a proxy idling on an empty Redis held 8 MiB of heap that way, and one that loaded
/// 100 000 mappings from its JSON file about 7 MiB more than it used (docs/proxy.md "Route
/// memory"). Effective only before the first allocation: the binary calls it from its
/// constructors (`.init_array`); later it changes only arenas reserved from then on.
#[allow(unsafe_code)]
pub fn commit_on_use() {
    // SAFETY: `mi_option_set` takes no pointers; it only stores the value in mimalloc's table of
    // options, which is read when an arena is reserved.
    unsafe { libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The index names `arena_eager_commit` in the mimalloc this crate links: its default is 2
    /// ("on where the OS overcommits"), which no neighbouring option has (`purge_decommits` 1,
    /// `allow_large_os_pages` 0, `deprecated_eager_commit` 1). A renumbered mimalloc fails here
    /// instead of having another option set silently. Tests never call `commit_on_use`.
    #[test]
    #[allow(unsafe_code)]
    fn the_option_index_is_arena_eager_commit() {
        if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_some() {
            return;
        }
        // SAFETY: `mi_option_get` takes no pointers and only reads mimalloc's table of options.
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(ARENA_EAGER_COMMIT) },
            2
        );
    }
}
