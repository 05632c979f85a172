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
//! So the tracker keeps a commit open, up to `pipeline.commit_linger`, only
//! when it holds a single batch: it waits for the next one, then for each
//! further one about twice the recent gap between batches ([`next_wait`]),
//! and commits when a wait gathers nothing. Senders at a steady pace (an
//! exporter per service, each every few ms) fill the window; closed-loop
//! senders that all sent at once close it a millisecond after the last of
//! them arrived. It stops waiting after [`GIVE_UP_AFTER`] first waits in a
//! row gathered nothing, and starts again when it finds batches already
//! queued behind the first (concurrent senders are back). When the tracker
//! is busy committing ([`BUSY_SHARE`]) it waits for the next batch only.
//!
//! Tried and not kept: a fixed wait (a lone sequential client waits on every
//! request); waiting for the next batch only (session 8: −12 % CPU in the
//! mixed benchmark; the paced window at 50 ms saves another −17 %); the
//! paced window without the busy check (−22 % peak rate with 8 clients
//! sending as fast as they can: the tracker idled while the receivers
//! decoded the rest of the burst).
//!
//! [`next_wait`]: GroupCommit::next_wait

use std::time::Duration;

/// Consecutive fruitless waits after which the tracker stops waiting.
pub const GIVE_UP_AFTER: u32 = 3;

/// A commit holding this many signals does not wait for more: its fixed
/// cost (one `fdatasync`, the wake-ups) is already a few per cent of it.
pub const ENOUGH_TO_COMMIT: usize = 2000;

/// The shortest wait for a further batch once one has been gathered
/// (scheduling jitter between two receivers finishing their decodes).
const MIN_NEXT_WAIT: Duration = Duration::from_millis(1);

/// Share of wall-clock time the tracker spends committing above which a
/// window closes after the next batch: the receivers are then busy enough
/// for batches to queue up on their own, and waiting for a third would
/// idle the tracker while they decode (−22 % peak rate with 8 clients
/// sending as fast as they can; docs/benchmarks.md).
pub const BUSY_SHARE: f64 = 0.25;

#[derive(Debug)]
pub struct GroupCommit {
    max: Duration,
    /// Waits in a row that gathered nothing.
    fruitless: u32,
    /// Moving average of how long a successful wait took: the pace at
    /// which batches arrive while one is being held. Starts at zero, so
    /// windows stay short until a pace has been seen.
    gap: Duration,
    /// Whether the tracker was last measured busier than [`BUSY_SHARE`].
    busy: bool,
}

impl GroupCommit {
    /// `max` is `pipeline.commit_linger`; zero never waits. Starts out
    /// waiting, so the first concurrent burst is grouped.
    pub fn new(max: Duration) -> Self {
        GroupCommit { max, fruitless: 0, gap: Duration::ZERO, busy: false }
    }

    /// The window a commit holding `held` batches (its first and those
    /// already queued behind it) with `signals` signals in all may stay
    /// open for more; zero commits at once.
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

    /// Within an open window with `remaining` left, how long to wait for
    /// the next batch once at least one more was gathered: about two gaps
    /// at the recent pace. Closed-loop clients that all sent at once arrive
    /// within a millisecond of each other and then send nothing until
    /// answered, so the window closes right after the last of them; clients
    /// sending at a steady pace keep it open to the end.
    pub fn next_wait(&self, remaining: Duration) -> Duration {
        if self.busy {
            return Duration::ZERO;
        }
        remaining.min((self.gap * 2).max(MIN_NEXT_WAIT))
    }

    /// The share of wall-clock time the tracker spent committing lately.
    pub fn load(&mut self, busy_share: f64) {
        self.busy = busy_share > BUSY_SHARE;
    }

    /// What a wait gave: `Some(took)` when a batch arrived after `took`,
    /// `None` when it timed out. `first`: the wait [`wait`](Self::wait)
    /// allowed (its outcome decides whether to keep waiting at all).
    pub fn waited(&mut self, first: bool, arrived: Option<Duration>) {
        if first {
            self.fruitless = if arrived.is_some() { 0 } else { self.fruitless.saturating_add(1) };
        }
        if let Some(took) = arrived {
            self.gap = (self.gap * 3 + took.min(self.max)) / 4;
        }
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
            g.waited(true, Some(MAX));
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
                g.waited(true, None);
            }
        }
        assert_eq!(waits, GIVE_UP_AFTER);
    }

    #[test]
    fn batches_found_queued_turn_waiting_back_on() {
        let mut g = GroupCommit::new(MAX);
        for _ in 0..GIVE_UP_AFTER {
            assert_eq!(g.wait(1, 1), MAX);
            g.waited(true, None);
        }
        assert_eq!(g.wait(1, 1), Duration::ZERO);
        g.wait(3, 1);
        assert_eq!(g.wait(1, 1), MAX, "three senders were seen at once: waiting again");
        g.waited(true, None);
        assert_eq!(g.wait(1, 1), MAX, "one fruitless wait is not yet giving up");
    }

    #[test]
    fn the_window_stays_open_at_the_pace_batches_arrive() {
        let mut g = GroupCommit::new(MAX);
        assert_eq!(g.next_wait(MAX), MIN_NEXT_WAIT, "no pace seen yet");
        // Steady senders, one batch every 10 ms: the next is worth 20 ms.
        for _ in 0..20 {
            g.waited(false, Some(Duration::from_millis(10)));
        }
        let next = g.next_wait(MAX);
        assert!(next >= Duration::from_millis(19) && next <= Duration::from_millis(21), "{next:?}");
        assert_eq!(g.next_wait(Duration::from_millis(5)), Duration::from_millis(5), "never past the window");
        // A burst of closed-loop senders: the window closes right after it.
        for _ in 0..20 {
            g.waited(false, Some(Duration::from_micros(100)));
        }
        assert_eq!(g.next_wait(MAX), MIN_NEXT_WAIT);
    }

    #[test]
    fn a_busy_tracker_waits_for_the_next_batch_only() {
        let mut g = GroupCommit::new(MAX);
        g.load(0.9);
        assert_eq!(g.wait(1, 1), MAX, "the next batch is still worth a wait");
        assert_eq!(g.next_wait(MAX), Duration::ZERO);
        g.load(0.1);
        assert!(g.next_wait(MAX) > Duration::ZERO);
    }

    #[test]
    fn only_the_first_wait_of_a_window_counts_towards_giving_up() {
        let mut g = GroupCommit::new(MAX);
        for _ in 0..10 {
            g.waited(true, Some(Duration::from_millis(1)));
            g.waited(false, None);
        }
        assert_eq!(g.wait(1, 1), MAX);
    }
}
