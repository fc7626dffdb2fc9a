//! Folding measures into windows and periods, and closing windows into rollups.
//!
//! Invariants:
//! - an event is folded whole or not at all: every meter's window (and, for a closed window,
//!   period) sum is checked ([`PartitionState::fits`]) before any is changed;
//! - a window closes once, when its tenant's watermark passes its end ([`super::watermark`]);
//!   its rollup carries the period-to-date aggregate of the closed windows;
//! - a late event (its window already closed) updates window and period and re-emits the
//!   window with `revision + 1`.

use super::{CachedWindow, Output, PartitionState, WindowRecord, open_key};
use crate::{Error, Result, keys};
use neruba_schemas::catalog::Aggregation;
use neruba_schemas::measure::Measure;
use neruba_schemas::rollup::{Aggregate, LatestEvent, Rollup};
use neruba_schemas::window::{period_bounds, window_start};
use neruba_schemas::{Event, RejectCode, Rejection, decimal};
use neruba_stage::Input;
use rust_decimal::Decimal;
use std::ops::Range;

/// Where one measure of an event is folded.
pub(super) struct Target {
    /// The window's key; its series (meter, customer, group) is `window_key[series_at]`.
    pub(super) window_key: Vec<u8>,
    pub(super) series_at: Range<usize>,
    pub(super) start: i64,
    pub(super) size: i64,
    pub(super) period_start: i64,
    pub(super) period_end: i64,
}

impl Target {
    pub(super) fn series(&self) -> &[u8] {
        &self.window_key[self.series_at.clone()]
    }
}

/// The last billing period found, for its anchor day and time zone offset. Periods of one
/// anchor and offset tile time, so an event inside it is in it: events come nearly in time
/// order, so most skip the calendar arithmetic.
#[derive(Debug, Clone, Copy)]
pub(super) struct LastPeriod {
    anchor_day: u8,
    offset_secs: i32,
    start: i64,
    end: i64,
}

impl PartitionState {
    /// The window, series and period one measure of `event` folds into; `None` when the
    /// event's time has no billing period in the calendar (years 0000–9999 in the meter's
    /// zone), which no gateway writes.
    pub(super) fn target(&mut self, event: &Event, m: &Measure<'_>) -> Result<Option<Target>> {
        let meter = m.meter;
        let size = meter.window_ms();
        let start = window_start(event.time_ms, size);
        let Some((period_start, period_end)) = self.period_of(
            event.time_ms,
            meter.billing_period.anchor_day,
            meter.offset_secs(),
        ) else {
            return Ok(None);
        };
        // Canonical JSON of the group (a sorted map), written into the key with the series;
        // most meters have none, and their `{}` is written without the serializer.
        let room = m
            .group
            .iter()
            .map(|(k, v)| k.len() + v.len() + 6)
            .sum::<usize>()
            + 2;
        let write_group = |key: &mut Vec<u8>| {
            if m.group.is_empty() {
                key.extend_from_slice(b"{}");
                return;
            }
            let at = key.len();
            // A map of strings always serializes; were it not to, the group text is empty.
            if serde_json::to_writer(&mut *key, &m.group).is_err() {
                key.truncate(at);
            }
        };
        let (window_key, series_at) = keys::window_with(
            &event.tenant,
            &meter.key,
            &event.subject,
            room,
            write_group,
            start,
        );
        Ok(Some(Target {
            window_key,
            series_at,
            start,
            size,
            period_start,
            period_end,
        }))
    }

    /// The billing period (start, end) of `time_ms` for a meter's anchor day and offset, if
    /// the calendar has it.
    pub(super) fn period_of(
        &mut self,
        time_ms: i64,
        anchor_day: u8,
        offset_secs: i32,
    ) -> Option<(i64, i64)> {
        if let Some(last) = self.last_period
            && last.anchor_day == anchor_day
            && last.offset_secs == offset_secs
            && (last.start..last.end).contains(&time_ms)
        {
            return Some((last.start, last.end));
        }
        let (start, end) = period_bounds(time_ms, anchor_day, offset_secs)?;
        self.last_period = Some(LastPeriod {
            anchor_day,
            offset_secs,
            start,
            end,
        });
        Some((start, end))
    }

    /// Whether folding `m` into `target` keeps every sum exact: the window's, and the
    /// period's when the window is already closed (a late event goes into both).
    pub(super) fn fits(&mut self, tenant: &str, m: &Measure<'_>, target: &Target) -> Result<bool> {
        let Some(value) = m.value.filter(|_| m.meter.aggregation.sums()) else {
            return Ok(true);
        };
        let watermark = self.tenant_watermark(tenant);
        let end = target.start + target.size;
        let (window_sum, closed) = self
            .peek_window(&target.window_key, end <= watermark)?
            .unwrap_or((Decimal::ZERO, end <= watermark));
        if decimal::exact_add(window_sum, value).is_none() {
            return Ok(false);
        }
        if closed {
            let period_key = keys::period(tenant, target.series(), target.period_start);
            let period_sum = self.peek_period_sum(period_key)?;
            return Ok(decimal::exact_add(period_sum, value).is_some());
        }
        Ok(true)
    }

    /// The sum and closedness of the window record at `key`, read into the batch cache
    /// (unchanged) if it was not there (`may_be_stored` as for [`Self::load_window`]).
    fn peek_window(&mut self, key: &[u8], may_be_stored: bool) -> Result<Option<(Decimal, bool)>> {
        if let Some(cached) = self.windows.get(key) {
            return Ok(Some((cached.record.agg.sum, cached.record.closed)));
        }
        if !may_be_stored {
            return Ok(None);
        }
        let Some(record) = self.get_record::<WindowRecord>(key)? else {
            return Ok(None);
        };
        let peeked = (record.agg.sum, record.closed);
        let cached = CachedWindow {
            record,
            dirty: false,
        };
        self.windows.insert(key.to_vec(), cached);
        Ok(Some(peeked))
    }

    pub(super) fn fold(&mut self, event: &Event, m: &Measure<'_>, target: Target) -> Result<()> {
        let meter = m.meter;
        let Target {
            window_key,
            series_at,
            start,
            size,
            period_start,
            period_end,
        } = target;
        let series = &window_key[series_at];
        // Most events add to a window open in memory: folded in place.
        if m.distinct.is_none()
            && let Some(cached) = self.windows.get_mut(&window_key)
            && !cached.record.closed
        {
            let record = &mut cached.record;
            record
                .agg
                .add(record.aggregation, m.value, event.time_ms, &event.id, false)
                .map_err(|_| overflow(record))?;
            cached.dirty = true;
            return Ok(());
        }
        let tenant = event.tenant.as_str();
        let watermark = self.tenant_watermark(tenant);
        let existing = self.load_window(&window_key, start + size <= watermark)?;
        let is_new = existing.is_none();
        let mut record = existing.unwrap_or_else(|| WindowRecord {
            tenant: tenant.to_owned(),
            meter: meter.key.clone(),
            customer: event.subject.clone(),
            group: m
                .group
                .iter()
                .map(|(name, text)| ((*name).to_owned(), text.clone()))
                .collect(),
            aggregation: meter.aggregation,
            window_start_ms: start,
            window_end_ms: start + size,
            period_start_ms: period_start,
            period_end_ms: period_end,
            agg: Aggregate::default(),
            revision: 0,
            // A window whose end the tenant's watermark already passed is closed, even if
            // empty so far.
            closed: start + size <= watermark,
            period_new: 0,
        });

        // Distinct values: per window, and "first window of the period" per value.
        let mut new_in_window = false;
        let mut new_in_closed_period = false;
        if let Some(value) = &m.distinct {
            let value_key = keys::window_value(tenant, series, start, value);
            if self.read(&value_key, |_| ())?.is_none() {
                new_in_window = true;
                self.put(value_key, Vec::new());
            }
            let first_key = keys::period_value(tenant, series, period_start, value);
            let first = self.read(&first_key, keys::time_from)?.flatten();
            match first {
                None => {
                    self.put(first_key, keys::time_bytes(start).to_vec());
                    record.period_new += 1;
                    new_in_closed_period = record.closed;
                }
                Some(first) if first > start => {
                    self.put(first_key, keys::time_bytes(start).to_vec());
                    record.period_new += 1;
                    let later_key = keys::window(tenant, series, first);
                    if let Some(mut later) =
                        self.load_window(&later_key, first + size <= watermark)?
                    {
                        later.period_new = later.period_new.saturating_sub(1);
                        // Counted by the closed period now, through this window; the later
                        // window must not count it again when it closes.
                        new_in_closed_period = record.closed && !later.closed;
                        self.store_window(later_key, later);
                    }
                }
                Some(_) => {}
            }
        }
        let aggregation = record.aggregation;
        // `fits` checked the sums; a failure here would be a broken invariant.
        record
            .agg
            .add(
                aggregation,
                m.value,
                event.time_ms,
                &event.id,
                new_in_window,
            )
            .map_err(|_| overflow(&record))?;

        if record.closed {
            // A late event: the closed period absorbs it and the window is re-emitted.
            self.counts.late += 1;
            record.revision += 1;
            let period_key = keys::period(tenant, series, period_start);
            let mut period = self.load_period(&period_key)?;
            period
                .add(
                    aggregation,
                    m.value,
                    event.time_ms,
                    &event.id,
                    new_in_closed_period,
                )
                .map_err(|_| overflow(&record))?;
            self.emit(&record, &period);
            self.store_period(period_key, period);
            self.store_window(window_key, record);
        } else {
            if is_new {
                self.put(open_key(record.window_end_ms, &window_key), Vec::new());
                self.clock_mut(tenant)?
                    .open_window(record.window_end_ms, &window_key);
            }
            self.store_window(window_key, record);
        }
        Ok(())
    }

    pub(super) fn close(&mut self, end: i64, window_key: Vec<u8>) -> Result<()> {
        self.delete(open_key(end, &window_key));
        // Open until now, so in the cache; `true` still reads the store for an open-index
        // entry whose record was never written (none is then emitted).
        let Some(mut record) = self.load_window(&window_key, true)? else {
            return Ok(());
        };
        record.closed = true;
        record.revision += 1;
        self.counts.closed_window_ends.push(record.window_end_ms);
        let period_key = keys::period_of_window(&window_key, record.period_start_ms)
            .ok_or_else(|| Error::corrupt("window key", "malformed"))?;
        let mut period = self.load_period(&period_key)?;
        let before = period.clone();
        match period.merge(record.aggregation, &record.agg) {
            Ok(()) => {
                period.distinct += record.period_new;
                self.emit(&record, &period);
                self.store_period(period_key, period);
            }
            Err(_) => {
                // Each event fitted its window, but the window does not fit its period: the
                // window's rollup is dead-lettered with the reason, the period stays as it
                // was, and the partition goes on.
                let rollup = rollup_of(&record, &before);
                let rejection = Rejection::new(
                    RejectCode::ValueOutOfRange,
                    format!(
                        "meter `{}`: the window's sum does not fit its period's exact decimal range",
                        record.meter
                    ),
                );
                let (key, payload) = (rollup.key(), rollup.encode());
                let input = Input {
                    // The message being applied: the one whose watermark closed the window.
                    offset: self.store.next_offset().map_or(-1, |next| next - 1),
                    key: Some(key.as_bytes()),
                    payload: &payload,
                };
                self.refuse(input, rejection);
                self.store_period(period_key, before);
            }
        }
        self.store_window(window_key, record);
        Ok(())
    }

    pub(super) fn emit(&mut self, record: &WindowRecord, period: &Aggregate) {
        self.counts.rollups += 1;
        self.outputs.push(Output::Rollup(rollup_of(record, period)));
    }
}

/// The rollup of a window record with its period-to-date aggregate.
pub(super) fn rollup_of(record: &WindowRecord, period: &Aggregate) -> Rollup {
    Rollup {
        v: 1,
        tenant: record.tenant.clone(),
        meter: record.meter.clone(),
        customer: record.customer.clone(),
        group: record.group.clone(),
        aggregation: record.aggregation,
        window_start_ms: record.window_start_ms,
        window_end_ms: record.window_end_ms,
        period_start_ms: record.period_start_ms,
        period_end_ms: record.period_end_ms,
        window_quantity: record.agg.quantity(record.aggregation),
        window_events: record.agg.count,
        period_quantity: period.quantity(record.aggregation),
        period_events: period.count,
        revision: record.revision,
        // Only a `latest` meter's: other rollups stay as they were.
        latest_event: match record.aggregation {
            Aggregation::Latest => record.agg.latest.as_ref().map(|l| LatestEvent {
                time_ms: l.time_ms,
                id: l.id.clone(),
            }),
            _ => None,
        },
    }
}

pub(super) fn overflow(record: &WindowRecord) -> Error {
    Error::Bug(format!(
        "tenant {} meter {} window {}: the sum exceeds the exact decimal range",
        record.tenant, record.meter, record.window_start_ms
    ))
}
