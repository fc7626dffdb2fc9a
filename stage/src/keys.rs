//! The pieces every stage's RocksDB keys are built from, so each key is encoded
//! unambiguously and sorts as intended.

/// Appends `part` length-prefixed (4 bytes big-endian): a sequence of parts is then injective,
/// whatever bytes a part holds.
pub fn push_part(buf: &mut Vec<u8>, part: &[u8]) {
    let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(part);
}

/// Reads one part written by [`push_part`]: the part and what follows it.
pub fn read_part(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = usize::try_from(u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?)).ok()?;
    let end = 4usize.checked_add(len)?;
    Some((bytes.get(4..end)?, bytes.get(end..)?))
}

/// An `i64` (a time) as 8 bytes that sort like the number: big-endian, sign bit flipped.
pub fn time_bytes(t: i64) -> [u8; 8] {
    (t.cast_unsigned() ^ (1 << 63)).to_be_bytes()
}

/// Reads [`time_bytes`] back from the first 8 bytes.
pub fn time_from(bytes: &[u8]) -> Option<i64> {
    let array: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some((u64::from_be_bytes(array) ^ (1 << 63)).cast_signed())
}

/// The least key greater than every key starting with `prefix` (the end of a range
/// deletion or a scan of it); `None` if there is none (`prefix` is empty or all `0xFF`).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let last = prefix.iter().rposition(|&b| b != u8::MAX)?;
    let mut end = prefix.get(..=last)?.to_vec();
    *end.last_mut()? += 1;
    Some(end)
}

/// Read options whose iterators stop at the end of the keys starting with `prefix`
/// ([`prefix_end`]): past it nothing is read, nor deleted keys after it stepped over.
pub fn reading_under(prefix: &[u8]) -> rocksdb::ReadOptions {
    let mut options = rocksdb::ReadOptions::default();
    if let Some(end) = prefix_end(prefix) {
        options.set_iterate_upper_bound(end);
    }
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_read_back_and_a_truncated_one_does_not() {
        let mut key = Vec::new();
        push_part(&mut key, b"a/b");
        push_part(&mut key, b"");
        let (first, rest) = read_part(&key).expect("first");
        let (second, rest) = read_part(rest).expect("second");
        assert_eq!((first, second, rest), (&b"a/b"[..], &b""[..], &b""[..]));
        assert_eq!(read_part(&[0, 0, 0, 9, 1]), None);
    }

    #[test]
    fn a_prefix_end_is_past_every_key_under_the_prefix_and_before_the_next() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xFF, 0xFF]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xFF]), None);
        assert_eq!(prefix_end(b""), None);
        let end = prefix_end(&[7, 0xFE]).expect("end");
        for under in [&[7, 0xFE][..], &[7, 0xFE, 0xFF, 0xFF], &[7, 0xFE, 0]] {
            assert!(under < end.as_slice());
        }
        assert!(end.as_slice() <= &[7, 0xFF][..]);
    }
}
