//! Event time per tenant within a partition: watermarks, idle ticks, and the advance that
//! closes windows.
//!
//! Invariants:
//! - each tenant has its own clock in a partition (highest event time, watermark, open
//!   windows): one tenant's future-dated events, backfills or silence never close, delay or
//!   make late another tenant's windows;
//! - a watermark only rises, and an advance closes the tenant's windows in order of end time;
//! - processing time decides only *when* an idle tick is sent, never what it does: the tick is
//!   written to the partition and applied when read back, so a replay closes every window at
//!   the same point.

use super::{Output, PartitionState};
use crate::{Error, Result};
use std::collections::BTreeSet;
use std::time::Instant;

/// One tenant's event clock within the partition.
#[derive(Debug)]
pub(super) struct Clock {
    /// Highest event time of the tenant's events applied here.
    pub(super) max_event_time: i64,
    /// Windows of the tenant ending at or before this are closed.
    pub(super) watermark: i64,
    /// The tenant's windows not yet closed, by end time; changed only through
    /// [`Clock::open_window`] and [`Clock::take_closing`], which keep `open_bytes` equal to it.
    pub(super) open: BTreeSet<(i64, Vec<u8>)>,
    /// What `open` counts against the bound (see [`super::open_cost`]).
    pub(super) open_bytes: usize,
    /// Changed by the batch: written at commit.
    pub(super) dirty: bool,
    /// The batch applied an event of this tenant (idle time restarts at the batch's end).
    pub(super) touched: bool,
    /// When the tenant's last event was applied (or the state opened): processing time,
    /// only for deciding when to send an idle tick, never for what a tick does.
    pub(super) last_event_at: Instant,
    /// When the last idle tick was produced and not yet read back.
    pub(super) tick_sent_at: Option<Instant>,
}

impl Clock {
    pub(super) fn new((max_event_time, watermark): (i64, i64)) -> Self {
        Self {
            max_event_time,
            watermark,
            open: BTreeSet::new(),
            open_bytes: 0,
            dirty: false,
            touched: false,
            last_event_at: Instant::now(),
            tick_sent_at: None,
        }
    }

    /// Adds a window ending at `end` to the open ones (once), counting its bytes.
    pub(super) fn open_window(&mut self, end: i64, window_key: &[u8]) {
        if self.open.insert((end, window_key.to_vec())) {
            self.open_bytes = self.open_bytes.saturating_add(super::open_cost(window_key));
        }
    }

    /// What the open windows ending at or before `watermark` count: the bytes
    /// [`Clock::take_closing`] would free.
    pub(super) fn closing_bytes(&self, watermark: i64) -> usize {
        self.open
            .iter()
            .take_while(|(end, _)| *end <= watermark)
            .map(|(_, key)| super::open_cost(key))
            .sum()
    }

    /// Takes the open windows ending at or before `watermark`, in order of end time, their
    /// bytes no longer counted.
    fn take_closing(&mut self, watermark: i64) -> Vec<(i64, Vec<u8>)> {
        let mut closing = Vec::new();
        while self.open.first().is_some_and(|(end, _)| *end <= watermark) {
            if let Some(first) = self.open.pop_first() {
                self.open_bytes = self.open_bytes.saturating_sub(super::open_cost(&first.1));
                closing.push(first);
            }
        }
        closing
    }
}

impl PartitionState {
    /// The most advanced tenant watermark of the partition (`i64::MIN` before any event): how
    /// far event time got here, for the watermark-lag gauge.
    pub fn watermark(&self) -> i64 {
        self.clocks
            .values()
            .map(|c| c.watermark)
            .max()
            .unwrap_or(i64::MIN)
    }

    /// The watermark of one tenant (`i64::MIN` before its first event).
    pub fn tenant_watermark(&self, tenant: &str) -> i64 {
        self.clocks
            .get(tenant)
            .map_or(self.initial_clock.1, |c| c.watermark)
    }

    /// The tenant's clock, started (from the initial clock) at its first event here.
    pub(super) fn clock_mut(&mut self, tenant: &str) -> Result<&mut Clock> {
        if !self.clocks.contains_key(tenant) {
            self.clocks
                .insert(tenant.to_owned(), Clock::new(self.initial_clock));
        }
        self.clocks
            .get_mut(tenant)
            .ok_or_else(|| Error::Bug(format!("clock of tenant {tenant} vanished")))
    }

    /// For each tenant of the partition without events for `idle`, lets its event time run on
    /// with processing time: its watermark may become the later of (highest event time +
    /// idle time) and the wall clock, minus grace. That advance is not applied here: it is
    /// queued as an [`Output::Tick`], to be written to the partition itself and applied when
    /// read back ([`Self::apply_tick`]). The partition's state is thereby a function of its
    /// messages alone, and replaying it closes every window at the same point.
    ///
    /// Call once per batch. Nothing is queued for a tenant before its first event, while an
    /// earlier tick of it is still in flight (for up to `retry_after`), or when the advance
    /// would close none of its windows. Returns how many ticks were queued.
    pub fn idle_ticks(
        &mut self,
        idle: std::time::Duration,
        grace_ms: i64,
        wall_ms: i64,
        retry_after: std::time::Duration,
    ) -> usize {
        let now = Instant::now();
        let mut queued = 0;
        for (tenant, clock) in &mut self.clocks {
            if std::mem::take(&mut clock.touched) {
                clock.last_event_at = now;
                continue;
            }
            let idle_for = now.saturating_duration_since(clock.last_event_at);
            let in_flight = clock
                .tick_sent_at
                .is_some_and(|sent| now.saturating_duration_since(sent) < retry_after);
            if clock.max_event_time == i64::MIN || idle_for < idle || in_flight {
                continue;
            }
            let idle_ms = i64::try_from(idle_for.as_millis()).unwrap_or(i64::MAX);
            let event_clock = clock.max_event_time.saturating_add(idle_ms).max(wall_ms);
            let watermark = event_clock.saturating_sub(grace_ms);
            let closes_a_window = clock.open.first().is_some_and(|(end, _)| *end <= watermark);
            if watermark <= clock.watermark || !closes_a_window {
                continue;
            }
            clock.tick_sent_at = Some(now);
            self.outputs.push(Output::Tick {
                partition: self.partition,
                tenant: tenant.clone(),
                watermark,
            });
            queued += 1;
        }
        queued
    }

    /// Applies a watermark tick read at `offset` (see [`Self::idle_ticks`]): to its tenant, or
    /// to every tenant for a tick written before clocks were per tenant (no tenant named).
    pub fn apply_tick(&mut self, offset: i64, tenant: Option<&str>, watermark: i64) -> Result<()> {
        self.store.consumed(offset);
        match tenant {
            Some(tenant) => {
                self.clock_mut(tenant)?.tick_sent_at = None;
                self.advance_to(tenant, watermark)
            }
            None => {
                // As the partition-wide watermark did: tenants not seen here yet start from
                // it too, and it is stored, so a replay after a restart applies it the same.
                if watermark > self.initial_clock.1 {
                    self.initial_clock.1 = watermark;
                    self.initial_dirty = true;
                }
                let mut tenants: Vec<String> = self.clocks.keys().cloned().collect();
                tenants.sort_unstable();
                for tenant in tenants {
                    self.advance_to(&tenant, watermark)?;
                }
                Ok(())
            }
        }
    }

    /// Raises `tenant`'s watermark to `watermark` (never lowers it) and closes every window of
    /// the tenant it passed, in order of end time.
    pub fn advance_to(&mut self, tenant: &str, watermark: i64) -> Result<()> {
        let clock = self.clock_mut(tenant)?;
        if watermark <= clock.watermark {
            return Ok(());
        }
        clock.watermark = watermark;
        clock.dirty = true;
        for (end, window_key) in clock.take_closing(watermark) {
            self.close(end, window_key)?;
        }
        Ok(())
    }
}
