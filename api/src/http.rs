//! The billing reads over HTTP (SPEC "Billing reads"), scope `read`, answered from the read
//! model ([`crate::model`]).
//!
//! Invariants:
//! - the tenant is the one the API key proves; a customer of another tenant is answered as
//!   one that does not exist (`404 customer_not_found`), never `403`, so nothing confirms it;
//! - every answer carries `as_of`, the read-model position it was read at; a read with
//!   `min_position=<topic>:<partition>:<offset>` (what a write answered) waits, bounded, until
//!   the model has applied that record, and is otherwise `503 not_caught_up` with
//!   `Retry-After`: a client reads its own writes;
//! - every parameter is checked before anything is read, with a stable code: `400` for a
//!   malformed one (`invalid_period`, `invalid_limit`, `invalid_cursor`, `invalid_after`,
//!   `invalid_position`, `unknown_parameter`), `422` for a position of a topic the model does not
//!   read (`unsupported_position`).

use crate::model::{Model, Position, ReadError};
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use neruba_balances::book::{Book, GrantState, Status};
use neruba_schemas::LiveCatalog;
use neruba_schemas::catalog::Scope;
use neruba_schemas::credit::{BalanceEntry, BalanceRule, Statement};
use neruba_schemas::ledger::LineItem;
use rust_decimal::Decimal;
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};
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
    /// Longest wait for `min_position`.
    pub(crate) read_wait: Duration,
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
        .with_state(state)
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
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(key) = key else {
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

    fn limit(&self) -> Result<usize, Refused> {
        match self.get("limit") {
            None => Ok(DEFAULT_LIMIT),
            Some(text) => text
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| {
                    refused(
                        StatusCode::BAD_REQUEST,
                        "invalid_limit",
                        format!("`limit` must be 1–{MAX_LIMIT}"),
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
        let text = text.ok_or_else(bad)?;
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

/// Waits until the model applied the record at `min_position`, if one is asked for.
async fn caught_up(state: &AppState, params: &Params) -> Result<(), Refused> {
    let Some(text) = params.get("min_position") else {
        return Ok(());
    };
    let bad = || {
        refused(
            StatusCode::BAD_REQUEST,
            "invalid_position",
            "`min_position` must be `<topic>:<partition>:<offset>`, as a write answered",
        )
    };
    let mut parts = text.rsplitn(3, ':');
    let offset: i64 = parts.next().and_then(|o| o.parse().ok()).ok_or_else(bad)?;
    let partition: i32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let topic = parts.next().ok_or_else(bad)?;
    if topic != state.model.topic() {
        return Err(refused(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unsupported_position",
            format!(
                "the read model follows `{}`; a position on `{topic}` cannot be waited for",
                state.model.topic()
            ),
        ));
    }
    let deadline = Instant::now() + state.read_wait;
    loop {
        let position = state.model.position(partition);
        if position.as_ref().is_some_and(|p| p.next_offset > offset) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Refused {
                retry_after: Some(1),
                ..refused(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not_caught_up",
                    format!(
                        "the read model has not applied {text} yet (at {})",
                        position.map_or(-1, |p| p.next_offset)
                    ),
                )
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

/// The customer's book and its position, or 404.
async fn customer_book(
    state: &AppState,
    headers: &HeaderMap,
    customer: &str,
    raw: Vec<(String, String)>,
    allowed: &[&str],
) -> Result<(String, Book, Position, Params), Refused> {
    let tenant = tenant(state, headers)?;
    let params = Params::of(raw, allowed)?;
    caught_up(state, &params).await?;
    let (book, position) = state.model.book(&tenant, customer)?;
    let book = book.ok_or_else(|| not_found(customer))?;
    Ok((tenant, book, position, params))
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

fn decode_cursor(text: &str) -> Result<String, Refused> {
    let bad = || {
        refused(
            StatusCode::BAD_REQUEST,
            "invalid_cursor",
            "not a cursor of this read",
        )
    };
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
    let after = params.get("cursor").map(decode_cursor).transpose()?;
    caught_up(&state, &params).await?;
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

async fn balances(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(customer): Path<String>,
    Query(raw): Query<Vec<(String, String)>>,
) -> Answer {
    let started = Instant::now();
    let (_, book, position, _) = customer_book(&state, &headers, &customer, raw, &[]).await?;
    let now = neruba_schemas::event::now_ms();
    let mut currencies: BTreeSet<&str> = book.balances.keys().map(String::as_str).collect();
    currencies.extend(book.rules.keys().map(String::as_str));
    let balances = currencies
        .into_iter()
        .map(|currency| {
            let in_currency = || {
                book.grants
                    .values()
                    .filter(move |g| g.grant.terms.currency == currency)
            };
            CurrencyBalance {
                currency: currency.to_owned(),
                balance: book.balance(currency),
                available: in_currency()
                    .filter(|g| eligible_now(g, now))
                    .map(|g| g.remaining)
                    .sum(),
                active_grants: in_currency().filter(|g| g.status == Status::Active).count(),
                rule: book.rules.get(currency).map(|r| RuleView {
                    rule: r.rule.clone(),
                    below_threshold: r.below,
                    outstanding_request: r.outstanding.clone(),
                }),
            }
        })
        .collect();
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
    Path(customer): Path<String>,
    Query(raw): Query<Vec<(String, String)>>,
) -> Answer {
    let started = Instant::now();
    let (_, book, position, _) = customer_book(&state, &headers, &customer, raw, &[]).await?;
    // In burn-down order: the order usage draws on them.
    let mut grants: Vec<&GrantState> = book.grants.values().collect();
    grants.sort_by_key(|g| neruba_balances::book::burn_order(&g.grant));
    let body = Grants {
        customer,
        as_of: vec![position],
        grants: grants.into_iter().map(grant_view).collect(),
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
    Path((customer, id)): Path<(String, String)>,
    Query(raw): Query<Vec<(String, String)>>,
) -> Answer {
    let started = Instant::now();
    let (_, book, position, _) = customer_book(&state, &headers, &customer, raw, &[]).await?;
    let grant = book.grants.get(&id).ok_or_else(|| {
        refused(
            StatusCode::NOT_FOUND,
            "grant_not_found",
            format!("customer `{customer}` has no grant `{id}`"),
        )
    })?;
    let body = OneGrant {
        customer,
        as_of: vec![position],
        grant: grant_view(grant),
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
    Path(customer): Path<String>,
    Query(raw): Query<Vec<(String, String)>>,
) -> Answer {
    let started = Instant::now();
    let (tenant, _, position, params) =
        customer_book(&state, &headers, &customer, raw, &["after", "limit"]).await?;
    let limit = params.limit()?;
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
}

async fn statements(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((customer, period)): Path<(String, String)>,
    Query(raw): Query<Vec<(String, String)>>,
) -> Answer {
    let started = Instant::now();
    let tenant = tenant(&state, &headers)?;
    let params = Params::of(raw, &[])?;
    let period = params.period(Some(&period))?;
    caught_up(&state, &params).await?;
    let (book, position) = state.model.book(&tenant, &customer)?;
    let book = book.ok_or_else(|| not_found(&customer))?;
    let mut statements = state.model.final_statements(&tenant, &customer, &period)?;
    statements.extend(
        book.statements
            .values()
            .filter(|s| s.statement.period_start.starts_with(&period))
            .map(|s| s.statement.clone()),
    );
    statements.sort_by(|a, b| a.currency.cmp(&b.currency));
    let body = Statements {
        customer,
        as_of: vec![position],
        period,
        statements,
    };
    Ok(json(&state.metrics, "statement", started, &body))
}

#[derive(Serialize)]
struct LineItems {
    customer: String,
    as_of: Vec<Position>,
    period: String,
    items: Vec<ItemView>,
}

#[derive(Serialize)]
struct ItemView {
    #[serde(flatten)]
    item: LineItem,
    /// A later item of the page names this one in `supersedes`.
    superseded: bool,
}

async fn line_items(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(customer): Path<String>,
    Query(raw): Query<Vec<(String, String)>>,
) -> Answer {
    let started = Instant::now();
    let (tenant, _, position, params) =
        customer_book(&state, &headers, &customer, raw, &["period", "meter"]).await?;
    let period = params.period(params.get("period"))?;
    let items = state
        .model
        .line_items(&tenant, &customer, &period, params.get("meter"))?;
    let superseded: BTreeSet<String> = items.iter().filter_map(|i| i.supersedes.clone()).collect();
    let items = items
        .into_iter()
        .map(|item| ItemView {
            superseded: superseded.contains(&item.id),
            item,
        })
        .collect();
    let body = LineItems {
        customer,
        as_of: vec![position],
        period,
        items,
    };
    Ok(json(&state.metrics, "line_items", started, &body))
}
