//! The RocksDB key layout of one partition's state.
//!
//! Every key but the partition's own metadata starts with the tenant (length-prefixed), so a
//! tenant's data is one contiguous range and no key of one tenant can be read as another's.
//! Components are length-prefixed, which makes the encoding injective whatever bytes an id
//! or customer contains. Times are big-endian with the sign bit flipped, so keys sort by time.
//!
//! | kind | key after the tenant | value |
//! |---|---|---|
//! | `E` event id | id, customer | receive time of its first copy, or its event time if later (8 bytes) |
//! | `D` legacy event id | id | event time of its first copy (8 bytes): written before ids were kept per customer; read only as [`META_LEGACY_DEDUP_UNTIL`] says, dropped by compaction past the horizon |
//! | `W` window | series, window start | [`crate::state::WindowRecord`] (postcard) |
//! | `P` period | series, period start | closed-windows period aggregate (postcard) |
//! | `V` window distinct value | series, window start, value | empty |
//! | `Q` period distinct value | series, period start, value | first window start (8 bytes) |
//!
//! A series is (meter, customer, group).
//!
//! Metadata (empty tenant): `Moffset` the stored offset (the runtime's encoding), `Mmeters` the
//! meter shapes the state was built under, `O` + end + window key the open-window
//! index, `C` + tenant the tenant's clock (highest event time, watermark).

/// Metadata keys: an empty tenant (catalog tenant ids are never empty). The stored offset is
/// the stage runtime's (see [`neruba_stage::store`]).
pub const META_OFFSET: &[u8] = neruba_stage::store::OFFSET_KEY;
/// Up to which receive time a repeat is also looked up under its [`legacy_dedup`] key: state
/// that held an offset when it was first opened with per-customer ids gets its opening time
/// plus the horizon and a day (its legacy entries are then all past the horizon); fresh state
/// gets the far past (it has none).
pub const META_LEGACY_DEDUP_UNTIL: &[u8] = b"\0\0\0\0Mlegacy_dedup_until";
/// The shape of every meter key the partition ran under, removed ones included
/// ([`crate::meters`]; postcard).
pub const META_METERS: &[u8] = b"\0\0\0\0Mmeters";
/// The partition-wide watermark of state written before clocks were per tenant: read once,
/// as every tenant's starting clock (no longer written).
pub const META_WATERMARK: &[u8] = b"\0\0\0\0Mwatermark";
/// The partition-wide highest event time of such state, likewise.
pub const META_MAX_EVENT_TIME: &[u8] = b"\0\0\0\0Mmax_event_time";

use neruba_stage::keys::push_part as push;
pub use neruba_stage::keys::{time_bytes, time_from};
use std::ops::Range;

/// The tenant part and kind byte, in a key with room for `rest` more bytes (keys are built
/// once per event and meter: sized exactly, each is one allocation).
fn tenant_kind(tenant: &str, kind: u8, rest: usize) -> Vec<u8> {
    let mut key = Vec::with_capacity(4 + tenant.len() + 1 + rest);
    push(&mut key, tenant.as_bytes());
    key.push(kind);
    key
}

/// The tenant and kind byte of a key, for the compaction filter.
pub fn kind_of(key: &[u8]) -> Option<u8> {
    let len = usize::try_from(u32::from_be_bytes(key.get(..4)?.try_into().ok()?)).ok()?;
    key.get(4 + len).copied()
}

/// The tenant a tenant-prefixed key belongs to.
pub fn tenant_of(key: &[u8]) -> Option<&str> {
    let len = usize::try_from(u32::from_be_bytes(key.get(..4)?.try_into().ok()?)).ok()?;
    std::str::from_utf8(key.get(4..4 + len)?).ok()
}

/// Dedup entry of `(tenant, customer, id)`: an id counts once per customer, whatever the
/// partition count (customers sharing a partition do not share ids). The id comes first, so
/// ids sent in order stay in key order across customers (a lookup then skips every stored
/// file by its key range).
pub fn dedup(tenant: &str, customer: &str, id: &str) -> Vec<u8> {
    let mut key = tenant_kind(tenant, b'E', 8 + id.len() + customer.len());
    push(&mut key, id.as_bytes());
    push(&mut key, customer.as_bytes());
    key
}

/// Dedup entry of `(tenant, id)` as state written before ids were kept per customer has it.
pub fn legacy_dedup(tenant: &str, id: &str) -> Vec<u8> {
    let mut key = tenant_kind(tenant, b'D', 4 + id.len());
    push(&mut key, id.as_bytes());
    key
}

/// The series part: meter, customer, canonical group text.
pub fn series(meter: &str, customer: &str, group: &str) -> Vec<u8> {
    let mut s = Vec::with_capacity(12 + meter.len() + customer.len() + group.len());
    push_series(&mut s, meter, customer, |s| {
        s.extend_from_slice(group.as_bytes())
    });
    s
}

/// A window's key with its series written in place, in one allocation (room reserved for
/// `group_len` bytes of group text): the same bytes as [`window`] of the [`series`] of that
/// text, and where that series lies in the key.
pub fn window_with(
    tenant: &str,
    meter: &str,
    customer: &str,
    group_len: usize,
    write_group: impl FnOnce(&mut Vec<u8>),
    start: i64,
) -> (Vec<u8>, Range<usize>) {
    let rest = 12 + meter.len() + customer.len() + group_len + 8;
    let mut key = tenant_kind(tenant, b'W', rest);
    let from = key.len();
    push_series(&mut key, meter, customer, write_group);
    let series = from..key.len();
    key.extend_from_slice(&time_bytes(start));
    (key, series)
}

/// Appends the series part to `key`: meter, customer, and the group text `write_group` writes,
/// each length-prefixed.
fn push_series(
    key: &mut Vec<u8>,
    meter: &str,
    customer: &str,
    write_group: impl FnOnce(&mut Vec<u8>),
) {
    push(key, meter.as_bytes());
    push(key, customer.as_bytes());
    let at = key.len();
    key.extend_from_slice(&[0; 4]);
    write_group(key);
    let len = u32::try_from(key.len() - at - 4).unwrap_or(u32::MAX);
    key[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn timed(tenant: &str, kind: u8, series: &[u8], t: i64, rest: usize) -> Vec<u8> {
    let mut key = tenant_kind(tenant, kind, series.len() + 8 + rest);
    key.extend_from_slice(series);
    key.extend_from_slice(&time_bytes(t));
    key
}

/// A window's record.
pub fn window(tenant: &str, series: &[u8], start: i64) -> Vec<u8> {
    timed(tenant, b'W', series, start, 0)
}

/// A period's closed-windows aggregate.
pub fn period(tenant: &str, series: &[u8], start: i64) -> Vec<u8> {
    timed(tenant, b'P', series, start, 0)
}

/// The period key of the same tenant and series as `window_key`, for the period starting at
/// `period_start`: the window key with its kind byte and trailing time replaced.
pub fn period_of_window(window_key: &[u8], period_start: i64) -> Option<Vec<u8>> {
    let len = usize::try_from(u32::from_be_bytes(window_key.get(..4)?.try_into().ok()?)).ok()?;
    let kind_at = 4 + len;
    let time_at = window_key.len().checked_sub(8)?;
    if window_key.get(kind_at) != Some(&b'W') || time_at <= kind_at {
        return None;
    }
    let mut key = Vec::with_capacity(window_key.len());
    key.extend_from_slice(&window_key[..time_at]);
    key[kind_at] = b'P';
    key.extend_from_slice(&time_bytes(period_start));
    Some(key)
}

/// A distinct value seen in a window.
pub fn window_value(tenant: &str, series: &[u8], start: i64, value: &str) -> Vec<u8> {
    let mut key = timed(tenant, b'V', series, start, 4 + value.len());
    push(&mut key, value.as_bytes());
    key
}

/// A distinct value seen in a period.
pub fn period_value(tenant: &str, series: &[u8], start: i64, value: &str) -> Vec<u8> {
    let mut key = timed(tenant, b'Q', series, start, 4 + value.len());
    push(&mut key, value.as_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_bytes_sort_like_times() {
        let times = [i64::MIN, -5, -1, 0, 1, 1_790_000_000_000, i64::MAX];
        for pair in times.windows(2) {
            assert!(time_bytes(pair[0]) < time_bytes(pair[1]));
            assert_eq!(time_from(&time_bytes(pair[0])), Some(pair[0]));
        }
    }

    #[test]
    fn components_cannot_run_into_each_other() {
        assert_ne!(series("ab", "c", ""), series("a", "bc", ""));
        assert_ne!(dedup("acme", "c", "x"), dedup("acm", "ec", "x"));
        assert_ne!(dedup("acme", "cx", ""), dedup("acme", "c", "x"));
        assert_eq!(kind_of(&dedup("acme", "c", "x")), Some(b'E'));
        assert_ne!(legacy_dedup("acme", "x"), legacy_dedup("acm", "ex"));
        assert_eq!(kind_of(&legacy_dedup("acme", "x")), Some(b'D'));
        assert_eq!(kind_of(&window("t", &series("m", "c", ""), 0)), Some(b'W'));
        assert_eq!(
            tenant_of(&window("acme", &series("m", "c", ""), 0)),
            Some("acme")
        );
    }

    #[test]
    fn series_keys_keep_their_stored_bytes() {
        // State written by earlier releases is found only under the same bytes.
        assert_eq!(
            series("m", "c", "{}"),
            b"\0\0\0\x01m\0\0\0\x01c\0\0\0\x02{}"
        );
        assert_eq!(
            series("m", "c", r#"{"a":"b"}"#),
            b"\0\0\0\x01m\0\0\0\x01c\0\0\0\x09{\"a\":\"b\"}"
        );
    }

    #[test]
    fn a_window_key_written_in_place_is_that_of_its_series() {
        // Whatever room is reserved for the group, the bytes are the same.
        let group = r#"{"a":"b"}"#;
        let series = series("m", "c", group);
        for room in [0, 9, 100] {
            let (key, at) = window_with(
                "acme",
                "m",
                "c",
                room,
                |k| k.extend_from_slice(group.as_bytes()),
                7,
            );
            assert_eq!(key, window("acme", &series, 7));
            assert_eq!(&key[at], series.as_slice());
        }
    }

    #[test]
    fn period_key_derives_from_the_window_key() {
        let s = series("calls", "customer-7", r#"{"model":"a"}"#);
        assert_eq!(
            period_of_window(&window("acme", &s, 60_000), 7),
            Some(period("acme", &s, 7))
        );
        assert_eq!(period_of_window(&dedup("acme", "c", "x"), 7), None);
    }
}
