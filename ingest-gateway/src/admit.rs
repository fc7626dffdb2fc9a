//! Admission: who may send events, and which of their events are let in. Both doors of the
//! gateway, HTTP requests ([`crate::http`]) and raw-topic messages ([`crate::raw`]), decide it
//! here, so a rule added here holds for both and cannot be forgotten in one of them.
//!
//! Invariants:
//! - the tenant is the one the API key proves (its SHA-256 digest in the catalog), and only
//!   that: nothing in a body or a message can name another;
//! - a key without the `ingest` scope sends nothing (`forbidden`), an unknown one is
//!   `unauthenticated`; the credit routes ask the same question of the `credits` scope
//!   ([`authorize`]);
//! - every event is judged by the same checks in the same order, so the same bad event gets the
//!   same [`RejectCode`] through either door: its size, its CloudEvents attributes and its time
//!   against the receive clock ([`event::validate`]), then the values the tenant's meters read
//!   ([`Tenant::check_values`]);
//! - an event is a repeat if the recent-repeat cache holds its (tenant, customer, id), or an
//!   earlier event of the same request or batch had it: either door counts it `duplicate` and
//!   sends it once.
//!   A repeat the cache knows comes with where its first write landed, if the cache was told
//!   ([`Sighting::Repeat`]); one of an earlier event of the same request comes with none (that
//!   event's own write, or its own repeat, names the position);
//! - a repeat the cache knows is `duplicate` even when, sent new, it would be refused for a
//!   reason time or a catalog reload brings (its `time` past the correction horizon, a value
//!   rule tightened): SPEC's "a repeat is answered `duplicate` … never an error" ([`Refused`]).
//!
//! What stays with each door is transport: where the key travels (`Authorization: Bearer` or
//! the `neruba-api-key` header) and what its absence is called, how bytes become framed events
//! (and so what a broken frame is: a whole-request 400 over HTTP, an `invalid_json` dead
//! letter on the raw topic), and how a refusal is told (a status and a JSON answer, or a dead
//! letter). The per-tenant rate limit is HTTP's alone: the raw topic has no caller to answer
//! `429` to, only a consumer that could slow down.

use crate::dedup::{DedupCache, Key, KeyBatch, KeyTable, Put};
use neruba_kafka::Landed;
use neruba_schemas::catalog::{Scope, Tenant};
use neruba_schemas::codec::{self, Encoding, binary};
use neruba_schemas::event::{self, Limits};
use neruba_schemas::framing::Framed;
use neruba_schemas::{Catalog, RejectCode, Rejection};
use std::borrow::Cow;

/// The tenant a plaintext API key proves, if the key may ingest.
pub fn authenticate<'c>(catalog: &'c Catalog, key: &str) -> Result<&'c Tenant, Rejection> {
    authorize(catalog, key, Scope::Ingest)
}

/// The tenant a plaintext API key proves, if the key has `scope` (`ingest` for events,
/// `credits` for grants and voids): `unauthenticated` for an unknown key, `forbidden` for one
/// without the scope.
pub fn authorize<'c>(
    catalog: &'c Catalog,
    key: &str,
    scope: Scope,
) -> Result<&'c Tenant, Rejection> {
    let Some((tenant, api_key)) = catalog.authenticate(key) else {
        return Err(Rejection::new(
            RejectCode::Unauthenticated,
            "unknown API key",
        ));
    };
    if !api_key.scopes.contains(&scope) {
        let scope = match scope {
            Scope::Ingest => "ingest",
            Scope::Read => "read",
            Scope::Credits => "credits",
        };
        return Err(Rejection::new(
            RejectCode::Forbidden,
            format!("API key `{}` lacks the `{scope}` scope", api_key.name),
        ));
    }
    Ok(tenant)
}

/// An event refused, and the repeat key it would have if it were sent again after it was
/// accepted: only for refusals such a repeat can meet (its time now past the correction
/// horizon, or a meter's value rule tightened by a catalog reload since), whose events had a
/// valid id and subject. SPEC: "A repeat is answered `duplicate` with a 2xx — never an error."
#[derive(Debug)]
pub struct Refused<'a> {
    pub rejection: Rejection,
    /// Its tenant, subject and id: the key of [`Refused::repeat_in`].
    again: Option<(&'a str, Cow<'a, str>, Cow<'a, str>)>,
}

impl From<Rejection> for Refused<'_> {
    fn from(rejection: Rejection) -> Self {
        Self {
            rejection,
            again: None,
        }
    }
}

impl Refused<'_> {
    /// `Some` if the refused event is a repeat of one `cache` holds as accepted: where that
    /// one landed, if known. Either door then counts it `duplicate`, as it would have before
    /// its time or the catalog changed.
    pub fn repeat_in(&self, cache: &DedupCache) -> Option<Option<Landed>> {
        let (tenant, subject, id) = self.again.as_ref()?;
        cache.get(Key {
            tenant,
            subject,
            id,
        })
    }
}

/// One framed event of `tenant`, received at `now_ms`, as the message to send in `encoding`,
/// or why not.
///
/// In version 2 the event's `data` is written straight from its JSON text
/// ([`binary::encode_valid`]) and its values checked where they lie in the message
/// ([`Tenant::check_encoded`]): the message and the outcome are those of the
/// [`neruba_schemas::Event`] a whole parse makes ([`event::validate_envelope`], then
/// [`Tenant::check_values`]), without building its values.
pub fn event<'a>(
    tenant: &'a Tenant,
    framed: Framed<'a>,
    now_ms: i64,
    limits: &Limits,
    encoding: Encoding,
) -> Result<Outgoing<'a>, Refused<'a>> {
    let envelope = framed.value?;
    // Kept for a refusal a repeat can meet (borrowed from the body, as a rule: no copy).
    let (subject, id) = (envelope.subject(), envelope.id());
    let again = |rejection: Rejection| Refused {
        again: matches!(
            rejection.code,
            RejectCode::TimestampTooFarInPast | RejectCode::InvalidValue
        )
        .then(|| Some((tenant.id.as_str(), subject.clone()?, id.clone()?)))
        .flatten(),
        rejection,
    };
    let valid = event::validate_borrowed(envelope, framed.len, &tenant.id, now_ms, limits)
        .map_err(&again)?;
    let payload = match encoding {
        Encoding::Binary => {
            let message = binary::encode_valid(&valid).map_err(|e| {
                Rejection::new(RejectCode::InvalidJson, format!("event is not JSON: {e}"))
            })?;
            tenant
                .check_encoded(&valid.event_type, message.data())
                .map_err(&again)?;
            message.bytes
        }
        Encoding::Json => {
            let event = valid.clone().into_event()?;
            tenant.check_values(&event).map_err(&again)?;
            codec::encode_json(&event)
        }
    };
    Ok(Outgoing {
        tenant: valid.tenant,
        subject: valid.subject,
        id: valid.id,
        time_ms: valid.time_ms,
        payload,
    })
}

/// An event let in, as the events-topic message to send, with what the gateway reads of it
/// after: its repeat key, its partition key and its time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing<'a> {
    pub tenant: &'a str,
    pub subject: Cow<'a, str>,
    pub id: Cow<'a, str>,
    pub time_ms: i64,
    /// The message; emptied once the producer has its copy ([`crate::kafka::EventSink::enqueue`]).
    pub payload: Vec<u8>,
}

impl Outgoing<'_> {
    /// Its repeat key.
    pub fn key(&self) -> Key<'_> {
        Key {
            tenant: self.tenant,
            subject: &self.subject,
            id: &self.id,
        }
    }

    /// Its Kafka key ([`neruba_schemas::Event::partition_key`]), written into `key` (cleared first).
    pub fn write_partition_key(&self, key: &mut String) {
        event::write_partition_key(key, self.tenant, &self.subject);
    }
}

/// What each event of a request or batch is, by its repeat key, in order: a repeat of one the
/// recent-repeat cache holds, or of an earlier event of the same request or batch (the cache
/// only learns an id once the broker acknowledged it, so two copies in one request would
/// otherwise both be sent), or the first sighting.
///
/// Each key is written and hashed once (`KeyBatch`), for the cache's lookups, the request's own
/// set and, once the broker has the events sent, the cache's inserts alike
/// ([`Sightings::remember`]); the cache is read under its lock for the lookups only, each of
/// its shards locked once.
pub fn sightings<'k>(cache: &DedupCache, keys: impl IntoIterator<Item = Key<'k>>) -> Sightings {
    let keys = KeyBatch::new(cache.hasher(), keys);
    let known = match cache.reader() {
        Some(reader) => reader.get_all(&keys),
        None => vec![None; keys.len()],
    };
    // The keys seen here, by the cache's hasher: each key's hash serves both.
    let mut seen = KeyTable::with_capacity(keys.len(), keys.bytes());
    let each = (0..keys.len())
        .zip(known)
        .map(|(i, known)| match (known, keys.get(i)) {
            (Some(landed), _) => Sighting::Repeat(landed),
            // A key the table cannot hold is no repeat: only one it held already is.
            (None, Some((key, hash)))
                if seen.put(cache.hasher(), hash, key, ()) == Put::Replaced =>
            {
                Sighting::Repeat(None)
            }
            (None, _) => Sighting::First,
        })
        .collect();
    Sightings { keys, each }
}

/// What [`sightings`] made of each event of a request or batch, and their keys as it wrote and
/// hashed them.
#[derive(Debug)]
pub struct Sightings {
    keys: KeyBatch,
    each: Vec<Sighting>,
}

impl Sightings {
    /// What each event is, in the order given.
    pub fn each(&self) -> &[Sighting] {
        &self.each
    }

    /// The places of the first sightings, in order: of the events to send.
    pub fn firsts(&self) -> impl Iterator<Item = usize> + '_ {
        (self.each.iter().enumerate())
            .filter(|(_, sighting)| **sighting == Sighting::First)
            .map(|(i, _)| i)
    }

    /// Remembers in `cache` (the one [`sightings`] read) the first `landed` of the events sent
    /// (the first sightings, in order) as accepted, without saying where they landed: the
    /// raw-topic door's, whose events land in order until one does not.
    pub fn remember_sent(&self, cache: &DedupCache, landed: usize) {
        self.remember(cache, self.firsts().take(landed).map(|i| (i, None)));
    }

    /// Remembers in `cache` (the one [`sightings`] read) the events at the places given (their
    /// places in the keys given to [`sightings`]) as accepted, each with where it landed when
    /// known: from the keys as written and hashed for the lookups. A place past them is passed
    /// over.
    pub fn remember(
        &self,
        cache: &DedupCache,
        landed: impl IntoIterator<Item = (usize, Option<Landed>)>,
    ) {
        cache.remember(&self.keys, landed);
    }
}

/// What [`sightings`] made of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sighting {
    /// Send it.
    First,
    /// A `duplicate`: where its first write landed, when the recent-repeat cache knows; `None`
    /// for a repeat within the request or batch, or one the cache holds without a position.
    Repeat(Option<Landed>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue, header};
    use neruba_schemas::catalog::hash_key;
    use neruba_schemas::framing::{self as body, Framing};
    use neruba_schemas::topics::API_KEY_HEADER;
    use std::time::Duration;

    const NOW: i64 = 1_780_000_000_000;

    fn catalog() -> Catalog {
        let text = format!(
            r#"
[[tenants]]
id = "acme"
api_keys = [
  {{ name = "ingest", sha256 = "{}", scopes = ["ingest"] }},
  {{ name = "reader", sha256 = "{}", scopes = ["read"] }},
]
[[tenants.meters]]
key = "tokens"
event_type = "llm.completion"
aggregation = "sum"
value = "$.tokens"
window = "1m"
"#,
            hash_key("ingest-key"),
            hash_key("read-key"),
        );
        Catalog::from_toml_str(&text, "test.toml").expect("catalog")
    }

    /// What the HTTP door makes of one structured event sent with `key`: the code of its
    /// whole-request refusal or of its per-event result (`None` when accepted).
    fn via_http(catalog: &Catalog, key: &str, bytes: &[u8], limits: &Limits) -> Option<String> {
        let mut headers = HeaderMap::new();
        let bearer = HeaderValue::from_str(&format!("Bearer {key}")).expect("header");
        headers.insert(header::AUTHORIZATION, bearer);
        let tenant = match crate::http::caller(catalog, &headers) {
            Ok(tenant) => tenant,
            Err(refused) => return Some(refused.code.to_string()),
        };
        let framed =
            body::split(Framing::Single, bytes, 1, limits.max_event_bytes).expect("one JSON value");
        let cache = DedupCache::new(10, Duration::from_secs(60));
        let admitted =
            crate::http::admit_all(tenant, framed, NOW, limits, &cache, Encoding::Binary);
        admitted.results[0].code.map(str::to_owned)
    }

    /// What the raw-topic door makes of the same event, sent as one message with `key`.
    fn via_raw(catalog: &Catalog, key: &str, bytes: &[u8], limits: &Limits) -> Option<String> {
        let headers = [(API_KEY_HEADER, Some(key.as_bytes()))];
        crate::raw::admit_message(catalog, limits, &headers, bytes, NOW, Encoding::Binary)
            .err()
            .map(|refused| refused.rejection.code.to_string())
    }

    #[test]
    fn a_bad_event_gets_the_same_code_over_http_and_from_the_raw_topic() {
        let catalog = catalog();
        let limits = Limits {
            max_event_bytes: 1024,
            ..Limits::default()
        };
        let at = |ms: i64| event::format_time_ms(ms);
        let good = serde_json::json!({"specversion": "1.0", "id": "e-1", "type": "llm.completion",
            "subject": "cust-1", "time": at(NOW - 1_000), "data": {"tokens": "12"}});
        let with = |field: &str, value: serde_json::Value| {
            let mut event = good.clone();
            event[field] = value;
            event.to_string()
        };
        let without = |field: &str| {
            let mut event = good.clone();
            event.as_object_mut().map(|o| o.remove(field));
            event.to_string()
        };
        let cases: Vec<(&str, String, Option<RejectCode>)> = vec![
            ("ingest-key", good.to_string(), None),
            (
                "nobody",
                good.to_string(),
                Some(RejectCode::Unauthenticated),
            ),
            ("read-key", good.to_string(), Some(RejectCode::Forbidden)),
            (
                "ingest-key",
                "\"text\"".to_owned(),
                Some(RejectCode::InvalidJson),
            ),
            (
                "ingest-key",
                without("subject"),
                Some(RejectCode::MissingField),
            ),
            (
                "ingest-key",
                with("id", "".into()),
                Some(RejectCode::InvalidField),
            ),
            (
                "ingest-key",
                with("source", "x".repeat(2000).into()),
                Some(RejectCode::EventTooLarge),
            ),
            (
                "ingest-key",
                with("time", at(NOW + 10 * 60_000).into()),
                Some(RejectCode::TimestampInFuture),
            ),
            (
                "ingest-key",
                with("time", at(NOW - 40 * 86_400_000).into()),
                Some(RejectCode::TimestampTooFarInPast),
            ),
            (
                "ingest-key",
                with("data", serde_json::json!({"tokens": "lots"})),
                Some(RejectCode::InvalidValue),
            ),
        ];
        for (key, text, expected) in cases {
            let expected = expected.map(|code| code.to_string());
            let http = via_http(&catalog, key, text.as_bytes(), &limits);
            let raw = via_raw(&catalog, key, text.as_bytes(), &limits);
            assert_eq!((&http, &raw), (&expected, &expected), "{key}: {text}");
        }
    }

    #[test]
    fn a_repeat_refused_now_is_a_duplicate_through_either_door() {
        // Was: an accepted event sent again once its time had passed the correction horizon
        // (or after a catalog reload tightened a value rule) was answered `rejected` (a single
        // event: 422), or dead-lettered from the raw topic, though it was written and counted.
        let catalog = catalog();
        let limits = Limits::default();
        let tenant = authenticate(&catalog, "ingest-key").expect("tenant");
        let cache = DedupCache::new(10, Duration::from_secs(60));
        let horizon = limits.correction_horizon_ms;
        let event = |id: &str, time_ms: i64, tokens: &str| {
            serde_json::json!({"specversion": "1.0", "id": id, "type": "llm.completion",
                "subject": "cust-1", "time": event::format_time_ms(time_ms),
                "data": {"tokens": tokens}})
            .to_string()
        };
        // Accepted at NOW, a second inside the horizon; its value would be refused now.
        let old = event("e-old", NOW - horizon + 1_000, "5");
        let odd = event("e-odd", NOW - 1_000, "lots");
        cache.insert(Key {
            tenant: "acme",
            subject: "cust-1",
            id: "e-old",
        });
        cache.insert(Key {
            tenant: "acme",
            subject: "cust-1",
            id: "e-odd",
        });
        let later = NOW + 5_000;
        let outcomes = |bytes: &str| {
            let framed = body::split(Framing::Single, bytes.as_bytes(), 1, limits.max_event_bytes)
                .expect("one JSON value");
            let admitted =
                crate::http::admit_all(tenant, framed, later, &limits, &cache, Encoding::Binary);
            let result = &admitted.results[0];
            (result.status, result.code)
        };
        let raw = |bytes: &str| {
            let headers = [(API_KEY_HEADER, Some("ingest-key".as_bytes()))];
            match crate::raw::admit_message(
                &catalog,
                &limits,
                &headers,
                bytes.as_bytes(),
                later,
                Encoding::Binary,
            ) {
                Ok(_) => "accepted".to_owned(),
                Err(refused) if refused.repeat_in(&cache).is_some() => "duplicate".to_owned(),
                Err(refused) => refused.rejection.code.to_string(),
            }
        };
        for repeat in [&old, &odd] {
            assert_eq!(
                outcomes(repeat),
                (crate::http::Status::Duplicate, None),
                "{repeat}"
            );
            assert_eq!(raw(repeat), "duplicate", "{repeat}");
        }
        // Another customer's event of the same id, and events never accepted, are refused.
        let other = old.replace("cust-1", "cust-2");
        let never = event("e-new", NOW - horizon + 1_000, "5");
        for (refused, code) in [
            (&other, "timestamp_too_far_in_past"),
            (&never, "timestamp_too_far_in_past"),
            (&event("e-new", NOW, "lots"), "invalid_value"),
        ] {
            assert_eq!(
                outcomes(refused),
                (crate::http::Status::Rejected, Some(code)),
                "{refused}"
            );
            assert_eq!(raw(refused), code, "{refused}");
        }
        // A refusal no accepted event can meet when sent again (here a missing `type`) is
        // never looked up, whatever the cache holds.
        let mut untyped: serde_json::Value = serde_json::from_str(&old).expect("json");
        untyped.as_object_mut().map(|o| o.remove("type"));
        let untyped = untyped.to_string();
        assert_eq!(
            outcomes(&untyped),
            (crate::http::Status::Rejected, Some("missing_field"))
        );
        assert_eq!(raw(&untyped), "missing_field");
    }

    /// What the gateway sent before November 30, 2026: the event parsed whole into a
    /// `Value`, validated, its values checked, then encoded.
    fn built_whole(tenant: &Tenant, bytes: &[u8], limits: &Limits) -> Result<Vec<u8>, String> {
        let value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let event =
            event::validate(value, bytes.len(), &tenant.id, NOW, limits).map_err(|r| r.message)?;
        tenant.check_values(&event).map_err(|r| r.message)?;
        Ok(codec::encode(&event))
    }

    #[test]
    fn an_event_is_sent_and_judged_as_when_it_was_built_whole() {
        // Meters reading nested values, filtering, counting distinct values, of two types.
        let catalog = Catalog::from_toml_str(
            r#"
[[tenants]]
id = "acme"
[[tenants.meters]]
key = "tokens"
event_type = "llm"
aggregation = "sum"
value = "$.usage.tokens"
group_by = { model = "$.model" }
filters = { "$.status" = "ok" }
window = "1m"
[[tenants.meters]]
key = "users"
event_type = "llm"
aggregation = "unique_count"
value = "$.user"
window = "1m"
[[tenants.meters]]
key = "calls"
event_type = "api"
aggregation = "count"
window = "1m"
"#,
            "test.toml",
        )
        .expect("catalog");
        let tenant = catalog.tenant("acme").expect("tenant");
        let limits = Limits::default();
        let json = |event_type: &str, data: &str| {
            format!(r#"{{"id":"e-1","type":"{event_type}","subject":"c","data":{data}}}"#)
        };
        let cases = [
            json(
                "llm",
                r#"{"usage":{"tokens":12.50},"status":"ok","user":"u\"1","model":"m"}"#,
            ),
            // The last of a member given twice counts, for the value as for the message.
            json(
                "llm",
                r#"{"user":"u","status":"ok","usage":{"tokens":-1},"usage":{"tokens":3}}"#,
            ),
            json("llm", r#"{"usage":{"tokens":-1},"status":"ok","user":"u"}"#),
            json(
                "llm",
                r#"{"usage":{"tokens":"12"},"status":"ok","user":"u"}"#,
            ),
            json(
                "llm",
                r#"{"usage":{"tokens":1e30},"status":"ok","user":"u"}"#,
            ),
            // Filtered out: its value is not read.
            json(
                "llm",
                r#"{"usage":{"tokens":"x"},"status":"failed","user":"u"}"#,
            ),
            json("llm", r#"{"usage":{"tokens":1},"status":"ok","user":[1]}"#),
            json("llm", r#"{"usage":{"tokens":1},"status":"ok"}"#),
            json(
                "llm",
                r#"{"usage":{"tokens":-0},"status":"ok","user":-9223372036854775809}"#,
            ),
            json(
                "api",
                r#"{"anything":[1,{"b":2,"a":null}],"z":true,"a":"\u00e9\n"}"#,
            ),
            json("api", "{}"),
            json("api", "null"),
            json("other", r#"{"tokens":"x"}"#),
        ];
        let mut accepted = 0;
        for case in &cases {
            let framed = body::split(Framing::Single, case.as_bytes(), 1, limits.max_event_bytes)
                .expect("one JSON value")
                .remove(0)
                .framed();
            let sent = event(tenant, framed, NOW, &limits, Encoding::Binary);
            let sent = sent.map(|out| out.payload).map_err(|r| r.rejection.message);
            assert_eq!(
                sent,
                built_whole(tenant, case.as_bytes(), &limits),
                "{case}"
            );
            accepted += usize::from(sent.is_ok());
        }
        // All but the negative, too large, not scalar and absent values.
        assert_eq!(accepted, 9);
    }

    #[test]
    fn a_repeat_is_one_sighting_per_tenant_customer_and_id() {
        let cache = DedupCache::new(10, Duration::from_secs(60));
        let key = |tenant, id| Key {
            tenant,
            subject: "s",
            id,
        };
        cache.insert(key("acme", "sent-before"));
        let landed = Landed {
            partition: 1,
            offset: 57,
        };
        cache.insert_landed(key("acme", "written-before"), landed);
        let other_customer = Key {
            subject: "t",
            ..key("acme", "written-before")
        };
        let asked = [
            key("acme", "sent-before"),
            key("acme", "e-1"),
            key("acme", "e-1"),
            key("beta", "e-1"),
            key("acme", "written-before"),
            key("acme", "sent-before"),
            key("beta", "e-1"),
            key("beta", "e-2"),
            // The same id for another customer is another event, here as in the aggregator.
            other_customer,
        ];
        // A repeat the cache knows names its first write's position; one within the request,
        // or one the cache holds without a position, names none.
        assert_eq!(
            sightings(&cache, asked).each(),
            [
                Sighting::Repeat(None),
                Sighting::First,
                Sighting::Repeat(None),
                Sighting::First,
                Sighting::Repeat(Some(landed)),
                Sighting::Repeat(None),
                Sighting::Repeat(None),
                Sighting::First,
                Sighting::First,
            ]
        );
    }

    #[test]
    fn the_events_remembered_from_their_sightings_are_those_at_the_places_given() {
        let cache = DedupCache::new(100, Duration::from_secs(60));
        let key = |tenant, id| Key {
            tenant,
            subject: "s",
            id,
        };
        let landed = Landed {
            partition: 2,
            offset: 41,
        };
        let asked = [
            key("acme", "e-0"),
            key("acme", "e-1"),
            key("acme", "e-1"),
            key("beta", "e-1"),
            key("acme", "e-2"),
        ];
        let seen = sightings(&cache, asked);
        use Sighting::{First, Repeat};
        assert_eq!(seen.each(), [First, First, Repeat(None), First, First]);
        assert_eq!(seen.firsts().collect::<Vec<_>>(), [0, 1, 3, 4]);
        // The broker has the first and the fourth; the second and the fifth were not
        // delivered; a place past the keys names none.
        seen.remember(&cache, [(0, Some(landed)), (3, None), (9, None)]);
        assert_eq!(cache.get(key("acme", "e-0")), Some(Some(landed)));
        assert_eq!(cache.get(key("beta", "e-1")), Some(None));
        assert_eq!(cache.get(key("acme", "e-1")), None);
        assert_eq!(cache.get(key("acme", "e-2")), None);
        assert_eq!(cache.len(), 2);
        assert_eq!(
            sightings(&cache, asked).each(),
            [
                Repeat(Some(landed)),
                First,
                Repeat(None),
                Repeat(None),
                First
            ]
        );

        // The raw-topic door's: of the events sent (the first sightings), those that landed,
        // in order.
        let cache = DedupCache::new(100, Duration::from_secs(60));
        let seen = sightings(&cache, asked);
        seen.remember_sent(&cache, 3);
        let held: Vec<bool> = asked.iter().map(|key| cache.contains(*key)).collect();
        assert_eq!(held, [true, true, true, true, false]);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.get(key("beta", "e-1")), Some(None));
    }

    #[test]
    fn the_keys_seen_in_a_request_are_a_set_of_tenant_and_id() {
        // Against a set of owned pairs, each key given several times in a scattered order:
        // ids that are prefixes of one another, the same id under several tenants, an empty id,
        // one with a NUL, and tenants one of which is a prefix of another, whose keys would run
        // together without the separator ("ac" + "mee-1" and "acme" + "e-1").
        let cache = DedupCache::new(10, Duration::from_secs(60));
        let mut reference = std::collections::HashSet::new();
        let mut asked = Vec::new();
        let mut expected = Vec::new();
        for i in 0..3_000u32 {
            let tenant = match i % 3 {
                0 => "acme",
                1 => "beta",
                _ => "ac",
            };
            let id = match (i * 7_919) % 1_004 {
                1_000 => String::new(),
                1_001 => "e-1\0beta".to_owned(),
                1_002 => "mee-1".to_owned(),
                n => format!("e-{}", n / 2),
            };
            expected.push(if reference.insert((tenant, id.clone())) {
                Sighting::First
            } else {
                Sighting::Repeat(None)
            });
            asked.push((tenant, id));
        }
        assert!(reference.contains(&("ac", "mee-1".to_owned())));
        assert!(reference.contains(&("acme", "e-1".to_owned())));
        let keys = asked.iter().map(|(tenant, id)| Key {
            tenant,
            subject: "s",
            id,
        });
        assert_eq!(sightings(&cache, keys).each(), expected);
    }
}
