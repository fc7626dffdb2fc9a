//! The billing reads over HTTP (SPEC "Billing reads"), scope `read`, answered from the read
//! model (`model.rs`).
//!
//! Invariants:
//! - the tenant is the one the API key proves; a customer of another tenant is answered as
//!   one that does not exist (`404 customer_not_found`), never `403`, so nothing confirms it;
//! - no read is answered from a model that has not yet read its topic to the end since the
//!   api started (a customer it has not read yet would look like one that does not exist):
//!   until it has, a read waits, bounded by `read_wait`, and is otherwise `503 not_caught_up`
//!   with `Retry-After`;
//! - every answer carries `as_of`, the read-model position it was read at; a read with
//!   `min_position=<topic>:<partition>:<offset>[,…]` (what writes answered, at most
//!   [`MAX_POSITIONS`]) waits, bounded by `read_wait` for the whole list (no await on its path
//!   outlasts it), until every one is caught up, and is otherwise
//!   `503 not_caught_up` with `Retry-After`: a client reads its own writes. A ledger or rollups
//!   position is caught up once its model applied that record; an events position (usage reads
//!   only) once the aggregators folded that event and the usage model holds every rollup they
//!   produced from it (`events.rs`): usage answers closed windows, so an event whose window is
//!   still open is not in it yet, though the wait is over;
//! - every parameter is checked before anything is read, with a stable code: `400` for a
//!   missing or malformed one (`missing_parameter`, `invalid_period`, `invalid_limit`,
//!   `invalid_cursor`, `invalid_after`, `invalid_position`, `unknown_parameter`), `422` for a
//!   position of a topic the read does
//!   not follow or of a partition the topic does not have (`unsupported_position`).

use crate::model::{GrantStanding, ItemRead, Model, Position, ReadError, StatementsRead};
use crate::statement_pages;
use axum::Router;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use neruba_balances::book::{Book, GrantState, Status};
use neruba_balances::state::Parts;
use neruba_schemas::LiveCatalog;
use neruba_schemas::catalog::Scope;
use neruba_schemas::credit::{BalanceEntry, BalanceRule, Statement};
use rust_decimal::Decimal;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most items on one page, and the page size when none is asked for.
pub const MAX_LIMIT: usize = 1000;
pub const DEFAULT_LIMIT: usize = 100;

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) catalog: LiveCatalog,
    pub(crate) model: Arc<Model>,
    /// The rollups read model (usage).
    pub(crate) rollups: Arc<Model>,
    /// How far the aggregators have folded the events topic (usage reads of one's own
    /// events).
    pub(crate) events: Arc<crate::events::EventsProgress>,
    /// Longest wait for `min_position`.
    pub(crate) read_wait: Duration,
    /// Most rows a usage answer holds.
    pub(crate) max_usage_rows: usize,
    pub(crate) metrics: crate::metrics::Metrics,
}

/// The routes.
pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/customers", get(customers))
        .route("/v1/customers/{customer}/balances", get(balances))
        .route("/v1/customers/{customer}/grants", get(grants))
        .route("/v1/customers/{customer}/grants/{id}", get(grant))
        .route("/v1/customers/{customer}/balance-entries", get(entries))
        .route(
            "/v1/customers/{customer}/statements/{period}",
            get(statements),
        )
        .route("/v1/customers/{customer}/line-items", get(line_items))
        .route(
            "/v1/customers/{customer}/line-items/{item}/explanation",
            get(explanation),
        )
        .route("/v1/usage", get(usage))
        .route("/v1/openapi.json", get(openapi))
        .with_state(state)
}

/// `GET /v1/openapi.json`: the OpenAPI document of the whole HTTP surface, no key needed.
async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        neruba_schemas::OPENAPI,
    )
        .into_response()
}

/// A refused read: a status, a stable code and a message.
#[derive(Debug)]
pub(crate) struct Refused {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

fn refused(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refused {
    Refused {
        status,
        code,
        message: message.into(),
        retry_after: None,
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after
            && let Ok(value) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

/// A route's path parameters, or `400 invalid_path` in the api's JSON when a segment is not
/// UTF-8 once percent-decoded (`%FF`): axum's own refusal is plain text.
pub(crate) struct PathParams<T>(pub(crate) T);

impl<S, T> FromRequestParts<S> for PathParams<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Refused;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Refused> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(params)) => Ok(Self(params)),
            Err(e) => Err(refused(
                StatusCode::BAD_REQUEST,
                "invalid_path",
                e.body_text(),
            )),
        }
    }
}

impl From<ReadError> for Refused {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::NotLoaded(_) => Refused {
                retry_after: Some(1),
                ..refused(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not_caught_up",
                    e.to_string(),
                )
            },
            ReadError::InvalidCursor(message) => {
                refused(StatusCode::BAD_REQUEST, "invalid_cursor", message)
            }
            ReadError::QuantityOutOfRange(message) => refused(
                StatusCode::UNPROCESSABLE_ENTITY,
                "quantity_out_of_range",
                message,
            ),
            ReadError::NotCombinable(message) => {
                refused(StatusCode::UNPROCESSABLE_ENTITY, "not_combinable", message)
            }
            ReadError::Storage(_) => {
                tracing::error!(error = %e, "Read model storage failed.");
                refused(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the read model could not be read",
                )
            }
        }
    }
}

type Answer = Result<Response, Refused>;

/// The tenant the request's key proves, if it may read.
fn tenant(state: &AppState, headers: &HeaderMap) -> Result<String, Refused> {
    let Some(key) = neruba_stage::server::bearer_token(headers) else {
        return Err(refused(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "send `Authorization: Bearer <api key>`",
        ));
    };
    let catalog = state.catalog.current();
    let Some((tenant, api_key)) = catalog.authenticate(key) else {
        return Err(refused(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "unknown API key",
        ));
    };
    if !api_key.scopes.contains(&Scope::Read) {
        return Err(refused(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("API key `{}` lacks the `read` scope", api_key.name),
        ));
    }
    Ok(tenant.id.clone())
}

/// The query parameters, each allowed name at most once; any other name is refused.
struct Params(HashMap<String, String>);

impl Params {
    fn of(raw: Vec<(String, String)>, allowed: &[&str]) -> Result<Self, Refused> {
        let mut map = HashMap::new();
        for (name, value) in raw {
            if !allowed.contains(&name.as_str()) && name != "min_position" {
                return Err(refused(
                    StatusCode::BAD_REQUEST,
                    "unknown_parameter",
                    format!("`{name}` is not a parameter of this read"),
                ));
            }
            if map.insert(name.clone(), value).is_some() {
                return Err(refused(
                    StatusCode::BAD_REQUEST,
                    "unknown_parameter",
                    format!("`{name}` is given twice"),
                ));
            }
        }
        Ok(Self(map))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// `cursor`, if one is given: an empty one (`cursor=`, which the OpenAPI document's
    /// pattern allows) is the first page in every read, where some reads refused it.
    fn cursor(&self) -> Option<&str> {
        self.get("cursor").filter(|cursor| !cursor.is_empty())
    }

    fn limit(&self) -> Result<usize, Refused> {
        self.limit_within(DEFAULT_LIMIT, MAX_LIMIT)
    }

    /// `limit`, 1 to `max`, or `default`.
    fn limit_within(&self, default: usize, max: usize) -> Result<usize, Refused> {
        match self.get("limit") {
            None => Ok(default),
            Some(text) => text
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| {
                    refused(
                        StatusCode::BAD_REQUEST,
                        "invalid_limit",
                        format!("`limit` must be 1–{max}"),
                    )
                }),
        }
    }

    /// `period`, `YYYY-MM`.
    fn period(&self, text: Option<&str>) -> Result<String, Refused> {
        let bad = || {
            refused(
                StatusCode::BAD_REQUEST,
                "invalid_period",
                "the period must be `YYYY-MM` (the month its billing period starts in)",
            )
        };
        // Absent is a missing parameter, as for usage (was: `invalid_period`).
        let text = text.filter(|t| !t.is_empty()).ok_or_else(|| {
            refused(
                StatusCode::BAD_REQUEST,
                "missing_parameter",
                "`period` is required (`YYYY-MM`, the month its billing period starts in)",
            )
        })?;
        let bytes = text.as_bytes();
        let digits = |r: std::ops::Range<usize>| {
            bytes
                .get(r)
                .is_some_and(|b| b.iter().all(u8::is_ascii_digit))
        };
        let month = text.get(5..7).and_then(|m| m.parse::<u8>().ok());
        if bytes.len() == 7
            && digits(0..4)
            && bytes.get(4) == Some(&b'-')
            && digits(5..7)
            && month.is_some_and(|m| (1..=12).contains(&m))
        {
            Ok(text.to_owned())
        } else {
            Err(bad())
        }
    }
}

/// Most positions one `min_position` may list: one per partition of a topic of up to 1,024
/// partitions (a client that wrote to every one passes them all). More is `400
/// invalid_position`; more could not be sent anyway, as a request line over 64 KiB is refused
/// before it reaches a handler (`414`).
pub const MAX_POSITIONS: usize = 1024;
/// How often a wait on a model looks at its position again.
const MODEL_POLL: Duration = Duration::from_millis(20);

/// Which model a read is answered from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reads {
    /// Balances, grants, entries, statements, line items: the ledger model. No wait on the
    /// events topic would say anything about them.
    Ledger,
    /// Usage: the rollups model, which the aggregators' work on the events feeds, so a
    /// position on the events topic can be waited for.
    Usage,
}

/// What a `min_position` list asks for, checked against what the api follows.
#[derive(Default)]
struct Wanted<'m> {
    /// Records of topics a model reads: applied once the model's position is past them.
    records: Vec<(&'m Model, i32, i64)>,
    /// Per events-topic partition, the highest offset asked for: caught up once the
    /// aggregators folded it and the rollups model holds what they produced (`events.rs`).
    events: BTreeMap<i32, i64>,
}

fn not_caught_up(message: String) -> Refused {
    Refused {
        retry_after: Some(1),
        ..refused(StatusCode::SERVICE_UNAVAILABLE, "not_caught_up", message)
    }
}

fn unsupported_position(message: String) -> Refused {
    refused(
        StatusCode::UNPROCESSABLE_ENTITY,
        "unsupported_position",
        message,
    )
}

/// One `<topic>:<partition>:<offset>`; the topic may itself hold `:`.
fn parse_position(text: &str) -> Option<(&str, i32, i64)> {
    let mut parts = text.rsplitn(3, ':');
    let offset: i64 = parts.next()?.parse().ok().filter(|o| *o >= 0)?;
    let partition: i32 = parts.next()?.parse().ok().filter(|p| *p >= 0)?;
    let topic = parts.next().filter(|t| !t.is_empty())?;
    Some((topic, partition, offset))
}

/// Waits until the model `reads` is answered from has read its topic to the end once since
/// the api started (before that, a customer whose records it has not read yet would be
/// answered as one that does not exist), and until it has caught up with every position of
/// `min_position` (a comma-separated list), if one is asked for: each record of a topic a
/// model reads applied, and, for usage, each event folded by the aggregators with its rollups
/// read. One bound, `read_wait`, for it all, which no wait here outlasts; every item is
/// checked before anything is waited for, and what is already caught up is answered at once
/// (even with no wait at all).
async fn caught_up(state: &AppState, params: &Params, reads: Reads) -> Result<(), Refused> {
    let arrived = Instant::now();
    let deadline = arrived + state.read_wait;
    let wanted = params
        .get("min_position")
        .map(|text| wanted(state, text, reads))
        .transpose()?;
    let model = match reads {
        Reads::Ledger => &state.model,
        Reads::Usage => &state.rollups,
    };
    read_up(model, deadline).await?;
    let Some(wanted) = wanted else {
        return Ok(());
    };
    for (model, partition, offset) in wanted.records {
        applied(model, partition, offset, deadline).await?;
    }
    if !wanted.events.is_empty() {
        folded(state, &wanted.events, arrived, deadline).await?;
    }
    Ok(())
}

/// The positions of a `min_position` list, or why it is refused: `400 invalid_position` for a
/// malformed item, `422 unsupported_position` for a topic the read does not follow (or a
/// partition a model's topic does not have).
fn wanted<'s>(state: &'s AppState, text: &str, reads: Reads) -> Result<Wanted<'s>, Refused> {
    let bad = || {
        refused(
            StatusCode::BAD_REQUEST,
            "invalid_position",
            format!(
                "`min_position` must be `<topic>:<partition>:<offset>`, as a write answered, or \
                 up to {MAX_POSITIONS} of them separated by `,`"
            ),
        )
    };
    if text.split(',').count() > MAX_POSITIONS {
        return Err(bad());
    }
    let mut wanted = Wanted::default();
    for item in text.split(',') {
        let (topic, partition, offset) = parse_position(item).ok_or_else(bad)?;
        if let Some(model) = [&state.model, &state.rollups]
            .into_iter()
            .find(|m| m.topic() == topic)
        {
            if partition >= model.partitions() {
                return Err(unsupported_position(format!(
                    "`{topic}` has no partition {partition}"
                )));
            }
            wanted.records.push((model, partition, offset));
        } else if topic == state.events.topic() && reads == Reads::Usage {
            let highest = wanted.events.entry(partition).or_insert(offset);
            *highest = (*highest).max(offset);
        } else if topic == state.events.topic() {
            return Err(unsupported_position(format!(
                "a position on `{topic}` can be waited for by usage reads only: events reach \
                 the ledger through the rater and the balances stage, whose progress no events \
                 position tells"
            )));
        } else {
            return Err(unsupported_position(format!(
                "the read model follows `{}` and `{}`{}; a position on `{topic}` cannot be \
                 waited for",
                state.model.topic(),
                state.rollups.topic(),
                match reads {
                    Reads::Usage => format!(" (and `{}` for usage)", state.events.topic()),
                    Reads::Ledger => String::new(),
                }
            )));
        }
    }
    Ok(wanted)
}

/// Waits until `model` has read its topic to the end once since the api started.
async fn read_up(model: &Model, deadline: Instant) -> Result<(), Refused> {
    while !model.caught_up_once() {
        if Instant::now() >= deadline {
            return Err(not_caught_up(format!(
                "the read model has not read `{}` to its end since it started",
                model.topic()
            )));
        }
        tokio::time::sleep(MODEL_POLL).await;
    }
    Ok(())
}

/// Waits until `model` has applied the record at `offset` of `partition`.
async fn applied(
    model: &Model,
    partition: i32,
    offset: i64,
    deadline: Instant,
) -> Result<(), Refused> {
    loop {
        let position = model.position(partition);
        if position.as_ref().is_some_and(|p| p.next_offset > offset) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(not_caught_up(format!(
                "the read model has not applied {}:{partition}:{offset} yet (at {})",
                model.topic(),
                position.map_or(-1, |p| p.next_offset)
            )));
        }
        tokio::time::sleep(MODEL_POLL).await;
    }
}

/// Waits until the aggregators have folded the events topic up to `wanted` (per partition,
/// an offset) and the usage model holds every rollup they produced from it: on the snapshots
/// the events poller publishes (`events.rs`), never asking the broker, never past `deadline`.
async fn folded(
    state: &AppState,
    wanted: &BTreeMap<i32, i64>,
    arrived: Instant,
    deadline: Instant,
) -> Result<(), Refused> {
    use crate::events::Verdict;
    let progress = &state.events;
    // 1. Folded once a snapshot shows the aggregators' group committed past them: they commit
    //    a batch only after its rollups were acknowledged and its state written ... The latest
    //    snapshot may already say so; otherwise wait for the poller's next ones.
    let mut verdict = progress.judge(wanted, arrived);
    let mut snapshots: Option<tokio::sync::watch::Receiver<crate::events::Snapshot>> = None;
    let ends = loop {
        match verdict {
            Verdict::Folded(ends) => break ends,
            Verdict::NoPartition(partition) => {
                return Err(unsupported_position(format!(
                    "`{}` has no partition {partition}",
                    progress.topic()
                )));
            }
            Verdict::Wait { refresh } => {
                if refresh {
                    progress.refresh_partitions();
                }
            }
        }
        match &mut snapshots {
            None => {
                // Waiting from now on (which wakes the poller); what the receiver holds may be
                // newer than what was judged.
                let receiver = progress.watch();
                verdict = receiver.borrow().judge(wanted, arrived);
                snapshots = Some(receiver);
            }
            Some(receiver) => {
                let changed = tokio::time::timeout_at(deadline.into(), receiver.changed()).await;
                if !matches!(changed, Ok(Ok(()))) {
                    return Err(not_caught_up(
                        receiver.borrow().behind(progress.topic(), wanted),
                    ));
                }
                verdict = receiver.borrow_and_update().judge(wanted, arrived);
            }
        }
    };
    drop(snapshots);
    // 2. ... so whatever rollups the events caused lie below each rollups partition's end as
    //    read after those commits: caught up once the usage model has read that far everywhere.
    for (partition, end) in (0..).zip(ends) {
        if end > 0 {
            applied(&state.rollups, partition, end - 1, deadline).await?;
        }
    }
    Ok(())
}

/// The answer for a grant the balances stage refused for the customer's bound of grants holding
/// credit (`refusal`, its `grant_refused` entry): not found, saying why.
fn grant_refused(id: &str, refusal: &BalanceEntry) -> Refused {
    refused(
        StatusCode::NOT_FOUND,
        "grant_refused",
        format!(
            "grant `{id}` was refused by the balances stage ({}, balance entry #{}): the \
             customer had reached its bound of grants holding credit ({} grants, or {} KiB of \
             their keys and metadata); the same request applies if sent again once one of its \
             grants is used up or has ended",
            refusal.code.as_deref().unwrap_or_default(),
            refusal.seq,
            neruba_balances::book::MAX_CREDIT_GRANTS,
            neruba_balances::book::MAX_CREDIT_GRANT_BYTES / 1024,
        ),
    )
}

fn not_found(customer: &str) -> Refused {
    refused(
        StatusCode::NOT_FOUND,
        "customer_not_found",
        format!("no customer `{customer}`"),
    )
}

fn json(
    metrics: &crate::metrics::Metrics,
    route: &'static str,
    started: Instant,
    body: &impl Serialize,
) -> Response {
    metrics.observe(route, started);
    axum::Json(body).into_response()
}

/// [`json`] for an answer of about `size_hint` bytes, written into a buffer of that size
/// (axum's starts at 128 bytes and doubles: the 11 MiB of a month's usage at 1-minute
/// windows were copied as it grew, into fresh pages each time).
fn json_sized(
    metrics: &crate::metrics::Metrics,
    route: &'static str,
    started: Instant,
    body: &impl Serialize,
    size_hint: usize,
) -> Response {
    // As [`json`] does: the time to the answer, not to its encoding.
    metrics.observe(route, started);
    let mut bytes = Vec::with_capacity(size_hint.min(MAX_SIZE_HINT));
    let written = serde_json::to_writer(&mut bytes, body).map(|()| bytes);
    json_written(route, written)
}

/// An answer of JSON already written, or the `500` its writing failed with.
fn json_written(route: &'static str, written: serde_json::Result<Vec<u8>>) -> Response {
    match written {
        Ok(bytes) => (
            [(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, route, "An answer could not be encoded.");
            refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the answer could not be encoded",
            )
            .into_response()
        }
    }
}

/// Most bytes [`json_sized`] sets aside before writing.
const MAX_SIZE_HINT: usize = 64 << 20;

/// The customer's book and its position, or 404.
/// The caller's tenant, the read's own parameters (checked by `check` before anything is
/// waited for or read), then the customer's book at the position asked for, or 404.
async fn customer_book<T>(
    state: &AppState,
    headers: &HeaderMap,
    customer: &str,
    parts: Parts,
    raw: Vec<(String, String)>,
    allowed: &[&str],
    check: impl FnOnce(&Params) -> Result<T, Refused>,
) -> Result<(String, Book, Position, T), Refused> {
    let tenant = tenant(state, headers)?;
    let params = Params::of(raw, allowed)?;
    let checked = check(&params)?;
    caught_up(state, &params, Reads::Ledger).await?;
    let (book, position) = state.model.book(&tenant, customer, parts)?;
    let book = book.ok_or_else(|| not_found(customer))?;
    Ok((tenant, book, position, checked))
}

#[derive(Serialize)]
struct CustomersPage {
    as_of: Vec<Position>,
    customers: Vec<CustomerRef>,
    next_cursor: Option<String>,
}

#[derive(Serialize)]
struct CustomerRef {
    id: String,
}

/// A cursor: the last id of the page, hex-encoded (opaque to clients; the tenant is never in
/// it, so it cannot reach another tenant's customers).
fn encode_cursor(id: &str) -> String {
    id.bytes().map(|b| format!("{b:02x}")).collect()
}

fn invalid_cursor() -> Refused {
    refused(
        StatusCode::BAD_REQUEST,
        "invalid_cursor",
        "not a cursor of this read",
    )
}

fn decode_cursor(text: &str) -> Result<String, Refused> {
    let bad = invalid_cursor;
    if !text.len().is_multiple_of(2) {
        return Err(bad());
    }
    let bytes: Option<Vec<u8>> = (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    String::from_utf8(bytes.ok_or_else(bad)?).map_err(|_| bad())
}

async fn customers(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(raw): Query<Vec<(String, String)>>,
) -> Answer {
    let started = Instant::now();
    let tenant = tenant(&state, &headers)?;
    let params = Params::of(raw, &["limit", "cursor"])?;
    let limit = params.limit()?;
    let after = params.cursor().map(decode_cursor).transpose()?;
    caught_up(&state, &params, Reads::Ledger).await?;
    let as_of = state.model.positions();
    let ids = state.model.customers(&tenant, after.as_deref(), limit)?;
    let next_cursor = (ids.len() == limit)
        .then(|| ids.last().map(|id| encode_cursor(id)))
        .flatten();
    let page = CustomersPage {
        as_of,
        customers: ids.into_iter().map(|id| CustomerRef { id }).collect(),
        next_cursor,
    };
    Ok(json(&state.metrics, "customers", started, &page))
}

#[derive(Serialize)]
struct Balances {
    customer: String,
    as_of: Vec<Position>,
    balances: Vec<CurrencyBalance>,
}

#[derive(Serialize)]
struct CurrencyBalance {
    currency: String,
    /// Σ grant − consume + restore − expire − void: what is left of every active grant.
    #[serde(with = "rust_decimal::serde::str")]
    balance: Decimal,
    /// The part of it usage in a window starting now could draw on (effective, not expired).
    #[serde(with = "rust_decimal::serde::str")]
    available: Decimal,
    active_grants: usize,
    rule: Option<RuleView>,
    /// The top-up request in this currency not yet answered by a grant keyed with its id: the
    /// rule's, or one a rule since removed left (the payment may be under way; a rule set
    /// again asks for no other until it is answered).
    outstanding_request: Option<String>,
}

#[derive(Serialize)]
struct RuleView {
    #[serde(flatten)]
    rule: BalanceRule,
    below_threshold: bool,
    /// The top-up request not yet answered by a grant keyed with its id.
    outstanding_request: Option<String>,
}

fn eligible_now(grant: &GrantState, now_ms: i64) -> bool {
    grant.status == Status::Active
        && grant.grant.terms.effective_ms() <= now_ms
        && grant
            .grant
            .terms
            .expires_ms()
            .is_none_or(|end| now_ms < end)
}

/// A book's balance read per currency (with a balance, a rule or a request a removed rule
/// left), as of wall time `now_ms`.
fn currency_balances(book: &Book, now_ms: i64) -> Vec<CurrencyBalance> {
    let mut currencies: BTreeSet<&str> = book.balances.keys().map(String::as_str).collect();
    currencies.extend(book.rules.keys().map(String::as_str));
    currencies.extend(book.unresolved_requests.keys().map(String::as_str));
    currencies
        .into_iter()
        .map(|currency| {
            let in_currency = || {
                book.grants
                    .values()
                    .filter(move |g| g.grant.terms.currency == currency)
            };
            let rule = book.rules.get(currency);
            CurrencyBalance {
                currency: currency.to_owned(),
                balance: book.balance(currency),
                available: in_currency()
                    .filter(|g| eligible_now(g, now_ms))
                    .map(|g| g.remaining)
                    .sum(),
                // Grants holding credit: all are in the book (a spent one may be kept apart).
                active_grants: in_currency()
                    .filter(|g| g.status == Status::Active && g.remaining > Decimal::ZERO)
                    .count(),
                rule: rule.map(|r| RuleView {
                    rule: r.rule.clone(),
                    below_threshold: r.below,
                    outstanding_request: r.outstanding.clone(),
                }),
                outstanding_request: rule
                    .and_then(|r| r.outstanding.clone())
                    .or_else(|| book.unresolved_requests.get(currency).cloned()),
            }
        })
        .collect()
}

async fn balances(
    State(state): State<AppState>,
    headers: HeaderMap,
    PathParams(customer): PathParams<String>,
    Query(raw): Query<Vec<(String, String)>>,
) -> Answer {
    let started = Instant::now();
    // The book alone: every grant holding credit is in it.
    let (_, book, position, _) =
        customer_book(&state, &headers, &customer, Parts::BOOK, raw, &[], |_| {
            Ok(())
        })
        .await?;
    let balances = currency_balances(&book, neruba_schemas::event::now_ms());
    let body = Balances {
        customer,
        as_of: vec![position],
        balances,
    };
    Ok(json(&state.metrics, "balances", started, &body))
}

#[derive(Serialize)]
struct Grants {
    customer: String,
    as_of: Vec<Position>,
    grants: Vec<GrantView>,
    /// The `cursor` of the next page (`null`: this is the last).
    next_cursor: Option<String>,
}

/// Most grants a page of the grants read holds, and its default: as many as a customer may
/// have holding credit, so a customer usually has a second page only if it has more used-up,
/// expired or voided grants beside them (a grant answering a top-up request, or one of a
/// record version before the bound, is taken past it).
pub const MAX_GRANTS_PAGE: usize = neruba_balances::book::MAX_CREDIT_GRANTS;

/// A grant's place in the grants read: its burn-down order
/// ([`neruba_balances::book::burn_order`]), which its terms fix for good.
type GrantPlace = (u16, i64, i64, String);

/// A page of `customer`'s grants from `grants`, those after the cursor's place in burn-down
/// order (the order usage draws on them), up to one more than `limit`: at most `limit` of
/// them, and the cursor of the next page if there are more. The read
/// ([`neruba_balances::state::grants_after`]) reads the spent grants kept apart from the
/// cursor's place on, so a page costs its own grants, not the customer's history.
fn grants_page(
    customer: &str,
    mut grants: Vec<GrantState>,
    limit: usize,
) -> (Vec<GrantState>, Option<String>) {
    let next_cursor = if grants.len() > limit {
        grants.truncate(limit);
        // The customer too: a cursor resumes only its own read.
        grants
            .last()
            .map(|g| neruba_balances::book::burn_order(&g.grant))
            .and_then(|place| serde_json::to_string(&(customer, place)).ok())
            .map(|text| encode_cursor(&text))
    } else {
        None
    };
    (grants, next_cursor)
}

/// The place a grants cursor names, if it is one of `customer`'s read.
fn decode_grant_cursor(text: &str, customer: &str) -> Result<GrantPlace, Refused> {
    let (named, place): (String, GrantPlace) =
        serde_json::from_str(&decode_cursor(text)?).map_err(|_| invalid_cursor())?;
    if named != customer {
        return Err(invalid_cursor());
    }
    Ok(place)
}

#[derive(Serialize)]
struct GrantView {
    id: String,
    key: String,
    #[serde(flatten)]
    terms: neruba_schemas::credit::GrantTerms,
    received_at: String,
    status: &'static str,
    #[serde(with = "rust_decimal::serde::str")]
    remaining: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    consumed: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    restored: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    expired: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    voided: Decimal,
}

fn grant_view(g: &GrantState) -> GrantView {
    GrantView {
        id: g.grant.id.clone(),
        key: g.grant.key.clone(),
        terms: g.grant.terms.clone(),
        received_at: g.grant.received_at.clone(),
        status: match g.status {
            Status::Active => "active",
            Status::Expired => "expired",
            Status::Voided => "voided",
        },
        remaining: g.remaining,
        consumed: g.consumed,
        restored: g.restored,
        expired: g.expired,
        voided: g.voided,
    }
}

async fn grants(
    State(state): State<AppState>,
    headers: HeaderMap,
    PathParams(customer): PathParams<String>,
    Query(raw): Query<Vec<(String, String)>>,
) -> Answer {
    let started = Instant::now();
    let tenant = tenant(&state, &headers)?;
    let params = Params::of(raw, &["limit", "cursor"])?;
    let limit = params.limit_within(MAX_GRANTS_PAGE, MAX_GRANTS_PAGE)?;
    let after = params
        .cursor()
        .map(|text| decode_grant_cursor(text, &customer))
        .transpose()?;
    caught_up(&state, &params, Reads::Ledger).await?;
    let place = after.as_ref().map(neruba_balances::book::borrowed_place);
    let (grants, position) =
        state
            .model
            .grants(&tenant, &customer, place, limit.saturating_add(1))?;
    let grants = grants.ok_or_else(|| not_found(&customer))?;
    let (page, next_cursor) = grants_page(&customer, grants, limit);
    let body = Grants {
        customer,
        as_of: vec![position],
        grants: page.iter().map(grant_view).collect(),
        next_cursor,
    };
    Ok(json(&state.metrics, "grants", started, &body))
}

#[derive(Serialize)]
struct OneGrant {
    customer: String,
    as_of: Vec<Position>,
    grant: GrantView,
}

async fn grant(
    State(state): State<AppState>,
    headers: HeaderMap,
    PathParams((customer, id)): PathParams<(String, String)>,
    Query(raw): Query<Vec<(String, String)>>,
) -> Answer {
    let started = Instant::now();
    let (tenant, book, position, ()) =
        customer_book(&state, &headers, &customer, Parts::BOOK, raw, &[], |_| {
            Ok(())
        })
        .await?;
    let grant = match book.grants.get(&id) {
        Some(grant) => grant_view(grant),
        // Kept apart (spent), or applied since the book was read (and its refusal dropped):
        // read again, the grant and the refusals from one snapshot.
        None => match state.model.grant_standing(&tenant, &customer, &id)? {
            GrantStanding::Held(grant) => grant_view(&grant),
            GrantStanding::Refused(refusal) => return Err(grant_refused(&id, &refusal)),
            GrantStanding::Unknown => {
                return Err(refused(
                    StatusCode::NOT_FOUND,
                    "grant_not_found",
                    format!("customer `{customer}` has no grant `{id}`"),
                ));
            }
        },
    };
    let body = OneGrant {
        customer,
        as_of: vec![position],
        grant,
    };
    Ok(json(&state.metrics, "grant", started, &body))
}

#[derive(Serialize)]
struct Entries {
    customer: String,
    as_of: Vec<Position>,
    entries: Vec<BalanceEntry>,
    /// The `after` of the next page (`null`: this page ends the entries read so far).
    next_after: Option<u64>,
}

async fn entries(
    State(state): State<AppState>,
    headers: HeaderMap,
    PathParams(customer): PathParams<String>,
    Query(raw): Query<Vec<(String, String)>>,
) -> Answer {
    let started = Instant::now();
    let (tenant, _, position, (limit, after)) = customer_book(
        &state,
        &headers,
        &customer,
        Parts::BOOK,
        raw,
        &["after", "limit"],
        |params| {
            let after = match params.get("after") {
                None => 0,
                Some(text) => text.parse::<u64>().map_err(|_| {
                    refused(
                        StatusCode::BAD_REQUEST,
                        "invalid_after",
                        "`after` must be an entry's sequence number (0 for the first page)",
                    )
                })?,
            };
            Ok((params.limit()?, after))
        },
    )
    .await?;
    let entries = state.model.entries(&tenant, &customer, after, limit)?;
    let next_after = (entries.len() == limit)
        .then(|| entries.last().map(|e| e.seq))
        .flatten();
    let body = Entries {
        customer,
        as_of: vec![position],
        entries,
        next_after,
    };
    Ok(json(&state.metrics, "balance_entries", started, &body))
}

#[derive(Serialize)]
struct Statements {
    customer: String,
    as_of: Vec<Position>,
    period: String,
    /// One per currency the customer was billed in that period.
    statements: Vec<Statement>,
    /// Corrections of periods already final that no later statement holds yet (they join the
    /// customer's next statement in their currency), so no cent is out of sight meanwhile.
    pending_prior_period: Vec<Pending>,
    /// The `cursor` of the next page of lines (`null`: this is the last).
    next_cursor: Option<String>,
}

/// Most lines a statements page holds: its `limit`'s bound, so a client that wants a whole
/// statement of up to that many lines reads it in one page.
const MAX_STATEMENT_LINES: usize = 10_000;

/// The lines a statements page holds without a `limit`: nearly every statement reads whole
/// in one page, and a page of a longer one costs what it holds (a final statement's lines are
/// read from the page's place on), well within the reads' p99 of 10 ms.
const DEFAULT_STATEMENT_LINES: usize = 1_000;

#[derive(Serialize)]
struct Pending {
    currency: String,
    lines: Vec<neruba_schemas::credit::StatementLine>,
    #[serde(with = "rust_decimal::serde::str")]
    amount: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    credit_applied: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    amount_due: Decimal,
}

async fn statements(
    State(state): State<AppState>,
    headers: HeaderMap,
    PathParams((customer, period)): PathParams<(String, String)>,
    Query(raw): Query<Vec<(String, String)>>,
) -> Answer {
    let started = Instant::now();
    let tenant = tenant(&state, &headers)?;
    let params = Params::of(raw, &["limit", "cursor"])?;
    let period = params.period(Some(&period))?;
    let limit = params.limit_within(DEFAULT_STATEMENT_LINES, MAX_STATEMENT_LINES)?;
    let pages_of = statement_pages::Read {
        customer: &customer,
        period: &period,
    };
    let after = params
        .cursor()
        .map(|text| {
            decode_cursor(text).and_then(|t| {
                statement_pages::After::decode(&t, pages_of).ok_or_else(invalid_cursor)
            })
        })
        .transpose()?;
    caught_up(&state, &params, Reads::Ledger).await?;
    let (read, position) = state
        .model
        .statements(&tenant, &customer, &period, |read| {
            let StatementsRead {
                mut statements,
                carried,
            } = read;
            let mut pending_prior_period: Vec<Pending> = carried
                .into_iter()
                .map(|(currency, carried)| Pending {
                    currency,
                    lines: carried.lines,
                    amount: carried.amount,
                    credit_applied: carried.credit_applied,
                    amount_due: carried.amount_due,
                })
                .collect();
            let mut sections = Vec::new();
            for (statement, apart) in &mut statements {
                let (currency, start) = (&statement.currency, &statement.period_start);
                let [lines, prior] = match &*apart {
                    Some([lines, prior]) => [Some(lines), Some(prior)],
                    None => [None, None],
                };
                sections.push((
                    statement_pages::Section::lines(currency, start),
                    &mut statement.lines,
                    lines,
                ));
                sections.push((
                    statement_pages::Section::prior_period(currency, start),
                    &mut statement.prior_period,
                    prior,
                ));
            }
            for pending in &mut pending_prior_period {
                sections.push((
                    statement_pages::Section::pending(&pending.currency),
                    &mut pending.lines,
                    None,
                ));
            }
            let next = statement_pages::page(pages_of, sections, limit, after.as_ref());
            let statements: Vec<Statement> = statements.into_iter().map(|(s, _)| s).collect();
            next.map(|next| (statements, pending_prior_period, next))
        })?;
    let (statements, pending_prior_period, next) = read
        .ok_or_else(|| not_found(&customer))?
        .map_err(|unreadable| match unreadable {
            statement_pages::Unreadable::NotAPlace => invalid_cursor(),
            statement_pages::Unreadable::Store(e) => Refused::from(e),
        })?;
    let body = Statements {
        customer,
        as_of: vec![position],
        period,
        statements,
        pending_prior_period,
        next_cursor: next.map(|after| encode_cursor(&after.encode())),
    };
    // Up to 10,000 lines: written into a buffer about the answer's size.
    let lines: usize = body
        .statements
        .iter()
        .map(|s| s.lines.len() + s.prior_period.len())
        .chain(body.pending_prior_period.iter().map(|p| p.lines.len()))
        .sum();
    let hint = STATEMENT_JSON_BYTES + lines * LINE_JSON_BYTES;
    Ok(json_sized(
        &state.metrics,
        "statement",
        started,
        &body,
        hint,
    ))
}

/// About what a statements answer takes in JSON besides its lines, and what a line takes
/// (its meter, a short group, its period start and four amounts): the size [`json_sized`]
/// sets aside for it.
const STATEMENT_JSON_BYTES: usize = 2048;
const LINE_JSON_BYTES: usize = 256;

#[derive(Serialize)]
struct LineItems {
    customer: String,
    as_of: Vec<Position>,
    period: String,
    items: Vec<ItemRead>,
    /// The `cursor` of the next page (`null`: this is the last).
    next_cursor: Option<String>,
}

async fn line_items(
    State(state): State<AppState>,
    headers: HeaderMap,
    PathParams(customer): PathParams<String>,
    Query(raw): Query<Vec<(String, String)>>,
) -> Answer {
    let started = Instant::now();
    let (tenant, _, position, (period, limit, after, meter)) = customer_book(
        &state,
        &headers,
        &customer,
        Parts::BOOK,
        raw,
        &["period", "meter", "limit", "cursor"],
        |params| {
            let period = params.period(params.get("period"))?;
            let limit = params.limit()?;
            let after = params.cursor().map(decode_cursor).transpose()?;
            // A place no item of the period can have (another period's, or not one at all).
            if after
                .as_deref()
                .is_some_and(|after| crate::model::item_cursor(after, &period).is_none())
            {
                return Err(invalid_cursor());
            }
            Ok((period, limit, after, params.get("meter").map(str::to_owned)))
        },
    )
    .await?;
    let page = state.model.line_items_page(
        &tenant,
        &customer,
        &period,
        meter.as_deref(),
        after.as_deref(),
        limit,
    )?;
    let next_cursor = page.next.as_deref().map(encode_cursor);
    let body = LineItems {
        customer,
        as_of: vec![position],
        period,
        items: page.items,
        next_cursor,
    };
    Ok(json(&state.metrics, "line_items", started, &body))
}

#[derive(Serialize)]
struct Explanation {
    customer: String,
    as_of: Vec<Position>,
    period: String,
    /// The item explained, as the line-items read lists it.
    item: ItemRead,
    plan: PlanView,
    /// The item's period quantity priced under the plan the item names, step by step.
    price: neruba_rater::price::Priced,
    /// What the period had been charged before this item: `period_amount − amount`. The item
    /// adds `price.amount − previously_charged`.
    #[serde(with = "rust_decimal::serde::str")]
    previously_charged: Decimal,
    /// `price.amount` equals the item's `period_amount`: the catalog prices it as the rater did.
    matches_ledger: bool,
    /// The same, as `neruba price` prints it, and the item's share of the period total.
    text: String,
}

#[derive(Serialize)]
struct PlanView {
    id: String,
    version: u32,
    currency: String,
    effective_from: String,
}

/// `GET /v1/customers/{customer}/line-items/{item}/explanation?period=`: how the item's
/// amount was reached, from the pricing engine the rater uses (`neruba_rater::quote`) under
/// the plan version the item names.
async fn explanation(
    State(state): State<AppState>,
    headers: HeaderMap,
    PathParams((customer, item_id)): PathParams<(String, String)>,
    Query(raw): Query<Vec<(String, String)>>,
) -> Answer {
    use neruba_rater::quote::{PlanChoice, QuoteError, quote};
    let started = Instant::now();
    let (tenant, _, position, period) = customer_book(
        &state,
        &headers,
        &customer,
        Parts::BOOK,
        raw,
        &["period"],
        |params| params.period(params.get("period")),
    )
    .await?;
    let ItemRead { item, superseded } = state
        .model
        .line_item(&tenant, &customer, &period, &item_id)?
        .ok_or_else(|| {
            refused(
                StatusCode::NOT_FOUND,
                "line_item_not_found",
                format!("customer `{customer}` has no line item `{item_id}` in {period}"),
            )
        })?;
    let catalog = state.catalog.current();
    let choice = PlanChoice::Named {
        id: &item.price_plan,
        version: item.price_version,
    };
    let quoted = quote(&catalog, &tenant, choice, item.period_quantity).map_err(|e| match e {
        QuoteError::Price(_) => refused(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the item's quantity cannot be priced: {e}"),
        ),
        QuoteError::UnknownTenant(_) | QuoteError::NoPlan(_) | QuoteError::UnknownCurrency(_) => {
            refused(StatusCode::CONFLICT, "plan_unavailable", e.to_string())
        }
    })?;
    let previously_charged = item.period_amount.checked_sub(item.amount).ok_or_else(|| {
        refused(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the item's amounts overflow",
        )
    })?;
    let matches_ledger = quoted.priced.amount == item.period_amount;
    let mut text = quoted.priced.explain(quoted.plan);
    text.push_str(&format!(
        "this item: period amount {} - charged before {} = {} {}\n",
        item.period_amount, previously_charged, item.amount, item.currency
    ));
    if !matches_ledger {
        text.push_str(&format!(
            "note: the catalog now prices this quantity at {}, the ledger says {}\n",
            quoted.priced.amount, item.period_amount
        ));
    }
    let plan = PlanView {
        id: quoted.plan.id.clone(),
        version: quoted.plan.version,
        currency: quoted.plan.currency.clone(),
        effective_from: quoted.plan.effective_from.to_string(),
    };
    let body = Explanation {
        customer,
        as_of: vec![position],
        period,
        item: ItemRead { item, superseded },
        plan,
        price: quoted.priced,
        previously_charged,
        matches_ledger,
        text,
    };
    Ok(json(&state.metrics, "explanation", started, &body))
}

#[derive(Serialize)]
struct Usage {
    customer: String,
    meter: String,
    aggregation: neruba_schemas::catalog::Aggregation,
    window: String,
    from: String,
    to: String,
    as_of: Vec<Position>,
    data: Vec<crate::usage::Row>,
    /// The `cursor` of the next page (`null`: this is the last).
    next_cursor: Option<String>,
}

/// A usage answer's fields before its rows.
#[derive(Serialize)]
struct UsageHead<'a> {
    customer: &'a str,
    meter: &'a str,
    aggregation: neruba_schemas::catalog::Aggregation,
    window: &'a str,
    from: &'a str,
    to: &'a str,
    as_of: &'a [Position],
}

impl Usage {
    /// The answer's JSON, as serde writes it, its rows written directly
    /// ([`crate::usage::write_rows_json`]) into a buffer of `size_hint` bytes.
    fn to_json(&self, size_hint: usize) -> serde_json::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(size_hint.min(MAX_SIZE_HINT));
        let head = UsageHead {
            customer: &self.customer,
            meter: &self.meter,
            aggregation: self.aggregation,
            window: &self.window,
            from: &self.from,
            to: &self.to,
            as_of: &self.as_of,
        };
        serde_json::to_writer(&mut out, &head)?;
        // The head's closing brace: the rows and the cursor follow.
        if out.pop() != Some(b'}') {
            return Err(serde_json::Error::io(std::io::Error::other(
                "a usage answer's head is not an object",
            )));
        }
        out.extend_from_slice(b",\"data\":");
        crate::usage::write_rows_json(&self.data, &mut out)?;
        out.extend_from_slice(b",\"next_cursor\":");
        serde_json::to_writer(&mut out, &self.next_cursor)?;
        out.push(b'}');
        Ok(out)
    }
}

/// 0000-01-01T00:00:00Z and 10000-01-01T00:00:00Z, in Unix milliseconds: the times RFC 3339
/// can write in UTC.
const FIRST_TIME_MS: i64 = -62_167_219_200_000;
const END_OF_TIME_MS: i64 = 253_402_300_800_000;

/// A usage page's `limit`: a positive number, lowered to `most` (`--api-max-usage-rows`), or
/// `most` when not given (a page may hold fewer rows than its limit anyway).
fn usage_limit(params: &Params, most: usize) -> Result<usize, Refused> {
    match params.get("limit") {
        None => Ok(most),
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= 1)
            .map(|n| n.min(most))
            .ok_or_else(|| {
                refused(
                    StatusCode::BAD_REQUEST,
                    "invalid_limit",
                    "`limit` must be a positive number of rows",
                )
            }),
    }
}

/// Longest range a usage query may span.
const MAX_USAGE_RANGE_MS: i64 = 400 * 86_400_000;
/// Most buckets a usage query may ask for (per group).
const MAX_USAGE_BUCKETS: i64 = 50_000;

/// How many windows of `size_ms` (aligned to the epoch) start in `[from_ms, to_ms)`: the rows
/// a usage query at the meter's own window may answer per group. (Was the range's length over
/// the size, floored: a range not aligned to windows could start one more than it counted.)
fn windows_starting_in(from_ms: i64, to_ms: i64, size_ms: i64) -> i64 {
    let size = size_ms.max(1);
    let first_at_or_after = |t: i64| -(-t).div_euclid(size);
    first_at_or_after(to_ms) - first_at_or_after(from_ms)
}

async fn usage(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(raw): Query<Vec<(String, String)>>,
) -> Answer {
    use crate::usage::{Bucket, Unanswerable};
    let started = Instant::now();
    let tenant = tenant(&state, &headers)?;
    // `filter[<group>]=<value>`, then the fixed parameters.
    let mut filters = std::collections::BTreeMap::new();
    let mut rest = Vec::new();
    for (name, value) in raw {
        match name
            .strip_prefix("filter[")
            .and_then(|n| n.strip_suffix(']'))
        {
            Some(key) if !key.is_empty() => {
                if filters.insert(key.to_owned(), value).is_some() {
                    return Err(refused(
                        StatusCode::BAD_REQUEST,
                        "invalid_filter",
                        format!("`filter[{key}]` is given twice"),
                    ));
                }
            }
            Some(_) => {
                return Err(refused(
                    StatusCode::BAD_REQUEST,
                    "invalid_filter",
                    "a filter is `filter[<group>]=<value>`",
                ));
            }
            None => rest.push((name, value)),
        }
    }
    let params = Params::of(
        rest,
        &[
            "customer", "meter", "from", "to", "window", "group_by", "limit", "cursor",
        ],
    )?;
    let required = |name: &str| {
        params.get(name).filter(|v| !v.is_empty()).ok_or_else(|| {
            refused(
                StatusCode::BAD_REQUEST,
                "missing_parameter",
                format!("`{name}` is required"),
            )
        })
    };
    let customer = required("customer")?.to_owned();
    let meter_key = required("meter")?.to_owned();
    // Within the years 0000–9999 in UTC, as every time of an answer is written (past them a
    // `to` given with a western offset was echoed as a bare number of milliseconds).
    let time = |name: &str| -> Result<i64, Refused> {
        neruba_schemas::event::parse_time_ms(required(name)?)
            .ok()
            .filter(|at| (FIRST_TIME_MS..END_OF_TIME_MS).contains(at))
            .ok_or_else(|| {
                refused(
                    StatusCode::BAD_REQUEST,
                    "invalid_time",
                    format!("`{name}` must be an RFC 3339 time within the years 0000–9999 in UTC"),
                )
            })
    };
    let (from_ms, to_ms) = (time("from")?, time("to")?);
    if to_ms <= from_ms || to_ms - from_ms > MAX_USAGE_RANGE_MS {
        return Err(refused(
            StatusCode::BAD_REQUEST,
            "invalid_range",
            "`to` must be after `from`, at most 400 days later",
        ));
    }
    let bucket = Bucket::parse(params.get("window")).ok_or_else(|| {
        refused(
            StatusCode::BAD_REQUEST,
            "invalid_window",
            "`window` is `hour`, `day`, `month`, `none`, or absent for the meter's own window",
        )
    })?;
    // Each key once, in the order first asked (a CSV's columns).
    // (A set beside the list: compared with each key kept, 16,000 keys in one URI cost
    // 10^8 comparisons before the meter was even looked up.)
    let group_by = params.get("group_by").map(|text| {
        let mut keys: Vec<String> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for key in text.split(',').filter(|k| !k.is_empty()) {
            if seen.insert(key) {
                keys.push(key.to_owned());
            }
        }
        keys
    });
    let catalog = state.catalog.current();
    let meter = catalog
        .tenant(&tenant)
        .and_then(|t| t.meters.iter().find(|m| m.key == meter_key))
        .ok_or_else(|| {
            refused(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_meter",
                format!("no meter `{meter_key}`"),
            )
        })?;
    if bucket == Bucket::Meter
        && windows_starting_in(from_ms, to_ms, meter.window_ms()) > MAX_USAGE_BUCKETS
    {
        return Err(refused(
            StatusCode::BAD_REQUEST,
            "invalid_range",
            format!("more than {MAX_USAGE_BUCKETS} windows: ask for a coarser `window`"),
        ));
    }
    let query = crate::usage::Query {
        tenant: &tenant,
        customer: &customer,
        meter,
        from_ms,
        to_ms,
        bucket,
        group_by,
        filters,
        limit: usage_limit(&params, state.max_usage_rows)?,
        group_bytes: crate::usage::MAX_USAGE_GROUP_BYTES,
        after: None,
    };
    // A cursor resumes only the query it came from.
    let after = params
        .cursor()
        .map(|text| decode_cursor(text).and_then(|t| query.after_of(&t).ok_or_else(invalid_cursor)))
        .transpose()?;
    let query = crate::usage::Query { after, ..query };
    query.check().map_err(|why| match why {
        Unanswerable::WindowNotAMultiple(m) => {
            refused(StatusCode::UNPROCESSABLE_ENTITY, "window_not_a_multiple", m)
        }
        Unanswerable::NotCombinable(m) => {
            refused(StatusCode::UNPROCESSABLE_ENTITY, "not_combinable", m)
        }
        Unanswerable::UnknownGroup(m) => {
            refused(StatusCode::UNPROCESSABLE_ENTITY, "unknown_group", m)
        }
    })?;
    caught_up(&state, &params, Reads::Usage).await?;
    let partition = state.rollups.partition_of(&tenant, &customer);
    let as_of = state.rollups.position(partition);
    if !crate::usage::known(&state.rollups, &tenant, &customer)? {
        return Err(not_found(&customer));
    }
    let page = query.run(&state.rollups)?;
    let next_cursor = page
        .next
        .as_ref()
        .map(|after| encode_cursor(&after.encode()));
    let wants_csv = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/csv"));
    if wants_csv {
        let text = query.csv(&page.rows);
        state.metrics.observe("usage", started);
        // `as_of` and `next_cursor`, which JSON has in its body: the read model's position,
        // and where the next page starts (absent on the last).
        let as_of = as_of.map_or_else(String::new, |p| {
            format!("{}:{}:{}", p.topic, p.partition, p.next_offset)
        });
        let mut answer = (
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
                (header::HeaderName::from_static("neruba-as-of"), as_of),
            ],
            text,
        )
            .into_response();
        if let Some(next) = next_cursor.and_then(|c| header::HeaderValue::from_str(&c).ok()) {
            answer
                .headers_mut()
                .insert(header::HeaderName::from_static("neruba-next-cursor"), next);
        }
        return Ok(answer);
    }
    let body = Usage {
        window: bucket.name(meter),
        aggregation: meter.aggregation,
        customer,
        meter: meter_key,
        from: neruba_schemas::event::format_time_ms(from_ms),
        to: neruba_schemas::event::format_time_ms(to_ms),
        as_of: as_of.into_iter().collect(),
        data: page.rows,
        next_cursor,
    };
    // About what the rows take: their times and counts, and their groups' JSON unescaped.
    let size_hint = body
        .data
        .iter()
        .map(|row| {
            128 + row
                .group
                .iter()
                .map(|(k, v)| k.len() + v.len() + 6)
                .sum::<usize>()
        })
        .fold(0_usize, usize::saturating_add);
    // As [`json`] does: the time to the answer, not to its encoding.
    state.metrics.observe("usage", started);
    Ok(json_written("usage", body.to_json(size_hint)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use neruba_schemas::credit::{self, BalanceRule, EntryKind, Grant, GrantTerms, RuleRecord};
    use neruba_schemas::event::format_time_ms;
    use neruba_schemas::ledger::{Kind, LineItem};
    use std::collections::BTreeMap;

    #[test]
    fn a_usage_answer_written_with_its_rows_directly_is_the_json_serde_writes() {
        for next_cursor in [None, Some("6162\"63".to_owned())] {
            let usage = Usage {
                customer: "c \"1\"".into(),
                meter: "tokens".into(),
                aggregation: neruba_schemas::catalog::Aggregation::Sum,
                window: "1m".into(),
                from: format_time_ms(0),
                to: format_time_ms(60_000),
                as_of: vec![Position {
                    topic: "neruba.rollups".into(),
                    partition: 3,
                    next_offset: 42,
                }],
                data: Vec::new(),
                next_cursor,
            };
            let written = usage.to_json(0).expect("written");
            assert_eq!(written, serde_json::to_vec(&usage).expect("serde"));
        }
    }

    const T0: i64 = 1_798_761_600_000;

    #[test]
    fn the_window_bound_counts_the_windows_a_range_starts() {
        let minute = 60_000;
        // Aligned: [0, 50,000 minutes) starts 50,000 windows.
        assert_eq!(
            windows_starting_in(T0, T0 + 50_000 * minute, minute),
            50_000
        );
        // Was 50,000 (the length floored) for a range that starts 50,001: it opens 1 ms
        // before a window edge and ends 1 ms after one.
        let unaligned = windows_starting_in(T0 - 1, T0 + 50_000 * minute + 1, minute);
        assert_eq!(unaligned, 50_001);
        assert_eq!(windows_starting_in(T0 + 1, T0 + minute, minute), 0);
        assert_eq!(windows_starting_in(T0 + 1, T0 + minute + 1, minute), 1);
        // Before the epoch too (windows align to it either side).
        assert_eq!(windows_starting_in(-minute - 1, 1, minute), 2);
    }

    #[test]
    fn a_refused_grant_reads_as_not_found_saying_why() {
        let refusal = BalanceEntry {
            seq: 1001,
            code: Some("too_many_grants".into()),
            ..serde_json::from_value(serde_json::json!({
                "v": 1, "id": "be_1", "tenant": "acme", "customer": "c1", "seq": 1001,
                "kind": "grant_refused", "currency": "USD", "cause": "gr_x", "grant": "gr_x",
                "amount": "0", "balance_before": "10", "balance_after": "10"
            }))
            .expect("an entry")
        };
        let answer = grant_refused("gr_x", &refusal);
        assert_eq!(
            (answer.status, answer.code),
            (StatusCode::NOT_FOUND, "grant_refused")
        );
        assert!(
            answer
                .message
                .starts_with("grant `gr_x` was refused by the balances stage (too_many_grants, balance entry #1001)"),
            "{}",
            answer.message
        );
    }

    fn grant(key: &str, amount: Decimal) -> Grant {
        Grant {
            v: 1,
            id: credit::grant_id("acme", "c1", key),
            tenant: "acme".into(),
            customer: "c1".into(),
            key: key.into(),
            terms: GrantTerms {
                amount,
                currency: "USD".into(),
                priority: 1,
                effective_at: None,
                expires_at: None,
                paid: None,
                metadata: BTreeMap::new(),
            },
            received_at: format_time_ms(T0),
        }
    }

    fn rule(rule: Option<BalanceRule>) -> RuleRecord {
        RuleRecord {
            v: credit::RULE_RECORD_V,
            tenant: "acme".into(),
            customer: "c1".into(),
            currency: "USD".into(),
            rule,
            received_at: format_time_ms(T0),
        }
    }

    fn usage(amount: Decimal) -> LineItem {
        LineItem {
            v: 1,
            id: "li_1".into(),
            kind: Kind::Usage,
            tenant: "acme".into(),
            customer: "c1".into(),
            meter: "m".into(),
            group: BTreeMap::new(),
            period_start: format_time_ms(T0),
            period_end: format_time_ms(T0 + 30 * 86_400_000),
            window_start: format_time_ms(T0),
            window_end: format_time_ms(T0 + 60_000),
            window_quantity: Decimal::ONE,
            window_events: 1,
            period_quantity: Decimal::ONE,
            amount,
            period_amount: amount,
            currency: "USD".into(),
            price_plan: "p".into(),
            price_version: 1,
            revision: 1,
            supersedes: None,
        }
    }

    /// What the balances read says of the currency: balance, rule present, request outstanding.
    fn read(book: &Book) -> Vec<(String, String, bool, Option<String>)> {
        currency_balances(book, T0)
            .into_iter()
            .map(|b| {
                (
                    b.currency,
                    b.balance.to_string(),
                    b.rule.is_some(),
                    b.outstanding_request,
                )
            })
            .collect()
    }

    #[test]
    fn a_balance_read_needs_the_book_alone_however_many_grants_were_used_up() {
        // Was: a balance read (and every read that only asks whether the customer is known)
        // put back every spent grant kept apart, so its cost grew with each top-up the
        // customer ever used up; and `active_grants` counted used-up grants too, so it said 22
        // for a customer with 2 grants holding credit, and would have said 10 from the book.
        use neruba_balances::state::{BOOK_SPENT_GRANTS, Record};
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ledger = crate::model::TestFold::open(dir.path());
        // 20 top-ups of 1 USD, each used up by the next item; then two packs holding credit.
        let spent = 20;
        for n in 0..spent {
            let topup = grant(&format!("topup-{n:02}"), Decimal::ONE);
            ledger.apply(&credit::encode(&topup), Record::Grant);
            let mut item = usage(Decimal::ONE);
            item.id = format!("li_{n}");
            item.window_start = format_time_ms(T0 + n * 60_000);
            item.window_end = format_time_ms(T0 + (n + 1) * 60_000);
            ledger.apply(&item.encode(), Record::LineItem);
        }
        for (key, amount) in [("pack-a", 5), ("pack-b", 7)] {
            let pack = grant(key, Decimal::from(amount));
            ledger.apply(&credit::encode(&pack), Record::Grant);
        }
        let db = ledger.db.clone();
        let model = ledger.commit_into_model();
        let read = |parts| {
            model
                .book("acme", "c1", parts)
                .expect("read")
                .0
                .expect("the customer")
        };
        let (every, alone) = (read(Parts::GRANTS), read(Parts::BOOK));
        assert_eq!(every.grants.len(), 22);
        assert_eq!(alone.grants.len(), 2 + BOOK_SPENT_GRANTS);
        // Read a page at a time: the grants the book holds and those kept apart, merged in
        // burn-down order (the top-ups' ids interleave them), each as the whole list has it.
        let mut want: Vec<&GrantState> = every.grants.values().map(|g| &**g).collect();
        want.sort_by_key(|g| neruba_balances::book::burn_order(&g.grant));
        let want_ids: Vec<String> = want.iter().map(|g| g.grant.id.clone()).collect();
        for limit in [1, 3, 7, 21, 22, 23] {
            let (read, pages) = every_grants_page(&db, limit);
            assert_eq!(read, want_ids, "limit {limit}");
            assert_eq!(pages, want.len().div_ceil(limit), "limit {limit}");
        }
        let (whole, _) = model.grants("acme", "c1", None, 100).expect("read");
        assert_eq!(
            whole.expect("the customer").iter().collect::<Vec<_>>(),
            want
        );
        let answer = |book: &Book| serde_json::to_value(currency_balances(book, T0)).expect("json");
        assert_eq!(answer(&alone), answer(&every));
        assert_eq!(
            answer(&alone)[0],
            serde_json::json!({"currency": "USD", "balance": "12", "available": "12",
                               "active_grants": 2, "rule": null, "outstanding_request": null})
        );
        // A used-up grant kept apart is still read on its own, settled as the list shows it.
        let first = credit::grant_id("acme", "c1", "topup-00");
        assert!(!alone.grants.contains_key(&first));
        let GrantStanding::Held(grant) = model.grant_standing("acme", "c1", &first).expect("read")
        else {
            panic!("the first top-up is not found");
        };
        assert_eq!(Some(grant.as_ref()), every.grants.get(&first).map(|g| &**g));
        assert_eq!(
            (grant.remaining, grant.consumed),
            (Decimal::ZERO, Decimal::ONE)
        );
    }

    /// The page of `limit` of customer `acme/c1`'s grants after `after` in `db`, as the
    /// grants read pages them.
    fn grants_page_of(
        db: &rocksdb::DB,
        limit: usize,
        after: Option<&GrantPlace>,
    ) -> (Vec<String>, Option<String>) {
        let place = after.map(neruba_balances::book::borrowed_place);
        let grants =
            neruba_balances::state::grants_after(&db.snapshot(), "acme", "c1", place, limit + 1)
                .expect("read")
                .expect("the customer");
        let (page, next) = grants_page("c1", grants, limit);
        (page.into_iter().map(|g| g.grant.id).collect(), next)
    }

    /// Every page of `acme/c1`'s grants at `limit`, through their cursors: the grants read,
    /// and how many pages.
    fn every_grants_page(db: &rocksdb::DB, limit: usize) -> (Vec<String>, usize) {
        let (mut read, mut after, mut pages) = (Vec::new(), None, 0);
        loop {
            let (page, next) = grants_page_of(db, limit, after.as_ref());
            assert!(!page.is_empty() && page.len() <= limit, "limit {limit}");
            read.extend(page);
            pages += 1;
            let Some(next) = next else {
                return (read, pages);
            };
            after = Some(decode_grant_cursor(&next, "c1").expect("its own cursor"));
        }
    }

    #[test]
    fn grant_pages_hold_every_grant_once_in_burn_down_order_and_resume_only_their_read() {
        // Was: the grants read answered every grant the customer ever had, used up or not,
        // in one answer, however many top-ups that was.
        use neruba_balances::state::Record;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ledger = crate::model::TestFold::open(dir.path());
        let terms = [
            // key, priority, effective, expires (minutes after T0)
            ("late-expiry", 1, None, Some(90)),
            ("no-expiry", 1, None, None),
            ("early-expiry", 1, None, Some(30)),
            ("low-priority", 5, None, Some(10)),
            ("effective-later", 1, Some(20), Some(90)),
            ("twin-a", 3, None, None),
            ("twin-b", 3, None, None),
            // Effective before the others were received: it still comes after those with no
            // effective time (from the start).
            ("effective-earlier", 1, Some(-20), Some(90)),
        ];
        let at = |minutes: i64| format_time_ms(T0 + minutes * 60_000);
        for (key, priority, effective, expires) in terms {
            let mut g = grant(key, Decimal::ONE);
            g.terms.priority = priority;
            g.terms.effective_at = effective.map(at);
            g.terms.expires_at = expires.map(at);
            ledger.apply(&credit::encode(&g), Record::Grant);
        }
        ledger.commit();
        // The order the page must have, written independently: priority, then the earliest
        // expiry (none last), then the earliest effective time, then the id.
        let mut expected: Vec<(u16, i64, i64, String)> = terms
            .iter()
            .map(|(key, priority, effective, expires)| {
                (
                    *priority,
                    expires.map_or(i64::MAX, |m| T0 + m * 60_000),
                    // No effective time: effective from the start, before any other.
                    effective.map_or(i64::MIN, |m| T0 + m * 60_000),
                    credit::grant_id("acme", "c1", key),
                )
            })
            .collect();
        expected.sort();
        let expected: Vec<String> = expected.into_iter().map(|(.., id)| id).collect();
        let db = ledger.db.clone();
        let (whole, none) = grants_page_of(&db, MAX_GRANTS_PAGE, None);
        assert_eq!(none, None);
        assert_eq!(whole, expected);
        for limit in 1..=expected.len() + 1 {
            let (read, pages) = every_grants_page(&db, limit);
            assert_eq!(read, expected, "limit {limit}");
            assert_eq!(pages, expected.len().div_ceil(limit), "limit {limit}");
        }
        // A grant made between two pages is read if its place is after the cursor's.
        let (first, next) = grants_page_of(&db, 2, None);
        let after = decode_grant_cursor(&next.expect("more"), "c1").expect("a cursor");
        for (key, priority) in [("before-the-cursor", 0), ("after-the-cursor", 9)] {
            let mut g = grant(key, Decimal::ONE);
            g.terms.priority = priority;
            ledger.apply(&credit::encode(&g), Record::Grant);
        }
        ledger.commit();
        let (rest, _) = grants_page_of(&db, MAX_GRANTS_PAGE, Some(&after));
        let mut read = first;
        read.extend(rest);
        let mut with_later = expected.clone();
        with_later.push(credit::grant_id("acme", "c1", "after-the-cursor"));
        assert_eq!(read, with_later);
        // Another customer's cursor, and text that names no place, are refused.
        let next = grants_page_of(&db, 1, None).1.expect("more");
        for (cursor, customer) in [
            (next.as_str(), "c2"),
            ("zz", "c1"),
            (encode_cursor("[\"c1\", 1]").as_str(), "c1"),
        ] {
            let refused = decode_grant_cursor(cursor, customer).expect_err(cursor);
            assert_eq!(refused.code, "invalid_cursor");
        }
    }

    #[test]
    fn a_top_up_request_a_removed_rule_left_is_shown_until_a_grant_answers_it() {
        // Was: the read showed a request only on its rule, so once the rule was removed a
        // support person could not see that a top-up was still being asked for.
        let mut book = Book::default();
        book.apply_grant(&grant("pack", Decimal::new(10, 0)), i64::MIN, 0);
        book.apply_rule(&rule(Some(BalanceRule {
            low_balance_threshold: Decimal::new(5, 0),
            recharge_to: Some(Decimal::new(20, 0)),
        })));
        let entries = book.apply_item(&usage(Decimal::new(6, 0)));
        let requests: Vec<(String, String)> = entries
            .iter()
            .filter(|e| e.kind == EntryKind::TopupRequested)
            .map(|e| (e.id.clone(), e.amount.to_string()))
            .collect();
        let [(request, amount)] = requests.as_slice() else {
            panic!("one top-up request: {entries:?}");
        };
        assert_eq!(amount, "16");
        let usd = |rule: bool, request: Option<&String>| {
            vec![("USD".to_owned(), "4".to_owned(), rule, request.cloned())]
        };
        assert_eq!(read(&book), usd(true, Some(request)));
        book.apply_rule(&rule(None));
        assert_eq!(read(&book), usd(false, Some(request)));
        // Set again, the rule finds the request outstanding (and asks for no other).
        let again = book.apply_rule(&rule(Some(BalanceRule {
            low_balance_threshold: Decimal::new(5, 0),
            recharge_to: Some(Decimal::new(20, 0)),
        })));
        assert!(
            again.iter().all(|e| e.kind != EntryKind::TopupRequested),
            "{again:?}"
        );
        assert_eq!(read(&book), usd(true, Some(request)));
        // A removal written by a gateway before version 2 of rule records drops it.
        let mut older = book.clone();
        older.apply_rule(&RuleRecord { v: 1, ..rule(None) });
        assert_eq!(read(&older), usd(false, None));
        book.apply_rule(&rule(None));
        assert_eq!(read(&book), usd(false, Some(request)));
        // A grant keyed with the request's id answers it.
        book.apply_grant(&grant(request, Decimal::new(16, 0)), i64::MIN, 0);
        assert_eq!(
            read(&book),
            vec![("USD".to_owned(), "20".to_owned(), false, None)]
        );
    }
}
