//! When the tracker waits for another batch before committing (group commit).
//!
//! Every commit pays a fixed cost — a journal `fdatasync`, waking the
//! submitters, the observers — so under many small concurrent exports,
//! committing two or more batches together is cheaper than committing each
//! (docs/benchmarks.md). Waiting is pure loss when nothing more can come,
//! though: a client that exports one request at a time cannot send its next
//! batch before this one is acknowledged, and a fixed wait would also
//! throttle a few fast clients that send again as soon as they are answered
//! (and idle the tracker while the receivers decode their next requests).
//!
//! So the tracker waits, up to `pipeline.commit_linger`, only when it holds
//! a single batch and only for the *next* one; then it takes whatever else is
//! queued and commits. It stops waiting after [`GIVE_UP_AFTER`] waits in a
//! row gathered nothing, and starts again when it finds batches already
//! queued behind the first (concurrent senders are back). Tried and not kept:
//! a fixed wait (−26 % CPU in the mixed benchmark but a lone sequential
//! client waits on every request), and waiting per depth for a third,
//! fourth… batch (no more CPU saved, −15 % peak rate with 8 fast clients).

use std::time::Duration;

/// Consecutive fruitless waits after which the tracker stops waiting.
pub const GIVE_UP_AFTER: u32 = 3;

/// A commit holding this many signals does not wait for more: its fixed
/// cost (one `fdatasync`, the wake-ups) is already a few per cent of it.
pub const ENOUGH_TO_COMMIT: usize = 2000;

#[derive(Debug)]
pub struct GroupCommit {
    max: Duration,
    /// Waits in a row that gathered nothing.
    fruitless: u32,
}

impl GroupCommit {
    /// `max` is `pipeline.commit_linger`; zero never waits. Starts out
    /// waiting, so the first concurrent burst is grouped.
    pub fn new(max: Duration) -> Self {
        GroupCommit { max, fruitless: 0 }
    }

    /// How long a commit holding `held` batches (its first and those
    /// already queued behind it) with `signals` signals in all may wait for one more.
    pub fn wait(&mut self, held: usize, signals: usize) -> Duration {
        if held > 1 {
            // Concurrent senders: nothing to wait for now, but worth waiting again.
            self.fruitless = 0;
            return Duration::ZERO;
        }
        if self.max.is_zero() || self.fruitless >= GIVE_UP_AFTER || signals >= ENOUGH_TO_COMMIT {
            return Duration::ZERO;
        }
        self.max
    }

    /// What a wait [`wait`](Self::wait) allowed gave: whether a batch arrived.
    pub fn waited(&mut self, gathered: bool) {
        self.fruitless = if gathered { 0 } else { self.fruitless.saturating_add(1) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_millis(25);

    #[test]
    fn zero_never_waits() {
        let mut g = GroupCommit::new(Duration::ZERO);
        assert_eq!(g.wait(1, 1), Duration::ZERO);
    }

    #[test]
    fn keeps_waiting_while_waits_gather_batches() {
        let mut g = GroupCommit::new(MAX);
        for _ in 0..100 {
            assert_eq!(g.wait(1, 1), MAX);
            g.waited(true);
        }
    }

    #[test]
    fn never_waits_when_the_batch_is_already_large() {
        let mut g = GroupCommit::new(MAX);
        assert_eq!(g.wait(1, ENOUGH_TO_COMMIT), Duration::ZERO);
        assert_eq!(g.wait(1, ENOUGH_TO_COMMIT - 1), MAX);
    }

    #[test]
    fn never_waits_with_batches_already_queued() {
        let mut g = GroupCommit::new(MAX);
        assert_eq!(g.wait(2, 1), Duration::ZERO);
        assert_eq!(g.wait(64, 1), Duration::ZERO);
    }

    #[test]
    fn a_lone_sequential_client_stops_waiting() {
        let mut g = GroupCommit::new(MAX);
        let mut waits = 0;
        for _ in 0..1000 {
            if g.wait(1, 1) == MAX {
                waits += 1;
                g.waited(false);
            }
        }
        assert_eq!(waits, GIVE_UP_AFTER);
    }

    #[test]
    fn batches_found_queued_turn_waiting_back_on() {
        let mut g = GroupCommit::new(MAX);
        for _ in 0..GIVE_UP_AFTER {
            assert_eq!(g.wait(1, 1), MAX);
            g.waited(false);
        }
        assert_eq!(g.wait(1, 1), Duration::ZERO);
        g.wait(3, 1);
        assert_eq!(g.wait(1, 1), MAX, "three senders were seen at once: waiting again");
        g.waited(false);
        assert_eq!(g.wait(1, 1), MAX, "one fruitless wait is not yet giving up");
    }
}
