//! When to send a request again, and how long to wait first.
//!
//! Invariants:
//! - only failures that say nothing was (or could be made) permanent are retried: transport
//!   failures (connect, reset, timeout) and the statuses in [`is_retryable_status`]; every
//!   Neruba write is idempotent (event ids, grant keys), so a retry of a request that did land
//!   after all changes nothing;
//! - a `Retry-After` the server sends is a floor: the client never retries sooner than it
//!   asked, and gives up rather than retry sooner when it asks for more than
//!   [`RetryPolicy::max_retry_after`];
//! - waits grow exponentially with "equal jitter" (half fixed, half random), so clients that
//!   failed together do not retry together, and no wait is shorter than half its backoff.

use std::time::Duration;

/// How often, and after how long, a failed request is sent again.
///
/// ```
/// use neruba_client::RetryPolicy;
/// use std::time::Duration;
///
/// let policy = RetryPolicy::default()
///     .with_max_attempts(3)
///     .with_initial_backoff(Duration::from_millis(200));
/// assert_eq!(policy.max_attempts, 3);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in all, the first one included; `1` never retries. Default 8.
    pub max_attempts: u32,
    /// The backoff before the first retry; each later one doubles it. Default 100 ms.
    pub initial_backoff: Duration,
    /// The largest backoff. Default 10 s.
    pub max_backoff: Duration,
    /// The longest `Retry-After` honoured: a server asking for a longer wait makes the
    /// request fail with [`Error::Unavailable`](crate::Error::Unavailable) at once rather
    /// than hold the caller (or an ingest slot) that long. Default 60 s.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// A policy that sends each request once.
    pub fn never() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Sets [`max_attempts`](Self::max_attempts).
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Sets [`initial_backoff`](Self::initial_backoff).
    pub fn with_initial_backoff(mut self, backoff: Duration) -> Self {
        self.initial_backoff = backoff;
        self
    }

    /// Sets [`max_backoff`](Self::max_backoff).
    pub fn with_max_backoff(mut self, backoff: Duration) -> Self {
        self.max_backoff = backoff;
        self
    }

    /// Sets [`max_retry_after`](Self::max_retry_after).
    pub fn with_max_retry_after(mut self, wait: Duration) -> Self {
        self.max_retry_after = wait;
        self
    }

    /// The wait before sending again after `attempts` failed attempts, or `None` to give up.
    /// `retry_after` is the server's `Retry-After`; `random` any random number (the jitter).
    pub(crate) fn delay(
        &self,
        attempts: u32,
        retry_after: Option<Duration>,
        random: u64,
    ) -> Option<Duration> {
        if attempts >= self.max_attempts {
            return None;
        }
        if retry_after.is_some_and(|wait| wait > self.max_retry_after) {
            return None;
        }
        let doublings = attempts.saturating_sub(1).min(31);
        let backoff = self
            .initial_backoff
            .saturating_mul(1 << doublings)
            .min(self.max_backoff);
        let backoff = u64::try_from(backoff.as_nanos()).unwrap_or(u64::MAX);
        let half = backoff / 2;
        let jittered = Duration::from_nanos(half + random % (backoff - half + 1));
        Some(retry_after.map_or(jittered, |wait| wait.max(jittered)))
    }
}

/// Whether an answer with this status may be retried: 408 (the body did not arrive in time),
/// 429 (rate limited), 502 and 504 (a proxy in front of the gateway could not reach it), 503
/// (the broker did not take the records). None of them wrote anything a retry could double.
pub(crate) fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 502 | 503 | 504)
}

/// A `Retry-After` header in delay-seconds, the form the gateway sends. The HTTP-date form is
/// not read (`None`: the backoff applies).
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// A random number for jitter (and, in [`crate::event`], ids); from the OS, or from the clock
/// in the unlikely case the OS has none to give.
pub(crate) fn random_u64() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        // Fold the high bits in: the low ones alone repeat across processes started together.
        (nanos as u64) ^ ((nanos >> 64) as u64) ^ u64::from(std::process::id()).rotate_left(32)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_doubles_from_the_initial_one_up_to_the_cap_with_at_least_half_kept() {
        let policy = RetryPolicy::default();
        // `random` 0 gives the smallest wait (half the backoff), u64::MAX-ish the largest.
        let lowest: Vec<_> = (1..8).map(|n| policy.delay(n, None, 0)).collect();
        assert_eq!(
            lowest,
            [50, 100, 200, 400, 800, 1600, 3200].map(|ms| Some(ms * MS))
        );
        let backoff = 10_000 * MS;
        let capped = policy.clone().with_max_attempts(100);
        let nanos = u64::try_from(backoff.as_nanos()).unwrap_or(u64::MAX);
        // The largest jitter reaches the full backoff, never beyond.
        assert_eq!(capped.delay(60, None, nanos / 2), Some(backoff));
        assert_eq!(capped.delay(60, None, 0), Some(backoff / 2));
    }

    #[test]
    fn gives_up_after_max_attempts() {
        let policy = RetryPolicy::default().with_max_attempts(3);
        assert!(policy.delay(2, None, 0).is_some());
        assert_eq!(policy.delay(3, None, 0), None);
        assert_eq!(RetryPolicy::never().delay(1, None, 0), None);
    }

    #[test]
    fn retry_after_is_a_floor_and_too_long_a_one_gives_up() {
        let policy = RetryPolicy::default();
        let second = Duration::from_secs(1);
        assert_eq!(policy.delay(1, Some(second), 7), Some(second));
        // A backoff longer than the server's wait wins.
        assert_eq!(
            policy.delay(7, Some(second), 0),
            Some(Duration::from_millis(3200))
        );
        assert_eq!(policy.delay(1, Some(Duration::from_secs(61)), 0), None);
    }

    #[test]
    fn retry_after_is_read_in_seconds_only() {
        assert_eq!(parse_retry_after(" 5 "), Some(Duration::from_secs(5)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }

    #[test]
    fn only_statuses_that_wrote_nothing_are_retried() {
        let retried: Vec<u16> = (100..600).filter(|s| is_retryable_status(*s)).collect();
        assert_eq!(retried, [408, 429, 502, 503, 504]);
    }
}
