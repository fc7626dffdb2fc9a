//! The `neruba` command line's building blocks, shared with the end-to-end tests.
//!
//! [`embedded`] runs the pipeline against an in-process Kafka broker (librdkafka's mock
//! cluster); [`sample`] holds the built-in catalog and its public dev keys; [`ledger`] reads
//! line items back, [`events`] the events topic.

/// The allocator of every process built on this crate (the `neruba` binary, its tests and the
/// benchmarks): every component allocates per request or per message (events, rollups, line
/// items), and glibc's allocator spent about a third of the gateway's CPU under load (perf,
/// 500-event batches); with mimalloc the gateway took 77–86 k events/s instead of 55–65 k.
///
/// Its `override` feature makes it the C allocator too (`malloc`, `free`; C++'s `new` calls
/// them), so RocksDB and librdkafka allocate from it as well: through glibc's, the
/// aggregator's RSS kept rising in its arenas (block-cache and memtable blocks freed on one
/// thread, allocated on another) long after RocksDB's own figures had reached their bounds,
/// 218 → 307 MiB from minute 3 to 10 of a steady run; with the override it held 219 → 229 MiB
/// from minute 3 to 6 (`end_to_end`, README "Performance").
///
/// Its `no_thp` feature keeps it from asking for transparent huge pages (`MADV_HUGEPAGE`): each
/// 2 MiB page was zeroed whole on first touch and counted whole in RSS however little of it was
/// used, so peak RSS was 1.3–2.5 × what it is with 4 KiB pages (gateway 181–192 against
/// 140–143 MiB, balances 127–147 against 60 MiB in `end_to_end`), with CPU per event the same
/// within the machine's noise.
/// On a host whose THP setting is `always` (not `madvise`) the kernel gives them anyway:
/// `MIMALLOC_ALLOW_THP=0` turns them off for the process there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod demo;
pub mod embedded;
pub mod events;
mod follow;
pub mod ledger;
pub mod ops;
pub mod process;
pub mod sample;
