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
//! Mechanism: two generations of a sharded table. Inserts go to the current one; when it
//! holds half the capacity or is half `max_age` old, it becomes the previous one and the old
//! previous is dropped whole (no per-key expiry scan). A generation that began more than
//! `max_age` ago is ignored by lookups, so no key is trusted past `max_age`. A generation's
//! keys are laid end to end in a few buffers (`KeyTable`), not allocated one by one:
//! remembering a key costs no allocation of its own, and dropping a generation frees a few
//! buffers rather than half a million keys. A request's or batch's keys are taken together
//! (`KeyBatch`): each written and hashed once, for its shard, both generations' lookups, the
//! request's own set of keys and, once the broker has its events, the inserts; each shard
//! locked once a request rather than once a key.

use ahash::RandomState;
use hashbrown::hash_table::{Entry, HashTable};
use neruba_kafka::Landed;
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

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

/// Keys in the cache's encoding ([`DedupCache::write_key`]), each with a value, the keys laid
/// end to end in a few buffers ([`Chunks`]): a table of many keys costs a few allocations
/// rather than one a key, and is freed whole. Every key of a table is hashed by one hasher;
/// the table stores no hashes, so growing it hashes its keys again.
#[derive(Debug)]
pub(crate) struct KeyTable<V> {
    keys: Chunks,
    /// Where each key lies in `keys`, and its value.
    slots: HashTable<(Span, V)>,
}

impl<V> Default for KeyTable<V> {
    fn default() -> Self {
        Self::with_capacity(0, 0)
    }
}

impl<V> KeyTable<V> {
    /// Room for `keys` keys of `bytes` bytes in all without growing.
    pub(crate) fn with_capacity(keys: usize, bytes: usize) -> Self {
        Self {
            keys: Chunks::with_capacity(bytes),
            slots: HashTable::with_capacity(keys),
        }
    }

    /// Keys held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Bytes of the keys held.
    pub(crate) fn bytes(&self) -> usize {
        self.keys.bytes
    }

    /// The value held for `key`, `hash` being its hash by the table's hasher.
    pub(crate) fn get(&self, hash: u64, key: &str) -> Option<&V> {
        self.slots
            .find(hash, |(span, _)| {
                self.keys.get(*span) == Some(key.as_bytes())
            })
            .map(|(_, value)| value)
    }

    /// Holds `value` for `key`, `hash` being its hash by `hasher`, the table's hasher.
    pub(crate) fn put(&mut self, hasher: &RandomState, hash: u64, key: &str, value: V) -> Put {
        let Self { keys, slots } = self;
        match slots.entry(
            hash,
            |(span, _)| keys.get(*span) == Some(key.as_bytes()),
            |(span, _)| hasher.hash_one(keys.get(*span).unwrap_or_default()),
        ) {
            Entry::Occupied(mut slot) => {
                slot.get_mut().1 = value;
                Put::Replaced
            }
            Entry::Vacant(slot) => match keys.push(key) {
                Some(span) => {
                    slot.insert((span, value));
                    Put::New
                }
                None => Put::NotHeld,
            },
        }
    }
}

/// What [`KeyTable::put`] did with a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Put {
    /// It was not held; now it is.
    New,
    /// It was held; its value is replaced.
    Replaced,
    /// It was not held and still is not: its table could not take it (past 2^32 buffers, or
    /// a key of 4 GiB; or, in the cache, a shard whose writer panicked). Not a repeat.
    NotHeld,
}

/// Bytes laid end to end in buffers of [`Chunks::CHUNK`] bytes (a longer key gets a buffer of
/// its own; a table made with room for some bytes has a first buffer of that size, so a
/// generation sized like the one before it mostly fills one buffer). A buffer holds at most
/// 4 GiB, and is never moved once written: a table grows by one buffer at a time, not
/// by copying all its keys into one twice as large (which left the first generation's peak
/// RSS higher than a map of one allocation a key).
#[derive(Debug, Default)]
struct Chunks {
    chunks: Vec<String>,
    /// Bytes held, over all the buffers.
    bytes: usize,
}

/// Where [`Chunks::push`] put a key.
#[derive(Debug, Clone, Copy)]
struct Span {
    chunk: u32,
    start: u32,
    len: u32,
}

impl Chunks {
    const CHUNK: usize = 64 << 10;

    /// Room for `bytes` bytes in the first buffer.
    fn with_capacity(bytes: usize) -> Self {
        Self {
            chunks: (bytes > 0)
                .then(|| String::with_capacity(bytes))
                .into_iter()
                .collect(),
            bytes: 0,
        }
    }

    fn get(&self, span: Span) -> Option<&[u8]> {
        let chunk = self.chunks.get(usize::try_from(span.chunk).ok()?)?;
        let start = usize::try_from(span.start).ok()?;
        let end = start.checked_add(usize::try_from(span.len).ok()?)?;
        chunk.as_bytes().get(start..end)
    }

    /// Lays `key` after the last key; `None` for a key of 4 GiB or past 2^32 buffers, when
    /// nothing is written.
    fn push(&mut self, key: &str) -> Option<Span> {
        let len = u32::try_from(key.len()).ok()?;
        let takes = |chunk: &&String| {
            chunk.capacity() - chunk.len() >= key.len()
                && u32::try_from(chunk.len() + key.len()).is_ok()
        };
        if self.chunks.last().filter(takes).is_none() {
            u32::try_from(self.chunks.len()).ok()?;
            self.chunks
                .push(String::with_capacity(key.len().max(Self::CHUNK)));
        }
        let index = self.chunks.len().checked_sub(1)?;
        let chunk = self.chunks.get_mut(index)?;
        let span = Span {
            chunk: u32::try_from(index).ok()?,
            start: u32::try_from(chunk.len()).ok()?,
            len,
        };
        chunk.push_str(key);
        self.bytes += key.len();
        Some(span)
    }
}

/// A key's hash by `hasher`, as [`KeyTable`] hashes its keys.
pub(crate) fn hash_key(hasher: &RandomState, key: &str) -> u64 {
    hasher.hash_one(key.as_bytes())
}

/// The shard of a key hashed `hash`: bits below the 7 the table's tags take from the top,
/// and above the ones its buckets are chosen by, so neither loses spread within a shard.
fn shard_of(hash: u64) -> usize {
    let index = (hash << 7) >> (u64::BITS - SHARDS.trailing_zeros());
    usize::try_from(index).unwrap_or_default()
}

/// A request's or batch's keys in the cache's encoding ([`DedupCache::write_key`]), laid end
/// to end in one buffer, each hashed once by the cache's hasher: the hash serves the cache's
/// lookups, the request's own set of keys and the cache's inserts alike, and the keys can be
/// taken shard by shard, so a shard is locked once a request rather than once a key.
#[derive(Debug, Default)]
pub(crate) struct KeyBatch {
    text: String,
    /// Each key, in the order given: where it ends in `text` (it starts where the one before
    /// ends) and its hash.
    keys: Vec<(usize, u64)>,
}

impl KeyBatch {
    /// `keys`, each hashed by `hasher` (the cache's).
    pub(crate) fn new<'k>(hasher: &RandomState, keys: impl IntoIterator<Item = Key<'k>>) -> Self {
        let keys = keys.into_iter();
        let mut batch = Self {
            text: String::new(),
            keys: Vec::with_capacity(keys.size_hint().0),
        };
        let mut key_text = String::new();
        for key in keys {
            DedupCache::write_key(&mut key_text, key);
            batch.text.push_str(&key_text);
            batch
                .keys
                .push((batch.text.len(), hash_key(hasher, &key_text)));
        }
        batch
    }

    /// Keys held.
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Bytes of the keys held.
    pub(crate) fn bytes(&self) -> usize {
        self.text.len()
    }

    /// The `i`th key and its hash.
    pub(crate) fn get(&self, i: usize) -> Option<(&str, u64)> {
        let (end, hash) = *self.keys.get(i)?;
        let start = i
            .checked_sub(1)
            .and_then(|before| self.keys.get(before))
            .map_or(0, |(end, _)| *end);
        Some((self.text.get(start..end)?, hash))
    }

    fn hash(&self, i: usize) -> u64 {
        self.keys.get(i).map_or(0, |(_, hash)| *hash)
    }

    fn shard(&self, i: usize) -> usize {
        shard_of(self.hash(i))
    }

    /// Sorts `places`, each naming a key by its index here (`at`), by the key's shard.
    /// Stable: a key given twice is put in the order given, the later value kept.
    fn by_shard<T>(&self, places: &mut [T], at: impl Fn(&T) -> usize) {
        places.sort_by_key(|place| self.shard(at(place)));
    }

    /// The runs of one shard in `places` (sorted by [`KeyBatch::by_shard`]), each with its
    /// shard's index.
    fn shard_runs<'p, T>(
        &'p self,
        places: &'p [T],
        at: impl Fn(&T) -> usize + Copy + 'p,
    ) -> impl Iterator<Item = (usize, &'p [T])> + 'p {
        places
            .chunk_by(move |a, b| self.shard(at(a)) == self.shard(at(b)))
            .filter_map(move |run| Some((self.shard(at(run.first()?)), run)))
    }
}

/// One generation of the cache: its keys spread over [`SHARDS`] tables by their hash, so
/// requests on different threads rarely wait for one another.
#[derive(Debug)]
struct Generation {
    shards: Box<[RwLock<KeyTable<Packed>>]>,
}

/// Shards of a generation: a power of two.
const SHARDS: usize = 16;

impl Generation {
    /// Room for `keys` keys of `bytes` bytes in all, spread over the shards, with an eighth
    /// more keys a shard, since the hash does not spread them exactly evenly.
    fn with_capacity(keys: usize, bytes: usize) -> Self {
        let keys = keys / SHARDS + keys / SHARDS / 8;
        Self {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(KeyTable::with_capacity(keys, bytes / SHARDS)))
                .collect(),
        }
    }

    fn shard(&self, hash: u64) -> Option<&RwLock<KeyTable<Packed>>> {
        self.shards.get(shard_of(hash))
    }

    fn get(&self, hash: u64, key: &str) -> Option<Packed> {
        let shard = self.shard(hash)?.read().ok()?;
        shard.get(hash, key).copied()
    }

    /// For each key of `batch` at the places `order` lists (sorted by
    /// [`KeyBatch::by_shard`]) that `found` has none for yet, what this generation holds:
    /// each shard read-locked once.
    fn get_all(&self, batch: &KeyBatch, order: &[usize], found: &mut [Option<Packed>]) {
        for (shard, run) in batch.shard_runs(order, |i| *i) {
            let Some(shard) = self.shards.get(shard).and_then(|s| s.read().ok()) else {
                continue;
            };
            for &i in run {
                if let (Some(slot @ None), Some((key, hash))) = (found.get_mut(i), batch.get(i)) {
                    *slot = shard.get(hash, key).copied();
                }
            }
        }
    }

    /// Remembers the keys of `batch` at the places `order` lists, each with its value
    /// (sorted by [`KeyBatch::by_shard`]): each shard write-locked once. How many were new.
    fn put_all(&self, hasher: &RandomState, batch: &KeyBatch, order: &[(usize, Packed)]) -> usize {
        let mut new = 0;
        for (shard, run) in batch.shard_runs(order, |(i, _)| *i) {
            // A shard whose writer panicked remembers nothing (forgetting is always safe here).
            let Some(mut shard) = self.shards.get(shard).and_then(|s| s.write().ok()) else {
                continue;
            };
            for &(i, value) in run {
                if let Some((key, hash)) = batch.get(i) {
                    new += usize::from(shard.put(hasher, hash, key, value) == Put::New);
                }
            }
        }
        new
    }

    /// Bytes of the keys held.
    fn bytes(&self) -> usize {
        self.shards
            .iter()
            .filter_map(|shard| shard.read().ok().map(|shard| shard.bytes()))
            .sum()
    }
}

/// Bounded, generational map of recently accepted keys to where their events landed.
#[derive(Debug)]
pub struct DedupCache {
    generations: RwLock<Generations>,
    /// Hashes every key, of both generations.
    hasher: RandomState,
    half_capacity: usize,
    max_age: Duration,
}

/// [`DedupCache::reader`]: lookups under one read lock and one reading of the clock.
#[derive(Debug)]
pub struct Reader<'c> {
    generations: RwLockReadGuard<'c, Generations>,
    hasher: &'c RandomState,
    current_fresh: bool,
    previous_fresh: bool,
}

impl Reader<'_> {
    /// [`DedupCache::get`] of each key of `batch` (made with [`DedupCache::hasher`]), in its
    /// order: each shard of a generation read-locked once.
    pub(crate) fn get_all(&self, batch: &KeyBatch) -> Vec<Option<Option<Landed>>> {
        let mut order: Vec<usize> = (0..batch.len()).collect();
        batch.by_shard(&mut order, |i| *i);
        let mut found = vec![None; batch.len()];
        let g = &self.generations;
        if self.current_fresh {
            g.current.get_all(batch, &order, &mut found);
        }
        // What the current generation holds is newer than the previous one's.
        if self.previous_fresh && found.iter().any(Option::is_none) {
            g.previous.get_all(batch, &order, &mut found);
        }
        found
            .into_iter()
            .map(|packed| packed.map(Packed::landed))
            .collect()
    }

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
            let hash = hash_key(self.hasher, key);
            let packed = self
                .current_fresh
                .then(|| g.current.get(hash, key))
                .flatten()
                .or_else(|| {
                    self.previous_fresh
                        .then(|| g.previous.get(hash, key))
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
    /// Keys in `current` (counted on insert, so that asking whether the cache is due to rotate
    /// takes no shard's lock).
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
                current: Generation::with_capacity(0, 0),
                previous: Generation::with_capacity(0, 0),
                current_len: AtomicUsize::new(0),
                previous_len: 0,
                started: Instant::now(),
                previous_started: Instant::now(),
            }),
            hasher: RandomState::default(),
            half_capacity: (capacity / 2).max(1),
            max_age,
        }
    }

    /// Writes `key` into `buffer`. Tenant ids never contain NUL (the catalog allows
    /// [a-z0-9_-]) and neither do a valid event's subject and id (no control characters), so
    /// this is injective.
    pub(crate) fn write_key(buffer: &mut String, key: Key<'_>) {
        buffer.clear();
        buffer.reserve(key.tenant.len() + 1 + key.subject.len() + 1 + key.id.len());
        buffer.push_str(key.tenant);
        buffer.push('\0');
        buffer.push_str(key.subject);
        buffer.push('\0');
        buffer.push_str(key.id);
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
            hasher: &self.hasher,
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

    /// Remembers each key as accepted, with where it landed when known: the keys written and
    /// hashed into one batch, then put as `remember` puts a request's.
    pub fn remember_all<'k>(&self, accepted: impl IntoIterator<Item = (Key<'k>, Option<Landed>)>) {
        let (keys, landed): (Vec<Key<'k>>, Vec<Option<Landed>>) = accepted.into_iter().unzip();
        let batch = KeyBatch::new(&self.hasher, keys);
        self.remember(&batch, landed.into_iter().enumerate());
    }

    /// Remembers the keys of `batch` (made with [`DedupCache::hasher`]) at the places given as
    /// accepted, each with where it landed when known: put shard by shard, each shard locked
    /// once. The current generation's room is taken before its keys are put, and the cache
    /// rotates each time it fills, so the capacity bound holds as with one insert at a time,
    /// whatever the batch's size, and with other requests remembering at once.
    pub(crate) fn remember(
        &self,
        batch: &KeyBatch,
        accepted: impl IntoIterator<Item = (usize, Option<Landed>)>,
    ) {
        let mut accepted: Vec<(usize, Packed)> = accepted
            .into_iter()
            .map(|(i, landed)| (i, Packed::new(landed)))
            .collect();
        let mut rest = accepted.as_mut_slice();
        while !rest.is_empty() {
            self.rotate_if_due();
            let Ok(g) = self.generations.read() else {
                return;
            };
            let take = self.take_room(&g.current_len, rest.len());
            let (chunk, after) = std::mem::take(&mut rest).split_at_mut(take);
            batch.by_shard(chunk, |(i, _)| *i);
            let new = g.current.put_all(&self.hasher, batch, chunk);
            debug_assert!(new <= take, "{new} new keys in room for {take}");
            // Room taken for a key that was held already (or could not be) is given back.
            g.current_len.fetch_sub(take - new, Ordering::Relaxed);
            rest = after;
        }
    }

    /// Takes room in the current generation (whose keys `len` counts) for up to `wanted`
    /// keys, at least one: how many. At least one, as another request may fill the generation
    /// between a rotation and this, and a batch must still move on (the bound is then passed
    /// by one key a request at most, as with one insert at a time).
    fn take_room(&self, len: &AtomicUsize, wanted: usize) -> usize {
        let mut take = 1;
        let _ = len.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
            take = self
                .half_capacity
                .saturating_sub(held)
                .clamp(1, wanted.max(1));
            Some(held + take)
        });
        take
    }

    /// The hasher of every key the cache holds: a [`KeyBatch`] made with it is the cache's.
    pub(crate) fn hasher(&self) -> &RandomState {
        &self.hasher
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
        let Some((keys, bytes)) = self
            .generations
            .read()
            .ok()
            .filter(|g| due(g))
            .map(|g| (g.current_len.load(Ordering::Relaxed), g.current.bytes()))
        else {
            return;
        };
        // The next generation is sized like the one it follows, so it mostly fills without
        // growing: a table grown from empty moves its keys again at each doubling (of the
        // first generation, which still grows from empty). Made before the lock, which every
        // request waits for; a thread that loses a race to rotate drops its tables unused.
        let next = Generation::with_capacity(keys, bytes);
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
        // Freed once the lock is released: every request waits for the lock.
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
    fn keys_of_both_generations_are_found_with_their_positions() {
        // Half the capacity is 100: the first 100 keys go to the previous generation at the
        // 101st insert, the other 50 stay in the current one.
        let cache = DedupCache::new(200, Duration::from_secs(3600));
        let at = |i: i64| Landed {
            partition: i32::try_from(i % 7).unwrap_or_default(),
            offset: i,
        };
        let ids: Vec<String> = (0..150).map(|i| format!("e-{i}")).collect();
        for (i, id) in (0_i64..).zip(&ids) {
            cache.insert_landed(key("acme", id), at(i));
        }
        assert_eq!(cache.len(), 150);
        let held = cache
            .generations
            .read()
            .map(|g| (g.previous_len, g.current_len.load(Ordering::Relaxed)));
        assert_eq!(held.ok(), Some((100, 50)));
        for (i, id) in (0_i64..).zip(&ids) {
            assert_eq!(cache.get(key("acme", id)), Some(Some(at(i))), "{id}");
        }
        // Asked together, shard by shard, with keys of neither: the same answers, in order.
        let asked = ids
            .iter()
            .map(|id| key("acme", id))
            .chain([key("beta", "e-1")]);
        let batch = KeyBatch::new(cache.hasher(), asked);
        let expected: Vec<_> = (0_i64..150)
            .map(|i| Some(Some(at(i))))
            .chain([None])
            .collect();
        assert_eq!(cache.reader().map(|r| r.get_all(&batch)), Some(expected));
        // A key remembered again in the current generation takes its new position.
        cache.insert_landed(key("acme", "e-149"), at(1_000));
        assert_eq!(cache.len(), 150);
        assert_eq!(cache.get(key("acme", "e-149")), Some(Some(at(1_000))));
        assert_eq!(cache.get(key("acme", "e-150")), None);
        // One of the previous generation remembered again: the current one answers.
        cache.insert_landed(key("acme", "e-0"), at(2_000));
        assert_eq!(cache.get(key("acme", "e-0")), Some(Some(at(2_000))));
        assert_eq!(cache.get(key("acme", "e-1")), Some(Some(at(1))));
        // Asked together now, with keys in both generations: the current one answers first.
        let mut expected: Vec<_> = (0_i64..150).map(|i| Some(Some(at(i)))).collect();
        expected[0] = Some(Some(at(2_000)));
        expected[149] = Some(Some(at(1_000)));
        expected.push(None);
        assert_eq!(cache.reader().map(|r| r.get_all(&batch)), Some(expected));
    }

    /// 5,000 keys, in parts and as the cache writes them, each with a value: keys that begin
    /// one another, the same key again with another value, keys told apart only by a
    /// separator's place.
    fn awkward_keys() -> Vec<((&'static str, String, String), String, u32)> {
        (0..5_000_u32)
            .map(|i| {
                let (tenant, subject, id) = match i % 4 {
                    0 => ("a", "b".to_owned(), (i % 1_000).to_string()),
                    1 => ("a", format!("b{}", i % 1_000), String::new()),
                    2 => ("a", "b".to_owned(), (i % 100).to_string()),
                    _ => ("ab", String::new(), (i % 10).to_string()),
                };
                let mut text = String::new();
                let key = Key {
                    tenant,
                    subject: &subject,
                    id: &id,
                };
                DedupCache::write_key(&mut text, key);
                ((tenant, subject, id), text, i)
            })
            .collect()
    }

    #[test]
    fn a_key_table_holds_what_a_map_holds() {
        // Against a map of owned keys.
        let hasher = RandomState::default();
        let mut table = KeyTable::default();
        let mut reference = std::collections::HashMap::new();
        for (_, key, i) in awkward_keys() {
            let hash = hash_key(&hasher, &key);
            let new = if reference.insert(key.clone(), i).is_none() {
                Put::New
            } else {
                Put::Replaced
            };
            assert_eq!(table.put(&hasher, hash, &key, i), new, "{key:?}");
        }
        assert_eq!(table.len(), reference.len());
        for (key, value) in &reference {
            let hash = hash_key(&hasher, key);
            assert_eq!(table.get(hash, key), Some(value), "{key:?}");
        }
        assert_eq!(table.get(hash_key(&hasher, "a\0b"), "a\0b"), None);
        // The buffer holds each distinct key once.
        assert_eq!(
            table.bytes(),
            reference.keys().map(String::len).sum::<usize>()
        );

        // Keys that fill a buffer, and one longer than a buffer, which gets its own: each
        // reads back whole, and none moved the keys laid before it.
        let long: Vec<String> = [40_000, 40_000, Chunks::CHUNK + 1, 40_000, 1]
            .iter()
            .zip(['x', 'y', 'z', 'w', 'v'])
            .map(|(len, c)| std::iter::repeat_n(c, *len).collect())
            .collect();
        let first = table.keys.chunks.first().map(|chunk| chunk.as_ptr());
        for (i, key) in (0_u32..).zip(&long) {
            assert_eq!(
                table.put(&hasher, hash_key(&hasher, key), key, 10_000 + i),
                Put::New
            );
        }
        assert_eq!(table.keys.chunks.first().map(|chunk| chunk.as_ptr()), first);
        for (i, key) in (0_u32..).zip(&long) {
            assert_eq!(table.get(hash_key(&hasher, key), key), Some(&(10_000 + i)));
        }
        for (key, value) in &reference {
            assert_eq!(
                table.get(hash_key(&hasher, key), key),
                Some(value),
                "{key:?}"
            );
        }
        assert_eq!(table.keys.chunks.len(), 4);
    }

    #[test]
    fn a_generation_taken_shard_by_shard_holds_what_a_map_holds_in_every_shard() {
        let hasher = RandomState::default();
        let keys = awkward_keys();
        let mut reference = std::collections::HashMap::new();
        for (parts, _, i) in &keys {
            reference.insert(parts.clone(), *i);
        }
        fn key<'a>((tenant, subject, id): &'a (&'static str, String, String)) -> Key<'a> {
            Key {
                tenant,
                subject,
                id,
            }
        }
        let batch = KeyBatch::new(&hasher, keys.iter().map(|(parts, _, _)| key(parts)));
        assert_eq!(batch.len(), keys.len());
        assert_eq!(
            batch.bytes(),
            keys.iter().map(|(_, text, _)| text.len()).sum::<usize>()
        );
        for (i, (_, text, _)) in keys.iter().enumerate() {
            assert_eq!(batch.get(i), Some((text.as_str(), hash_key(&hasher, text))));
        }
        let mut order: Vec<(usize, Packed)> = keys
            .iter()
            .enumerate()
            .map(|(at, (_, _, i))| (at, Packed(u64::from(*i))))
            .collect();
        batch.by_shard(&mut order, |(at, _)| *at);
        let generation = Generation::with_capacity(0, 0);
        let new = generation.put_all(&hasher, &batch, &order);
        assert_eq!(new, reference.len());

        // Read back, with a key never put: the last value of each key, in the order asked.
        let (asked, expected): (Vec<_>, Vec<_>) = reference
            .iter()
            .map(|(parts, i)| (parts.clone(), Some(Packed(u64::from(*i)))))
            .chain([(("a", "b".to_owned(), String::new()), None)])
            .unzip();
        let lookup = KeyBatch::new(&hasher, asked.iter().map(key));
        let mut found = vec![None; lookup.len()];
        let mut order: Vec<usize> = (0..lookup.len()).collect();
        lookup.by_shard(&mut order, |i| *i);
        generation.get_all(&lookup, &order, &mut found);
        assert_eq!(found, expected);

        let held: Vec<usize> = generation
            .shards
            .iter()
            .filter_map(|shard| shard.read().ok().map(|shard| shard.len()))
            .collect();
        assert_eq!(held.iter().sum::<usize>(), reference.len());
        assert!(held.iter().all(|keys| *keys > 0), "{held:?}");
    }

    #[test]
    fn a_key_given_twice_in_a_batch_keeps_its_last_position() {
        let cache = DedupCache::new(100, Duration::from_secs(60));
        let at = |offset| {
            Some(Landed {
                partition: 0,
                offset,
            })
        };
        let ids: Vec<String> = (0..40).map(|i| format!("e-{i}")).collect();
        // e-7 again, 60 times spread among the others (before its first copy too), each time
        // with a later position.
        let mut again = (1_000..1_060).map(|offset| (key("acme", "e-7"), at(offset)));
        let mut batch = Vec::new();
        for (id, offset) in ids.iter().zip(0..) {
            batch.push((key("acme", id), at(offset)));
            batch.extend(again.by_ref().take(if offset % 2 == 0 { 2 } else { 1 }));
        }
        assert_eq!(batch.len(), 100);
        cache.remember_all(batch);
        assert_eq!(cache.len(), 40);
        for (id, offset) in ids.iter().zip(0..) {
            let expected = if id == "e-7" { at(1_059) } else { at(offset) };
            assert_eq!(cache.get(key("acme", id)), Some(expected), "{id}");
        }
    }

    #[test]
    fn a_batch_fills_the_current_generation_then_rotates_into_the_next() {
        // Half the capacity is 50 and 40 keys are held: of 37 more, 10 fill the current
        // generation, which then becomes the previous one, and 27 begin the next; each key
        // keeps its own position across the cut.
        let cache = DedupCache::new(100, Duration::from_secs(3600));
        let at = |offset| {
            Some(Landed {
                partition: 3,
                offset,
            })
        };
        let held: Vec<String> = (0..40).map(|i| format!("held-{i}")).collect();
        cache.remember_all(held.iter().zip(0..).map(|(id, i)| (key("acme", id), at(i))));
        let more: Vec<String> = (0..37).map(|i| format!("more-{i}")).collect();
        cache.remember_all(
            more.iter()
                .zip(100..)
                .map(|(id, i)| (key("acme", id), at(i))),
        );
        let lens = || {
            cache
                .generations
                .read()
                .map(|g| (g.previous_len, g.current_len.load(Ordering::Relaxed)))
                .ok()
        };
        assert_eq!(lens(), Some((50, 27)));
        for (id, offset) in held.iter().zip(0..).chain(more.iter().zip(100..)) {
            assert_eq!(cache.get(key("acme", id)), Some(at(offset)), "{id}");
        }
        // A key the generation now previous holds is put in the current one with its new
        // position, and counts there; one the current one holds already takes no more room.
        cache.remember_all([
            (key("acme", "held-0"), at(500)),
            (key("acme", "more-20"), at(501)),
        ]);
        assert_eq!(lens(), Some((50, 28)));
        assert_eq!(cache.get(key("acme", "held-0")), Some(at(500)));
        assert_eq!(cache.get(key("acme", "more-20")), Some(at(501)));
    }

    #[test]
    fn batches_remembered_at_once_stay_within_the_capacity() {
        // Four threads, each remembering batches of 37 keys into a cache of 100: each batch
        // takes its room before putting, so the cache passes its bound by at most one key a
        // batch in flight, as with one insert at a time.
        const THREADS: usize = 4;
        let cache = DedupCache::new(100, Duration::from_secs(3600));
        std::thread::scope(|scope| {
            for thread in 0..THREADS {
                let cache = &cache;
                scope.spawn(move || {
                    for batch in 0..50 {
                        let ids: Vec<String> =
                            (0..37).map(|i| format!("t{thread}-b{batch}-{i}")).collect();
                        cache.remember_all(ids.iter().map(|id| (key("acme", id), None)));
                        let held = cache.len();
                        assert!(held <= 100 + 2 * THREADS, "held {held} keys");
                    }
                });
            }
        });
        assert!(
            cache.len() <= 100 + 2 * THREADS,
            "held {} keys",
            cache.len()
        );
        // A batch under half the capacity, remembered last, is held whole (across at most one
        // rotation: in the current generation and the one before).
        let last: Vec<String> = (0..37).map(|i| format!("last-{i}")).collect();
        cache.remember_all(last.iter().map(|id| (key("acme", id), None)));
        for id in &last {
            assert!(cache.contains(key("acme", id)), "{id}");
        }
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
        // Asked together too.
        let batch = KeyBatch::new(cache.hasher(), [key("acme", "old"), key("acme", "new")]);
        assert_eq!(
            cache.reader().map(|r| r.get_all(&batch)),
            Some(vec![None, Some(None)])
        );
    }
}
