//! The `neruba` command line's building blocks, shared with the end-to-end tests.
//!
//! [`embedded`] runs the pipeline against an in-process Kafka broker (librdkafka's mock
//! cluster); [`sample`] holds the built-in catalog and its public dev keys; [`ledger`] reads
//! line items back, [`events`] the events topic.

/// The allocator of every process built on this crate (the `neruba` binary, its tests and the
/// benchmarks): every component allocates per request or per message (events, rollups, line
/// items), and glibc's allocator spent about a third of the gateway's CPU under load (perf,
/// 500-event batches); with mimalloc the gateway took 77–86 k events/s instead of 55–65 k.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod demo;
pub mod embedded;
pub mod events;
mod follow;
pub mod ledger;
pub mod ops;
pub mod sample;
