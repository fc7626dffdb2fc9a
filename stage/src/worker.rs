//! The consumer loop of a stage: poll a batch, apply it to the partitions' state (handing the
//! outputs to the worker's sending thread as they are made, `outbox`), deliver the outputs,
//! write the state. Runs on one blocking thread per worker, and its sending thread.
//!
//! Invariants:
//! - on assignment each partition resumes at the offset stored with its state;
//! - on revocation and on shutdown the pending batch is delivered and written before the
//!   partition is let go, so the next owner resumes exactly there (a worker that failed writes
//!   nothing more: see below);
//! - nothing of a batch is written before all its outputs were acknowledged (`acks=all`);
//!   some may reach the broker before the batch ends, and a batch that is never written is
//!   applied again after a restart, re-emitting them;
//! - a killed worker (a crash, in tests) writes nothing more, and neither does one that
//!   failed: its batch may be half applied, so the next start resumes from the last write.
//!   Neither enqueues anything more, and a batch whose outputs were cut short by a kill is
//!   not written.

use crate::gaps::InputGaps;
use crate::metrics::BatchTimes;
use crate::outbox::{Finished, Outbox};
use crate::rebalance::{PartitionStates, Rebalance};
use crate::{Config, ConsumerHealth, CrashPoint, Error, Partition, Result, Stage, Store};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use rocksdb::Cache;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Which of a process's workers this is: with static assignment, worker `index` of `count`
/// takes the `index`-th of `count` contiguous ranges of the assignment, as the group's range
/// assignor would.
#[derive(Debug, Clone, Copy)]
pub struct WorkerSlice {
    pub index: usize,
    pub count: usize,
}

impl WorkerSlice {
    fn of(self, partitions: Vec<i32>) -> Vec<i32> {
        let count = self.count.max(1);
        let (base, extra) = (partitions.len() / count, partitions.len() % count);
        let start = self.index * base + self.index.min(extra);
        let len = base + usize::from(self.index < extra);
        partitions.into_iter().skip(start).take(len).collect()
    }
}

/// What a worker is built from besides its stage.
pub(crate) struct Parts {
    pub(crate) config: Config,
    pub(crate) slice: WorkerSlice,
    pub(crate) cache: Cache,
    pub(crate) health: Arc<ConsumerHealth>,
    pub(crate) assigned: prometheus::IntGauge,
    pub(crate) times: BatchTimes,
    pub(crate) gaps: InputGaps,
    pub(crate) shutdown: CancellationToken,
    pub(crate) kill: Arc<AtomicBool>,
}

/// What the loop and the rebalance callback share.
struct Shared<S: Stage> {
    stage: S,
    partitions: HashMap<i32, S::Partition>,
    config: Config,
    cache: Cache,
    producer: neruba_kafka::Recoverable,
    /// The worker's sending thread, and what it sends with.
    outbox: Outbox<S::Output, S::Sender>,
    /// Shutdown: a batch whose outputs are not acknowledged is then given up, unwritten.
    stop: CancellationToken,
    /// A failure inside a rebalance callback, surfaced by the loop.
    fatal: Option<Error>,
    /// The loop failed or ended, or a rebalance callback failed: nothing more is written, not
    /// even by the revocation the consumer's close runs as the worker is dropped.
    abandoned: bool,
    health: Arc<ConsumerHealth>,
    /// Kafka timestamp of the last message applied, per partition (for lag in seconds).
    last_timestamp_ms: HashMap<i32, i64>,
    assigned: prometheus::IntGauge,
    /// This worker's share of the assigned gauge (workers of a process add up).
    published_assigned: i64,
    times: BatchTimes,
    /// Offsets the input skipped, checked against the offset after each message applied.
    gaps: InputGaps,
    /// Input messages applied since the last write.
    unwritten: usize,
    /// Time spent finishing batches since the worker started: the part of a loop pass a
    /// rebalance callback took, which is not the batch's apply.
    finishing: Duration,
    /// When each owned partition's state was opened (a count of openings): a message read
    /// ahead is applied only to the state that owned its partition when it was polled, since
    /// a partition let go and taken again resumes at its stored offset and is read again.
    opened: HashMap<i32, u64>,
    openings: u64,
}

type Context<S> = Rebalance<Shared<S>>;

impl<S: Stage> Shared<S> {
    fn open_partition(&mut self, partition: i32) -> Result<Option<i64>> {
        if let Some(state) = self.partitions.get(&partition) {
            return Ok(state.store().next_offset());
        }
        let dir = crate::partition_dir(&self.config.state_dir, &self.config.input_topic, partition);
        let mut options = self.stage.store_options();
        options.index_in_cache |= self.config.index_in_cache;
        let store = Store::open(&dir, partition, &options, &self.cache)?;
        let state = self.stage.open(store)?;
        let next = state.store().next_offset();
        tracing::info!(stage = S::NAME, partition, next_offset = ?next, "Partition state opened.");
        self.partitions.insert(partition, state);
        self.openings += 1;
        self.opened.insert(partition, self.openings);
        self.gaps.opened(partition, next);
        Ok(next)
    }

    /// Delivers every pending output, then writes each partition's batch. With
    /// `crash_before_write`, stops after delivering, as `kill -9` between the two would.
    fn finish_batch(
        &mut self,
        consumer: &BaseConsumer<Context<S>>,
        crash_before_write: bool,
    ) -> Result<()> {
        if self.abandoned {
            return Ok(());
        }
        let started = Instant::now();
        let finished = self.deliver_and_write(consumer, crash_before_write);
        self.finishing += started.elapsed();
        finished
    }

    /// What [`Self::finish_batch`] does, timed by it.
    fn deliver_and_write(
        &mut self,
        consumer: &BaseConsumer<Context<S>>,
        crash_before_write: bool,
    ) -> Result<()> {
        let started = Instant::now();
        self.hand_outputs()?;
        let finished = self.outbox.finish()?;
        let emitted = !matches!(finished, Finished::Nothing);
        match finished {
            Finished::Nothing => {}
            // Killed (or failed) while the batch's outputs were sent: some were not, so
            // nothing of it is written, as after a crash then.
            Finished::Cut => return Ok(()),
            Finished::Sent {
                producer,
                outputs,
                pending,
            } => {
                let stop = self.stop.clone();
                let sending = self.outbox.sending();
                neruba_kafka::deliver_until_acked(
                    &self.producer,
                    Some((producer, pending)),
                    // Sent again whole, however long a full queue takes to drain (as the
                    // first time, unless the worker was killed: then it is cut instead).
                    |producer| sending.send(producer, &outputs, &|| false),
                    &|| stop.is_cancelled(),
                )?;
                self.stage.delivered();
                self.times.delivered(started.elapsed());
            }
        }
        if crash_before_write {
            return Ok(());
        }
        let started = Instant::now();
        let mut committed = TopicPartitionList::new();
        for state in self.partitions.values_mut() {
            if let Err(e) = state.commit() {
                self.health.store_failed(&e.to_string());
                return Err(e);
            }
            if let Some(next) = state.store().next_offset() {
                committed.add_partition_offset(
                    &self.config.input_topic,
                    state.store().partition(),
                    Offset::Offset(next),
                )?;
            }
        }
        if committed.count() > 0
            && let Err(e) = consumer.commit(&committed, CommitMode::Async)
        {
            // For lag graphs only; correctness rests on the offsets in the stores.
            tracing::debug!(error = %e, "Group offset commit failed; lag graphs may lag.");
        }
        if self.unwritten > 0 || emitted {
            self.times
                .written(started.elapsed(), std::mem::take(&mut self.unwritten));
        }
        Ok(())
    }

    /// Hands the outputs the partitions made since the last call to the sending thread (none
    /// once the worker failed: its batch is never written).
    fn hand_outputs(&mut self) -> Result<()> {
        if self.abandoned || self.fatal.is_some() {
            return Ok(());
        }
        let mut outputs = Vec::new();
        for state in self.partitions.values_mut() {
            self.stage.before_handing(state)?;
            outputs.extend(self.stage.take_outputs(state));
        }
        if outputs.is_empty() {
            return Ok(());
        }
        self.outbox.hand(outputs)
    }

    fn publish_gauges(&self) {
        let now = neruba_schemas::event::now_ms();
        for (partition, state) in &self.partitions {
            let store = state.store();
            self.health.observe(
                *partition,
                store.next_offset().unwrap_or(0),
                self.last_timestamp_ms.get(partition).copied(),
            );
            let (size, pending) = store.disk_usage();
            self.health.observe_store(*partition, size, pending);
            let (memtables, table_readers) = store.memory_usage();
            self.health
                .observe_store_memory(*partition, memtables, table_readers);
            self.stage.gauges(state, now);
        }
        self.stage.worker_gauges(now);
        self.health
            .observe_block_cache(self.cache.get_usage(), self.cache.get_pinned_usage());
    }
}

impl<S: Stage> PartitionStates for Shared<S> {
    type Error = Error;

    fn open(&mut self, partition: i32) -> Result<Option<i64>> {
        self.open_partition(partition)
    }

    fn finish(&mut self, consumer: &BaseConsumer<Context<S>>) -> Result<()> {
        self.finish_batch(consumer, false)
    }

    fn release(&mut self, partition: i32) {
        self.partitions.remove(&partition);
        self.opened.remove(&partition);
        self.last_timestamp_ms.remove(&partition);
        self.gaps.released(partition);
    }

    fn owned_changed(&mut self) {
        let owned = i64::try_from(self.partitions.len()).unwrap_or(0);
        self.assigned.add(owned - self.published_assigned);
        self.published_assigned = owned;
    }

    fn fail(&mut self, error: Error) {
        self.fatal = Some(error);
        self.abandoned = true;
        self.outbox.close();
    }
}

/// How reading ahead ended.
enum ReadAhead {
    /// Messages were read (perhaps none); `failed` when a poll failed; `first`,
    /// when the first of them was polled, with the time spent finishing batches by then.
    Read {
        failed: bool,
        first: Option<(Instant, Duration)>,
    },
    /// The worker was killed: nothing more is applied.
    Killed,
}

/// The consumer loop and what it owns.
pub(crate) struct Worker<S: Stage> {
    consumer: BaseConsumer<Context<S>>,
    shared: Arc<Mutex<Shared<S>>>,
    shutdown: CancellationToken,
    kill: Arc<AtomicBool>,
    max_batch: usize,
    hand_every: usize,
    crash: Option<CrashPoint>,
}

impl<S: Stage> Worker<S> {
    pub(crate) fn new(stage: S, parts: Parts) -> Result<Self> {
        let Parts {
            config,
            slice,
            cache,
            health,
            assigned,
            times,
            gaps,
            shutdown,
            kill,
        } = parts;
        let client_id = format!("neruba-{}", S::NAME);
        let producer = neruba_kafka::recoverable_output_producer(
            &config.brokers,
            &client_id,
            S::LINGER_MS,
            &config.kafka_options,
        )?;
        let output_topic = stage.output_topic().to_owned();
        let output_partitions = neruba_kafka::partition_count(&producer.get(), &output_topic)?;
        let outbox = Outbox::start(
            S::NAME,
            stage.sender(),
            producer.clone(),
            &config,
            output_topic,
            output_partitions,
            kill.clone(),
        )?;
        let shared = Arc::new(Mutex::new(Shared {
            stage,
            outbox,
            partitions: HashMap::new(),
            config: config.clone(),
            cache,
            producer,
            stop: shutdown.clone(),
            fatal: None,
            abandoned: false,
            health: health.clone(),
            last_timestamp_ms: HashMap::new(),
            assigned,
            published_assigned: 0,
            times,
            gaps,
            unwritten: 0,
            finishing: Duration::ZERO,
            opened: HashMap::new(),
            openings: 0,
        }));
        let context = Rebalance::new(shared.clone(), &config.input_topic, kill.clone(), health);
        let member = neruba_kafka::clients::StageMember {
            brokers: &config.brokers,
            group_id: &config.group_id,
            client_id: &client_id,
            instance_id: config.instance_id.as_deref(),
        };
        let consumer = neruba_kafka::clients::stage_consumer(
            member,
            S::CONSUMER_TUNING,
            &config.kafka_options,
            context,
        )?;
        match &config.assignment {
            None => consumer.subscribe(&[&config.input_topic])?,
            Some(assignment) => {
                Context::<S>::assign_static(&consumer, |count| {
                    slice.of(assignment.resolve(count))
                })?;
            }
        }
        Ok(Self {
            consumer,
            shared,
            shutdown,
            kill,
            max_batch: config.max_batch,
            hand_every: config.hand_every.max(1),
            crash: config.crash,
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, Shared<S>>> {
        self.shared.lock().map_err(|_| Error::Poisoned(S::NAME))
    }

    fn killed(&self) -> bool {
        self.kill.load(Ordering::SeqCst)
    }

    /// Polls up to `want` messages into `ahead`, the first waiting a while when `first` (the
    /// batch is empty), then shows each partition's share to [`Stage::read_ahead`]. Stops
    /// early at the first poll that finds nothing, and at one that fails, marking the read
    /// failed: the batch then ends once what was read is applied, as it ended at the error.
    fn read_ahead<'c>(
        &'c self,
        batch: &S::Batch,
        ahead: &mut VecDeque<(BorrowedMessage<'c>, Option<u64>)>,
        want: usize,
        first: bool,
    ) -> Result<ReadAhead> {
        let mut failed = false;
        let mut first_at = None;
        while ahead.len() < want {
            let wait = if first && ahead.is_empty() {
                Duration::from_millis(100)
            } else {
                Duration::ZERO
            };
            let message = match self.consumer.poll(wait) {
                // Nothing now: what was read is applied, and the next poll after it (as
                // before reading ahead, one after each message applied) decides whether the
                // batch goes on.
                None => break,
                // librdkafka gave this consumer up for good (another member joined the group
                // under its instance id, and the broker fenced this one): it reads nothing
                // more, so the stage stops with the error, writing nothing of the batch (nor
                // sending any more of its outputs; some may have been sent already),
                // instead of idling while it answers ready. Its supervisor starts it again
                // from the offsets stored with its state.
                Some(Err(e @ KafkaError::MessageConsumptionFatal(_))) => {
                    tracing::error!(stage = S::NAME, error = %e, "Consumer failed for good.");
                    return Err(e.into());
                }
                Some(Err(e)) => {
                    tracing::warn!(stage = S::NAME, error = %e, "Consumer error.");
                    failed = true;
                    break;
                }
                Some(Ok(message)) => message,
            };
            if self.killed() {
                return Ok(ReadAhead::Killed);
            }
            // After the poll, whose rebalance callback (if any) ran first: the owner now is
            // the owner the message was fetched for.
            let shared = self.lock()?;
            let opened = shared.opened.get(&message.partition()).copied();
            first_at.get_or_insert_with(|| (Instant::now(), shared.finishing));
            drop(shared);
            ahead.push_back((message, opened));
        }
        if S::READ_AHEAD > 1 && !ahead.is_empty() {
            let mut guard = self.lock()?;
            let shared = &mut *guard;
            let mut partitions: Vec<i32> = ahead.iter().map(|(m, _)| m.partition()).collect();
            partitions.sort_unstable();
            partitions.dedup();
            for partition in partitions {
                let Some(opened) = shared.opened.get(&partition).copied() else {
                    continue;
                };
                let Some(state) = shared.partitions.get_mut(&partition) else {
                    continue;
                };
                let messages: Vec<&BorrowedMessage<'_>> = ahead
                    .iter()
                    .filter(|(m, at)| m.partition() == partition && *at == Some(opened))
                    .map(|(m, _)| m)
                    .collect();
                shared.stage.read_ahead(batch, state, &messages)?;
            }
        }
        Ok(ReadAhead::Read {
            failed,
            first: first_at,
        })
    }

    /// Runs until shutdown (writing everything), kill or a failure (writing nothing more).
    pub(crate) fn run(self) -> Result<()> {
        let mut last_gauges = Instant::now();
        let mut applied_total: u64 = 0;
        // Messages polled and not yet applied, each with when its partition's state was
        // opened as it was polled (`None`: not owned then).
        let mut ahead: VecDeque<(BorrowedMessage<'_>, Option<u64>)> = VecDeque::new();
        loop {
            if self.killed() {
                return Ok(());
            }
            if self.shutdown.is_cancelled() {
                self.lock()?.finish_batch(&self.consumer, false)?;
                tracing::info!(stage = S::NAME, "Stopped; state written.");
                return Ok(());
            }
            let batch = self.lock()?.stage.begin_batch();
            let mut applied = 0;
            // From the batch's first message polled (the wait for one is idle time), with the
            // time spent finishing batches by then, to leave out a rebalance's.
            let mut first_at: Option<(Instant, Duration)> = None;
            // Partitions the batch read, with the Kafka timestamp of the last message of each.
            let mut touched: Vec<(i32, Option<i64>)> = Vec::new();
            // The input failed while reading ahead: the batch ends once what was read is
            // applied. It ends at once when a poll finds nothing.
            let mut failed = false;
            while applied < self.max_batch {
                if ahead.is_empty() {
                    if failed {
                        break;
                    }
                    let want = S::READ_AHEAD.clamp(1, self.max_batch - applied);
                    match self.read_ahead(&batch, &mut ahead, want, applied == 0)? {
                        ReadAhead::Read {
                            failed: now_failed,
                            first,
                        } => {
                            failed = now_failed;
                            // The batch's apply time runs from its first message (the wait
                            // for one is idle time), reading ahead included.
                            if let Some(first) = first {
                                first_at.get_or_insert(first);
                            }
                        }
                        ReadAhead::Killed => return Ok(()),
                    }
                    if ahead.is_empty() {
                        break;
                    }
                }
                let Some((message, opened)) = ahead.pop_front() else {
                    break;
                };
                if self.killed() {
                    return Ok(());
                }
                let at = message.timestamp().to_millis();
                match touched.iter_mut().find(|(p, _)| *p == message.partition()) {
                    Some(last) => last.1 = at.or(last.1),
                    None => touched.push((message.partition(), at)),
                }
                let mut guard = self.lock()?;
                let shared = &mut *guard;
                let mut full = false;
                // Applied only to the state that owned the partition when it was polled.
                let owned =
                    opened.is_some() && shared.opened.get(&message.partition()) == opened.as_ref();
                if owned {
                    // Set by reading ahead, unless the message was read by an earlier batch.
                    first_at.get_or_insert_with(|| (Instant::now(), shared.finishing));
                    shared.gaps.received(message.partition(), message.offset());
                }
                while owned && let Some(state) = shared.partitions.get_mut(&message.partition()) {
                    shared.stage.apply(&batch, state, &message)?;
                    full = state.batch_full();
                    if !state.apply_again() {
                        shared.unwritten += 1;
                        break;
                    }
                    if self.killed() {
                        break;
                    }
                    // The message stopped partway: its part so far is delivered and written
                    // (with the partition's offset still at it), then it is applied again
                    // under the same batch context. A stop in between resumes it at the next
                    // start; the batch ends there, since nothing after the message may be
                    // applied before the rest of it. So does a batch that can no longer be
                    // written (a failed rebalance callback), which ends the worker.
                    shared.finish_batch(&self.consumer, false)?;
                    if self.shutdown.is_cancelled()
                        || self.killed()
                        || shared.abandoned
                        || shared.fatal.is_some()
                    {
                        full = true;
                        break;
                    }
                }
                applied += 1;
                if applied % self.hand_every == 0 {
                    shared.hand_outputs()?;
                }
                drop(guard);
                applied_total += 1;
                if self.crash == Some(CrashPoint::AfterMessages(applied_total)) {
                    self.kill.store(true, Ordering::SeqCst);
                    return Ok(());
                }
                if full {
                    break;
                }
            }
            let mut guard = self.lock()?;
            let shared = &mut *guard;
            if let Some(e) = shared.fatal.take() {
                return Err(e);
            }
            for (partition, at) in touched {
                if let Some(at) = at {
                    shared.last_timestamp_ms.insert(partition, at);
                }
            }
            let now = neruba_schemas::event::now_ms();
            for state in shared.partitions.values_mut() {
                shared.stage.after_poll(state, now);
            }
            if self.killed() {
                return Ok(());
            }
            if let Some((first, finishing)) = first_at {
                let rebalanced = shared.finishing.saturating_sub(finishing);
                shared
                    .times
                    .applied(first.elapsed().saturating_sub(rebalanced));
            }
            let crash_now =
                matches!(self.crash, Some(CrashPoint::BeforeWrite(n)) if applied_total >= n);
            let cut_now =
                matches!(self.crash, Some(CrashPoint::WhileSending(n)) if applied_total >= n);
            if cut_now {
                // Killed as the batch's last outputs are handed: the thread enqueues none
                // of them, and the batch is not written.
                self.kill.store(true, Ordering::SeqCst);
            }
            shared.finish_batch(&self.consumer, crash_now)?;
            if crash_now || cut_now {
                self.kill.store(true, Ordering::SeqCst);
                return Ok(());
            }
            if last_gauges.elapsed() >= Duration::from_secs(1) {
                shared.publish_gauges();
                last_gauges = Instant::now();
            }
        }
    }
}

impl<S: Stage> Drop for Worker<S> {
    /// Whatever ended the loop (shutdown, which wrote everything; kill; a failure, whose batch
    /// may be half applied; a panic), nothing more is written, nor enqueued (outputs still
    /// handed to the sending thread stay unsent): set before the fields drop, the consumer
    /// first, whose close runs the revocation.
    fn drop(&mut self) {
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        shared.abandoned = true;
        shared.outbox.close();
    }
}

#[cfg(test)]
mod tests {
    use super::WorkerSlice;

    #[test]
    fn workers_split_a_static_assignment_into_contiguous_ranges_covering_it_once() {
        let slices = |count: usize, partitions: Vec<i32>| -> Vec<Vec<i32>> {
            (0..count)
                .map(|index| WorkerSlice { index, count }.of(partitions.clone()))
                .collect()
        };
        assert_eq!(
            slices(2, (0..8).collect()),
            [vec![0, 1, 2, 3], vec![4, 5, 6, 7]]
        );
        assert_eq!(
            slices(3, (0..8).collect()),
            [vec![0, 1, 2], vec![3, 4, 5], vec![6, 7]]
        );
        assert_eq!(slices(3, vec![5]), [vec![5], vec![], vec![]]);
        assert_eq!(slices(1, vec![2, 9]), [vec![2, 9]]);
    }
}
