//! The compact id table of storage v2's second stage (docs/storage.md): hash(queue, id) → where the
//! task lives (a 16-bit slice number), in 6 bytes a slot, so 100 M pending tasks take ~0.67 GB
//! (spike 2: 6.67 B per task at 90 % load, 86 ns a hit).
//!
//! Open addressing with linear probing over slots of a 32-bit fingerprint and the location. The
//! fingerprint also decides the home slot (multiply-shift over the table size), so an entry's home can
//! be recomputed from the slot alone: that is what lets removal shift later entries back instead of
//! leaving tombstones. Two keys can share a fingerprint (about 1 in 4 billion per pair), so a lookup
//! answers every *candidate* location and the caller confirms against the record it reads; the table
//! never decides on its own that a key exists.

/// A slot: fingerprint (0 = empty) and location.
type Slot = [u8; 6];

/// The table grows (×1.5) when it would pass this load, in percent.
const MAX_LOAD_PERCENT: usize = 90;

/// The 32-bit fingerprint of a key: never 0 (0 marks an empty slot).
pub fn fingerprint(queue: &str, id: &str) -> u32 {
    use punctual_core::{fnv1a64, fnv1a64_from, mix64};
    // Mixed, so keys that differ in one byte get unrelated fingerprints.
    let hash = mix64(fnv1a64_from(
        fnv1a64_from(fnv1a64(queue.as_bytes()), b"\0"),
        id.as_bytes(),
    ));
    let fp = (hash >> 32) as u32 ^ hash as u32;
    if fp == 0 { 1 } else { fp }
}

/// hash(queue, id) → 16-bit location, with possible false candidates (see the module documentation).
#[derive(Debug, Clone)]
pub struct IdTable {
    slots: Vec<Slot>,
    len: usize,
}

fn fp_of(slot: &Slot) -> u32 {
    u32::from_le_bytes([slot[0], slot[1], slot[2], slot[3]])
}

fn loc_of(slot: &Slot) -> u16 {
    u16::from_le_bytes([slot[4], slot[5]])
}

fn slot(fp: u32, loc: u16) -> Slot {
    let f = fp.to_le_bytes();
    let l = loc.to_le_bytes();
    [f[0], f[1], f[2], f[3], l[0], l[1]]
}

impl Default for IdTable {
    fn default() -> Self {
        IdTable::with_capacity(1024)
    }
}

impl IdTable {
    /// A table that holds `entries` before it first grows.
    pub fn with_capacity(entries: usize) -> IdTable {
        let slots = (entries * 100 / MAX_LOAD_PERCENT).max(16) + 1;
        IdTable {
            slots: vec![[0; 6]; slots],
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of memory the slots take.
    pub fn bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<Slot>()
    }

    fn home(&self, fp: u32) -> usize {
        ((u64::from(fp) * self.slots.len() as u64) >> 32) as usize
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() { 0 } else { i + 1 }
    }

    /// Adds an entry (a key may have one entry; the caller removes the old one when a task moves).
    pub fn insert(&mut self, fp: u32, loc: u16) {
        debug_assert_ne!(fp, 0);
        if (self.len + 1) * 100 > self.slots.len() * MAX_LOAD_PERCENT {
            self.grow();
        }
        let mut i = self.home(fp);
        while fp_of(&self.slots[i]) != 0 {
            i = self.next(i);
        }
        self.slots[i] = slot(fp, loc);
        self.len += 1;
    }

    /// Every location stored under `fp` (usually none or one).
    pub fn candidates(&self, fp: u32) -> Vec<u16> {
        let mut out = Vec::new();
        let mut i = self.home(fp);
        loop {
            let s = &self.slots[i];
            match fp_of(s) {
                0 => return out,
                f if f == fp => out.push(loc_of(s)),
                _ => {}
            }
            i = self.next(i);
        }
    }

    /// Removes one entry `(fp, loc)`; false if there was none.
    pub fn remove(&mut self, fp: u32, loc: u16) -> bool {
        let mut i = self.home(fp);
        loop {
            let s = &self.slots[i];
            match fp_of(s) {
                0 => return false,
                f if f == fp && loc_of(s) == loc => break,
                _ => i = self.next(i),
            }
        }
        // Backward-shift deletion: pull later entries of the run back over the hole when their home
        // allows it, so no tombstones pile up.
        let mut hole = i;
        let mut j = self.next(i);
        loop {
            let f = fp_of(&self.slots[j]);
            if f == 0 {
                break;
            }
            let home = self.home(f);
            // Does the entry at j belong at or before the hole (cyclically)?
            let movable = if hole <= j {
                home <= hole || home > j
            } else {
                home <= hole && home > j
            };
            if movable {
                self.slots[hole] = self.slots[j];
                hole = j;
            }
            j = self.next(j);
        }
        self.slots[hole] = [0; 6];
        self.len -= 1;
        true
    }

    fn grow(&mut self) {
        let old = std::mem::take(&mut self.slots);
        self.slots = vec![[0; 6]; old.len() + old.len() / 2 + 1];
        self.len = 0;
        for s in old {
            if fp_of(&s) != 0 {
                self.insert(fp_of(&s), loc_of(&s));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn fingerprints_are_never_zero_and_spread() {
        let fps: std::collections::HashSet<u32> = (0..100_000)
            .map(|i| fingerprint("q", &format!("t{i}")))
            .collect();
        assert!(fps.len() >= 99_990, "{} distinct", fps.len());
        assert!(!fps.contains(&0));
        assert_ne!(
            fingerprint("a", "bc"),
            fingerprint("ab", "c"),
            "the separator counts"
        );
    }

    #[test]
    fn grows_and_keeps_every_entry() {
        let mut table = IdTable::with_capacity(10);
        for i in 0..10_000u32 {
            table.insert(fingerprint("q", &i.to_string()), (i % 500) as u16);
        }
        assert_eq!(table.len(), 10_000);
        for i in 0..10_000u32 {
            assert!(
                table
                    .candidates(fingerprint("q", &i.to_string()))
                    .contains(&((i % 500) as u16))
            );
        }
        assert!(
            table.bytes() <= 10_000 * 6 * 100 / 60,
            "{} bytes",
            table.bytes()
        );
    }

    /// A small fingerprint space forces collisions and long runs: the model is a multiset of
    /// (fingerprint, location) entries.
    #[derive(Debug, Clone)]
    enum Op {
        Insert(u32, u16),
        Remove(u32, u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u32..40, 0u16..4).prop_map(|(f, l)| Op::Insert(f, l)),
            (1u32..40, 0u16..4).prop_map(|(f, l)| Op::Remove(f, l)),
        ]
    }

    proptest! {
        #[test]
        fn matches_a_multiset_model(ops in proptest::collection::vec(op(), 1..400), spread in 0u32..3) {
            // Spread the small fingerprints over the whole range or keep them clustered.
            let scale = [1u32, 97_003, 107_374_182][spread as usize];
            let mut table = IdTable::with_capacity(4);
            let mut model: HashMap<(u32, u16), usize> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(f, l) => {
                        table.insert(f * scale, l);
                        *model.entry((f * scale, l)).or_default() += 1;
                    }
                    Op::Remove(f, l) => {
                        let key = (f * scale, l);
                        let had = model.get(&key).copied().unwrap_or(0) > 0;
                        prop_assert_eq!(table.remove(key.0, key.1), had);
                        if had {
                            *model.get_mut(&key).unwrap() -= 1;
                        }
                    }
                }
                prop_assert_eq!(table.len(), model.values().sum::<usize>());
            }
            for f in 1u32..40 {
                let mut got = table.candidates(f * scale);
                got.sort_unstable();
                let mut want: Vec<u16> = model
                    .iter()
                    .filter(|((mf, _), _)| *mf == f * scale)
                    .flat_map(|((_, l), n)| std::iter::repeat_n(*l, *n))
                    .collect();
                want.sort_unstable();
                prop_assert_eq!(got, want, "fingerprint {}", f * scale);
            }
        }
    }
}
