//! The compact id table of storage v2 (docs/storage.md): hash(queue, id) → where the task's record
//! lives in the cold tier (a chunk of a slice file and the record's place in it), in 7 bytes a slot,
//! so 100 M pending tasks take ~0.8 GB (spike 2 measured 6-byte slots: 6.67 B per task at 90 % load,
//! 86 ns a hit).
//!
//! Open addressing with *ordered* linear probing (Amble and Knuth's ordered hash table) over slots of a
//! 28-bit fingerprint and a 28-bit location. The fingerprint also decides the home slot (multiply-shift
//! over the table size, so homes grow with fingerprints), and every run of occupied slots is kept in
//! fingerprint order: a lookup stops at the first larger fingerprint, so a miss costs no more than a
//! hit (about 7 slots at 92 % load, where plain linear probing scans about 78). An entry's home can be
//! recomputed from the slot alone, which lets removal shift later entries back instead of leaving
//! tombstones. The table does not wrap around: a little spare room after the last home takes the
//! runs that reach the end. Two keys can share a fingerprint (about 1 in 268 million per pair), so a lookup
//! answers every *candidate* location and the caller confirms against the record it reads; the table
//! never decides on its own that a key exists. A location names one record exactly, so a confirmed
//! candidate is the key's live record.

/// A slot: `fingerprint << LOC_BITS | location`, 7 bytes little-endian; fingerprint 0 marks it empty.
type Slot = [u8; 7];

/// Bits of the fingerprint.
pub const FP_BITS: u32 = 28;
/// Bits of a location.
pub const LOC_BITS: u32 = 28;

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
    /// Home slots; the rest are spare room at the end.
    homes: usize,
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

/// Bits of the fingerprint (its top ones) that choose an entry's part in [`Entries`].
const PART_BITS: u32 = 8;
const PARTS: usize = 1 << PART_BITS;

/// Packed entries (`fingerprint << LOC_BITS | location`) gathered for [`IdTable::from_entries`],
/// already split by the top bits of their fingerprint. Each part is then sorted while it is in
/// cache, with scratch the size of one part: sorting all of them at once needed a second array as
/// large as the entries (80 MB at 10 M pending), and fresh memory is most of what a restart costs.
pub struct Entries {
    parts: Vec<Vec<u64>>,
    len: usize,
}

impl Entries {
    /// Room for about `entries` before any part grows (fingerprints spread evenly over the parts).
    pub fn with_capacity(entries: usize) -> Entries {
        let each = entries / PARTS + entries / PARTS / 16 + 64;
        Entries {
            parts: (0..PARTS).map(|_| Vec::with_capacity(each)).collect(),
            len: 0,
        }
    }

    pub fn push(&mut self, packed: u64) {
        let part = (packed >> (LOC_BITS + FP_BITS - PART_BITS)) as usize & (PARTS - 1);
        self.parts[part].push(packed);
        self.len += 1;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Sorts one part of [`Entries`] by fingerprint (the order within one fingerprint does not matter):
/// an LSD radix sort of the bits below the part's, in two passes, through `scratch`.
fn sort_part(part: &mut Vec<u64>, scratch: &mut Vec<u64>) {
    const BITS: u32 = (FP_BITS - PART_BITS) / 2;
    const BUCKETS: usize = 1 << BITS;
    scratch.clear();
    scratch.resize(part.len(), 0);
    let mut starts = vec![0usize; BUCKETS + 1];
    for pass in 0..2 {
        let shift = LOC_BITS + pass * BITS;
        let digit = |e: u64| ((e >> shift) as usize) & (BUCKETS - 1);
        starts.iter_mut().for_each(|s| *s = 0);
        for e in part.iter() {
            starts[digit(*e) + 1] += 1;
        }
        for b in 0..BUCKETS {
            starts[b + 1] += starts[b];
        }
        for e in part.iter() {
            let d = digit(*e);
            scratch[starts[d]] = *e;
            starts[d] += 1;
        }
        std::mem::swap(part, scratch);
    }
}

impl Default for IdTable {
    fn default() -> Self {
        IdTable::with_capacity(1024)
    }
}

/// Slots past the last home, so a run near the end never needs to wrap around.
fn spare(homes: usize) -> usize {
    64 + homes / 64
}

impl IdTable {
    /// A table that holds `entries` before it first grows.
    pub fn with_capacity(entries: usize) -> IdTable {
        let homes = (entries * 100 / MAX_LOAD_PERCENT).max(16) + 1;
        IdTable {
            slots: vec![EMPTY; homes + spare(homes)],
            homes,
            len: 0,
        }
    }

    /// A table of `entries`, built in one pass after sorting them: far cheaper than inserting them
    /// one by one into a nearly full table. It has room for an eighth more before it grows, so the
    /// journal replayed after it (and the first tasks scheduled) do not make a table just built at
    /// full load grow at once.
    pub fn from_entries(entries: Entries) -> IdTable {
        let n = entries.len();
        let mut table = IdTable::with_capacity(n + n / 8);
        let mut scratch = Vec::new();
        let mut next = 0;
        // The parts are in fingerprint order, so placing each once sorted places them all in order.
        for mut part in entries.parts {
            sort_part(&mut part, &mut scratch);
            next = table.place_sorted(part.into_iter(), next);
        }
        table
    }

    /// Places `entries` (packed, in fingerprint order, none smaller than those placed before) into
    /// this table, whose slots from `next` on are empty, in one pass: each goes to its home or, if
    /// that is taken, right after the previous one, which keeps every run in order without scanning
    /// it. Answers the new `next`.
    fn place_sorted(&mut self, entries: impl Iterator<Item = u64>, mut next: usize) -> usize {
        for packed in entries {
            let fp = (packed >> LOC_BITS) as u32;
            let at = self.home(fp).max(next);
            if at >= self.slots.len() {
                self.slots.resize(at + 1 + spare(self.homes), EMPTY);
            }
            self.slots[at] = slot(fp, (packed & ((1 << LOC_BITS) - 1)) as u32);
            next = at + 1;
            self.len += 1;
        }
        next
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
        ((u64::from(fp) * self.homes as u64) >> FP_BITS) as usize
    }

    /// Adds an entry (a key may have one entry; the caller removes the old one when a task moves).
    pub fn insert(&mut self, fp: u32, loc: u32) {
        debug_assert!(fp != 0 && fp < (1 << FP_BITS), "fingerprint {fp}");
        debug_assert!(loc < (1 << LOC_BITS), "location {loc}");
        if (self.len + 1) * 100 > self.homes * MAX_LOAD_PERCENT {
            self.grow();
        }
        loop {
            // Runs are kept in fingerprint order: skip the smaller (and equal) ones, then shift the
            // rest of the run up by one slot.
            let mut i = self.home(fp);
            while i < self.slots.len() && fp_of(&self.slots[i]) != 0 && fp_of(&self.slots[i]) <= fp
            {
                i += 1;
            }
            let mut j = i;
            while j < self.slots.len() && fp_of(&self.slots[j]) != 0 {
                j += 1;
            }
            if j == self.slots.len() {
                self.grow();
                continue;
            }
            self.slots.copy_within(i..j, i + 1);
            self.slots[i] = slot(fp, loc);
            self.len += 1;
            return;
        }
    }

    /// Every location stored under `fp` (usually none or one), handed to `each`.
    pub fn for_each_candidate(&self, fp: u32, mut each: impl FnMut(u32)) {
        let mut i = self.home(fp);
        while let Some(s) = self.slots.get(i) {
            match fp_of(s) {
                0 => return,
                f if f > fp => return,
                f if f == fp => each(loc_of(s)),
                _ => {}
            }
            i += 1;
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
            let Some(s) = self.slots.get(i) else {
                return false;
            };
            match fp_of(s) {
                0 => return false,
                f if f > fp => return false,
                f if f == fp && loc_of(s) == loc => break,
                _ => i += 1,
            }
        }
        // Backward shift: the displaced entries after the hole move down one slot, up to the first
        // empty slot or entry at its home, so no tombstones pile up and the order holds.
        let mut j = i + 1;
        while j < self.slots.len()
            && fp_of(&self.slots[j]) != 0
            && self.home(fp_of(&self.slots[j])) < j
        {
            j += 1;
        }
        self.slots.copy_within(i + 1..j, i);
        self.slots[j - 1] = EMPTY;
        self.len -= 1;
        true
    }

    fn grow(&mut self) {
        let old = std::mem::take(&mut self.slots);
        self.homes = self.homes + self.homes / 4 + 1;
        self.slots = vec![EMPTY; self.homes + spare(self.homes)];
        self.len = 0;
        // The occupied slots are in fingerprint order across the whole table, not only within each
        // run (homes grow with fingerprints, and no entry sits before its home), so they can be
        // placed in one pass. Re-inserting them one by one cost a restart at 10 M pending a third
        // of a second, once replay's first insert made the freshly built table grow.
        self.place_sorted(old.iter().filter(|s| fp_of(s) != 0).map(packed), 0);
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

    #[test]
    fn a_table_built_from_entries_answers_as_one_built_by_inserts() {
        let entries: Vec<(u32, u32)> = (0..50_000u32)
            .map(|i| (fingerprint("q", &i.to_string()), i * 3))
            .chain((0..100).map(|i| (1, i)))
            .collect();
        // Less room than entries, so parts grow while they are gathered.
        let mut gathered = Entries::with_capacity(1_000);
        for (f, l) in &entries {
            gathered.push((u64::from(*f) << LOC_BITS) | u64::from(*l));
        }
        let mut built = IdTable::from_entries(gathered);
        let mut inserted = IdTable::default();
        for (f, l) in &entries {
            inserted.insert(*f, *l);
        }
        assert_eq!(built.len(), inserted.len());
        for (f, _) in &entries {
            let (mut a, mut b) = (built.candidates(*f), inserted.candidates(*f));
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b);
        }
        // It goes on working as a table: removals and inserts.
        for (f, l) in entries.iter().step_by(2) {
            assert!(built.remove(*f, *l));
        }
        built.insert(7, 7);
        assert!(built.contains(7, 7));
        assert_eq!(built.len(), entries.len() / 2 + 1);
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
