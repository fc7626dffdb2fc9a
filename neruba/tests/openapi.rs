//! The OpenAPI document (`schemas/openapi.json`, [`neruba_schemas::OPENAPI`], served at
//! `GET /v1/openapi.json`) checked against the code, so that neither drifts from the other:
//! 1. routes: the `(method, path)` of every `.route(…)` of the gateway's and the api's routers
//!    (health and metrics aside) is an operation of the document, served by the server(s) the
//!    operation names, and every operation is such a route;
//! 2. parameters: every documented read refuses a query parameter the document does not name
//!    (`400 unknown_parameter`) and answers `200` to one naming every parameter it documents;
//! 3. statuses and bodies: every operation is driven through `neruba dev` on a happy path and on
//!    documented errors; each answer's status must be documented for the operation, its content
//!    type one that status documents, its required headers present, and its body valid against
//!    the documented schema (JSON Schema 2020-12: response objects are closed with
//!    `additionalProperties: false` and list what the code always sends as `required`, so a
//!    field on one side only fails);
//! 4. both servers serve the document byte for byte;
//! 5. openapi-spec-validator (PyPI, installed by `scripts/prereqs.sh`) finds it a valid
//!    OpenAPI 3.1 document.

mod common;

use anyhow::{Context, Result, anyhow, bail, ensure};
use common::start_dev;
use neruba::sample;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The routers' sources: the routes are read from the code itself.
const GATEWAY_ROUTER: &str = include_str!("../../ingest-gateway/src/http.rs");
const API_ROUTER: &str = include_str!("../../api/src/http.rs");
/// Operations endpoints (probes, Prometheus), not part of the client API: not documented.
const NOT_DOCUMENTED: [&str; 3] = ["/healthz", "/readyz", "/metrics"];
/// axum's method routers, which are also OpenAPI's operation keys.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

fn document() -> Value {
    serde_json::from_str(neruba_schemas::OPENAPI).expect("schemas/openapi.json is JSON")
}

/// `(METHOD, path)` of every `.route("<path>", <method>(…)[.<method>(…)]…)` in `source`.
fn routes(source: &str) -> Result<BTreeSet<(String, String)>> {
    // A comment may quote code; it routes nothing.
    let code: Vec<&str> = source
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect();
    let code = code.join("\n");
    for hidden in [
        ".nest(",
        ".merge(",
        ".route_service(",
        ".nest_service(",
        ".fallback(",
    ] {
        ensure!(
            !code.contains(hidden),
            "a router uses `{hidden}`, whose routes this scan does not read: teach it"
        );
    }
    let mut found = BTreeSet::new();
    for (at, call) in code.match_indices(".route(") {
        let rest = code.get(at + call.len()..).unwrap_or_default();
        let (path, methods) = route_call(rest).with_context(|| {
            format!(
                "cannot read the route call `.route({}…`",
                rest.chars().take(80).collect::<String>()
            )
        })?;
        ensure!(
            !methods.is_empty(),
            "no method router in the route of {path}"
        );
        for method in methods {
            found.insert((method.to_uppercase(), path.clone()));
        }
    }
    Ok(found)
}

/// The path and the method routers of one `.route(` call; `text` starts after its `(`.
/// Method routers are the calls at the argument list's own depth (`put(a).delete(b)`); what
/// they are given (handlers, closures, strings) is skipped.
fn route_call(text: &str) -> Option<(String, Vec<String>)> {
    let text = text.trim_start().strip_prefix('"')?;
    let end = text.find('"')?;
    let path = text.get(..end)?.to_owned();
    let chars: Vec<char> = text.get(end + 1..)?.chars().collect();
    let mut methods = Vec::new();
    let mut depth = 1;
    let mut i = 0;
    while depth > 0 {
        match *chars.get(i)? {
            '"' => {
                i += 1;
                while *chars.get(i)? != '"' {
                    if *chars.get(i)? == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            '(' => depth += 1,
            ')' => depth -= 1,
            c if depth == 1 && (c.is_ascii_alphabetic() || c == '_') => {
                let start = i;
                while chars
                    .get(i + 1)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
                {
                    i += 1;
                }
                let word: String = chars.get(start..=i)?.iter().collect();
                let next = chars.get(i + 1..)?.iter().find(|c| !c.is_whitespace());
                if next == Some(&'(') && METHODS.contains(&word.as_str()) {
                    methods.push(word);
                }
            }
            _ => {}
        }
        i += 1;
    }
    Some((path, methods))
}

/// `(METHOD, path)` of every operation of the document.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut found = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for method in METHODS {
            if item.get(method).is_some() {
                found.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    found
}

/// Which server (`gateway`, `api`) serves each routed operation, from the routers' sources.
fn served_by() -> Result<BTreeMap<(String, String), BTreeSet<&'static str>>> {
    let mut served: BTreeMap<(String, String), BTreeSet<&'static str>> = BTreeMap::new();
    for (server, source) in [("gateway", GATEWAY_ROUTER), ("api", API_ROUTER)] {
        for route in routes(source)? {
            if !NOT_DOCUMENTED.contains(&route.1.as_str()) {
                served.entry(route).or_default().insert(server);
            }
        }
    }
    Ok(served)
}

#[test]
fn every_route_is_documented_and_every_operation_is_a_route() -> Result<()> {
    let doc = document();
    let served = served_by()?;
    let routed: BTreeSet<(String, String)> = served.keys().cloned().collect();
    let documented = operations(&doc);
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    if !undocumented.is_empty() || !unrouted.is_empty() {
        bail!(
            "the routers and schemas/openapi.json disagree\n  routed, not documented: \
             {undocumented:?}\n  documented, not routed: {unrouted:?}"
        );
    }
    // Each operation names the server(s) that serve it (by the servers' descriptions).
    for ((method, path), servers) in &served {
        let op = &doc["paths"][path][method.to_lowercase()];
        let named: BTreeSet<&str> = op["servers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["description"].as_str())
            .filter_map(|d| ["gateway", "api"].into_iter().find(|n| d.starts_with(n)))
            .collect();
        ensure!(
            &named == servers,
            "{method} {path} is served by {servers:?}, the document names {named:?}"
        );
    }
    Ok(())
}

#[test]
fn the_route_scan_reads_multi_line_and_chained_routes() -> Result<()> {
    let source = r#"
        Router::new()
            // .route("/commented", get(nothing))
            .route("/a", get(|| async { "ok (not a call)\n" }))
            .route(
                "/b/{id}",
                put(handlers::put_b).delete(handlers::delete_b),
            )
            .route("/c", axum::routing::post(post_c).get(get_c))
    "#;
    let expected: BTreeSet<(String, String)> = [
        ("GET", "/a"),
        ("PUT", "/b/{id}"),
        ("DELETE", "/b/{id}"),
        ("POST", "/c"),
        ("GET", "/c"),
    ]
    .into_iter()
    .map(|(m, p)| (m.to_owned(), p.to_owned()))
    .collect();
    assert_eq!(routes(source)?, expected);
    Ok(())
}

/// How to run openapi-spec-validator: the virtualenv `scripts/prereqs.sh` fills, else a
/// `python3` that has it.
fn spec_validator() -> Result<Command> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let venv = PathBuf::from(home).join(".cache/neruba-tools/venv-openapi/bin/python");
    let python = if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    };
    let present = Command::new(&python)
        .args(["-c", "import openapi_spec_validator"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        bail!(
            "openapi-spec-validator is not installed (neither in ~/.cache/neruba-tools/venv-openapi \
             nor for python3): run ./scripts/prereqs.sh, which installs it"
        );
    }
    let mut command = Command::new(python);
    command.args(["-m", "openapi_spec_validator"]);
    Ok(command)
}

/// The document's spelling of a decimal a client sends (`DecimalInput`) is the parser's: was
/// stricter (`"1."`, `".5"` and `" 12 "` are read, the pattern refused them).
#[test]
fn the_documented_decimal_spelling_is_what_the_parser_reads() -> Result<()> {
    let doc = document();
    let root = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "components": {"schemas": doc["components"]["schemas"]},
        "$ref": "#/components/schemas/DecimalInput",
    });
    let validator = jsonschema::draft202012::new(&root)
        .map_err(|e| anyhow!("DecimalInput does not compile: {e}"))?;
    let read = [
        "1", "1.", ".5", " 12 ", "-1.5E-3", "+2e+3", "1.e2", "0.10", "007",
    ];
    let refused = [
        "1_000", ".", "+", "e5", "1e", "1..2", "0x10", "1,5", "", "1 2", "--1", "1e+",
    ];
    for text in read {
        let parsed = neruba_schemas::decimal::parse_exact(text);
        ensure!(parsed.is_some(), "the parser refuses {text:?}");
        ensure!(
            validator.is_valid(&json!(text)),
            "the document refuses {text:?}"
        );
    }
    for text in refused {
        let parsed = neruba_schemas::decimal::parse_exact(text);
        ensure!(parsed.is_none(), "the parser reads {text:?} as {parsed:?}");
        ensure!(
            !validator.is_valid(&json!(text)),
            "the document reads {text:?}"
        );
    }
    Ok(())
}

#[test]
fn the_document_is_valid_openapi_3_1() -> Result<()> {
    let file = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../schemas/openapi.json"
    ));
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    let output = spec_validator()?
        .arg(file)
        .output()
        .context("run openapi-spec-validator")?;
    assert!(
        output.status.success(),
        "openapi-spec-validator refuses schemas/openapi.json:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// An HTTP answer: status, headers (lower-case names) and body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Answer {
    fn media_type(&self) -> Option<String> {
        self.headers
            .get("content-type")
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A request of a documented operation: `template` is its documented path, `target` the path
/// and query sent.
#[derive(Debug, Clone)]
struct Call {
    method: String,
    template: String,
    target: String,
    key: Option<String>,
    headers: Vec<(&'static str, String)>,
    body: Option<Vec<u8>>,
}

impl Call {
    fn new(method: &str, template: &str, target: impl Into<String>) -> Self {
        Self {
            method: method.to_owned(),
            template: template.to_owned(),
            target: target.into(),
            key: None,
            headers: Vec::new(),
            body: None,
        }
    }

    fn key(mut self, key: &str) -> Self {
        self.key = Some(key.to_owned());
        self
    }

    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }

    fn body(self, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        let mut call = self.header("content-type", content_type);
        call.body = Some(body.into());
        call
    }

    fn json(self, body: &Value) -> Self {
        self.body("application/json", body.to_string())
    }
}

/// The document, the servers, and which statuses each operation was seen answering.
struct Harness {
    doc: Value,
    client: reqwest::Client,
    gateway: String,
    api: String,
    served: BTreeMap<(String, String), BTreeSet<&'static str>>,
    /// `(METHOD, path template)` → statuses answered and judged.
    seen: BTreeMap<(String, String), BTreeSet<u16>>,
}

impl Harness {
    fn base(&self, call: &Call) -> Result<&str> {
        let servers = self
            .served
            .get(&(call.method.clone(), call.template.clone()))
            .with_context(|| format!("{} {} is not routed", call.method, call.template))?;
        Ok(if servers.contains("gateway") {
            &self.gateway
        } else {
            &self.api
        })
    }

    async fn send(&self, base: &str, call: &Call) -> Result<Answer> {
        let method = reqwest::Method::from_bytes(call.method.as_bytes())?;
        let mut request = self
            .client
            .request(method, format!("{base}{}", call.target));
        if let Some(key) = &call.key {
            request = request.bearer_auth(key);
        }
        for (name, value) in &call.headers {
            request = request.header(*name, value);
        }
        if let Some(body) = &call.body {
            request = request.body(body.clone());
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{} {}", call.method, call.target))?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    value.to_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let body = response.bytes().await?.to_vec();
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    /// Sends `call`, expects `status` (and the error `code`, if given), and judges the answer
    /// against the document; the body, parsed.
    async fn expect(&mut self, call: Call, status: u16, code: Option<&str>) -> Result<Value> {
        let answer = self.send(self.base(&call)?, &call).await?;
        ensure!(
            answer.status == status,
            "{} {}: expected {status}, got {}: {}",
            call.method,
            call.target,
            answer.status,
            answer.text()
        );
        let body = self.judge(&call.method, &call.template, &answer)?;
        if let Some(code) = code {
            ensure!(
                body["error"]["code"] == code,
                "{} {}: expected code {code}: {body}",
                call.method,
                call.target
            );
        }
        Ok(body)
    }

    /// Sends `call` until it is answered `wanted` (at most `tries` times), judging every answer
    /// (each must be one of `allowed`).
    async fn until(
        &mut self,
        call: Call,
        wanted: u16,
        allowed: &[u16],
        tries: usize,
    ) -> Result<Value> {
        for _ in 0..tries {
            let answer = self.send(self.base(&call)?, &call).await?;
            ensure!(
                answer.status == wanted || allowed.contains(&answer.status),
                "{} {}: expected {wanted} or {allowed:?}, got {}: {}",
                call.method,
                call.target,
                answer.status,
                answer.text()
            );
            let body = self.judge(&call.method, &call.template, &answer)?;
            if answer.status == wanted {
                return Ok(body);
            }
        }
        bail!(
            "{} {} was never answered {wanted} in {tries} tries",
            call.method,
            call.target
        )
    }

    /// `#/components/…/X` followed, if `value` is a reference.
    fn resolve<'v>(&'v self, value: &'v Value) -> Result<&'v Value> {
        match value.get("$ref").and_then(Value::as_str) {
            None => Ok(value),
            Some(reference) => {
                let pointer = reference
                    .strip_prefix('#')
                    .with_context(|| format!("not a local reference: {reference}"))?;
                self.doc
                    .pointer(pointer)
                    .with_context(|| format!("dangling reference {reference}"))
            }
        }
    }

    /// The answer against what the document says `method path` answers: the status is listed,
    /// required headers are there, the content type is one the status documents and the body
    /// is valid against its schema. The body, parsed (a string unless JSON).
    fn judge(&mut self, method: &str, template: &str, answer: &Answer) -> Result<Value> {
        let what = format!("{method} {template} → {}", answer.status);
        let op = &self.doc["paths"][template][method.to_lowercase()];
        ensure!(op.is_object(), "{method} {template} is not documented");
        let response = op["responses"]
            .get(answer.status.to_string())
            .with_context(|| {
                format!(
                    "{what}: the document does not list this status for the operation: {}",
                    answer.text()
                )
            })?;
        let response = self.resolve(response)?;
        for (name, header) in response["headers"].as_object().into_iter().flatten() {
            let header = self.resolve(header)?;
            if header["required"] == true {
                ensure!(
                    answer.headers.contains_key(&name.to_ascii_lowercase()),
                    "{what}: no `{name}` header, which the document says is always sent"
                );
            }
        }
        let Some(content) = response["content"].as_object() else {
            ensure!(
                answer.body.is_empty(),
                "{what}: a body the document does not describe: {}",
                answer.text()
            );
            return Ok(Value::Null);
        };
        let media = answer
            .media_type()
            .with_context(|| format!("{what}: no content type"))?;
        let documented = content.get(&media).with_context(|| {
            format!(
                "{what}: content type {media} is not documented (only {:?})",
                content.keys().collect::<Vec<_>>()
            )
        })?;
        let body = if media == "application/json" {
            serde_json::from_slice(&answer.body)
                .with_context(|| format!("{what}: not JSON: {}", answer.text()))?
        } else {
            Value::String(answer.text())
        };
        self.validate(&documented["schema"], &body)
            .with_context(|| format!("{what}: the body is not what the document says"))?;
        self.seen
            .entry((method.to_owned(), template.to_owned()))
            .or_default()
            .insert(answer.status);
        Ok(body)
    }

    /// `instance` against `schema`, whose `#/components/schemas/…` references resolve to the
    /// document's components (embedded in the validated schema).
    fn validate(&self, schema: &Value, instance: &Value) -> Result<()> {
        let root = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "components": {"schemas": self.doc["components"]["schemas"]},
            "allOf": [schema],
        });
        let validator = jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&root)
            .map_err(|e| anyhow!("the documented schema does not compile: {e}"))?;
        let errors: Vec<String> = validator
            .iter_errors(instance)
            .map(|e| format!("{e} (at `{}`)", e.instance_path()))
            .collect();
        ensure!(
            errors.is_empty(),
            "{}\n  body: {instance}",
            errors.join("\n  ")
        );
        Ok(())
    }
}

/// Percent-encodes a query name or value (everything but RFC 3986's unreserved characters).
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn query(pairs: &[(&str, &str)]) -> String {
    let joined: Vec<String> = pairs
        .iter()
        .map(|(name, value)| format!("{}={}", encode(name), encode(value)))
        .collect();
    format!("?{}", joined.join("&"))
}

/// `template` with each `{name}` replaced by `values[name]`.
fn fill(template: &str, values: &BTreeMap<&str, String>) -> Result<String> {
    let mut path = template.to_owned();
    for (name, value) in values {
        path = path.replace(&format!("{{{name}}}"), value);
    }
    ensure!(
        !path.contains('{'),
        "no sample value for a parameter of {template}: add one"
    );
    Ok(path)
}

/// `<topic>:<partition>:<offset>` of a write's `position`.
fn min_position(position: &Value) -> Result<String> {
    Ok(format!(
        "{}:{}:{}",
        position["topic"].as_str().context("topic")?,
        position["partition"],
        position["offset"]
    ))
}

/// A POST whose body never finishes: the server gives up after the body timeout. Sent over a
/// bare socket (a client library would not stall), the answer read until the server closes.
async fn stalled_upload(base: &str, method: &str, path: &str, key: &str) -> Result<Answer> {
    let host = base
        .strip_prefix("http://")
        .context("an http:// base")?
        .to_owned();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"id\":"
    );
    let raw = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
        let mut stream = std::net::TcpStream::connect(&host)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.write_all(head.as_bytes())?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .context("no answer to a stalled upload within 30 s")?;
        Ok(raw)
    })
    .await??;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of the answer's head")?;
    let head = String::from_utf8_lossy(raw.get(..split).unwrap_or_default()).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    ensure!(
        !headers.contains_key("transfer-encoding"),
        "a chunked answer: {head}"
    );
    let mut body = raw.get(split + 4..).unwrap_or_default().to_vec();
    if let Some(length) = headers.get("content-length").and_then(|l| l.parse().ok()) {
        body.truncate(length);
    }
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// A valid value for each documented query parameter (a parameter without one fails the test:
/// add it here).
fn sample_value(name: &str, context: &BTreeMap<&str, String>) -> Option<String> {
    if let Some(value) = context.get(name) {
        return Some(value.clone());
    }
    let fixed = match name {
        "limit" => "10",
        // `0/g{}`: after the customer id `0/g{}`, or (usage) after the group `{}` of the
        // bucket starting at 0 ms: from the first of each.
        "cursor" => "302f677b7d",
        "after" => "0",
        "meter" => "llm_tokens",
        "window" => "hour",
        "group_by" => "model",
        _ => return context.get(name).cloned(),
    };
    Some(fixed.to_owned())
}

fn key(tenant: &str, scope: &str) -> Result<&'static str> {
    sample::dev_key(tenant, scope).with_context(|| format!("{tenant} {scope} key"))
}

/// Polls `call` (judged only at the end, by the caller) until `ready` holds for its JSON body.
async fn wait_for(
    h: &Harness,
    call: &Call,
    ready: impl Fn(&Value) -> bool,
    what: &str,
) -> Result<()> {
    let started = Instant::now();
    loop {
        let answer = h.send(h.base(call)?, call).await?;
        if answer.status == 200
            && serde_json::from_slice::<Value>(&answer.body).is_ok_and(|body| ready(&body))
        {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("{what} never came: {} {}", answer.status, answer.text());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn non_empty(body: &Value, field: &str) -> Result<()> {
    ensure!(
        body[field].as_array().is_some_and(|a| !a.is_empty()),
        "`{field}` is empty, so its items' schema was not exercised: {body}"
    );
    Ok(())
}

const EVENTS: &str = "/v1/events";
const GRANTS: &str = "/v1/customers/{customer}/grants";
const GRANT: &str = "/v1/customers/{customer}/grants/{id}";
const VOID: &str = "/v1/customers/{customer}/grants/{id}/void";
const RULE: &str = "/v1/customers/{customer}/balance-rules/{currency}";
const CUSTOMERS: &str = "/v1/customers";
const BALANCES: &str = "/v1/customers/{customer}/balances";
const ENTRIES: &str = "/v1/customers/{customer}/balance-entries";
const STATEMENTS: &str = "/v1/customers/{customer}/statements/{period}";
const LINE_ITEMS: &str = "/v1/customers/{customer}/line-items";
const EXPLANATION: &str = "/v1/customers/{customer}/line-items/{item}/explanation";
const USAGE: &str = "/v1/usage";
const OPENAPI: &str = "/v1/openapi.json";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_answers_as_documented() -> Result<()> {
    let work = tempfile::tempdir()?;
    // Small limits so that 413, 429 and 408 are cheap to provoke: batches of at most 5 events;
    // tenants without a catalog rate limit (globex) get 1 event/s in bursts of 5; a body must
    // arrive within 2 s; a read waits 1 s for its position.
    let (mut pipeline, gateway, api) = start_dev(
        work.path(),
        &[
            "--max-batch-events",
            "5",
            "--default-rate-limit",
            "1",
            "--default-rate-burst",
            "5",
            "--http-body-timeout",
            "2s",
            "--api-read-wait",
            "1s",
        ],
    )
    .await?;
    let mut h = Harness {
        doc: document(),
        client: reqwest::Client::new(),
        gateway: gateway.clone(),
        api: api.clone(),
        served: served_by()?,
        seen: BTreeMap::new(),
    };
    let ingest = key("acme", "ingest")?;
    let credits = key("acme", "credits")?;
    let read = key("acme", "read")?;
    let now = neruba_schemas::event::now_ms();
    let time = neruba_schemas::event::format_time_ms(now - 3 * 60_000);
    let period = time.get(..7).context("month")?.to_owned();

    // 1. The document, as it is, from both servers, without a key.
    for base in [&gateway, &api] {
        let answer = h.send(base, &Call::new("GET", OPENAPI, OPENAPI)).await?;
        assert_eq!(answer.status, 200, "{base}{OPENAPI}");
        assert_eq!(answer.media_type().as_deref(), Some("application/json"));
        assert!(
            answer.body == neruba_schemas::OPENAPI.as_bytes(),
            "{base}{OPENAPI} is not neruba_schemas::OPENAPI"
        );
        h.judge("GET", OPENAPI, &answer)?;
    }

    // 2. Grants: one to draw on, one to void; then refusals.
    let grants = "/v1/customers/customer-7/grants";
    let grant = h
        .expect(
            Call::new("POST", GRANTS, grants).key(credits).json(&json!({
                "key": "openapi-pack", "amount": "5", "currency": "USD", "priority": 5,
                "effective_at": "2026-01-01T00:00:00Z", "expires_at": "2099-01-01T00:00:00+01:00",
                "paid": {"amount": "4.50", "currency": "USD"}, "metadata": {"order": "o-1"}})),
            202,
            None,
        )
        .await?;
    let grant_id = grant["id"].as_str().context("grant id")?.to_owned();
    let voided = h
        .expect(
            Call::new("POST", GRANTS, grants)
                .key(credits)
                .json(&json!({"key": "openapi-void", "amount": 1, "currency": "USD"})),
            202,
            None,
        )
        .await?;
    let voided = voided["id"].as_str().context("grant id")?.to_owned();
    for (call, status, code) in [
        (
            Call::new("POST", GRANTS, grants)
                .key(credits)
                .json(&json!({"amount": "1", "currency": "USD"})),
            422,
            "missing_key",
        ),
        (
            Call::new("POST", GRANTS, "/v1/customers/%01/grants")
                .key(credits)
                .json(&json!({"key": "k", "amount": "1", "currency": "USD"})),
            422,
            "invalid_customer",
        ),
        (
            Call::new("POST", GRANTS, grants)
                .key(credits)
                .json(&json!({"key": "k", "colour": "red"})),
            400,
            "invalid_body",
        ),
        (
            Call::new("POST", GRANTS, grants)
                .key(credits)
                .body("text/plain", "key=k"),
            415,
            "unsupported_media_type",
        ),
    ] {
        h.expect(call, status, Some(code)).await?;
    }

    // 3. A void, and refusals.
    let void = format!("/v1/customers/customer-7/grants/{voided}/void");
    h.expect(Call::new("POST", VOID, &void).key(credits), 202, None)
        .await?;
    for (call, status, code) in [
        (
            Call::new("POST", VOID, "/v1/customers/customer-7/grants/nope/void").key(credits),
            422,
            "invalid_grant_id",
        ),
        (
            Call::new("POST", VOID, &void)
                .key(credits)
                .json(&json!({"reason": "x"})),
            400,
            "invalid_body",
        ),
        (
            Call::new("POST", VOID, &void)
                .key(credits)
                .header("content-encoding", "br")
                .body("application/json", "{}"),
            415,
            "unsupported_encoding",
        ),
    ] {
        h.expect(call, status, Some(code)).await?;
    }

    // 4. Balance rules: one kept (the balance is already below it: an alert at once), one
    //    set and removed; refusals.
    let rule = h
        .expect(
            Call::new("PUT", RULE, "/v1/customers/customer-7/balance-rules/USD")
                .key(credits)
                .json(&json!({"low_balance_threshold": "10", "recharge_to": "20.00"})),
            202,
            None,
        )
        .await?;
    let position = min_position(&rule["position"])?;
    let credits_rule = "/v1/customers/customer-7/balance-rules/credits";
    h.expect(
        Call::new("PUT", RULE, credits_rule)
            .key(credits)
            .json(&json!({"low_balance_threshold": 1})),
        202,
        None,
    )
    .await?;
    h.expect(
        Call::new("DELETE", RULE, credits_rule).key(credits),
        202,
        None,
    )
    .await?;
    for (call, status, code) in [
        (
            Call::new("PUT", RULE, credits_rule)
                .key(credits)
                .json(&json!({"low_balance_threshold": "-1"})),
            422,
            "invalid_threshold",
        ),
        (
            Call::new("PUT", RULE, credits_rule)
                .key(credits)
                .json(&json!({"low_balance_threshold": "10", "recharge_to": "5"})),
            422,
            "invalid_recharge",
        ),
        (
            Call::new("PUT", RULE, "/v1/customers/customer-7/balance-rules/NOPE")
                .key(credits)
                .json(&json!({"low_balance_threshold": "1"})),
            422,
            "unknown_currency",
        ),
        (
            Call::new("PUT", RULE, credits_rule)
                .key(credits)
                .body("text/plain", "1"),
            415,
            "unsupported_media_type",
        ),
        (
            Call::new(
                "DELETE",
                RULE,
                "/v1/customers/customer-7/balance-rules/NOPE",
            )
            .key(credits),
            422,
            "unknown_currency",
        ),
        (
            Call::new("DELETE", RULE, credits_rule)
                .key(credits)
                .json(&json!({"now": true})),
            400,
            "invalid_body",
        ),
        (
            Call::new("DELETE", RULE, credits_rule)
                .key(credits)
                .header("content-encoding", "br"),
            415,
            "unsupported_encoding",
        ),
        (
            Call::new("PUT", RULE, credits_rule)
                .key(credits)
                .json(&json!({"low_balance_threshold": "1", "colour": "red"})),
            400,
            "invalid_body",
        ),
    ] {
        h.expect(call, status, Some(code)).await?;
    }

    // 5. Events: a batch, the same event again as NDJSON (a duplicate), refusals.
    let event = |id: &str, tokens: u32| {
        json!({"specversion": "1.0", "id": id, "type": "llm.completion",
               "subject": "customer-7", "source": "openapi-test", "time": time,
               "data": {"model": "large", "tokens": tokens, "status": "ok"}})
    };
    let batch = json!([event("openapi-1", 1200), event("openapi-2", 23_800)]);
    let sent = h
        .expect(
            Call::new("POST", EVENTS, EVENTS)
                .key(ingest)
                .body("application/cloudevents-batch+json", batch.to_string()),
            200,
            None,
        )
        .await?;
    assert_eq!(sent["accepted"], 2, "{sent}");
    let again = h
        .expect(
            Call::new("POST", EVENTS, EVENTS).key(ingest).body(
                "application/x-ndjson",
                format!("{}\n", event("openapi-1", 1200)),
            ),
            200,
            None,
        )
        .await?;
    assert_eq!(again["duplicate"], 1, "{again}");
    let rejected = h
        .expect(
            Call::new("POST", EVENTS, EVENTS).key(ingest).body(
                "application/cloudevents+json",
                json!({"id": "openapi-3", "type": "llm.completion"}).to_string(),
            ),
            422,
            None,
        )
        .await?;
    assert_eq!(
        rejected["results"][0]["code"], "missing_field",
        "{rejected}"
    );
    for (call, status, code) in [
        (
            Call::new("POST", EVENTS, EVENTS)
                .key(ingest)
                .body("application/json", "{"),
            400,
            "invalid_body",
        ),
        (
            Call::new("POST", EVENTS, EVENTS)
                .key(ingest)
                .body("application/json", "[{},{},{},{},{},{}]"),
            413,
            "too_many_events",
        ),
        (
            Call::new("POST", EVENTS, EVENTS)
                .key(ingest)
                .body("text/plain", "hello"),
            415,
            "unsupported_media_type",
        ),
    ] {
        h.expect(call, status, Some(code)).await?;
    }

    // 6. Over the rate limit (globex: the gateway's default, 5 events, then 1/s).
    let globex_events: Vec<Value> = (0..5)
        .map(|i| {
            json!({"id": format!("openapi-rate-{i}-{now}"), "type": "storage.usage",
                   "subject": "openapi-rate", "data": {"gb_hours": 1, "region": "eu"}})
        })
        .collect();
    h.until(
        Call::new("POST", EVENTS, EVENTS)
            .key(key("globex", "ingest")?)
            .json(&Value::Array(globex_events)),
        429,
        &[200],
        5,
    )
    .await?;

    // 7. A body that stops arriving: 408 after the body timeout.
    let answer = stalled_upload(&gateway, "POST", EVENTS, ingest).await?;
    assert_eq!(answer.status, 408, "{}", answer.text());
    h.judge("POST", EVENTS, &answer)?;

    // 8. The reads, once the events are priced and their windows' usage is kept.
    let mut path_values: BTreeMap<&str, String> = [
        ("customer", "customer-7".to_owned()),
        ("id", grant_id.clone()),
        ("period", period.clone()),
        ("currency", "USD".to_owned()),
    ]
    .into_iter()
    .collect();
    let from = neruba_schemas::event::format_time_ms(now - 2 * 3_600_000);
    let to = neruba_schemas::event::format_time_ms(now + 3_600_000);
    let items = format!("/v1/customers/customer-7/line-items?period={period}");
    wait_for(
        &h,
        &Call::new("GET", LINE_ITEMS, &items).key(read),
        |body| body["items"].as_array().is_some_and(|i| !i.is_empty()),
        "customer-7's line items",
    )
    .await?;
    let usage = format!(
        "/v1/usage{}",
        query(&[
            ("customer", "customer-7"),
            ("meter", "llm_tokens"),
            ("from", &from),
            ("to", &to)
        ])
    );
    wait_for(
        &h,
        &Call::new("GET", USAGE, &usage).key(read),
        |body| body["data"].as_array().is_some_and(|d| !d.is_empty()),
        "customer-7's usage",
    )
    .await?;

    let at = query(&[("min_position", &position)]);
    let customer = |rest: &str| format!("/v1/customers/customer-7{rest}");
    let body = h
        .expect(Call::new("GET", CUSTOMERS, CUSTOMERS).key(read), 200, None)
        .await?;
    non_empty(&body, "customers")?;
    let body = h
        .expect(
            Call::new("GET", BALANCES, customer(&format!("/balances{at}"))).key(read),
            200,
            None,
        )
        .await?;
    non_empty(&body, "balances")?;
    ensure!(
        body["balances"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|b| b["rule"].is_object()),
        "no balance with its rule: {body}"
    );
    let body = h
        .expect(
            Call::new("GET", GRANTS, customer(&format!("/grants{at}"))).key(read),
            200,
            None,
        )
        .await?;
    non_empty(&body, "grants")?;
    h.expect(
        Call::new("GET", GRANT, customer(&format!("/grants/{grant_id}"))).key(read),
        200,
        None,
    )
    .await?;
    let body = h
        .expect(
            Call::new("GET", ENTRIES, customer(&format!("/balance-entries{at}"))).key(read),
            200,
            None,
        )
        .await?;
    non_empty(&body, "entries")?;
    let body = h
        .expect(
            Call::new(
                "GET",
                STATEMENTS,
                customer(&format!("/statements/{period}")),
            )
            .key(read),
            200,
            None,
        )
        .await?;
    non_empty(&body, "statements")?;
    let body = h
        .expect(Call::new("GET", LINE_ITEMS, &items).key(read), 200, None)
        .await?;
    non_empty(&body, "items")?;
    let item_id = body["items"][0]["id"]
        .as_str()
        .context("a line item id")?
        .to_owned();
    path_values.insert("item", item_id.clone());
    let explained = h
        .expect(
            Call::new(
                "GET",
                EXPLANATION,
                customer(&format!(
                    "/line-items/{item_id}/explanation?period={period}"
                )),
            )
            .key(read),
            200,
            None,
        )
        .await?;
    non_empty(&explained["price"], "lines")?;
    let body = h
        .expect(Call::new("GET", USAGE, &usage).key(read), 200, None)
        .await?;
    non_empty(&body, "data")?;
    let csv = h
        .expect(
            Call::new("GET", USAGE, &usage)
                .key(read)
                .header("accept", "text/csv"),
            200,
            None,
        )
        .await?;
    let csv = csv.as_str().context("a CSV answer")?;
    assert_eq!(
        csv.lines().next(),
        Some("window_start,window_end,model,quantity,events"),
        "{csv}"
    );

    // 9. Refused reads, each with its own code.
    let usage_with = |extra: &[(&str, &str)]| {
        let mut pairs = vec![
            ("customer", "customer-7"),
            ("meter", "llm_tokens"),
            ("from", from.as_str()),
            ("to", to.as_str()),
        ];
        for &(name, value) in extra {
            match pairs.iter_mut().find(|(n, _)| *n == name) {
                Some(pair) => pair.1 = value,
                None => pairs.push((name, value)),
            }
        }
        pairs.retain(|(_, value)| !value.is_empty());
        format!("/v1/usage{}", query(&pairs))
    };
    let refusals = [
        (
            CUSTOMERS,
            "/v1/customers?cursor=zz".to_owned(),
            400,
            "invalid_cursor",
        ),
        (
            CUSTOMERS,
            "/v1/customers?limit=0".to_owned(),
            400,
            "invalid_limit",
        ),
        (
            BALANCES,
            customer("/balances?min_position=x"),
            400,
            "invalid_position",
        ),
        (
            GRANTS,
            "/v1/customers/nobody/grants".to_owned(),
            404,
            "customer_not_found",
        ),
        (
            GRANTS,
            customer("/grants?cursor=302f677b7d"),
            400,
            "invalid_cursor",
        ),
        (GRANTS, customer("/grants?limit=1001"), 400, "invalid_limit"),
        (
            GRANT,
            customer("/grants/gr_00000000000000000000000000000000"),
            404,
            "grant_not_found",
        ),
        (
            ENTRIES,
            customer("/balance-entries?after=-1"),
            400,
            "invalid_after",
        ),
        (
            ENTRIES,
            customer("/balance-entries?limit=1001"),
            400,
            "invalid_limit",
        ),
        (
            STATEMENTS,
            customer("/statements/2026-13"),
            400,
            "invalid_period",
        ),
        (
            STATEMENTS,
            customer(&format!("/statements/{period}?cursor=302f677b7d")),
            400,
            "invalid_cursor",
        ),
        (
            STATEMENTS,
            customer(&format!("/statements/{period}?limit=10001")),
            400,
            "invalid_limit",
        ),
        (
            LINE_ITEMS,
            customer("/line-items"),
            400,
            "missing_parameter",
        ),
        (
            LINE_ITEMS,
            customer("/line-items?period="),
            400,
            "missing_parameter",
        ),
        (
            LINE_ITEMS,
            customer("/line-items?period=last"),
            400,
            "invalid_period",
        ),
        (
            LINE_ITEMS,
            // `0/g{}`: no line item's place (until December 2026 a page after it, empty).
            customer(&format!("/line-items?period={period}&cursor=302f677b7d")),
            400,
            "invalid_cursor",
        ),
        (
            EXPLANATION,
            customer(&format!(
                "/line-items/li_00000000000000000000000000000000/explanation?period={period}"
            )),
            404,
            "line_item_not_found",
        ),
        (
            EXPLANATION,
            customer(&format!("/line-items/{item_id}/explanation")),
            400,
            "missing_parameter",
        ),
        (
            EXPLANATION,
            customer(&format!("/line-items/{item_id}/explanation?period=2026-00")),
            400,
            "invalid_period",
        ),
        (
            USAGE,
            usage_with(&[("meter", "")]),
            400,
            "missing_parameter",
        ),
        (
            USAGE,
            usage_with(&[("from", "yesterday")]),
            400,
            "invalid_time",
        ),
        (
            USAGE,
            usage_with(&[("from", to.as_str()), ("to", from.as_str())]),
            400,
            "invalid_range",
        ),
        (
            USAGE,
            usage_with(&[("window", "week")]),
            400,
            "invalid_window",
        ),
        (
            USAGE,
            usage_with(&[("filter[]", "x")]),
            400,
            "invalid_filter",
        ),
        (
            USAGE,
            // Hex of `12`: a cursor of another read, not of usage.
            usage_with(&[("cursor", "3132")]),
            400,
            "invalid_cursor",
        ),
        (USAGE, usage_with(&[("limit", "0")]), 400, "invalid_limit"),
        (
            USAGE,
            usage_with(&[("customer", "nobody")]),
            404,
            "customer_not_found",
        ),
        (
            USAGE,
            usage_with(&[("meter", "nope")]),
            422,
            "unknown_meter",
        ),
        (
            USAGE,
            usage_with(&[("group_by", "colour")]),
            422,
            "unknown_group",
        ),
    ];
    for (template, target, status, code) in refusals {
        h.expect(
            Call::new("GET", template, target).key(read),
            status,
            Some(code),
        )
        .await?;
    }
    // A path segment that is not UTF-8 once decoded: the router's plain-text 400.
    h.expect(
        Call::new("GET", BALANCES, "/v1/customers/%FF/balances").key(read),
        400,
        None,
    )
    .await?;

    // 10. Parameters: each documented read refuses one it does not document and takes every
    //     one it does.
    let mut values = path_values.clone();
    values.insert("min_position", position.clone());
    values.insert("from", from.clone());
    values.insert("to", to.clone());
    let mut full_queries = BTreeMap::new();
    for (method, template) in operations(&h.doc) {
        let op = h.doc["paths"][&template][method.to_lowercase()].clone();
        if method != "GET" || op["security"].as_array().is_none_or(Vec::is_empty) {
            continue;
        }
        let path = fill(&template, &path_values)?;
        h.expect(
            Call::new("GET", &template, format!("{path}?colour=red")).key(read),
            400,
            Some("unknown_parameter"),
        )
        .await?;
        let mut values = values.clone();
        // A cursor names a place in its read: here, before every line of the USD statements,
        // before every grant, or before every line item of periods starting on the month's
        // first at midnight UTC (period start, window start, id).
        let period = values.get("period").context("the period")?.clone();
        let place = match template.as_str() {
            STATEMENTS => Some(
                json!({
                    "c": values.get("customer").context("the customer")?,
                    "y": period,
                    "s": {"pending": false, "currency": "USD", "period_start": "", "prior": false},
                    "m": "", "p": "", "g": {},
                })
                .to_string(),
            ),
            GRANTS => Some(
                json!([
                    values.get("customer").context("the customer")?,
                    [0, i64::MIN, i64::MIN, ""],
                ])
                .to_string(),
            ),
            LINE_ITEMS => Some(format!(
                "{period}-01T00:00:00.000Z\n{period}-01T00:00:00.000Z\n"
            )),
            _ => None,
        };
        if let Some(place) = place {
            let hex = place.bytes().map(|b| format!("{b:02x}")).collect();
            values.insert("cursor", hex);
        }
        let pairs = documented_query(&h, &op, &values)
            .with_context(|| format!("the parameters of {template}"))?;
        h.expect(
            Call::new("GET", &template, format!("{path}{}", query_of(&pairs))).key(read),
            200,
            None,
        )
        .await
        .with_context(|| format!("{template} with every documented parameter"))?;
        full_queries.insert(template, pairs);
    }

    // 11. What every operation shares: the key (401 without one, 403 with another scope's);
    //     for reads, another tenant's customer (404) and `min_position` (422 on a topic the
    //     model does not follow, 503 past what it applied); for credit writes, the body (413
    //     too large, 408 too slow) and the rate limit (429, globex's default).
    let far = format!(
        "{}:0:{}",
        rule["position"]["topic"].as_str().context("topic")?,
        i64::MAX - 1
    );
    let other = key("globex", "read")?;
    let globex_credits = key("globex", "credits")?;
    let mut globex_values = path_values.clone();
    globex_values.insert("customer", "openapi-rate".to_owned());
    globex_values.insert("currency", "EUR".to_owned());
    globex_values.insert("id", format!("gr_{}", "0".repeat(32)));
    for (method, template) in operations(&h.doc) {
        let op = h.doc["paths"][&template][method.to_lowercase()].clone();
        let Some(role) = op["security"][0]["bearer"][0].as_str() else {
            continue;
        };
        let path = fill(&template, &path_values)?;
        let wrong = if role == "read" { ingest } else { read };
        h.expect(
            Call::new(&method, &template, &path),
            401,
            Some("unauthenticated"),
        )
        .await?;
        h.expect(
            Call::new(&method, &template, &path).key(wrong),
            403,
            Some("forbidden"),
        )
        .await?;
        match role {
            "read" => {
                let pairs = full_queries
                    .get(&template)
                    .with_context(|| format!("no parameters for {template}"))?;
                if template.contains("{customer}") {
                    h.expect(
                        Call::new(&method, &template, format!("{path}{}", query_of(pairs)))
                            .key(other),
                        404,
                        Some("customer_not_found"),
                    )
                    .await?;
                }
                for (min_position, status, code) in [
                    ("neruba.dead-letter:0:1", 422, "unsupported_position"),
                    (far.as_str(), 503, "not_caught_up"),
                ] {
                    let mut pairs = pairs.clone();
                    for pair in &mut pairs {
                        if pair.0 == "min_position" {
                            pair.1 = min_position.to_owned();
                        }
                    }
                    h.expect(
                        Call::new(&method, &template, format!("{path}{}", query_of(&pairs)))
                            .key(read),
                        status,
                        Some(code),
                    )
                    .await?;
                }
            }
            "credits" => {
                let padded = format!("{}{{}}", " ".repeat(70 * 1024));
                h.expect(
                    Call::new(&method, &template, &path)
                        .key(credits)
                        .body("application/json", padded),
                    413,
                    Some("body_too_large"),
                )
                .await?;
                let answer = stalled_upload(&gateway, &method, &path, credits).await?;
                assert_eq!(answer.status, 408, "{method} {path}: {}", answer.text());
                h.judge(&method, &template, &answer)?;
                let mut call = Call::new(&method, &template, fill(&template, &globex_values)?)
                    .key(globex_credits);
                if method == "POST" && template == GRANTS {
                    call = call.json(
                        &json!({"key": format!("openapi-rate-{now}"), "amount": "1", "currency": "EUR"}),
                    );
                } else if method == "PUT" {
                    call = call.json(&json!({"low_balance_threshold": "1"}));
                }
                // Bursts of 5, then 1 a second: a few are taken, then one is refused.
                h.until(call, 429, &[202], 12).await?;
            }
            _ => {}
        }
    }

    // 12. Every operation was seen succeeding, and failing if it documents a failure.
    let mut missing = Vec::new();
    for (method, template) in operations(&h.doc) {
        let op = &h.doc["paths"][&template][method.to_lowercase()];
        let documented: BTreeSet<u16> = op["responses"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(status, _)| status.parse().ok())
            .collect();
        let seen = h
            .seen
            .get(&(method.clone(), template.clone()))
            .cloned()
            .unwrap_or_default();
        if !seen.iter().any(|s| (200..300).contains(s)) {
            missing.push(format!("{method} {template}: no success answer judged"));
        }
        if documented.iter().any(|s| *s >= 400) && !seen.iter().any(|s| *s >= 400) {
            missing.push(format!("{method} {template}: no error answer judged"));
        }
        let never: Vec<&u16> = documented.difference(&seen).collect();
        if !never.is_empty() {
            eprintln!("{method} {template}: documented, not provoked here: {never:?}");
        }
    }
    ensure!(missing.is_empty(), "{}", missing.join("\n"));

    pipeline.terminate(Duration::from_secs(10))?;
    Ok(())
}

/// A valid value for every query parameter `op` documents.
fn documented_query(
    h: &Harness,
    op: &Value,
    values: &BTreeMap<&str, String>,
) -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    for parameter in op["parameters"].as_array().into_iter().flatten() {
        let parameter = h.resolve(parameter)?;
        if parameter["in"] != "query" {
            continue;
        }
        let name = parameter["name"].as_str().context("a parameter's name")?;
        if parameter["style"] == "deepObject" {
            // `filter[<group key>]=<value>`.
            ensure!(
                name == "filter",
                "no sample for the object parameter {name}"
            );
            pairs.push(("filter[model]".to_owned(), "large".to_owned()));
            continue;
        }
        let value = sample_value(name, values)
            .with_context(|| format!("no sample value for the parameter `{name}`: add one"))?;
        pairs.push((name.to_owned(), value));
    }
    Ok(pairs)
}

fn query_of(pairs: &[(String, String)]) -> String {
    let borrowed: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    query(&borrowed)
}
