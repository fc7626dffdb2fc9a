//! A Rust client for Neruba: batched event ingest with backpressure and retries and credit
//! writes (grants, voids, balance rules) against the gateway, and typed billing reads
//! (balances, grants, entries, statements, line items, usage) against the api.
//!
//! What the client promises:
//! - **Nothing counted twice.** Every event carries an id (yours, or 128 random bits made up
//!   when it is queued) and a time, fixed before the first attempt; a retry resends the same
//!   bytes (after a 503 that lists per-event results, only the events not delivered), so a
//!   repeat is answered `duplicate` by the gateway's recent-repeat filter, and in any case
//!   counted once by the aggregator's deduplication, which is the authoritative one. A grant's
//!   id follows from its `key`, so a retried grant names the same grant.
//! - **Nothing called accepted that is not.** An [`Outcome::Accepted`] or a `202` answer is
//!   the gateway's word, which it gives only after the broker acknowledged (`acks=all`).
//! - **Bounded memory.** The ingest queue, the batch being filled and the batches in flight
//!   are all bounded; a full queue makes [`Ingestor::send`] wait.
//! - **Retries only where they cannot hurt**, with exponential backoff and jitter, never
//!   sooner than a `Retry-After` asks ([`RetryPolicy`]): transport failures, 408, 429, 502,
//!   503, 504 (for reads, also the api's `503 not_caught_up`). Other refusals surface at once
//!   as [`Error::Refused`] with the server's stable `code`.
//! - **Exact reads.** Every amount and quantity read is a [`Decimal`](rust_decimal::Decimal)
//!   parsed from the api's decimal string, and every answer says the read-model position it
//!   was read at (`as_of`); [`Reader::at`] reads one's own credit writes, and
//!   [`Reader::at_all`] of [`Ingestor::positions`] one's own events' usage.
//!
//! An API key has scopes: ingest needs `ingest`, credit writes need `credits`, reads need
//! `read`. The gateway and the api (`neruba api`, or `neruba dev --api-listen`) have their own
//! base URLs. Build one [`Client`] per base URL and key.
//!
//! # Ingest
//!
//! ```no_run
//! use neruba_client::{Client, Event, Outcome};
//! use serde_json::json;
//! use std::time::Duration;
//!
//! # async fn example() -> neruba_client::Result<()> {
//! let client = Client::builder("http://127.0.0.1:8080", "nrb_dev_acme_ingest_7f3a9c")
//!     .batch_size(500)
//!     .linger(Duration::from_millis(50))
//!     .build()?;
//! let ingestor = client.ingestor();
//!
//! // `send` queues the event (waiting if the queue is full) and returns a receipt.
//! let receipt = ingestor
//!     .send(
//!         Event::new("llm.completion", "customer-7")
//!             .with_id("req-1")
//!             .with_data(json!({"model": "large", "tokens": 1200, "status": "ok"})),
//!     )
//!     .await?;
//! // Awaiting a receipt is optional; it resolves once the event's batch was answered.
//! match receipt.await? {
//!     Outcome::Accepted | Outcome::Duplicate => {}
//!     Outcome::Rejected { code, message } => eprintln!("rejected: {code}: {message}"),
//! }
//!
//! // Fire and forget, then make sure everything went out before shutting down.
//! for n in 0..10_000 {
//!     let _ = ingestor
//!         .send(Event::new("api.request", format!("customer-{}", n % 50)))
//!         .await?;
//! }
//! let totals = ingestor.close().await?;
//! println!("{} accepted, {} rejected", totals.accepted, totals.rejected);
//! # Ok(())
//! # }
//! ```
//!
//! # Credits
//!
//! ```no_run
//! use neruba_client::{Client, Error, GrantRequest};
//! use rust_decimal::Decimal;
//!
//! # async fn example() -> neruba_client::Result<()> {
//! let client = Client::new("http://127.0.0.1:8080", "nrb_dev_acme_credits_5c1e07")?;
//! let grant = GrantRequest::new("purchase-2026-11-24", Decimal::new(50, 0), "USD")
//!     .with_priority(5)
//!     .with_expires_at("2027-11-24T00:00:00Z")
//!     .with_paid(Decimal::new(45, 0), "USD");
//! match client.grant("customer-7", &grant).await {
//!     Ok(accepted) => println!("{} at offset {}", accepted.id, accepted.position.offset),
//!     Err(Error::Refused { code, message, .. }) => eprintln!("refused: {code}: {message}"),
//!     Err(e) => return Err(e),
//! }
//! client
//!     .set_balance_rule("customer-7", "USD", Decimal::new(1000, 2), Some(Decimal::new(5000, 2)))
//!     .await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Billing reads
//!
//! ```no_run
//! use neruba_client::{Client, Error, GrantRequest, StatementStatus, UsageQuery, Window};
//! use rust_decimal::Decimal;
//!
//! # async fn example() -> neruba_client::Result<()> {
//! let gateway = Client::new("http://127.0.0.1:8080", "nrb_dev_acme_credits_5c1e07")?;
//! let api = Client::new("http://127.0.0.1:8081", "nrb_dev_acme_read_2b81d4")?.reader();
//!
//! // Read your own write: at the grant's position, the api answers once it has applied it.
//! let written = gateway
//!     .grant("customer-7", &GrantRequest::new("pack-1", Decimal::new(50, 0), "USD"))
//!     .await?;
//! let grants = api.at(&written.position).grants("customer-7").await?;
//! assert!(grants.as_of[0].includes(&written.position));
//! for grant in &grants.grants {
//!     println!("{} {}: {} of {} left", grant.id, grant.status, grant.remaining, grant.amount);
//! }
//!
//! // Balances, statements and every balance entry, with exact decimals.
//! for balance in api.balances("customer-7").await?.balances {
//!     println!("{}: {} ({} available)", balance.currency, balance.balance, balance.available);
//! }
//! for statement in api.statements("customer-7", "2026-11").await?.statements {
//!     if statement.status == StatementStatus::Open {
//!         println!("upcoming: {} {} due", statement.amount_due, statement.currency);
//!     }
//! }
//! let entries = api.all_balance_entries("customer-7", 0).await?;
//! let items = api.line_items("customer-7", "2026-11", Some("llm_tokens")).await?;
//! println!("{} entries, {} line items", entries.len(), items.items.len());
//!
//! // Usage per day and model, from the closed windows.
//! let query = UsageQuery::new(
//!     "customer-7",
//!     "llm_tokens",
//!     "2026-11-01T00:00:00Z",
//!     "2026-12-01T00:00:00Z",
//! )
//! .with_window(Window::Day)
//! .with_group_by(["model"]);
//! for row in api.usage(&query).await?.data {
//!     println!("{} {:?}: {}", row.window_start, row.group, row.quantity);
//! }
//!
//! // A refusal keeps its stable code.
//! match api.balances("nobody").await {
//!     Err(Error::Refused { status: 404, code, .. }) if code == "customer_not_found" => {}
//!     other => println!("{other:?}"),
//! }
//! # Ok(())
//! # }
//! ```

mod credits;
mod error;
mod event;
mod http;
mod ingest;
mod reads;
mod retry;

pub use credits::{GrantAccepted, GrantRequest, Paid, Position, RuleAccepted, VoidAccepted};
pub use error::{Error, Result};
pub use event::{Event, format_time};
pub use ingest::{IngestAttempt, Ingestor, Outcome, Receipt, Totals};
pub use reads::{
    Aggregation, BalanceEntries, BalanceEntry, BalanceRule, BalanceRuleView, Balances,
    CurrencyBalance, CustomerRef, CustomersPage, EntryKind, Grant, GrantStatus, Grants, LineItem,
    LineItemKind, LineItems, MAX_PAGE, MAX_POSITIONS, OneGrant, PendingPriorPeriod, ReadPosition,
    Reader, Series, Statement, StatementLine, StatementStatus, Statements, Usage, UsageQuery,
    UsageRow, Window,
};
pub use retry::RetryPolicy;

use http::Transport;
use ingest::{AttemptObserver, IngestConfig};
use reqwest::Url;
use reqwest::header::HeaderValue;
use std::sync::Arc;
use std::time::Duration;

/// The most events the gateway takes in one request by default.
const GATEWAY_MAX_BATCH_EVENTS: usize = 10_000;

/// A client of one server (the gateway, or the api for [`reads`](Client::reader)), with one
/// API key. Cheap to clone: clones share the connection
/// pool.
#[derive(Debug, Clone)]
pub struct Client {
    transport: Arc<Transport>,
    ingest: IngestConfig,
}

impl Client {
    /// A client of the server at `base_url` (e.g. `http://127.0.0.1:8080`) with the default
    /// settings ([`ClientBuilder`]).
    pub fn new(base_url: &str, api_key: &str) -> Result<Self> {
        Self::builder(base_url, api_key).build()
    }

    /// A builder for a client with other timeouts, batching or retries.
    pub fn builder(base_url: impl Into<String>, api_key: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            base_url: base_url.into(),
            api_key: api_key.into(),
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            ingest: IngestConfig {
                batch_size: 500,
                max_batch_bytes: 4 * 1024 * 1024,
                linger: Duration::from_millis(50),
                max_in_flight: 4,
                queue_capacity: 1000,
                observer: None,
            },
            retry: RetryPolicy::default(),
        }
    }

    /// A new [`Ingestor`]: its own queue and background task, sending with this client's
    /// settings. Most programs need one, cloned where events are produced.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime (the background task is spawned on the current one).
    pub fn ingestor(&self) -> Ingestor {
        Ingestor::start(self.transport.clone(), self.ingest.clone())
    }

    /// The billing reads, for a client of the api's base URL with a `read` key.
    pub fn reader(&self) -> Reader {
        Reader::new(self.transport.clone())
    }
}

/// Settings of a [`Client`]; every one has a default.
#[derive(Clone)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct ClientBuilder {
    base_url: String,
    /// Left out of `Debug`, as the built client's `Authorization` header is.
    api_key: String,
    timeout: Duration,
    connect_timeout: Duration,
    ingest: IngestConfig,
    retry: RetryPolicy,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("base_url", &self.base_url)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("ingest", &self.ingest)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// The whole of one attempt (connect, send, answer). Default 30 s. An ingest attempt waits
    /// for the broker's acknowledgement, so keep it above the gateway's produce timeout; a read
    /// at a position ([`Reader::at`]) waits up to the api's `--api-read-wait` (default 5 s) for
    /// the model to catch up, so keep it above that too: an attempt cut off first is retried
    /// as a transport failure, and once out of attempts reported [`Error::Unavailable`] with
    /// no code, where the api would have answered `503 not_caught_up`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Connecting. Default 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Events per ingest request, 1–10,000 (the gateway's default limit). Default 500.
    pub fn batch_size(mut self, events: usize) -> Self {
        self.ingest.batch_size = events;
        self
    }

    /// The largest ingest request body, bytes; a batch is sent early rather than grow past it
    /// (an event larger than this alone goes in a batch of its own). Default 4 MiB, under
    /// the gateway's default 5 MiB limit.
    pub fn max_batch_bytes(mut self, bytes: usize) -> Self {
        self.ingest.max_batch_bytes = bytes;
        self
    }

    /// How long a batch that is not full waits for more events after its first. Default
    /// 50 ms.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.ingest.linger = linger;
        self
    }

    /// Ingest requests outstanding at once (retries included). Default 4.
    pub fn max_in_flight(mut self, batches: usize) -> Self {
        self.ingest.max_in_flight = batches;
        self
    }

    /// Events queued ahead of batching before [`Ingestor::send`] waits. Default 1000.
    pub fn queue_capacity(mut self, events: usize) -> Self {
        self.ingest.queue_capacity = events;
        self
    }

    /// Calls `observe` after every ingest request attempt (retries included) with its
    /// latency, its status and its size: what a load generator or a metrics exporter needs
    /// that the per-event outcomes do not say. It runs on the ingestor's background tasks, so
    /// it must be quick and must not block. Default: none.
    pub fn on_ingest_attempt(
        mut self,
        observe: impl Fn(&IngestAttempt) + Send + Sync + 'static,
    ) -> Self {
        self.ingest.observer = Some(AttemptObserver(Arc::new(observe)));
        self
    }

    /// How failed requests are retried: ingest, credit writes and reads alike.
    pub fn retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The client, or [`Error::Config`] saying which setting is impossible.
    pub fn build(self) -> Result<Client> {
        let config = |message: String| Err(Error::Config(message));
        let mut base = Url::parse(&self.base_url)
            .map_err(|e| Error::Config(format!("base URL `{}`: {e}", self.base_url)))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return config(format!(
                "base URL `{}` is not an http(s) URL",
                self.base_url
            ));
        }
        base.set_query(None);
        base.set_fragment(None);
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", self.api_key))
            .map_err(|_| Error::Config("the API key is not a valid header value".to_owned()))?;
        authorization.set_sensitive(true);
        let ingest = &self.ingest;
        if !(1..=GATEWAY_MAX_BATCH_EVENTS).contains(&ingest.batch_size) {
            return config(format!(
                "batch size {} is not within 1–{GATEWAY_MAX_BATCH_EVENTS}",
                ingest.batch_size
            ));
        }
        if ingest.max_in_flight == 0 || ingest.queue_capacity == 0 {
            return config("max in-flight and queue capacity must be at least 1".to_owned());
        }
        if ingest.max_batch_bytes < 2 {
            return config("max batch bytes must hold at least `[]`".to_owned());
        }
        if self.retry.max_attempts == 0 {
            return config("a retry policy needs at least one attempt".to_owned());
        }
        let http = reqwest::Client::builder()
            .timeout(self.timeout)
            .connect_timeout(self.connect_timeout)
            .user_agent(concat!("neruba-client/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        Ok(Client {
            transport: Arc::new(Transport {
                http,
                base,
                authorization,
                retry: self.retry,
            }),
            ingest: self.ingest,
        })
    }
}
