//! Kafka plumbing the pipeline stages share, so the aggregator, the rater and the gateway's
//! raw-topic ingest produce their outputs and dead letters the same way.
//!
//! Invariants:
//! - an output producer is idempotent with `acks=all`, and no pass-through option can turn
//!   either off: a stage writes its state only after [`await_all`] saw every acknowledgement;
//! - a dead letter carries its stable code, message, source topic and offset in the same
//!   headers whatever stage refused it;
//! - a producer librdkafka declared fatally failed (fenced by the broker after an outage, for
//!   one) is replaced rather than left failing every later send: see [`Recoverable`].

pub mod acks;
pub mod clients;
pub mod health;

pub use acks::{AckedProducer, Acks, Sends};
pub use clients::{apply_producer_options, output_producer, recoverable_output_producer};

use neruba_schemas::topics::{
    REJECT_CODE_HEADER, REJECT_MESSAGE_HEADER, SOURCE_OFFSET_HEADER, SOURCE_TOPIC_HEADER,
};
use rdkafka::ClientContext;
use rdkafka::client::Client;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, Producer};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Partitions of `topic`, from the broker's metadata, waiting up to 30 s for a topic the
/// broker is still creating. Blocking.
///
/// Then asks once more, so that an idempotent producer gets its producer id now. librdkafka
/// (2.12) starts a 500 ms timer for it when the producer is created, and tries at once after
/// each metadata answer; but the first answer retires the bootstrap connection it came
/// through, and the broker it names is not connected yet, so that try finds no broker and
/// waits for the timer. The second question connects to that broker first, and its answer's
/// try succeeds. Without it the producer's first delivery waits for the timer (502 ms measured
/// on the embedded broker, against 2–3 ms for the next): a once-a-start cost for a stage whose
/// first delivery comes sooner than that. If the second question fails, the timer still asks.
/// A producer built again after a fatal error ([`Recoverable`]) is not asked twice: it may
/// wait up to the timer once. Re-check on a librdkafka upgrade (the test below shows it).
pub fn partition_count(producer: &FutureProducer, topic: &str) -> Result<i32, KafkaError> {
    let count = topic_partitions(producer.client(), topic, Duration::from_secs(30))?;
    if let Err(e) = producer
        .client()
        .fetch_metadata(Some(topic), Duration::from_secs(1))
    {
        tracing::debug!(error = %e, "Second metadata question failed; the producer id comes later.");
    }
    Ok(count)
}

/// Partitions of `topic`, from the broker's metadata, asked again every half second until
/// `patience` is over while the broker does not answer, or reports an error for the topic (not
/// created yet, no leader yet) or no partitions; then that error. Never a guess: a stage that
/// routed by a wrong count would put customers' records on partitions their other records are
/// not on. Blocking.
pub fn topic_partitions<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    patience: Duration,
) -> Result<i32, KafkaError> {
    let deadline = Instant::now() + patience;
    loop {
        // Each question within what is left of the patience (at least a second); a broker
        // that does not answer in time is asked again like one that reports an error.
        let left = deadline.saturating_duration_since(Instant::now());
        let found = client
            .fetch_metadata(
                Some(topic),
                left.clamp(Duration::from_secs(1), Duration::from_secs(10)),
            )
            .and_then(|metadata| {
                let count = match metadata.topics().first() {
                    None => Err(RDKafkaErrorCode::UnknownTopicOrPartition),
                    Some(t) => match t.error() {
                        Some(e) => Err(RDKafkaErrorCode::from(e)),
                        None => i32::try_from(t.partitions().len())
                            .ok()
                            .filter(|n| *n > 0)
                            .ok_or(RDKafkaErrorCode::UnknownTopicOrPartition),
                    },
                };
                count.map_err(KafkaError::MetadataFetch)
            });
        match found {
            Ok(count) => return Ok(count),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// The headers of a dead letter read from `source_topic` at `offset`.
pub fn dead_letter_headers(
    code: &str,
    message: &str,
    source_topic: &str,
    offset: i64,
) -> OwnedHeaders {
    let offset = offset.to_string();
    OwnedHeaders::new()
        .insert(Header {
            key: REJECT_CODE_HEADER,
            value: Some(code),
        })
        .insert(Header {
            key: REJECT_MESSAGE_HEADER,
            value: Some(message),
        })
        .insert(Header {
            key: SOURCE_TOPIC_HEADER,
            value: Some(source_topic),
        })
        .insert(Header {
            key: SOURCE_OFFSET_HEADER,
            value: Some(offset.as_str()),
        })
}

/// Awaits every enqueued send; the first failure (to enqueue or to be acknowledged) wins.
pub async fn await_all(pending: Vec<Result<DeliveryFuture, KafkaError>>) -> Result<(), KafkaError> {
    await_each(pending)
        .await
        .into_iter()
        .try_for_each(|landed| landed.map(drop))
}

/// Where an acknowledged record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Landed {
    pub partition: i32,
    pub offset: i64,
}

/// Awaits every enqueued send; each one's outcome, in order: where it landed, or why not (a
/// producer dropped before acknowledging counts as [`KafkaError::Canceled`]).
///
/// Every send is enqueued before this is called, so the wait is the slowest acknowledgement's,
/// never the sum of them (no send waits for another's acknowledgement to be made). The sends
/// are then awaited in order, each `.await` sleeping only until the first one not yet
/// acknowledged is: librdkafka reports a produce request's messages together, so the waiting
/// task wakes about once per produce request. Joined instead (`join_all`), each send cost a
/// task, a wake and a queue entry: 8 % of the gateway's CPU in its profile.
pub async fn await_each(
    pending: Vec<Result<DeliveryFuture, KafkaError>>,
) -> Vec<Result<Landed, KafkaError>> {
    let mut landed = Vec::with_capacity(pending.len());
    for enqueued in pending {
        landed.push(match enqueued {
            Err(e) => Err(e),
            Ok(delivery) => match delivery.await {
                Ok(Ok(delivery)) => Ok(Landed {
                    partition: delivery.partition,
                    offset: delivery.offset,
                }),
                Ok(Err((e, _))) => Err(e),
                Err(_) => Err(KafkaError::Canceled),
            },
        });
    }
    landed
}

/// Whether the broker answers a metadata request for `topic` within `timeout` with the topic
/// and its partitions. Blocking; call from a blocking thread.
pub fn topic_answers<C: rdkafka::client::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    timeout: Duration,
) -> bool {
    client.fetch_metadata(Some(topic), timeout).is_ok_and(|m| {
        m.topics()
            .iter()
            .any(|t| t.error().is_none() && !t.partitions().is_empty())
    })
}

/// A producer [`Recoverable`] can replace: it tells whether two handles are one client, and
/// whether librdkafka declared the client fatally failed.
pub trait Replaceable: Clone + Send + Sync + 'static {
    /// Whether `self` and `other` are handles of one client.
    fn same_client(&self, other: &Self) -> bool;
    /// The fatal error librdkafka declared, if it did.
    fn fatal_error(&self) -> Option<(RDKafkaErrorCode, String)>;
}

impl Replaceable for FutureProducer {
    fn same_client(&self, other: &Self) -> bool {
        self.client().native_ptr() == other.client().native_ptr()
    }

    fn fatal_error(&self) -> Option<(RDKafkaErrorCode, String)> {
        self.client().fatal_error()
    }
}

impl Replaceable for AckedProducer {
    fn same_client(&self, other: &Self) -> bool {
        self.client().native_ptr() == other.client().native_ptr()
    }

    fn fatal_error(&self) -> Option<(RDKafkaErrorCode, String)> {
        self.client().fatal_error()
    }
}

type Build<P> = dyn Fn() -> Result<P, KafkaError> + Send + Sync;

/// A producer that can be replaced when librdkafka reports it fatally failed.
///
/// An idempotent producer whose requests timed out during a broker outage may be fenced when
/// the broker comes back; from then on librdkafka fails every send. A new producer (new
/// producer id) works again, so a stage asks for [`Recoverable::recover`] after a failure.
#[derive(Clone)]
pub struct Recoverable<P: Replaceable = FutureProducer> {
    current: Arc<RwLock<P>>,
    build: Arc<Build<P>>,
}

impl<P: Replaceable> std::fmt::Debug for Recoverable<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recoverable").finish_non_exhaustive()
    }
}

impl<P: Replaceable> Recoverable<P> {
    /// Builds the first producer with `build`, which also builds its replacements.
    pub fn new(
        build: impl Fn() -> Result<P, KafkaError> + Send + Sync + 'static,
    ) -> Result<Self, KafkaError> {
        let first = build()?;
        Ok(Self {
            current: Arc::new(RwLock::new(first)),
            build: Arc::new(build),
        })
    }

    /// The producer to send with now (a cheap handle).
    pub fn get(&self) -> P {
        match self.current.read() {
            Ok(producer) => producer.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// After `used` failed with `error`: replaces the current producer if it is `used` and
    /// either librdkafka declared it fatally failed or the broker no longer accepts its
    /// producer identity; whether it did. Concurrent callers replace it once.
    pub fn recover(&self, used: &P, error: &KafkaError) -> Result<bool, KafkaError> {
        let mut current = match self.current.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if !current.same_client(used) {
            return Ok(false);
        }
        let fatal = current.fatal_error();
        let identity_refused = matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::UnknownProducerId
                    | RDKafkaErrorCode::OutOfOrderSequenceNumber
                    | RDKafkaErrorCode::InvalidProducerIdMapping
            )
        );
        if fatal.is_none() && !identity_refused {
            return Ok(false);
        }
        *current = (self.build)()?;
        drop(current);
        tracing::warn!(%error, ?fatal, "Producer no longer usable; replaced it with a new one.");
        Ok(true)
    }
}

/// Sends a batch with `send` (unless `sent` is given: the batch as already sent once, with
/// the producer it was sent with, and what sending each output gave) and waits for every
/// acknowledgement; if any is missing, recovers the producer and sends the whole batch again,
/// with backoff (up to 5 s), until all are acknowledged. Gives up with the last error only
/// when `stop()` says so, in which case the caller must not record the batch as done.
/// Blocking. Returns how many attempts failed.
///
/// Sending the batch again may write some outputs twice; every output of the pipeline is
/// identified (rollup revision, line item id, dead letter source offset), so readers deduplicate.
pub fn deliver_until_acked(
    producer: &Recoverable,
    mut sent: Option<(FutureProducer, Vec<Result<DeliveryFuture, KafkaError>>)>,
    mut send: impl FnMut(&FutureProducer) -> Vec<Result<DeliveryFuture, KafkaError>>,
    stop: &dyn Fn() -> bool,
) -> Result<u32, KafkaError> {
    let mut failures = 0u32;
    loop {
        let (used, pending) = match sent.take() {
            Some(sent) => sent,
            None => {
                let used = producer.get();
                let pending = send(&used);
                (used, pending)
            }
        };
        let Err(e) = futures::executor::block_on(await_all(pending)) else {
            return Ok(failures);
        };
        failures += 1;
        if stop() {
            return Err(e);
        }
        tracing::warn!(error = %e, attempt = failures, "Outputs not acknowledged; sending the batch again.");
        if let Err(rebuild) = producer.recover(&used, &e) {
            tracing::error!(error = %rebuild, "Could not replace the failed producer.");
        }
        let backoff = Duration::from_millis(200u64 << failures.min(5)).min(Duration::from_secs(5));
        std::thread::sleep(backoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::DefaultProducerContext;
    use rdkafka::types::RDKafkaRespErr;

    /// A broker with a topic `ledger` of 3 partitions, and a consumer of it (a consumer does
    /// not ask the broker to create the topics it asks about).
    fn ledger_of_three()
    -> Result<(MockCluster<'static, DefaultProducerContext>, BaseConsumer), KafkaError> {
        let cluster = MockCluster::new(1)?;
        cluster.create_topic("ledger", 3, 1)?;
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "partition-count-test")
            .create()?;
        Ok((cluster, client))
    }

    #[test]
    fn a_broker_that_does_not_answer_is_asked_again_until_the_patience_is_over()
    -> Result<(), KafkaError> {
        // Was: a question the broker left unanswered for 10 s failed the call at once, so a
        // stage starting while the broker was away for longer gave up before its 30 s.
        let (cluster, client) = ledger_of_three()?;
        cluster.broker_round_trip_time(1, Duration::from_secs(12))?;
        let started = Instant::now();
        let slow = topic_partitions(client.client(), "ledger", Duration::from_secs(3));
        assert!(slow.is_err(), "{slow:?}");
        // The patience bounds the wait (it was 10 s, one unanswered question).
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "{:?}",
            started.elapsed()
        );
        // The broker answers again after 11 s, within a patience of 40 s.
        let asking = std::thread::spawn(move || {
            topic_partitions(client.client(), "ledger", Duration::from_secs(40))
        });
        std::thread::sleep(Duration::from_secs(11));
        cluster.broker_round_trip_time(1, Duration::ZERO)?;
        let count = asking.join().expect("the asking thread");
        assert_eq!(count?, 3);
        Ok(())
    }

    #[test]
    fn a_new_output_producer_delivers_its_first_record_without_waiting_for_its_id_timer()
    -> Result<(), Box<dyn std::error::Error>> {
        // Was: its first delivery waited 500 ms (502 ms measured on this broker, against 2 to
        // 3 ms for the next ones): after the first metadata answer librdkafka found no
        // connected broker to ask for the idempotent producer's id and waited for its 500 ms
        // retry timer (see `partition_count`). The timer is a floor: a producer that waits for
        // it cannot be acknowledged sooner, however loaded the machine.
        let (cluster, _client) = ledger_of_three()?;
        let created = Instant::now();
        let producer = clients::output_producer(&cluster.bootstrap_servers(), "test", 0, &[])?;
        assert_eq!(partition_count(&producer, "ledger")?, 3);
        let record = rdkafka::producer::FutureRecord::to("ledger")
            .key("k")
            .payload("v")
            .partition(0);
        let delivered = futures::executor::block_on(producer.send(record, Duration::from_secs(5)));
        assert!(delivered.is_ok(), "{delivered:?}");
        let took = created.elapsed();
        assert!(took < Duration::from_millis(500), "{took:?}");
        Ok(())
    }

    #[test]
    fn a_missing_topic_or_one_with_an_error_has_no_count() -> Result<(), KafkaError> {
        // Was: a missing topic, or one the broker was still creating, counted as one
        // partition, so a stage would have put every output on partition 0.
        let (cluster, client) = ledger_of_three()?;
        let patience = Duration::from_millis(600);
        assert_eq!(topic_partitions(client.client(), "ledger", patience)?, 3);
        let missing = topic_partitions(client.client(), "no-such-topic", patience);
        assert!(
            matches!(
                missing,
                Err(KafkaError::MetadataFetch(
                    RDKafkaErrorCode::UnknownTopicOrPartition
                ))
            ),
            "{missing:?}"
        );
        cluster.topic_error(
            "ledger",
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
        )?;
        let failing = topic_partitions(client.client(), "ledger", patience);
        assert!(
            matches!(
                failing,
                Err(KafkaError::MetadataFetch(
                    RDKafkaErrorCode::LeaderNotAvailable
                ))
            ),
            "{failing:?}"
        );
        Ok(())
    }
}
