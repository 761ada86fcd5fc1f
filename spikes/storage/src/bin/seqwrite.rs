//! Spike 1: sustained sequential write bandwidth with one fdatasync per group of records.
//! `seqwrite DIR [RECORDS] [RECORD_BYTES] [PER_SYNC]` appends length+CRC32C-framed records and prints
//! records/s, MB/s and the fdatasync latency.
use std::io::Write;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).map_or("/tmp/seqwrite", String::as_str));
    let records: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(4_000_000);
    let size: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(160);
    let per_sync: usize = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(4_000);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("journal.log");
    let mut file = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(&path).unwrap();
    let payload = vec![0x5au8; size - 8];
    let mut buf = Vec::with_capacity(per_sync * size);
    let mut syncs = Vec::new();
    let started = Instant::now();
    let mut written = 0usize;
    for n in 0..records {
        let mut rec = payload.clone();
        rec[..8].copy_from_slice(&(n as u64).to_le_bytes());
        buf.extend_from_slice(&(rec.len() as u32).to_le_bytes());
        buf.extend_from_slice(&crc32c::crc32c(&rec).to_le_bytes());
        buf.extend_from_slice(&rec);
        if (n + 1) % per_sync == 0 || n + 1 == records {
            file.write_all(&buf).unwrap();
            written += buf.len();
            buf.clear();
            let t = Instant::now();
            file.sync_data().unwrap();
            syncs.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    syncs.sort_by(f64::total_cmp);
    println!(
        "{records} records of {size} B, fdatasync every {per_sync}: {:.0} records/s, {:.0} MB/s; fdatasync p50 {:.2} ms p99 {:.2} ms ({} syncs)",
        records as f64 / secs,
        written as f64 / secs / 1e6,
        syncs[syncs.len() / 2],
        syncs[syncs.len() * 99 / 100],
        syncs.len()
    );
    std::fs::remove_file(&path).unwrap();
}
