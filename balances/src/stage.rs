//! The balances stage on the stage runtime: what one ledger-topic record does, how entries
//! and ticks are written, and the metrics of a batch. Polling, delivery before write, dead
//! letters and offsets are the runtime's ([`neruba_stage`]).

use crate::Result;
use crate::metrics::Metrics;
use crate::state::{Output, PartitionState, Record};
use neruba_schemas::credit::{self, Tick};
use neruba_schemas::topics::RECORD_HEADER;
use neruba_stage::{Input, Sink, Store, StoreOptions};
use rdkafka::Message;
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureRecord};

/// How long a tick may take to come back before another is written.
const TICK_RETRY_MS: i64 = 5_000;

/// The balances stage's domain logic, one per worker.
pub(crate) struct Balances {
    pub(crate) metrics: Metrics,
    pub(crate) grace_ms: i64,
    pub(crate) window_floor_ms: i64,
    pub(crate) finalize_after_ms: i64,
    pub(crate) ledger_topic: String,
    pub(crate) entries_topic: String,
    /// What the worker's partitions hold in books, its bounds and its gauge.
    pub(crate) books: crate::state::WorkerBooks,
}

impl neruba_stage::Stage for Balances {
    const NAME: &'static str = "balances";
    const ASSIGNED_PARTITIONS_METRIC: &'static str = "neruba_balances_assigned_partitions";
    const CONSUMER_TUNING: &'static [(&'static str, &'static str)] = &[("fetch.wait.max.ms", "20")];
    const LINGER_MS: u32 = 0;

    type Partition = PartitionState;
    type Output = Output;
    type Batch = ();

    fn store_options(&self) -> StoreOptions {
        crate::state::store_options()
    }

    fn output_topic(&self) -> &str {
        &self.entries_topic
    }

    fn open(&mut self, store: Store) -> Result<PartitionState> {
        let state = PartitionState::from_store(store, self.grace_ms, self.finalize_after_ms)?
            .with_window_floor(self.window_floor_ms);
        Ok(self.books.share(state))
    }

    fn begin_batch(&mut self) {}

    fn apply(
        &mut self,
        _batch: &(),
        state: &mut PartitionState,
        message: &BorrowedMessage<'_>,
    ) -> Result<()> {
        let header = message
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == RECORD_HEADER))
            .map(|h| h.value.unwrap_or_default());
        state.apply(Input::of(message), Record::of(header))
    }

    fn after_poll(&mut self, state: &mut PartitionState, now_ms: i64) {
        state.tick_due(now_ms, TICK_RETRY_MS);
    }

    fn take_outputs(&mut self, state: &mut PartitionState) -> Vec<Output> {
        let counts = state.take_counts();
        for (kind, n) in counts.entries {
            self.metrics.entries.with_label_values(&[kind]).inc_by(n);
        }
        for (code, n) in counts.refused {
            self.metrics.refused.with_label_values(&[&code]).inc_by(n);
        }
        for (code, n) in counts.dead_letters {
            self.metrics
                .dead_letters
                .with_label_values(&[code])
                .inc_by(n);
        }
        self.metrics.repeated_items.inc_by(counts.repeated_items);
        state.take_outputs()
    }

    type Sender = EntrySender;

    fn sender(&self) -> EntrySender {
        EntrySender {
            ledger_topic: self.ledger_topic.clone(),
        }
    }

    fn worker_gauges(&self, _now_ms: i64) {
        self.books.publish();
    }

    fn gauges(&self, state: &PartitionState, now_ms: i64) {
        if state.clock_ms() > i64::MIN {
            let partition = state.partition.to_string();
            self.metrics
                .clock_lag
                .with_label_values(&[partition.as_str()])
                .set((now_ms - state.clock_ms()) / 1000);
        }
    }
}

/// Enqueues balance entries on the entries topic, and ticks back into the ledger's partition.
pub(crate) struct EntrySender {
    ledger_topic: String,
}

impl neruba_stage::Sender<Output> for EntrySender {
    fn send(&self, sink: &Sink<'_>, output: &Output) -> Result<DeliveryFuture, KafkaError> {
        match output {
            Output::Entry(entry) => {
                let key = entry.partition_key();
                let entry = crate::book::statements::on_the_topic(entry);
                sink.keyed(key.as_bytes(), &credit::encode(entry.as_ref()), &key)
            }
            Output::Tick {
                partition,
                at_ms,
                finalize_after_ms,
            } => {
                let headers = OwnedHeaders::new().insert(Header {
                    key: RECORD_HEADER,
                    value: Some("tick"),
                });
                let payload = credit::encode(&Tick {
                    v: 1,
                    at_ms: *at_ms,
                    finalize_after_ms: Some(*finalize_after_ms),
                });
                sink.producer()
                    .send_result(
                        FutureRecord::to(&self.ledger_topic)
                            .key("neruba-tick".as_bytes())
                            .payload(payload.as_slice())
                            .partition(*partition)
                            .headers(headers),
                    )
                    .map_err(|(e, _)| e)
            }
            // The runtime writes dead letters.
            Output::DeadLetter(_) => Err(KafkaError::Canceled),
        }
    }
}
