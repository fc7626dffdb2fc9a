//! The rater's Prometheus metrics, on a registry the caller passes in.
//! Labels are bounded: kind, code.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

/// Handles to every rater metric; cheap to clone.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// `neruba_rater_rollups_total`: rollups read.
    pub rollups: IntCounter,
    /// `neruba_line_items_emitted_total{kind}`.
    pub items: IntCounterVec,
    /// `neruba_rater_repeated_rollups_total`: re-delivered revisions, rated before.
    pub repeats: IntCounter,
    /// `neruba_rater_refused_rollups_total{code}`: sent to the dead-letter topic.
    pub refused: IntCounterVec,
    /// `neruba_rater_reruns_total`: rerun requests handled (one per partition per request).
    pub reruns: IntCounter,
    /// `neruba_window_close_to_line_item_seconds`: rollup produced → its item acknowledged.
    pub close_to_item: Histogram,
    /// `neruba_rater_rated_past_retention_total`: items rated for windows that started longer
    /// ago than `--rater-window-retention` (their records may go at the next compaction).
    pub past_retention: IntCounter,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            rollups: IntCounter::new("neruba_rater_rollups_total", "Rollups read by the rater.")?,
            items: IntCounterVec::new(
                Opts::new(
                    "neruba_line_items_emitted_total",
                    "Line items produced, by kind.",
                ),
                &["kind"],
            )?,
            repeats: IntCounter::new(
                "neruba_rater_repeated_rollups_total",
                "Re-delivered rollup revisions that were rated before (no new item).",
            )?,
            refused: IntCounterVec::new(
                Opts::new(
                    "neruba_rater_refused_rollups_total",
                    "Rollups the rater could not price, sent to the dead-letter topic, by code.",
                ),
                &["code"],
            )?,
            reruns: IntCounter::new(
                "neruba_rater_reruns_total",
                "Rerun requests handled, one per rollups partition per request.",
            )?,
            close_to_item: Histogram::with_opts(
                HistogramOpts::new(
                    "neruba_window_close_to_line_item_seconds",
                    "From a rollup's production (window close) to its line item's acknowledgement.",
                )
                .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            )?,
            past_retention: IntCounter::new(
                "neruba_rater_rated_past_retention_total",
                "Line items rated for windows that started longer ago than the window \
                 retention: a re-delivery of the same revision after their records' next \
                 compaction would be rated again (raise --rater-window-retention).",
            )?,
        };
        registry.register(Box::new(m.rollups.clone()))?;
        registry.register(Box::new(m.past_retention.clone()))?;
        registry.register(Box::new(m.items.clone()))?;
        registry.register(Box::new(m.repeats.clone()))?;
        registry.register(Box::new(m.refused.clone()))?;
        registry.register(Box::new(m.reruns.clone()))?;
        registry.register(Box::new(m.close_to_item.clone()))?;
        for kind in ["usage", "adjustment", "flat"] {
            m.items.with_label_values(&[kind]);
        }
        for code in neruba_schemas::RefusalCode::ALL {
            m.refused.with_label_values(&[code.as_str()]);
        }
        Ok(m)
    }
}
