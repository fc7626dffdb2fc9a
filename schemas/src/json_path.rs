//! The small JSON-path dialect meters use to point into an event's `data`.
//!
//! Syntax: `$.field`, `$.nested.field`, `$.list[0]`. A path names one value; wildcards and
//! filters are deliberately absent so a meter reads exactly one number per event.

use crate::codec::binary::Encoded;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// One step of a path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Step {
    Key(String),
    Index(usize),
}

/// A parsed path, e.g. `$.usage.tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JsonPath {
    text: String,
    steps: Vec<Step>,
}

impl JsonPath {
    /// Parses `$.a.b[2]`. The leading `$` is required so paths read the same everywhere.
    pub fn parse(text: &str) -> Result<Self, String> {
        let rest = text
            .strip_prefix('$')
            .ok_or_else(|| format!("path `{text}` must start with `$`"))?;
        let mut steps = Vec::new();
        let mut chars = rest.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '.' => {
                    let mut key = String::new();
                    while let Some(&n) = chars.peek() {
                        if n == '.' || n == '[' {
                            break;
                        }
                        key.push(n);
                        chars.next();
                    }
                    if key.is_empty() {
                        return Err(format!("path `{text}` has an empty field name"));
                    }
                    steps.push(Step::Key(key));
                }
                '[' => {
                    let mut digits = String::new();
                    for n in chars.by_ref() {
                        if n == ']' {
                            break;
                        }
                        digits.push(n);
                    }
                    let index = digits
                        .parse::<usize>()
                        .map_err(|_| format!("path `{text}` has a bad index `[{digits}]`"))?;
                    steps.push(Step::Index(index));
                }
                other => return Err(format!("path `{text}`: unexpected `{other}`")),
            }
        }
        if steps.is_empty() {
            return Err(format!("path `{text}` names no field"));
        }
        Ok(Self {
            text: text.to_owned(),
            steps,
        })
    }

    /// The value this path names inside an object's fields (an event's `data`).
    pub fn lookup_in<'a>(
        &self,
        fields: &'a serde_json::Map<String, serde_json::Value>,
    ) -> Option<&'a serde_json::Value> {
        let (first, rest) = self.steps.split_first()?;
        let mut current = match first {
            Step::Key(k) => fields.get(k)?,
            Step::Index(_) => return None,
        };
        for step in rest {
            current = match step {
                Step::Key(k) => current.as_object()?.get(k)?,
                Step::Index(i) => current.as_array()?.get(*i)?,
            };
        }
        Some(current)
    }

    /// What [`JsonPath::lookup_in`] finds in the event a version 2 message's `data` stands
    /// for, read where it lies ([`Encoded`]); `Err` only for bytes no encoder wrote.
    pub fn lookup_encoded<'a>(&self, data: Encoded<'a>) -> crate::Result<Option<Encoded<'a>>> {
        let Some((Step::Key(first), rest)) = self.steps.split_first() else {
            return Ok(None);
        };
        let Some(mut current) = data.member(first)? else {
            return Ok(None);
        };
        for step in rest {
            let next = match step {
                Step::Key(k) => current.member(k)?,
                Step::Index(i) => current.item(*i)?,
            };
            let Some(next) = next else {
                return Ok(None);
            };
            current = next;
        }
        Ok(Some(current))
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for JsonPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for JsonPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        JsonPath::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_keys_and_indexes_resolve() {
        let value = json!({"usage": {"tokens": [10, 20]}, "region": "eu"});
        let data = value.as_object().cloned().unwrap_or_default();
        let path = JsonPath::parse("$.usage.tokens[1]").expect("path");
        assert_eq!(path.lookup_in(&data), Some(&json!(20)));
        let region = JsonPath::parse("$.region").expect("path");
        assert_eq!(region.lookup_in(&data), Some(&json!("eu")));
        let missing = JsonPath::parse("$.usage.bytes").expect("path");
        assert_eq!(missing.lookup_in(&data), None);
    }

    #[test]
    fn malformed_paths_are_refused() {
        for bad in ["tokens", "$", "$..a", "$.a[x]", "$a"] {
            assert!(JsonPath::parse(bad).is_err(), "{bad} should be refused");
        }
    }
}
