//! Wire types shared by every Neruba component.
//!
//! No IO, with one exception: [`Catalog::load`] reads a catalog file (`catalog/file.rs`, the only
//! module here that touches the file system). Parsing and validating catalog text, validating
//! and encoding events, decimal and window maths are functions of their arguments; the one clock
//! read is [`event::now_ms`], which callers pass in as `now`, so tests fix time.
//!
//! Invariants this crate guards for everyone else:
//! - a quantity or amount is a [`rust_decimal::Decimal`] from the moment it is read; no value is
//!   ever routed through binary floating point (see [`decimal`]);
//! - an event that passes [`event::validate`] has every field the pipeline relies on, and one that
//!   fails carries a stable [`RejectCode`] that HTTP answers and dead letters share;
//! - the events-topic encoding ([`codec`]) is versioned, so a consumer can refuse what it does not
//!   understand instead of misreading it.

pub mod catalog;
pub mod codec;
pub mod credit;
pub mod currency;
pub mod decimal;
pub mod event;
pub mod framing;
pub mod json_path;
pub mod ledger;
pub mod measure;
pub mod reject;
pub mod rollup;
pub mod topics;
pub mod window;

/// The OpenAPI 3.1 document of the whole HTTP surface (gateway and api), served by both at
/// `GET /v1/openapi.json` and checked against the routers and their answers by
/// `neruba/tests/openapi.rs`.
pub const OPENAPI: &str = include_str!("../openapi.json");

pub use catalog::{Catalog, LiveCatalog, MeterShape, MeterShapes};
pub use event::Event;
pub use reject::{RefusalCode, RejectCode, Rejection};

/// Errors of this crate that are not about a single event (those are [`Rejection`]s).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The catalog file could not be read.
    #[error("catalog {path}: {source}")]
    CatalogIo {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The catalog file is not valid TOML/YAML or does not match the catalog schema.
    #[error("catalog {path}: {message}")]
    CatalogSyntax { path: String, message: String },
    /// The catalog parsed but says something impossible.
    #[error("catalog {path}: {message}")]
    CatalogInvalid { path: String, message: String },
    /// A message on the events topic could not be decoded.
    #[error("events topic message: {0}")]
    Decode(String),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
