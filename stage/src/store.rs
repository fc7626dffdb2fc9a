//! The partition store shell: one RocksDB database per input partition, which a stage fills
//! with its own records and which keeps the next offset to consume beside them.
//!
//! Invariants:
//! - the next offset is written in the same `WriteBatch` as the records of the batch that
//!   reached it ([`Store::write`]), so a restart resumes exactly after the last applied
//!   message;
//! - one owner at a time: opening takes an advisory lock on the directory
//!   (`NERUBA-OWNER`, held until the store is dropped, after the database is closed) and
//!   waits up to [`OWNER_WAIT`] for a previous owner to let go, so a partition moving between
//!   workers or processes on one volume is never opened twice;
//! - the offset has one encoding, big-endian `i64`, under [`OFFSET_KEY`]. State written by
//!   aggregators before the runtime was shared holds it sign-flipped (as its times are); the
//!   two cannot be confused because an offset is never negative, so the top bit says which,
//!   and the next write stores the plain form (a one-time migration, see
//!   [`decode_offset`]).
//!
//! - expiry ([`StoreOptions::expiry`]) runs on the wall clock, or, for a stage that says how
//!   far its input has come ([`ExpiryClock::Progress`], [`Store::advance_expiry_clock`]), on the
//!   earlier of the wall clock and that: a stage days behind does not drop what the input it
//!   has yet to read still needs.
//!
//! The WAL is written on every batch and not fsynced: a killed process loses nothing (the OS
//! holds the pages); only a power loss can lose a tail, which is then replayed from Kafka.

use crate::{Error, Result};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBPinnableSlice,
    DEFAULT_COLUMN_FAMILY_NAME, Options, ReadOptions, WriteBatch, WriteOptions,
};
use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// The key of the next offset to consume. Its first four bytes are a zero length, an empty
/// tenant, which no stage's record key starts with.
pub const OFFSET_KEY: &[u8] = b"\0\0\0\0Moffset";

/// How long opening waits for a previous owner to release a partition's state: waiting
/// briefly beats replaying the partition from scratch elsewhere.
pub const OWNER_WAIT: Duration = Duration::from_secs(5);

/// The file whose advisory lock marks the owner of a partition's state.
const OWNER_FILE: &str = "NERUBA-OWNER";

/// Whether compaction may drop the entry `(key, value)` at time `now_ms` (see
/// [`ExpiryClock`]).
pub type Expiry = dyn Fn(&[u8], &[u8], i64) -> bool + Send + Sync;

/// The time [`Expiry`] is asked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpiryClock {
    /// The wall clock.
    #[default]
    Wall,
    /// The earlier of the wall clock and how far the stage says its input has come
    /// ([`Store::advance_expiry_clock`]); nothing expires before it first says so.
    Progress,
}

/// How a stage's partition stores are tuned.
#[derive(Clone)]
pub struct StoreOptions {
    /// Size of one memtable.
    pub write_buffer_bytes: usize,
    /// Memtables kept before writes stall (RocksDB's default when `None`).
    pub max_write_buffers: Option<i32>,
    /// A whole-key bloom filter on the memtable, for stages whose reads mostly miss (dedup).
    pub memtable_bloom: bool,
    /// Index and filter blocks in the block cache instead of beside it: memory bounded by the
    /// cache however many keys the store holds, at the cost of lookups whose filter block the
    /// cache no longer holds. Partitioned, so a lookup loads one small block of each, and the
    /// top level pinned. Off, they take memory in proportion to the keys (a dedup set: about
    /// 1.5 MiB per million ids, `benches/dedup_memory.rs`).
    pub index_in_cache: bool,
    /// Expiry without a scan: compaction drops what this says is past retention. The stored
    /// offset is never offered to it.
    pub expiry: Option<Arc<Expiry>>,
    /// The time `expiry` is asked at.
    pub expiry_clock: ExpiryClock,
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("write_buffer_bytes", &self.write_buffer_bytes)
            .field("max_write_buffers", &self.max_write_buffers)
            .field("memtable_bloom", &self.memtable_bloom)
            .field("index_in_cache", &self.index_in_cache)
            .field("expiry", &self.expiry.is_some())
            .field("expiry_clock", &self.expiry_clock)
            .finish()
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            write_buffer_bytes: 8 * 1024 * 1024,
            max_write_buffers: None,
            memtable_bloom: false,
            index_in_cache: false,
            expiry: None,
            expiry_clock: ExpiryClock::Wall,
        }
    }
}

impl StoreOptions {
    /// RocksDB's options; `progress` is the store's [`Store::advance_expiry_clock`].
    fn rocksdb(&self, cache: &Cache, progress: &Arc<AtomicI64>) -> Options {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_write_buffer_size(self.write_buffer_bytes);
        if let Some(n) = self.max_write_buffers {
            opts.set_max_write_buffer_number(n);
        }
        if self.memtable_bloom {
            opts.set_memtable_prefix_bloom_ratio(0.1);
            opts.set_memtable_whole_key_filtering(true);
        }
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(cache);
        table.set_bloom_filter(10.0, false);
        if self.index_in_cache {
            table.set_cache_index_and_filter_blocks(true);
            table.set_cache_index_and_filter_blocks_with_high_priority(true);
            table.set_pin_l0_filter_and_index_blocks_in_cache(true);
            table.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
            table.set_partition_filters(true);
            table.set_pin_top_level_index_and_filter(true);
            table.set_metadata_block_size(4096);
        }
        opts.set_block_based_table_factory(&table);
        if let Some(expiry) = self.expiry.clone() {
            let progress = (self.expiry_clock == ExpiryClock::Progress).then(|| progress.clone());
            opts.set_compaction_filter("neruba-expiry", move |_level, key: &[u8], value: &[u8]| {
                let wall = neruba_schemas::event::now_ms();
                let now = match &progress {
                    None => Some(wall),
                    Some(progress) => match progress.load(Ordering::Relaxed) {
                        i64::MIN => None,
                        at => Some(at.min(wall)),
                    },
                };
                if key != OFFSET_KEY && now.is_some_and(|now| expiry(key, value, now)) {
                    rocksdb::compaction_filter::Decision::Remove
                } else {
                    rocksdb::compaction_filter::Decision::Keep
                }
            });
        }
        opts
    }
}

/// The directory of one partition's state under a stage's state root.
pub fn partition_dir(root: &Path, topic: &str, partition: i32) -> PathBuf {
    root.join(format!("{topic}-{partition}"))
}

/// Reads a stored offset: big-endian, or sign-flipped as aggregators stored it before the
/// runtime was shared (top bit set; a real offset never has it).
pub fn decode_offset(bytes: &[u8]) -> Option<i64> {
    let raw = u64::from_be_bytes(bytes.try_into().ok()?);
    let plain = if raw >> 63 == 1 { raw ^ (1 << 63) } else { raw };
    i64::try_from(plain).ok()
}

/// One partition's state: the database, its owner lock and the next offset.
pub struct Store {
    partition: i32,
    // Dropped before `_owner`: the database is closed before another owner may open it, unless
    // a reader holds it ([`Store::shared_db`]); RocksDB's own lock then still refuses a
    // second open, so a new owner waits or fails rather than share it.
    db: Arc<DB>,
    /// Made once: [`DB::get`] makes (and frees) default read options on every call.
    read_options: ReadOptions,
    _owner: File,
    next_offset: Option<i64>,
    /// The next offset changed since the last write.
    advanced: bool,
    /// How far the stage's input has come, for [`ExpiryClock::Progress`] (`i64::MIN`: not
    /// said yet); read by compaction's threads.
    progress: Arc<AtomicI64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("partition", &self.partition)
            .field("next_offset", &self.next_offset)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the state of `partition` in `dir`, waiting up to [`OWNER_WAIT`] for
    /// a previous owner to release it.
    pub fn open(dir: &Path, partition: i32, options: &StoreOptions, cache: &Cache) -> Result<Self> {
        let state_dir = |source| Error::StateDir {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(state_dir)?;
        let owner = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(OWNER_FILE))
            .map_err(state_dir)?;
        let mut waited = Duration::ZERO;
        loop {
            match owner.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) if waited < OWNER_WAIT => {
                    std::thread::sleep(Duration::from_millis(100));
                    waited += Duration::from_millis(100);
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(Error::Busy {
                        dir: dir.to_owned(),
                        waited,
                    });
                }
                Err(TryLockError::Error(e)) => return Err(state_dir(e)),
            }
        }
        // Its one column family named, so batched reads can address it
        // ([`Store::multi_get_sorted`]); the same database as opened without it.
        let progress = Arc::new(AtomicI64::new(i64::MIN));
        let options = options.rocksdb(cache, &progress);
        let default = ColumnFamilyDescriptor::new(DEFAULT_COLUMN_FAMILY_NAME, options.clone());
        let db = Arc::new(DB::open_cf_descriptors(&options, dir, [default])?);
        let next_offset = match db.get(OFFSET_KEY)? {
            None => None,
            Some(bytes) => Some(
                decode_offset(&bytes)
                    .ok_or_else(|| Error::corrupt("stored offset", "not 8 bytes"))?,
            ),
        };
        Ok(Self {
            partition,
            db,
            read_options: ReadOptions::default(),
            _owner: owner,
            next_offset,
            advanced: false,
            progress,
        })
    }

    /// Says the stage's input has come as far as `at_ms`, for [`ExpiryClock::Progress`]
    /// (it never goes back).
    pub fn advance_expiry_clock(&self, at_ms: i64) {
        self.progress.fetch_max(at_ms, Ordering::Relaxed);
    }

    /// The input partition this state belongs to.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// The next offset to consume, if any message was ever applied.
    pub fn next_offset(&self) -> Option<i64> {
        self.next_offset
    }

    /// Records that the message at `offset` was applied: the next write stores `offset + 1`.
    pub fn consumed(&mut self, offset: i64) {
        self.next_offset = Some(offset.saturating_add(1));
        self.advanced = true;
    }

    /// The database, for reads. Writes go through [`Self::write`].
    pub fn db(&self) -> &DB {
        &self.db
    }

    /// The value stored under `key`, pinned where RocksDB holds it (not copied).
    pub fn get(&self, key: &[u8]) -> Result<Option<DBPinnableSlice<'_>>> {
        Ok(self.db.get_pinned_opt(key, &self.read_options)?)
    }

    /// The values stored under `keys`, in their order, looked up together: RocksDB's batched
    /// lookup probes each file's filter and index for the whole set at once, which costs
    /// less than a [`Self::get`] each. `keys` must be in ascending byte order.
    pub fn multi_get_sorted<'k>(
        &self,
        keys: impl IntoIterator<Item = &'k [u8]>,
    ) -> Result<Vec<Option<DBPinnableSlice<'_>>>> {
        let default = self
            .db
            .cf_handle(DEFAULT_COLUMN_FAMILY_NAME)
            .ok_or_else(|| Error::Bug("the default column family is not open".into()))?;
        self.db
            .batched_multi_get_cf_opt(default, keys, true, &self.read_options)
            .into_iter()
            .map(|found| found.map_err(Error::from))
            .collect()
    }

    /// The database handle, for readers on other threads (a read model serving queries while
    /// its stage writes). A handle kept after the store is dropped keeps the database open:
    /// only a stage that never gives its partitions up (a static assignment) should share it.
    pub fn shared_db(&self) -> Arc<DB> {
        self.db.clone()
    }

    /// Writes `batch` with the next offset, atomically; nothing when neither changed.
    pub fn write(&mut self, mut batch: WriteBatch) -> Result<()> {
        if batch.is_empty() && !self.advanced {
            return Ok(());
        }
        if let Some(next) = self.next_offset {
            batch.put(OFFSET_KEY, next.to_be_bytes());
        }
        self.db.write_opt(batch, &WriteOptions::default())?;
        self.advanced = false;
        Ok(())
    }

    /// Writes one record at once, apart from the next write and without the next offset: for
    /// what must be durable before a batch's outputs are delivered, which [`Self::write`]
    /// follows (the rater's record of the catalog it priced under).
    pub fn put_now(&self, key: &[u8], value: &[u8]) -> Result<()> {
        Ok(self.db.put_opt(key, value, &WriteOptions::default())?)
    }

    /// Memory outside the block cache, bytes: the memtables, and the table readers (index and
    /// filter blocks held beside the cache), for metrics.
    pub fn memory_usage(&self) -> (u64, u64) {
        (
            self.property("rocksdb.cur-size-all-mem-tables"),
            self.property("rocksdb.estimate-table-readers-mem"),
        )
    }

    /// Approximate on-disk size and pending compaction bytes, for metrics.
    pub fn disk_usage(&self) -> (u64, u64) {
        (
            self.property("rocksdb.total-sst-files-size")
                + self.property("rocksdb.size-all-mem-tables"),
            self.property("rocksdb.estimate-pending-compaction-bytes"),
        )
    }

    /// An integer property of the database (0 when RocksDB does not give it).
    fn property(&self, name: &str) -> u64 {
        self.db.property_int_value(name).ok().flatten().unwrap_or(0)
    }
}

/// The next offset stored in the partition state at `dir`, read without taking the lock
/// (for operators and tests; the owner may be running).
pub fn stored_offset(dir: &Path) -> Result<Option<i64>> {
    // A running owner may delete a file between this open listing it and reading it (a
    // write-ahead log it flushed, a table it compacted away): an I/O error, or RocksDB's
    // corruption error naming the missing file, and the next attempt sees the files as they
    // are after that. (Seen in CI: `while stat a file for size: …/000004.log`.)
    let mut attempt = 1;
    loop {
        match read_stored_offset(dir) {
            Err(Error::Storage(e))
                if attempt < 8
                    && matches!(
                        e.kind(),
                        rocksdb::ErrorKind::IOError | rocksdb::ErrorKind::Corruption
                    ) =>
            {
                std::thread::sleep(Duration::from_millis(20 * attempt));
                attempt += 1;
            }
            read => return read,
        }
    }
}

/// [`stored_offset`], one attempt.
fn read_stored_offset(dir: &Path) -> Result<Option<i64>> {
    // The directory exists (with its owner file) before the database in it: an owner may be
    // opening it right now. No database yet is no offset yet.
    if !dir.join("CURRENT").exists() {
        return Ok(None);
    }
    let db = DB::open_for_read_only(&Options::default(), dir, false)?;
    match db.get(OFFSET_KEY)? {
        None => Ok(None),
        Some(bytes) => decode_offset(&bytes)
            .map(Some)
            .ok_or_else(|| Error::corrupt("stored offset", "not 8 bytes")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> Cache {
        Cache::new_lru_cache(1 << 20)
    }

    #[test]
    fn offsets_stored_sign_flipped_by_older_aggregators_read_the_same_and_are_rewritten_plain() {
        let dir = tempfile::tempdir().expect("tempdir");
        for offset in [0_i64, 1, 4_242, i64::MAX - 1] {
            let legacy = (offset.cast_unsigned() ^ (1 << 63)).to_be_bytes();
            assert_eq!(decode_offset(&legacy), Some(offset));
            assert_eq!(decode_offset(&offset.to_be_bytes()), Some(offset));
        }
        {
            let db = DB::open_default(dir.path()).expect("open");
            let legacy = (41_i64.cast_unsigned() ^ (1 << 63)).to_be_bytes();
            db.put(OFFSET_KEY, legacy).expect("put");
        }
        let mut store =
            Store::open(dir.path(), 3, &StoreOptions::default(), &cache()).expect("open");
        assert_eq!(store.next_offset(), Some(41));
        store.consumed(41);
        store.write(WriteBatch::default()).expect("write");
        let stored = store.db().get(OFFSET_KEY).expect("get");
        assert_eq!(stored.as_deref(), Some(&42_i64.to_be_bytes()[..]));
        drop(store);
        assert_eq!(stored_offset(dir.path()).expect("read"), Some(42));
    }

    #[test]
    fn a_directory_whose_database_is_not_created_yet_has_no_stored_offset() {
        // Was: an error, when a reader looked while an owner was still opening the partition.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(OWNER_FILE), b"").expect("owner file");
        assert_eq!(stored_offset(dir.path()).expect("read"), None);
    }

    #[test]
    fn a_second_owner_waits_for_the_first_and_then_opens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Store::open(dir.path(), 0, &StoreOptions::default(), &cache()).expect("open");
        let path = dir.path().to_owned();
        let second = std::thread::spawn(move || {
            Store::open(&path, 0, &StoreOptions::default(), &cache()).map(|s| s.partition())
        });
        std::thread::sleep(Duration::from_millis(300));
        drop(first);
        assert_eq!(second.join().ok().and_then(Result::ok), Some(0));
    }

    #[test]
    fn an_owner_that_never_lets_go_is_a_retryable_busy_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = Store::open(dir.path(), 0, &StoreOptions::default(), &cache()).expect("open");
        let Err(second) = Store::open(dir.path(), 0, &StoreOptions::default(), &cache()) else {
            panic!("opened a store another owner holds");
        };
        assert!(matches!(second, Error::Busy { .. }), "{second}");
        assert!(second.is_retryable());
    }

    #[test]
    fn a_batched_lookup_finds_what_single_lookups_find_in_memory_and_in_tables() {
        let key = |i: u32| format!("id-{i:08}").into_bytes();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store =
            Store::open(dir.path(), 0, &StoreOptions::default(), &cache()).expect("open");
        // Even keys in a table on disk, multiples of three in the memtable: some in both,
        // some in neither.
        for (step, flush) in [(2_u32, true), (3, false)] {
            let mut batch = WriteBatch::default();
            for i in (0..3_000).step_by(step as usize) {
                batch.put(key(i), (i * 10 + step).to_be_bytes());
            }
            store.write(batch).expect("write");
            if flush {
                store.db().flush().expect("flush");
            }
        }
        let keys: Vec<Vec<u8>> = (0..3_001).map(key).collect();
        let found = store
            .multi_get_sorted(keys.iter().map(Vec::as_slice))
            .expect("batched lookup");
        assert_eq!(found.len(), keys.len());
        for (i, (key, value)) in (0_u32..).zip(keys.iter().zip(found)) {
            let single = store.get(key).expect("get").map(|v| v.to_vec());
            let expected = match (i % 3 == 0, i % 2 == 0) {
                (true, _) if i < 3_000 => Some((i * 10 + 3).to_be_bytes().to_vec()),
                (false, true) => Some((i * 10 + 2).to_be_bytes().to_vec()),
                _ => None,
            };
            assert_eq!(value.map(|v| v.to_vec()), expected, "key {i}");
            assert_eq!(single, expected, "key {i}");
        }
    }

    #[test]
    fn a_store_with_its_index_in_the_cache_holds_no_index_beside_it_and_reads_back() {
        let key = |i: u32| format!("id-{i:08}").into_bytes();
        // The index and filter memory held beside the cache once four tables are written.
        let tables = |index_in_cache: bool| {
            let dir = tempfile::tempdir().expect("tempdir");
            let options = StoreOptions {
                index_in_cache,
                ..StoreOptions::default()
            };
            let mut store = Store::open(dir.path(), 0, &options, &cache()).expect("open");
            for chunk in 0..4_u32 {
                let mut batch = WriteBatch::default();
                for i in chunk * 5_000..(chunk + 1) * 5_000 {
                    batch.put(key(i), i.to_be_bytes());
                }
                store.write(batch).expect("write");
                store.db().flush().expect("flush");
            }
            for i in (0..20_000).step_by(7) {
                let value = store.db().get(key(i)).expect("get");
                assert_eq!(value.as_deref(), Some(&i.to_be_bytes()[..]), "key {i}");
            }
            assert_eq!(store.db().get(key(20_000)).expect("get"), None);
            store
                .db()
                .property_int_value("rocksdb.estimate-table-readers-mem")
                .expect("property")
                .expect("a value")
        };
        let (beside, in_cache) = (tables(false), tables(true));
        // Four tables' filters (20,000 keys at 10 bits: 25,000 bytes) and indexes move into
        // the cache; what stays beside it is each table reader's own few kilobytes.
        assert!(
            beside.saturating_sub(in_cache) >= 20_000,
            "{in_cache} bytes beside the cache, against {beside}"
        );
    }

    #[test]
    fn the_stored_offset_reads_while_its_owner_writes_and_flushes() {
        // Was: a read-only open could list a write-ahead log the owner deleted as it flushed,
        // and fail with an I/O error (a CI run of the aggregator's crash test).
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store =
            Store::open(dir.path(), 0, &StoreOptions::default(), &cache()).expect("open");
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (dir, done) = (dir.path().to_owned(), done.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    seen.push(stored_offset(&dir).map_err(|e| e.to_string())?);
                }
                Ok::<_, String>(seen)
            })
        };
        for offset in 0..200 {
            let mut batch = WriteBatch::default();
            batch.put(b"\0\0\0\x01ar", offset.to_string());
            store.consumed(offset);
            store.write(batch).expect("write");
            store.db().flush().expect("flush");
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let seen = reader
            .join()
            .expect("the reader ran")
            .expect("every read succeeded");
        // Each read saw a state the owner wrote (not necessarily the latest: a read-only open
        // replays only the logs it found).
        assert!(
            seen.iter()
                .all(|offset| offset.is_none_or(|o| (1..=200).contains(&o))),
            "{seen:?}"
        );
        assert_eq!(stored_offset(dir.path()).expect("read"), Some(200));
    }

    #[test]
    fn a_store_on_its_progress_clock_expires_nothing_past_it_or_before_it_is_set() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = neruba_schemas::event::now_ms();
        let day = 86_400_000;
        // A record expires once the clock is 10 days past the time it holds.
        let options = StoreOptions {
            expiry: Some(Arc::new(move |_key: &[u8], value: &[u8], now: i64| {
                <[u8; 8]>::try_from(value).is_ok_and(|b| i64::from_be_bytes(b) < now - 10 * day)
            })),
            expiry_clock: ExpiryClock::Progress,
            ..StoreOptions::default()
        };
        let store = Store::open(dir.path(), 0, &options, &cache()).expect("open");
        let kept = |store: &Store, at: i64| {
            store
                .put_now(b"\0\0\0\x01k", &at.to_be_bytes())
                .expect("put");
            store.db().flush().expect("flush");
            store.db().compact_range::<&[u8], &[u8]>(None, None);
            store.get(b"\0\0\0\x01k").expect("get").is_some()
        };
        let old = now - 20 * day;
        // Not said yet: kept, though the wall clock is 20 days past it.
        assert!(kept(&store, old));
        // The input has come to 15 days ago: 5 days past it, kept.
        store.advance_expiry_clock(now - 15 * day);
        assert!(kept(&store, old));
        // To 5 days ago: 15 days past it, dropped; and still so once told an earlier time,
        // since the clock never goes back.
        store.advance_expiry_clock(now - 5 * day);
        assert!(!kept(&store, old));
        store.advance_expiry_clock(now - 30 * day);
        assert!(!kept(&store, old));
        // No further than the wall clock, however far it is said to be: a record 9 days old
        // by the wall clock is kept.
        store.advance_expiry_clock(i64::MAX);
        assert!(kept(&store, now - 9 * day));
        assert!(!kept(&store, old));
    }

    #[test]
    fn the_stored_offset_is_never_expired() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = StoreOptions {
            expiry: Some(Arc::new(|_key: &[u8], _value: &[u8], _now: i64| true)),
            ..StoreOptions::default()
        };
        let mut store = Store::open(dir.path(), 0, &options, &cache()).expect("open");
        let mut batch = WriteBatch::default();
        batch.put(b"\0\0\0\x01ar", b"x");
        store.consumed(9);
        store.write(batch).expect("write");
        store.db().compact_range::<&[u8], &[u8]>(None, None);
        assert_eq!(store.db().get(b"\0\0\0\x01ar").expect("get"), None);
        assert_eq!(store.next_offset(), Some(10));
        drop(store);
        assert_eq!(stored_offset(dir.path()).expect("read"), Some(10));
    }
}
