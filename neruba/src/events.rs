//! `neruba events tail`: the events topic as NDJSON, for people.
//!
//! The gateway writes events in version 2 of the events-topic encoding (binary, see
//! `neruba_schemas::codec`), which no Kafka tool prints readably; this prints each event as one
//! JSON object with where it is (`partition`, `offset`), its `encoding` version, its envelope and
//! its `data` with numbers as the client sent them. Version 1 messages (JSON) print the same
//! way. The aggregator's watermark ticks on the topic ([`neruba_aggregator::is_tick`]) are not
//! events: they are counted, not printed. A message that
//! is not an event is reported on stderr with its position and the tail goes on.

use neruba_schemas::{Event, codec};
use rdkafka::Message;
use serde::Serialize;
use std::io::Write;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What a tail saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TailCounts {
    pub printed: u64,
    /// Watermark ticks the aggregators wrote to the topic.
    pub ticks: u64,
    pub undecodable: u64,
}

/// One printed line.
#[derive(Serialize)]
struct Line<'a> {
    partition: i32,
    offset: i64,
    encoding: u8,
    tenant: &'a str,
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    subject: &'a str,
    /// Event time, Unix milliseconds.
    time: i64,
    /// When the gateway received it, Unix milliseconds.
    received: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a str>,
    data: &'a serde_json::Map<String, serde_json::Value>,
}

/// Reads `topic` from the beginning and writes each event as one JSON line to `out`, until
/// `shutdown`, or until it has read what the topic held when it started and nothing more
/// arrived for `exit_when_idle` (see `follow`). Blocking.
pub fn tail(
    brokers: &str,
    kafka_options: &[(String, String)],
    topic: &str,
    tenant: Option<&str>,
    exit_when_idle: Option<Duration>,
    shutdown: &CancellationToken,
    out: &mut dyn Write,
) -> anyhow::Result<TailCounts> {
    let mut counts = TailCounts::default();
    crate::follow::follow(
        brokers,
        kafka_options,
        "neruba-events-tail",
        topic,
        exit_when_idle,
        shutdown,
        |message| {
            if neruba_aggregator::is_tick(message) {
                counts.ticks += 1;
                return Ok(());
            }
            let payload = message.payload().unwrap_or_default();
            let event = match codec::decode_readable(payload) {
                Ok(event) => event,
                Err(e) => {
                    counts.undecodable += 1;
                    eprintln!(
                        "partition {} offset {}: not an event: {e}",
                        message.partition(),
                        message.offset()
                    );
                    return Ok(());
                }
            };
            if tenant.is_some_and(|t| t != event.tenant) {
                return Ok(());
            }
            let line = line(message.partition(), message.offset(), payload, &event);
            serde_json::to_writer(&mut *out, &line)?;
            out.write_all(b"\n")?;
            out.flush()?;
            counts.printed += 1;
            Ok(())
        },
    )?;
    Ok(counts)
}

fn line<'a>(partition: i32, offset: i64, payload: &[u8], event: &'a Event) -> Line<'a> {
    Line {
        partition,
        offset,
        encoding: codec::version_of(payload),
        tenant: &event.tenant,
        id: &event.id,
        event_type: &event.event_type,
        subject: &event.subject,
        time: event.time_ms,
        received: event.received_ms,
        source: event.source.as_deref(),
        data: &event.data,
    }
}
