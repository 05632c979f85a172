//! [`SeenIds`]: the exact set of signal ids folded into a run, for
//! de-duplication, kept compact because one exists per active run.

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
            let id = if i % 3 == 0 { (x % 5000) as u128 } else { x >> 7 };
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
}
