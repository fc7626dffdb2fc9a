//! Per-tenant token buckets for the ingest rate limit.
//!
//! Invariant: a tenant over its limit is refused whole-request (429) before anything is
//! produced, so a refused request has no side effect and can be retried as is.
//!
//! A request of more events than the bucket holds (a batch larger than the tenant's burst) is
//! admitted once the bucket is full, leaving it in debt that refills at the tenant's rate
//! before anything more is admitted: refused always, it could never be admitted however long
//! its client waited, though each wait it was told to make had passed. Over a span of `t`
//! seconds a tenant is still admitted at most `rate × t` events plus one full bucket, or one
//! such request.
//! Integer arithmetic in thousandths of a token: no floating point anywhere on this path.

use dashmap::DashMap;
use neruba_schemas::catalog::RateLimit;
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Bucket {
    /// Below zero after a request larger than the bucket (its debt).
    milli_tokens: i128,
    refreshed: Instant,
}

/// Token buckets keyed by tenant id.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: DashMap<String, Bucket, ahash::RandomState>,
}

impl RateLimiter {
    /// Takes `events` tokens from `tenant`'s bucket; on refusal, how long until they would fit
    /// (for more than the bucket holds: until it is full).
    pub fn take(&self, tenant: &str, limit: RateLimit, events: u64) -> Result<(), Duration> {
        let per_second = i128::from(limit.events_per_second.max(1));
        let capacity = i128::from(limit.burst.unwrap_or(limit.events_per_second).max(1)) * 1000;
        let now = Instant::now();
        let mut bucket = self
            .buckets
            .entry(tenant.to_owned())
            .or_insert_with(|| Bucket {
                milli_tokens: capacity,
                refreshed: now,
            });
        let elapsed_ms =
            i128::try_from(now.duration_since(bucket.refreshed).as_millis()).unwrap_or(i128::MAX);
        // events_per_second tokens per 1000 ms = events_per_second milli-tokens per ms.
        bucket.milli_tokens = bucket
            .milli_tokens
            .saturating_add(elapsed_ms.saturating_mul(per_second))
            .min(capacity);
        bucket.refreshed = now;
        let needed = i128::from(events).saturating_mul(1000);
        // What must be in the bucket first: all of it, or a full bucket for more than it holds.
        let wanted = needed.min(capacity);
        if wanted <= bucket.milli_tokens {
            bucket.milli_tokens -= needed;
            Ok(())
        } else {
            let deficit = u64::try_from(wanted - bucket.milli_tokens).unwrap_or(u64::MAX);
            let per_second = u64::try_from(per_second).unwrap_or(1);
            // Never below one second: Retry-After has whole-second resolution.
            Err(Duration::from_millis(deficit.div_ceil(per_second)).max(Duration::from_secs(1)))
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

    #[test]
    fn a_request_larger_than_the_burst_is_admitted_from_a_full_bucket_and_repaid() {
        // Was: refused with 429 forever (the bucket never holds more than its burst), each
        // Retry-After passing to no avail, for a batch of more events than the tenant's burst.
        let limiter = RateLimiter::default();
        let limit = RateLimit {
            events_per_second: 1_000,
            burst: Some(20),
        };
        assert!(limiter.take("acme", limit, 5_000).is_ok());
        // 4,980 in debt: one more event waits for the debt and itself, 4.981 s.
        let wait = limiter.take("acme", limit, 1).err();
        assert!(
            matches!(wait, Some(d) if d > Duration::from_millis(4_400) && d <= Duration::from_millis(4_981)),
            "{wait:?}"
        );
        // Another large request waits until the bucket is full again: 5 s, less what refilled.
        let wait = limiter.take("acme", limit, 5_000).err();
        assert!(
            matches!(wait, Some(d) if d > Duration::from_millis(4_400) && d <= Duration::from_secs(5)),
            "{wait:?}"
        );
        // A bucket not full refuses it, and says how long until it is.
        let other = RateLimit {
            events_per_second: 10,
            burst: Some(20),
        };
        assert!(limiter.take("beta", other, 15).is_ok());
        let wait = limiter.take("beta", other, 30).err();
        assert!(
            matches!(wait, Some(d) if d > Duration::from_millis(1_000) && d <= Duration::from_millis(1_500)),
            "{wait:?}"
        );
        // A burst of 0 is a bucket of one token: a request of many is still admitted.
        let none = RateLimit {
            events_per_second: 10,
            burst: Some(0),
        };
        assert!(limiter.take("gamma", none, 500).is_ok());
        assert!(limiter.take("gamma", none, 1).is_err());
    }
}
