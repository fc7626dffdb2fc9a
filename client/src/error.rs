//! What can go wrong, split by what the caller should do about it.
//!
//! - [`Error::Refused`]: the gateway or the api read the request and said no (a bad key, a
//!   body it will not take, a grant's terms, a customer the api does not know). Sending the
//!   same request again gives the same answer; fix it.
//! - [`Error::Unavailable`]: the server (or the network, or a proxy before it) could not take
//!   the request, or the api had not caught up with a read's position, and it stayed so
//!   through every attempt the [`RetryPolicy`] allows. Sending the same request later is safe:
//!   event ids and grant keys make every write idempotent, and reads change nothing.
//! - [`Error::Protocol`]: the answer is not one Neruba gives; usually a wrong base URL.
//! - [`Error::InvalidArgument`], [`Error::Config`], [`Error::Closed`]: caught before anything
//!   was sent.
//!
//! The error is `Clone` because one failed batch fails every event in it, and each event's
//! [`Receipt`](crate::Receipt) gets its own copy.
//!
//! [`RetryPolicy`]: crate::RetryPolicy

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a request (or an event) did not get the answer it asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The gateway or the api refused the request; retrying it unchanged cannot help.
    #[error("refused with {status} {code}: {message}")]
    Refused {
        /// The HTTP status (400, 401, 403, 404, 413, 415, 422, …).
        status: u16,
        /// The stable code of the answer's `{"error": {"code", …}}` (`unauthenticated`,
        /// `invalid_amount`, `customer_not_found`, …); `unknown` when the body carried none.
        code: String,
        /// The server's explanation.
        message: String,
    },
    /// The request could not be delivered in `attempts` attempts; it may be sent again later.
    #[error("unavailable after {attempts} attempt(s): {message}")]
    Unavailable {
        /// How many times the request was sent (or tried to be).
        attempts: u32,
        /// The last attempt's HTTP status (429, 503, …); `None` for a transport failure
        /// (connection refused or reset, timeout).
        status: Option<u16>,
        /// The last answer's stable code (`rate_limited`, `broker_unavailable`,
        /// `not_caught_up`), if any.
        code: Option<String>,
        /// What the last attempt ran into.
        message: String,
    },
    /// The answer was not one Neruba gives (wrong base URL, a proxy's page, a result list of
    /// the wrong length, a read answer of another shape).
    #[error("unexpected answer (status {status}): {message}")]
    Protocol {
        /// The HTTP status of the answer.
        status: u16,
        /// What was wrong with it.
        message: String,
    },
    /// An argument cannot be sent as given (for example a customer named `.` or `..`, which
    /// no URL path can carry).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The client could not be built from its configuration.
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// The ingestor was closed (or its background task is gone) before the event was taken:
    /// nothing was sent.
    #[error("the ingestor is closed")]
    Closed,
    /// The ingestor's background task stopped (its runtime shut down) after the event was
    /// taken but before its outcome was known: it may or may not have been accepted. Sending
    /// it again with the same id is safe.
    #[error("the ingestor stopped before the event's outcome was known")]
    Interrupted,
}

impl Error {
    /// The HTTP status of the answer behind this error, when there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Refused { status, .. } | Self::Protocol { status, .. } => Some(*status),
            Self::Unavailable { status, .. } => *status,
            _ => None,
        }
    }

    /// The server's stable error code, when the answer carried one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Refused { code, .. } => Some(code),
            Self::Unavailable { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// Whether sending the same request again later may succeed (and is safe: writes are
    /// idempotent by event id or grant key).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}
