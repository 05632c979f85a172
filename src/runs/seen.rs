//! [`SeenIds`]: an exact, compact set of signal ids, and [`RecentIds`]: a
//! run's ids grouped by signal time so that ids older than the
//! de-duplication window can be dropped from memory (storage answers for
//! those; see `Tracker::fold`).

/// The identities of the signals folded into a run: exact (no hashing, no
/// false positives), 16 bytes per id, in two sorted levels — `main`
/// (compacted, exact size) and `recent` (sorted, at most about √`main`
/// long, merged into `main` when it grows past that). A run with up to
/// [`INLINE_MAIN`] ids keeps them in `main` only, so a one-signal run costs
/// one 16-byte allocation. Lookups are two binary searches; an insert moves
/// at most √n ids, plus an amortised O(√n) share of the merges.
///
/// (It replaces a `HashSet<u128>`: 18–36 bytes per id depending on the load
/// factor, at least 64 bytes for a one-signal run, and it was copied whole
/// into every commit's working set.)
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SeenIds {
    main: Box<[u128]>,
    recent: Vec<u128>,
}

/// Below this many ids an insert rebuilds `main` directly (no `recent` allocation).
const INLINE_MAIN: usize = 32;

impl SeenIds {
    pub fn from_ids(mut ids: Vec<u128>) -> Self {
        ids.sort_unstable();
        ids.dedup();
        SeenIds { main: ids.into_boxed_slice(), recent: Vec::new() }
    }

    pub fn len(&self) -> usize {
        self.main.len() + self.recent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, id: u128) -> bool {
        self.main.binary_search(&id).is_ok() || self.recent.binary_search(&id).is_ok()
    }

    /// Adds an id; returns whether it was new.
    pub fn insert(&mut self, id: u128) -> bool {
        let pos = match self.main.binary_search(&id) {
            Ok(_) => return false,
            Err(pos) => pos,
        };
        if self.recent.is_empty() && self.main.len() < INLINE_MAIN {
            let mut v = Vec::with_capacity(self.main.len() + 1);
            v.extend_from_slice(&self.main[..pos]);
            v.push(id);
            v.extend_from_slice(&self.main[pos..]);
            self.main = v.into_boxed_slice();
            return true;
        }
        match self.recent.binary_search(&id) {
            Ok(_) => return false,
            Err(p) => self.recent.insert(p, id),
        }
        if self.recent.len() > self.main.len().isqrt().max(INLINE_MAIN) {
            self.compact();
        }
        true
    }

    pub fn extend(&mut self, ids: impl IntoIterator<Item = u128>) {
        for id in ids {
            self.insert(id);
        }
    }

    /// Adds every id of `other`.
    pub fn absorb(&mut self, other: SeenIds) {
        if other.is_empty() {
            return;
        }
        if self.is_empty() {
            *self = other;
            return;
        }
        let mut all = Vec::with_capacity(self.len() + other.len());
        all.extend_from_slice(&self.main);
        all.extend_from_slice(&self.recent);
        all.extend_from_slice(&other.main);
        all.extend_from_slice(&other.recent);
        *self = SeenIds::from_ids(all);
    }

    /// Merges `recent` into `main`.
    fn compact(&mut self) {
        let mut v = Vec::with_capacity(self.len());
        let (mut a, mut b) = (self.main.iter().peekable(), self.recent.iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (Some(x), Some(y)) => {
                    if x < y {
                        v.push(**x);
                        a.next();
                    } else {
                        v.push(**y);
                        b.next();
                    }
                }
                (Some(x), None) => {
                    v.push(**x);
                    a.next();
                }
                (None, Some(y)) => {
                    v.push(**y);
                    b.next();
                }
                (None, None) => break,
            }
        }
        self.main = v.into_boxed_slice();
        self.recent = Vec::new();
    }

    /// Heap bytes held (for tests and measurements).
    pub fn heap_bytes(&self) -> usize {
        (self.main.len() + self.recent.capacity()) * 16
    }
}

/// Which signal ids the tracker keeps in memory: those of signals whose time
/// (earliest of start and end) is at most `window` old. A retry carries the
/// signal's original time, so a duplicate of a signal newer than the horizon
/// is always found in memory; one of an older signal is looked up in storage.
/// Memory per run is then bounded by the signals of the last window instead
/// of every signal the run ever had — except signals stamped more than a
/// window ahead of this server's clock, whose ids stay until the run leaves
/// memory (they share one bucket so they cannot multiply lookups).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DedupWindow {
    window_ns: i64,
    bucket_ns: i64,
}

/// The bucket of ids stamped more than a window ahead.
const FUTURE: i64 = i64::MAX;

impl DedupWindow {
    pub fn new(window: std::time::Duration) -> Self {
        let window_ns = window.as_nanos().clamp(4, (i64::MAX / 4) as u128) as i64;
        // Four buckets a window: memory holds at most a quarter window more than needed.
        DedupWindow { window_ns, bucket_ns: window_ns / 4 }
    }

    /// Signals older than this are de-duplicated against storage.
    pub fn horizon(&self, now: i64) -> i64 {
        now.saturating_sub(self.window_ns)
    }

    pub fn bucket(&self, t: i64, now: i64) -> i64 {
        if t > now.saturating_add(self.window_ns) {
            FUTURE
        } else {
            t.div_euclid(self.bucket_ns)
        }
    }

    /// Buckets before this one hold only times older than the horizon.
    pub fn first_kept(&self, now: i64) -> i64 {
        self.horizon(now).div_euclid(self.bucket_ns)
    }

    /// The earliest time bucket `b` holds.
    pub fn bucket_start(&self, b: i64) -> i64 {
        b.saturating_mul(self.bucket_ns)
    }

    /// The in-window ids among `ids` (id, signal time), bucketed.
    pub fn recent(&self, ids: impl IntoIterator<Item = (u128, i64)>, now: i64) -> RecentIds {
        let mut r = RecentIds::default();
        self.remember(&mut r, ids, now);
        r
    }

    pub fn remember(&self, r: &mut RecentIds, ids: impl IntoIterator<Item = (u128, i64)>, now: i64) {
        let horizon = self.horizon(now);
        for (id, t) in ids {
            if t >= horizon {
                r.insert(id, self.bucket(t, now));
            }
        }
    }
}

/// The ids of a run's signals, bucketed by signal time (`bucket` = time /
/// bucket length, chosen by the tracker). Whole buckets are forgotten once
/// every time they can hold is older than the de-duplication window, so a run
/// that keeps receiving signals holds only the last window's ids instead of
/// every id it ever saw. Few buckets exist at once (window / bucket length,
/// plus those of signals stamped ahead of the clock), so lookups scan them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RecentIds {
    buckets: Vec<(i64, SeenIds)>,
}

impl RecentIds {
    pub fn contains(&self, id: u128) -> bool {
        self.buckets.iter().any(|(_, s)| s.contains(id))
    }

    /// Adds an id to `bucket`; returns whether it was new to that bucket.
    pub fn insert(&mut self, id: u128, bucket: i64) -> bool {
        match self.buckets.iter_mut().find(|(b, _)| *b == bucket) {
            Some((_, s)) => s.insert(id),
            None => {
                let mut s = SeenIds::default();
                s.insert(id);
                // Most runs have one bucket: one slot, not the default four (192 bytes).
                self.buckets.reserve_exact(1);
                self.buckets.push((bucket, s));
                true
            }
        }
    }

    /// Adds every id of `other`, bucket by bucket.
    pub fn absorb(&mut self, other: RecentIds) {
        for (b, ids) in other.buckets {
            match self.buckets.iter_mut().find(|(x, _)| *x == b) {
                Some((_, s)) => s.absorb(ids),
                None => self.buckets.push((b, ids)),
            }
        }
    }

    /// Drops the buckets before `bucket`; returns how many ids went.
    pub fn forget_before(&mut self, bucket: i64) -> usize {
        let before = self.len();
        self.buckets.retain(|(b, _)| *b >= bucket);
        if self.buckets.is_empty() {
            self.buckets = Vec::new();
        }
        before - self.len()
    }

    pub fn len(&self) -> usize {
        self.buckets.iter().map(|(_, s)| s.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Heap bytes held (for tests and measurements).
    pub fn heap_bytes(&self) -> usize {
        self.buckets.capacity() * std::mem::size_of::<(i64, SeenIds)>()
            + self.buckets.iter().map(|(_, s)| s.heap_bytes()).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn behaves_like_a_set() {
        let mut s = SeenIds::default();
        let mut h = HashSet::new();
        let mut x: u128 = 0x9E37_79B9_7F4A_7C15;
        for i in 0..20_000u32 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            // Every third id repeats an earlier one.
            let id = if i % 3 == 0 { x % 5000 } else { x >> 7 };
            assert_eq!(s.insert(id), h.insert(id), "insert {id}");
            if i % 97 == 0 {
                assert!(s.contains(id));
                assert!(!s.contains(u128::MAX - i as u128));
            }
        }
        assert_eq!(s.len(), h.len());
        assert!(h.iter().all(|id| s.contains(*id)));
        let other = SeenIds::from_ids(vec![1, 2, u128::MAX - 3]);
        s.absorb(other);
        assert!(s.contains(u128::MAX - 3) && s.contains(1));
        assert_eq!(s.len(), h.len() + [1u128, 2, u128::MAX - 3].iter().filter(|i| !h.contains(i)).count());
    }

    #[test]
    fn small_sets_hold_one_exact_allocation() {
        let mut s = SeenIds::default();
        assert!(s.insert(5));
        assert!(!s.insert(5));
        assert_eq!(s.heap_bytes(), 16);
        for i in 0..INLINE_MAIN as u128 {
            s.insert(100 + i);
        }
        assert!(s.heap_bytes() <= (INLINE_MAIN + 1 + 4) * 16);
    }

    #[test]
    fn the_window_keeps_recent_and_future_ids_and_forgets_only_older_buckets() {
        let w = DedupWindow::new(std::time::Duration::from_secs(60));
        let now = 1_000_000_000_000i64;
        let s = 1_000_000_000i64;
        let ids = [(1u128, now - 120 * s), (2, now - 59 * s), (3, now), (4, now + 30 * s), (5, now + 3600 * s)];
        let mut r = w.recent(ids, now);
        assert!(!r.contains(1), "older than the window: left to storage");
        assert!((2..=5).all(|id| r.contains(id)));
        // 80 s on: 2 and 3 are older than the horizon, 4 is not yet, 5 (an hour ahead) stays.
        r.forget_before(w.first_kept(now + 80 * s));
        assert!(!r.contains(2) && !r.contains(3));
        assert!(r.contains(4) && r.contains(5));
        // Nothing newer than the horizon is ever forgotten.
        for later in [0, 30, 59, 89] {
            let mut r = w.recent(ids, now);
            r.forget_before(w.first_kept(now + later * s));
            for (id, t) in ids.iter().filter(|(_, t)| *t >= w.horizon(now)) {
                if *t >= w.horizon(now + later * s) {
                    assert!(r.contains(*id), "id {id} at +{later}s ({t})");
                }
            }
        }
    }

    #[test]
    fn recent_ids_forget_whole_buckets_and_nothing_newer() {
        let mut r = RecentIds::default();
        for id in 0..100u128 {
            assert!(r.insert(id, (id / 10) as i64));
        }
        assert!(!r.insert(55, 5), "an id is found again in its bucket");
        let mut other = RecentIds::default();
        other.insert(1000, 9);
        other.insert(2000, 42);
        r.absorb(other);
        assert_eq!(r.len(), 102);
        assert_eq!(r.forget_before(5), 50);
        assert!((0..50u128).all(|id| !r.contains(id)));
        assert!((50..100u128).all(|id| r.contains(id)) && r.contains(1000) && r.contains(2000));
        assert_eq!(r.forget_before(43), 52);
        assert!(r.is_empty() && r.heap_bytes() == 0);
    }
}
