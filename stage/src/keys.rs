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

/// Appends `part` so that keys made of such parts sort as the tuples of their parts do (each
/// part bytewise, a part before every longer one it begins), and read back unambiguously
/// (the tests read them back): each `0x00` byte is written `0x00 0xFF`, and the part ends with
/// `0x00 0x00`. Where [`push_part`]'s length prefix sorts a shorter part first whatever its
/// bytes, this keeps the parts' own order, so a scan of such keys is in that order and a seek
/// finds a tuple's place. Keys so written are stored: changing this encoding would sort new
/// keys apart from stored ones.
pub fn push_ordered(buf: &mut Vec<u8>, part: &[u8]) {
    for &byte in part {
        buf.push(byte);
        if byte == 0 {
            buf.push(u8::MAX);
        }
    }
    buf.extend_from_slice(&[0, 0]);
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

    /// Reads one part written by [`push_ordered`]: the part and what follows it.
    fn read_ordered(bytes: &[u8]) -> Option<(Vec<u8>, &[u8])> {
        let mut part = Vec::new();
        let mut at = 0;
        loop {
            match (bytes.get(at)?, bytes.get(at + 1)) {
                (0, Some(0)) => return Some((part, bytes.get(at + 2..)?)),
                (0, Some(&u8::MAX)) => {
                    part.push(0);
                    at += 2;
                }
                (0, _) => return None,
                (&byte, _) => {
                    part.push(byte);
                    at += 1;
                }
            }
        }
    }

    /// Every byte string up to three bytes long over `0x00`, `0x01`, `0xFE` and `0xFF`:
    /// the bytes next to the escape's.
    fn short_parts() -> Vec<Vec<u8>> {
        let mut parts = vec![Vec::new()];
        let mut last = vec![Vec::new()];
        for _ in 0..3 {
            last = last
                .iter()
                .flat_map(|part: &Vec<u8>| {
                    [0u8, 1, 0xFE, 0xFF].map(|byte| [part.as_slice(), &[byte]].concat())
                })
                .collect();
            parts.extend(last.iter().cloned());
        }
        parts
    }

    #[test]
    fn ordered_parts_sort_as_their_tuples_and_read_back() {
        let parts = short_parts();
        let ordered = |tuple: &[&Vec<u8>]| {
            let mut key = Vec::new();
            for part in tuple {
                push_ordered(&mut key, part);
            }
            key
        };
        // Every pair of two-part tuples: keys compare as the tuples.
        for a in &parts {
            for b in &parts {
                for c in [&parts[0], &parts[3], &parts[parts.len() - 1]] {
                    let (x, y) = (ordered(&[a, c]), ordered(&[b, c]));
                    assert_eq!(x.cmp(&y), (a, c).cmp(&(b, c)), "{a:?} {b:?} {c:?}");
                    let (x, y) = (ordered(&[c, a]), ordered(&[c, b, a]));
                    assert_eq!(x.cmp(&y), [c, a].as_slice().cmp([c, b, a].as_slice()));
                }
            }
            let mut key = ordered(&[a, &parts[5]]);
            key.push(7);
            let (first, rest) = read_ordered(&key).expect("first");
            let (second, rest) = read_ordered(rest).expect("second");
            assert_eq!((&first, &second, rest), (a, &parts[5], &[7][..]));
        }
        // Cut short, or an escape no writer leaves.
        assert_eq!(read_ordered(&[1, 0]), None);
        assert_eq!(read_ordered(&[1, 0, 3]), None);
        assert_eq!(read_ordered(&[1, 0, 0xFF]), None);
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
