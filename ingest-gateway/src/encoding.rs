//! Reading a request body to its end: `Content-Encoding`, truncation and the size limit.
//!
//! Invariants:
//! - the size limit applies to the bytes the events are parsed from, i.e. after decoding: a
//!   small compressed body that inflates past the limit (a zip bomb) is refused, and decoding
//!   stops one byte past the limit, so it never allocates more than the limit;
//! - the received (still encoded) bytes are bounded by the same limit;
//! - a body that ends early (the client closed, a broken chunk) is told apart from one that is
//!   too large: the first is the client's transport failing, the second its content;
//! - an encoding the gateway cannot decode is refused whole, never parsed as if it were JSON.

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use std::io::Read;

/// A `Content-Encoding` the gateway decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Zstd,
}

impl Encoding {
    /// What `Accept-Encoding` advertises in a 415 for an unsupported encoding.
    pub const ACCEPTED: &'static str = "gzip, zstd, identity";

    /// The encoding a `Content-Encoding` header names (absent means identity).
    ///
    /// Only one coding is taken (besides `identity`): stacked codings are legal HTTP but no
    /// client sends them to an ingest API, and each would multiply the decoding work.
    pub fn from_header(value: Option<&str>) -> Result<Self, UnsupportedEncoding> {
        let Some(value) = value else {
            return Ok(Self::Identity);
        };
        let mut chosen = Self::Identity;
        for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            let next = match coding.to_ascii_lowercase().as_str() {
                "identity" => continue,
                "gzip" | "x-gzip" => Self::Gzip,
                "zstd" => Self::Zstd,
                _ => return Err(UnsupportedEncoding(value.to_owned())),
            };
            if chosen != Self::Identity {
                return Err(UnsupportedEncoding(value.to_owned()));
            }
            chosen = next;
        }
        Ok(chosen)
    }

    fn name(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::Gzip => "gzip",
            Self::Zstd => "zstd",
        }
    }
}

/// A `Content-Encoding` the gateway does not decode (415).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("content encoding `{0}` is not supported; use gzip, zstd or none")]
pub struct UnsupportedEncoding(pub String);

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// More bytes than the limit, received or decoded (413).
    #[error("request body exceeds {limit} bytes")]
    TooLarge { limit: usize },
    /// The body ended before its declared end: the client closed, or the chunked framing
    /// broke (400).
    #[error("request body ended before it was complete: {0}")]
    Incomplete(String),
    /// The bytes are not valid in their declared encoding (400).
    #[error("request body is not valid {encoding}: {message}")]
    Corrupt {
        encoding: &'static str,
        message: String,
    },
}

/// Reads `body` to its end and decodes it; at most `limit` bytes, received and decoded.
pub async fn read(
    body: Body,
    encoding: Encoding,
    declared: Option<usize>,
    limit: usize,
) -> Result<Bytes, BodyError> {
    let mut body = body;
    // Room for the declared length at once: grown by doubling, the buffer could hold up to
    // twice the body.
    let mut received = BytesMut::with_capacity(declared.unwrap_or(0).min(limit));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Incomplete(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if received.len().saturating_add(data.len()) > limit {
                return Err(BodyError::TooLarge { limit });
            }
            received.extend_from_slice(&data);
        }
    }
    decode(received.freeze(), encoding, limit)
}

/// Decodes received bytes; the result is at most `limit` bytes.
pub fn decode(received: Bytes, encoding: Encoding, limit: usize) -> Result<Bytes, BodyError> {
    let corrupt = |message: String| BodyError::Corrupt {
        encoding: encoding.name(),
        message,
    };
    let mut decoded = Vec::new();
    match encoding {
        Encoding::Identity => return Ok(received),
        Encoding::Gzip => {
            // Multi-member: `cat a.gz b.gz` is valid gzip, and some clients stream that way.
            let decoder = flate2::read::MultiGzDecoder::new(&received[..]);
            read_limited(decoder, limit, &mut decoded).map_err(|e| corrupt(e.to_string()))?;
        }
        Encoding::Zstd => {
            let mut source: &[u8] = &received;
            // One frame after another, as `zstd` concatenates them.
            while !source.is_empty() && decoded.len() <= limit {
                let decoder = ruzstd::decoding::StreamingDecoder::new_with_max_window_size(
                    &mut source,
                    MAX_ZSTD_WINDOW,
                )
                .map_err(|e| corrupt(e.to_string()))?;
                let room = limit - decoded.len();
                read_limited(decoder, room, &mut decoded).map_err(|e| corrupt(e.to_string()))?;
            }
        }
    }
    if decoded.len() > limit {
        return Err(BodyError::TooLarge { limit });
    }
    Ok(Bytes::from(decoded))
}

/// Largest zstd window accepted: the decoder allocates the window a frame declares, so an
/// attacker's frame could otherwise ask for 128 MiB (ruzstd's default) per request. 8 MiB is
/// what `zstd -19` uses; only `--long` modes need more.
pub(crate) const MAX_ZSTD_WINDOW: u64 = 8 * 1024 * 1024;

/// Appends at most `limit + 1` bytes of `reader` to `out` (one more than allowed is how the
/// caller learns the limit was passed, without reading the rest).
fn read_limited(reader: impl Read, limit: usize, out: &mut Vec<u8>) -> std::io::Result<()> {
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    reader.take(cap).read_to_end(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Bytes {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(data).expect("in memory");
        Bytes::from(encoder.finish().expect("in memory"))
    }

    #[test]
    fn header_names_one_coding() {
        assert_eq!(Encoding::from_header(None), Ok(Encoding::Identity));
        assert_eq!(Encoding::from_header(Some("GZip")), Ok(Encoding::Gzip));
        assert_eq!(
            Encoding::from_header(Some("identity, zstd")),
            Ok(Encoding::Zstd)
        );
        assert!(Encoding::from_header(Some("br")).is_err());
        assert!(Encoding::from_header(Some("gzip, gzip")).is_err());
    }

    #[test]
    fn limit_applies_to_decoded_bytes() {
        let plain = vec![b'a'; 10_000];
        let small = gzip(&plain);
        assert!(small.len() < 1_000);
        assert_eq!(
            decode(small.clone(), Encoding::Gzip, 10_000)
                .map(|b| b.len())
                .ok(),
            Some(10_000)
        );
        assert!(matches!(
            decode(small, Encoding::Gzip, 9_999),
            Err(BodyError::TooLarge { limit: 9_999 })
        ));
        let zstd = Bytes::from(ruzstd::encoding::compress_to_vec(
            &plain[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        ));
        assert_eq!(
            decode(zstd.clone(), Encoding::Zstd, 10_000)
                .map(|b| b.len())
                .ok(),
            Some(10_000)
        );
        assert!(matches!(
            decode(zstd, Encoding::Zstd, 100),
            Err(BodyError::TooLarge { limit: 100 })
        ));
    }

    #[test]
    fn corrupt_data_is_not_too_large() {
        assert!(matches!(
            decode(Bytes::from_static(b"{\"id\":1}"), Encoding::Gzip, 100),
            Err(BodyError::Corrupt {
                encoding: "gzip",
                ..
            })
        ));
        assert!(matches!(
            decode(Bytes::from_static(b"{\"id\":1}"), Encoding::Zstd, 100),
            Err(BodyError::Corrupt {
                encoding: "zstd",
                ..
            })
        ));
    }
}
