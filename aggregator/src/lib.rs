//! The aggregator: windowed per-meter rollups in RocksDB, keyed by tenant, with the
//! authoritative dedup set and the consumed offsets in the same atomic write. Not built yet.
