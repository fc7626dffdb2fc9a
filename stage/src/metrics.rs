//! The runtime's own metrics, on the registry the stage is started with: the partitions an
//! instance owns, and where its batches spend their time, so a wait can be placed in a stage
//! and a phase: `neruba_stage_batch_seconds{consumer,phase}` and
//! `neruba_stage_batch_messages{consumer}`. Lag and store gauges are [`crate::ConsumerHealth`]'s.
//!
//! The phases of a batch, in order:
//! - `apply`: from its first message applied to its last, polls included (the wait for a
//!   first message is idle time, not counted; of a rebalance the polls ran, its delivery and
//!   write are counted as theirs, the rest here: closing the stores of partitions it took
//!   away, opening those of partitions it added), and the idle work after the poll; a worker
//!   waiting for its sending thread to take outputs (64 handings behind) waits here;
//! - `deliver`: from the end of its apply until every output is acknowledged (`acks=all`):
//!   the sending thread enqueues a batch's outputs every `hand_every` messages while it is
//!   applied, so this is the thread's backlog and the batch's last outputs (of its last
//!   messages, under `hand_every`, and of its idle work) enqueued, and the broker's answers
//!   awaited; a batch of fewer messages is all enqueued here;
//! - `write`: each partition's state and offset in one atomic write, then the group offset
//!   commit (asynchronous).
//!
//! A batch is timed in a phase only if it did something there: one that read nothing but had
//! outputs (idle work: watermark ticks, expiries) is timed delivering and writing, its idle
//! work itself nowhere. Every write of a batch that read or emitted something is counted,
//! with the input messages it made durable (0 for idle work); a rebalance in the middle of a
//! batch writes it in two.
//!
//! The offsets a stage found missing from its input are [`crate::gaps`]'s.

use prometheus::{Histogram, HistogramOpts, HistogramVec, Registry};
use std::time::Duration;

/// The gauge of partitions this instance owns, named by the stage.
pub(crate) fn assigned_partitions(
    name: &str,
    registry: &Registry,
) -> prometheus::Result<prometheus::IntGauge> {
    let assigned = prometheus::IntGauge::new(name, "Partitions this instance owns now.")?;
    registry.register(Box::new(assigned.clone()))?;
    Ok(assigned)
}

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
                "Time of a stage's batches by phase, summed over its workers: apply (messages \
                 polled and applied), deliver (from the apply's end until every output is acknowledged), write (state and \
                 offset, atomically per partition). A batch that read nothing is timed \
                 delivering and writing only.",
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
                "Input messages each write of a stage made durable (0 for idle work; a batch at \
                 the stage's batch bound, as --max-batch or --balances-max-batch sets it, means \
                 it is behind).",
            )
            .buckets(vec![
                1.0, 10.0, 100.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0, 25_000.0, 50_000.0,
                100_000.0,
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
