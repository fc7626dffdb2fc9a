//! A consuming stage's progress: consumer lag per partition (messages and seconds) and the
//! size of its per-partition state store for Prometheus, and what its `/readyz` answers.
//!
//! Ready means: the broker answers metadata requests, the state store has not failed, and no
//! partition is stuck — behind its high watermark while its position has not moved for
//! `stuck_after`.

use prometheus::{IntGaugeVec, Opts, Registry};
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy)]
struct Progress {
    /// Next offset to process.
    position: i64,
    moved_at: Instant,
    /// Kafka timestamp of the last message processed.
    last_timestamp_ms: Option<i64>,
}

/// Lag gauges and readiness of one consuming stage (`consumer` labels its series).
#[derive(Debug)]
pub struct ConsumerHealth {
    consumer: &'static str,
    topic: String,
    stuck_after: Duration,
    broker_reachable: AtomicBool,
    store_failure: Mutex<Option<String>>,
    high_offsets: Mutex<HashMap<i32, i64>>,
    /// The partitions' log start offsets: a position below it (nothing applied, the older
    /// messages gone to retention) is at it.
    low_offsets: Mutex<HashMap<i32, i64>>,
    /// Per client (a worker's consumer): bytes fetched ahead (librdkafka's statistics).
    fetched_ahead: Mutex<HashMap<String, u64>>,
    partitions: Mutex<HashMap<i32, Progress>>,
    lag_messages: IntGaugeVec,
    lag_seconds: IntGaugeVec,
    store_size: IntGaugeVec,
    store_pending_compaction: IntGaugeVec,
    store_memory: IntGaugeVec,
    block_cache: IntGaugeVec,
    fetch_queue: IntGaugeVec,
    reachable: IntGaugeVec,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl ConsumerHealth {
    /// Registers `neruba_consumer_lag_messages` and `neruba_consumer_lag_seconds`, labelled
    /// `consumer` (this stage) and `partition` (of `topic`).
    pub fn new(
        consumer: &'static str,
        topic: &str,
        stuck_after: Duration,
        registry: &Registry,
    ) -> prometheus::Result<Arc<Self>> {
        let lag_messages = IntGaugeVec::new(
            Opts::new(
                "neruba_consumer_lag_messages",
                "Messages behind the partition's high watermark.",
            ),
            &["consumer", "partition"],
        )?;
        let lag_seconds = IntGaugeVec::new(
            Opts::new(
                "neruba_consumer_lag_seconds",
                "While behind: age of the last processed message (0 when caught up).",
            ),
            &["consumer", "partition"],
        )?;
        let store_size = IntGaugeVec::new(
            Opts::new(
                "neruba_rocksdb_size_bytes",
                "SST files plus memtables of the partition's state, bytes.",
            ),
            &["consumer", "partition"],
        )?;
        let store_pending_compaction = IntGaugeVec::new(
            Opts::new(
                "neruba_rocksdb_pending_compaction_bytes",
                "RocksDB's estimate of bytes awaiting compaction in the partition's state.",
            ),
            &["consumer", "partition"],
        )?;
        let store_memory = IntGaugeVec::new(
            Opts::new(
                "neruba_rocksdb_memory_bytes",
                "Memory of the partition's state outside the block cache, by kind: `memtables` \
                 (written, not yet flushed; bounded by the write buffers) and `table_readers` \
                 (index and filter blocks held beside the cache; 0 with --index-in-cache).",
            ),
            &["consumer", "partition", "kind"],
        )?;
        let block_cache = IntGaugeVec::new(
            Opts::new(
                "neruba_rocksdb_block_cache_bytes",
                "The stage's block cache (one per process, shared by its partitions): `used`, \
                 and of it `pinned` (blocks in use that cannot be evicted).",
            ),
            &["consumer", "kind"],
        )?;
        let fetch_queue = IntGaugeVec::new(
            Opts::new(
                "neruba_consumer_fetch_queue_bytes",
                "Messages fetched ahead and not yet consumed, bytes (librdkafka's prefetch \
                 queue, up to the stage's `queued.max.messages.kbytes`; it fills while the \
                 stage is behind).",
            ),
            &["consumer"],
        )?;
        registry.register(Box::new(lag_messages.clone()))?;
        registry.register(Box::new(lag_seconds.clone()))?;
        registry.register(Box::new(store_size.clone()))?;
        registry.register(Box::new(store_pending_compaction.clone()))?;
        registry.register(Box::new(store_memory.clone()))?;
        registry.register(Box::new(block_cache.clone()))?;
        let reachable = IntGaugeVec::new(
            Opts::new(
                "neruba_consumer_broker_reachable",
                "1 while the stage's broker answers its metadata probe (every second), 0 while \
                 it does not (the stage is then not ready and reads nothing); no series before \
                 the first probe.",
            ),
            &["consumer"],
        )?;
        registry.register(Box::new(fetch_queue.clone()))?;
        // Its series starts at the broker probe's first answer: a consumer without the probe
        // (the gateway's raw-topic ingest, whose process has its own gauge) has none.
        registry.register(Box::new(reachable.clone()))?;
        Ok(Arc::new(Self {
            consumer,
            topic: topic.to_owned(),
            stuck_after,
            broker_reachable: AtomicBool::new(true),
            store_failure: Mutex::new(None),
            high_offsets: Mutex::new(HashMap::new()),
            low_offsets: Mutex::new(HashMap::new()),
            fetched_ahead: Mutex::new(HashMap::new()),
            partitions: Mutex::new(HashMap::new()),
            lag_messages,
            lag_seconds,
            store_size,
            store_pending_compaction,
            store_memory,
            block_cache,
            fetch_queue,
            reachable,
        }))
    }

    /// Takes the high watermarks of the topic's partitions from librdkafka's statistics
    /// (call from the consumer context's `stats`).
    pub fn record_statistics(&self, statistics: &rdkafka::Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        for (partition, stats) in &topic.partitions {
            if *partition >= 0 && stats.hi_offset >= 0 {
                self.record_high_offset(*partition, stats.hi_offset);
            }
            if *partition >= 0 && stats.lo_offset >= 0 {
                lock(&self.low_offsets).insert(*partition, stats.lo_offset);
            }
        }
        // Every partition a client fetches forwards to the client's one queue, so each reports
        // that whole queue: one reading per client (a process's workers share these gauges).
        let queue = topic
            .partitions
            .iter()
            .filter(|(partition, stats)| **partition >= 0 && stats.fetch_state == "active")
            .map(|(_, stats)| stats.fetchq_size)
            .max()
            .unwrap_or(0);
        let mut fetched_ahead = lock(&self.fetched_ahead);
        fetched_ahead.insert(statistics.name.clone(), queue);
        let ahead: u64 = fetched_ahead.values().sum();
        drop(fetched_ahead);
        self.fetch_queue
            .with_label_values(&[self.consumer])
            .set(i64::try_from(ahead).unwrap_or(i64::MAX));
    }

    /// The partition's high watermark (offset of the next message the broker will append).
    pub fn record_high_offset(&self, partition: i32, high: i64) {
        lock(&self.high_offsets).insert(partition, high);
    }

    /// The partition's position (next offset to process) and the Kafka timestamp of the last
    /// message processed; updates the gauges and the stuck detection.
    pub fn observe(&self, partition: i32, position: i64, last_timestamp_ms: Option<i64>) {
        let now = Instant::now();
        let mut partitions = lock(&self.partitions);
        let progress = partitions.entry(partition).or_insert(Progress {
            position,
            moved_at: now,
            last_timestamp_ms,
        });
        if progress.position != position {
            progress.position = position;
            progress.moved_at = now;
        }
        if last_timestamp_ms.is_some() {
            progress.last_timestamp_ms = last_timestamp_ms;
        }
        let progress = *progress;
        drop(partitions);
        let Some(lag) = self.lag(partition, position) else {
            return;
        };
        let label = partition.to_string();
        let labels = [self.consumer, label.as_str()];
        self.lag_messages.with_label_values(&labels).set(lag);
        let seconds = match progress.last_timestamp_ms {
            Some(at) if lag > 0 => (neruba_schemas::event::now_ms() - at).max(0) / 1000,
            _ => 0,
        };
        self.lag_seconds.with_label_values(&labels).set(seconds);
    }

    fn lag(&self, partition: i32, position: i64) -> Option<i64> {
        let low = lock(&self.low_offsets)
            .get(&partition)
            .copied()
            .unwrap_or(0);
        lock(&self.high_offsets)
            .get(&partition)
            .map(|high| (high - position.max(low)).max(0))
    }

    /// The partition's state store: bytes on disk and in memtables, bytes awaiting compaction.
    pub fn observe_store(&self, partition: i32, size: u64, pending_compaction: u64) {
        let label = partition.to_string();
        let labels = [self.consumer, label.as_str()];
        let gauge = |bytes: u64| i64::try_from(bytes).unwrap_or(i64::MAX);
        self.store_size.with_label_values(&labels).set(gauge(size));
        self.store_pending_compaction
            .with_label_values(&labels)
            .set(gauge(pending_compaction));
    }

    /// Memory of the partition's state outside the block cache: its memtables and its table
    /// readers (index and filter blocks), bytes.
    pub fn observe_store_memory(&self, partition: i32, memtables: u64, table_readers: u64) {
        let label = partition.to_string();
        for (kind, bytes) in [("memtables", memtables), ("table_readers", table_readers)] {
            self.store_memory
                .with_label_values(&[self.consumer, label.as_str(), kind])
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    /// The block cache's usage and, of it, what is pinned, bytes.
    pub fn observe_block_cache(&self, used: usize, pinned: usize) {
        for (kind, bytes) in [("used", used), ("pinned", pinned)] {
            self.block_cache
                .with_label_values(&[self.consumer, kind])
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    /// The partition moved to another instance.
    pub fn forget(&self, partition: i32) {
        lock(&self.partitions).remove(&partition);
        let label = partition.to_string();
        for gauge in [
            &self.lag_messages,
            &self.lag_seconds,
            &self.store_size,
            &self.store_pending_compaction,
        ] {
            let _ = gauge.remove_label_values(&[self.consumer, label.as_str()]);
        }
        for kind in ["memtables", "table_readers"] {
            let _ = self
                .store_memory
                .remove_label_values(&[self.consumer, label.as_str(), kind]);
        }
    }

    /// The state store failed; the stage is not ready until it restarts.
    pub fn store_failed(&self, reason: &str) {
        *lock(&self.store_failure) = Some(reason.to_owned());
    }

    pub fn set_broker_reachable(&self, reachable: bool) {
        let was = self.broker_reachable.swap(reachable, Ordering::Relaxed);
        self.reachable
            .with_label_values(&[self.consumer])
            .set(i64::from(reachable));
        if was != reachable {
            tracing::info!(
                consumer = self.consumer,
                reachable,
                "Broker reachability changed."
            );
        }
    }

    /// Whether every partition observed is at its high watermark (and one was observed): the
    /// stage has read everything the broker had.
    pub fn caught_up(&self) -> bool {
        let partitions: Vec<(i32, i64)> = lock(&self.partitions)
            .iter()
            .map(|(p, progress)| (*p, progress.position))
            .collect();
        !partitions.is_empty()
            && partitions
                .into_iter()
                .all(|(partition, position)| self.lag(partition, position) == Some(0))
    }

    /// `Ok` when ready, else why not.
    pub fn check(&self) -> Result<(), String> {
        if !self.broker_reachable.load(Ordering::Relaxed) {
            return Err("broker unreachable".to_owned());
        }
        if let Some(reason) = lock(&self.store_failure).as_ref() {
            return Err(format!("state store failed: {reason}"));
        }
        let partitions: Vec<(i32, Progress)> = lock(&self.partitions)
            .iter()
            .map(|(p, progress)| (*p, *progress))
            .collect();
        for (partition, progress) in partitions {
            let behind = self.lag(partition, progress.position).unwrap_or(0);
            let still = progress.moved_at.elapsed();
            if behind > 0 && still >= self.stuck_after {
                return Err(format!(
                    "partition {partition} is {behind} messages behind and has not moved for {}s",
                    still.as_secs()
                ));
            }
        }
        Ok(())
    }

    /// Probes the broker (a metadata request for the topic, every second) until `shutdown`.
    pub fn spawn_broker_probe(
        self: &Arc<Self>,
        brokers: &str,
        kafka_options: &[(String, String)],
        shutdown: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>, rdkafka::error::KafkaError> {
        let probe: Arc<BaseConsumer> =
            Arc::new(crate::clients::metadata_probe(brokers, kafka_options)?);
        let health = self.clone();
        Ok(tokio::spawn(async move {
            loop {
                let (probe, topic) = (probe.clone(), health.topic.clone());
                let up = tokio::task::spawn_blocking(move || {
                    crate::topic_answers(probe.client(), &topic, Duration::from_secs(2))
                })
                .await
                .unwrap_or(false);
                health.set_broker_reachable(up);
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge(registry: &Registry, name: &str, partition: &str) -> Option<i64> {
        labelled(registry, name, &[("partition", partition)])
    }

    /// The value of the gauge `name` whose labels include every one of `labels`.
    fn labelled(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> Option<i64> {
        registry
            .gather()
            .iter()
            .find(|f| f.name() == name)?
            .get_metric()
            .iter()
            .find(|m| {
                labels.iter().all(|(name, value)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *name && l.value() == *value)
                })
            })
            .map(|m| m.get_gauge().get_value() as i64)
    }

    #[test]
    fn a_partition_behind_whose_position_does_not_move_makes_it_unready() {
        let registry = Registry::new();
        // Stuck after 1 s: far longer than a loaded machine stalls between two statements.
        let health = ConsumerHealth::new("aggregator", "t", Duration::from_secs(1), &registry)
            .expect("register");
        health.record_high_offset(0, 100);
        health.record_high_offset(1, 50);
        health.observe(0, 40, Some(neruba_schemas::event::now_ms() - 7_000));
        health.observe(1, 50, None);
        assert_eq!(
            gauge(&registry, "neruba_consumer_lag_messages", "0"),
            Some(60)
        );
        assert_eq!(
            gauge(&registry, "neruba_consumer_lag_messages", "1"),
            Some(0)
        );
        assert_eq!(
            gauge(&registry, "neruba_consumer_lag_seconds", "0"),
            Some(7)
        );
        assert_eq!(
            gauge(&registry, "neruba_consumer_lag_seconds", "1"),
            Some(0)
        );
        // Behind, but it just moved: ready.
        assert_eq!(health.check(), Ok(()));
        std::thread::sleep(Duration::from_millis(1100));
        health.observe(0, 40, None);
        let reason = health.check().expect_err("stuck");
        assert!(
            reason.starts_with("partition 0 is 60 messages behind"),
            "{reason}"
        );
        // It moves again: ready again.
        health.observe(0, 41, None);
        assert_eq!(health.check(), Ok(()));
        // Caught up and still: not stuck.
        health.observe(0, 100, None);
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(health.check(), Ok(()));
        health.observe_store(1, 4096, 512);
        assert_eq!(
            gauge(&registry, "neruba_rocksdb_size_bytes", "1"),
            Some(4096)
        );
        assert_eq!(
            gauge(&registry, "neruba_rocksdb_pending_compaction_bytes", "1"),
            Some(512)
        );
        health.observe_store_memory(1, 8192, 1024);
        health.observe_block_cache(65_536, 4096);
        let memory = |kind| {
            labelled(
                &registry,
                "neruba_rocksdb_memory_bytes",
                &[("partition", "1"), ("kind", kind)],
            )
        };
        assert_eq!(
            (memory("memtables"), memory("table_readers")),
            (Some(8192), Some(1024))
        );
        let cache = |kind| {
            labelled(
                &registry,
                "neruba_rocksdb_block_cache_bytes",
                &[("kind", kind)],
            )
        };
        assert_eq!((cache("used"), cache("pinned")), (Some(65_536), Some(4096)));
        // A partition that moved away is forgotten, gauges included.
        health.record_high_offset(1, 90);
        std::thread::sleep(Duration::from_millis(1100));
        assert!(health.check().is_err());
        health.forget(1);
        assert_eq!(health.check(), Ok(()));
        assert_eq!(gauge(&registry, "neruba_consumer_lag_messages", "1"), None);
        assert_eq!(gauge(&registry, "neruba_rocksdb_size_bytes", "1"), None);
        assert_eq!((memory("memtables"), memory("table_readers")), (None, None));
    }

    #[test]
    fn an_unreachable_broker_or_a_failed_store_makes_it_unready() {
        let registry = Registry::new();
        let health = ConsumerHealth::new("rater", "t", Duration::from_secs(60), &registry)
            .expect("register");
        let reachable = || {
            labelled(
                &registry,
                "neruba_consumer_broker_reachable",
                &[("consumer", "rater")],
            )
        };
        assert_eq!((health.check(), reachable()), (Ok(()), None));
        health.set_broker_reachable(true);
        assert_eq!(reachable(), Some(1));
        health.set_broker_reachable(false);
        assert_eq!(
            (health.check(), reachable()),
            (Err("broker unreachable".to_owned()), Some(0))
        );
        health.set_broker_reachable(true);
        assert_eq!(reachable(), Some(1));
        health.store_failed("IO error: No space left on device");
        assert_eq!(
            health.check(),
            Err("state store failed: IO error: No space left on device".to_owned())
        );
    }
}
