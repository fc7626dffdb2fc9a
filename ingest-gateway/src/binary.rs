//! CloudEvents binary content mode: the attributes travel as protocol headers (`ce-id` on
//! HTTP, `ce_id` on Kafka) and the body is the event's `data`.
//!
//! Invariants:
//! - a binary-mode event becomes the same JSON object a structured-mode client would have sent,
//!   and then goes through the same validation, dedup and answers: the mode is transport, never
//!   meaning;
//! - only the attributes Neruba reads are taken from headers (`specversion`, `id`, `type`,
//!   `subject`, `time`, `source`); others (extensions) are ignored, as they are in structured
//!   mode;
//! - an attribute given twice, or not UTF-8 once decoded, is refused (`invalid_field`) rather
//!   than one copy picked.
//!
//! The HTTP binding percent-encodes header values (CloudEvents HTTP binding 1.0.2, 3.1.3.2);
//! the Kafka binding carries them as plain UTF-8 bytes.

use neruba_schemas::event::Envelope;
use neruba_schemas::framing::Framed;
use neruba_schemas::{RejectCode, Rejection};
use serde_json::{Map, Value};

/// The attributes read from headers; the rest of the event is `data`.
pub const ATTRIBUTES: [&str; 6] = ["specversion", "id", "type", "subject", "time", "source"];

/// How a binding spells attribute headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// `ce-<name>`, values percent-encoded.
    Http,
    /// `ce_<name>`, values as UTF-8 bytes.
    Kafka,
}

impl Binding {
    fn prefix(self) -> &'static str {
        match self {
            Self::Http => "ce-",
            Self::Kafka => "ce_",
        }
    }

    /// The attribute a header carries, if it is one Neruba reads.
    pub fn attribute(self, header: &str) -> Option<&'static str> {
        let prefix = self.prefix();
        let name = header.get(..prefix.len())?;
        if !name.eq_ignore_ascii_case(prefix) {
            return None;
        }
        let rest = header.get(prefix.len()..)?;
        ATTRIBUTES
            .into_iter()
            .find(|a| a.eq_ignore_ascii_case(rest))
    }

    /// Whether a message is in binary mode: it carries `id` or `specversion` as headers and its
    /// content type is not a structured CloudEvents one.
    pub fn is_binary<'h>(
        self,
        header_names: impl IntoIterator<Item = &'h str>,
        content_type: Option<&str>,
    ) -> bool {
        let structured = content_type.is_some_and(|t| {
            t.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/cloudevents")
        });
        !structured
            && header_names
                .into_iter()
                .any(|h| matches!(self.attribute(h), Some("id" | "specversion")))
    }
}

/// Whether `content_type` names JSON, the only `data` Neruba meters (absent counts as JSON,
/// as CloudEvents' JSON format implies).
pub fn is_json(content_type: Option<&str>) -> bool {
    let Some(content_type) = content_type else {
        return true;
    };
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    media.is_empty() || media == "application/json" || media.ends_with("+json")
}

/// Frames a binary-mode event as a structured one would be framed: `data` parsed from the
/// body (absent when the body is blank), the size the body plus the attribute headers, the
/// value the structured form ([`event_object`]). An event over `max_event_bytes` is refused
/// `event_too_large` whatever its `data` holds, so its body is checked as JSON but never
/// built (as the structured framings read an oversized event). `Err` says why the body is not
/// JSON; the caller answers that as its framing does (400 over HTTP, a dead letter on Kafka).
pub fn frame<'h>(
    binding: Binding,
    headers: impl IntoIterator<Item = (&'h str, &'h [u8])> + Clone,
    body: &[u8],
    max_event_bytes: usize,
) -> Result<Framed<'static>, String> {
    let len = body.len()
        + headers
            .clone()
            .into_iter()
            .filter(|(name, _)| binding.attribute(name).is_some())
            .map(|(_, value)| value.len())
            .sum::<usize>();
    let not_json = |e: &dyn std::fmt::Display| {
        format!("the event's data (the body in binary mode) is not JSON: {e}")
    };
    let data = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else if len > max_event_bytes {
        neruba_schemas::event::check_json(body).map_err(|e| not_json(&e))?;
        None
    } else {
        Some(serde_json::from_slice(body).map_err(|e| not_json(&e))?)
    };
    Ok(Framed {
        value: event_object(binding, headers, data).map(Envelope::from_value),
        len,
    })
}

/// Builds the structured form of a binary-mode event from its attribute headers and its
/// `data` (already parsed; `None` for an empty body).
pub fn event_object<'h>(
    binding: Binding,
    headers: impl IntoIterator<Item = (&'h str, &'h [u8])>,
    data: Option<Value>,
) -> Result<Value, Rejection> {
    let mut object = Map::new();
    for (name, raw) in headers {
        let Some(attribute) = binding.attribute(name) else {
            continue;
        };
        let bytes = match binding {
            Binding::Http => percent_decode(raw),
            Binding::Kafka => raw.to_vec(),
        };
        let Ok(text) = String::from_utf8(bytes) else {
            return Err(Rejection::new(
                RejectCode::InvalidField,
                format!("header `{name}` is not UTF-8"),
            ));
        };
        if object
            .insert(attribute.to_owned(), Value::String(text))
            .is_some()
        {
            return Err(Rejection::new(
                RejectCode::InvalidField,
                format!("attribute `{attribute}` is given twice"),
            ));
        }
    }
    if let Some(data) = data {
        object.insert("data".to_owned(), data);
    }
    Ok(Value::Object(object))
}

/// Decodes `%XX` escapes; a `%` not followed by two hex digits stays as it is (senders that do
/// not encode are read as they meant).
fn percent_decode(raw: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let byte = raw[i];
        if byte == b'%'
            && let (Some(hi), Some(lo)) = (
                raw.get(i + 1).copied().and_then(hex),
                raw.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(hi * 16 + lo);
            i += 3;
        } else {
            out.push(byte);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn headers_become_the_structured_event() {
        let headers: Vec<(&str, &[u8])> = vec![
            ("ce-specversion", b"1.0"),
            ("CE-ID", b"e%201"),
            ("ce-type", b"api.request"),
            ("ce-subject", b"cust%E2%82%AC"),
            ("ce-myextension", b"ignored"),
            ("content-type", b"application/json"),
        ];
        let event = event_object(Binding::Http, headers, Some(json!({"tokens": 3})));
        assert_eq!(
            event.ok(),
            Some(
                json!({"specversion": "1.0", "id": "e 1", "type": "api.request",
                        "subject": "cust€", "data": {"tokens": 3}})
            )
        );
        let kafka: Vec<(&str, &[u8])> = vec![("ce_id", b"a%20b"), ("ce_id", b"c")];
        assert_eq!(
            event_object(Binding::Kafka, kafka, None)
                .err()
                .map(|r| r.code),
            Some(RejectCode::InvalidField)
        );
        let kafka: Vec<(&str, &[u8])> = vec![("ce_id", b"a%20b")];
        assert_eq!(
            event_object(Binding::Kafka, kafka, None).ok(),
            Some(json!({"id": "a%20b"})),
            "the Kafka binding does not percent-encode"
        );
    }

    #[test]
    fn mode_is_told_by_headers_and_content_type() {
        let http = Binding::Http;
        assert!(http.is_binary(["ce-id", "ce-type"], Some("application/json")));
        assert!(http.is_binary(["ce-specversion"], None));
        assert!(!http.is_binary(["ce-id"], Some("application/cloudevents+json")));
        assert!(!http.is_binary(["ce-type", "authorization"], None));
        assert!(Binding::Kafka.is_binary(["ce_id"], None));
        assert!(!Binding::Kafka.is_binary(["ce-id"], None));
        assert!(is_json(Some("application/json; charset=utf-8")));
        assert!(is_json(Some("application/vnd.usage+json")));
        assert!(!is_json(Some("text/plain")));
    }

    #[test]
    fn broken_escapes_stay_literal() {
        assert_eq!(percent_decode(b"100%"), b"100%");
        assert_eq!(percent_decode(b"%zz%41"), b"%zzA");
        assert_eq!(percent_decode(b"%00"), b"\0");
    }
}
