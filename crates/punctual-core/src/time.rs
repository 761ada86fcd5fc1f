//! RFC 3339 formatting and parsing over unix milliseconds, without a calendar dependency.
//!
//! The day/civil conversions are the well-known proleptic Gregorian formulas
//! (days since 1970-01-01 to year/month/day and back).

use thiserror::Error;

/// Why a timestamp could not be parsed.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid RFC 3339 timestamp {input:?}: {reason}")]
pub struct TimeParseError {
    pub input: String,
    pub reason: &'static str,
}

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        _ => 28,
    }
}

/// Formats unix milliseconds as RFC 3339 in UTC with millisecond precision, e.g. `2026-11-22T01:02:03.456Z`.
pub fn format_rfc3339_ms(unix_ms: u64) -> String {
    let secs = (unix_ms / 1000) as i64;
    let millis = unix_ms % 1000;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Parses an RFC 3339 timestamp (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`) into unix milliseconds.
///
/// Fractions finer than a millisecond are truncated; times before 1970 are rejected because
/// Punctual's clock is unsigned.
pub fn parse_rfc3339_ms(input: &str) -> Result<u64, TimeParseError> {
    let err = |reason| TimeParseError {
        input: input.to_owned(),
        reason,
    };
    let b = input.as_bytes();
    if b.len() < 20 {
        // The usual mistake: a local date-time without its zone.
        let reason = if b.len() >= 19 && b.get(4) == Some(&b'-') && b.get(13) == Some(&b':') {
            "no time zone: add Z (UTC) or an offset such as +01:00, e.g. 2026-12-01T15:00:00Z"
        } else {
            "expected a date and time with a zone, e.g. 2026-12-01T15:00:00Z"
        };
        return Err(err(reason));
    }
    // Digits are read from bytes, never by slicing the string: the input may hold multi-byte
    // characters anywhere, and a slice through one would panic.
    let num = |range: std::ops::Range<usize>| -> Result<u32, TimeParseError> {
        let digits = b.get(range).ok_or_else(|| err("expected digits"))?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return Err(err("expected digits"));
        }
        Ok(digits
            .iter()
            .fold(0u32, |n, d| n * 10 + u32::from(d - b'0')))
    };
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(err("expected YYYY-MM-DDTHH:MM:SS"));
    }
    let year = i64::from(num(0..4)?);
    let month = num(5..7)?;
    let day = num(8..10)?;
    let hour = num(11..13)?;
    let minute = num(14..16)?;
    let second = num(17..19)?;
    if !(1..=12).contains(&month) {
        return Err(err("month out of range"));
    }
    if day == 0 || day > days_in_month(year, month) {
        return Err(err("day out of range"));
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err(err("time of day out of range"));
    }
    let mut pos = 19;
    let mut millis: u64 = 0;
    if b[pos] == b'.' {
        pos += 1;
        let start = pos;
        while pos < b.len() && b[pos].is_ascii_digit() {
            pos += 1;
        }
        if pos == start {
            return Err(err("empty fraction"));
        }
        let end = pos.min(start + 3);
        let scale = 10u64.pow(3 - (end - start) as u32);
        millis = u64::from(num(start..end)?) * scale;
    }
    let offset_secs: i64 = match b.get(pos) {
        Some(b'Z' | b'z') if pos + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if pos + 6 == b.len() && b[pos + 3] == b':' => {
            let oh = i64::from(num(pos + 1..pos + 3)?);
            let om = i64::from(num(pos + 4..pos + 6)?);
            if oh > 23 || om > 59 {
                return Err(err("offset out of range"));
            }
            let total = oh * 3600 + om * 60;
            if *sign == b'+' { total } else { -total }
        }
        _ => return Err(err("expected Z or an offset such as +01:00 at the end")),
    };
    // A leap second is folded into the next second, which is what unix time does.
    let secs = days_from_civil(year, month, day) * 86_400
        + i64::from(hour) * 3600
        + i64::from(minute) * 60
        + i64::from(second)
        - offset_secs;
    if secs < 0 {
        return Err(err("before 1970-01-01T00:00:00Z"));
    }
    Ok(secs as u64 * 1000 + millis)
}

/// Parses an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`, the only form senders may use) into unix ms.
pub fn parse_http_date_ms(input: &str) -> Option<u64> {
    let mut parts = input.split_whitespace();
    let _weekday = parts.next()?;
    let day: u32 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = parts.next()?.parse().ok()?;
    let mut clock = parts.next()?.split(':').map(|p| p.parse::<i64>().ok());
    let (h, m, sec) = (clock.next()??, clock.next()??, clock.next()??);
    // A four-digit year, as HTTP dates have: a longer one overflowed the day count (found by the
    // rfc3339 fuzz target, which also feeds this parser; a webhook target's Retry-After reaches it).
    if parts.next()? != "GMT"
        || !(1970..=9999).contains(&year)
        || h < 0
        || m < 0
        || sec < 0
        || day == 0
        || day > days_in_month(year, month)
        || h > 23
        || m > 59
        || sec > 60
    {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec;
    u64::try_from(secs).ok().map(|s| s * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_out_of_range_are_refused_not_overflowed() {
        // The input the fuzzer found: a year of 18 digits.
        assert_eq!(
            parse_http_date_ms("2ay\x0c5\x0cMay\x0c122270520110122253\x0c1:0:3\x0cGMT"),
            None
        );
        assert_eq!(parse_http_date_ms("Sun, 06 Nov 10000 08:49:37 GMT"), None);
        assert_eq!(parse_http_date_ms("Sun, 06 Nov 1994 -8:49:37 GMT"), None);
        assert_eq!(
            parse_http_date_ms("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777_000)
        );
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339_ms(951_782_400_123),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(
            format_rfc3339_ms(1_795_309_323_456),
            "2026-11-22T01:02:03.456Z"
        );
    }

    #[test]
    fn parses_offsets_and_fractions() {
        assert_eq!(
            parse_rfc3339_ms("2026-11-22T01:02:03.456Z"),
            Ok(1_795_309_323_456)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-11-22T02:02:03.4567+01:00"),
            Ok(1_795_309_323_456)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-11-21T23:02:03.4-02:00"),
            Ok(1_795_309_323_400)
        );
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Ok(0));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "2026-11-22",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-11-22T24:00:00Z",
            "2026-11-22T01:02:03",
            "2026-11-22T01:02:03.Z",
            "1969-12-31T23:59:59Z",
            "2026-11-22T01:02:03+0100",
            "２０２6-11-22T01:02:03Z",
        ] {
            assert!(parse_rfc3339_ms(bad).is_err(), "{bad} should be rejected");
        }
    }

    /// A multi-byte character anywhere, at any length, is an error and never a panic (a remote panic
    /// once: the parser sliced the string at byte 19).
    #[test]
    fn multi_byte_characters_are_errors_not_panics() {
        let base = "2026-11-22T01:02:03.456+01:00";
        for bytes in 0..=base.len() {
            for c in ["€", "é", "\u{10348}"] {
                for at in 0..=bytes {
                    let input = format!("{}{c}{}", &base[..at], &base[at..bytes]);
                    assert!(parse_rfc3339_ms(&input).is_err(), "{input}");
                }
            }
        }
        assert!(parse_rfc3339_ms("2026-11-22T01:02:€Z").is_err());
    }

    #[test]
    fn a_missing_zone_says_how_to_add_one() {
        let error = parse_rfc3339_ms("2026-12-01T15:00:00").unwrap_err();
        assert!(error.to_string().contains("add Z"), "{error}");
        assert!(error.to_string().contains("+01:00"), "{error}");
        let error = parse_rfc3339_ms("tomorrow").unwrap_err();
        assert!(
            error.to_string().contains("2026-12-01T15:00:00Z"),
            "{error}"
        );
    }

    #[test]
    fn parses_http_dates() {
        assert_eq!(
            parse_http_date_ms("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777_000)
        );
        assert_eq!(parse_http_date_ms("Sun, 06 Nov 1994 08:49:37 UTC"), None);
        assert_eq!(parse_http_date_ms("120"), None);
    }

    #[test]
    fn round_trips() {
        for ms in [
            0,
            1,
            999,
            86_399_999,
            951_782_400_123,
            4_102_444_800_000,
            253_402_300_799_999,
        ] {
            assert_eq!(parse_rfc3339_ms(&format_rfc3339_ms(ms)), Ok(ms));
        }
    }
}
