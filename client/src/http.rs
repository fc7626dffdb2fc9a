//! The one place requests leave the client: the base URL, the key, the timeouts, and reading
//! an answer (bounded) into a status, a `Retry-After` and a body.
//!
//! Invariants:
//! - the API key goes only into the `Authorization` header, marked sensitive, and into no
//!   `Debug` output or error message;
//! - path segments the caller names (customer, currency, grant id, period) are
//!   percent-encoded, `/` and `%` included, and query values are form-encoded, so no argument can change which route a request reaches; the two that
//!   no URL can carry (`.` and `..`, which URL parsing folds away) are refused before sending;
//! - an answer body is read up to [`MAX_ANSWER_BYTES`]: a wrong base URL serving something
//!   endless cannot exhaust memory.

use crate::error::{Error, Result};
use crate::retry::{self, RetryPolicy};
use reqwest::header::{self, HeaderValue};
use reqwest::{Method, Url};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use std::time::Duration;

/// The largest answer read: above every answer the gateway and the api give the client's
/// requests. The largest is a usage page: at most 100,000 rows (the `limit` the client asks
/// for), each under 400 bytes of times and numbers, and at most 32 MiB of group names and
/// values, which JSON escaping at most sextuples (a control character is written `\u00XX`):
/// under 232 MiB. An ingest answer for the gateway's largest batch (10,000 events, each
/// rejected with a message) stays far below it. (Was 32 MiB, which a usage page grouped by
/// values of a few hundred bytes passed, so such a read failed for good.)
pub(crate) const MAX_ANSWER_BYTES: usize = 256 * 1024 * 1024;

/// What every request shares: the HTTP client (connection pool, timeouts), where the server
/// is, who is calling, and how failures are retried.
pub(crate) struct Transport {
    pub(crate) http: reqwest::Client,
    /// The server's base URL (the gateway's, or the api's for reads), routes appended to its
    /// path (so a path prefix is kept).
    pub(crate) base: Url,
    /// `Bearer <key>`, marked sensitive.
    pub(crate) authorization: HeaderValue,
    pub(crate) retry: RetryPolicy,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("base", &self.base.as_str())
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// An answer, read whole.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) retry_after: Option<Duration>,
    pub(crate) body: Vec<u8>,
}

/// `{"error": {"code", "message"}}`, the error body of the gateway and the api.
#[derive(Debug, Deserialize)]
struct ErrorAnswer {
    error: ErrorBody,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ErrorBody {
    pub(crate) code: String,
    #[serde(default)]
    pub(crate) message: String,
}

impl Answer {
    /// The `{"error": …}` of the body, if it has one.
    pub(crate) fn error_body(&self) -> Option<ErrorBody> {
        serde_json::from_slice::<ErrorAnswer>(&self.body)
            .ok()
            .map(|a| a.error)
    }

    /// The body as `T`, or a [`Error::Protocol`] saying it is not one.
    pub(crate) fn decode<T: DeserializeOwned>(&self, what: &str) -> Result<T> {
        serde_json::from_slice(&self.body).map_err(|e| Error::Protocol {
            status: self.status,
            message: format!("{what}: {e}: {}", self.excerpt()),
        })
    }

    /// This answer as a refusal: the error body's code and message.
    pub(crate) fn refused(&self) -> Error {
        match self.error_body() {
            Some(body) => Error::Refused {
                status: self.status,
                code: body.code,
                message: body.message,
            },
            None => Error::Refused {
                status: self.status,
                code: "unknown".to_owned(),
                message: self.excerpt(),
            },
        }
    }

    /// The start of the body, for messages.
    fn excerpt(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let mut excerpt: String = text.chars().take(200).collect();
        if excerpt.len() < text.len() {
            excerpt.push('…');
        }
        excerpt
    }
}

/// A failed attempt that may be retried.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) status: Option<u16>,
    pub(crate) code: Option<String>,
    pub(crate) message: String,
    pub(crate) retry_after: Option<Duration>,
}

impl Failure {
    pub(crate) fn transport(e: &reqwest::Error) -> Self {
        Self {
            status: None,
            code: None,
            message: describe(e),
            retry_after: None,
        }
    }

    pub(crate) fn answer(answer: &Answer) -> Self {
        let body = answer.error_body();
        Self {
            status: Some(answer.status),
            message: body
                .as_ref()
                .map_or_else(|| format!("HTTP {}", answer.status), |b| b.message.clone()),
            code: body.map(|b| b.code),
            retry_after: answer.retry_after,
        }
    }

    pub(crate) fn into_error(self, attempts: u32) -> Error {
        Error::Unavailable {
            attempts,
            status: self.status,
            code: self.code,
            message: self.message,
        }
    }
}

impl Transport {
    /// The URL of the route made of `segments` under the base URL, each percent-encoded.
    pub(crate) fn url(&self, segments: &[&str]) -> Result<Url> {
        if let Some(bad) = segments
            .iter()
            .find(|s| s.is_empty() || **s == "." || **s == "..")
        {
            return Err(Error::InvalidArgument(format!(
                "`{bad}` cannot be a path segment (empty, `.` and `..` do not survive URL parsing)"
            )));
        }
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| Error::Config(format!("base URL `{}` cannot have a path", self.base)))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    /// Sends one request, once, and reads its answer.
    pub(crate) async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, reqwest::Error> {
        let mut request = self
            .http
            .request(method, url)
            .header(header::AUTHORIZATION, self.authorization.clone());
        if let Some(body) = body {
            request = request
                .header(header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let mut response = request.send().await?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(retry::parse_retry_after);
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                // Cut off: whatever it is, it is not a Neruba answer; the decode fails.
                body.truncate(0);
                body.extend_from_slice(b"(answer over the client's size limit of 256 MiB)");
                break;
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer {
            status,
            retry_after,
            body,
        })
    }

    /// Sends a credit write until it is answered `202` (decoded as `T`), refused, or out of
    /// attempts. Retrying is safe: a grant's key names one grant, a void or a rule written
    /// twice changes nothing more than once.
    pub(crate) async fn write<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<Vec<u8>>,
        what: &str,
    ) -> Result<T> {
        let url = self.url(segments)?;
        self.call(method, url, body, 202, what).await
    }

    /// Sends a read (`GET` of the route made of `segments`, with the `query` pairs
    /// form-encoded) until it is answered `200` (decoded as `T`), refused, or out of attempts.
    /// A read changes nothing, so every retry is safe; a `503 not_caught_up` (the api waited
    /// for a `min_position` and gave up) is retried like any other `503`, after its
    /// `Retry-After`.
    pub(crate) async fn read<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        query: &[(String, String)],
        what: &str,
    ) -> Result<T> {
        let mut url = self.url(segments)?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        self.call(Method::GET, url, None, 200, what).await
    }

    /// Sends one request until it is answered `expected` (decoded as `T`), refused, or out of
    /// attempts.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
        expected: u16,
        what: &str,
    ) -> Result<T> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let failure = match self.send(method.clone(), url.clone(), body.clone()).await {
                Ok(answer) if answer.status == expected => return answer.decode(what),
                Ok(answer) if retry::is_retryable_status(answer.status) => Failure::answer(&answer),
                Ok(answer) if (200..300).contains(&answer.status) => {
                    return Err(Error::Protocol {
                        status: answer.status,
                        message: format!("{what}: expected {expected}"),
                    });
                }
                Ok(answer) => return Err(answer.refused()),
                Err(e) => Failure::transport(&e),
            };
            self.pause(attempts, failure).await?;
        }
    }

    /// Waits before the next attempt, or gives up with the failure as the error.
    pub(crate) async fn pause(&self, attempts: u32, failure: Failure) -> Result<()> {
        match self
            .retry
            .delay(attempts, failure.retry_after, retry::random_u64())
        {
            Some(wait) => {
                tokio::time::sleep(wait).await;
                Ok(())
            }
            None => Err(failure.into_error(attempts)),
        }
    }
}

/// A transport error with its causes (`reqwest`'s own message alone rarely says which).
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
