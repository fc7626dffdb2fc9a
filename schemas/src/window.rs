//! Window and billing-period arithmetic: pure functions on Unix milliseconds.
//!
//! Invariants:
//! - windows are tumbling and aligned to the Unix epoch: `[k·size, (k+1)·size)`; event time
//!   alone decides an event's window;
//! - a billing period is the calendar month that starts on `anchor_day` at midnight in the
//!   meter's time zone; every window lies inside exactly one period (the catalog requires the
//!   zone's offset to be a multiple of the window size, so period edges are window edges).

use time::{Date, Month, OffsetDateTime, UtcOffset};

/// Start of the window of `size_ms` that contains `time_ms`.
pub fn window_start(time_ms: i64, size_ms: i64) -> i64 {
    time_ms.div_euclid(size_ms) * size_ms
}

/// `[start, end)` of the billing period containing `time_ms`, in Unix milliseconds.
///
/// Returns `None` only for times outside what a calendar can express (year ±9999), in UTC or
/// in the zone (a time late on December 31, 9999 in UTC is in year 10000 east of it).
pub fn period_bounds(time_ms: i64, anchor_day: u8, offset_secs: i32) -> Option<(i64, i64)> {
    let offset = UtcOffset::from_whole_seconds(offset_secs).ok()?;
    // Checked: `to_offset` panics where the zone's date leaves the calendar's range, and a
    // usage read's `from` or cursor reached it.
    let local = OffsetDateTime::from_unix_timestamp_nanos(i128::from(time_ms) * 1_000_000)
        .ok()?
        .checked_to_offset(offset)?;
    let (mut year, mut month) = (local.year(), local.month());
    if local.day() < anchor_day {
        (year, month) = previous_month(year, month);
    }
    let (next_year, next_month) = next_month(year, month);
    let start = Date::from_calendar_date(year, month, anchor_day).ok()?;
    let end = Date::from_calendar_date(next_year, next_month, anchor_day).ok()?;
    let to_ms = |d: Date| {
        let at = d.midnight().assume_offset(offset);
        i64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
    };
    Some((to_ms(start)?, to_ms(end)?))
}

fn previous_month(year: i32, month: Month) -> (i32, Month) {
    match month {
        Month::January => (year - 1, Month::December),
        m => (year, m.previous()),
    }
}

fn next_month(year: i32, month: Month) -> (i32, Month) {
    match month {
        Month::December => (year + 1, Month::January),
        m => (year, m.next()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_time_ms;
    use proptest::prelude::*;

    fn ms(text: &str) -> i64 {
        parse_time_ms(text).expect("timestamp")
    }

    #[test]
    fn windows_align_to_the_epoch_including_before_it() {
        assert_eq!(
            window_start(ms("2026-11-24T10:07:59.999Z"), 60_000),
            ms("2026-11-24T10:07:00Z")
        );
        assert_eq!(
            window_start(ms("2026-11-24T10:08:00Z"), 300_000),
            ms("2026-11-24T10:05:00Z")
        );
        assert_eq!(window_start(-1, 60_000), -60_000);
    }

    #[test]
    fn a_time_whose_date_in_the_zone_leaves_the_calendar_has_no_period() {
        // Was: a panic (`to_offset`), reached by a usage read's `from` or cursor.
        let last = ms("9999-12-31T20:00:00Z");
        assert_eq!(period_bounds(last, 1, 9 * 3600), None);
        assert_eq!(period_bounds(last, 1, 14 * 3600), None);
        let first = Date::MIN.midnight().assume_utc().unix_timestamp() * 1000 + 2 * 3_600_000;
        assert_eq!(period_bounds(first, 1, -5 * 3600), None);
        // The same times in UTC: periods whose end, in year 10000, is past the calendar.
        assert_eq!(period_bounds(last, 1, 0), None);
        assert_eq!(
            period_bounds(ms("9999-11-15T00:00:00Z"), 1, 9 * 3600),
            Some((ms("9999-10-31T15:00:00Z"), ms("9999-11-30T15:00:00Z")))
        );
        for time_ms in [i64::MIN, i64::MAX, -1, 0] {
            for offset in [-14 * 3600, 0, 14 * 3600] {
                let _ = period_bounds(time_ms, 28, offset);
            }
        }
    }

    #[test]
    fn calendar_month_periods_in_utc_and_with_an_offset() {
        assert_eq!(
            period_bounds(ms("2026-02-28T23:59:59.999Z"), 1, 0),
            Some((ms("2026-02-01T00:00:00Z"), ms("2026-03-01T00:00:00Z")))
        );
        // 00:30 on March 1st in +02:00 is still February 28th 22:30 UTC, but March locally.
        assert_eq!(
            period_bounds(ms("2026-02-28T22:30:00Z"), 1, 7200),
            Some((
                ms("2026-03-01T00:00:00+02:00"),
                ms("2026-04-01T00:00:00+02:00")
            ))
        );
        // Anchored on the 15th: the 14th belongs to the period that began last month.
        assert_eq!(
            period_bounds(ms("2027-01-14T12:00:00Z"), 15, 0),
            Some((ms("2026-12-15T00:00:00Z"), ms("2027-01-15T00:00:00Z")))
        );
    }

    proptest! {
        #[test]
        fn every_time_lies_in_its_window_and_period(
            t in -2_000_000_000_000i64..4_000_000_000_000i64,
            size in prop::sample::select(vec![1_000i64, 60_000, 300_000, 3_600_000, 86_400_000]),
            anchor in 1u8..=28,
            offset_hours in -12i32..=14,
        ) {
            let start = window_start(t, size);
            prop_assert!(start <= t && t < start + size);
            let (p0, p1) = period_bounds(t, anchor, offset_hours * 3600).expect("in range");
            prop_assert!(p0 <= t && t < p1);
            // Whole-hour offsets are multiples of windows up to an hour: the window is inside.
            if size <= 3_600_000 {
                prop_assert!(p0 <= start && start + size <= p1);
            }
        }
    }
}
