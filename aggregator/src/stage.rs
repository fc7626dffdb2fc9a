//! The aggregator on the stage runtime: what one events-topic message does (an event is
//! folded, a watermark tick advances its tenant's clock), how rollups and ticks are written,
//! and the metrics of a batch. Polling, delivery before write, dead letters and offsets are
//! the runtime's ([`neruba_stage`]).

use crate::metrics::Metrics;
use crate::state::{Output, PartitionState, Timing};
use crate::{Config, Result};
use neruba_schemas::topics::{WATERMARK_HEADER, WATERMARK_TENANT_HEADER};
use neruba_schemas::{Catalog, LiveCatalog};
use neruba_stage::{Input, Partition as _, Sink, Store, StoreOptions};
use rdkafka::Message;
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureRecord};
use std::sync::Arc;
use std::time::Duration;

/// How long an idle tick may take to come back before another is sent.
const TICK_RETRY: Duration = Duration::from_secs(5);

/// The aggregator's domain logic, one per worker.
pub(crate) struct Aggregator {
    pub(crate) catalog: LiveCatalog,
    pub(crate) metrics: Metrics,
    pub(crate) timing: Timing,
    pub(crate) idle_timeout: Duration,
    pub(crate) events_topic: String,
    pub(crate) rollups_topic: String,
    pub(crate) accept_meter_changes: bool,
}

impl neruba_stage::Stage for Aggregator {
    const NAME: &'static str = "aggregator";
    const ASSIGNED_PARTITIONS_METRIC: &'static str = "neruba_assigned_partitions";
    const CONSUMER_TUNING: &'static [(&'static str, &'static str)] = &[
        ("max.poll.interval.ms", "300000"),
        ("fetch.wait.max.ms", "50"),
        ("queued.max.messages.kbytes", "65536"),
    ];
    // A batch's outputs are sent together and then awaited: lingering would only delay the
    // acknowledgements the batch's write waits for.
    const LINGER_MS: u32 = 0;
    const READ_AHEAD: usize = crate::state::READ_AHEAD;

    type Partition = PartitionState;
    type Output = Output;
    type Batch = Arc<Catalog>;

    fn store_options(&self) -> StoreOptions {
        crate::state::store_options(self.timing)
    }

    fn output_topic(&self) -> &str {
        &self.rollups_topic
    }

    fn open(&mut self, store: Store) -> Result<PartitionState> {
        let mut state = PartitionState::from_store(store, self.timing)?;
        self.check_meters(&mut state)?;
        tracing::info!(
            partition = state.partition,
            open_windows = state.open_windows(),
            "Open windows loaded."
        );
        Ok(state)
    }

    fn begin_batch(&mut self) -> Arc<Catalog> {
        self.catalog.current()
    }

    fn apply(
        &mut self,
        catalog: &Arc<Catalog>,
        state: &mut PartitionState,
        message: &BorrowedMessage<'_>,
    ) -> Result<()> {
        if !state
            .meters_kept_for
            .as_ref()
            .is_some_and(|kept| Arc::ptr_eq(kept, catalog))
        {
            // The partition's first message, or the first after a reload: the live catalog
            // checked the reload against the shapes it knows, but a partition opened while it
            // reloaded, or one kept otherwise than another, is checked here.
            self.keep_meters(state, catalog)?;
        }
        match watermark_tick(message) {
            Some((tenant, watermark)) => state.apply_tick(message.offset(), tenant, watermark),
            None => state.apply(Input::of(message), catalog),
        }
    }

    fn read_ahead(
        &mut self,
        _catalog: &Arc<Catalog>,
        state: &mut PartitionState,
        messages: &[&BorrowedMessage<'_>],
    ) -> Result<()> {
        let inputs: Vec<Input<'_>> = messages
            .iter()
            .filter(|m| watermark_tick(**m).is_none())
            .map(|m| Input::of(m))
            .collect();
        state.read_ahead(&inputs)
    }

    fn after_poll(&mut self, state: &mut PartitionState, _now_ms: i64) {
        // Queued as ticks on the partition itself, applied when read back.
        state.idle_ticks(
            self.idle_timeout,
            self.timing.grace_ms,
            neruba_schemas::event::now_ms(),
            self.idle_timeout.max(TICK_RETRY),
        );
    }

    fn take_outputs(&mut self, state: &mut PartitionState) -> Vec<Output> {
        self.publish_counts(state);
        state.take_outputs()
    }

    type Sender = RollupSender;

    fn sender(&self) -> RollupSender {
        RollupSender {
            events_topic: self.events_topic.clone(),
        }
    }

    fn gauges(&self, state: &PartitionState, now_ms: i64) {
        let partition = state.partition.to_string();
        let labels = [partition.as_str()];
        if state.watermark() > i64::MIN {
            self.metrics
                .watermark_lag
                .with_label_values(&labels)
                .set((now_ms - state.watermark()) / 1000);
        }
        self.metrics
            .open_windows
            .with_label_values(&labels)
            .set(i64::try_from(state.open_windows()).unwrap_or(i64::MAX));
        self.metrics
            .open_window_bytes
            .with_label_values(&labels)
            .set(i64::try_from(state.open_window_bytes()).unwrap_or(i64::MAX));
    }
}

impl Aggregator {
    pub(crate) fn new(config: &Config, catalog: LiveCatalog, metrics: Metrics) -> Self {
        Self {
            catalog,
            metrics,
            timing: config.timing,
            idle_timeout: config.idle_timeout,
            events_topic: config.stage.input_topic.clone(),
            rollups_topic: config.rollups_topic.clone(),
            accept_meter_changes: config.accept_meter_changes,
        }
    }

    /// Refuses a partition whose state was built under a meter the catalog in force reshapes
    /// (unless told to accept it), as a reload doing so is refused, and has the live catalog
    /// remember the shapes kept with the state first, so a reload from then on is checked
    /// against them too ([`crate::meters`]). The catalog's shapes are kept with the state at
    /// the partition's first message ([`Self::keep_meters`]).
    fn check_meters(&self, state: &mut PartitionState) -> Result<()> {
        let kept = crate::meters::kept(state.store())?;
        self.catalog.remember(&kept);
        self.accept_shapes(state.partition, &kept, &self.catalog.current())
    }

    /// Checks `catalog` against the shapes kept with the partition, then keeps its shapes too.
    fn keep_meters(&self, state: &mut PartitionState, catalog: &Arc<Catalog>) -> Result<()> {
        let mut kept = crate::meters::kept(state.store())?;
        self.accept_shapes(state.partition, &kept, catalog)?;
        crate::meters::keep(state.store(), &mut kept, catalog)?;
        state.meters_kept_for = Some(catalog.clone());
        Ok(())
    }

    /// Whether `catalog` may meter a partition whose state was built under `kept`: an error
    /// saying which meter it reshapes, unless `--accept-meter-changes` (then a warning).
    fn accept_shapes(
        &self,
        partition: i32,
        kept: &neruba_schemas::MeterShapes,
        catalog: &Catalog,
    ) -> Result<()> {
        let Err(change) = catalog.keeps_shapes(kept) else {
            return Ok(());
        };
        if !self.accept_meter_changes {
            return Err(crate::Error::Catalog(format!(
                "partition {partition}: {change}, and its stored windows and period totals were \
                 built under the meter as it was (it may have been removed since). Put the meter \
                 back as it was, or add the new one under a new key; `--accept-meter-changes` \
                 takes the change as it is"
            )));
        }
        tracing::warn!(partition, %change, "Meter change accepted (--accept-meter-changes): the meter's periods count differently before and after it.");
        Ok(())
    }

    /// Publishes what the partition counted since the last call.
    fn publish_counts(&self, state: &mut PartitionState) {
        let counts = state.take_counts();
        self.metrics.events.inc_by(counts.applied);
        self.metrics
            .dedup_hits
            .with_label_values(&["aggregator"])
            .inc_by(counts.duplicates);
        self.metrics.late_events.inc_by(counts.late);
        self.metrics.rollups.inc_by(counts.rollups);
        let now = neruba_schemas::event::now_ms();
        for end in counts.closed_window_ends {
            let late = u64::try_from((now - end).max(0)).unwrap_or(0);
            self.metrics
                .close_delay
                .observe(Duration::from_millis(late).as_secs_f64());
        }
        for (code, n) in counts.dead_letters {
            self.metrics
                .dead_letters
                .with_label_values(&[code])
                .inc_by(n);
        }
    }
}

/// A watermark tick as it is written to the events topic, keyed [`WATERMARK_HEADER`]: its
/// headers (which alone tell it from an event: its JSON payload starts as a version 1 event
/// does) and its payload.
pub fn tick_message(tenant: &str, watermark: i64) -> (OwnedHeaders, String) {
    let text = watermark.to_string();
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: WATERMARK_HEADER,
            value: Some(text.as_str()),
        })
        .insert(Header {
            key: WATERMARK_TENANT_HEADER,
            value: Some(tenant),
        });
    let payload = serde_json::json!({"watermark_ms": watermark, "tenant": tenant}).to_string();
    (headers, payload)
}

/// Whether a message on the events topic is a watermark tick ([`tick_message`]) rather than an
/// event: not in version 2 of the events encoding, and carrying the watermark header. Every
/// reader of the topic tells them apart this way.
pub fn is_tick<M: Message + ?Sized>(message: &M) -> bool {
    watermark_tick(message).is_some()
}

/// The tenant and watermark a tick message carries, if it is one. A tick whose value does not
/// parse is read as the far past, which moves nothing; one without a tenant (written before
/// clocks were per tenant) applies to every tenant of the partition.
fn watermark_tick<M: Message + ?Sized>(message: &M) -> Option<(Option<&str>, i64)> {
    if !may_be_tick(message.payload()) {
        return None;
    }
    let headers = message.headers()?;
    let value = |key: &str| {
        headers
            .iter()
            .find(|h| h.key == key)
            .map(|h| std::str::from_utf8(h.value.unwrap_or_default()).unwrap_or_default())
    };
    let watermark = value(WATERMARK_HEADER)?.parse().unwrap_or(i64::MIN);
    Some((value(WATERMARK_TENANT_HEADER), watermark))
}

/// Whether a message with this payload may be a tick: not if it is an event in version 2 of
/// the events encoding, which no tick ever was (a tick's payload is JSON, [`tick_message`]).
/// So an event's headers are never looked at: librdkafka finds that a message has none by
/// allocating a buffer, on every call (two an event: reading ahead and applying), which was 5 %
/// of an aggregator worker's time.
fn may_be_tick(payload: Option<&[u8]>) -> bool {
    payload.and_then(<[u8]>::first) != Some(&neruba_schemas::codec::VERSION)
}

/// Enqueues rollups on the rollups topic, and idle ticks back into the events' partition.
pub(crate) struct RollupSender {
    events_topic: String,
}

impl neruba_stage::Sender<Output> for RollupSender {
    fn send(&self, sink: &Sink<'_>, output: &Output) -> Result<DeliveryFuture, KafkaError> {
        match output {
            Output::Rollup(rollup) => sink.keyed(
                rollup.key().as_bytes(),
                &rollup.encode(),
                &rollup.partition_key(),
            ),
            Output::Tick {
                partition,
                tenant,
                watermark,
            } => {
                let (headers, payload) = tick_message(tenant, *watermark);
                sink.producer()
                    .send_result(
                        FutureRecord::to(&self.events_topic)
                            .key(WATERMARK_HEADER.as_bytes())
                            .payload(payload.as_bytes())
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

#[cfg(test)]
mod tests {
    use super::*;
    use neruba_schemas::codec;
    use neruba_stage::Stage as _;

    const METERED: &str = r#"
[[tenants]]
id = "acme"

[[tenants.meters]]
key = "tokens"
event_type = "llm"
aggregation = "sum"
value = "$.tokens"
group_by = { model = "$.model" }
window = "1m"
"#;

    /// An aggregator under `catalog` opening partition 0 of `dir`.
    fn open(
        dir: &std::path::Path,
        catalog: &str,
        accept: bool,
    ) -> (Aggregator, Result<PartitionState>) {
        let mut config = Config::new("127.0.0.1:9", dir);
        config.accept_meter_changes = accept;
        let catalog = Catalog::from_toml_str(catalog, "test").expect("catalog");
        let metrics = Metrics::register(&prometheus::Registry::new()).expect("metrics");
        let mut aggregator = Aggregator::new(&config, LiveCatalog::new(catalog), metrics);
        let cache = rocksdb::Cache::new_lru_cache(1 << 20);
        let store = Store::open(dir, 0, &aggregator.store_options(), &cache).expect("store");
        // Opened, then its first message (whose apply keeps the catalog's meter shapes).
        let state = aggregator.open(store).and_then(|mut state| {
            aggregator.keep_meters(&mut state, &aggregator.catalog.current())?;
            Ok(state)
        });
        (aggregator, state)
    }

    #[test]
    fn a_restart_may_not_reshape_a_meter_its_state_was_built_under_as_a_reload_may_not() {
        // Was: a restart took whatever catalog it was given (on Kubernetes every catalog change
        // is one), so a new `group_by` started every series of the period again at zero.
        let dir = tempfile::tempdir().expect("dir");
        let regrouped = METERED.replace("group_by = { model = \"$.model\" }", "");
        let removed = METERED.replace("key = \"tokens\"", "key = \"other\"");
        let refusal = |state: Result<PartitionState>| match state {
            Err(crate::Error::Catalog(message)) => message,
            other => panic!("refused: {other:?}"),
        };
        assert!(open(dir.path(), METERED, false).1.is_ok());
        let message = refusal(open(dir.path(), &regrouped, false).1);
        assert!(
            message.starts_with("partition 0: meter `acme/tokens` changes its group_by"),
            "{message}"
        );
        // Removed, the meter's shape is still kept: it comes back only as it was.
        assert!(open(dir.path(), &removed, false).1.is_ok());
        let message = refusal(open(dir.path(), &regrouped, false).1);
        assert!(message.contains("changes its group_by"), "{message}");
        // A reload is checked against the kept shapes too, though the catalog the aggregator
        // started with does not have the meter.
        let (aggregator, state) = open(dir.path(), &removed, false);
        let mut state = state.expect("opened");
        let next = Catalog::from_toml_str(&regrouped, "test").expect("catalog");
        assert_eq!(
            aggregator.catalog.replace(next.clone()),
            Err("meter `acme/tokens` changes its group_by".to_owned())
        );
        // And a catalog that reached a batch without that check (a reload while the
        // partition opened) is checked at the partition's first message under it.
        let message = match aggregator.keep_meters(&mut state, &Arc::new(next)) {
            Err(crate::Error::Catalog(message)) => message,
            other => panic!("refused: {other:?}"),
        };
        assert!(message.contains("changes its group_by"), "{message}");
        drop(state);
        // Told to, the aggregator takes the change, and keeps the new shape from then on.
        assert!(open(dir.path(), &regrouped, true).1.is_ok());
        assert!(open(dir.path(), &regrouped, false).1.is_ok());
        assert!(refusal(open(dir.path(), METERED, false).1).contains("changes its group_by"));
        // A record this build cannot read keeps no partition from opening: its shapes are
        // kept again from the catalog it opens with.
        let (_, state) = open(dir.path(), &regrouped, false);
        let state = state.expect("opened");
        state
            .store()
            .put_now(crate::keys::META_METERS, b"\x07unknown")
            .expect("put");
        drop(state);
        assert!(open(dir.path(), METERED, false).1.is_ok());
        assert!(refusal(open(dir.path(), &regrouped, false).1).contains("changes its group_by"));
    }

    fn event() -> neruba_schemas::Event {
        neruba_schemas::Event {
            tenant: "acme".into(),
            id: "e1".into(),
            event_type: "llm".into(),
            subject: "c1".into(),
            time_ms: 1_700_000_000_000,
            received_ms: 1_700_000_000_001,
            source: None,
            data: serde_json::Map::new(),
        }
    }

    #[test]
    fn only_a_message_not_in_version_2_may_be_a_tick() {
        let event = event();
        assert!(!may_be_tick(Some(&codec::encode(&event))));
        // Version 1 events are JSON, as ticks are: their headers tell them apart.
        assert!(may_be_tick(Some(&codec::encode_json(&event))));
        let (_, tick) = tick_message("acme", 1_700_000_000_000);
        assert!(may_be_tick(Some(tick.as_bytes())));
        assert!(may_be_tick(Some(&[])));
        assert!(may_be_tick(None));
    }

    #[test]
    fn a_tick_is_told_from_an_event_of_either_version() {
        use rdkafka::Timestamp;
        use rdkafka::message::OwnedMessage;
        let message = |payload: Vec<u8>, headers: Option<OwnedHeaders>| {
            OwnedMessage::new(
                Some(payload),
                None,
                "neruba.events".into(),
                Timestamp::NotAvailable,
                0,
                0,
                headers,
            )
        };
        let event = event();
        let (headers, tick) = tick_message("acme", 1_700_000_000_000);
        assert!(is_tick(&message(tick.into_bytes(), Some(headers.clone()))));
        // A JSON payload is a tick only with the header: version 1 events are JSON too.
        assert!(!is_tick(&message(codec::encode_json(&event), None)));
        assert!(!is_tick(&message(
            codec::encode_json(&event),
            Some(OwnedHeaders::new())
        )));
        // A version 2 payload is an event, whatever headers it has.
        assert!(!is_tick(&message(codec::encode(&event), Some(headers))));
    }
}
