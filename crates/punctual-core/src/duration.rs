//! Human durations (the command line; a fuzz target):  `500ms`, `10s`, `30sec`, `5min`, `1h30m`, `2d`.
//!
//! Parsing is `humantime`'s; this module turns its answer into whole milliseconds and its errors into
//! a message that lists the units.

/// The units, as a refusal lists them.
const UNITS: &str = "ms, s (sec, secs, seconds), m (min, mins, minutes), h (hr, hours), d (days), \
                     w (weeks); e.g. 500ms, 30s, 5min, 1h30m, 2d";

/// Parses a duration into milliseconds. Several parts may be chained (`1h30m`, `1h 30m`).
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let invalid = |why: String| format!("invalid duration {text:?}: {why}; units are {UNITS}");
    if seconds_bound(text) == u64::MAX {
        // humantime 2.4 panics when the parts add up to exactly u64::MAX seconds and a nanosecond
        // carry (chronotope/humantime#66); such a text is far above what a u64 of milliseconds holds.
        return Err(invalid("too large".into()));
    }
    match humantime::parse_duration(text) {
        Ok(duration) => u64::try_from(duration.as_millis())
            .map_err(|_| invalid("too large".into()))
            .and_then(|ms| {
                if duration.subsec_nanos() % 1_000_000 != 0 {
                    Err(invalid("finer than a millisecond".into()))
                } else {
                    Ok(ms)
                }
            }),
        Err(humantime::DurationError::UnknownUnit { unit, .. }) if unit.is_empty() => {
            Err(invalid("a number needs a unit".into()))
        }
        Err(humantime::DurationError::UnknownUnit { unit, .. }) => {
            Err(invalid(format!("unknown unit {unit:?}")))
        }
        Err(humantime::DurationError::Empty) => Err(invalid("empty".into())),
        Err(humantime::DurationError::NumberOverflow) => Err(invalid("too large".into())),
        Err(error) => Err(invalid(error.to_string())),
    }
}

/// An upper bound, saturating at `u64::MAX`, on the seconds any prefix of `text` adds up to in humantime's parser.
///
/// It reads the text as humantime does (a number, whitespace inside it ignored, an optional fraction,
/// then letters for the unit; whitespace or a digit after the unit starts the next part) and takes
/// each part at one unit more than its integer part. An unknown unit counts as a year, the largest.
/// The bound is within a few units per part of the true sum, so no duration that fits in a `u64`
/// of milliseconds (under 1.9e16 s) comes near `u64::MAX` (1.8e19 s).
fn seconds_bound(text: &str) -> u64 {
    let mut bound = 0u64;
    let mut number = 0u64;
    let mut unit = String::new();
    let mut in_unit = false;
    let mut in_fraction = false;
    let mut part = |number: u64, unit: &str| {
        let secs = match unit {
            "nanos" | "nsec" | "ns" => number / 1_000_000_000 + 1,
            "usec" | "us" | "µs" => number / 1_000_000 + 1,
            "millis" | "msec" | "ms" => number / 1_000 + 1,
            "seconds" | "second" | "secs" | "sec" | "s" => number.saturating_add(1),
            "minutes" | "minute" | "min" | "mins" | "m" => {
                number.saturating_add(1).saturating_mul(60)
            }
            "hours" | "hour" | "hr" | "hrs" | "h" => number.saturating_add(1).saturating_mul(3_600),
            "days" | "day" | "d" => number.saturating_add(1).saturating_mul(86_400),
            "weeks" | "week" | "wk" | "wks" | "w" => {
                number.saturating_add(1).saturating_mul(604_800)
            }
            "months" | "month" | "M" => number.saturating_add(1).saturating_mul(2_630_016),
            _ => number.saturating_add(1).saturating_mul(31_557_600),
        };
        bound = bound.saturating_add(secs);
    };
    for c in text.chars() {
        match c {
            '0'..='9' if in_unit => {
                part(number, &unit);
                (number, in_unit, in_fraction) = (u64::from(c) - u64::from('0'), false, false);
                unit.clear();
            }
            '0'..='9' if in_fraction => {}
            '0'..='9' => {
                number = number
                    .saturating_mul(10)
                    .saturating_add(u64::from(c) - u64::from('0'))
            }
            c if c.is_whitespace() && in_unit => {
                part(number, &unit);
                (number, in_unit, in_fraction) = (0, false, false);
                unit.clear();
            }
            c if c.is_whitespace() => {}
            '.' if !in_unit => in_fraction = true,
            c => {
                in_unit = true;
                unit.push(c);
            }
        }
    }
    if in_unit || number > 0 || in_fraction {
        part(number, &unit);
    }
    bound
}

#[cfg(test)]
mod tests {
    use super::{parse_duration_ms, seconds_bound};

    #[test]
    fn parses_units_and_chains() {
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("10s"), Ok(10_000));
        assert_eq!(parse_duration_ms("10sec"), Ok(10_000));
        assert_eq!(parse_duration_ms("30m"), Ok(1_800_000));
        assert_eq!(parse_duration_ms("5min"), Ok(300_000));
        assert_eq!(parse_duration_ms("1h30m"), Ok(5_400_000));
        assert_eq!(parse_duration_ms("1h 30m"), Ok(5_400_000));
        assert_eq!(parse_duration_ms("2d"), Ok(172_800_000));
        assert_eq!(parse_duration_ms("0s"), Ok(0));
        assert_eq!(parse_duration_ms("1.5s"), Ok(1_500));
        for bad in ["", "10", "s", "10x", "-5s", "5us"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parts_that_add_up_to_u64_max_seconds_are_too_large_not_a_panic() {
        // The two inputs of chronotope/humantime#66, and one reaching u64::MAX through minutes.
        for text in [
            "18446744073709551615s 1000000000ns",
            "18446744073709551615s 999999999ns 1ns",
            "307445734561825860m 15s 999999999ns 1ns",
        ] {
            let error = parse_duration_ms(text).unwrap_err();
            assert!(error.contains("too large"), "{text}: {error}");
        }
    }

    #[test]
    fn the_overflow_guard_bounds_the_sum_from_above_and_refuses_nothing_that_fits() {
        assert!(seconds_bound("1h30m") >= 5_400);
        assert!(
            seconds_bound("1 000s") >= 1_000,
            "whitespace inside a number is ignored"
        );
        assert!(seconds_bound("1.999s") >= 1);
        assert!(seconds_bound("18446744073709551615ns") < 20_000_000_000);
        // The largest duration that fits in a u64 of milliseconds, in the largest units.
        assert!(parse_duration_ms("584542y 1d").is_ok());
        assert!(seconds_bound("18446744073709551615ms") < 20_000_000_000_000_000);
        assert!(parse_duration_ms("18446744073709551s").is_ok());
    }

    #[test]
    fn an_unknown_unit_lists_the_valid_ones() {
        let error = parse_duration_ms("10x").unwrap_err();
        assert!(error.contains("unknown unit \"x\""), "{error}");
        assert!(error.contains("ms, s (sec"), "{error}");
        let error = parse_duration_ms("10").unwrap_err();
        assert!(error.contains("needs a unit"), "{error}");
    }
}
