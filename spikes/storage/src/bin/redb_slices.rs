//! Spike 3 (design B2): redb with one key range per time slice, keys ascending (slice, seq), many
//! `Durability::None` transactions and an `Immediate` commit once a second. Prints records/s and bytes
//! written per record. `redb_slices DIR [RECORDS] [PER_TX] [RECORD_BYTES]`.
use std::time::Instant;

use redb::{Database, Durability, TableDefinition};

const TASKS: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("slices");

fn written_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io").unwrap().lines()
        .find_map(|l| l.strip_prefix("write_bytes: ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).map_or("/tmp/redb-slices", String::as_str));
    let records: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(2_000_000);
    let per_tx: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(4_000);
    let size: usize = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(160);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("slices.redb");
    let _ = std::fs::remove_file(&path);
    let db = Database::builder().set_cache_size(64 << 20).create(&path).unwrap();
    let value = vec![0x5au8; size];
    let io_before = written_bytes();
    let started = Instant::now();
    let mut last_durable = Instant::now();
    let mut seq = 0u64;
    while seq < records {
        let mut tx = db.begin_write().unwrap();
        let durable = last_durable.elapsed().as_secs_f64() >= 1.0;
        let _ = tx.set_durability(if durable { Durability::Immediate } else { Durability::None });
        {
            let mut table = tx.open_table(TASKS).unwrap();
            for _ in 0..per_tx {
                // 30-day spread over 1-minute slices: the slice grows slowly, seq ascends.
                let slice = (seq * 43_200 / records) as u32;
                table.insert((slice, seq), value.as_slice()).unwrap();
                seq += 1;
            }
        }
        tx.commit().unwrap();
        if durable {
            last_durable = Instant::now();
        }
    }
    let mut tx = db.begin_write().unwrap();
    let _ = tx.set_durability(Durability::Immediate);
    tx.commit().unwrap();
    let secs = started.elapsed().as_secs_f64();
    let written = written_bytes() - io_before;
    println!(
        "{records} records of {size} B, {per_tx} per transaction, Immediate once a second: {:.0} records/s, {:.0} B written per record",
        records as f64 / secs,
        written as f64 / records as f64
    );
    drop(db);
    std::fs::remove_file(&path).unwrap();
}
