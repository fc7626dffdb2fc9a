//! The balances stage: applies the ledger topic's line items to prepaid credit grants and
//! writes balance entries (SPEC "Money state").
//!
//! Invariants:
//! - per ledger partition, every customer's book, the line items applied, the partition's
//!   clock and the next offset live in one RocksDB database and change in one atomic write
//!   ([`state`]), on the shared stage runtime ([`neruba_stage`]);
//! - the ledger topic is one journal per customer: line items (from the rater), grants and
//!   voids (from the gateway) and clock ticks (from this stage) share the customer's
//!   partition, so the entries are a function of that partition's records alone, and a replay
//!   gives them byte for byte ([`book`] is the pure fold);
//! - a batch's entries are acknowledged by the broker before the batch is written: a crash can
//!   repeat an entry (same id and content) but never lose one.

pub mod book;
pub mod metrics;
mod stage;
pub mod state;

pub use neruba_stage::{CrashPoint, Error, Result, Running};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// How long after its `expires_at` (plus the longest window the partition has priced: see
/// [`state::PartitionState::tick_due`]) a grant expires by default: the line items of the
/// windows that began before its expiry reach the ledger first. The aggregator closes a window
/// up to its grace plus its idle timeout after the window ends (40 s by default), and a stage
/// a little behind adds to that; with no grace their usage went uncovered though credit was
/// left for it.
pub const DEFAULT_EXPIRY_GRACE_MS: i64 = 5 * 60 * 1000;

/// Most ledger records applied before a batch's entries are delivered and its books written,
/// by default. A batch ends sooner when the consumer has nothing more queued, so this bounds
/// only a stage catching up: there, the larger the batch, the more of a customer's records
/// one book write absorbs and the fewer acknowledgement waits the records share (10,000
/// customers' records in ledger order, `benches/balances_throughput.rs`: 1.4 × the entries/s
/// of batches of 5,000 with one worker, 1.27 × with two).
pub const DEFAULT_MAX_BATCH: usize = 50_000;

/// Balances settings: the stage runtime's, and the stage's own.
#[derive(Debug, Clone)]
pub struct Config {
    /// Brokers, group, the ledger topic (input), state directory, batch size, workers.
    pub stage: neruba_stage::Config,
    pub entries_topic: String,
    /// A grant expires once the partition's clock passes its `expires_at` plus this.
    pub expiry_grace_ms: i64,
    /// The catalog's longest meter window, if known: how far a tick waits past a deadline
    /// beside the grace from the start, before the partition has priced a window that long
    /// itself ([`state::PartitionState::with_window_floor`]). 0: what the partition priced.
    pub window_floor_ms: i64,
    /// A statement is final this long after its period ends (written into the ticks).
    pub finalize_after_ms: i64,
    /// Bytes of books a worker holds before its batch ends, and keeps between batches
    /// ([`state::BOOKS_HELD_BYTES`], [`state::BOOKS_KEPT_BYTES`]; estimated by
    /// [`state::held_estimate`]).
    pub books_held_bytes: usize,
    pub books_kept_bytes: usize,
}

impl Config {
    /// Defaults for everything but where the brokers and the state are.
    pub fn new(brokers: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        let input = neruba_schemas::topics::LEDGER;
        Self {
            stage: neruba_stage::Config::new(brokers, "neruba-balances", input, state_dir)
                .sized(DEFAULT_MAX_BATCH, 32 * 1024 * 1024),
            entries_topic: neruba_schemas::topics::BALANCE_ENTRIES.to_owned(),
            expiry_grace_ms: DEFAULT_EXPIRY_GRACE_MS,
            window_floor_ms: 0,
            finalize_after_ms: neruba_schemas::credit::DEFAULT_FINALIZE_AFTER_MS,
            books_held_bytes: state::BOOKS_HELD_BYTES,
            books_kept_bytes: state::BOOKS_KEPT_BYTES,
        }
    }
}

/// Starts consuming the ledger; returns at once. Blocking (it waits for broker metadata).
pub fn start(
    config: Config,
    registry: &prometheus::Registry,
    shutdown: CancellationToken,
) -> Result<Running> {
    let metrics = metrics::Metrics::register(registry)?;
    neruba_stage::start(config.stage.clone(), registry, shutdown, |slice| {
        Ok(stage::Balances {
            metrics: metrics.clone(),
            grace_ms: config.expiry_grace_ms,
            window_floor_ms: config.window_floor_ms,
            finalize_after_ms: config.finalize_after_ms,
            ledger_topic: config.stage.input_topic.clone(),
            entries_topic: config.entries_topic.clone(),
            books: state::WorkerBooks::new(
                metrics.books.clone(),
                slice.index,
                config.books_held_bytes,
                config.books_kept_bytes,
            ),
        })
    })
}
