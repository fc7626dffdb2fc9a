//! The HTTP surface: `POST /v1/events`, `/healthz`, `/readyz`, `/metrics`, and the credit
//! routes `POST /v1/customers/{customer}/grants`, `…/grants/{id}/void` and `PUT`/`DELETE`
//! `…/balance-rules/{currency}` ([`crate::credits`]).
//!
//! Invariants:
//! - the tenant is the one the API key proves; nothing in the body can change it;
//! - every event of an accepted-for-processing request gets one outcome, in request order;
//! - `accepted` is only ever said after the broker acknowledged the event; if any valid event of
//!   a request could not be delivered, the whole request is answered 503 with `Retry-After`
//!   (the events that did land are remembered, so the retry reports them as `duplicate`);
//! - a repeat is answered `duplicate` with a 2xx, never an error;
//! - the answer's `positions` name, for each events-topic partition, the highest offset among
//!   the events this request accepted (from the delivery reports `accepted` waits for) and the
//!   repeats whose first write this gateway remembers (the recent-repeat cache keeps where an
//!   event it accepted landed): `<topic>:<partition>:<offset>`, by partition; empty when
//!   nothing was written or remembered. So a retry of a request whose answer was lost names
//!   the positions the lost answer would have. A repeat of an event earlier in the same
//!   request adds that event's position (already named), and a repeat the cache holds without
//!   a position (one the raw-topic path accepted) adds none. What a read passes as
//!   `min_position` to see its own events;
//! - the caller is authenticated before a byte of the body is read, and the body is read within
//!   a deadline and a size limit counted on its decoded bytes (see [`crate::encoding`]), so
//!   neither a stranger nor a slow or inflating body can hold a handler or its memory;
//! - every tenant is rate limited: by its catalog `rate_limit`, else by the gateway's default.
//!
//! Who may send and which events are let in is decided in [`crate::admit`], which the raw-topic
//! path shares; this module is the HTTP around it.

use crate::admit::{self, Outgoing, Sighting, Sightings};
use crate::binary::{self, Binding};
use crate::budget::{BodyBudget, Share};
use crate::credits::{self, LedgerWriter};
use crate::dedup::DedupCache;
use crate::encoding::{self, BodyError, Encoding};
use crate::kafka::EventSink;
use crate::metrics::{Metrics, Tally};
use crate::ratelimit::RateLimiter;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use neruba_kafka::Landed;
use neruba_schemas::catalog::{RateLimit, Scope, Tenant};
use neruba_schemas::event::{self, Envelope, Limits};
use neruba_schemas::framing::{self as body, Frame, FrameError, Framing};
use neruba_schemas::{Catalog, LiveCatalog, RejectCode, Rejection, codec};
use serde::Serialize;
use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Request-independent state shared by all handlers.
#[derive(Debug)]
pub struct AppState {
    pub catalog: LiveCatalog,
    pub dedup: DedupCache,
    pub sink: EventSink,
    /// Writes credit grants, voids and balance rules to the ledger topic (see
    /// [`crate::credits`]).
    pub ledger: LedgerWriter,
    pub limits: Limits,
    pub max_body_bytes: usize,
    /// Bytes of request bodies held at once, across requests (see [`crate::budget`]).
    pub body_budget: BodyBudget,
    pub max_batch_events: usize,
    /// The whole body must arrive within this; a stalled upload must not hold a handler (and
    /// its memory) for ever.
    pub body_read_timeout: Duration,
    pub rate_limiter: RateLimiter,
    /// The limit of tenants whose catalog entry sets none.
    pub default_rate_limit: RateLimit,
    pub metrics: Metrics,
    /// Registries exposed on `/metrics`: the gateway's, and those of components sharing the
    /// process (`neruba dev`).
    pub registries: Vec<prometheus::Registry>,
    pub broker_ready: AtomicBool,
}

/// The gateway's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/events", post(ingest))
        .route("/v1/customers/{customer}/grants", post(credits::grant))
        .route(
            "/v1/customers/{customer}/grants/{id}/void",
            post(credits::void),
        )
        .route(
            "/v1/customers/{customer}/balance-rules/{currency}",
            put(credits::put_rule).delete(credits::delete_rule),
        )
        .route("/v1/openapi.json", get(openapi))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Outcome of one event, in request order.
#[derive(Debug, Serialize)]
pub(crate) struct EventResult<'a> {
    /// The event's `id` when it could be read (borrowed from the body when it was there
    /// without escapes).
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<Cow<'a, str>>,
    pub(crate) status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Status {
    Accepted,
    Duplicate,
    Rejected,
    /// Valid, but the broker did not take it: only inside a 503 answer.
    NotDelivered,
}

#[derive(Debug, Serialize)]
struct IngestResponse<'a> {
    accepted: usize,
    duplicate: usize,
    rejected: usize,
    /// Per events-topic partition, the highest offset among the events accepted and the
    /// repeats whose first write is remembered, by partition.
    positions: Vec<String>,
    results: Vec<EventResult<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorBody>,
}

#[derive(Debug, Serialize)]
struct ErrorBody {
    code: &'static str,
    message: String,
}

#[derive(Debug, Serialize)]
struct ErrorResponse {
    error: ErrorBody,
}

pub(crate) fn error_response(
    status: StatusCode,
    code: &'static str,
    message: impl Into<String>,
) -> Response {
    let body = ErrorResponse {
        error: ErrorBody {
            code,
            message: message.into(),
        },
    };
    (status, axum::Json(body)).into_response()
}

/// `response` with `Retry-After: <wait in whole seconds, rounded up, at least 1>` (rounded
/// down, a client that waited as told came back before the wait had passed).
pub(crate) fn with_retry_after(mut response: Response, wait: Duration) -> Response {
    let secs = wait.as_millis().div_ceil(1000).max(1).to_string();
    if let Ok(value) = HeaderValue::from_str(&secs) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

async fn ingest(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let response = handle_ingest(&state, &headers, body).await;
    state
        .metrics
        .requests
        .with_label_values(&[response.status().as_str()])
        .inc();
    state
        .metrics
        .request_duration
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn handle_ingest(state: &AppState, headers: &HeaderMap, body: Body) -> Response {
    // 1. Who is calling, before a byte of the body is read: an unknown caller costs one header
    //    lookup. The tenant comes from the key, and only from the key.
    let catalog = state.catalog.current();
    let tenant = match caller(&catalog, headers) {
        Ok(tenant) => tenant,
        Err(refused) => return refusal_response(refused),
    };

    // 2. What the body will be: encoding, size, mode, framing; then the body itself, within
    //    its deadline.
    let body_head = match body_encoding(headers, state.max_body_bytes) {
        Ok(body_head) => body_head,
        Err(refused) => return *refused,
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("(not text)").to_owned());
    let binary = Binding::Http.is_binary(
        headers.keys().map(HeaderName::as_str),
        content_type.as_deref(),
    );
    if binary && !binary::is_json(content_type.as_deref()) {
        return error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "in CloudEvents binary mode the body is the event's `data`, which must be JSON; \
                 content type `{}` is not",
                content_type.as_deref().unwrap_or_default()
            ),
        );
    }
    // The share is held until the answer: the events borrow from the body.
    let (bytes, _share) =
        match read_body(state, &tenant.id, body, body_head, state.max_body_bytes).await {
            Ok(read) => read,
            Err(refused) => return *refused,
        };
    let (framing, framed) = if binary {
        let attributes: Vec<(&str, &[u8])> = headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_bytes()))
            .collect();
        match binary::frame(
            Binding::Http,
            attributes.iter().copied(),
            &bytes,
            state.limits.max_event_bytes,
        ) {
            Ok(framed) => (Framing::Single, vec![Frame::from(framed)]),
            Err(message) => {
                return error_response(StatusCode::BAD_REQUEST, "invalid_body", message);
            }
        }
    } else {
        let content_type = content_type.unwrap_or_default();
        let Some(framing) = body::framing_of(&content_type, &bytes) else {
            return error_response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "content type `{content_type}` is not accepted; use application/cloudevents+json, \
                     application/cloudevents-batch+json, application/json or application/x-ndjson \
                     (or CloudEvents binary mode: `ce-*` headers and a JSON body)"
                ),
            );
        };
        match body::split(
            framing,
            &bytes,
            state.max_batch_events,
            state.limits.max_event_bytes,
        ) {
            Ok(framed) => (framing, framed),
            Err(FrameError::Unparseable(message)) => {
                return error_response(StatusCode::BAD_REQUEST, "invalid_body", message);
            }
            Err(FrameError::TooManyEvents { limit }) => {
                return error_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_many_events",
                    format!("a request may carry at most {limit} events"),
                );
            }
        }
    };

    // 3. Rate limit, before anything has a side effect. Tenants the catalog gives no limit get
    //    the gateway's default, so no tenant can take the whole gateway.
    let limit = tenant.rate_limit.unwrap_or(state.default_rate_limit);
    let count = u64::try_from(framed.len()).unwrap_or(u64::MAX);
    if let Err(wait) = state.rate_limiter.take(&tenant.id, limit, count) {
        return with_retry_after(
            error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "tenant is over its limit of {} events/s",
                    limit.events_per_second
                ),
            ),
            wait,
        );
    }

    // 4. Validate each event and drop repeats (within the request, then recent ones).
    let Admitted {
        mut results,
        mut to_send,
        sightings,
        mut tally,
        remembered,
    } = admit_all(
        tenant,
        framed,
        event::now_ms(),
        &state.limits,
        &state.dedup,
        state.sink.encoding(),
    );

    // 5. Produce them together; answer only once the broker has them.
    //    No await from parsing to here: the events' messages are held by one request per
    //    worker thread at most, and dropped as they are enqueued.
    let enqueued = state
        .sink
        .enqueue(to_send.iter_mut().map(|sent| &mut sent.event));
    let deliveries = state.sink.delivered(enqueued).await;
    let mut undelivered = None;
    let mut highest = Highest::default();
    for landed in remembered {
        highest.note(landed);
    }
    let mut landed_now = Vec::with_capacity(to_send.len());
    // The k-th event sent is the k-th first sighting.
    for ((sighted, sent), delivery) in sightings.firsts().zip(&to_send).zip(deliveries) {
        match delivery {
            Ok(landed) => {
                landed_now.push((sighted, Some(landed)));
                highest.note(landed);
                tally.accepted += 1;
            }
            Err(e) => {
                if let Some(result) = results.get_mut(sent.result) {
                    result.status = Status::NotDelivered;
                    result.code = Some("broker_unavailable");
                }
                undelivered = Some(e.to_string());
            }
        }
    }
    sightings.remember(&state.dedup, landed_now);
    state
        .metrics
        .dedup_entries
        .set(i64::try_from(state.dedup.len()).unwrap_or(i64::MAX));
    tally.publish(&state.metrics);

    let count = |s: Status| results.iter().filter(|r| r.status == s).count();
    let mut response = IngestResponse {
        accepted: count(Status::Accepted),
        duplicate: count(Status::Duplicate),
        rejected: count(Status::Rejected),
        // In a 503 too: the events that did land are written, and their retry will be
        // answered `duplicate` with the same positions (the cache keeps them).
        positions: highest.positions(state.sink.topic()),
        results,
        error: None,
    };
    if let Some(reason) = undelivered {
        state.broker_ready.store(false, Ordering::Relaxed);
        tracing::warn!(%reason, "Events not acknowledged by the broker; answering 503.");
        response.error = Some(ErrorBody {
            code: "broker_unavailable",
            message: format!(
                "the broker did not acknowledge every event; retry the request: {reason}"
            ),
        });
        return with_retry_after(
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(response)).into_response(),
            Duration::from_secs(5),
        );
    }
    let status = if framing == Framing::Single && response.rejected > 0 {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    (status, axum::Json(response)).into_response()
}

/// The highest offset a request's events landed at, per events-topic partition. Indexed by
/// partition (a topic's partitions are `0..n`, n small), so noting an event costs an index and
/// a comparison, and a position's text is made once per partition, not per event.
#[derive(Debug, Default)]
struct Highest(Vec<Option<i64>>);

impl Highest {
    fn note(&mut self, landed: Landed) {
        let Ok(partition) = usize::try_from(landed.partition) else {
            return;
        };
        if partition >= self.0.len() {
            self.0.resize(partition + 1, None);
        }
        if let Some(highest) = self.0.get_mut(partition) {
            *highest = (*highest).max(Some(landed.offset));
        }
    }

    /// `<topic>:<partition>:<offset>` per partition written to, by partition.
    fn positions(&self, topic: &str) -> Vec<String> {
        self.0
            .iter()
            .enumerate()
            .filter_map(|(partition, offset)| {
                offset.map(|offset| format!("{topic}:{partition}:{offset}"))
            })
            .collect()
    }
}

/// The tenant the request's API key proves and lets ingest ([`admit::authenticate`]).
pub(crate) fn caller<'c>(
    catalog: &'c Catalog,
    headers: &HeaderMap,
) -> Result<&'c Tenant, Rejection> {
    caller_with(catalog, headers, Scope::Ingest)
}

/// The tenant the request's API key proves, if the key has `scope` ([`admit::authorize`]).
pub(crate) fn caller_with<'c>(
    catalog: &'c Catalog,
    headers: &HeaderMap,
    scope: Scope,
) -> Result<&'c Tenant, Rejection> {
    let Some(key) = crate::server::bearer_token(headers) else {
        return Err(Rejection::new(
            RejectCode::Unauthenticated,
            "send `Authorization: Bearer <api key>`",
        ));
    };
    admit::authorize(catalog, key, scope)
}

/// A refused caller's answer: 403 `forbidden` for a key without the scope, else 401.
pub(crate) fn refusal_response(refused: Rejection) -> Response {
    let status = match refused.code {
        RejectCode::Forbidden => StatusCode::FORBIDDEN,
        _ => StatusCode::UNAUTHORIZED,
    };
    error_response(status, refused.code.as_str(), refused.message)
}

/// A request refused before its handler finished: the answer to send (boxed: a `Response` is
/// large, and most calls succeed).
pub(crate) type Refusal = Box<Response>;

/// The body's `Content-Encoding` and declared length, or the answer refusing it: an encoding
/// the gateway does not decode (415), or a declared length already over `limit` (413, before a
/// byte is read).
/// What a request's headers say of its body: how it is encoded, and its length if declared.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyHead {
    encoding: Encoding,
    declared: Option<usize>,
}

pub(crate) fn body_encoding(headers: &HeaderMap, limit: usize) -> Result<BodyHead, Refusal> {
    let content_encoding = headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("(not text)"));
    let content_encoding = match Encoding::from_header(content_encoding) {
        Ok(content_encoding) => content_encoding,
        Err(e) => {
            let mut response = error_response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_encoding",
                e.to_string(),
            );
            response.headers_mut().insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static(Encoding::ACCEPTED),
            );
            return Err(Box::new(response));
        }
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(Box::new(too_large(limit)));
    }
    Ok(BodyHead {
        encoding: content_encoding,
        declared,
    })
}

/// The whole decoded body, at most `limit` bytes, within the body deadline, with its share of
/// the body budget (hold it until the answer); or the answer saying why not (503 `overloaded`
/// when the budget had no room within the deadline, 413, 400 `incomplete_body` /
/// `invalid_body`, 408 `body_timeout`).
pub(crate) async fn read_body(
    state: &AppState,
    tenant: &str,
    body: Body,
    head: BodyHead,
    limit: usize,
) -> Result<(bytes::Bytes, Share), Refusal> {
    let share = state
        .body_budget
        .share_of(head.encoding, head.declared, limit);
    let Some(share) = state
        .body_budget
        .reserve(tenant, share, state.body_read_timeout)
        .await
    else {
        // The body is unread, so the connection cannot carry another request.
        let mut response = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "the gateway holds as many request bodies as its memory budget allows (or as much of \
             it as one tenant may hold); retry later",
        );
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Err(Box::new(with_retry_after(response, Duration::from_secs(1))));
    };
    let read = tokio::time::timeout(
        state.body_read_timeout,
        encoding::read(body, head.encoding, head.declared, limit),
    );
    let refused = match read.await {
        Ok(Ok(bytes)) => return Ok((bytes, share)),
        Ok(Err(BodyError::TooLarge { .. })) => too_large(limit),
        Ok(Err(e @ BodyError::Incomplete(_))) => {
            error_response(StatusCode::BAD_REQUEST, "incomplete_body", e.to_string())
        }
        Ok(Err(e @ BodyError::Corrupt { .. })) => {
            error_response(StatusCode::BAD_REQUEST, "invalid_body", e.to_string())
        }
        Err(_) => {
            // The connection's framing is unknown mid-body, so it cannot carry another request.
            let mut response = error_response(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {}",
                    humantime::format_duration(state.body_read_timeout)
                ),
            );
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    };
    Err(Box::new(refused))
}

/// What step 4 made of a request's events.
#[derive(Debug)]
pub(crate) struct Admitted<'a> {
    /// One per event, in request order.
    pub(crate) results: Vec<EventResult<'a>>,
    /// The events to produce, in the order of their first sightings.
    pub(crate) to_send: Vec<ToSend<'a>>,
    /// What each valid event is, with their keys: the sent ones' to remember once they land.
    pub(crate) sightings: Sightings,
    pub(crate) tally: Tally,
    /// Where the repeats' first writes landed, for those the recent-repeat cache knows.
    pub(crate) remembered: Vec<Landed>,
}

/// An event to produce, with the index of its result. The k-th is the k-th first sighting of
/// the request's [`Sightings`].
#[derive(Debug)]
pub(crate) struct ToSend<'a> {
    pub(crate) result: usize,
    pub(crate) event: Outgoing<'a>,
}

/// Judges each event of a request by [`admit::event`] and drops repeats (in the request, then
/// recently accepted ones), keeping where the remembered ones landed.
pub(crate) fn admit_all<'a>(
    tenant: &'a Tenant,
    framed: Vec<Frame<'a>>,
    now_ms: i64,
    limits: &Limits,
    dedup: &DedupCache,
    encoding: codec::Encoding,
) -> Admitted<'a> {
    let mut tally = Tally::default();
    // Where the repeats' first writes landed, when the cache knows.
    let mut remembered = Vec::new();
    let mut results = Vec::with_capacity(framed.len());
    // The valid events, each with the index of its result; the repeats among them are
    // found together, after.
    let mut valid: Vec<(usize, Outgoing<'a>)> = Vec::with_capacity(framed.len());
    for item in framed {
        // Read here, one at a time: what an event read whole builds is dropped before the next.
        let item = item.framed();
        let id_hint = item.value.as_ref().ok().and_then(Envelope::id);
        let judged = admit::event(tenant, item, now_ms, limits, encoding);
        // A repeat of an event accepted before is `duplicate` even if it would be refused now.
        let repeat = judged
            .as_ref()
            .err()
            .and_then(|refused| refused.repeat_in(dedup));
        if let Some(landed) = repeat {
            tally.duplicate += 1;
            remembered.extend(landed);
            results.push(EventResult {
                id: id_hint,
                status: Status::Duplicate,
                code: None,
                message: None,
            });
            continue;
        }
        match judged {
            Err(admit::Refused { rejection, .. }) => {
                tally.reject(rejection.code);
                results.push(EventResult {
                    id: id_hint,
                    status: Status::Rejected,
                    code: Some(rejection.code.as_str()),
                    message: Some(rejection.message),
                });
            }
            Ok(event) => {
                results.push(EventResult {
                    // The id as the body had it: a valid id is the id itself.
                    id: id_hint,
                    status: Status::Accepted,
                    code: None,
                    message: None,
                });
                valid.push((results.len() - 1, event));
            }
        }
    }
    let sightings = admit::sightings(dedup, valid.iter().map(|(_, event)| event.key()));
    let mut to_send = Vec::with_capacity(valid.len());
    for ((index, event), sighting) in valid.into_iter().zip(sightings.each()) {
        match *sighting {
            Sighting::First => to_send.push(ToSend {
                result: index,
                event,
            }),
            Sighting::Repeat(landed) => {
                tally.duplicate += 1;
                remembered.extend(landed);
                if let Some(result) = results.get_mut(index) {
                    result.status = Status::Duplicate;
                }
            }
        }
    }
    Admitted {
        results,
        to_send,
        sightings,
        tally,
        remembered,
    }
}

pub(crate) fn too_large(limit: usize) -> Response {
    error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("request body exceeds {limit} bytes"),
    )
}

/// `GET /v1/openapi.json`: the OpenAPI document of the whole HTTP surface, no key needed.
async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        neruba_schemas::OPENAPI,
    )
        .into_response()
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.broker_ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "broker unreachable\n").into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let families = crate::metrics::gather(&state.registries);
    match prometheus::TextEncoder::new().encode_to_string(&families) {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, "metrics", e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::Highest;
    use neruba_kafka::Landed;

    #[test]
    fn positions_are_the_highest_offset_per_partition_in_partition_order() {
        let mut highest = Highest::default();
        assert_eq!(highest.positions("neruba.events"), Vec::<String>::new());
        for (partition, offset) in [(2, 7), (0, 3), (2, 9), (2, 8), (0, 1), (5, 0)] {
            highest.note(Landed { partition, offset });
        }
        assert_eq!(
            highest.positions("neruba.events"),
            [
                "neruba.events:0:3",
                "neruba.events:2:9",
                "neruba.events:5:0"
            ]
        );
    }
}
