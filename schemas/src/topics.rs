//! Default topic names. Every component takes them as flags; these are the defaults.

/// Validated events, keyed by `tenant/customer`.
pub const EVENTS: &str = "neruba.events";
/// Events refused on the Kafka path, with their rejection code in a header.
pub const DEAD_LETTER: &str = "neruba.dead-letter";
/// Closed windows, compacted on (tenant, meter, customer, group, window).
pub const ROLLUPS: &str = "neruba.rollups";
