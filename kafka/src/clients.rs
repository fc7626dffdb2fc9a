//! Every Kafka client Neruba builds, with each setting it relies on spelled out here, so a
//! durability setting cannot differ between two producers or two consumers.
//!
//! The operator's pass-through options (`--kafka-opt`: SASL, TLS, tuning) are applied last,
//! except `acks` and `enable.idempotence`, which every producer refuses with the same message
//! ([`apply_producer_options`]).

use crate::{AckedProducer, Recoverable};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::time::{Duration, Instant};

/// Settings every Neruba producer relies on for durability: what it answers or writes after
/// an acknowledgement is in every in-sync replica (`acks=all`), once and in order
/// (`enable.idempotence`). An operator may not override them.
const DURABILITY: [&str; 2] = ["acks", "enable.idempotence"];

/// Applies an operator's pass-through librdkafka settings (SASL, TLS, tuning) to a producer's
/// config, last; refuses, with the same message for every producer, one that would weaken
/// durability.
pub fn apply_producer_options(
    client: &mut ClientConfig,
    kafka_options: &[(String, String)],
) -> Result<(), KafkaError> {
    for (key, value) in kafka_options {
        if DURABILITY.contains(&key.as_str()) {
            return Err(KafkaError::ClientCreation(format!(
                "kafka option `{key}={value}` is refused: Neruba's producers rely on acks=all and \
                 enable.idempotence=true for what they acknowledge"
            )));
        }
        client.set(key, value);
    }
    Ok(())
}

/// Creates a producer: the durability every Neruba producer relies on, then `tuning` (the
/// producer's own settings), then the operator's `kafka_options` ([`apply_producer_options`]).
fn durable_producer(
    brokers: &str,
    client_id: &str,
    tuning: &[(&str, String)],
    kafka_options: &[(String, String)],
) -> Result<FutureProducer, KafkaError> {
    durable_config(brokers, client_id, tuning, kafka_options)?.create()
}

/// [`durable_producer`]'s settings.
fn durable_config(
    brokers: &str,
    client_id: &str,
    tuning: &[(&str, String)],
    kafka_options: &[(String, String)],
) -> Result<ClientConfig, KafkaError> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", brokers)
        .set("client.id", client_id)
        // What a producer answers or writes after is in every in-sync replica.
        .set("acks", "all")
        // No duplicates or reordering from librdkafka's internal retries.
        .set("enable.idempotence", "true");
    for (key, value) in tuning {
        client.set(*key, value);
    }
    apply_producer_options(&mut client, kafka_options)?;
    Ok(client)
}

/// The producer a stage writes its outputs (rollups, line items, dead letters) with.
pub fn output_producer(
    brokers: &str,
    client_id: &str,
    linger_ms: u32,
    kafka_options: &[(String, String)],
) -> Result<FutureProducer, KafkaError> {
    durable_producer(
        brokers,
        client_id,
        &[
            ("linger.ms", linger_ms.to_string()),
            ("compression.type", "lz4".into()),
            ("message.timeout.ms", "60000".into()),
        ],
        kafka_options,
    )
}

/// The producer of one-off requests an operator sends (a rerun): sent at once and awaited.
pub fn request_producer(
    brokers: &str,
    client_id: &str,
    kafka_options: &[(String, String)],
) -> Result<FutureProducer, KafkaError> {
    durable_producer(brokers, client_id, &[], kafka_options)
}

/// The gateway's producer of accepted events: an event is answered `accepted` only after its
/// acknowledgement, so a produce that cannot be acknowledged within `delivery_timeout` fails
/// (the client gets a 503); events of concurrent requests are batched; a full local queue
/// fails the enqueue instead of growing memory.
pub fn gateway_producer(
    brokers: &str,
    delivery_timeout: std::time::Duration,
    kafka_options: &[(String, String)],
) -> Result<AckedProducer, KafkaError> {
    let config = durable_config(
        brokers,
        "neruba-ingest-gateway",
        &[
            ("max.in.flight.requests.per.connection", "5".into()),
            (
                "message.timeout.ms",
                delivery_timeout.as_millis().to_string(),
            ),
            ("linger.ms", "5".into()),
            ("batch.num.messages", "10000".into()),
            ("compression.type", "lz4".into()),
            ("queue.buffering.max.messages", "200000".into()),
            ("queue.buffering.max.kbytes", "262144".into()),
            ("partitioner", "murmur2_random".into()),
        ],
        kafka_options,
    )?;
    AckedProducer::create(&config)
}

/// The output producer of [`output_producer`], replaceable.
pub fn recoverable_output_producer(
    brokers: &str,
    client_id: &str,
    linger_ms: u32,
    kafka_options: &[(String, String)],
) -> Result<Recoverable, KafkaError> {
    let (brokers, client_id, options) = (
        brokers.to_owned(),
        client_id.to_owned(),
        kafka_options.to_vec(),
    );
    Recoverable::new(move || output_producer(&brokers, &client_id, linger_ms, &options))
}

/// Who a stateful stage's consumer is.
#[derive(Debug, Clone, Copy)]
pub struct StageMember<'a> {
    pub brokers: &'a str,
    pub group_id: &'a str,
    pub client_id: &'a str,
    /// Static membership (`group.instance.id`).
    pub instance_id: Option<&'a str>,
}

/// Creates the consumer of a stage that keeps its state per partition. Every librdkafka
/// setting such a stage relies on is here; `tuning` adds the stage's own, and the operator's
/// pass-through `kafka_options` come last; an `auto.offset.reset` other than earliest is
/// refused among them.
pub fn stage_consumer<C: ConsumerContext>(
    member: StageMember<'_>,
    tuning: &[(&str, &str)],
    kafka_options: &[(String, String)],
    context: C,
) -> Result<BaseConsumer<C>, KafkaError> {
    stage_consumer_config(member, tuning, kafka_options)?.create_with_context(context)
}

/// [`stage_consumer`]'s settings.
fn stage_consumer_config(
    member: StageMember<'_>,
    tuning: &[(&str, &str)],
    kafka_options: &[(String, String)],
) -> Result<ClientConfig, KafkaError> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", member.brokers)
        .set("group.id", member.group_id)
        .set("client.id", member.client_id)
        // Offsets live in RocksDB with the state; the group's offsets are only for lag graphs.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A partition whose stored offset is out of range (retention deleted it, or the topic
        // was recreated) resumes at the oldest record left (the runtime counts what was
        // deleted unread, and reports a log that went back): never past records it has not
        // read. (One without stored state is assigned at its beginning explicitly.)
        .set("auto.offset.reset", "earliest")
        // Eager rebalancing: a revoked partition's batch is written before anyone else reads it.
        .set("partition.assignment.strategy", "range")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        // When the local queue is full (the stage is the slower side, as it is under load),
        // librdkafka postpones the next fetch by this much: at its default of 1 s the queue
        // then runs dry and the stage waits (it halved the aggregator's throughput).
        .set("fetch.queue.backoff.ms", "10")
        // Statistics feed the lag gauges and the stuck check (partition high watermarks).
        .set("statistics.interval.ms", "1000");
    if let Some(instance) = member.instance_id {
        // Static membership: a restarted pod that is back within the session timeout gets its
        // partitions again without a rebalance, so the timeout covers a pod restart.
        client
            .set("group.instance.id", instance)
            .set("session.timeout.ms", "45000");
    }
    for (key, value) in tuning {
        client.set(*key, *value);
    }
    apply_consumer_options(
        &mut client,
        kafka_options,
        "a stage whose stored offset is out of range resumes at the oldest record left, never \
         past records it has not read",
    )?;
    Ok(client)
}

/// Adds the operator's pass-through options to a consumer's `client`, last; refuses an
/// `auto.offset.reset` other than earliest (librdkafka's other names for it are taken too),
/// saying `why` the consumer relies on it.
fn apply_consumer_options(
    client: &mut ClientConfig,
    kafka_options: &[(String, String)],
    why: &str,
) -> Result<(), KafkaError> {
    let earliest = ["earliest", "smallest", "beginning"];
    for (key, value) in kafka_options {
        if key == "auto.offset.reset" && !earliest.contains(&value.to_ascii_lowercase().as_str()) {
            return Err(KafkaError::ClientCreation(format!(
                "kafka option `{key}={value}` is refused: {why}"
            )));
        }
        client.set(key, value);
    }
    Ok(())
}

/// The consumer of the gateway's raw-topic ingest: a consumer group that commits each batch
/// only once its events were acknowledged on the events topic (no auto-commit).
/// The pass-through `kafka_options` come last; an `auto.offset.reset` other than earliest is
/// refused among them, as the stages refuse it.
pub fn raw_consumer<C: ConsumerContext + 'static>(
    brokers: &str,
    group_id: &str,
    kafka_options: &[(String, String)],
    context: C,
) -> Result<StreamConsumer<C>, KafkaError> {
    raw_consumer_config(brokers, group_id, kafka_options)?.create_with_context(context)
}

/// [`raw_consumer`]'s settings, or its refusal of an option (the gateway asks before it
/// starts its raw-topic task).
pub fn raw_consumer_config(
    brokers: &str,
    group_id: &str,
    kafka_options: &[(String, String)],
) -> Result<ClientConfig, KafkaError> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", brokers)
        .set("group.id", group_id)
        .set("client.id", "neruba-ingest-gateway-raw")
        .set("enable.auto.commit", "false")
        // A group without a committed offset (new, or its offset deleted by retention) starts
        // at the oldest record left: usage written before the gateway first read the topic is
        // ingested, never skipped.
        .set("auto.offset.reset", "earliest")
        // A full local queue postpones the next fetch by this much (librdkafka's default of
        // 1 s lets the queue run dry under load).
        .set("fetch.queue.backoff.ms", "10")
        // Statistics feed the lag gauges (partition high watermarks).
        .set("statistics.interval.ms", "1000");
    apply_consumer_options(
        &mut client,
        kafka_options,
        "the raw-topic consumer's group, without a committed offset or with one out of range, \
         starts at the oldest record left, never past usage it has not ingested",
    )?;
    Ok(client)
}

/// A client that only asks the broker for metadata (readiness probes).
pub fn metadata_probe(
    brokers: &str,
    kafka_options: &[(String, String)],
) -> Result<BaseConsumer, KafkaError> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", brokers)
        .set("client.id", "neruba-probe");
    for (key, value) in kafka_options {
        client.set(key, value);
    }
    client.create()
}

/// A client that reads another consumer group's committed offsets, and topics' high
/// watermarks, without taking part in the group: the api asks it how far the aggregators
/// have folded the events topic. It carries the group's id only because committed offsets
/// are asked of the group's coordinator under it; it never subscribes and is never assigned
/// a partition, so it never joins the group (its members are not rebalanced) and has nothing
/// to commit.
pub fn group_offsets_reader(
    brokers: &str,
    group_id: &str,
    kafka_options: &[(String, String)],
) -> Result<BaseConsumer, KafkaError> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", brokers)
        .set("client.id", "neruba-group-offsets")
        .set("group.id", group_id)
        // It consumes nothing; should anything ever be assigned, it must still never move
        // the group's committed offsets, which are the aggregators' word on what they folded.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    for (key, value) in kafka_options {
        client.set(key, value);
    }
    client.create()
}

/// A reader of a whole topic from its beginning, outside any consumer group's work (a tail
/// for operators, a check in the demo): every partition assigned at its first offset, nothing
/// committed. Blocking: it waits up to `timeout` for the topic's metadata.
pub fn topic_reader(
    brokers: &str,
    client_id: &str,
    topic: &str,
    kafka_options: &[(String, String)],
    timeout: Duration,
) -> Result<BaseConsumer, KafkaError> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", brokers)
        .set("client.id", client_id)
        // Required by librdkafka for a consumer; no offset is ever committed under it.
        .set("group.id", client_id)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    for (key, value) in kafka_options {
        client.set(key, value);
    }
    // Records deleted under the reader (retention) move it to the oldest left (those are not
    // read), never past what it has not read; set after the pass-through options, so that
    // none changes it.
    client.set("auto.offset.reset", "earliest");
    let consumer: BaseConsumer = client.create()?;
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let mut assignment = TopicPartitionList::new();
    for t in metadata.topics() {
        if let Some(e) = t.error() {
            return Err(KafkaError::MetadataFetch(e.into()));
        }
        for p in t.partitions() {
            assignment.add_partition_offset(topic, p.id(), Offset::Beginning)?;
        }
    }
    consumer.assign(&assignment)?;
    Ok(consumer)
}

/// Where each partition of a topic ended when a reader from the beginning started: what it
/// must read before it has seen everything the topic held then. A tail that stops once idle
/// counts idle time only from there, so a slow first fetch cannot end it before it printed
/// what was already written.
#[derive(Debug, Clone)]
pub struct TopicEnds {
    topic: String,
    /// `(partition, high watermark)` of the partitions not yet read to their end.
    pending: Vec<(i32, i64)>,
    /// When the pending partitions' oldest offsets were last asked for.
    refreshed: Option<Instant>,
    /// How long the broker has to answer for them: as long as for the high watermarks at
    /// the start ([`Self::fetch`]'s `timeout`).
    timeout: Duration,
}

impl TopicEnds {
    /// How long past its idle time a tail waits for partitions that do not reach their end
    /// (their broker unreachable) before it gives up with an error.
    pub const PATIENCE: Duration = Duration::from_secs(30);

    /// The high watermarks of the partitions of `topic` that `consumer` is assigned, fetched
    /// now. Blocking.
    pub fn fetch(
        consumer: &BaseConsumer,
        topic: &str,
        timeout: Duration,
    ) -> Result<Self, KafkaError> {
        let assignment = consumer.assignment()?;
        let mut pending = Vec::new();
        for element in assignment.elements_for_topic(topic) {
            let (low, high) = consumer.fetch_watermarks(topic, element.partition(), timeout)?;
            if high > low {
                pending.push((element.partition(), high));
            }
        }
        Ok(Self {
            topic: topic.to_owned(),
            pending,
            refreshed: None,
            timeout,
        })
    }

    /// Whether `consumer` has read every partition up to its end as fetched (its positions
    /// tell; an unreadable position counts as not there yet). A partition whose records up to
    /// that end were all deleted meanwhile (retention) counts as read: every 2 s the pending
    /// partitions' oldest offsets are asked for again, all in one question (one request per
    /// broker), with the timeout the ends were fetched with, if `ask`. Blocking for that
    /// question.
    ///
    /// Not a shorter timeout: the question goes over the consumer's own connection, and
    /// librdkafka closes a connection on which a request timed out (`socket.max.fails`), with
    /// the consumer's fetches in flight. Asked with 1 s, a broker slower than that to answer
    /// lost the tail its connection every 2 s, and a partition could stay unread until the
    /// tail gave up.
    pub fn reached(&mut self, consumer: &BaseConsumer, ask: bool) -> bool {
        if self.pending.is_empty() {
            return true;
        }
        let Ok(positions) = consumer.position() else {
            return false;
        };
        let topic = &self.topic;
        self.pending.retain(|(partition, end)| {
            !matches!(
                positions.find_partition(topic, *partition).map(|e| e.offset()),
                Some(Offset::Offset(at)) if at >= *end
            )
        });
        if ask
            && !self.pending.is_empty()
            && self
                .refreshed
                .is_none_or(|at| at.elapsed() >= Duration::from_secs(2))
        {
            // Not a time: the earliest offset (`ListOffsets` with timestamp -2).
            let asked_for = self.pending.iter().try_fold(
                TopicPartitionList::new(),
                |mut list, (partition, _)| {
                    list.add_partition_offset(topic, *partition, Offset::Beginning)
                        .map(|()| list)
                },
            );
            // An unreachable broker leaves every partition pending until the patience is over.
            if let Ok(oldest) =
                asked_for.and_then(|list| consumer.offsets_for_times(list, self.timeout))
            {
                self.pending.retain(|(partition, end)| {
                    !matches!(
                        oldest.find_partition(topic, *partition).map(|e| e.offset()),
                        Some(Offset::Offset(low)) if low >= *end
                    )
                });
            }
            self.refreshed = Some(Instant::now());
        }
        self.pending.is_empty()
    }

    /// For a reader that stops once idle: `Ok(true)` once nothing arrived since `last` for
    /// `idle` and each consumer has read its topic to where it ended at the start; `Ok(false)`
    /// while not; an error naming the partitions still short `patience` after that (tails
    /// give [`Self::PATIENCE`]). Blocking.
    pub fn idle_done(
        idle: Duration,
        patience: Duration,
        last: Instant,
        readers: &mut [(&BaseConsumer, &mut TopicEnds)],
    ) -> Result<bool, String> {
        if last.elapsed() < idle {
            return Ok(false);
        }
        // Once the patience is over, the readers are judged by their positions alone: a call
        // that asked the broker, which may take up to its timeout while records arrive unpolled,
        // never judges (and with more than one reader, each asking in turn, some call must not
        // ask, or an unreachable broker would keep the tail waiting for good).
        let judging = last.elapsed() >= idle + patience;
        let mut done = true;
        for (consumer, ends) in readers.iter_mut() {
            done &= ends.reached(consumer, !judging);
        }
        if done {
            return Ok(true);
        }
        if !judging {
            return Ok(false);
        }
        let short: Vec<String> = readers
            .iter()
            .flat_map(|(_, ends)| {
                ends.pending.iter().map(|(partition, end)| {
                    format!(
                        "`{}` partition {partition} (offsets below {end})",
                        ends.topic
                    )
                })
            })
            .collect();
        Err(format!(
            "nothing arrived for {} s, yet {} not read to where it ended when reading started",
            last.elapsed().as_secs(),
            short.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    /// Pass-through options as the command line gives them.
    fn options(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_stage_consumer_takes_the_operators_options_but_never_starts_past_the_oldest_record()
    -> Result<(), KafkaError> {
        // Was: with `--kafka-opt auto.offset.reset=latest`, a stage whose stored offset was
        // out of range (deleted by retention, or a recreated topic) resumed at the end of the
        // log, past every record left.
        let member = StageMember {
            brokers: "127.0.0.1:9092",
            group_id: "g",
            client_id: "c",
            instance_id: None,
        };
        let tuning = [("fetch.wait.max.ms", "20")];
        let refused = stage_consumer_config(
            member,
            &tuning,
            &options(&[("fetch.wait.max.ms", "7"), ("auto.offset.reset", "latest")]),
        );
        assert!(
            matches!(&refused, Err(KafkaError::ClientCreation(m))
                if m.contains("kafka option `auto.offset.reset=latest` is refused")),
            "{refused:?}"
        );
        let config = stage_consumer_config(
            member,
            &tuning,
            &options(&[
                ("fetch.wait.max.ms", "7"),
                ("auto.offset.reset", "earliest"),
            ]),
        )?;
        assert_eq!(config.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(config.get("fetch.wait.max.ms"), Some("7"));
        // librdkafka's other name for it.
        let config = stage_consumer_config(
            member,
            &tuning,
            &options(&[("auto.offset.reset", "smallest")]),
        )?;
        assert_eq!(config.get("auto.offset.reset"), Some("smallest"));
        let config = stage_consumer_config(member, &tuning, &[])?;
        assert_eq!(config.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(config.get("fetch.wait.max.ms"), Some("20"));
        Ok(())
    }

    #[test]
    fn the_raw_topic_consumer_never_starts_past_usage_it_has_not_ingested() -> Result<(), KafkaError>
    {
        // Was: `--kafka-opt auto.offset.reset=latest` passed through, so a gateway whose raw
        // group had no committed offset yet (or one deleted by retention) started at the end
        // of the topic, and the usage producers had written before it was never ingested.
        let refused = raw_consumer_config(
            "127.0.0.1:9092",
            "g",
            &options(&[("auto.offset.reset", "latest")]),
        );
        assert!(
            matches!(&refused, Err(KafkaError::ClientCreation(m))
                if m.contains("kafka option `auto.offset.reset=latest` is refused: the raw-topic")),
            "{refused:?}"
        );
        let config = raw_consumer_config(
            "127.0.0.1:9092",
            "g",
            &options(&[
                ("fetch.wait.max.ms", "7"),
                ("auto.offset.reset", "beginning"),
            ]),
        )?;
        assert_eq!(config.get("auto.offset.reset"), Some("beginning"));
        assert_eq!(config.get("fetch.wait.max.ms"), Some("7"));
        let config = raw_consumer_config("127.0.0.1:9092", "g", &[])?;
        assert_eq!(config.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(config.get("enable.auto.commit"), Some("false"));
        // librdkafka reads the value in any case; every name of the end, and `error` (stop
        // rather than reset), is refused.
        assert!(
            raw_consumer_config("b", "g", &options(&[("auto.offset.reset", "EARLIEST")])).is_ok()
        );
        for value in ["End", "largest", "LATEST", "error"] {
            let refused = raw_consumer_config("b", "g", &options(&[("auto.offset.reset", value)]));
            assert!(refused.is_err(), "{value}: {refused:?}");
        }
        Ok(())
    }

    #[test]
    fn a_reader_is_done_once_it_read_what_was_there_and_fails_on_what_it_cannot_read()
    -> Result<(), KafkaError> {
        let cluster = MockCluster::new(1)?;
        cluster.create_topic("ends", 2, 1)?;
        let bootstrap = cluster.bootstrap_servers();
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()?;
        producer
            .send(BaseRecord::to("ends").partition(0).key("k").payload("x"))
            .map_err(|(e, _)| e)?;
        producer.flush(Duration::from_secs(5))?;
        let timeout = Duration::from_secs(5);
        let (idle, patience) = (Duration::from_millis(100), Duration::from_secs(60));
        let idle_since = || Instant::now().checked_sub(Duration::from_secs(1));
        let last = idle_since().expect("a second after the clock's start");

        // Idle, but partition 0's record not read yet: not done, and within the patience.
        let reader = topic_reader(&bootstrap, "ends-test", "ends", &[], timeout)?;
        let mut ends = TopicEnds::fetch(&reader, "ends", timeout)?;
        assert_eq!(
            TopicEnds::idle_done(idle, patience, last, &mut [(&reader, &mut ends)]),
            Ok(false)
        );
        // Read: done (partition 1 was empty when reading started).
        let deadline = Instant::now() + timeout;
        while reader.poll(Duration::from_millis(100)).is_none() {
            assert!(Instant::now() < deadline, "the record never came");
        }
        assert_eq!(
            TopicEnds::idle_done(idle, patience, last, &mut [(&reader, &mut ends)]),
            Ok(true)
        );

        // A partition its reader cannot reach (the broker went down): an error naming it once
        // the patience is over, not a tail that ends as if it had read everything.
        let cut_off = topic_reader(&bootstrap, "ends-test", "ends", &[], timeout)?;
        let mut ends = TopicEnds::fetch(&cut_off, "ends", timeout)?;
        let other = topic_reader(&bootstrap, "ends-test-2", "ends", &[], timeout)?;
        let mut other_ends = TopicEnds::fetch(&other, "ends", timeout)?;
        cluster.broker_down(1)?;
        let failed = TopicEnds::idle_done(idle, Duration::ZERO, last, &mut [(&cut_off, &mut ends)]);
        assert!(
            failed
                .as_ref()
                .is_err_and(|e| e.contains("`ends` partition 0 (offsets below 1)")),
            "{failed:?}"
        );
        // Two readers of a broker that answers too slowly, each question taking its timeout:
        // the tail still gives up once the patience is over. (Was, in review: a call that
        // asked was never judged, and with two readers every call asked, so it waited for
        // good.)
        cluster.broker_up(1)?;
        cluster.broker_round_trip_time(1, Duration::from_secs(10))?;
        let (started, patience) = (Instant::now(), Duration::from_secs(1));
        let failed = loop {
            let last = started;
            let readers = &mut [(&cut_off, &mut ends), (&other, &mut other_ends)];
            match TopicEnds::idle_done(idle, patience, last, readers) {
                Ok(false) => {
                    assert!(started.elapsed() < Duration::from_secs(60), "never gave up");
                    std::thread::sleep(Duration::from_millis(100));
                }
                judged => break judged,
            }
        };
        assert!(
            failed.as_ref().is_err_and(|e| e.contains("partition 0")),
            "{failed:?}"
        );
        Ok(())
    }

    fn refusal(options: &[(&str, &str)]) -> Option<String> {
        let options: Vec<(String, String)> = options
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        match output_producer("127.0.0.1:1", "test", 0, &options) {
            Ok(_) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    #[test]
    fn durability_overrides_are_refused_and_other_options_pass_through() {
        // Was: silently dropped here, refused by the gateway, applied by the rerun producer.
        let acks = refusal(&[("linger.ms", "7"), ("acks", "1")]);
        assert!(
            acks.as_deref().is_some_and(|m| m.contains(
                "kafka option `acks=1` is refused: Neruba's producers rely on acks=all and \
                 enable.idempotence=true"
            )),
            "{acks:?}"
        );
        let idempotence = refusal(&[("enable.idempotence", "false")]);
        assert!(
            idempotence
                .as_deref()
                .is_some_and(|m| m.contains("kafka option `enable.idempotence=false` is refused")),
            "{idempotence:?}"
        );
        assert_eq!(refusal(&[("linger.ms", "7"), ("client.rack", "a")]), None);
    }
}
