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

/// Each printed item's id with a digest of its content, to tell a faithful repeat from a
/// conflicting one: a tail follows the ledger for good, so it keeps 16 bytes of each item
/// besides its id (it kept each item whole, about a kilobyte, until December 6, 2026).
#[derive(Default)]
struct Seen(HashMap<String, [u8; 16]>);

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    New,
    Repeat,
    Conflicting,
}

impl Seen {
    /// What `item` is, as the ledger has been read so far; a new one is remembered.
    fn check(&mut self, item: &LineItem) -> Verdict {
        use sha2::Digest as _;
        // The item as encoded, not as it arrived: a repeat that spells a field another way
        // (an escape, a key's place) is the same item.
        let hash = sha2::Sha256::digest(item.encode());
        let mut digest = [0u8; 16];
        digest.copy_from_slice(&hash[..16]);
        match self.0.get(&item.id) {
            Some(earlier) if *earlier == digest => Verdict::Repeat,
            Some(_) => Verdict::Conflicting,
            None => {
                self.0.insert(item.id.clone(), digest);
                Verdict::New
            }
        }
    }
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
    let mut seen = Seen::default();
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
            match seen.check(&item) {
                Verdict::Repeat => counts.repeats += 1,
                Verdict::Conflicting => {
                    counts.conflicting += 1;
                    eprintln!(
                        "line item {} appears again with different content (partition {} offset {})",
                        item.id,
                        message.partition(),
                        message.offset()
                    );
                }
                Verdict::New => {
                    out.write_all(payload)?;
                    out.write_all(b"\n")?;
                    out.flush()?;
                    counts.printed += 1;
                }
            }
            Ok(())
        },
    )?;
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_item_seen_again_is_a_repeat_and_with_other_content_a_conflict() {
        let item: LineItem = serde_json::from_value(serde_json::json!({
            "v": 1, "id": "li_1", "kind": "usage", "tenant": "acme", "customer": "c",
            "meter": "m", "group": {}, "period_start": "2026-11-01T00:00:00Z",
            "period_end": "2026-12-01T00:00:00Z", "window_start": "2026-11-01T10:00:00Z",
            "window_end": "2026-11-01T10:01:00Z", "window_quantity": "1", "window_events": 1,
            "period_quantity": "1", "amount": "0.10", "period_amount": "0.10", "currency": "USD",
            "price_plan": "p", "price_version": 1, "revision": 1, "supersedes": null
        }))
        .expect("an item");
        let mut seen = Seen::default();
        assert_eq!(seen.check(&item), Verdict::New);
        assert_eq!(seen.check(&item.clone()), Verdict::Repeat);
        let other = LineItem {
            amount: rust_decimal::Decimal::new(11, 2),
            ..item.clone()
        };
        assert_eq!(seen.check(&other), Verdict::Conflicting);
        let next = LineItem {
            id: "li_2".into(),
            ..other
        };
        assert_eq!(seen.check(&next), Verdict::New);
        // The first content stays the one a repeat is compared with.
        assert_eq!(seen.check(&item), Verdict::Repeat);
    }
}
