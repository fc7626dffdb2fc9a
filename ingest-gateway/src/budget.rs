//! The gateway's budget of request-body bytes held at once, across all requests.
//!
//! Invariants:
//! - a body is read only once its share is reserved, whole, before its first byte: what the
//!   gateway holds in bodies never exceeds the budget, however many connections send at once
//!   (10,000 connections of 5 MiB bodies would otherwise be 50 GiB);
//! - a share is reserved in one piece, never grown while reading, so requests holding part of
//!   what they need can never wait on one another for the rest;
//! - no tenant holds more than half the budget: slow uploads under one key (a leaked one, or a
//!   hostile client's) leave the other half to every other tenant. A request takes its
//!   tenant's part first, then the budget's, always in that order, so no two wait on each
//!   other;
//! - a share is held until the request is answered (its events borrow from the body), and
//!   given back when the request ends however it ends (a dropped connection included);
//! - a request that cannot get its share within the body deadline is answered `503
//!   overloaded` with `Retry-After`, its body unread: nothing of it was accepted, and a retry
//!   is safe. While it waits, its bytes stay in the kernel's socket buffers, so the sender is
//!   slowed by TCP rather than refused at the first busy moment.
//!
//! A share is the body's declared `Content-Length` (the size limit when it declares none), and
//! when the body is compressed the limit again, for its decoded copy (and zstd's window).
//! Parsing a body takes more memory than its bytes (its events' values); each event is read
//! as it is admitted, and what it built dropped before the next is read (`framing::Frame`),
//! within a handler that runs without awaiting (see `http::handle_ingest`): so beyond its body
//! a request holds one event's values and the encoded messages, bounded by the runtime's worker
//! threads rather than here.

use crate::encoding::{Encoding, MAX_ZSTD_WINDOW};
use dashmap::DashMap;
use prometheus::IntGauge;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The budget (see the module).
#[derive(Debug)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    total: usize,
    /// Each tenant's part, half the budget, made at its first request (tenants are the
    /// catalog's, so there are few).
    tenants: DashMap<String, Arc<Semaphore>, ahash::RandomState>,
    /// `neruba_ingest_body_bytes_in_flight`.
    in_flight: IntGauge,
}

/// A request's share of the budget, given back when dropped.
#[derive(Debug)]
pub struct Share {
    permit: Option<OwnedSemaphorePermit>,
    _tenant_permit: OwnedSemaphorePermit,
    budget_bytes: Arc<Semaphore>,
    total: usize,
    in_flight: IntGauge,
}

impl Drop for Share {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.in_flight.set(held(&self.budget_bytes, self.total));
    }
}

/// `n` permits of `semaphore`, at once if free, else waiting (in turn) until `deadline` (for
/// good when there is none: a wait too long for the clock to count).
async fn acquire(
    semaphore: Arc<Semaphore>,
    n: u32,
    deadline: Option<Instant>,
) -> Option<OwnedSemaphorePermit> {
    match semaphore.clone().try_acquire_many_owned(n) {
        Ok(permit) => Some(permit),
        Err(_) => match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, semaphore.acquire_many_owned(n))
                .await
                .ok()?
                .ok(),
            None => semaphore.acquire_many_owned(n).await.ok(),
        },
    }
}

/// Bytes held: the budget less what is available.
fn held(bytes: &Semaphore, total: usize) -> i64 {
    i64::try_from(total.saturating_sub(bytes.available_permits())).unwrap_or(i64::MAX)
}

impl BodyBudget {
    /// A budget of `total` bytes (at most what a semaphore counts), reported on `in_flight`.
    pub fn new(total: usize, in_flight: IntGauge) -> Self {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            bytes: Arc::new(Semaphore::new(total)),
            total,
            tenants: DashMap::default(),
            in_flight,
        }
    }

    /// The most one tenant holds at once.
    fn per_tenant(&self) -> usize {
        (self.total / 2).max(1)
    }

    /// The share a body needs: `declared` (its `Content-Length`) or `limit` when undeclared,
    /// plus `limit` for the decoded copy of a compressed one (and zstd's largest window);
    /// never more than the whole budget, so the largest body the gateway takes can always be
    /// admitted alone.
    pub fn share_of(&self, encoding: Encoding, declared: Option<usize>, limit: usize) -> usize {
        let received = declared.unwrap_or(limit).min(limit);
        let window = usize::try_from(MAX_ZSTD_WINDOW).unwrap_or(usize::MAX);
        let decoded = match encoding {
            Encoding::Identity => 0,
            Encoding::Gzip => limit,
            Encoding::Zstd => limit.saturating_add(window),
        };
        received.saturating_add(decoded).clamp(1, self.total)
    }

    /// Reserves `bytes` for a request of `tenant`, in one piece (the tenant's part, then the
    /// budget's), waiting at most `wait` in all; `None` if they were not free in time.
    pub async fn reserve(&self, tenant: &str, bytes: usize, wait: Duration) -> Option<Share> {
        let deadline = Instant::now().checked_add(wait);
        let part = match self.tenants.get(tenant) {
            Some(part) => part.clone(),
            None => self
                .tenants
                .entry(tenant.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_tenant())))
                .clone(),
        };
        let of_part = u32::try_from(bytes.min(self.per_tenant())).unwrap_or(u32::MAX);
        let tenant_permit = acquire(part, of_part, deadline).await?;
        let of_total = u32::try_from(bytes.min(self.total)).unwrap_or(u32::MAX);
        let permit = acquire(self.bytes.clone(), of_total, deadline).await?;
        self.in_flight.set(held(&self.bytes, self.total));
        Some(Share {
            permit: Some(permit),
            _tenant_permit: tenant_permit,
            budget_bytes: self.bytes.clone(),
            total: self.total,
            in_flight: self.in_flight.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(total: usize) -> BodyBudget {
        BodyBudget::new(total, IntGauge::new("in_flight", "test").expect("gauge"))
    }

    #[test]
    fn a_share_is_the_declared_length_and_a_decoded_copy_when_compressed() {
        let budget = budget(100);
        assert_eq!(budget.share_of(Encoding::Identity, Some(7), 50), 7);
        assert_eq!(budget.share_of(Encoding::Identity, None, 50), 50);
        assert_eq!(budget.share_of(Encoding::Gzip, Some(7), 50), 57);
        let large = self::budget(1 << 30);
        assert_eq!(
            large.share_of(Encoding::Zstd, Some(7), 50),
            57 + 8 * 1024 * 1024
        );
        // Never more than the budget (the largest body must fit alone), never nothing.
        assert_eq!(budget.share_of(Encoding::Gzip, None, 80), 100);
        assert_eq!(budget.share_of(Encoding::Identity, Some(0), 50), 1);
    }

    #[tokio::test]
    async fn shares_wait_for_one_another_and_are_given_back_when_dropped() {
        let budget = budget(100);
        let wait = Duration::from_millis(50);
        let first = budget.reserve("a", 60, wait).await.expect("room");
        assert_eq!(budget.in_flight.get(), 60);
        // 60 + 60 > 100: the second waits, and gives up at its deadline.
        assert!(budget.reserve("b", 60, wait).await.is_none());
        assert_eq!(budget.in_flight.get(), 60);
        let second = budget.reserve("c", 40, wait).await.expect("room");
        assert_eq!(budget.in_flight.get(), 100);
        drop(first);
        assert_eq!(budget.in_flight.get(), 40);
        let third = budget
            .reserve("d", 60, wait)
            .await
            .expect("room given back");
        // A waiting share is admitted as soon as room is given back.
        let waiting = budget.reserve("e", 60, Duration::from_secs(60));
        let (admitted, ()) = tokio::join!(waiting, async { drop(third) });
        assert!(admitted.is_some());
        assert_eq!(budget.in_flight.get(), 100);
        drop((second, admitted));
        assert_eq!(budget.in_flight.get(), 0);
    }

    #[tokio::test]
    async fn one_tenant_holds_at_most_half_and_the_rest_is_the_others() {
        let budget = budget(100);
        let wait = Duration::from_millis(50);
        let a = budget.reserve("a", 50, wait).await.expect("half");
        assert!(budget.reserve("a", 10, wait).await.is_none());
        let b = budget.reserve("b", 50, wait).await.expect("the other half");
        assert_eq!(budget.in_flight.get(), 100);
        drop(a);
        // A request that got its tenant's part but not the budget's in time gives the part
        // back: with the budget full again, `c` takes 30 of its part and times out, and then
        // the whole of its part is free.
        let a = budget
            .reserve("a", 50, wait)
            .await
            .expect("room given back");
        assert!(budget.reserve("c", 30, wait).await.is_none());
        drop((a, b));
        let c = budget.reserve("c", 50, wait).await;
        assert!(c.is_some(), "c's part was not given back");
        drop(c);
        assert_eq!(budget.in_flight.get(), 0);
    }
}
