//! Offsets of its input a stage never received: a message arrived past the offset that follows
//! the last one the partition applied (or the offset stored with its state, after a resume),
//! counted in `neruba_stage_skipped_offsets_total{consumer,partition}` and logged as an error.
//!
//! Checked on inputs that are not compacted (the events and ledger topics; not the rollups:
//! [`crate::Stage::INPUT_COMPACTED`]). Neruba writes those without transactions, so each such
//! offset is a record lost before the stage read it: retention deleted it first (the consumer
//! then starts again at the oldest record left, by the stages' `auto.offset.reset=earliest`,
//! which they allow no pass-through option to change), or the broker skipped it. The stage
//! goes on: nothing it could do brings the records back, and stopping would hold up every
//! record after them.

use prometheus::{IntCounterVec, Opts, Registry};

/// What a stage logs, as an error, when its input skipped records.
pub const SKIPPED_RECORDS_LOG: &str = "Input records skipped: the broker delivered past the next \
                                       offset; what they held is not in this stage's state.";

/// The process's counter; each worker checks its own partitions with an [`InputGaps`].
#[derive(Debug, Clone)]
pub(crate) struct SkippedOffsets {
    stage: &'static str,
    counter: IntCounterVec,
}

impl SkippedOffsets {
    /// Registers `neruba_stage_skipped_offsets_total{consumer,partition}`.
    pub(crate) fn register(stage: &'static str, registry: &Registry) -> prometheus::Result<Self> {
        let counter = IntCounterVec::new(
            Opts::new(
                "neruba_stage_skipped_offsets_total",
                "Input offsets a stage never received: a message arrived past the one after the \
                 last it applied (or after its stored offset). On the events and ledger topics \
                 each is a record lost before the stage read it (retention, or a broker defect). \
                 Not counted on the compacted rollups topic.",
            ),
            &["consumer", "partition"],
        )?;
        registry.register(Box::new(counter.clone()))?;
        Ok(Self { stage, counter })
    }
}

/// One worker's check of its partitions' offsets.
#[derive(Debug)]
pub(crate) struct InputGaps {
    skipped: SkippedOffsets,
    /// Off for a compacted input, whose offsets have gaps by design (a log that goes back is
    /// still reported).
    checked: bool,
    /// The offset each owned partition should deliver next. A partition read from
    /// the beginning has no entry until its first message: its first offset is the topic's
    /// oldest, whatever it is (logged). A worker owns a handful of partitions and this is
    /// looked at for every message, so a scan of a vector, not a hash (no hashing per message).
    expected: Vec<(i32, i64)>,
}

impl InputGaps {
    pub(crate) fn new(skipped: SkippedOffsets, checked: bool) -> Self {
        Self {
            skipped,
            checked,
            expected: Vec::new(),
        }
    }

    /// A partition opened at the offset stored with its state (None: from the beginning).
    /// Its count shows 0 from now on, until a gap (on a checked input). Whatever was expected
    /// of it before goes, so each partition has one entry at most (the worker releases a
    /// partition before it opens it again).
    pub(crate) fn opened(&mut self, partition: i32, stored: Option<i64>) {
        self.released(partition);
        if let Some(next) = stored {
            self.expected.push((partition, next));
        }
        if self.checked {
            self.skipped
                .counter
                .with_label_values(&[self.skipped.stage, &partition.to_string()]);
        }
    }

    pub(crate) fn released(&mut self, partition: i32) {
        self.expected.retain(|&(p, _)| p != partition);
    }

    /// A message received at `offset`: counts and reports the offsets skipped before it (on a
    /// checked input), and returns how many. An offset below the one expected means the
    /// partition's log went back (a stage never seeks, and the client delivers nothing
    /// twice): the topic was recreated or the broker lost records, and the consumer was reset
    /// to the oldest record. That is reported, on every input, and the log followed from there.
    pub(crate) fn received(&mut self, partition: i32, offset: i64) -> i64 {
        let after = offset.saturating_add(1);
        let next = self.expected.iter_mut().find(|(p, _)| *p == partition);
        let Some(expected) = next.map(|(_, next)| std::mem::replace(next, after)) else {
            // The first message of a partition read from the beginning: whether retention had
            // deleted the start before this stage first read it.
            self.expected.push((partition, after));
            tracing::info!(
                stage = self.skipped.stage,
                partition,
                offset,
                "Read from the beginning: the oldest record left is at this offset."
            );
            return 0;
        };
        if offset < expected {
            tracing::warn!(
                stage = self.skipped.stage,
                partition,
                expected,
                received = offset,
                "The partition's log went back below the offset expected next: the topic was \
                 recreated or the broker lost records. What it holds from here is applied like \
                 any other record."
            );
            return 0;
        }
        if offset == expected || !self.checked {
            return 0;
        }
        let missing = offset - expected;
        tracing::error!(
            stage = self.skipped.stage,
            partition,
            expected,
            received = offset,
            missing,
            "{SKIPPED_RECORDS_LOG}"
        );
        self.skipped
            .counter
            .with_label_values(&[self.skipped.stage, &partition.to_string()])
            .inc_by(missing.unsigned_abs());
        missing
    }
}

#[cfg(test)]
mod tests {
    use super::{InputGaps, SkippedOffsets};

    fn counts(registry: &prometheus::Registry) -> Vec<(String, u64)> {
        registry
            .gather()
            .iter()
            .flat_map(|f| f.get_metric().iter())
            .map(|m| {
                let partition = m
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "partition")
                    .map(|l| l.value().to_owned())
                    .unwrap_or_default();
                (partition, m.get_counter().get_value() as u64)
            })
            .collect()
    }

    fn gaps(checked: bool) -> prometheus::Result<(InputGaps, prometheus::Registry)> {
        let registry = prometheus::Registry::new();
        let skipped = SkippedOffsets::register("test", &registry)?;
        Ok((InputGaps::new(skipped, checked), registry))
    }

    #[test]
    fn offsets_past_the_next_are_counted_at_a_resume_and_mid_run() -> prometheus::Result<()> {
        let (mut gaps, registry) = gaps(true)?;
        gaps.opened(0, Some(10));
        gaps.opened(1, None);
        // Partition 0 resumes at 13: 10, 11 and 12 never came.
        assert_eq!(gaps.received(0, 13), 3);
        assert_eq!(gaps.received(0, 14), 0);
        // Mid-run: 15 never came.
        assert_eq!(gaps.received(0, 16), 1);
        // Partition 1 reads from the beginning: its first offset is whatever is oldest.
        assert_eq!(gaps.received(1, 500), 0);
        assert_eq!(gaps.received(1, 501), 0);
        assert_eq!(gaps.received(1, 503), 1);
        assert_eq!(counts(&registry), [("0".into(), 4), ("1".into(), 1)]);
        Ok(())
    }

    #[test]
    fn an_offset_below_the_next_is_reported_and_the_log_followed_from_there()
    -> prometheus::Result<()> {
        // Was (before this check was widened): an offset received again moved nothing back,
        // so after a reset while running no gap was seen until the log passed the old offset.
        let (mut gaps, registry) = gaps(true)?;
        gaps.opened(2, Some(0));
        for offset in 0..5 {
            assert_eq!(gaps.received(2, offset), 0);
        }
        // The log went back to 3: 4 comes next, then 5 never comes.
        assert_eq!(gaps.received(2, 3), 0);
        assert_eq!(gaps.received(2, 4), 0);
        assert_eq!(gaps.received(2, 6), 1);
        // Released and opened again at its stored offset: checked from there.
        gaps.released(2);
        gaps.opened(2, Some(4));
        assert_eq!(gaps.received(2, 4), 0);
        assert_eq!(gaps.received(2, 5), 0);
        // Opened again from the beginning without a release between (the worker never does
        // this): one entry for it, the old expectation gone, its first offset the oldest.
        gaps.opened(2, None);
        assert_eq!(gaps.received(2, 50), 0);
        assert_eq!(gaps.received(2, 52), 1);
        assert_eq!(counts(&registry), [("2".into(), 2)]);
        Ok(())
    }

    #[test]
    fn a_log_that_starts_again_below_the_stored_offset_is_checked_from_there()
    -> prometheus::Result<()> {
        let (mut gaps, registry) = gaps(true)?;
        gaps.opened(3, Some(100));
        assert_eq!(gaps.received(3, 5), 0);
        assert_eq!(gaps.received(3, 6), 0);
        // 7 never came.
        assert_eq!(gaps.received(3, 8), 1);
        assert_eq!(counts(&registry), [("3".into(), 1)]);
        Ok(())
    }

    #[test]
    fn a_compacted_input_is_not_checked_and_shows_no_series() -> prometheus::Result<()> {
        let (mut gaps, registry) = gaps(false)?;
        gaps.opened(0, Some(10));
        assert_eq!(gaps.received(0, 40), 0);
        assert_eq!(gaps.received(0, 45), 0);
        assert_eq!(gaps.received(0, 3), 0);
        assert_eq!(counts(&registry), Vec::<(String, u64)>::new());
        Ok(())
    }
}
