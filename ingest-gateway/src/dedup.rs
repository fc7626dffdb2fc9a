//! The gateway's recent-repeat filter: a fast, bounded, best-effort first layer.
//!
//! Invariants:
//! - memory is bounded: at most `capacity` keys are held, none older than `max_age`;
//! - a key is remembered only after the broker acknowledged its event, so a failed produce
//!   never turns the client's retry into a false `duplicate`;
//! - keys are compared exactly (tenant, customer and id, not a hash of them): a collision
//!   would drop a valid event, which a billing pipeline must never do;
//! - a key is what the aggregator's authoritative set is keyed by in effect (its set lives with
//!   the customer's events partition): an id sent for another customer is not a repeat here
//!   either, so which layer sees a copy first never changes what counts;
//! - beside a key, where its event landed (events-topic partition and offset) when the door
//!   that wrote it said so ([`DedupCache::insert_landed`]; HTTP does, the raw-topic path does
//!   not): a repeat answered from here can name the first write's position, so a client whose
//!   answer was lost still learns where its events are. Packed into 8 bytes (a partition below
//!   65,535 and an offset below 2^48; anything else is kept as "position unknown"), so the
//!   cache costs 8 bytes more per key than a set would.
//!
//! This layer is not authoritative. Replicas do not share it and it forgets after a restart;
//! the aggregator's dedup set in RocksDB is what guarantees "counted once". Here we only spare
//! the broker and the client obvious repeats.
//!
//! Mechanism: two generations of a concurrent map. Inserts go to the current one; when it holds
//! half the capacity or is half `max_age` old, it becomes the previous one and the old previous
//! is dropped whole (no per-key expiry scan). A generation that began more than `max_age` ago
//! is ignored by lookups, so no key is trusted past `max_age`.

use ahash::RandomState;
use dashmap::DashMap;
use neruba_kafka::Landed;
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

type Generation = DashMap<Box<str>, Packed, RandomState>;

/// Where an accepted event landed, in 8 bytes: the partition in the top 16 bits, the offset
/// in the low 48; [`Packed::UNKNOWN`] when the door did not say (or it does not fit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Packed(u64);

impl Packed {
    const UNKNOWN: Self = Self(u64::MAX);
    const OFFSET_BITS: u32 = 48;

    fn new(landed: Option<Landed>) -> Self {
        landed
            .and_then(|landed| {
                let partition = u16::try_from(landed.partition)
                    .ok()
                    .filter(|p| *p < u16::MAX)?;
                let offset = u64::try_from(landed.offset)
                    .ok()
                    .filter(|o| *o < 1 << Self::OFFSET_BITS)?;
                Some(Self((u64::from(partition) << Self::OFFSET_BITS) | offset))
            })
            .unwrap_or(Self::UNKNOWN)
    }

    fn landed(self) -> Option<Landed> {
        (self != Self::UNKNOWN).then(|| Landed {
            partition: i32::try_from(self.0 >> Self::OFFSET_BITS).unwrap_or_default(),
            offset: i64::try_from(self.0 & ((1 << Self::OFFSET_BITS) - 1)).unwrap_or_default(),
        })
    }
}

/// What a repeat is recognised by: the tenant, the customer (`subject`) and the event id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key<'a> {
    pub tenant: &'a str,
    pub subject: &'a str,
    pub id: &'a str,
}

/// Bounded, generational map of recently accepted keys to where their events landed.
#[derive(Debug)]
pub struct DedupCache {
    generations: RwLock<Generations>,
    half_capacity: usize,
    max_age: Duration,
}

/// [`DedupCache::reader`]: lookups under one read lock and one reading of the clock.
#[derive(Debug)]
pub struct Reader<'c> {
    generations: RwLockReadGuard<'c, Generations>,
    current_fresh: bool,
    previous_fresh: bool,
}

impl Reader<'_> {
    /// [`DedupCache::get`], under this reader's lock.
    pub fn get(&self, key: Key<'_>) -> Option<Option<Landed>> {
        thread_local! {
            /// The lookup key, reused: a lookup allocates nothing.
            static KEY: RefCell<String> = const { RefCell::new(String::new()) };
        }
        let g = &self.generations;
        KEY.with_borrow_mut(|buffer| {
            DedupCache::write_key(buffer, key);
            let key = buffer.as_str();
            let packed = self
                .current_fresh
                .then(|| g.current.get(key).map(|v| *v))
                .flatten()
                .or_else(|| {
                    self.previous_fresh
                        .then(|| g.previous.get(key).map(|v| *v))
                        .flatten()
                })?;
            Some(packed.landed())
        })
    }
}

#[derive(Debug)]
struct Generations {
    current: Generation,
    previous: Generation,
    /// Keys in `current` (counted on insert: `DashMap::len` locks every shard, and the cache
    /// is asked on every insert whether it is due to rotate).
    current_len: AtomicUsize,
    /// Keys in `previous`.
    previous_len: usize,
    /// When `current` began; none of its keys is older.
    started: Instant,
    /// When `previous` began; none of its keys is older.
    previous_started: Instant,
}

impl DedupCache {
    /// A cache holding at most `capacity` keys for at most `max_age`.
    pub fn new(capacity: usize, max_age: Duration) -> Self {
        Self {
            generations: RwLock::new(Generations {
                current: Generation::default(),
                previous: Generation::default(),
                current_len: AtomicUsize::new(0),
                previous_len: 0,
                started: Instant::now(),
                previous_started: Instant::now(),
            }),
            half_capacity: (capacity / 2).max(1),
            max_age,
        }
    }

    /// Writes `key` into `buffer`. Tenant ids never contain NUL (the catalog allows
    /// [a-z0-9_-]) and neither do a valid event's subject and id (no control characters), so
    /// this is injective.
    pub(crate) fn write_key(buffer: &mut String, key: Key<'_>) {
        buffer.clear();
        Self::push_key(buffer, key);
    }

    /// [`DedupCache::write_key`], appended to what `buffer` holds.
    pub(crate) fn push_key(buffer: &mut String, key: Key<'_>) {
        buffer.reserve(key.tenant.len() + 1 + key.subject.len() + 1 + key.id.len());
        buffer.push_str(key.tenant);
        buffer.push('\0');
        buffer.push_str(key.subject);
        buffer.push('\0');
        buffer.push_str(key.id);
    }

    fn owned_key(key: Key<'_>) -> Box<str> {
        let mut buffer = String::new();
        Self::write_key(&mut buffer, key);
        buffer.into_boxed_str()
    }

    /// Whether `key` was accepted recently.
    pub fn contains(&self, key: Key<'_>) -> bool {
        self.get(key).is_some()
    }

    /// `Some` if `key` was accepted recently: where its event landed, if the door that wrote
    /// it said so (`Some(None)`: a repeat whose position is not known here).
    pub fn get(&self, key: Key<'_>) -> Option<Option<Landed>> {
        self.reader()?.get(key)
    }

    /// The cache as one request or batch reads it: the lock taken and the clock read once.
    /// `None` if a writer panicked (then nothing is known: forgetting is always safe here).
    ///
    /// Drop it before anything is remembered or awaited. While it is held a rotation waits,
    /// and, the lock preferring writers, so do other readers behind that rotation: at most one
    /// request's admission (a rotation comes once per half the capacity or half `max_age`).
    pub fn reader(&self) -> Option<Reader<'_>> {
        let generations = self.generations.read().ok()?;
        // A generation that began more than max_age ago may hold stale keys; it is ignored
        // whole. Forgetting early is always safe here: the aggregator is authoritative.
        let now = Instant::now();
        let fresh = |started: Instant| now.saturating_duration_since(started) < self.max_age;
        Some(Reader {
            current_fresh: fresh(generations.started),
            previous_fresh: fresh(generations.previous_started),
            generations,
        })
    }

    /// Remembers `key` as accepted, without saying where its event landed (its repeats then
    /// name no position).
    pub fn insert(&self, key: Key<'_>) {
        self.remember_all([(key, None)]);
    }

    /// Remembers `key` as accepted, and where its event landed: its repeats name it.
    pub fn insert_landed(&self, key: Key<'_>, landed: Landed) {
        self.remember_all([(key, Some(landed))]);
    }

    /// Remembers each key as accepted, with where it landed when known: a request's
    /// or batch's keys under one lock, after one check whether the cache is due to rotate, and
    /// again each time the current generation fills (so the capacity bound holds as with one
    /// insert at a time, whatever the batch's size).
    pub fn remember_all<'k>(&self, accepted: impl IntoIterator<Item = (Key<'k>, Option<Landed>)>) {
        let mut accepted = accepted.into_iter();
        loop {
            self.rotate_if_due();
            let Ok(g) = self.generations.read() else {
                return;
            };
            // At least one key per pass: another request may fill the generation between the
            // rotation and this lock, and the loop must still move on.
            let mut inserted = false;
            while !inserted || g.current_len.load(Ordering::Relaxed) < self.half_capacity {
                let Some((key, landed)) = accepted.next() else {
                    return;
                };
                if g.current
                    .insert(Self::owned_key(key), Packed::new(landed))
                    .is_none()
                {
                    g.current_len.fetch_add(1, Ordering::Relaxed);
                }
                inserted = true;
            }
        }
    }

    /// Keys currently held (both generations).
    pub fn len(&self) -> usize {
        self.generations
            .read()
            .map(|g| g.current_len.load(Ordering::Relaxed) + g.previous_len)
            .unwrap_or(0)
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn rotate_if_due(&self) {
        let due = |g: &Generations| {
            g.current_len.load(Ordering::Relaxed) >= self.half_capacity
                || g.started.elapsed() >= self.max_age / 2
        };
        let Some(len) = self
            .generations
            .read()
            .ok()
            .filter(|g| due(g))
            .map(|g| g.current_len.load(Ordering::Relaxed))
        else {
            return;
        };
        // The next generation is sized like the one it follows, so it mostly fills without
        // growing: a map grown from empty moves its keys again at each doubling, which was half
        // of the cache's insert time in the gateway's profile (of the first generation, which
        // still grows from empty). Made before the lock, which every request waits for; a
        // thread that loses a race to rotate drops its map unused.
        let next = Generation::with_capacity_and_hasher(len, RandomState::default());
        let forgotten = match self.generations.write() {
            // Checked again: another thread may have rotated while we waited for the lock.
            Ok(mut g) if due(&g) => {
                let current = std::mem::replace(&mut g.current, next);
                g.previous_len = std::mem::take(g.current_len.get_mut());
                g.previous_started = g.started;
                g.started = Instant::now();
                Some(std::mem::replace(&mut g.previous, current))
            }
            _ => None,
        };
        // Freed once the lock is released: dropping half the cache's keys takes milliseconds,
        // and every request waits for the lock.
        drop(forgotten);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key<'a>(tenant: &'a str, id: &'a str) -> Key<'a> {
        Key {
            tenant,
            subject: "c1",
            id,
        }
    }

    #[test]
    fn keys_are_scoped_by_tenant() {
        let cache = DedupCache::new(100, Duration::from_secs(60));
        cache.insert(key("acme", "e-1"));
        assert!(cache.contains(key("acme", "e-1")));
        assert!(!cache.contains(key("beta", "e-1")));
        assert!(!cache.contains(key("acme", "e-2")));
    }

    #[test]
    fn a_key_inserted_again_is_held_once() {
        let cache = DedupCache::new(100, Duration::from_secs(60));
        cache.insert(key("acme", "e-1"));
        cache.insert(key("acme", "e-1"));
        cache.insert(key("acme", "e-2"));
        assert_eq!(cache.len(), 2);
        // The key encoding keeps tenant and id apart: ("ac", "me\0x") is not ("acme", "x").
        assert!(!cache.contains(key("ac", "me\0e-1")));
        // An id is a repeat for the customer it was sent for only (as in the aggregator).
        let other_customer = Key {
            subject: "c2",
            ..key("acme", "e-1")
        };
        assert!(!cache.contains(other_customer));
    }

    #[test]
    fn entries_stay_bounded_by_capacity() {
        let cache = DedupCache::new(10, Duration::from_secs(3600));
        for i in 0..1000 {
            cache.insert(key("acme", &i.to_string()));
            assert!(cache.len() <= 10, "held {} keys", cache.len());
        }
        // The most recent keys are still known, the oldest are forgotten.
        assert!(cache.contains(key("acme", "999")));
        assert!(!cache.contains(key("acme", "0")));
    }

    #[test]
    fn a_batch_larger_than_the_capacity_stays_within_it() {
        let cache = DedupCache::new(10, Duration::from_secs(3600));
        let ids: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
        cache.remember_all(ids.iter().map(|id| (key("acme", id), None)));
        assert!(cache.len() <= 10, "held {} keys", cache.len());
        assert!(cache.contains(key("acme", "999")));
        assert!(!cache.contains(key("acme", "0")));
    }

    #[test]
    fn a_key_remembers_where_its_event_landed_if_told() {
        let cache = DedupCache::new(100, Duration::from_secs(60));
        let at = |partition, offset| Landed { partition, offset };
        cache.insert_landed(key("acme", "e-1"), at(2, 41));
        cache.insert_landed(key("acme", "e-2"), at(0, 0));
        cache.insert_landed(key("acme", "e-3"), at(65_534, (1 << 48) - 1));
        cache.insert(key("acme", "raw"));
        // Beyond what 8 bytes hold: remembered, its position not.
        cache.insert_landed(key("acme", "big-partition"), at(65_535, 1));
        cache.insert_landed(key("acme", "big-offset"), at(1, 1 << 48));
        assert_eq!(cache.get(key("acme", "e-1")), Some(Some(at(2, 41))));
        assert_eq!(cache.get(key("acme", "e-2")), Some(Some(at(0, 0))));
        assert_eq!(
            cache.get(key("acme", "e-3")),
            Some(Some(at(65_534, (1 << 48) - 1)))
        );
        assert_eq!(cache.get(key("acme", "raw")), Some(None));
        assert_eq!(cache.get(key("acme", "big-partition")), Some(None));
        assert_eq!(cache.get(key("acme", "big-offset")), Some(None));
        assert_eq!(cache.get(key("acme", "never")), None);
        assert_eq!(std::mem::size_of::<Packed>(), 8);
    }

    #[test]
    fn entries_expire_by_age() {
        // Entries live 1 s: far longer than a loaded machine stalls between two statements.
        let cache = DedupCache::new(1000, Duration::from_secs(1));
        cache.insert(key("acme", "old"));
        std::thread::sleep(Duration::from_millis(1100));
        assert!(!cache.contains(key("acme", "old")));
        cache.insert(key("acme", "new"));
        assert!(cache.contains(key("acme", "new")));
        assert!(!cache.contains(key("acme", "old")));
    }
}
