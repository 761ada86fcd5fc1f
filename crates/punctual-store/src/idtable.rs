//! The compact id table of storage v2 (docs/storage.md): hash(queue, id) → where the task's record
//! lives in the cold tier (a chunk of a slice file and the record's place in it), in 7 bytes a slot,
//! so 100 M pending tasks take ~0.8 GB (spike 2 measured 6-byte slots: 6.67 B per task at 90 % load,
//! 86 ns a hit).
//!
//! Open addressing with linear probing over slots of a 26-bit fingerprint and a 30-bit location. The
//! fingerprint also decides the home slot (multiply-shift over the table size), so an entry's home can
//! be recomputed from the slot alone: that is what lets removal shift later entries back instead of
//! leaving tombstones. Two keys can share a fingerprint (about 1 in 67 million per pair), so a lookup
//! answers every *candidate* location and the caller confirms against the record it reads; the table
//! never decides on its own that a key exists. A location names one record exactly, so a confirmed
//! candidate is the key's live record.

/// A slot: `fingerprint << LOC_BITS | location`, 7 bytes little-endian; fingerprint 0 marks it empty.
type Slot = [u8; 7];

/// Bits of the fingerprint.
pub const FP_BITS: u32 = 26;
/// Bits of a location.
pub const LOC_BITS: u32 = 30;

/// The table grows (×1.25) when it would pass this load, in percent, so it stays between 74 % and
/// 92 % full once it has grown: 7.6–9.5 bytes per entry.
const MAX_LOAD_PERCENT: usize = 92;

/// The fingerprint of a key: `FP_BITS` wide, never 0 (0 marks an empty slot).
pub fn fingerprint(queue: &str, id: &str) -> u32 {
    use punctual_core::{fnv1a64, fnv1a64_from, mix64};
    // Mixed, so keys that differ in one byte get unrelated fingerprints.
    let hash = mix64(fnv1a64_from(
        fnv1a64_from(fnv1a64(queue.as_bytes()), b"\0"),
        id.as_bytes(),
    ));
    let fp = (hash >> (64 - FP_BITS)) as u32;
    if fp == 0 { 1 } else { fp }
}

/// hash(queue, id) → location, with possible false candidates (see the module documentation).
#[derive(Debug, Clone)]
pub struct IdTable {
    slots: Vec<Slot>,
    len: usize,
}

fn packed(slot: &Slot) -> u64 {
    let mut b = [0u8; 8];
    b[..7].copy_from_slice(slot);
    u64::from_le_bytes(b)
}

fn fp_of(slot: &Slot) -> u32 {
    (packed(slot) >> LOC_BITS) as u32
}

fn loc_of(slot: &Slot) -> u32 {
    (packed(slot) & ((1 << LOC_BITS) - 1)) as u32
}

fn slot(fp: u32, loc: u32) -> Slot {
    let v = (u64::from(fp) << LOC_BITS) | u64::from(loc);
    let b = v.to_le_bytes();
    [b[0], b[1], b[2], b[3], b[4], b[5], b[6]]
}

const EMPTY: Slot = [0; 7];

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
            slots: vec![EMPTY; slots],
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
        ((u64::from(fp) * self.slots.len() as u64) >> FP_BITS) as usize
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() { 0 } else { i + 1 }
    }

    /// Adds an entry (a key may have one entry; the caller removes the old one when a task moves).
    pub fn insert(&mut self, fp: u32, loc: u32) {
        debug_assert!(fp != 0 && fp < (1 << FP_BITS), "fingerprint {fp}");
        debug_assert!(loc < (1 << LOC_BITS), "location {loc}");
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

    /// Every location stored under `fp` (usually none or one), handed to `each`.
    pub fn for_each_candidate(&self, fp: u32, mut each: impl FnMut(u32)) {
        let mut i = self.home(fp);
        loop {
            let s = &self.slots[i];
            match fp_of(s) {
                0 => return,
                f if f == fp => each(loc_of(s)),
                _ => {}
            }
            i = self.next(i);
        }
    }

    /// Every location stored under `fp` (usually none or one).
    pub fn candidates(&self, fp: u32) -> Vec<u32> {
        let mut out = Vec::new();
        self.for_each_candidate(fp, |loc| out.push(loc));
        out
    }

    /// Whether the entry `(fp, loc)` is in the table.
    pub fn contains(&self, fp: u32, loc: u32) -> bool {
        let mut found = false;
        self.for_each_candidate(fp, |l| found |= l == loc);
        found
    }

    /// Removes one entry `(fp, loc)`; false if there was none.
    pub fn remove(&mut self, fp: u32, loc: u32) -> bool {
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
        self.slots[hole] = EMPTY;
        self.len -= 1;
        true
    }

    fn grow(&mut self) {
        let old = std::mem::take(&mut self.slots);
        self.slots = vec![EMPTY; old.len() + old.len() / 4 + 1];
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
        assert!(fps.len() >= 99_800, "{} distinct", fps.len());
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
            table.insert(fingerprint("q", &i.to_string()), i % 500);
        }
        assert_eq!(table.len(), 10_000);
        for i in 0..10_000u32 {
            assert!(
                table
                    .candidates(fingerprint("q", &i.to_string()))
                    .contains(&(i % 500))
            );
        }
        assert!(
            table.bytes() <= 10_000 * 7 * 100 / 70,
            "{} bytes",
            table.bytes()
        );
    }

    /// A small fingerprint space forces collisions and long runs: the model is a multiset of
    /// (fingerprint, location) entries.
    #[derive(Debug, Clone)]
    enum Op {
        Insert(u32, u32),
        Remove(u32, u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u32..40, 0u32..4).prop_map(|(f, l)| Op::Insert(f, l)),
            (1u32..40, 0u32..4).prop_map(|(f, l)| Op::Remove(f, l)),
        ]
    }

    proptest! {
        #[test]
        fn matches_a_multiset_model(ops in proptest::collection::vec(op(), 1..400), spread in 0u32..3) {
            // Spread the small fingerprints over the whole range or keep them clustered.
            let scale = [1u32, 97_003, 1_677_721][spread as usize];
            let mut table = IdTable::with_capacity(4);
            let mut model: HashMap<(u32, u32), usize> = HashMap::new();
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
                let mut want: Vec<u32> = model
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
