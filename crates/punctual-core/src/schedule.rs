//! Recurring schedules: when the occurrences of an every-N or cron rule fall, in an IANA time zone,
//! and which of them a schedule creates after it was away. Pure: every function takes the time.
//!
//! A cron rule is matched on the zone's wall clock (with croner), and each matching wall-clock time
//! becomes one instant by Punctual's daylight-saving rules:
//! - a wall-clock time that does not exist (the gap when clocks spring forward) is the first instant
//!   after the gap, and several such times are one occurrence;
//! - a wall-clock time that happens twice (clocks fall back) is its first instant only.
//!
//! So every wall-clock time fires at most once, and occurrences only move forward in real time.

use std::str::FromStr;

use std::collections::VecDeque;

use chrono::{DateTime, LocalResult, NaiveDateTime, TimeZone, Timelike as _, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// The shortest `every_ms` a schedule may have.
pub const MIN_EVERY_MS: u64 = 100;
/// The longest `every_ms`: about ten years, as the longest delay.
pub const MAX_EVERY_MS: u64 = 10 * 366 * 24 * 3600 * 1000;
/// Most occurrences `missed: "all"` creates after a downtime; older ones are counted as skipped.
pub const MAX_CATCH_UP: usize = 1000;

/// When a schedule's occurrences fall.
#[derive(Debug, Clone)]
pub enum Rule {
    /// Every `every_ms`, at `anchor_ms + k * every_ms`.
    Every { every_ms: u64, anchor_ms: u64 },
    /// A cron expression on the wall clock of `zone`.
    Cron {
        expression: String,
        cron: Box<Cron>,
        zone: Tz,
    },
}

/// Why a rule was refused: the request field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub field: &'static str,
    pub message: String,
}

fn refuse(field: &'static str, message: impl Into<String>) -> RuleError {
    RuleError {
        field,
        message: message.into(),
    }
}

/// The names of a cron expression's fields, by count of fields.
fn field_names(count: usize) -> &'static [&'static str] {
    match count {
        6 => &[
            "second",
            "minute",
            "hour",
            "day of month",
            "month",
            "day of week",
        ],
        _ => &["minute", "hour", "day of month", "month", "day of week"],
    }
}

fn parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
}

impl Rule {
    /// Every `every_ms`, counted from `anchor_ms`.
    pub fn every(every_ms: u64, anchor_ms: u64) -> Result<Rule, RuleError> {
        if !(MIN_EVERY_MS..=MAX_EVERY_MS).contains(&every_ms) {
            return Err(refuse(
                "every_ms",
                format!("every_ms must be between {MIN_EVERY_MS} and {MAX_EVERY_MS}"),
            ));
        }
        Ok(Rule::Every {
            every_ms,
            anchor_ms,
        })
    }

    /// A cron expression (5 fields, 6 with seconds first, or `@hourly`, `@daily`, `@weekly`,
    /// `@monthly`, `@yearly`) in the IANA zone `zone` (`UTC` when `None`).
    pub fn cron(expression: &str, zone: Option<&str>) -> Result<Rule, RuleError> {
        let zone = match zone {
            None => Tz::UTC,
            Some(name) => Tz::from_str(name).map_err(|_| {
                refuse(
                    "timezone",
                    format!("unknown time zone {name:?}: use an IANA name such as Europe/Berlin"),
                )
            })?,
        };
        let trimmed = expression.trim();
        let cron = parser()
            .parse(trimmed)
            .map_err(|error| refuse("cron", Self::explain(trimmed, &error.to_string())))?;
        Ok(Rule::Cron {
            expression: trimmed.to_owned(),
            cron: Box::new(cron),
            zone,
        })
    }

    /// Names the field of a refused expression that is wrong: each field is tried alone, with
    /// every other field `*`.
    fn explain(expression: &str, error: &str) -> String {
        let fields: Vec<&str> = expression.split_whitespace().collect();
        if expression.starts_with('@') {
            return format!(
                "{expression:?} is not a cron nickname: use @hourly, @daily, @weekly, @monthly or \
                 @yearly"
            );
        }
        if !(5..=6).contains(&fields.len()) {
            return format!(
                "a cron expression has 5 fields (minute hour day-of-month month day-of-week) or 6 \
                 (with seconds first); {expression:?} has {}",
                fields.len()
            );
        }
        let names = field_names(fields.len());
        for (i, field) in fields.iter().enumerate() {
            let alone: Vec<&str> = (0..fields.len())
                .map(|j| if i == j { *field } else { "*" })
                .collect();
            if parser().parse(&alone.join(" ")).is_err() {
                return format!(
                    "field {} ({}) of {expression:?} is not valid: {field:?} ({error})",
                    i + 1,
                    names[i]
                );
            }
        }
        format!("{expression:?} is not a valid cron expression: {error}")
    }

    /// The zone's name (`UTC` for an every-N rule).
    pub fn zone_name(&self) -> &str {
        match self {
            Rule::Every { .. } => "UTC",
            Rule::Cron { zone, .. } => zone.name(),
        }
    }

    /// The first occurrence strictly after `after_ms`, or `None` if there is none before the
    /// year 5000.
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        match self {
            Rule::Every {
                every_ms,
                anchor_ms,
            } => {
                if after_ms < *anchor_ms {
                    return Some(*anchor_ms);
                }
                let steps = (after_ms - anchor_ms) / every_ms + 1;
                anchor_ms.checked_add(steps.checked_mul(*every_ms)?)
            }
            Rule::Cron { cron, zone, .. } => {
                let after = DateTime::from_timestamp_millis(i64::try_from(after_ms).ok()?)?;
                // Wall-clock times are searched as if they were UTC, so that croner sees no zone
                // and every wall-clock time once; the zone's rules are applied here.
                // Occurrences are whole seconds: from inside a second, that second is past.
                let mut wall = after
                    .with_timezone(zone)
                    .naive_local()
                    .with_nanosecond(0)?
                    .and_utc();
                loop {
                    wall = cron.find_next_occurrence(&wall, false).ok()?;
                    let at_ms = instant(zone, wall.naive_utc())?;
                    if at_ms > after_ms {
                        return Some(at_ms);
                    }
                }
            }
        }
    }

    /// The occurrences in `(after_ms, until_ms]`, at most `limit` of them.
    pub fn between(&self, after_ms: u64, until_ms: u64, limit: usize) -> Vec<u64> {
        let mut out = Vec::new();
        let mut at = after_ms;
        while out.len() < limit {
            match self.next_after(at) {
                Some(next) if next <= until_ms => {
                    out.push(next);
                    at = next;
                }
                _ => break,
            }
        }
        out
    }

    /// `unix_ms` as RFC 3339 with the rule's zone offset, e.g. `2027-03-28T03:00:00+02:00`.
    pub fn format_local(&self, unix_ms: u64) -> String {
        let Some(utc) = i64::try_from(unix_ms)
            .ok()
            .and_then(DateTime::from_timestamp_millis)
        else {
            return String::new();
        };
        let zone = match self {
            Rule::Every { .. } => Tz::UTC,
            Rule::Cron { zone, .. } => *zone,
        };
        let local = utc.with_timezone(&zone);
        if unix_ms.is_multiple_of(1000) {
            local.format("%Y-%m-%dT%H:%M:%S%:z").to_string()
        } else {
            local.format("%Y-%m-%dT%H:%M:%S%.3f%:z").to_string()
        }
    }
}

/// The instant of wall-clock time `wall` in `zone`: its first, if it happens twice; the end of the
/// gap, if it does not happen at all.
fn instant(zone: &Tz, wall: NaiveDateTime) -> Option<u64> {
    let at: DateTime<Tz> = match zone.from_local_datetime(&wall) {
        LocalResult::Single(at) => at,
        LocalResult::Ambiguous(first, _) => first,
        LocalResult::None => {
            // In a gap: the first wall-clock minute after it is the instant the clocks jumped
            // (gaps start and end on whole minutes in the IANA database, and last under a day).
            let mut minute = wall.with_second(0)?;
            (0..24 * 60).find_map(|_| {
                minute = minute.checked_add_signed(chrono::Duration::minutes(1))?;
                zone.from_local_datetime(&minute).earliest()
            })?
        }
    };
    u64::try_from(at.with_timezone(&Utc).timestamp_millis()).ok()
}

/// What to do about occurrences that fell while nobody created them (the server was down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Missed {
    /// Resume from now: nothing missed is created.
    Skip,
    /// One occurrence for everything missed (the latest), then resume.
    #[default]
    Latest,
    /// Every missed occurrence, up to [`MAX_CATCH_UP`].
    All,
}

impl Missed {
    pub fn parse(text: &str) -> Option<Missed> {
        match text {
            "skip" => Some(Missed::Skip),
            "latest" => Some(Missed::Latest),
            "all" => Some(Missed::All),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Missed::Skip => "skip",
            Missed::Latest => "latest",
            Missed::All => "all",
        }
    }
}

/// What one materialisation of a schedule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Occurrence times to create a task for (ascending); a time at or before now fires at once.
    pub create: Vec<u64>,
    /// Occurrences not created (missed and skipped by the policy).
    pub skipped: u64,
    /// Every occurrence at or before this has been created or skipped.
    pub cursor_ms: u64,
    /// The next occurrence after the cursor (within `end_at_ms`), if any.
    pub next_ms: Option<u64>,
}

/// Plans the occurrences of `rule` after `cursor_ms` up to `now_ms + ahead_ms`, within
/// `[start_at_ms, end_at_ms]`. Occurrences before `now_ms - grace_ms` were missed (the schedule
/// was not materialised in time) and follow `missed`.
pub fn plan(
    rule: &Rule,
    cursor_ms: u64,
    now_ms: u64,
    ahead_ms: u64,
    grace_ms: u64,
    window: (Option<u64>, Option<u64>),
    missed: Missed,
) -> Plan {
    let (start_at_ms, end_at_ms) = window;
    let from = cursor_ms.max(start_at_ms.map_or(0, |s| s.saturating_sub(1)));
    let horizon = now_ms
        .saturating_add(ahead_ms)
        .min(end_at_ms.unwrap_or(u64::MAX));
    let late_before = now_ms.saturating_sub(grace_ms);
    let mut create = Vec::new();
    let mut missed_times: VecDeque<u64> = VecDeque::new();
    let mut missed_count = 0u64;
    let mut at = from;
    // A long downtime of a short period: jump over what no policy keeps.
    if let Rule::Every {
        every_ms,
        anchor_ms,
    } = *rule
    {
        let upto = |t: u64| {
            if t >= anchor_ms {
                (t - anchor_ms) / every_ms + 1
            } else {
                0
            }
        };
        let keep = every_ms.saturating_mul(MAX_CATCH_UP as u64 + 1);
        let jump_to = late_before.saturating_sub(keep).min(horizon);
        if jump_to > at {
            missed_count += upto(jump_to) - upto(at);
            at = jump_to;
        }
    }
    while let Some(next) = rule.next_after(at) {
        if next > horizon {
            break;
        }
        if next < late_before {
            missed_count += 1;
            if missed != Missed::All {
                missed_times.clear();
            }
            missed_times.push_back(next);
            if missed_times.len() > MAX_CATCH_UP {
                missed_times.pop_front();
            }
        } else {
            create.push(next);
        }
        at = next;
        if create.len() >= MAX_CATCH_UP {
            break;
        }
    }
    let cursor_ms = at.max(cursor_ms);
    let kept: Vec<u64> = match missed {
        Missed::Skip => Vec::new(),
        Missed::Latest | Missed::All => missed_times.into(),
    };
    let skipped = missed_count - kept.len() as u64;
    let mut all = kept;
    all.extend(create);
    let next_ms = rule
        .next_after(cursor_ms)
        .filter(|n| end_at_ms.is_none_or(|end| *n <= end));
    Plan {
        create: all,
        skipped,
        cursor_ms,
        next_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::parse_rfc3339_ms;

    fn ms(text: &str) -> u64 {
        parse_rfc3339_ms(text).unwrap()
    }

    fn cron(expression: &str, zone: &str) -> Rule {
        Rule::cron(expression, Some(zone)).unwrap()
    }

    fn local(rule: &Rule, times: &[u64]) -> Vec<String> {
        times.iter().map(|t| rule.format_local(*t)).collect()
    }

    #[test]
    fn every_n_counts_from_its_anchor() {
        let rule = Rule::every(5_000, 1_000).unwrap();
        assert_eq!(rule.next_after(0), Some(1_000));
        assert_eq!(rule.next_after(999), Some(1_000));
        assert_eq!(rule.next_after(1_000), Some(6_000));
        assert_eq!(rule.next_after(5_999), Some(6_000));
        assert_eq!(
            rule.between(0, 20_000, 10),
            vec![1_000, 6_000, 11_000, 16_000]
        );
        assert!(Rule::every(50, 0).is_err());
        assert_eq!(Rule::every(0, 0).unwrap_err().field, "every_ms");
    }

    #[test]
    fn cron_with_seconds_and_nicknames() {
        let rule = cron("*/20 * * * * *", "UTC");
        let t = ms("2026-12-06T10:00:05Z");
        assert_eq!(
            local(&rule, &rule.between(t, t + 60_000, 10)),
            [
                "2026-12-06T10:00:20+00:00",
                "2026-12-06T10:00:40+00:00",
                "2026-12-06T10:01:00+00:00",
            ]
        );
        let hourly = cron("@hourly", "UTC");
        assert_eq!(hourly.next_after(t), Some(ms("2026-12-06T11:00:00Z")));
        let yearly = cron("@yearly", "Europe/Berlin");
        assert_eq!(
            yearly.format_local(yearly.next_after(t).unwrap()),
            "2027-01-01T00:00:00+01:00"
        );
        // From inside an occurrence's second, the next one.
        let every_minute = cron("* * * * *", "UTC");
        assert_eq!(
            every_minute.next_after(ms("2026-12-06T10:00:00.500Z")),
            Some(ms("2026-12-06T10:01:00Z"))
        );
    }

    #[test]
    fn month_ends_and_leap_days() {
        let on_31st = cron("0 9 31 * *", "UTC");
        let t = ms("2027-01-31T10:00:00Z");
        assert_eq!(
            local(
                &on_31st,
                &on_31st.between(t, ms("2027-06-01T00:00:00Z"), 10)
            ),
            ["2027-03-31T09:00:00+00:00", "2027-05-31T09:00:00+00:00"]
        );
        let last = cron("0 12 L * *", "UTC");
        assert_eq!(
            local(&last, &last.between(t, ms("2027-04-01T00:00:00Z"), 10)),
            [
                "2027-01-31T12:00:00+00:00",
                "2027-02-28T12:00:00+00:00",
                "2027-03-31T12:00:00+00:00",
            ]
        );
        let leap = cron("0 0 29 2 *", "UTC");
        assert_eq!(leap.next_after(t), Some(ms("2028-02-29T00:00:00Z")));
        let weekdays = cron("0 9 * * MON-FRI", "Europe/Berlin");
        // Friday 2026-12-04 after 09:00: Monday next.
        assert_eq!(
            weekdays.format_local(weekdays.next_after(ms("2026-12-04T09:00:00Z")).unwrap()),
            "2026-12-07T09:00:00+01:00"
        );
        let second_monday = cron("0 8 * * MON#2", "UTC");
        assert_eq!(
            second_monday.next_after(ms("2026-12-01T00:00:00Z")),
            Some(ms("2026-12-14T08:00:00Z"))
        );
    }

    #[test]
    fn spring_forward_fires_once_at_the_end_of_the_gap() {
        // Berlin, 2027-03-28: 02:00 CET becomes 03:00 CEST (01:00 UTC).
        let daily = cron("30 2 * * *", "Europe/Berlin");
        let times = daily.between(ms("2027-03-26T12:00:00Z"), ms("2027-03-30T12:00:00Z"), 10);
        assert_eq!(
            local(&daily, &times),
            [
                "2027-03-27T02:30:00+01:00",
                "2027-03-28T03:00:00+02:00",
                "2027-03-29T02:30:00+02:00",
                "2027-03-30T02:30:00+02:00",
            ]
        );
        // Every 15 minutes: the four times of the gap are one occurrence, with 03:00.
        let quarter = cron("*/15 * * * *", "Europe/Berlin");
        let times = quarter.between(ms("2027-03-28T00:40:00Z"), ms("2027-03-28T01:20:00Z"), 10);
        assert_eq!(
            local(&quarter, &times),
            [
                "2027-03-28T01:45:00+01:00",
                "2027-03-28T03:00:00+02:00",
                "2027-03-28T03:15:00+02:00",
            ]
        );
        // New York, 2026-03-08: 02:00 EST becomes 03:00 EDT (07:00 UTC).
        let ny = cron("30 2 * * *", "America/New_York");
        let times = ny.between(ms("2026-03-07T12:00:00Z"), ms("2026-03-09T12:00:00Z"), 10);
        assert_eq!(
            local(&ny, &times),
            ["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"]
        );
        assert_eq!(times[0], ms("2026-03-08T07:00:00Z"));
    }

    #[test]
    fn fall_back_fires_once_at_the_first() {
        // Berlin, 2026-10-25: 03:00 CEST becomes 02:00 CET (01:00 UTC); 02:00-03:00 happens twice.
        let daily = cron("30 2 * * *", "Europe/Berlin");
        let times = daily.between(ms("2026-10-24T12:00:00Z"), ms("2026-10-26T12:00:00Z"), 10);
        assert_eq!(
            local(&daily, &times),
            ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]
        );
        // Every 30 minutes through New York's 2026-11-01 (01:00-02:00 happens twice): each wall
        // time once, so 75 real minutes pass between 01:30 EDT and 02:00 EST.
        let half = cron("*/30 * * * *", "America/New_York");
        let times = half.between(ms("2026-11-01T04:40:00Z"), ms("2026-11-01T07:40:00Z"), 10);
        assert_eq!(
            local(&half, &times),
            [
                "2026-11-01T01:00:00-04:00",
                "2026-11-01T01:30:00-04:00",
                "2026-11-01T02:00:00-05:00",
                "2026-11-01T02:30:00-05:00",
            ]
        );
        // Asked from inside the second 01:xx (a restart then): nothing fires twice.
        let from_second_pass = half.next_after(ms("2026-11-01T06:10:00Z")).unwrap();
        assert_eq!(
            half.format_local(from_second_pass),
            "2026-11-01T02:00:00-05:00"
        );
        // Berlin 2027-10-31 as well.
        let hourly = cron("0 * * * *", "Europe/Berlin");
        let times = hourly.between(ms("2027-10-30T22:30:00Z"), ms("2027-10-31T02:30:00Z"), 10);
        assert_eq!(
            local(&hourly, &times),
            [
                "2027-10-31T01:00:00+02:00",
                "2027-10-31T02:00:00+02:00",
                "2027-10-31T03:00:00+01:00",
            ]
        );
    }

    /// The search ends (croner gives up at the year 5000) with `None`. How long it takes is a
    /// figure, not an assertion: a wall-clock bound here failed CI on a loaded machine (1.7 s).
    #[test]
    fn a_date_that_never_comes_answers_none() {
        let never = cron("0 0 30 2 *", "UTC");
        assert_eq!(never.next_after(ms("2026-12-06T00:00:00Z")), None);
        assert!(never.between(0, u64::MAX, 5).is_empty());
    }

    #[test]
    fn refusals_name_the_field() {
        let e = Rule::cron("0 25 * * *", None).unwrap_err();
        assert_eq!(e.field, "cron");
        assert!(e.message.contains("field 2 (hour)"), "{}", e.message);
        let e = Rule::cron("* * * * * 9", None).unwrap_err();
        assert!(e.message.contains("field 6 (day of week)"), "{}", e.message);
        let e = Rule::cron("* * *", None).unwrap_err();
        assert!(e.message.contains("has 3"), "{}", e.message);
        let e = Rule::cron("@sometimes", None).unwrap_err();
        assert!(e.message.contains("nickname"), "{}", e.message);
        let e = Rule::cron("* * * * *", Some("Mars/Olympus")).unwrap_err();
        assert_eq!(e.field, "timezone");
    }

    #[test]
    fn plans_follow_the_missed_policy_after_a_downtime() {
        let rule = Rule::every(1_000, 0).unwrap();
        // Materialised up to 10 s, back at 15.5 s: 11..15 s were missed.
        let (cursor, now) = (10_000, 15_500);
        let all = plan(&rule, cursor, now, 2_000, 100, (None, None), Missed::All);
        assert_eq!(
            all.create,
            vec![11_000, 12_000, 13_000, 14_000, 15_000, 16_000, 17_000]
        );
        assert_eq!(all.skipped, 0);
        assert_eq!(all.cursor_ms, 17_000);
        assert_eq!(all.next_ms, Some(18_000));
        let latest = plan(&rule, cursor, now, 2_000, 100, (None, None), Missed::Latest);
        assert_eq!(latest.create, vec![15_000, 16_000, 17_000]);
        assert_eq!(latest.skipped, 4);
        let skip = plan(&rule, cursor, now, 2_000, 100, (None, None), Missed::Skip);
        assert_eq!(skip.create, vec![16_000, 17_000]);
        assert_eq!(skip.skipped, 5);
        // On time (nothing older than the grace): the same under every policy.
        let on_time = plan(
            &rule,
            15_000,
            15_050,
            2_000,
            100,
            (None, None),
            Missed::Skip,
        );
        assert_eq!(on_time.create, vec![16_000, 17_000]);
        assert_eq!(on_time.skipped, 0);
    }

    #[test]
    fn plans_stay_inside_start_and_end() {
        let rule = Rule::every(1_000, 0).unwrap();
        let p = plan(
            &rule,
            0,
            0,
            10_000,
            100,
            (Some(3_000), Some(6_000)),
            Missed::Latest,
        );
        assert_eq!(p.create, vec![3_000, 4_000, 5_000, 6_000]);
        assert_eq!(p.next_ms, None, "nothing after end_at");
        let before_start = plan(&rule, 0, 0, 1_000, 100, (Some(3_000), None), Missed::Latest);
        assert!(before_start.create.is_empty());
        assert_eq!(before_start.next_ms, Some(3_000));
    }

    #[test]
    fn catch_up_is_capped() {
        let rule = Rule::every(100, 0).unwrap();
        // 10 000 occurrences in 1 000 s, the last on time: the 1 000 latest missed ones and it.
        let p = plan(&rule, 0, 1_000_000, 0, 0, (None, None), Missed::All);
        assert_eq!(p.create.len(), MAX_CATCH_UP + 1);
        assert_eq!(p.create[0], 1_000_000 - 100 * MAX_CATCH_UP as u64);
        assert_eq!(*p.create.last().unwrap(), 1_000_000);
        assert_eq!(p.skipped, 9_999 - MAX_CATCH_UP as u64);
        assert_eq!(p.cursor_ms, 1_000_000);
        // A cron rule has no shortcut, and counts the same way.
        let cron_rule = cron("* * * * * *", "UTC");
        let p = plan(&cron_rule, 0, 5_000_000, 0, 0, (None, None), Missed::Latest);
        assert_eq!(
            p.create,
            vec![4_999_000, 5_000_000],
            "the latest missed, and the one due now"
        );
        assert_eq!(p.skipped, 4_998);
    }
}
