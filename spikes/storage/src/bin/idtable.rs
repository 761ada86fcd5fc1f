//! Spike 2: a compact id table — (queue, id) hash → slice number — at N entries: bytes per entry and
//! ns per probe. Open addressing over 6-byte slots (32-bit fingerprint + 16-bit slice), linear
//! probing, the slot index taken from other hash bits than the fingerprint; fingerprint 0 = empty.
//! `idtable [ENTRIES] [LOAD_PERCENT]`.
use std::time::Instant;

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

struct Table {
    slots: Vec<[u8; 6]>,
}

impl Table {
    fn new(slots: usize) -> Table {
        Table { slots: vec![[0; 6]; slots] }
    }
    /// The home slot from the low 32 bits (scaled to any table size), the fingerprint from the high.
    fn split(&self, hash: u64) -> (usize, u32) {
        let fp = (hash >> 32) as u32;
        let home = ((hash as u32 as u64 * self.slots.len() as u64) >> 32) as usize;
        (home, if fp == 0 { 1 } else { fp })
    }
    fn insert(&mut self, hash: u64, slice: u16) {
        let (mut i, fp) = self.split(hash);
        let len = self.slots.len();
        loop {
            let s = &mut self.slots[i];
            let cur = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            if cur == 0 || cur == fp {
                s[..4].copy_from_slice(&fp.to_le_bytes());
                s[4..].copy_from_slice(&slice.to_le_bytes());
                return;
            }
            i = if i + 1 == len { 0 } else { i + 1 };
        }
    }
    fn get(&self, hash: u64) -> Option<u16> {
        let (mut i, fp) = self.split(hash);
        let len = self.slots.len();
        loop {
            let s = &self.slots[i];
            let cur = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            if cur == 0 {
                return None;
            }
            if cur == fp {
                return Some(u16::from_le_bytes([s[4], s[5]]));
            }
            i = if i + 1 == len { 0 } else { i + 1 };
        }
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status").unwrap().lines()
        .find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(100_000_000);
    let load: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(75);
    let slots = n * 100 / load;
    let before = rss_kib();
    let mut t = Table::new(slots);
    let started = Instant::now();
    for k in 0..n as u64 {
        t.insert(mix(k), (k % 60_000) as u16);
    }
    let insert_ns = started.elapsed().as_nanos() as f64 / n as f64;
    let rss = rss_kib() - before;
    let probes = 10_000_000u64;
    let started = Instant::now();
    let mut hits = 0u64;
    for k in 0..probes {
        let key = mix(k.wrapping_mul(0x9e37_79b9_7f4a_7c15) % n as u64);
        hits += t.get(key).is_some() as u64;
    }
    let hit_ns = started.elapsed().as_nanos() as f64 / probes as f64;
    let started = Instant::now();
    let mut misses = 0u64;
    for k in 0..probes {
        misses += t.get(mix(n as u64 + k)).is_none() as u64;
    }
    let miss_ns = started.elapsed().as_nanos() as f64 / probes as f64;
    println!(
        "{n} entries in {slots} slots ({:.0} % load): {:.2} B/entry (RSS {:.0} MiB); insert {insert_ns:.0} ns, hit {hit_ns:.0} ns, miss {miss_ns:.0} ns ({hits} hits, {misses} misses of {probes})",
        n as f64 * 100.0 / slots as f64,
        rss as f64 * 1024.0 / n as f64,
        rss as f64 / 1024.0
    );
}
