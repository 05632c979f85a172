//! Small sorted containers for the per-run state: [`VecMap`] and [`VecSet`].
//!
//! A run holds a handful of counts, values, trace ids and services. A
//! `BTreeMap`/`BTreeSet` allocates a whole node (room for 11 entries: 280 to
//! 720 bytes) even for one entry; these keep the entries sorted in a `Vec`
//! grown one slot at a time, so a map of two counts costs 64 bytes. They
//! serialize exactly like the B-tree containers (a JSON object / array in key
//! order), so the stored run state (`process_runs.state`, ClickHouse) is
//! unchanged. Lookups are binary searches; inserts move at most the (capped)
//! number of entries.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};

/// A map sorted by key, stored in a `Vec`.
#[derive(Debug, Clone, PartialEq)]
pub struct VecMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for VecMap<K, V> {
    fn default() -> Self {
        VecMap(Vec::new())
    }
}

impl<K: Ord, V> VecMap<K, V> {
    pub fn new() -> Self {
        VecMap(Vec::new())
    }

    fn find<Q: Ord + ?Sized>(&self, k: &Q) -> Result<usize, usize>
    where
        K: Borrow<Q>,
    {
        self.0.binary_search_by(|(x, _)| x.borrow().cmp(k))
    }

    pub fn get<Q: Ord + ?Sized>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.find(k).ok().map(|i| &self.0[i].1)
    }

    pub fn get_mut<Q: Ord + ?Sized>(&mut self, k: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        self.find(k).ok().map(|i| &mut self.0[i].1)
    }

    pub fn contains_key<Q: Ord + ?Sized>(&self, k: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.find(k).is_ok()
    }

    /// Inserts or replaces; returns the previous value.
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        match self.find(&k) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, v)),
            Err(i) => {
                self.0.reserve_exact(1);
                self.0.insert(i, (k, v));
                None
            }
        }
    }

    /// The value under `k`, inserting `make(k)`'s value first when absent
    /// (`k` is only turned into an owned key then).
    pub fn get_or_insert_with<Q: Ord + ?Sized>(&mut self, k: &Q, make: impl FnOnce() -> (K, V)) -> &mut V
    where
        K: Borrow<Q>,
    {
        let i = match self.find(k) {
            Ok(i) => i,
            Err(i) => {
                self.0.reserve_exact(1);
                self.0.insert(i, make());
                i
            }
        };
        &mut self.0[i].1
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> + '_ {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> + '_ {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.0.iter().map(|(_, v)| v)
    }
}

impl<'a, K, V> IntoIterator for &'a VecMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (K, V)>, fn(&'a (K, V)) -> (&'a K, &'a V)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for VecMap<K, V> {
    /// Later entries replace earlier ones with the same key (like a `BTreeMap`).
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let b: BTreeMap<K, V> = iter.into_iter().collect();
        VecMap(b.into_iter().collect())
    }
}

impl<K: Serialize, V: Serialize> Serialize for VecMap<K, V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

impl<'de, K: Ord + Deserialize<'de>, V: Deserialize<'de>> Deserialize<'de> for VecMap<K, V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let b = BTreeMap::<K, V>::deserialize(d)?;
        Ok(VecMap(b.into_iter().collect()))
    }
}

/// A set kept sorted in a `Vec`.
#[derive(Debug, Clone, PartialEq)]
pub struct VecSet<T>(Vec<T>);

impl<T> Default for VecSet<T> {
    fn default() -> Self {
        VecSet(Vec::new())
    }
}

impl<T: Ord> VecSet<T> {
    pub fn new() -> Self {
        VecSet(Vec::new())
    }

    pub fn contains<Q: Ord + ?Sized>(&self, x: &Q) -> bool
    where
        T: Borrow<Q>,
    {
        self.0.binary_search_by(|y| y.borrow().cmp(x)).is_ok()
    }

    /// Adds `x`; returns whether it was new.
    pub fn insert(&mut self, x: T) -> bool {
        match self.0.binary_search(&x) {
            Ok(_) => false,
            Err(i) => {
                self.0.reserve_exact(1);
                self.0.insert(i, x);
                true
            }
        }
    }

    /// Adds `x` unless present, building the owned value only when absent.
    pub fn insert_with<Q: Ord + ?Sized>(&mut self, x: &Q, make: impl FnOnce() -> T) -> bool
    where
        T: Borrow<Q>,
    {
        match self.0.binary_search_by(|y| y.borrow().cmp(x)) {
            Ok(_) => false,
            Err(i) => {
                self.0.reserve_exact(1);
                self.0.insert(i, make());
                true
            }
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }
}

impl<T: Ord> Extend<T> for VecSet<T> {
    fn extend<I: IntoIterator<Item = T>>(&mut self, iter: I) {
        for x in iter {
            self.insert(x);
        }
    }
}

impl<'a, T> IntoIterator for &'a VecSet<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<T: Ord> FromIterator<T> for VecSet<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let b: BTreeSet<T> = iter.into_iter().collect();
        VecSet(b.into_iter().collect())
    }
}

impl<T: Serialize> Serialize for VecSet<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter())
    }
}

impl<'de, T: Ord + Deserialize<'de>> Deserialize<'de> for VecSet<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let b = BTreeSet::<T>::deserialize(d)?;
        Ok(VecSet(b.into_iter().collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_like_the_btree_containers() {
        let pairs = [("b".to_string(), 2.5), ("a".to_string(), 1.0), ("c".to_string(), -3.0), ("a".to_string(), 4.0)];
        let v: VecMap<String, f64> = pairs.iter().cloned().collect();
        let b: BTreeMap<String, f64> = pairs.iter().cloned().collect();
        assert_eq!(serde_json::to_string(&v).unwrap(), serde_json::to_string(&b).unwrap());
        let back: VecMap<String, f64> = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        assert_eq!(back, v);
        assert_eq!(v.get("a"), Some(&4.0));
        assert_eq!(v.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);

        let items = ["z", "x", "y", "x"].map(String::from);
        let vs: VecSet<String> = items.iter().cloned().collect();
        let bs: BTreeSet<String> = items.iter().cloned().collect();
        assert_eq!(serde_json::to_string(&vs).unwrap(), serde_json::to_string(&bs).unwrap());
        let back: VecSet<String> = serde_json::from_str(&serde_json::to_string(&bs).unwrap()).unwrap();
        assert_eq!(back, vs);
        assert!(vs.contains("y") && !vs.contains("w"));
    }

    #[test]
    fn inserts_keep_order_and_exact_capacity() {
        let mut m: VecMap<String, f64> = VecMap::new();
        for k in ["m", "c", "x", "a", "c"] {
            *m.get_or_insert_with(k, || (k.to_string(), 0.0)) += 1.0;
        }
        assert_eq!(
            m.iter().map(|(k, v)| (k.as_str(), *v)).collect::<Vec<_>>(),
            [("a", 1.0), ("c", 2.0), ("m", 1.0), ("x", 1.0)]
        );
        assert_eq!(m.0.capacity(), 4);
        assert_eq!(m.insert("a".into(), 9.0), Some(1.0));
        let mut s: VecSet<String> = VecSet::new();
        assert!(s.insert_with("q", || "q".to_string()));
        assert!(!s.insert("q".to_string()));
        assert_eq!(s.0.capacity(), 1);
    }
}
