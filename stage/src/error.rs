//! What stops a stage, classified by what the caller should do about it.
//!
//! Bad input never stops a stage (it is dead-lettered); these are failures of what the stage
//! runs on, or of the stage itself. [`Error::is_retryable`] says whether starting again may
//! get past one without an operator: the process exits, its supervisor restarts it, and it
//! replays from the offsets stored with its state.

use std::path::PathBuf;
use std::time::Duration;

/// What stops a stage.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker failed in a way librdkafka's own retries did not cover.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// RocksDB failed: the disk is full or broken.
    #[error("state store: {0}")]
    Storage(#[from] rocksdb::Error),
    /// A partition's state is still held by its previous owner (another worker or process on
    /// the same volume) after waiting for it to be released.
    #[error("state store {dir}: still held by another owner after {waited:?}")]
    Busy { dir: PathBuf, waited: Duration },
    /// A stored record could not be read back.
    #[error("state store: corrupt {what}: {detail}")]
    Corrupt { what: String, detail: String },
    /// A record could not be encoded for the store, or a rule the stage relies on was broken:
    /// a bug, not a condition of the input or the machine.
    #[error("internal error: {0}")]
    Bug(String),
    /// A worker thread panicked while holding the stage's state.
    #[error("{0} state lock poisoned: a worker panicked")]
    Poisoned(&'static str),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("stage task: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// The catalog the stage was started with cannot run on its stored state (a meter shaped
    /// otherwise than the state was built under): an operator must change one of them.
    #[error("catalog: {0}")]
    Catalog(String),
}

impl Error {
    /// A stored record that could not be read back.
    pub fn corrupt(what: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Self::Corrupt {
            what: what.into(),
            detail: detail.to_string(),
        }
    }

    /// Whether starting the stage again may get past this without an operator: a broker or
    /// disk that failed for a while, or a state store its previous owner had not released
    /// yet. Corrupt state, a bug, a panic or a configuration the process cannot run with
    /// fail the same way again.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Kafka(_) | Self::Storage(_) | Self::Busy { .. } | Self::Join(_) => true,
            Self::Corrupt { .. }
            | Self::Bug(_)
            | Self::Poisoned(_)
            | Self::Metrics(_)
            | Self::StateDir { .. }
            | Self::Catalog(_) => false,
        }
    }
}

/// Result with the stage [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
