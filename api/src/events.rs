//! Reading one's own events: how far the aggregators have folded the events topic, so that a
//! usage read with `min_position=<events topic>:<partition>:<offset>` (what `POST /v1/events`
//! answered in `positions`) is answered only once the usage model holds every rollup the
//! aggregators produced from the events up to that offset.
//!
//! Invariants:
//! - the aggregators' consumer group commits an events partition's offset only after the
//!   batch's outputs (rollups, dead letters) were acknowledged by the broker and its state
//!   written (the stage worker's order: outputs acknowledged → state written → group commit);
//!   so once the group's committed offset is past an event, every rollup that event caused is
//!   on the rollups topic;
//! - those rollups are then below each rollups partition's end read *after* that commit was
//!   seen, so a usage model that has read every rollups partition up to those ends holds them.
//!   A [`Snapshot`] pairs the committed offsets of one round with the ends read after them in
//!   the same round, never with older ends;
//! - a snapshot that once showed an event folded stays a valid proof: committed offsets and
//!   ends only grow, and so does what the usage model has read. A read whose positions the
//!   latest snapshot already shows folded therefore waits for nothing from the broker;
//! - usage answers closed windows: an event whose window is still open appears once that
//!   window closes. Waiting for its position guarantees that the aggregator has the event and
//!   that any revision of a closed window it caused (a late event) is readable, not that an
//!   open window shows it;
//! - a read never calls the broker and never waits past its own deadline: one background
//!   poller per api asks the broker and publishes snapshots on a `watch` channel; reads only
//!   look at them (`http.rs` waits with `timeout_at(deadline, …)`). So however many reads wait,
//!   the broker gets one offsets request and one end-offsets request per [`POLL_EVERY`], and
//!   the api uses at most one blocking thread for it; a broker that is down or slow delays
//!   snapshots, never a read's answer past its deadline;
//! - the poller runs while a read waits and for [`LINGER`] after the last one, then parks
//!   until the next: an api nobody asks about events asks the broker nothing. Its client is
//!   made on its first round and, when making it or any call fails, tried again on the next
//!   round (the failure is what a `503 not_caught_up` then says), never by a read;
//! - the events topic's partition count is learned from the broker and asked again (at most
//!   once per [`METADATA_EVERY`]) when a read names a partition at or above it: a topic that
//!   grew is followed, and a partition is called missing (`422`) only by metadata fetched
//!   after the read arrived; before that, the read waits (and is `503` if its wait ends);
//! - this replica never joins or commits for the aggregators' group
//!   ([`neruba_kafka::clients::group_offsets_reader`]).

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Longest one call to the broker may take: it bounds a round of the poller, never a read.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the poller asks the broker while a read waits.
pub(crate) const POLL_EVERY: Duration = Duration::from_millis(50);
/// How long the poller keeps going after the last read stopped waiting: a read that follows
/// soon finds a fresh snapshot (and one with `--api-read-wait 0s` can be answered from it).
pub(crate) const LINGER: Duration = Duration::from_secs(2);
/// Least time between two fetches of the events topic's metadata.
pub(crate) const METADATA_EVERY: Duration = Duration::from_millis(500);

/// Where the poller asks.
#[derive(Clone)]
pub(crate) struct Settings {
    /// The events topic: positions on it are waited for here.
    pub(crate) topic: String,
    /// The aggregators' consumer group, whose committed offsets are read.
    pub(crate) group_id: String,
    /// The topic the aggregators write rollups to (the usage model's input).
    pub(crate) rollups_topic: String,
    /// Its partition count, as the usage model reads it.
    pub(crate) rollup_partitions: i32,
    pub(crate) brokers: String,
    pub(crate) kafka_options: Vec<(String, String)>,
}

impl std::fmt::Debug for Settings {
    /// Without the librdkafka options, which may hold credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("topic", &self.topic)
            .field("group_id", &self.group_id)
            .field("rollups_topic", &self.rollups_topic)
            .field("rollup_partitions", &self.rollup_partitions)
            .field("brokers", &self.brokers)
            .finish_non_exhaustive()
    }
}

/// What the broker last said about the aggregators' progress.
#[derive(Debug, Clone, Default)]
pub(crate) struct Snapshot {
    /// The events topic's partition count, and when the broker said so.
    partitions: Option<(i32, Instant)>,
    /// The latest round that read both the committed offsets and, after them, the ends.
    folded: Option<Folded>,
    /// Why the latest round failed; `None` after one that succeeded.
    error: Option<String>,
}

/// One round's committed offsets, and the rollups ends read after them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Folded {
    /// Per events partition (the index), the aggregators' committed offset: the next one they
    /// will fold; `None` where they have committed nothing.
    committed: Vec<Option<i64>>,
    /// Per rollups partition (the index), its end (the offset its next record will get).
    rollups_ends: Vec<i64>,
}

/// What a snapshot says about a read's events positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Every one is folded: caught up once the usage model has read each rollups partition
    /// (the index) up to this end.
    Folded(Vec<i64>),
    /// Not yet (or not known yet): wait for the next snapshot. `refresh`: a partition is at or
    /// above the partition count known, which must be asked again before anything is said.
    Wait { refresh: bool },
    /// The events topic has no such partition, by metadata fetched after the read arrived.
    NoPartition(i32),
}

impl Snapshot {
    /// What this snapshot says about `wanted` (per events partition, the highest offset asked
    /// for), for a read that arrived at `arrived`.
    pub(crate) fn judge(&self, wanted: &BTreeMap<i32, i64>, arrived: Instant) -> Verdict {
        let Some(&highest) = wanted.keys().next_back() else {
            return Verdict::Folded(Vec::new());
        };
        match self.partitions {
            None => return Verdict::Wait { refresh: false },
            Some((count, _)) if highest < count => {}
            // Learned after the read arrived, so after the write it waits for: the partition
            // did not exist when that write was answered either.
            Some((_, at)) if at >= arrived => return Verdict::NoPartition(highest),
            Some(_) => return Verdict::Wait { refresh: true },
        }
        let Some(folded) = &self.folded else {
            return Verdict::Wait { refresh: false };
        };
        let done = wanted.iter().all(|(partition, offset)| {
            usize::try_from(*partition)
                .ok()
                .and_then(|p| folded.committed.get(p).copied().flatten())
                .is_some_and(|committed| committed > *offset)
        });
        if done {
            Verdict::Folded(folded.rollups_ends.clone())
        } else {
            Verdict::Wait { refresh: false }
        }
    }

    /// Why `wanted` is not caught up, for a `503 not_caught_up`.
    pub(crate) fn behind(&self, topic: &str, wanted: &BTreeMap<i32, i64>) -> String {
        let mut why = match (&self.partitions, &self.folded) {
            (None, _) => format!("the partitions of `{topic}` are not known yet"),
            (Some(_), None) => "the aggregators' committed offsets are not known yet".to_owned(),
            (Some((count, _)), Some(folded)) => {
                let behind: Vec<String> = wanted
                    .iter()
                    .filter_map(|(partition, offset)| {
                        if *partition >= *count {
                            return Some(format!(
                                "{topic}:{partition}:{offset} (a partition not known yet)"
                            ));
                        }
                        let committed = usize::try_from(*partition)
                            .ok()
                            .and_then(|p| folded.committed.get(p).copied().flatten());
                        match committed {
                            Some(committed) if committed > *offset => None,
                            Some(committed) => Some(format!(
                                "{topic}:{partition}:{offset} (committed {committed})"
                            )),
                            None => {
                                Some(format!("{topic}:{partition}:{offset} (nothing committed)"))
                            }
                        }
                    })
                    .collect();
                format!("the aggregators have not folded {} yet", behind.join(", "))
            }
        };
        if let Some(error) = &self.error {
            let _ = write!(why, " (the broker: {error})");
        }
        why
    }
}

/// How far the aggregators have folded the events topic, as the poller last heard: what
/// usage reads with events positions wait on.
#[derive(Debug)]
pub(crate) struct EventsProgress {
    /// The events topic.
    topic: String,
    /// The poller publishes here; each waiting read holds a receiver, and the receiver count
    /// is how the poller knows whether anyone waits.
    snapshots: watch::Sender<Snapshot>,
    /// Wakes a parked poller when a read starts waiting.
    wake: Notify,
    /// Set by a read that names a partition at or above the known count: the poller asks for
    /// the topic's metadata again (rate limited).
    refresh: AtomicBool,
}

impl EventsProgress {
    /// The progress, and its poller (parked until a read waits), which stops at `shutdown`.
    pub(crate) fn start(
        settings: Settings,
        shutdown: CancellationToken,
    ) -> (Arc<Self>, JoinHandle<()>) {
        let progress = Arc::new(Self {
            topic: settings.topic.clone(),
            snapshots: watch::Sender::new(Snapshot::default()),
            wake: Notify::new(),
            refresh: AtomicBool::new(false),
        });
        let poller = tokio::spawn(poll(progress.clone(), settings, shutdown));
        (progress, poller)
    }

    /// The events topic.
    pub(crate) fn topic(&self) -> &str {
        &self.topic
    }

    /// What the latest snapshot says about `wanted`, without waiting or waking the poller.
    pub(crate) fn judge(&self, wanted: &BTreeMap<i32, i64>, arrived: Instant) -> Verdict {
        self.snapshots.borrow().judge(wanted, arrived)
    }

    /// The snapshots from now on: while the receiver lives the poller runs.
    pub(crate) fn watch(&self) -> watch::Receiver<Snapshot> {
        let receiver = self.snapshots.subscribe();
        // A permit is kept if the poller is not parked yet: no wake-up is lost.
        self.wake.notify_one();
        receiver
    }

    /// Asks the poller to fetch the events topic's partition count again.
    pub(crate) fn refresh_partitions(&self) {
        self.refresh.store(true, Ordering::Relaxed);
    }
}

/// The poller: one round every [`POLL_EVERY`] while a read waits (and for [`LINGER`] after),
/// parked otherwise.
async fn poll(progress: Arc<EventsProgress>, settings: Settings, shutdown: CancellationToken) {
    let settings = Arc::new(settings);
    let mut asker = Some(Asker::new(settings.clone()));
    let mut last_waited = None::<Instant>;
    loop {
        if progress.snapshots.receiver_count() > 0 {
            last_waited = Some(Instant::now());
        } else if last_waited.is_none_or(|at| at.elapsed() >= LINGER) {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = progress.wake.notified() => {}
            }
        }
        if shutdown.is_cancelled() {
            break;
        }
        let refresh = progress.refresh.swap(false, Ordering::Relaxed);
        let mut taken = asker.take().unwrap_or_else(|| Asker::new(settings.clone()));
        let asked = tokio::task::spawn_blocking(move || {
            let round = taken.round(refresh);
            (taken, round)
        })
        .await;
        let round = match asked {
            Ok((taken, round)) => {
                asker = Some(taken);
                round
            }
            // It panicked: a new client next round.
            Err(e) => Round {
                partitions: None,
                folded: None,
                error: Some(format!("the broker call failed: {e}")),
            },
        };
        let failing = progress.snapshots.borrow().error.is_some();
        match (&round.error, failing) {
            (Some(error), false) => {
                tracing::warn!(%error, "The aggregators' progress could not be read; retrying.");
            }
            (None, true) => tracing::info!("The aggregators' progress is read again."),
            _ => {}
        }
        progress.snapshots.send_modify(|snapshot| {
            if let Some(partitions) = round.partitions {
                snapshot.partitions = Some(partitions);
            }
            if let Some(folded) = round.folded {
                snapshot.folded = Some(folded);
            }
            snapshot.error = round.error;
        });
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(POLL_EVERY) => {}
        }
    }
    // Closing a consumer that carries a group id blocks until librdkafka has let go of it.
    if let Some(asker) = asker {
        let _ = tokio::task::spawn_blocking(move || drop(asker)).await;
    }
}

/// What one round learned; `None` where it learned nothing new.
#[derive(Debug)]
struct Round {
    partitions: Option<(i32, Instant)>,
    folded: Option<Folded>,
    error: Option<String>,
}

/// The poller's blocking side: the client, made on the first round, and the metadata it has
/// learned.
struct Asker {
    settings: Arc<Settings>,
    consumer: Option<BaseConsumer>,
    /// The events topic's partition count, and when it was fetched.
    partitions: Option<(i32, Instant)>,
    /// When the metadata was last asked for (successfully or not).
    metadata_asked: Option<Instant>,
    /// A read asked for the partition count again and it has not been fetched since.
    refresh: bool,
}

impl std::fmt::Debug for Asker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Asker")
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

impl Asker {
    fn new(settings: Arc<Settings>) -> Self {
        Self {
            settings,
            consumer: None,
            partitions: None,
            metadata_asked: None,
            refresh: false,
        }
    }

    /// One round, blocking (each call within [`CALL_TIMEOUT`]): the client if there is none
    /// yet, the events topic's metadata if unknown or asked for again, then the committed
    /// offsets of every events partition in one request, and after them the rollups ends in
    /// one request.
    fn round(&mut self, refresh: bool) -> Round {
        self.refresh |= refresh;
        let mut round = Round {
            partitions: None,
            folded: None,
            error: None,
        };
        if self.consumer.is_none() {
            let settings = &self.settings;
            match neruba_kafka::clients::group_offsets_reader(
                &settings.brokers,
                &settings.group_id,
                &settings.kafka_options,
            ) {
                Ok(consumer) => self.consumer = Some(consumer),
                Err(e) => {
                    round.error = Some(format!("kafka client: {e}"));
                    return round;
                }
            }
        }
        let Some(consumer) = &self.consumer else {
            return round;
        };
        let due = self
            .metadata_asked
            .is_none_or(|at| at.elapsed() >= METADATA_EVERY);
        if (self.partitions.is_none() || self.refresh) && due {
            self.metadata_asked = Some(Instant::now());
            match partition_count(consumer, &self.settings.topic) {
                Ok(count) => {
                    self.partitions = Some((count, Instant::now()));
                    self.refresh = false;
                    round.partitions = self.partitions;
                }
                Err(e) => round.error = Some(e),
            }
        }
        let Some((count, _)) = self.partitions else {
            return round;
        };
        // Committed offsets first, ends after: the order the module's invariant relies on.
        let folded = committed(consumer, &self.settings.topic, count).and_then(|committed| {
            let rollups_ends = ends(
                consumer,
                &self.settings.rollups_topic,
                self.settings.rollup_partitions,
            )?;
            Ok(Folded {
                committed,
                rollups_ends,
            })
        });
        match folded {
            Ok(folded) => round.folded = Some(folded),
            Err(e) => round.error = Some(e),
        }
        round
    }
}

/// `topic`'s partition count, from the broker.
fn partition_count(consumer: &BaseConsumer, topic: &str) -> Result<i32, String> {
    let metadata = consumer
        .fetch_metadata(Some(topic), CALL_TIMEOUT)
        .map_err(|e| format!("metadata of `{topic}`: {e}"))?;
    let found = metadata
        .topics()
        .first()
        .ok_or_else(|| format!("metadata of `{topic}`: no such topic"))?;
    if let Some(e) = found.error() {
        return Err(format!(
            "metadata of `{topic}`: {}",
            rdkafka::error::RDKafkaErrorCode::from(e)
        ));
    }
    i32::try_from(found.partitions().len())
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("topic `{topic}` has no partitions"))
}

/// The aggregators' committed offset of each of `topic`'s `count` partitions, in one request.
fn committed(consumer: &BaseConsumer, topic: &str, count: i32) -> Result<Vec<Option<i64>>, String> {
    let mut list = TopicPartitionList::new();
    for partition in 0..count {
        list.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(list, CALL_TIMEOUT)
        .map_err(|e| format!("committed offsets on `{topic}`: {e}"))?;
    let mut offsets = vec![None; usize::try_from(count).unwrap_or_default()];
    for element in committed.elements() {
        if let Err(e) = element.error() {
            return Err(format!(
                "committed offset of {topic}:{}: {e}",
                element.partition()
            ));
        }
        if let (Offset::Offset(offset), Ok(partition)) =
            (element.offset(), usize::try_from(element.partition()))
            && let Some(slot) = offsets.get_mut(partition)
        {
            *slot = Some(offset);
        }
    }
    Ok(offsets)
}

/// The end of each of `topic`'s `count` partitions, in one request (a `ListOffsets` for the
/// latest offset, what a high watermark query asks).
fn ends(consumer: &BaseConsumer, topic: &str, count: i32) -> Result<Vec<i64>, String> {
    let mut list = TopicPartitionList::new();
    for partition in 0..count {
        list.add_partition_offset(topic, partition, Offset::End)
            .map_err(|e| format!("end offsets of `{topic}`: {e}"))?;
    }
    let found = consumer
        .offsets_for_times(list, CALL_TIMEOUT)
        .map_err(|e| format!("end offsets of `{topic}`: {e}"))?;
    let mut ends = vec![None; usize::try_from(count).unwrap_or_default()];
    for element in found.elements() {
        if let Err(e) = element.error() {
            return Err(format!("end of {topic}:{}: {e}", element.partition()));
        }
        if let (Offset::Offset(end), Ok(partition)) =
            (element.offset(), usize::try_from(element.partition()))
            && let Some(slot) = ends.get_mut(partition)
        {
            *slot = Some(end);
        }
    }
    ends.into_iter()
        .enumerate()
        .map(|(partition, end)| end.ok_or_else(|| format!("no end for {topic}:{partition}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(items: &[(i32, i64)]) -> BTreeMap<i32, i64> {
        items.iter().copied().collect()
    }

    #[test]
    fn a_partition_at_or_above_the_known_count_is_asked_again_not_refused() {
        let fetched = Instant::now();
        let arrived = fetched + Duration::from_millis(1);
        let snapshot = Snapshot {
            partitions: Some((4, fetched)),
            folded: Some(Folded {
                committed: vec![Some(10); 4],
                rollups_ends: vec![7, 0],
            }),
            error: None,
        };
        // Metadata older than the read: partition 4 may be new, so wait and refresh.
        assert_eq!(
            snapshot.judge(&wanted(&[(0, 3), (4, 0)]), arrived),
            Verdict::Wait { refresh: true }
        );
        // Metadata fetched after the read arrived still has 4 partitions: refused.
        let refreshed = Snapshot {
            partitions: Some((4, arrived + Duration::from_millis(1))),
            ..snapshot.clone()
        };
        assert_eq!(
            refreshed.judge(&wanted(&[(0, 3), (4, 0)]), arrived),
            Verdict::NoPartition(4)
        );
        // The topic grew to 6: partition 4 waits for its committed offset.
        let grown = Snapshot {
            partitions: Some((6, arrived + Duration::from_millis(1))),
            ..snapshot.clone()
        };
        assert_eq!(
            grown.judge(&wanted(&[(0, 3), (4, 0)]), arrived),
            Verdict::Wait { refresh: false }
        );
        // No metadata yet: wait, the poller asks anyway.
        assert_eq!(
            Snapshot::default().judge(&wanted(&[(0, 3)]), arrived),
            Verdict::Wait { refresh: false }
        );
    }

    #[test]
    fn positions_are_folded_once_every_committed_offset_is_past_them() {
        let arrived = Instant::now();
        let snapshot = Snapshot {
            partitions: Some((3, arrived)),
            folded: Some(Folded {
                committed: vec![Some(5), None, Some(9)],
                rollups_ends: vec![12, 0],
            }),
            error: Some("ignored once folded".to_owned()),
        };
        assert_eq!(
            snapshot.judge(&wanted(&[(0, 4), (2, 8)]), arrived),
            Verdict::Folded(vec![12, 0])
        );
        // The committed offset is the next to fold: offset 5 is not folded at 5.
        assert_eq!(
            snapshot.judge(&wanted(&[(0, 5)]), arrived),
            Verdict::Wait { refresh: false }
        );
        // Nothing committed on partition 1 yet.
        assert_eq!(
            snapshot.judge(&wanted(&[(1, 0)]), arrived),
            Verdict::Wait { refresh: false }
        );
        assert_eq!(
            snapshot.behind("neruba.events", &wanted(&[(0, 5), (1, 0), (2, 3)])),
            "the aggregators have not folded neruba.events:0:5 (committed 5), \
             neruba.events:1:0 (nothing committed) yet (the broker: ignored once folded)"
        );
    }
}
