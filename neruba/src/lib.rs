//! The `neruba` command line's building blocks, shared with the end-to-end tests.
//!
//! [`embedded`] runs the pipeline against an in-process Kafka broker (librdkafka's mock
//! cluster); [`sample`] holds the built-in catalog and its public dev keys; [`ledger`] reads
//! line items back.

pub mod demo;
pub mod embedded;
pub mod ledger;
pub mod ops;
pub mod sample;
