//! `neruba ledger tail`: the ledger topic as NDJSON, each line item id once.
//!
//! The ledger may carry an item twice (a rater crash between producing and writing its state
//! re-sends it), always with the identical id and content; a ledger consumer dedupes by id, and
//! so does this one. A repeated id with different content would break that contract: it is
//! reported on stderr, never printed. Grants, voids and ticks on the ledger topic (they carry
//! [`topics::RECORD_HEADER`]) are not line items and are skipped.

use ahash::AHashMap as HashMap;
use neruba_schemas::ledger::LineItem;
use neruba_schemas::topics;
use rdkafka::message::Headers;

use rdkafka::Message;
use std::io::Write;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What a tail saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TailCounts {
    pub printed: u64,
    pub repeats: u64,
    pub conflicting: u64,
    pub undecodable: u64,
    /// Ledger records that are not line items (grants, voids, ticks: [`topics::RECORD_HEADER`]).
    pub other_records: u64,
}

/// Reads `topic` from the beginning and writes each new line item as one JSON line to `out`,
/// until `shutdown`, or until it has read what the topic held when it started and nothing
/// more arrived for `exit_when_idle` (see `follow`). Blocking.
pub fn tail(
    brokers: &str,
    kafka_options: &[(String, String)],
    topic: &str,
    tenant: Option<&str>,
    exit_when_idle: Option<Duration>,
    shutdown: &CancellationToken,
    out: &mut dyn Write,
) -> anyhow::Result<TailCounts> {
    // Each printed item by id, to tell a faithful repeat from a conflicting one.
    let mut seen: HashMap<String, LineItem> = HashMap::default();
    let mut counts = TailCounts::default();
    crate::follow::follow(
        brokers,
        kafka_options,
        "neruba-ledger-tail",
        topic,
        exit_when_idle,
        shutdown,
        |message| {
            // Grants, voids and clock ticks share the ledger (one order per customer); they
            // carry a record header, line items none.
            let other = message
                .headers()
                .is_some_and(|h| h.iter().any(|h| h.key == topics::RECORD_HEADER));
            if other {
                counts.other_records += 1;
                return Ok(());
            }
            let payload = message.payload().unwrap_or_default();
            let item = match LineItem::decode(payload) {
                Ok(item) => item,
                Err(e) => {
                    counts.undecodable += 1;
                    eprintln!(
                        "partition {} offset {}: not a line item: {e}",
                        message.partition(),
                        message.offset()
                    );
                    return Ok(());
                }
            };
            if tenant.is_some_and(|t| t != item.tenant) {
                return Ok(());
            }
            match seen.get(&item.id) {
                Some(earlier) if *earlier == item => counts.repeats += 1,
                Some(_) => {
                    counts.conflicting += 1;
                    eprintln!(
                        "line item {} appears again with different content (partition {} offset {})",
                        item.id,
                        message.partition(),
                        message.offset()
                    );
                }
                None => {
                    out.write_all(payload)?;
                    out.write_all(b"\n")?;
                    out.flush()?;
                    counts.printed += 1;
                    seen.insert(item.id.clone(), item);
                }
            }
            Ok(())
        },
    )?;
    Ok(counts)
}
