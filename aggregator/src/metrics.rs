//! The aggregator's Prometheus metrics, on a registry the caller passes in.
//! Labels are bounded: partition, code, layer.

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Handles to every aggregator metric; cheap to clone.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// `neruba_aggregator_events_total`: events folded into state.
    pub events: IntCounter,
    /// `neruba_dedup_hits_total{layer="aggregator"}`.
    pub dedup_hits: IntCounterVec,
    /// `neruba_late_events_total`: events that revised a closed window.
    pub late_events: IntCounter,
    /// `neruba_dead_letters_total{code}`.
    pub dead_letters: IntCounterVec,
    /// `neruba_rollups_emitted_total`.
    pub rollups: IntCounter,
    /// `neruba_window_close_delay_seconds`: wall clock at close − window end.
    pub close_delay: prometheus::Histogram,
    /// `neruba_watermark_lag_seconds{partition}`: now − watermark.
    pub watermark_lag: IntGaugeVec,
    /// `neruba_open_windows{partition}`.
    pub open_windows: IntGaugeVec,
    /// `neruba_open_window_bytes{partition}`: what the open windows count against the bound.
    pub open_window_bytes: IntGaugeVec,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let gauge =
            |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["partition"]);
        let m = Self {
            events: IntCounter::new(
                "neruba_aggregator_events_total",
                "Events folded into aggregation state.",
            )?,
            dedup_hits: IntCounterVec::new(
                Opts::new(
                    "neruba_dedup_hits_total",
                    "Repeated event ids dropped, by dedup layer.",
                ),
                &["layer"],
            )?,
            late_events: IntCounter::new(
                "neruba_late_events_total",
                "Events that revised an already closed window.",
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new(
                    "neruba_dead_letters_total",
                    "Events sent to the dead-letter topic, by rejection code.",
                ),
                &["code"],
            )?,
            rollups: IntCounter::new(
                "neruba_rollups_emitted_total",
                "Rollups produced (first closes and revisions).",
            )?,
            close_delay: prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new(
                    "neruba_window_close_delay_seconds",
                    "Wall clock when a window closed minus the window's end, seconds.",
                )
                .buckets(vec![
                    1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0,
                ]),
            )?,
            watermark_lag: gauge(
                "neruba_watermark_lag_seconds",
                "Wall clock minus the partition's event-time watermark, seconds.",
            )?,
            open_windows: gauge("neruba_open_windows", "Windows not yet closed.")?,
            open_window_bytes: gauge(
                "neruba_open_window_bytes",
                "What the open windows count against --max-open-window-bytes, all tenants.",
            )?,
        };
        registry.register(Box::new(m.events.clone()))?;
        registry.register(Box::new(m.dedup_hits.clone()))?;
        registry.register(Box::new(m.late_events.clone()))?;
        registry.register(Box::new(m.dead_letters.clone()))?;
        registry.register(Box::new(m.rollups.clone()))?;
        registry.register(Box::new(m.close_delay.clone()))?;
        registry.register(Box::new(m.watermark_lag.clone()))?;
        registry.register(Box::new(m.open_windows.clone()))?;
        registry.register(Box::new(m.open_window_bytes.clone()))?;
        m.dedup_hits.with_label_values(&["aggregator"]);
        for code in neruba_schemas::RejectCode::ALL {
            m.dead_letters.with_label_values(&[code.as_str()]);
        }
        Ok(m)
    }
}
