//! The server's memory allocator: mimalloc instead of glibc malloc (set as
//! `#[global_allocator]` in `main.rs`, so test and bench binaries keep their
//! own; `benches/active_runs.rs` counts on top of mimalloc too).
//!
//! Why: under all-business load glibc's allocator was ≈ 25–30 % of the run
//! tracker's samples, most of it `malloc_consolidate` (every allocation
//! over 1 KiB sorts the fast bins that the many small frees of a commit
//! filled). mimalloc cuts whole-process CPU per span by ≈ 6–10 % as set up
//! here, and by ≈ 13 % with its defaults but ≈ 35 MiB more RSS
//! (docs/benchmarks.md, "What was tried"). Set up here:
//!
//! * built with the crate's `no_thp` feature (Cargo.toml): no `MADV_HUGEPAGE`
//!   on its arenas. With transparent huge pages in `madvise` mode that made
//!   whole 2 MiB pages resident (an idle server at 31 MiB instead of 15).
//!   A build setting because the runtime option is read at mimalloc's start,
//!   before `main`; setting options from `main` did not lower that baseline.
//! * `purge_delay` 10 ms (v3's default is 1 s): freed pages go back to the OS
//!   soon, so a burst of large requests does not stay resident — the
//!   in-flight memory budget (`tests/reliability_memory.rs`) bounds RSS, not
//!   only the bytes the budget counts. Read at each purge, so setting it
//!   from `main` works (the test fails without it).
//! * `arena_eager_commit` off, for arenas reserved after start-up (commit as
//!   used). Measured together with the two above, not on its own.
//!
//! Operators can still override the two options with the usual
//! `MIMALLOC_PURGE_DELAY` / `MIMALLOC_ARENA_EAGER_COMMIT` environment variables.

use std::ffi::CStr;

/// `mi_option_e` values of the bundled mimalloc (v3, `mimalloc.h`).
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Applies the two options above. Call first thing in `main` (it does not allocate).
pub fn configure() {
    set_unless_in_env(c"MIMALLOC_ARENA_EAGER_COMMIT", ARENA_EAGER_COMMIT, 0);
    set_unless_in_env(c"MIMALLOC_PURGE_DELAY", PURGE_DELAY, 10);
}

fn set_unless_in_env(var: &CStr, option: libmimalloc_sys::mi_option_t, value: std::os::raw::c_long) {
    // libc's getenv, not std::env: no allocation before the options are set.
    #[cfg(unix)]
    // SAFETY: `var` is NUL-terminated; nothing modifies the environment yet.
    let in_env = !unsafe { libc::getenv(var.as_ptr()) }.is_null();
    #[cfg(not(unix))]
    let in_env = {
        let _ = var;
        false
    };
    if !in_env {
        // SAFETY: plain option store inside mimalloc.
        unsafe { libmimalloc_sys::mi_option_set(option, value) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_numbers_are_the_bundled_mimallocs_and_configure_sets_them() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some()
            || std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_some()
        {
            return;
        }
        // v3's defaults identify the options: a mimalloc upgrade that renumbers
        // `mi_option_e` fails here instead of silently setting something else.
        // SAFETY: plain option reads and stores.
        unsafe {
            assert_eq!(libmimalloc_sys::mi_option_get(PURGE_DELAY), 1000, "purge_delay's default");
            assert_eq!(libmimalloc_sys::mi_option_get(ARENA_EAGER_COMMIT), 2, "arena_eager_commit's default");
            configure();
            assert_eq!(libmimalloc_sys::mi_option_get(PURGE_DELAY), 10);
            assert_eq!(libmimalloc_sys::mi_option_get(ARENA_EAGER_COMMIT), 0);
        }
    }
}
