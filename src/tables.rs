//! Giving back what a crowd left behind.
//!
//! A hash table keeps the capacity of its fullest moment: after 2,000 devices had
//! come and gone, the relay's per-connection and per-peer tables still held 1.5 MiB
//! of empty buckets, each one large allocation that the allocator cannot return
//! while the table lives (BENCHMARKS.md, "Memory after the devices leave"). The event
//! loop calls [`shrink`] on its tables every 10 s (the admission limiters on theirs
//! when they prune); a table a quarter full or
//! less is cut to twice its length, so a table that swings with normal traffic is not
//! reallocated over and over.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hash};

/// Below this capacity a table is not worth reallocating.
const SMALL: usize = 64;

/// What [`shrink`] does, for any table.
pub trait Table {
    /// Entries held and room for them.
    fn fill(&self) -> (usize, usize);
    fn shrink_to(&mut self, min: usize);
}

impl<K: Eq + Hash, V, S: BuildHasher> Table for HashMap<K, V, S> {
    fn fill(&self) -> (usize, usize) {
        (self.len(), self.capacity())
    }
    fn shrink_to(&mut self, min: usize) {
        HashMap::shrink_to(self, min)
    }
}

impl<T: Eq + Hash, S: BuildHasher> Table for HashSet<T, S> {
    fn fill(&self) -> (usize, usize) {
        (self.len(), self.capacity())
    }
    fn shrink_to(&mut self, min: usize) {
        HashSet::shrink_to(self, min)
    }
}

/// Cuts `table` to twice its length if it is at most a quarter full and not small.
/// Returns whether it did.
pub fn shrink(table: &mut impl Table) -> bool {
    let (len, capacity) = table.fill();
    if capacity <= SMALL || capacity / 4 < len {
        return false;
    }
    table.shrink_to(2 * len);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_emptied_after_a_crowd_gives_its_room_back() {
        let mut t: HashMap<u64, [u8; 64]> = (0..10_000).map(|i| (i, [0; 64])).collect();
        t.retain(|k, _| *k < 10);
        assert!(t.capacity() >= 10_000);
        assert!(shrink(&mut t));
        assert!(t.capacity() < 64, "capacity {}", t.capacity());
        assert_eq!(t.len(), 10);
        // Emptied completely, a table holds no allocation at all.
        let mut big: HashSet<u64> = (0..1000).collect();
        big.clear();
        assert!(shrink(&mut big));
        assert_eq!(big.capacity(), 0);
    }

    #[test]
    fn busy_and_small_tables_are_left_alone() {
        // More than a quarter full: a table that swings with traffic keeps its room.
        let mut t: HashMap<u64, u64> = (0..1000).map(|i| (i, i)).collect();
        let room = t.capacity();
        t.retain(|k, _| *k < room as u64 / 4 + 1);
        // (Removed entries leave markers that count against the room left.)
        let capacity = t.capacity();
        assert!(!shrink(&mut t));
        assert_eq!(t.capacity(), capacity);
        // Small tables are not worth a reallocation.
        let mut s: HashSet<u64> = (0..50).collect();
        s.clear();
        assert!(!shrink(&mut s));
    }
}
