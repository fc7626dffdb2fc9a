//! A producer whose acknowledgements are gathered per batch of sends, by librdkafka's delivery
//! callback, rather than one channel and one future per record.
//!
//! [`rdkafka::producer::FutureProducer`] makes a oneshot channel for each record, boxes its
//! sender as the record's delivery opaque, and gives back a future to await; a request of 500
//! events awaited 500 of them. [`AckedProducer`] boxes only where the record's outcome goes
//! (its batch and its index in it): the callback writes the outcome there, and the batch's one
//! waiter wakes when the last record of the batch is reported.
//!
//! Invariants:
//! - every record sent through [`Sends::send`] has exactly one outcome in [`Acks`]' answer, in
//!   the order of sending: where it landed, the error librdkafka reported, or the error the
//!   send was refused with;
//! - a record whose report never comes counts as [`KafkaError::Canceled`] rather than leaving
//!   its batch waiting: the outcome is written when its boxed place is dropped, reported or
//!   not; the batch keeps its producer alive until [`Acks`] is ready, so the producer is not
//!   destroyed (which serves outstanding reports only for up to 500 ms, then frees the rest
//!   unreported) while its records are awaited;
//! - [`Acks`] is ready only once every record sent has its outcome and no more can be sent.

use crate::Landed;
use futures::task::AtomicWaker;
use rdkafka::ClientContext;
use rdkafka::config::{ClientConfig, FromClientConfigAndContext};
use rdkafka::error::KafkaError;
use rdkafka::message::ToBytes;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

/// A producer's handle (cheap to clone) whose sends are acknowledged per batch:
/// [`AckedProducer::sends`]. Its settings are the caller's: Neruba builds it through
/// [`crate::clients::gateway_producer`], idempotent with `acks=all`.
#[derive(Clone)]
pub struct AckedProducer {
    inner: Arc<ThreadedProducer<Reporter>>,
}

impl std::fmt::Debug for AckedProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckedProducer").finish_non_exhaustive()
    }
}

impl AckedProducer {
    /// A producer with `config`'s settings.
    pub fn create(config: &ClientConfig) -> Result<Self, KafkaError> {
        Ok(Self {
            inner: Arc::new(ThreadedProducer::from_config_and_context(config, Reporter)?),
        })
    }

    /// A batch of sends, about `expected` of them, whose outcomes [`Sends::acks`] awaits.
    pub fn sends(&self, expected: usize) -> Sends {
        Sends {
            producer: self.clone(),
            batch: Arc::new(Batch {
                // The batch itself holds one until no more can be sent.
                unreported: AtomicUsize::new(1),
                waiter: AtomicWaker::new(),
            }),
            expected,
            chunks: Vec::new(),
            in_last: 0,
        }
    }

    /// The client, for metadata and errors.
    pub fn client(&self) -> &rdkafka::client::Client<Reporter> {
        self.inner.client()
    }

    /// Messages librdkafka holds that the broker has not acknowledged yet.
    pub fn in_flight_count(&self) -> i32 {
        self.inner.in_flight_count()
    }

    /// Waits for queued messages to be delivered, up to `timeout`.
    pub fn flush(&self, timeout: std::time::Duration) -> Result<(), KafkaError> {
        self.inner.flush(timeout)
    }
}

/// The delivery callback's context: writes each record's outcome to its place in its batch.
#[derive(Debug)]
pub struct Reporter;

impl ClientContext for Reporter {}

impl ProducerContext for Reporter {
    type DeliveryOpaque = Box<Place>;

    fn delivery(&self, report: &DeliveryResult<'_>, place: Box<Place>) {
        use rdkafka::Message;
        (*place).report(match report {
            Ok(message) => Ok(Landed {
                partition: message.partition(),
                offset: message.offset(),
            }),
            Err((error, _)) => Err(error.clone()),
        });
    }
}

/// How many of a batch's records are not reported yet, and who waits for them.
struct Batch {
    /// Records sent and not reported yet, plus one while [`Sends`] can still send.
    unreported: AtomicUsize,
    waiter: AtomicWaker,
}

impl Batch {
    /// One report (or the end of sending) less; the last one wakes the waiter.
    fn settle_one(&self) {
        if self.unreported.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.waiter.wake();
        }
    }
}

/// Outcomes of consecutive records of a batch, each written once, by its record's report.
/// Neither the sender nor a report ever waits for a lock: a batch that outgrows its chunk
/// gets another.
struct Chunk {
    outcomes: Box<[OnceLock<Result<Landed, KafkaError>>]>,
    batch: Arc<Batch>,
}

/// Where one record's outcome goes: its chunk and its index there. Dropped unreported, it
/// writes [`KafkaError::Canceled`].
pub struct Place {
    chunk: Arc<Chunk>,
    index: usize,
}

impl Place {
    fn report(self, outcome: Result<Landed, KafkaError>) {
        if let Some(slot) = self.chunk.outcomes.get(self.index) {
            // Set once: by this report, or else by the drop below.
            let _ = slot.set(outcome);
        }
    }
}

impl std::fmt::Debug for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Place").field("index", &self.index).finish()
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(slot) = self.chunk.outcomes.get(self.index) {
            let _ = slot.set(Err(KafkaError::Canceled));
        }
        self.chunk.batch.settle_one();
    }
}

/// A batch being sent ([`AckedProducer::sends`]).
#[must_use = "the acknowledgements say whether the records landed"]
pub struct Sends {
    producer: AckedProducer,
    batch: Arc<Batch>,
    /// The size of the first chunk.
    expected: usize,
    /// Filled in order; only the last has room.
    chunks: Vec<Arc<Chunk>>,
    /// Records sent into the last chunk.
    in_last: usize,
}

impl Sends {
    /// Enqueues `record` (its delivery opaque is its place in the batch); a record librdkafka
    /// refuses (queue full, too large) has that error as its outcome.
    pub fn send<K, P>(&mut self, record: BaseRecord<'_, K, P>)
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let chunk = match self.chunks.last() {
            Some(last) if self.in_last < last.outcomes.len() => Arc::clone(last),
            last => {
                // The first chunk as large as expected, each later one as all before it.
                let size = match last {
                    None => self.expected,
                    Some(_) => self.chunks.iter().map(|c| c.outcomes.len()).sum(),
                };
                let chunk = Arc::new(Chunk {
                    outcomes: (0..size.max(1)).map(|_| OnceLock::new()).collect(),
                    batch: Arc::clone(&self.batch),
                });
                self.chunks.push(Arc::clone(&chunk));
                self.in_last = 0;
                chunk
            }
        };
        let place = Box::new(Place {
            chunk,
            index: self.in_last,
        });
        self.in_last += 1;
        self.batch.unreported.fetch_add(1, Ordering::AcqRel);
        let record = BaseRecord {
            topic: record.topic,
            partition: record.partition,
            payload: record.payload,
            key: record.key,
            timestamp: record.timestamp,
            headers: record.headers,
            delivery_opaque: place,
        };
        if let Err((error, refused)) = self.producer.inner.send(record) {
            (*refused.delivery_opaque).report(Err(error));
        }
    }

    /// Every record's outcome, in the order sent, once all are reported.
    pub fn acks(mut self) -> Acks {
        Acks {
            batch: Arc::clone(&self.batch),
            chunks: std::mem::take(&mut self.chunks),
            in_last: self.in_last,
            _producer: self.producer.clone(),
        }
    }
}

impl std::fmt::Debug for Sends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sends").finish_non_exhaustive()
    }
}

impl Drop for Sends {
    fn drop(&mut self) {
        self.batch.settle_one();
    }
}

/// The outcomes of a batch's records, in the order sent ([`Sends::acks`]).
#[must_use = "futures do nothing unless awaited"]
pub struct Acks {
    batch: Arc<Batch>,
    chunks: Vec<Arc<Chunk>>,
    in_last: usize,
    /// Kept alive until the outcomes are read (see the module's invariants).
    _producer: AckedProducer,
}

impl std::fmt::Debug for Acks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acks").finish_non_exhaustive()
    }
}

impl Future for Acks {
    type Output = Vec<Result<Landed, KafkaError>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let batch = &self.batch;
        if batch.unreported.load(Ordering::Acquire) != 0 {
            batch.waiter.register(cx.waker());
            // A report between the load and the registration woke nobody: look again.
            if batch.unreported.load(Ordering::Acquire) != 0 {
                return Poll::Pending;
            }
        }
        let last = self.chunks.len().saturating_sub(1);
        let sent = self.chunks.iter().enumerate().flat_map(|(n, chunk)| {
            let used = if n == last {
                self.in_last
            } else {
                chunk.outcomes.len()
            };
            chunk.outcomes.iter().take(used)
        });
        Poll::Ready(
            sent.map(|slot| slot.get().cloned().unwrap_or(Err(KafkaError::Canceled)))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::DefaultProducerContext;
    use rdkafka::{Message, Offset, TopicPartitionList};
    use std::time::{Duration, Instant};

    fn producer(
        cluster: &MockCluster<'static, DefaultProducerContext>,
        settings: &[(&str, &str)],
    ) -> Result<AckedProducer, KafkaError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5");
        for (key, value) in settings {
            config.set(*key, *value);
        }
        AckedProducer::create(&config)
    }

    /// Every record of `topic`'s `partitions`, by (partition, offset): its payload.
    fn read_back(
        cluster: &MockCluster<'static, DefaultProducerContext>,
        topic: &str,
        partitions: i32,
        expected: usize,
    ) -> Result<std::collections::BTreeMap<(i32, i64), Vec<u8>>, KafkaError> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "acks-test")
            .create()?;
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partitions {
            assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        let mut read = std::collections::BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while read.len() < expected && Instant::now() < deadline {
            if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                let message = message?;
                read.insert(
                    (message.partition(), message.offset()),
                    message.payload().unwrap_or_default().to_vec(),
                );
            }
        }
        Ok(read)
    }

    #[tokio::test]
    async fn each_record_has_where_it_landed_in_the_order_sent() -> Result<(), KafkaError> {
        let cluster = MockCluster::new(1)?;
        cluster.create_topic("events", 3, 1)?;
        let producer = producer(&cluster, &[])?;
        // Two batches at once, their records interleaved over three partitions.
        let (mut first, mut second) = (producer.sends(4), producer.sends(4));
        for i in 0..30 {
            let payload = format!("record {i}");
            let record = BaseRecord::<(), _>::to("events")
                .payload(&payload)
                .partition(i % 3);
            if i % 2 == 0 {
                first.send(record);
            } else {
                second.send(record);
            }
        }
        let (first, second) = (first.acks(), second.acks());
        let (second, first) = (second.await, first.await);
        let mut landed = std::collections::BTreeMap::new();
        for (parity, outcomes) in [(0, first), (1, second)] {
            assert_eq!(outcomes.len(), 15);
            for (n, outcome) in outcomes.into_iter().enumerate() {
                let i = 2 * n + parity;
                let at = outcome?;
                assert_eq!(
                    at.partition,
                    i32::try_from(i % 3).unwrap_or(-1),
                    "record {i}"
                );
                landed.insert(
                    (at.partition, at.offset),
                    format!("record {i}").into_bytes(),
                );
            }
        }
        // Each partition's records sent one after another, at offsets 0..10.
        let offsets: Vec<(i32, i64)> = landed.keys().copied().collect();
        let expected: Vec<(i32, i64)> = (0..3).flat_map(|p| (0..10).map(move |o| (p, o))).collect();
        assert_eq!(offsets, expected);
        assert_eq!(read_back(&cluster, "events", 3, 30)?, landed);
        Ok(())
    }

    #[tokio::test]
    async fn a_record_refused_or_not_acknowledged_has_its_error_and_the_rest_land()
    -> Result<(), KafkaError> {
        let cluster = MockCluster::new(1)?;
        cluster.create_topic("events", 1, 1)?;
        let producer = producer(
            &cluster,
            &[
                ("message.max.bytes", "2000"),
                ("message.timeout.ms", "1500"),
            ],
        )?;
        let too_large = vec![b'x'; 4000];
        let mut sends = producer.sends(3);
        sends.send(BaseRecord::<(), _>::to("events").payload("before"));
        sends.send(BaseRecord::<(), _>::to("events").payload(&too_large));
        sends.send(BaseRecord::<(), _>::to("events").payload("after"));
        let outcomes = sends.acks().await;
        assert_eq!(outcomes.len(), 3);
        assert!(
            matches!(
                outcomes[0],
                Ok(Landed {
                    partition: 0,
                    offset: 0
                })
            ),
            "{outcomes:?}"
        );
        assert!(
            matches!(
                outcomes[1],
                Err(KafkaError::MessageProduction(
                    rdkafka::error::RDKafkaErrorCode::MessageSizeTooLarge
                ))
            ),
            "{outcomes:?}"
        );
        assert!(
            matches!(
                outcomes[2],
                Ok(Landed {
                    partition: 0,
                    offset: 1
                })
            ),
            "{outcomes:?}"
        );
        // A broker that is away: the record times out and says so, its batch does not hang.
        cluster.broker_down(1)?;
        let mut sends = producer.sends(1);
        sends.send(BaseRecord::<(), _>::to("events").payload("unanswered"));
        let outcomes = tokio::time::timeout(Duration::from_secs(20), sends.acks())
            .await
            .map_err(|_| KafkaError::Canceled)?;
        assert!(
            matches!(
                outcomes.as_slice(),
                [Err(KafkaError::MessageProduction(
                    rdkafka::error::RDKafkaErrorCode::MessageTimedOut
                ))]
            ),
            "{outcomes:?}"
        );
        Ok(())
    }

    #[test]
    fn a_place_dropped_unreported_is_canceled_and_the_batch_waits_for_every_place()
    -> Result<(), KafkaError> {
        // Never asked to send: no broker needed.
        let producer =
            AckedProducer::create(ClientConfig::new().set("bootstrap.servers", "127.0.0.1:1"))?;
        let batch = Arc::new(Batch {
            unreported: AtomicUsize::new(1),
            waiter: AtomicWaker::new(),
        });
        // Two chunks, the second with room left: what a batch that outgrew its first has.
        let chunk = |size: usize| {
            Arc::new(Chunk {
                outcomes: (0..size).map(|_| OnceLock::new()).collect(),
                batch: Arc::clone(&batch),
            })
        };
        let (first, second) = (chunk(1), chunk(2));
        let place = |chunk: &Arc<Chunk>| {
            batch.unreported.fetch_add(1, Ordering::AcqRel);
            Box::new(Place {
                chunk: Arc::clone(chunk),
                index: 0,
            })
        };
        let (reported, lost) = (place(&first), place(&second));
        let mut acks = Acks {
            batch: Arc::clone(&batch),
            chunks: vec![first, second],
            in_last: 1,
            _producer: producer,
        };
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let landed = Landed {
            partition: 2,
            offset: 7,
        };
        (*reported).report(Ok(landed));
        assert!(Pin::new(&mut acks).poll(&mut cx).is_pending());
        drop(lost);
        // Still sending: the batch's own hold.
        assert!(Pin::new(&mut acks).poll(&mut cx).is_pending());
        batch.settle_one();
        match Pin::new(&mut acks).poll(&mut cx) {
            Poll::Ready(outcomes) => {
                assert_eq!(outcomes.len(), 2);
                assert!(
                    matches!(outcomes[0], Ok(at) if at == landed),
                    "{outcomes:?}"
                );
                assert!(
                    matches!(outcomes[1], Err(KafkaError::Canceled)),
                    "{outcomes:?}"
                );
            }
            Poll::Pending => panic!("every place settled, the batch still waits"),
        }
        Ok(())
    }
}
