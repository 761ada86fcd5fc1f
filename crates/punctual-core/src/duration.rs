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

#[cfg(test)]
mod tests {
    use super::parse_duration_ms;

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
    fn an_unknown_unit_lists_the_valid_ones() {
        let error = parse_duration_ms("10x").unwrap_err();
        assert!(error.contains("unknown unit \"x\""), "{error}");
        assert!(error.contains("ms, s (sec"), "{error}");
        let error = parse_duration_ms("10").unwrap_err();
        assert!(error.contains("needs a unit"), "{error}");
    }
}
