//! Timestamps as services send them, normalised to UTC.
//!
//! Accepted: RFC 3339 with any offset (`T` or a space between date and time), the ISO 8601
//! offsets it leaves out (`+0100`, `+01`), epoch numbers in seconds, milliseconds,
//! microseconds or nanoseconds (told apart by magnitude), numeric strings of the same, and
//! naive local date-times or dates (`YYYY-MM-DD`, `YYYY/MM/DD`, `DD.MM.YYYY`), read in a
//! configured time zone unless they end in `UTC`. Month-first dates (`01/02/2024`) are
//! refused: nothing in one cell says which of day and month comes first.

use chrono::{DateTime, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;

/// A timestamp as it arrived: text or a number.
#[derive(Debug, Clone, PartialEq)]
pub enum TimestampInput<'a> {
    /// RFC 3339, a naive local time, or a numeric string.
    Text(&'a str),
    /// An integral epoch number.
    Int(i64),
    /// A fractional epoch number.
    Float(f64),
}

/// The unit an epoch number was read in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochUnit {
    /// Seconds since 1970-01-01T00:00:00Z.
    Seconds,
    /// Milliseconds.
    Millis,
    /// Microseconds.
    Micros,
    /// Nanoseconds.
    Nanos,
}

impl EpochUnit {
    /// The unit of an epoch number, from its magnitude. Seconds stay below 1e11 until the
    /// year 5138, millis below 1e14 until then, and so on, so the ranges do not overlap for
    /// any time a service can honestly report.
    pub fn detect(magnitude: f64) -> Self {
        let m = magnitude.abs();
        if m < 1e11 {
            EpochUnit::Seconds
        } else if m < 1e14 {
            EpochUnit::Millis
        } else if m < 1e17 {
            EpochUnit::Micros
        } else {
            EpochUnit::Nanos
        }
    }

    fn nanos_per_unit(self) -> i128 {
        match self {
            EpochUnit::Seconds => 1_000_000_000,
            EpochUnit::Millis => 1_000_000,
            EpochUnit::Micros => 1_000,
            EpochUnit::Nanos => 1,
        }
    }
}

/// Why a timestamp could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    /// Not RFC 3339, not a naive date-time, not a number.
    #[error(
        "unrecognised timestamp {0:?} (read: RFC 3339 or ISO 8601 date-times, YYYY-MM-DD or \
         YYYY/MM/DD with an optional time, DD.MM.YYYY, epoch s/ms/us/ns)"
    )]
    Unrecognised(String),
    /// A number, but not a finite one, or beyond what a date can hold.
    #[error("timestamp {0} is out of the representable range")]
    OutOfRange(String),
    /// A naive local time that the zone skips (the hour lost when clocks go forward).
    #[error("local time {time} does not exist in {zone} (clocks went forward)")]
    NonexistentLocalTime {
        /// The time as given.
        time: String,
        /// The zone it was read in.
        zone: String,
    },
    /// A time zone name that the tz database does not know.
    #[error("unknown time zone {0:?}")]
    UnknownZone(String),
}

/// Reads any accepted timestamp as UTC; naive local times are read in `zone`. Ambiguous
/// local times (the hour repeated when clocks go back) resolve to the earlier instant,
/// which is what most loggers meant.
pub fn parse_timestamp(input: &TimestampInput<'_>, zone: Tz) -> Result<DateTime<Utc>, TimeError> {
    match *input {
        TimestampInput::Int(n) => from_epoch_int(n),
        TimestampInput::Float(f) => from_epoch_float(f),
        TimestampInput::Text(s) => parse_text(s, zone),
    }
}

/// The UDF form: reads `text` with naive times in the zone named `zone` (an IANA name such
/// as `Europe/Berlin`, or `UTC`).
pub fn to_utc(text: &str, zone: &str) -> Result<DateTime<Utc>, TimeError> {
    let tz: Tz = zone
        .parse()
        .map_err(|_| TimeError::UnknownZone(zone.to_string()))?;
    parse_text(text, tz)
}

/// The SQL and plugin form of [`to_utc`]: microseconds since the epoch, or `None` when the
/// text or zone cannot be read (SQL's NULL, so one bad row does not fail a whole query).
/// Microseconds are what Arrow timestamps and Arroyo carry, so all callers agree exactly.
pub fn to_utc_micros(text: &str, zone: &str) -> Option<i64> {
    to_utc(text, zone).ok().map(|t| t.timestamp_micros())
}

fn from_epoch_int(n: i64) -> Result<DateTime<Utc>, TimeError> {
    // `n as f64` loses precision only above 2^53, far inside the nanosecond range, where the
    // magnitude test does not care about the last digits.
    #[allow(clippy::cast_precision_loss)]
    let unit = EpochUnit::detect(n as f64);
    let nanos = i128::from(n) * unit.nanos_per_unit();
    from_epoch_nanos(nanos).ok_or_else(|| TimeError::OutOfRange(n.to_string()))
}

fn from_epoch_float(f: f64) -> Result<DateTime<Utc>, TimeError> {
    if !f.is_finite() {
        return Err(TimeError::OutOfRange(f.to_string()));
    }
    let unit = EpochUnit::detect(f);
    #[allow(clippy::cast_precision_loss)]
    let nanos = (f * unit.nanos_per_unit() as f64).round();
    // i64 nanos span 1677..2262; beyond that chrono's i64-second range still holds dates,
    // but no honest telemetry timestamp lives there.
    if nanos.abs() >= 9.2e18 {
        return Err(TimeError::OutOfRange(f.to_string()));
    }
    #[allow(clippy::cast_possible_truncation)]
    from_epoch_nanos(i128::from(nanos as i64)).ok_or_else(|| TimeError::OutOfRange(f.to_string()))
}

fn from_epoch_nanos(nanos: i128) -> Option<DateTime<Utc>> {
    let secs = i64::try_from(nanos.div_euclid(1_000_000_000)).ok()?;
    let sub = u32::try_from(nanos.rem_euclid(1_000_000_000)).ok()?;
    DateTime::from_timestamp(secs, sub)
}

fn looks_numeric(s: &str) -> bool {
    let body = s.strip_prefix(['-', '+']).unwrap_or(s);
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b'e' || b == b'E')
        && body.as_bytes()[0].is_ascii_digit()
}

/// Naive date-times, after `normalise`: read in the configured zone, or in UTC when the text
/// names it.
const NAIVE_FORMATS: &[&str] = &[
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%dT%H:%M",
    // Day first, as the dotted form always is.
    "%d.%m.%Y %H:%M:%S%.f",
    "%d.%m.%Y %H:%M",
];

/// ISO 8601 forms RFC 3339 leaves out, after `normalise`: offsets without a colon or
/// without minutes (`+0100`, `+01`, as `strftime`'s `%z` writes them), a space before the
/// offset, no seconds.
const OFFSET_FORMATS: &[&str] = &[
    "%Y-%m-%dT%H:%M:%S%.f%#z",
    "%Y-%m-%dT%H:%M:%S%.f %#z",
    "%Y-%m-%dT%H:%M%#z",
    "%Y-%m-%dT%H:%M %#z",
];

/// Suffixes that name UTC in words, as database exports write it (`2024-01-01 00:00:00 UTC`).
const UTC_SUFFIXES: &[&str] = &[" utc", " gmt", " z"];

/// `YYYY/MM/DD` as `YYYY-MM-DD`, and a space between date and time as `T`, so each form
/// needs one pattern.
fn normalise(s: &str) -> std::borrow::Cow<'_, str> {
    let b = s.as_bytes();
    let slashed = b.len() >= 10 && b[4] == b'/' && b[7] == b'/';
    // Bytes 4, 7 and 10 are ASCII here, so the ranges replaced below are whole characters.
    let iso_date = b.len() >= 10 && matches!((b[4], b[7]), (b'-', b'-') | (b'/', b'/'));
    let spaced = iso_date && b.len() > 10 && b[10] == b' ';
    if !slashed && !spaced {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = s.to_string();
    if slashed {
        out.replace_range(4..5, "-");
        out.replace_range(7..8, "-");
    }
    if spaced {
        out.replace_range(10..11, "T");
    }
    std::borrow::Cow::Owned(out)
}

fn parse_naive(s: &str, zone: Tz) -> Option<Result<DateTime<Utc>, TimeError>> {
    let naive = NAIVE_FORMATS
        .iter()
        .find_map(|fmt| NaiveDateTime::parse_from_str(s, fmt).ok())
        .or_else(|| {
            ["%Y-%m-%d", "%d.%m.%Y"]
                .iter()
                .find_map(|fmt| NaiveDate::parse_from_str(s, fmt).ok())
                .map(|d| d.and_time(NaiveTime::MIN))
        })?;
    Some(match zone.from_local_datetime(&naive) {
        LocalResult::Single(dt) => Ok(dt.with_timezone(&Utc)),
        LocalResult::Ambiguous(earliest, _) => Ok(earliest.with_timezone(&Utc)),
        LocalResult::None => Err(TimeError::NonexistentLocalTime {
            time: s.to_string(),
            zone: zone.name().to_string(),
        }),
    })
}

fn parse_text(raw: &str, zone: Tz) -> Result<DateTime<Utc>, TimeError> {
    let s = raw.trim();
    if s.is_empty() {
        return Err(TimeError::Unrecognised(raw.to_string()));
    }
    if looks_numeric(s) {
        if let Ok(n) = s.parse::<i64>() {
            return from_epoch_int(n);
        }
        if let Ok(f) = s.parse::<f64>() {
            return from_epoch_float(f);
        }
        // Not a number after all (`01.03.2024`): read on as a date.
    }
    // RFC 3339 allows a space for the `T`; chrono's strict parser does not, hence the
    // normalising first.
    let s = normalise(s);
    let s = s.as_ref();
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Ok(dt.with_timezone(&Utc));
    }
    for fmt in OFFSET_FORMATS {
        if let Ok(dt) = DateTime::parse_from_str(s, fmt) {
            return Ok(dt.with_timezone(&Utc));
        }
    }
    let lower = s.to_ascii_lowercase();
    if let Some(suffix) = UTC_SUFFIXES.iter().find(|x| lower.ends_with(*x)) {
        if let Some(parsed) = parse_naive(s[..s.len() - suffix.len()].trim_end(), Tz::UTC) {
            return parsed;
        }
    }
    parse_naive(s, zone).unwrap_or_else(|| Err(TimeError::Unrecognised(raw.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn utc(s: &str) -> DateTime<Utc> {
        match DateTime::parse_from_rfc3339(s) {
            Ok(dt) => dt.with_timezone(&Utc),
            Err(e) => panic!("bad test literal {s}: {e}"),
        }
    }

    fn parse(input: TimestampInput<'_>) -> Result<DateTime<Utc>, TimeError> {
        parse_timestamp(&input, Tz::UTC)
    }

    #[test]
    fn rfc3339_with_any_offset_becomes_utc() {
        let want = utc("2024-03-01T10:00:00Z");
        assert_eq!(
            parse(TimestampInput::Text("2024-03-01T10:00:00Z")),
            Ok(want)
        );
        assert_eq!(
            parse(TimestampInput::Text("2024-03-01T11:00:00+01:00")),
            Ok(want)
        );
        assert_eq!(
            parse(TimestampInput::Text("2024-03-01T05:30:00-04:30")),
            Ok(want)
        );
        assert_eq!(
            parse(TimestampInput::Text("2024-03-01 10:00:00Z")),
            Ok(want)
        );
        assert_eq!(
            parse(TimestampInput::Text(" 2024-03-01t10:00:00z ")),
            Ok(want)
        );
    }

    #[test]
    fn iso_8601_forms_and_dates_that_exports_write_are_read() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap_or(Tz::UTC);
        let at = |s: &str| parse_timestamp(&TimestampInput::Text(s), berlin);
        let want = utc("2024-03-01T10:00:00Z");
        for text in [
            "2024-03-01T11:00:00+0100",
            "2024-03-01T11:00:00.000+01",
            "2024-03-01 11:00:00 +0100",
            "2024-03-01T11:00+01:00",
            "2024/03/01 11:00:00+01:00",
            "2024-03-01 10:00:00 UTC",
            "2024/03/01 10:00:00 gmt",
        ] {
            assert_eq!(at(text), Ok(want), "{text}");
        }
        // No zone in the text: the configured one (Berlin is UTC+1 in March).
        for text in [
            "2024/03/01 11:00:00",
            "01.03.2024 11:00",
            "01.03.2024 11:00:00.0",
        ] {
            assert_eq!(at(text), Ok(want), "{text}");
        }
        assert_eq!(at("2024-03-01"), Ok(utc("2024-02-29T23:00:00Z")));
        assert_eq!(at("01.03.2024"), Ok(utc("2024-02-29T23:00:00Z")));
        // Which of day and month comes first, one cell cannot tell.
        let us = at("03/01/2024 11:00");
        assert!(
            us.as_ref()
                .is_err_and(|e| e.to_string().contains("YYYY-MM-DD")),
            "{us:?}"
        );
    }

    #[test]
    fn epoch_units_are_detected_by_magnitude() {
        let want = utc("2023-11-14T22:13:20Z");
        assert_eq!(parse(TimestampInput::Int(1_700_000_000)), Ok(want));
        assert_eq!(parse(TimestampInput::Int(1_700_000_000_000)), Ok(want));
        assert_eq!(parse(TimestampInput::Int(1_700_000_000_000_000)), Ok(want));
        assert_eq!(
            parse(TimestampInput::Int(1_700_000_000_000_000_000)),
            Ok(want)
        );
        assert_eq!(parse(TimestampInput::Float(1_700_000_000.0)), Ok(want));
        assert_eq!(parse(TimestampInput::Text("1700000000000")), Ok(want));
        let half = utc("2023-11-14T22:13:20.5Z");
        assert_eq!(parse(TimestampInput::Float(1_700_000_000.5)), Ok(half));
        assert_eq!(parse(TimestampInput::Text("1700000000.5")), Ok(half));
    }

    #[test]
    fn naive_local_times_are_read_in_the_configured_zone() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap_or(Tz::UTC);
        let got = parse_timestamp(&TimestampInput::Text("2024-07-01 12:00:00"), berlin);
        assert_eq!(got, Ok(utc("2024-07-01T10:00:00Z")));
        assert_eq!(
            to_utc("2024-01-15T12:00", "America/New_York"),
            Ok(utc("2024-01-15T17:00:00Z"))
        );
    }

    #[test]
    fn skipped_local_hour_is_an_error_and_repeated_hour_takes_the_earlier_instant() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap_or(Tz::UTC);
        let gap = parse_timestamp(&TimestampInput::Text("2024-03-31 02:30:00"), berlin);
        assert!(
            matches!(gap, Err(TimeError::NonexistentLocalTime { .. })),
            "{gap:?}"
        );
        let fold = parse_timestamp(&TimestampInput::Text("2024-10-27 02:30:00"), berlin);
        assert_eq!(fold, Ok(utc("2024-10-27T00:30:00Z")));
    }

    #[test]
    fn garbage_and_impossible_numbers_are_rejected() {
        assert!(matches!(
            parse(TimestampInput::Text("yesterday")),
            Err(TimeError::Unrecognised(_))
        ));
        assert!(matches!(
            parse(TimestampInput::Text("")),
            Err(TimeError::Unrecognised(_))
        ));
        assert!(matches!(
            parse(TimestampInput::Float(f64::NAN)),
            Err(TimeError::OutOfRange(_))
        ));
        assert!(matches!(
            parse(TimestampInput::Float(1e300)),
            Err(TimeError::OutOfRange(_))
        ));
        assert!(matches!(
            to_utc("2024-01-01 00:00", "Mars/Olympus"),
            Err(TimeError::UnknownZone(_))
        ));
    }

    #[test]
    fn extreme_years_parse_so_the_filter_can_reject_them_by_age() {
        assert_eq!(
            parse(TimestampInput::Int(0)),
            Ok(utc("1970-01-01T00:00:00Z"))
        );
        assert_eq!(
            parse(TimestampInput::Text("3000-01-01T00:00:00Z")),
            Ok(utc("3000-01-01T00:00:00Z"))
        );
    }

    proptest! {
        #[test]
        fn every_unit_of_the_same_instant_gives_the_same_utc(secs in 100_000_000i64..4_000_000_000i64) {
            let s = parse(TimestampInput::Int(secs));
            prop_assert_eq!(&s, &parse(TimestampInput::Int(secs * 1_000)));
            prop_assert_eq!(&s, &parse(TimestampInput::Int(secs * 1_000_000)));
            prop_assert_eq!(&s, &parse(TimestampInput::Int(secs.saturating_mul(1_000_000_000))));
        }

        #[test]
        fn rfc3339_round_trips(secs in -2_000_000_000i64..32_503_680_000i64, nanos in 0u32..1_000_000_000u32) {
            let dt = DateTime::from_timestamp(secs, nanos).unwrap_or_default();
            let text = dt.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
            prop_assert_eq!(parse(TimestampInput::Text(&text)), Ok(dt));
        }

        #[test]
        fn never_panics_on_any_text(s in ".{0,40}") {
            let _ = parse(TimestampInput::Text(&s));
        }
    }
}
