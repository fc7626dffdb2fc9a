//! Per-tenant token buckets for the ingest rate limit.
//!
//! Invariant: a tenant over its limit is refused whole-request (429) before anything is
//! produced, so a refused request has no side effect and can be retried as is.
//! Integer arithmetic in thousandths of a token: no floating point anywhere on this path.

use dashmap::DashMap;
use neruba_schemas::catalog::RateLimit;
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Bucket {
    milli_tokens: u64,
    refreshed: Instant,
}

/// Token buckets keyed by tenant id.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: DashMap<String, Bucket, ahash::RandomState>,
}

impl RateLimiter {
    /// Takes `events` tokens from `tenant`'s bucket; on refusal, how long until they would fit.
    pub fn take(&self, tenant: &str, limit: RateLimit, events: u64) -> Result<(), Duration> {
        let per_second = u64::from(limit.events_per_second);
        let capacity = u64::from(limit.burst.unwrap_or(limit.events_per_second).max(1)) * 1000;
        let now = Instant::now();
        let mut bucket = self
            .buckets
            .entry(tenant.to_owned())
            .or_insert_with(|| Bucket {
                milli_tokens: capacity,
                refreshed: now,
            });
        let elapsed_ms =
            u64::try_from(now.duration_since(bucket.refreshed).as_millis()).unwrap_or(u64::MAX);
        // events_per_second tokens per 1000 ms = events_per_second milli-tokens per ms.
        bucket.milli_tokens = bucket
            .milli_tokens
            .saturating_add(elapsed_ms.saturating_mul(per_second))
            .min(capacity);
        bucket.refreshed = now;
        let needed = events.saturating_mul(1000);
        if needed <= bucket.milli_tokens {
            bucket.milli_tokens -= needed;
            Ok(())
        } else {
            let deficit = needed - bucket.milli_tokens;
            // Never below one second: Retry-After has whole-second resolution.
            Err(Duration::from_millis(deficit.div_ceil(per_second.max(1)))
                .max(Duration::from_secs(1)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refusal_with_wait_time() {
        let limiter = RateLimiter::default();
        let limit = RateLimit {
            events_per_second: 10,
            burst: Some(20),
        };
        assert!(limiter.take("acme", limit, 20).is_ok());
        // 10 events short at 10/s: a second, less what refilled meanwhile, and never below a
        // second (Retry-After's resolution).
        assert_eq!(
            limiter.take("acme", limit, 10).err(),
            Some(Duration::from_secs(1))
        );
        // 30 short of a larger bucket: three seconds, less what refilled between the takes
        // (the bound leaves a loaded machine half a second for that).
        let larger = RateLimit {
            events_per_second: 10,
            burst: Some(40),
        };
        assert!(limiter.take("gamma", larger, 40).is_ok());
        let wait = limiter.take("gamma", larger, 30).err();
        assert!(
            matches!(wait, Some(d) if d > Duration::from_millis(2_500) && d <= Duration::from_secs(3)),
            "{wait:?}"
        );
        // Another tenant has its own bucket.
        assert!(limiter.take("beta", limit, 20).is_ok());
    }
}
