//! Prepaid credit in: `POST /v1/customers/{customer}/grants`,
//! `POST /v1/customers/{customer}/grants/{id}/void`, and a customer's balance rule in one
//! currency, `PUT` and `DELETE /v1/customers/{customer}/balance-rules/{currency}`; and the one
//! ledger write they and `neruba credits grant|void|rule` share ([`LedgerWriter::write`]).
//!
//! Invariants:
//! - a grant, void or rule goes to the ledger topic under key `tenant/customer`, in the partition
//!   [`stable_partition`] gives that key: the partition, and so the order, of the customer's
//!   line items (the rater partitions them the same way), which is what lets the balances
//!   stage fold items, grants, voids and rules as one log;
//! - `accepted` is said only after the broker acknowledged the record with `acks=all` (the
//!   gateway's idempotent producer), and the answer carries the record's position;
//! - every refusal (caller, customer, body, terms, rate) is decided before anything is
//!   written: a refused request writes nothing, so a client can fix it and send it again;
//! - the tenant is the one the API key proves (scope `credits`); the path names a customer of
//!   that tenant only, so no request can touch another tenant's customer;
//! - the gateway does not deduplicate grants: a retry carries the same key, gets the same
//!   deterministic id ([`credit::grant_id`]) and may be written twice; the balances stage
//!   applies a key once and refuses one reused with other terms.
//!
//! The ledger topic's partition count is learned from the broker at the first write and kept,
//! as the rater learns its output's at start: partitions added to the ledger topic later
//! would move customers (and split their order), so they need both restarted anyway.

use crate::binary;
use crate::http::{
    AppState, Refusal, body_encoding, caller_with, error_response, read_body, refusal_response,
    with_retry_after,
};
use crate::kafka::DeliveryError;
use axum::body::Body;
use axum::extract::path::ErrorKind;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use neruba_schemas::Catalog;
use neruba_schemas::catalog::Scope;
use neruba_schemas::credit::{
    self, Grant, GrantRejectCode, GrantRejection, GrantRequest, RuleRecord, RuleRequest, Void,
};
use neruba_schemas::event;
use neruba_schemas::topics::{RECORD_HEADER, stable_partition};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Largest grant, void or rule body, bytes (after `Content-Encoding`); a grant is a few
/// hundred.
pub const MAX_CREDIT_BODY_BYTES: usize = 64 * 1024;

/// [`RECORD_HEADER`] value of a grant on the ledger topic.
pub const GRANT_RECORD: &str = "grant";
/// [`RECORD_HEADER`] value of a void on the ledger topic.
pub const VOID_RECORD: &str = "void";
/// [`RECORD_HEADER`] value of a balance rule (set or removed) on the ledger topic.
pub const RULE_RECORD: &str = "rule";

/// How long the broker has to name the ledger topic's partitions.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// A record for the ledger topic.
#[derive(Debug, Clone, Copy)]
pub enum CreditRecord<'a> {
    Grant(&'a Grant),
    Void(&'a Void),
    Rule(&'a RuleRecord),
}

impl CreditRecord<'_> {
    /// The Kafka key, `tenant/customer`: the line items' key.
    pub fn partition_key(&self) -> String {
        let (tenant, customer) = match self {
            Self::Grant(g) => (&g.tenant, &g.customer),
            Self::Void(v) => (&v.tenant, &v.customer),
            Self::Rule(r) => (&r.tenant, &r.customer),
        };
        format!("{tenant}/{customer}")
    }

    /// Its [`RECORD_HEADER`] value.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Grant(_) => GRANT_RECORD,
            Self::Void(_) => VOID_RECORD,
            Self::Rule(_) => RULE_RECORD,
        }
    }

    fn encode(&self) -> Vec<u8> {
        match self {
            Self::Grant(g) => credit::encode(g),
            Self::Void(v) => credit::encode(v),
            Self::Rule(r) => credit::encode(r),
        }
    }
}

/// Where a record landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// The answer to an accepted grant (HTTP 202, and what `neruba credits grant` prints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantAccepted {
    pub id: String,
    pub status: String,
    pub position: Position,
}

/// The answer to an accepted void (HTTP 202, and what `neruba credits void` prints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoidAccepted {
    pub grant: String,
    pub status: String,
    pub position: Position,
}

/// The answer to an accepted rule, set or removed (HTTP 202, and what `neruba credits rule`
/// prints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleAccepted {
    pub customer: String,
    pub currency: String,
    pub status: String,
    pub position: Position,
}

impl RuleAccepted {
    /// The answer for `rule`, written at `position`.
    pub fn new(rule: RuleRecord, position: Position) -> Self {
        Self {
            customer: rule.customer,
            currency: rule.currency,
            status: "accepted".to_owned(),
            position,
        }
    }
}

/// The record that removes `customer`'s balance rule in `currency` (`rule: null`), or why it
/// is refused: the customer must be well formed and the currency one the catalog knows, as
/// for setting a rule.
pub fn rule_removal(
    catalog: &Catalog,
    tenant: &str,
    customer: &str,
    currency: &str,
    now_ms: i64,
) -> Result<RuleRecord, GrantRejection> {
    credit::check_customer(customer)?;
    if catalog.precision(currency).is_none() {
        return Err(GrantRejection {
            code: GrantRejectCode::UnknownCurrency,
            message: format!(
                "currency `{currency}` is neither a known ISO 4217 code nor a unit of the catalog"
            ),
        });
    }
    Ok(RuleRecord {
        v: credit::RULE_RECORD_V,
        tenant: tenant.to_owned(),
        customer: customer.to_owned(),
        currency: currency.to_owned(),
        rule: None,
        received_at: event::format_time_ms(now_ms),
    })
}

/// Writes grants, voids and rules to the ledger topic, each acknowledged before it returns.
#[derive(Clone)]
pub struct LedgerWriter {
    producer: neruba_kafka::Recoverable<neruba_kafka::AckedProducer>,
    topic: Arc<str>,
    /// The topic's partition count, once the broker named it.
    partitions: Arc<OnceLock<i32>>,
}

impl std::fmt::Debug for LedgerWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerWriter")
            .field("topic", &self.topic)
            .field("partitions", &self.partitions.get())
            .finish_non_exhaustive()
    }
}

impl LedgerWriter {
    /// A writer to `topic` through `producer` (an idempotent `acks=all` producer: the
    /// gateway's, [`crate::kafka::build_producer`]).
    pub fn new(
        producer: neruba_kafka::Recoverable<neruba_kafka::AckedProducer>,
        topic: &str,
    ) -> Self {
        Self {
            producer,
            topic: topic.into(),
            partitions: Arc::default(),
        }
    }

    /// The topic written to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Writes `record` to its customer's partition and waits for the broker's acknowledgement;
    /// its position, or why the broker did not take it (retry later).
    pub async fn write(&self, record: CreditRecord<'_>) -> Result<Position, DeliveryError> {
        let partitions = self.partitions().await?;
        let key = record.partition_key();
        let partition = stable_partition(&key, partitions);
        let payload = record.encode();
        let headers = OwnedHeaders::new().insert(Header {
            key: RECORD_HEADER,
            value: Some(record.kind()),
        });
        let producer = self.producer.get();
        let mut sends = producer.sends(1);
        sends.send(
            BaseRecord::to(&self.topic)
                .key(&key)
                .payload(&payload)
                .headers(headers)
                .partition(partition),
        );
        let acks = sends.acks();
        let delivered = acks
            .await
            .into_iter()
            .next()
            .unwrap_or(Err(KafkaError::Canceled));
        match delivered {
            Ok(delivery) => Ok(Position {
                topic: self.topic.to_string(),
                partition: delivery.partition,
                offset: delivery.offset,
            }),
            Err(e) => {
                if let Err(rebuild) = self.producer.recover(&producer, &e) {
                    tracing::error!(error = %rebuild, "Could not replace the failed producer.");
                }
                Err(DeliveryError::from(e))
            }
        }
    }

    /// The ledger topic's partition count: from the broker the first time, then remembered.
    async fn partitions(&self) -> Result<i32, DeliveryError> {
        if let Some(count) = self.partitions.get() {
            return Ok(*count);
        }
        let producer = self.producer.get();
        let topic = self.topic.clone();
        let fetched = tokio::task::spawn_blocking(move || {
            let metadata = producer
                .client()
                .fetch_metadata(Some(&topic), METADATA_TIMEOUT)
                .map_err(DeliveryError::from)?;
            let count = metadata
                .topics()
                .iter()
                .find(|t| t.name() == &*topic && t.error().is_none())
                .map_or(0, |t| t.partitions().len());
            match i32::try_from(count) {
                Ok(count) if count > 0 => Ok(count),
                _ => Err(DeliveryError::Unavailable(format!(
                    "the broker names no partitions of the ledger topic `{topic}`"
                ))),
            }
        })
        .await
        .map_err(|e| DeliveryError::Unavailable(format!("metadata task: {e}")))??;
        Ok(*self.partitions.get_or_init(|| fetched))
    }
}

/// What a handler made of a request: the answer, and the status for the request counter.
fn finish(state: &AppState, route: &str, response: Response) -> Response {
    state
        .metrics
        .credit_requests
        .with_label_values(&[route, response.status().as_str()])
        .inc();
    response
}

/// `POST /v1/customers/{customer}/grants`.
pub(crate) async fn grant(
    State(state): State<Arc<AppState>>,
    customer: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let response = handle_grant(&state, customer.map(|Path(c)| c), &headers, body).await;
    finish(&state, "grant", response)
}

/// `POST /v1/customers/{customer}/grants/{id}/void`.
pub(crate) async fn void(
    State(state): State<Arc<AppState>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let response = handle_void(&state, path.map(|Path(p)| p), &headers, body).await;
    finish(&state, "void", response)
}

/// `PUT /v1/customers/{customer}/balance-rules/{currency}`.
pub(crate) async fn put_rule(
    State(state): State<Arc<AppState>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let response = handle_put_rule(&state, path.map(|Path(p)| p), &headers, body).await;
    finish(&state, "rule_put", response)
}

/// `DELETE /v1/customers/{customer}/balance-rules/{currency}`.
pub(crate) async fn delete_rule(
    State(state): State<Arc<AppState>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let response = handle_delete_rule(&state, path.map(|Path(p)| p), &headers, body).await;
    finish(&state, "rule_delete", response)
}

async fn handle_grant(
    state: &AppState,
    customer: Result<String, PathRejection>,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    // 1. Who is calling, and for which of its customers, before a byte of the body is read.
    let catalog = state.catalog.current();
    let tenant = match caller_with(&catalog, headers, Scope::Credits) {
        Ok(tenant) => tenant,
        Err(refused) => return refusal_response(refused),
    };
    let customer = match path_customer(customer) {
        Ok(customer) => customer,
        Err(refused) => return *refused,
    };

    // 2. The body: JSON, within the size limit and the body deadline, then the grant's fields.
    let request: GrantRequest = match json_body(state, &tenant.id, headers, body, "a grant").await {
        Ok(request) => request,
        Err(refused) => return *refused,
    };

    // 3. Rate limit (one event's worth), before anything has a side effect.
    if let Err(refused) = rate_limit(state, tenant) {
        return *refused;
    }

    // 4. The terms, then the write; answered once the broker has it.
    let grant = match request.validate(&catalog, &tenant.id, &customer, event::now_ms()) {
        Ok(grant) => grant,
        Err(refused) => return grant_refusal(refused),
    };
    match state.ledger.write(CreditRecord::Grant(&grant)).await {
        Ok(position) => accepted(&GrantAccepted {
            id: grant.id,
            status: "accepted".to_owned(),
            position,
        }),
        Err(e) => broker_unavailable(state, &e),
    }
}

async fn handle_void(
    state: &AppState,
    path: Result<(String, String), PathRejection>,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    // 1. Who is calling, for which customer and which grant, before the body is read.
    let catalog = state.catalog.current();
    let tenant = match caller_with(&catalog, headers, Scope::Credits) {
        Ok(tenant) => tenant,
        Err(refused) => return refusal_response(refused),
    };
    let (customer, grant) = match path {
        Ok((customer, grant)) => (Ok(customer), grant),
        Err(e) => (Err(e), String::new()),
    };
    let customer = match path_customer(customer) {
        Ok(customer) => customer,
        Err(refused) => return *refused,
    };
    if !credit::is_grant_id(&grant) {
        return grant_refusal(GrantRejection {
            code: GrantRejectCode::InvalidGrantId,
            message: "a grant id is `gr_` and 32 lower-case hex digits".to_owned(),
        });
    }

    // 2. The body says nothing: empty, or `{}`.
    if let Err(refused) = empty_body(state, &tenant.id, headers, body, "a void").await {
        return *refused;
    }

    // 3. Rate limit, then the write.
    if let Err(refused) = rate_limit(state, tenant) {
        return *refused;
    }
    let void = Void {
        v: credit::VOID_RECORD_V,
        tenant: tenant.id.clone(),
        customer,
        grant,
        received_at: event::format_time_ms(event::now_ms()),
    };
    match state.ledger.write(CreditRecord::Void(&void)).await {
        Ok(position) => accepted(&VoidAccepted {
            grant: void.grant,
            status: "accepted".to_owned(),
            position,
        }),
        Err(e) => broker_unavailable(state, &e),
    }
}

async fn handle_put_rule(
    state: &AppState,
    path: Result<(String, String), PathRejection>,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    // 1. Who is calling, and for which of its customers, before a byte of the body is read.
    let catalog = state.catalog.current();
    let tenant = match caller_with(&catalog, headers, Scope::Credits) {
        Ok(tenant) => tenant,
        Err(refused) => return refusal_response(refused),
    };
    let (customer, currency) = split_rule_path(path);
    let customer = match path_customer(customer) {
        Ok(customer) => customer,
        Err(refused) => return *refused,
    };

    // 2. The body: JSON, within the size limit and the body deadline, then the rule's fields.
    let request: RuleRequest =
        match json_body(state, &tenant.id, headers, body, "a balance rule").await {
            Ok(request) => request,
            Err(refused) => return *refused,
        };

    // 3. Rate limit, before anything has a side effect.
    if let Err(refused) = rate_limit(state, tenant) {
        return *refused;
    }

    // 4. The currency and amounts, then the write; answered once the broker has it.
    let rule = match request.validate(&catalog, &tenant.id, &customer, &currency, event::now_ms()) {
        Ok(rule) => rule,
        Err(refused) => return grant_refusal(refused),
    };
    write_rule(state, rule).await
}

async fn handle_delete_rule(
    state: &AppState,
    path: Result<(String, String), PathRejection>,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    // 1. Who is calling, and for which of its customers, before the body is read.
    let catalog = state.catalog.current();
    let tenant = match caller_with(&catalog, headers, Scope::Credits) {
        Ok(tenant) => tenant,
        Err(refused) => return refusal_response(refused),
    };
    let (customer, currency) = split_rule_path(path);
    let customer = match path_customer(customer) {
        Ok(customer) => customer,
        Err(refused) => return *refused,
    };

    // 2. The body says nothing: empty, or `{}`.
    if let Err(refused) = empty_body(state, &tenant.id, headers, body, "removing a rule").await {
        return *refused;
    }

    // 3. Rate limit, then the currency, then the write.
    if let Err(refused) = rate_limit(state, tenant) {
        return *refused;
    }
    let rule = match rule_removal(&catalog, &tenant.id, &customer, &currency, event::now_ms()) {
        Ok(rule) => rule,
        Err(refused) => return grant_refusal(refused),
    };
    write_rule(state, rule).await
}

/// A rule path's customer (or why it could not be read) and currency.
fn split_rule_path(
    path: Result<(String, String), PathRejection>,
) -> (Result<String, PathRejection>, String) {
    match path {
        Ok((customer, currency)) => (Ok(customer), currency),
        Err(e) => (Err(e), String::new()),
    }
}

async fn write_rule(state: &AppState, rule: RuleRecord) -> Response {
    match state.ledger.write(CreditRecord::Rule(&rule)).await {
        Ok(position) => accepted(&RuleAccepted::new(rule, position)),
        Err(e) => broker_unavailable(state, &e),
    }
}

/// The path's customer (percent-decoded by the router), or the 422 `invalid_customer` answer.
fn path_customer(customer: Result<String, PathRejection>) -> Result<String, Refusal> {
    let customer = customer.map_err(|e| {
        // Named by the segment that could not be read: a void's grant id or a rule's
        // currency is not the customer's fault.
        let (code, what) = match undecodable(&e) {
            Some("id") => (GrantRejectCode::InvalidGrantId, "grant id"),
            Some("currency") => (GrantRejectCode::UnknownCurrency, "currency"),
            _ => (GrantRejectCode::InvalidCustomer, "customer"),
        };
        Box::new(grant_refusal(GrantRejection {
            code,
            message: format!("the {what} in the path is not readable: {e}"),
        }))
    })?;
    credit::check_customer(&customer).map_err(|refused| Box::new(grant_refusal(refused)))?;
    Ok(customer)
}

/// The path parameter whose segment is not UTF-8 once percent-decoded, if that is why the
/// path was refused.
fn undecodable(rejection: &PathRejection) -> Option<&str> {
    match rejection {
        PathRejection::FailedToDeserializePathParams(failed) => match failed.kind() {
            ErrorKind::InvalidUtf8InPathParam { key } => Some(key),
            _ => None,
        },
        _ => None,
    }
}

/// The body of a grant, void or rule, at most [`MAX_CREDIT_BODY_BYTES`] (or the gateway's body limit,
/// if lower), decoded and read within the body deadline as an event request's is.
async fn read_credit_body(
    state: &AppState,
    tenant: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<bytes::Bytes, Refusal> {
    let limit = MAX_CREDIT_BODY_BYTES.min(state.max_body_bytes);
    let head = body_encoding(headers, limit)?;
    let (bytes, _share) = read_body(state, tenant, body, head, limit).await?;
    // A credit body is parsed before its answer is awaited, and is at most 64 KiB.
    Ok(bytes)
}

/// A JSON body of `T` (`what` names it in the refusals): `415` unless the content type is
/// JSON, the size and deadline refusals of [`read_credit_body`], `400 invalid_body` when it is
/// not a `T`.
async fn json_body<T: serde::de::DeserializeOwned>(
    state: &AppState,
    tenant: &str,
    headers: &HeaderMap,
    body: Body,
    what: &str,
) -> Result<T, Refusal> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("(not text)"));
    if !binary::is_json(content_type) {
        return Err(Box::new(error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "{what} is JSON (`application/json`); content type `{}` is not",
                content_type.unwrap_or_default()
            ),
        )));
    }
    let bytes = read_credit_body(state, tenant, headers, body).await?;
    object(&bytes).map_err(|e| {
        Box::new(error_response(
            StatusCode::BAD_REQUEST,
            GrantRejectCode::InvalidBody.as_str(),
            format!("the body is not {what}: {e}"),
        ))
    })
}

/// `bytes` as a `T` written as one JSON object. `serde_json` alone also reads a struct from an
/// array of its fields in order (`["k", "5", "USD"]` as a grant), which no client means.
fn object<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err("expected one JSON object".to_owned());
    }
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// The body of a request that has no fields: empty, or `{}` (`400 invalid_body` otherwise).
async fn empty_body(
    state: &AppState,
    tenant: &str,
    headers: &HeaderMap,
    body: Body,
    what: &str,
) -> Result<(), Refusal> {
    /// No fields.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Nothing {}
    let bytes = read_credit_body(state, tenant, headers, body).await?;
    if bytes.trim_ascii().is_empty() {
        return Ok(());
    }
    object::<Nothing>(&bytes).map(|_| ()).map_err(|e| {
        Box::new(error_response(
            StatusCode::BAD_REQUEST,
            GrantRejectCode::InvalidBody.as_str(),
            format!("{what} takes a body that is empty or `{{}}`: {e}"),
        ))
    })
}

/// Takes one token from the tenant's bucket (the events' limit: a grant costs what one event
/// does), or the 429 answer.
fn rate_limit(state: &AppState, tenant: &neruba_schemas::catalog::Tenant) -> Result<(), Refusal> {
    let limit = tenant.rate_limit.unwrap_or(state.default_rate_limit);
    state
        .rate_limiter
        .take(&tenant.id, limit, 1)
        .map_err(|wait| {
            Box::new(with_retry_after(
                error_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!(
                        "tenant is over its limit of {} events/s",
                        limit.events_per_second
                    ),
                ),
                wait,
            ))
        })
}

/// A refused grant, void or rule: 400 for a body that is not one, 422 for the rest.
fn grant_refusal(refused: GrantRejection) -> Response {
    let status = match refused.code {
        GrantRejectCode::InvalidBody => StatusCode::BAD_REQUEST,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    error_response(status, refused.code.as_str(), refused.message)
}

fn accepted(answer: &impl Serialize) -> Response {
    (StatusCode::ACCEPTED, axum::Json(answer)).into_response()
}

fn broker_unavailable(state: &AppState, e: &DeliveryError) -> Response {
    state
        .broker_ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    tracing::warn!(reason = %e, "Credit record not acknowledged by the broker; answering 503.");
    with_retry_after(
        error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_unavailable",
            format!("the broker did not acknowledge the record; retry the request: {e}"),
        ),
        Duration::from_secs(5),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use neruba_schemas::credit::{GrantRequest, RuleRequest};

    #[test]
    fn a_credit_body_is_one_json_object_never_an_array_of_its_fields() {
        // Was: `serde_json` read a struct from an array of its fields in order, so
        // `["k1","5","USD",…]` made a grant of 5 USD and `[]` voided one.
        assert!(object::<GrantRequest>(br#"["k1","5","USD",null,null,null,null,null]"#).is_err());
        assert!(object::<RuleRequest>(br#"["10","50"]"#).is_err());
        assert!(object::<RuleRequest>(b" []").is_err());
        assert!(object::<RuleRequest>(b"5").is_err());
        let grant =
            object::<GrantRequest>(b" \n{\"key\":\"k1\",\"amount\":\"5\",\"currency\":\"USD\"}")
                .map(|g| (g.key, g.currency));
        assert_eq!(grant, Ok((Some("k1".to_owned()), Some("USD".to_owned()))));
        let rule = object::<RuleRequest>(br#"{"low_balance_threshold":"10"}"#)
            .map(|r| r.low_balance_threshold);
        assert_eq!(rule, Ok(Some(serde_json::json!("10"))));
    }
}
