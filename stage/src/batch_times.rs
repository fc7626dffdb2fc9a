//! Where a stage's batches spend their time, so a wait can be placed in a stage and a phase:
//! `neruba_stage_batch_seconds{consumer,phase}` and `neruba_stage_batch_messages{consumer}`.
//!
//! The phases of a batch, in order:
//! - `apply`: from its first message to its last applied, polls included (the wait for a first
//!   message is idle time, not counted), and the idle work after the poll;
//! - `deliver`: its outputs sent until the broker acknowledged every one (`acks=all`);
//! - `write`: its state written, one atomic write per partition, and the group offset commit.
//!
//! A batch that read nothing and emitted nothing is not counted.

use prometheus::{Histogram, HistogramOpts, HistogramVec, Registry};
use std::time::Duration;

/// One stage's batch histograms; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct BatchTimes {
    apply: Histogram,
    deliver: Histogram,
    write: Histogram,
    messages: Histogram,
}

impl BatchTimes {
    /// Registers the histograms, labelled `consumer=stage`.
    pub(crate) fn register(stage: &str, registry: &Registry) -> prometheus::Result<Self> {
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "neruba_stage_batch_seconds",
                "Time of a stage's batch by phase: apply (its messages polled and applied), \
                 deliver (outputs until acknowledged), write (state and offset, atomically).",
            )
            .buckets(vec![
                0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["consumer", "phase"],
        )?;
        let messages = HistogramVec::new(
            HistogramOpts::new(
                "neruba_stage_batch_messages",
                "Input messages of a stage's batch (a batch at the stage's --max-batch means it \
                 is behind).",
            )
            .buckets(vec![
                1.0, 10.0, 100.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0, 25_000.0, 50_000.0,
            ]),
            &["consumer"],
        )?;
        registry.register(Box::new(seconds.clone()))?;
        registry.register(Box::new(messages.clone()))?;
        Ok(Self {
            apply: seconds.with_label_values(&[stage, "apply"]),
            deliver: seconds.with_label_values(&[stage, "deliver"]),
            write: seconds.with_label_values(&[stage, "write"]),
            messages: messages.with_label_values(&[stage]),
        })
    }

    pub(crate) fn applied(&self, took: Duration) {
        self.apply.observe(took.as_secs_f64());
    }

    pub(crate) fn delivered(&self, took: Duration) {
        self.deliver.observe(took.as_secs_f64());
    }

    /// The batch's write, and how many input messages it made durable.
    pub(crate) fn written(&self, took: Duration, messages: usize) {
        self.write.observe(took.as_secs_f64());
        self.messages.observe(messages as f64);
    }
}
