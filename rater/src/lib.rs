//! The rater: turns closed windows into priced line items.
//!
//! So far this crate holds the pricing engine ([`price`]), pure functions from a plan and a
//! period-to-date quantity to an exact amount and its explanation. Consuming rollups and
//! producing line items to the ledger topic is not built yet.

pub mod price;
