//! The api's metrics (the read model's lag is the shared consumer gauges, `consumer="api"`).

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntGauge, Registry};
use std::time::Instant;

/// Read latency by route.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    /// `neruba_api_read_seconds{route}`: answered reads, from the request to the answer.
    read_seconds: HistogramVec,
    /// `neruba_api_http_connections`: open HTTP connections (at the cap, new ones wait).
    pub(crate) connections: IntGauge,
    /// `neruba_api_http_handler_panics_total`: reads whose handler panicked (answered 500).
    pub(crate) handler_panics: IntCounter,
}

/// Every route label, so each series exists from the start.
pub(crate) const ROUTES: [&str; 9] = [
    "customers",
    "balances",
    "grants",
    "grant",
    "balance_entries",
    "statement",
    "line_items",
    "explanation",
    "usage",
];

impl Metrics {
    pub(crate) fn register(registry: &Registry) -> prometheus::Result<Self> {
        let read_seconds = HistogramVec::new(
            HistogramOpts::new(
                "neruba_api_read_seconds",
                "Billing reads answered, by route: seconds from the request to the answer.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
            ]),
            &["route"],
        )?;
        registry.register(Box::new(read_seconds.clone()))?;
        for route in ROUTES {
            read_seconds.with_label_values(&[route]);
        }
        let connections = IntGauge::new(
            "neruba_api_http_connections",
            "HTTP connections open on the api.",
        )?;
        registry.register(Box::new(connections.clone()))?;
        let handler_panics = IntCounter::new(
            "neruba_api_http_handler_panics_total",
            "Requests to the api whose handler panicked, each answered 500 `internal` (a bug).",
        )?;
        registry.register(Box::new(handler_panics.clone()))?;
        Ok(Self {
            read_seconds,
            connections,
            handler_panics,
        })
    }

    pub(crate) fn observe(&self, route: &'static str, started: Instant) {
        self.read_seconds
            .with_label_values(&[route])
            .observe(started.elapsed().as_secs_f64());
    }
}
