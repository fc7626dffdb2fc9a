//! What each fuzz target checks, as plain functions (so a unit test can run a corpus through
//! them without AFL). Each panics when an invariant breaks; AFL records the input as a crash.
//!
//! Invariants:
//! - no input makes the body framing, the decoder or the validator panic (they return errors);
//! - framing never invents bytes: each framed event is a part of the body, and a batch or
//!   NDJSON body never yields more events than the limit;
//! - what the events-topic decoder accepts re-encodes to bytes that decode to the same event;
//! - what the validator accepts crosses the events topic with every attribute unchanged, and
//!   the aggregator measures it exactly as the gateway did.

use neruba_schemas::event::{self, Limits};
use neruba_schemas::framing::{self, Framing};
use neruba_schemas::{Catalog, codec, measure};

/// A receive time fixed for every run, so a crash reproduces.
pub const NOW_MS: i64 = 1_795_000_000_000;

const CATALOG: &str = r#"
[[tenants]]
id = "acme"
[[tenants.meters]]
key = "tokens"
event_type = "llm"
aggregation = "sum"
value = "$.tokens"
group_by = { model = "$.model" }
window = "1m"
[[tenants.meters]]
key = "users"
event_type = "llm"
aggregation = "unique_count"
value = "$.user"
window = "1m"
[[tenants.meters]]
key = "cached"
event_type = "llm"
aggregation = "sum"
value = "$.usage.cached[1]"
filters = { "$.model" = "small", "$.usage.ok" = "true" }
window = "1m"
[[tenants.meters]]
key = "refunds"
event_type = "refund"
aggregation = "sum"
value = "$.amount"
allow_negative = true
window = "1h"
"#;

/// Frames a body under every content type, as the gateway would; the first byte chooses a
/// batch limit from 0 to 255 so the limit's edges are reached.
pub fn body_framing(bytes: &[u8]) {
    let Some((&limit, body)) = bytes.split_first() else {
        return;
    };
    let limit = usize::from(limit);
    for content_type in [
        "application/cloudevents+json",
        "application/cloudevents-batch+json",
        "application/json",
        "application/x-ndjson",
    ] {
        let Some(framing) = framing::framing_of(content_type, body) else {
            panic!("{content_type} has no framing");
        };
        // Events over eight bytes a unit of the limit are read as oversized: both reads run.
        let Ok(frames) = framing::split(framing, body, limit, limit * 8) else {
            continue;
        };
        // Each frame read, as the gateway admits them.
        let framed: Vec<framing::Framed> = frames.into_iter().map(framing::Frame::framed).collect();
        if framing != Framing::Single {
            assert!(
                framed.len() <= limit,
                "{} events over a limit of {limit}",
                framed.len()
            );
        }
        let total: usize = framed.iter().map(|f| f.len).sum();
        assert!(
            total <= body.len(),
            "framed {total} bytes of a {}-byte body",
            body.len()
        );
    }
}

/// Decodes events-topic bytes (either version); what decodes must round-trip through both
/// encodings, and the readable decode must not fail where the metering one succeeds.
pub fn event_decoder(bytes: &[u8]) {
    let mut decoder = codec::Decoder::default();
    if let Ok(event) = decoder.decode(bytes) {
        for encoding in [codec::Encoding::Binary, codec::Encoding::Json] {
            let again = decoder.decode(&encoding.encode(&event));
            assert_eq!(
                again.ok().as_ref(),
                Some(&event),
                "re-encoded event differs ({encoding:?})"
            );
        }
        assert!(
            codec::decode_readable(bytes).is_ok(),
            "readable decode refused it"
        );
    }
}

/// Validates a JSON body as one event; what is valid must reach the aggregator unchanged in
/// every attribute and be measured there exactly as the gateway measured it (numbers travel as
/// text on the topic, so the values, not the JSON, are compared).
pub fn event_validation(bytes: &[u8], catalog: &Catalog) {
    // The gateway reads an event's envelope in one pass; it must judge every input as the
    // whole value does: the same event, code and message, or the same JSON error.
    let limits = Limits::default();
    let judged = |r: Result<neruba_schemas::Event, neruba_schemas::Rejection>| {
        r.map_err(|r| (r.code, r.message))
    };
    let whole = serde_json::from_slice::<serde_json::Value>(bytes)
        .map(|value| judged(event::validate(value, bytes.len(), "acme", NOW_MS, &limits)));
    let one_pass = event::Envelope::parse(bytes).map(|envelope| {
        judged(event::validate_envelope(
            envelope,
            bytes.len(),
            "acme",
            NOW_MS,
            &limits,
        ))
    });
    assert_eq!(
        one_pass.map_err(|e| e.to_string()),
        whole.as_ref().map(Clone::clone).map_err(|e| e.to_string()),
        "the one-pass read judged differently"
    );
    let Ok(Ok(event)) = whole else {
        return;
    };
    // The gateway writes a valid event's message from its text and checks its values where
    // they lie in it: the same bytes as the event built whole, and the same judgement.
    if let Ok(Ok(valid)) = event::Envelope::parse(bytes)
        .map(|envelope| event::validate_borrowed(envelope, bytes.len(), "acme", NOW_MS, &limits))
    {
        let message = codec::binary::encode_valid(&valid)
            .unwrap_or_else(|e| panic!("a valid event's data does not transcode: {e}"));
        assert_eq!(
            message.bytes,
            codec::encode(&event),
            "written from its text, it differs"
        );
        if let Some(tenant) = catalog.tenant("acme") {
            assert_eq!(
                tenant.check_encoded(&event.event_type, message.data()),
                tenant.check_values(&event),
                "judged differently where its values lie"
            );
        }
    }
    let decoded = codec::Decoder::default().decode(&codec::encode(&event));
    let decoded = decoded.unwrap_or_else(|e| panic!("a valid event does not decode: {e}"));
    let from_json = codec::Decoder::default().decode(&codec::encode_json(&event));
    assert_eq!(
        from_json.ok().as_ref(),
        Some(&decoded),
        "the two encodings differ"
    );
    let attributes = |e: &neruba_schemas::Event| {
        (
            e.tenant.clone(),
            e.id.clone(),
            e.event_type.clone(),
            e.subject.clone(),
            e.time_ms,
            e.received_ms,
            e.source.clone(),
        )
    };
    assert_eq!(
        attributes(&decoded),
        attributes(&event),
        "attributes changed"
    );
    if let Some(tenant) = catalog.tenant("acme") {
        let measured = |e: &neruba_schemas::Event| {
            measure::measure(tenant, e)
                .map(|all| {
                    all.iter()
                        .map(|m| {
                            (
                                m.meter.key.clone(),
                                m.value,
                                m.distinct.clone(),
                                m.group.clone(),
                            )
                        })
                        .collect::<Vec<_>>()
                })
                .map_err(|r| r.code)
        };
        assert_eq!(measured(&decoded), measured(&event), "measured differently");
    }
}

/// The catalog the validation target measures against.
pub fn catalog() -> Catalog {
    Catalog::from_toml_str(CATALOG, "fuzz").unwrap_or_else(|e| panic!("fuzz catalog: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every corpus seed runs through both targets without a failure.
    #[test]
    fn corpus_seeds_pass() {
        let catalog = catalog();
        for dir in [
            "corpus/body_framing",
            "corpus/event_decoder",
            "corpus/event_validation",
        ] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let bytes = std::fs::read(entry.path()).unwrap_or_default();
                body_framing(&bytes);
                event_decoder(&bytes);
                event_validation(&bytes, &catalog);
            }
        }
    }
}
