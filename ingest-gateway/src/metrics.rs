//! The gateway's Prometheus metrics, registered on a registry the caller passes in.
//!
//! Labels are bounded: outcome, code (the fixed rejection codes), status class, layer, route.
//! Never a tenant, customer or event id.

use neruba_schemas::RejectCode;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    exponential_buckets,
};

/// Handles to every gateway metric; cheap to clone.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// `neruba_ingest_events_total{outcome, code}`.
    pub events: IntCounterVec,
    /// `neruba_ingest_requests_total{status}`.
    pub requests: IntCounterVec,
    /// `neruba_ingest_request_duration_seconds`.
    pub request_duration: Histogram,
    /// `neruba_produce_duration_seconds`: enqueue of a request's events to the last ack.
    pub produce_duration: Histogram,
    /// `neruba_produce_queue_depth`: messages librdkafka holds, not yet acknowledged.
    pub produce_queue_depth: IntGauge,
    /// `neruba_dedup_hits_total{layer}`.
    pub dedup_hits: IntCounterVec,
    /// `neruba_dedup_cache_entries`.
    pub dedup_entries: IntGauge,
    /// `neruba_broker_reachable`: 1 when the last metadata probe succeeded.
    pub broker_reachable: IntGauge,
    /// `neruba_http_connections`: open HTTP connections (at the cap, new ones wait).
    pub http_connections: IntGauge,
    /// `neruba_http_handler_panics_total`: requests whose handler panicked (answered 500).
    pub http_handler_panics: IntCounter,
    /// `neruba_ingest_body_bytes_in_flight`: bytes of request bodies reserved (see
    /// [`crate::budget`]).
    pub body_bytes_in_flight: IntGauge,
    /// `neruba_credit_requests_total{route, status}`: grant, void and balance-rule requests, by
    /// HTTP status.
    pub credit_requests: IntCounterVec,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let latency = || exponential_buckets(0.0005, 2.0, 16);
        let metrics = Self {
            events: IntCounterVec::new(
                Opts::new("neruba_ingest_events_total", "Events received, by outcome and rejection code."),
                &["outcome", "code"],
            )?,
            requests: IntCounterVec::new(
                Opts::new("neruba_ingest_requests_total", "Ingest requests, by HTTP status."),
                &["status"],
            )?,
            request_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "neruba_ingest_request_duration_seconds",
                    "Time from request start to response, seconds.",
                )
                .buckets(latency()?),
            )?,
            produce_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "neruba_produce_duration_seconds",
                    "Time from enqueueing a request's events to their last delivery report, seconds.",
                )
                .buckets(latency()?),
            )?,
            produce_queue_depth: IntGauge::new(
                "neruba_produce_queue_depth",
                "Messages queued in the producer and not yet acknowledged.",
            )?,
            dedup_hits: IntCounterVec::new(
                Opts::new("neruba_dedup_hits_total", "Repeated event ids dropped, by dedup layer."),
                &["layer"],
            )?,
            dedup_entries: IntGauge::new(
                "neruba_dedup_cache_entries",
                "Event ids held by the gateway's recent-repeat cache.",
            )?,
            broker_reachable: IntGauge::new(
                "neruba_broker_reachable",
                "1 when the last broker metadata probe succeeded, else 0.",
            )?,
            http_connections: IntGauge::new(
                "neruba_http_connections",
                "HTTP connections open on the gateway.",
            )?,
            http_handler_panics: IntCounter::new(
                "neruba_http_handler_panics_total",
                "Requests to the gateway whose handler panicked, each answered 500 `internal` (a bug).",
            )?,
            body_bytes_in_flight: IntGauge::new(
                "neruba_ingest_body_bytes_in_flight",
                "Bytes of request bodies held (reserved from the gateway's body budget).",
            )?,
            credit_requests: IntCounterVec::new(
                Opts::new(
                    "neruba_credit_requests_total",
                    "Credit grant, void and balance-rule requests, by route and HTTP status.",
                ),
                &["route", "status"],
            )?,
        };
        registry.register(Box::new(metrics.events.clone()))?;
        registry.register(Box::new(metrics.requests.clone()))?;
        registry.register(Box::new(metrics.request_duration.clone()))?;
        registry.register(Box::new(metrics.produce_duration.clone()))?;
        registry.register(Box::new(metrics.produce_queue_depth.clone()))?;
        registry.register(Box::new(metrics.http_connections.clone()))?;
        registry.register(Box::new(metrics.http_handler_panics.clone()))?;
        registry.register(Box::new(metrics.body_bytes_in_flight.clone()))?;
        registry.register(Box::new(metrics.dedup_hits.clone()))?;
        registry.register(Box::new(metrics.dedup_entries.clone()))?;
        registry.register(Box::new(metrics.broker_reachable.clone()))?;
        registry.register(Box::new(metrics.credit_requests.clone()))?;
        // Pre-create every bounded series so dashboards see zeros, not gaps.
        for outcome in ["accepted", "duplicate"] {
            metrics.events.with_label_values(&[outcome, ""]);
        }
        for code in RejectCode::ALL {
            metrics
                .events
                .with_label_values(&["rejected", code.as_str()]);
        }
        metrics.dedup_hits.with_label_values(&["gateway"]);
        // The statuses the failing-ingest alert counts, at 0 before the first (it reads their
        // rate, which needs a sample before the increase).
        for status in ["200", "500", "503"] {
            metrics.requests.with_label_values(&[status]);
        }
        for route in ["grant", "void", "rule_put", "rule_delete"] {
            metrics.credit_requests.with_label_values(&[route, "202"]);
        }
        Ok(metrics)
    }
}

/// Gathers several registries into one exposition, merging families of the same name (one
/// process running several components exposes e.g. `neruba_dedup_hits_total` for each layer).
pub fn gather(registries: &[Registry]) -> Vec<prometheus::proto::MetricFamily> {
    let mut merged: Vec<prometheus::proto::MetricFamily> = Vec::new();
    for registry in registries {
        for mut family in registry.gather() {
            match merged.iter_mut().find(|f| f.name() == family.name()) {
                Some(existing) => existing.mut_metric().extend(family.take_metric()),
                None => merged.push(family),
            }
        }
    }
    merged
}

/// Per-request tallies, published once per request rather than once per event.
#[derive(Debug, Default)]
pub struct Tally {
    pub accepted: u64,
    pub duplicate: u64,
    pub rejected: Vec<(RejectCode, u64)>,
}

impl Tally {
    pub fn reject(&mut self, code: RejectCode) {
        match self.rejected.iter_mut().find(|(c, _)| *c == code) {
            Some((_, n)) => *n += 1,
            None => self.rejected.push((code, 1)),
        }
    }

    pub fn publish(&self, metrics: &Metrics) {
        metrics
            .events
            .with_label_values(&["accepted", ""])
            .inc_by(self.accepted);
        metrics
            .events
            .with_label_values(&["duplicate", ""])
            .inc_by(self.duplicate);
        metrics
            .dedup_hits
            .with_label_values(&["gateway"])
            .inc_by(self.duplicate);
        for (code, n) in &self.rejected {
            metrics
                .events
                .with_label_values(&["rejected", code.as_str()])
                .inc_by(*n);
        }
    }
}
