//! The lateness plot: a PNG of the share of the burst delivered within a given lateness (a CDF on a
//! log-scale x axis), one curve per system. Drawn and encoded here: a small raster, a 5×7 font, and
//! a PNG writer whose deflate stream uses fixed Huffman codes with run-length matches.

use std::path::Path;

use anyhow::{Context, Result};

use super::report::Results;
use super::{Sizes, System};

const WIDTH: usize = 960;
const HEIGHT: usize = 560;
const LEFT: usize = 90;
const RIGHT: usize = 50;
const TOP: usize = 60;
const BOTTOM: usize = 70;

/// Palette indices.
const WHITE: u8 = 0;
const BLACK: u8 = 1;
const GRID: u8 = 2;
const PALETTE: [[u8; 3]; 8] = [
    [255, 255, 255],
    [0, 0, 0],
    [215, 215, 215],
    [31, 119, 180],  // Punctual
    [255, 127, 14],  // sorted set
    [44, 160, 44],   // keyspace
    [214, 39, 40],   // beanstalkd
    [148, 103, 189], // Punctual over RESP
];

fn color(system: System) -> u8 {
    match system {
        System::Punctual => 3,
        System::Zset => 4,
        System::Keyspace => 5,
        System::Beanstalkd => 6,
        System::PunctualResp => 7,
    }
}

struct Canvas {
    pixels: Vec<u8>,
}

impl Canvas {
    fn new() -> Canvas {
        Canvas {
            pixels: vec![WHITE; WIDTH * HEIGHT],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: u8) {
        if (0..WIDTH as i64).contains(&x) && (0..HEIGHT as i64).contains(&y) {
            self.pixels[y as usize * WIDTH + x as usize] = c;
        }
    }

    fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: u8) {
        for dy in 0..h {
            for dx in 0..w {
                self.set(x + dx, y + dy, c);
            }
        }
    }

    /// A line `thick` pixels wide (Bresenham with a square brush).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), thick: i64, c: u8) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.rect(x - thick / 2, y - thick / 2, thick, thick, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text in the 5×7 font at `scale`, top-left at (x, y); returns its width.
    fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, c: u8) -> i64 {
        let mut cx = x;
        for ch in text.chars() {
            let rows = glyph(ch.to_ascii_uppercase());
            for (row, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        self.rect(cx + col * scale, y + row as i64 * scale, scale, scale, c);
                    }
                }
            }
            cx += 6 * scale;
        }
        cx - x
    }
}

fn text_width(text: &str, scale: i64) -> i64 {
    text.chars().count() as i64 * 6 * scale
}

/// Rows of a 5×7 glyph, bit 4 leftmost.
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        '<' => [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02],
        '>' => [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08],
        _ => [0; 7],
    }
}

/// The x axis: lateness from 10^2 µs (0.1 ms) to 10^8 µs (100 s), log scale.
const DECADES: (f64, f64) = (2.0, 8.0);

fn x_of(lateness_us: f64) -> i64 {
    let span = (WIDTH - LEFT - RIGHT) as f64;
    let t = (lateness_us.max(1.0).log10() - DECADES.0) / (DECADES.1 - DECADES.0);
    LEFT as i64 + (t.clamp(0.0, 1.0) * span).round() as i64
}

fn y_of(share: f64) -> i64 {
    let span = (HEIGHT - TOP - BOTTOM) as f64;
    (HEIGHT - BOTTOM) as i64 - (share.clamp(0.0, 1.0) * span).round() as i64
}

/// Draws the burst lateness of every system that has one into `path`; false if there is none.
pub fn lateness_cdf(path: &Path, res: &Results, s: &Sizes) -> Result<bool> {
    if res.lateness.is_empty() {
        return Ok(false);
    }
    let mut canvas = Canvas::new();
    let (x0, x1) = (LEFT as i64, (WIDTH - RIGHT) as i64);
    let (y0, y1) = (y_of(0.0), y_of(1.0));
    // Grid and axis labels.
    for (decade, label) in ["0.1 ms", "1 ms", "10 ms", "100 ms", "1 s", "10 s", "100 s"]
        .iter()
        .enumerate()
    {
        let x = x_of(10f64.powi(2 + decade as i32));
        canvas.line((x, y1), (x, y0), 1, GRID);
        canvas.text(x - text_width(label, 2) / 2, y0 + 10, label, 2, BLACK);
    }
    for quarter in 0..=4 {
        let y = y_of(quarter as f64 / 4.0);
        canvas.line((x0, y), (x1, y), 1, GRID);
        let label = format!("{}%", quarter * 25);
        canvas.text(x0 - 12 - text_width(&label, 2), y - 7, &label, 2, BLACK);
    }
    canvas.line((x0, y0), (x1, y0), 2, BLACK);
    canvas.line((x0, y0), (x0, y1), 2, BLACK);
    let title = format!(
        "burst: {} due over {} s, {} pending. share delivered within x",
        s.burst,
        s.burst_over_ms as f64 / 1000.0,
        s.tasks
    );
    canvas.text(x0, 18, &title, 2, BLACK);
    let axis = "lateness: due time to consumer holding the payload (log scale)";
    canvas.text((x0 + x1 - text_width(axis, 2)) / 2, y0 + 40, axis, 2, BLACK);

    // One curve per system; the legend sits right of the middle, where the curves seldom are.
    let legend_x = legend_x(res.lateness.keys().map(|s| s.label()));
    for (i, (system, (hist, due))) in res.lateness.iter().enumerate() {
        let c = color(*system);
        let mut last: Option<(i64, i64)> = None;
        for x in x0..=x1 {
            let t = (x - x0) as f64 / (x1 - x0) as f64;
            let us = 10f64.powf(DECADES.0 + t * (DECADES.1 - DECADES.0));
            let share = hist.count_between(0, us as u64) as f64 / (*due).max(1) as f64;
            let point = (x, y_of(share));
            if let Some(prev) = last {
                canvas.line(prev, point, 3, c);
            }
            last = Some(point);
        }
        let (lx, ly) = (legend_x, y_of(0.7) + i as i64 * 24);
        canvas.rect(lx, ly + 2, 28, 10, c);
        canvas.text(lx + 38, ly, system.label(), 2, BLACK);
    }
    std::fs::write(path, encode_png(&canvas.pixels))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(true)
}

/// Where the legend's swatches start: right of 1.5 s, or further left when the longest label would
/// not fit inside the picture.
fn legend_x<'a>(labels: impl Iterator<Item = &'a str>) -> i64 {
    let widest = labels.map(|l| text_width(l, 2)).max().unwrap_or(0);
    x_of(1.5e6).min(WIDTH as i64 - 10 - 38 - widest)
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn adler32(bytes: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in bytes {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    /// `count` bits of `value`, least significant first (deflate's order for everything but codes).
    fn put(&mut self, value: u32, count: u32) {
        self.acc |= (value as u64) << self.n;
        self.n += count;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    /// A Huffman code, most significant bit first.
    fn code(&mut self, code: u32, len: u32) {
        let reversed = code.reverse_bits() >> (32 - len);
        self.put(reversed, len);
    }

    /// A literal/length symbol in the fixed code of RFC 1951 §3.2.6.
    fn symbol(&mut self, sym: u32) {
        match sym {
            0..=143 => self.code(0x30 + sym, 8),
            144..=255 => self.code(0x190 + sym - 144, 9),
            256..=279 => self.code(sym - 256, 7),
            _ => self.code(0xC0 + sym - 280, 8),
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// (symbol, extra bits, base) for a match length 3..=258.
fn length_code(len: u32) -> (u32, u32, u32) {
    const BASES: [u32; 29] = [
        3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115,
        131, 163, 195, 227, 258,
    ];
    const EXTRA: [u32; 29] = [
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
    ];
    let i = BASES.iter().rposition(|&b| b <= len).unwrap_or(0);
    (257 + i as u32, EXTRA[i], BASES[i])
}

/// A zlib stream of one fixed-Huffman deflate block whose only matches are runs (distance 1).
fn deflate_runs(data: &[u8]) -> Vec<u8> {
    let mut bits = Bits {
        out: vec![0x78, 0x01],
        acc: 0,
        n: 0,
    };
    bits.put(1, 1); // final block
    bits.put(1, 2); // fixed Huffman codes
    let mut i = 0;
    while i < data.len() {
        let mut run = 0;
        if i > 0 {
            while run < 258 && i + run < data.len() && data[i + run] == data[i - 1] {
                run += 1;
            }
        }
        if run >= 3 {
            let (sym, extra, base) = length_code(run as u32);
            bits.symbol(sym);
            bits.put(run as u32 - base, extra);
            bits.code(0, 5); // distance code 0: distance 1
            i += run;
        } else {
            bits.symbol(data[i] as u32);
            i += 1;
        }
    }
    bits.symbol(256);
    let mut out = bits.finish();
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

fn chunk(png: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    png.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = png.len();
    png.extend_from_slice(kind);
    png.extend_from_slice(data);
    let crc = crc32(&png[start..]);
    png.extend_from_slice(&crc.to_be_bytes());
}

/// An 8-bit palette PNG of the canvas.
fn encode_png(pixels: &[u8]) -> Vec<u8> {
    let mut raw = Vec::with_capacity((WIDTH + 1) * HEIGHT);
    for row in pixels.chunks(WIDTH) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut header = Vec::new();
    header.extend_from_slice(&(WIDTH as u32).to_be_bytes());
    header.extend_from_slice(&(HEIGHT as u32).to_be_bytes());
    header.extend_from_slice(&[8, 3, 0, 0, 0]); // 8-bit, palette, deflate, no filter, no interlace
    chunk(&mut png, b"IHDR", &header);
    chunk(&mut png, b"PLTE", &PALETTE.concat());
    chunk(&mut png, b"IDAT", &deflate_runs(&raw));
    chunk(&mut png, b"IEND", &[]);
    png
}

#[cfg(test)]
mod tests {
    use super::super::System;

    #[test]
    fn the_legend_fits_inside_the_picture() {
        let labels = [
            System::Punctual,
            System::Zset,
            System::Keyspace,
            System::Beanstalkd,
            System::PunctualResp,
        ]
        .map(System::label);
        let x = legend_x(labels.iter().copied());
        let widest = labels.iter().map(|l| text_width(l, 2)).max().unwrap();
        assert!(x + 38 + widest <= WIDTH as i64, "{x} + {widest}");
        assert!(x > (WIDTH / 2) as i64, "still right of the middle");
    }

    use super::*;

    #[test]
    fn crc_and_adler_match_known_values() {
        // Check values from the PNG and zlib specifications' reference implementations.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }

    #[test]
    fn length_codes_follow_rfc_1951() {
        assert_eq!(length_code(3), (257, 0, 3));
        assert_eq!(length_code(12), (265, 1, 11));
        assert_eq!(length_code(257), (284, 5, 227));
        assert_eq!(length_code(258), (285, 0, 258));
    }
}
