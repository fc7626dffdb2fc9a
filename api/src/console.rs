//! The support console, `/console`: one page where finance and support read a customer's
//! statement, usage, balances, grants and line items, ask why a charge is what it is, and
//! grant or void credit.
//!
//! Invariants:
//! - the page is a client of the documented reads (`http.rs`), nothing else: every number it
//!   shows is an answer of `/v1/...` read with the key the person entered, so the console is
//!   no second source of truth and sees exactly what that key may see;
//! - the key is never stored here: the page keeps it in the browser's `sessionStorage` and
//!   sends it as `Authorization: Bearer` on each request; no route of this module reads a key
//!   from a URL or sets a cookie (so there is no ambient credential to forge requests with);
//! - the assets are compiled into the binary (`include_str!` of `api/console/`): no build step,
//!   no CDN, and a Content-Security-Policy that lets the page load and call only its own origin;
//! - credit writes are the gateway's (`POST /v1/customers/{c}/grants`, `.../void`). The page
//!   sends them to `/console/gateway/...`, which forwards them, with the caller's key and body
//!   untouched, to the gateway `--console-gateway-url` names and answers with the gateway's
//!   answer. Forwarding keeps the page on one origin: the key goes to no second origin and
//!   the gateway needs no CORS policy. Without that URL the routes answer
//!   `503 console_writes_unavailable` and the page offers no credit forms.
//!
//! These routes are the console's own (HTML, assets, and a forwarder to documented gateway
//! routes), not part of the documented API, so they live outside the documented router.

use crate::http::PathParams;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use neruba_schemas::LiveCatalog;
use std::time::Duration;

const INDEX_HTML: &str = include_str!("../console/index.html");
const APP_JS: &str = include_str!("../console/app.js");
const STYLE_CSS: &str = include_str!("../console/style.css");

/// Largest credit request body forwarded; the gateway's own limit is the same.
const MAX_FORWARD_BYTES: usize = 64 * 1024;
/// Longest the gateway has to answer a forwarded write.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest a credit request's body may take to arrive once its headers have.
const BODY_DEADLINE: Duration = Duration::from_secs(10);

/// What the console's routes share.
#[derive(Clone)]
pub(crate) struct ConsoleState {
    /// Who a key belongs to (`/console/session`).
    pub(crate) catalog: LiveCatalog,
    /// Where credit writes go; `None`: the console only reads.
    pub(crate) gateway: Option<reqwest::Url>,
    pub(crate) client: reqwest::Client,
    /// [`BODY_DEADLINE`]; shorter in tests.
    pub(crate) body_deadline: Duration,
}

impl ConsoleState {
    /// The state for a gateway base URL (`http://host:port`), checked here so a wrong one
    /// stops the start, not the first grant.
    pub(crate) fn new(catalog: LiveCatalog, gateway: Option<&str>) -> anyhow::Result<Self> {
        let gateway = gateway.map(gateway_url).transpose()?;
        let client = reqwest::Client::builder()
            .timeout(FORWARD_TIMEOUT)
            // A redirect would resend the key and body somewhere the operator did not name.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            catalog,
            gateway,
            client,
            body_deadline: BODY_DEADLINE,
        })
    }
}

/// A gateway base URL, `http(s)://host:port[/prefix]`.
fn gateway_url(text: &str) -> anyhow::Result<reqwest::Url> {
    let url = reqwest::Url::parse(text)
        .map_err(|e| anyhow::anyhow!("console gateway url `{text}`: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
        anyhow::bail!("console gateway url `{text}`: not an http(s) base URL");
    }
    Ok(url)
}

/// The console's routes.
pub(crate) fn router(state: ConsoleState) -> Router {
    Router::new()
        .route("/console", get(index))
        .route("/console/", get(index))
        .route("/console/app.js", get(app_js))
        .route("/console/style.css", get(style_css))
        .route("/console/session", get(session))
        .route(
            "/console/gateway/v1/customers/{customer}/grants",
            post(forward_grant),
        )
        .route(
            "/console/gateway/v1/customers/{customer}/grants/{id}/void",
            post(forward_void),
        )
        .with_state(state)
}

/// Headers of every console page and asset: load and call this origin only, never be framed,
/// send no referrer (the customer id is in the page's fragment only, but be sure).
fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers = [
        (header::CONTENT_TYPE, content_type),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-cache"),
    ];
    (headers, body).into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = serde_json::json!({"error": {"code": code, "message": message.into()}});
    (status, axum::Json(body)).into_response()
}

/// `GET /console/session`: whose key this is and what it may do, so the page shows the
/// tenant and offers only what the key allows. Any scope: a credits key is checked here too.
async fn session(State(state): State<ConsoleState>, headers: HeaderMap) -> Response {
    let Some(key) = neruba_stage::server::bearer_token(&headers) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "send `Authorization: Bearer <api key>`",
        );
    };
    let catalog = state.catalog.current();
    let Some((tenant, api_key)) = catalog.authenticate(key) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "unknown API key",
        );
    };
    let body = serde_json::json!({
        "tenant": tenant.id,
        "key_name": api_key.name,
        "scopes": api_key.scopes,
        "writes": state.gateway.is_some(),
    });
    let mut response = axum::Json(body).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Refuses a customer the gateway would refuse, or one the upstream URL could not carry as
/// given: the URL library drops `.` and `..` segments and strips tabs and newlines, which
/// would send the write to another path or another customer (`acme<TAB>corp` → `acmecorp`).
fn unforwardable_customer(customer: &str) -> Option<Response> {
    let refused = neruba_schemas::credit::check_customer(customer).is_err()
        || customer == "."
        || customer == "..";
    refused.then(|| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_customer",
            "the customer id must be 1–1024 characters without control characters, and not `.` or `..`",
        )
    })
}

async fn forward_grant(
    State(state): State<ConsoleState>,
    PathParams(customer): PathParams<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(refused) = unforwardable_customer(&customer) {
        return refused;
    }
    let body = match read_body(&state, body).await {
        Ok(body) => body,
        Err(refused) => return *refused,
    };
    forward(
        &state,
        &["v1", "customers", &customer, "grants"],
        &headers,
        body,
    )
    .await
}

async fn forward_void(
    State(state): State<ConsoleState>,
    PathParams((customer, id)): PathParams<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(refused) = unforwardable_customer(&customer) {
        return refused;
    }
    if !neruba_schemas::credit::is_grant_id(&id) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_grant_id",
            "a grant id is `gr_` and 32 lowercase hex digits",
        );
    }
    let body = match read_body(&state, body).await {
        Ok(body) => body,
        Err(refused) => return *refused,
    };
    forward(
        &state,
        &["v1", "customers", &customer, "grants", &id, "void"],
        &headers,
        body,
    )
    .await
}

/// A credit request's body, read within the console's deadline and size limit: a client that
/// trickled it would otherwise hold its connection, one of the server's limited number, for as
/// long as it liked (the server's idle timeout does not run while a request is in progress).
/// Past the deadline, `408 body_timeout` and the connection is closed, as the gateway does.
async fn read_body(state: &ConsoleState, body: Body) -> Result<Bytes, Box<Response>> {
    let read = axum::body::to_bytes(body, MAX_FORWARD_BYTES);
    match tokio::time::timeout(state.body_deadline, read).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) if is_too_large(&e) => Err(Box::new(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("a credit request's body is at most {MAX_FORWARD_BYTES} bytes"),
        ))),
        Ok(Err(_)) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "the request body could not be read",
        ))),
        Err(_) => {
            let mut refused = error(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {} s of its headers",
                    state.body_deadline.as_secs()
                ),
            );
            refused
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            Err(Box::new(refused))
        }
    }
}

/// Whether reading a body failed on its size limit.
fn is_too_large(error: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Sends the write to the gateway (path segments re-encoded, so a decoded `/` in a customer
/// id stays inside its segment; the callers refuse the segments the URL library would alter)
/// with the caller's key, content type and body, and answers what the gateway answered, as
/// data (`nosniff`, no active content) whatever type the gateway named.
async fn forward(
    state: &ConsoleState,
    segments: &[&str],
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let Some(base) = &state.gateway else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "console_writes_unavailable",
            "this api was started without --console-gateway-url: the console only reads",
        );
    };
    let mut url = base.clone();
    match url.path_segments_mut() {
        Ok(mut path) => {
            path.pop_if_empty().extend(segments);
        }
        Err(()) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the console gateway url cannot take a path",
            );
        }
    }
    let mut request = state.client.post(url).body(body);
    for name in [header::AUTHORIZATION, header::CONTENT_TYPE] {
        if let Some(value) = headers.get(&name) {
            request = request.header(name, value.clone());
        }
    }
    let answer = match request.send().await {
        Ok(answer) => answer,
        Err(e) => {
            tracing::warn!(error = %e, "The console could not reach the gateway.");
            return error(
                StatusCode::BAD_GATEWAY,
                "gateway_unreachable",
                "the gateway did not answer; nothing is known to be written, send it again",
            );
        }
    };
    let status = answer.status();
    let kept: Vec<(HeaderName, HeaderValue)> = [header::CONTENT_TYPE, header::RETRY_AFTER]
        .into_iter()
        .filter_map(|name| answer.headers().get(&name).cloned().map(|v| (name, v)))
        .collect();
    match answer.bytes().await {
        Ok(bytes) => {
            let mut response = (status, bytes).into_response();
            response.headers_mut().extend(kept);
            response.headers_mut().insert(
                HeaderName::from_static("x-content-type-options"),
                HeaderValue::from_static("nosniff"),
            );
            response.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("default-src 'none'"),
            );
            response
        }
        Err(e) => {
            tracing::warn!(error = %e, "The gateway's answer to a console write broke off.");
            error(
                StatusCode::BAD_GATEWAY,
                "gateway_unreachable",
                "the gateway's answer broke off: the write may have been taken; send it again \
                 with the same key",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path segment that is not UTF-8 once decoded gets the api's JSON refusal, as every
    /// read route gives it. Was: axum's plain-text 400, which the page could not show.
    #[tokio::test]
    async fn a_customer_that_is_not_utf8_is_refused_in_json() -> anyhow::Result<()> {
        use tower_service::Service;
        let catalog =
            neruba_schemas::Catalog::from_toml_str("[[tenants]]\nid = \"acme\"\n", "test.toml")?;
        let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let state =
            ConsoleState::new(LiveCatalog::new(catalog), Some(&format!("http://{closed}")))?;
        let mut console = router(state);
        for path in [
            "/console/gateway/v1/customers/%FF/grants",
            "/console/gateway/v1/customers/%FF/grants/gr_00000000000000000000000000000000/void",
        ] {
            let request = axum::http::Request::post(path)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("{}"))?;
            let response = console.call(request).await?;
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), 1 << 20).await?;
            let code = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
            assert_eq!(
                (status, code.as_deref()),
                (StatusCode::BAD_REQUEST, Some("invalid_path")),
                "{path}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(())
    }

    /// A credit request's body that trickles gets `408 body_timeout` at the deadline and one
    /// over the limit `413 body_too_large`; a whole body within both is forwarded (here to a
    /// gateway that is not there: `502 gateway_unreachable`).
    #[tokio::test]
    async fn a_credit_body_is_read_within_its_deadline_and_limit() -> anyhow::Result<()> {
        use futures::StreamExt;
        use tower_service::Service;
        let catalog =
            neruba_schemas::Catalog::from_toml_str("[[tenants]]\nid = \"acme\"\n", "test.toml")?;
        // A port nothing listens on.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut state =
            ConsoleState::new(LiveCatalog::new(catalog), Some(&format!("http://{closed}")))?;
        state.body_deadline = Duration::from_millis(200);
        let mut console = router(state);
        let mut answer = async |body: Body| -> anyhow::Result<(StatusCode, String, bool)> {
            let request = axum::http::Request::post("/console/gateway/v1/customers/c-7/grants")
                .header(header::CONTENT_TYPE, "application/json")
                .body(body)?;
            let response = console.call(request).await?;
            let status = response.status();
            let closes = response.headers().get(header::CONNECTION)
                == Some(&HeaderValue::from_static("close"));
            let body = axum::body::to_bytes(response.into_body(), 1 << 20).await?;
            let body: serde_json::Value = serde_json::from_slice(&body)?;
            let code = body["error"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            Ok((status, code, closes))
        };
        let first_byte = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"{"))]);
        let trickled = Body::from_stream(first_byte.chain(futures::stream::pending()));
        let started = std::time::Instant::now();
        assert_eq!(
            answer(trickled).await?,
            (StatusCode::REQUEST_TIMEOUT, "body_timeout".to_owned(), true)
        );
        assert!(started.elapsed() >= Duration::from_millis(200));
        let too_large = Body::from(vec![b' '; MAX_FORWARD_BYTES + 1]);
        assert_eq!(
            answer(too_large).await?,
            (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large".to_owned(),
                false
            )
        );
        let whole = Body::from(vec![b' '; MAX_FORWARD_BYTES]);
        assert_eq!(
            answer(whole).await?,
            (
                StatusCode::BAD_GATEWAY,
                "gateway_unreachable".to_owned(),
                false
            )
        );
        Ok(())
    }

    #[test]
    fn a_gateway_url_must_be_an_http_base() {
        assert!(gateway_url("http://127.0.0.1:8080").is_ok());
        assert!(gateway_url("https://gw.example/prefix/").is_ok());
        assert!(gateway_url("mailto:x@y").is_err());
        assert!(gateway_url("127.0.0.1:8080").is_err());
    }

    #[test]
    fn segments_the_upstream_url_would_alter_are_refused() {
        for customer in ["acme\tcorp", ".", "..", "a\nb", ""] {
            assert!(
                unforwardable_customer(customer).is_some(),
                "{customer:?} must be refused"
            );
        }
        for customer in ["customer-7", "a/b", "a%2Fb", "...", "ü"] {
            assert!(
                unforwardable_customer(customer).is_none(),
                "{customer:?} is forwarded"
            );
        }
    }

    #[test]
    fn the_assets_name_each_other() {
        assert!(INDEX_HTML.contains("/console/app.js"));
        assert!(INDEX_HTML.contains("/console/style.css"));
        assert!(APP_JS.contains("sessionStorage"));
        assert!(!APP_JS.contains("localStorage."));
        assert!(!APP_JS.contains("document.cookie"));
        assert!(!APP_JS.contains("innerHTML"));
    }
}
