//! The support console (`/console` on the api) in a real browser: headless Chromium driven
//! through chromedriver (Debian's `chromium` and `chromium-driver`, installed by
//! `scripts/browser.sh`), against `neruba dev`. Every number read off the page is compared,
//! as a string, with what the api answers for the same read.
//!
//! The WebDriver client is the few W3C WebDriver commands this test sends, over the reqwest
//! the tests already use: a WebDriver crate (fantoccini, thirtyfour) brings proc-macro
//! dependencies whose features, unified with bindgen's, would rebuild RocksDB from source.
//!
//! The test writes a screenshot to `$CARGO_TARGET_TMPDIR/console.png` on every run, and to
//! `docs/console.png` (the README's) when `NERUBA_UPDATE_SCREENSHOT=1`.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::{Proc, free_port, start_dev};
use neruba::sample;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn d(text: &str) -> Decimal {
    text.parse().expect("decimal literal")
}

/// A decimal field of a JSON answer.
fn dec(value: &Value) -> Result<Decimal> {
    value
        .as_str()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not a decimal string: {value}"))
}

fn text(value: &Value) -> Result<String> {
    value
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("not a string: {value}"))
}

/// `env`'s path when set, else the first of `candidates` that exists; it must exist.
fn binary(env: &str, candidates: &[&str], what: &str) -> Result<PathBuf> {
    let named = std::env::var_os(env).map(PathBuf::from);
    let paths: Vec<PathBuf> = match &named {
        Some(path) => vec![path.clone()],
        None => candidates.iter().map(PathBuf::from).collect(),
    };
    paths.into_iter().find(|p| p.exists()).with_context(|| {
        let looked = match &named {
            Some(path) => path.display().to_string(),
            None => candidates.join(", "),
        };
        format!(
            "no {what} at {looked}: the console test needs headless Chromium and chromedriver; \
             run `source scripts/browser.sh` (Debian packages `chromium` and `chromium-driver`), \
             or set {env}"
        )
    })
}

/// chromedriver on a free loopback port, stopped when dropped.
struct Chromedriver {
    url: String,
    _process: Proc,
}

impl Chromedriver {
    async fn start(log_dir: &Path) -> Result<Self> {
        let program = binary(
            "NERUBA_CHROMEDRIVER",
            &["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"],
            "chromedriver",
        )?;
        let port = free_port()?;
        let args = vec![
            format!("--port={port}"),
            "--allowed-ips=127.0.0.1".to_owned(),
        ];
        let mut process = Proc::new("chromedriver", &program, &args, log_dir);
        process.start()?;
        let url = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            let ready = client
                .get(format!("{url}/status"))
                .send()
                .await
                .ok()
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ready {
                break;
            }
            if !process.running() || started.elapsed() > Duration::from_secs(20) {
                bail!("chromedriver did not start:\n{}", process.log_tail(20));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Self {
            url,
            _process: process,
        })
    }

    /// A headless Chromium session.
    async fn browser(&self) -> Result<Browser> {
        let chromium = binary(
            "NERUBA_CHROMIUM",
            &["/usr/lib/chromium/chromium", "/usr/bin/chromium"],
            "chromium",
        )?;
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--window-size=1280,3000", "--force-device-scale-factor=1", "--lang=en-US",
                ],
            },
        }}});
        let http = reqwest::Client::new();
        let answer = webdriver(
            &http,
            reqwest::Method::POST,
            &format!("{}/session", self.url),
            Some(&capabilities),
        )
        .await
        .context("a chromedriver session")?;
        let session = text(&answer["sessionId"])?;
        Ok(Browser {
            http,
            base: format!("{}/session/{session}", self.url),
        })
    }
}

/// One WebDriver command; its `value`, or the driver's error.
async fn webdriver(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<&Value>,
) -> Result<Value> {
    let mut request = http.request(method.clone(), url);
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await?;
    let status = response.status();
    let mut answer: Value = response.json().await.context("a WebDriver answer")?;
    let value = answer["value"].take();
    ensure!(
        status.is_success(),
        "WebDriver {method} {url}: {status} {} {}",
        value["error"],
        value["message"]
    );
    Ok(value)
}

/// A browser session on chromedriver.
struct Browser {
    http: reqwest::Client,
    /// `<driver>/session/<id>`.
    base: String,
}

impl Drop for Browser {
    /// Ends the session even when an assertion panicked before `close`: chromedriver quits the
    /// browser it started only when asked, and a killed chromedriver would leave it running.
    /// Blocking on purpose (no runtime in `drop`): a plain HTTP/1.1 `DELETE` on loopback.
    fn drop(&mut self) {
        use std::io::{Read, Write};
        let Some(rest) = self.base.strip_prefix("http://") else {
            return;
        };
        let Some((host, path)) = rest.split_once('/') else {
            return;
        };
        if let Ok(mut stream) = std::net::TcpStream::connect(host) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let request =
                format!("DELETE /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            if stream.write_all(request.as_bytes()).is_ok() {
                let _ = stream.read_to_end(&mut Vec::new());
            }
        }
    }
}

/// The W3C name of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    async fn command(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        webdriver(
            &self.http,
            method,
            &format!("{}{path}", self.base),
            body.as_ref(),
        )
        .await
    }

    async fn goto(&self, url: &str) -> Result<()> {
        self.command(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await?;
        Ok(())
    }

    async fn execute(&self, script: &str) -> Result<Value> {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// The first element matching `css`.
    async fn find(&self, css: &str) -> Result<String> {
        let found = self
            .command(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await
            .with_context(|| format!("no element {css}"))?;
        text(&found[ELEMENT])
    }

    async fn element(&self, id: &str, action: &str, body: Value) -> Result<()> {
        self.command(
            reqwest::Method::POST,
            &format!("/element/{id}/{action}"),
            Some(body),
        )
        .await?;
        Ok(())
    }

    async fn screenshot(&self) -> Result<Vec<u8>> {
        let encoded = self
            .command(reqwest::Method::GET, "/screenshot", None)
            .await?;
        base64_decode(&text(&encoded)?)
    }

    async fn close(&self) -> Result<()> {
        self.command(reqwest::Method::DELETE, "", None).await?;
        Ok(())
    }
}

/// Standard base64 (the screenshot), padding allowed.
fn base64_decode(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for byte in text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'=')
    {
        let six = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => bail!("not base64: {byte}"),
        };
        acc = (acc << 6) | u32::from(six);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
        }
    }
    Ok(out)
}

/// Runs `script` (a function body) in the page and returns its value.
async fn js(browser: &Browser, script: &str) -> Result<Value> {
    browser.execute(script).await
}

/// `textContent` of every element matching `css`, in document order.
async fn texts(browser: &Browser, css: &str) -> Result<Vec<String>> {
    let script = format!(
        "return Array.from(document.querySelectorAll({})).map(e => e.textContent);",
        json!(css)
    );
    let value = js(browser, &script).await?;
    serde_json::from_value(value).context("a list of texts")
}

/// `attribute` of every element matching `css`, in document order.
async fn attrs(browser: &Browser, css: &str, attribute: &str) -> Result<Vec<String>> {
    let script = format!(
        "return Array.from(document.querySelectorAll({})).map(e => e.getAttribute({}) || '');",
        json!(css),
        json!(attribute)
    );
    let value = js(browser, &script).await?;
    serde_json::from_value(value).context("a list of attributes")
}

/// Polls `script` until it returns `expected` (30 s).
async fn until(browser: &Browser, what: &str, script: &str, expected: Value) -> Result<()> {
    let started = Instant::now();
    loop {
        let got = js(browser, script).await?;
        if got == expected {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            let status = texts(browser, "#status, #alert").await.unwrap_or_default();
            bail!("{what}: still {got}, not {expected} (page says {status:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn type_into(browser: &Browser, css: &str, value: &str) -> Result<()> {
    let field = browser.find(css).await?;
    browser.element(&field, "clear", json!({})).await?;
    browser
        .element(&field, "value", json!({"text": value}))
        .await
}

async fn click(browser: &Browser, css: &str) -> Result<()> {
    let found = browser.find(css).await?;
    browser.element(&found, "click", json!({})).await
}

async fn get(client: &reqwest::Client, url: &str, key: &str) -> Result<(u16, Value)> {
    let response = client.get(url).bearer_auth(key).send().await?;
    let status = response.status().as_u16();
    let body: Value = response.json().await.context("a JSON answer")?;
    Ok((status, body))
}

/// Polls a read until `ready` holds for its answer (60 s).
async fn read_until(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    what: &str,
    ready: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let started = Instant::now();
    loop {
        let (status, body) = get(client, url, key).await?;
        if status == 200 && ready(&body) {
            return Ok(body);
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("{what} never came: {status} {body}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Grants of 1.00 USD (keys `fill-0`, `fill-1`, …) whose keys and metadata come to exactly
/// `bytes`, as the balances stage counts them against a customer's bound; each within the
/// gateway's limits on metadata.
fn fill_grants(bytes: usize) -> Vec<Value> {
    use neruba_schemas::credit::{MAX_METADATA_BYTES, MAX_METADATA_ENTRIES};
    let entry = 2 * MAX_METADATA_BYTES;
    let mut grants = Vec::new();
    let mut left = bytes;
    while left > 0 {
        let key = format!("fill-{}", grants.len());
        let mut room = left
            .saturating_sub(key.len())
            .min(MAX_METADATA_ENTRIES * entry);
        left -= key.len() + room;
        let mut metadata = serde_json::Map::new();
        while room > 0 {
            // An entry's name is at least its 3-byte index; the last takes what is left.
            let size = if room <= entry || room - entry >= 3 {
                room.min(entry)
            } else {
                entry - 3
            };
            let name = format!("{:03}", metadata.len());
            let name_len = size.saturating_sub(MAX_METADATA_BYTES).max(name.len());
            let name = format!("{name:-<name_len$}");
            metadata.insert(name, Value::String("v".repeat(size - name_len)));
            room -= size;
        }
        grants.push(json!({"key": key, "amount": "1.00", "currency": "USD", "metadata": metadata}));
    }
    grants
}

/// The api's balance of `customer` in USD, which must be `expected`; the page must show it
/// as the api answers it.
async fn balance_shown(
    browser: &Browser,
    client: &reqwest::Client,
    api: &str,
    read: &str,
    customer: &str,
    expected: Decimal,
) -> Result<()> {
    let (_, balances) = get(
        client,
        &format!("{api}/v1/customers/{customer}/balances"),
        read,
    )
    .await?;
    let balance = &balances["balances"][0]["balance"];
    assert_eq!(dec(balance)?, expected, "{balances}");
    assert_eq!(
        texts(browser, "[data-testid=balance-USD]").await?,
        vec![text(balance)?]
    );
    Ok(())
}

/// Grants `body` to `customer` through the gateway with a `credits` key: it must be accepted.
async fn grant_through_gateway(
    client: &reqwest::Client,
    gateway: &str,
    credits: &str,
    customer: &str,
    body: Value,
) -> Result<()> {
    let answer = client
        .post(format!("{gateway}/v1/customers/{customer}/grants"))
        .bearer_auth(credits)
        .json(&body)
        .send()
        .await?;
    ensure!(
        answer.status().as_u16() == 202,
        "grant: {}",
        answer.status()
    );
    Ok(())
}

/// Sends the page's grant form (for `amount`, if given; else as it stands) and waits until
/// the page says what the balances stage made of the grant: `expected` is its outcome and
/// code, space-separated.
async fn grant_on_page(
    browser: &Browser,
    amount: Option<&str>,
    what: &str,
    expected: &str,
) -> Result<()> {
    if let Some(amount) = amount {
        type_into(browser, "#grant-amount", amount).await?;
    }
    click(browser, "#grant-submit").await?;
    until(
        browser,
        what,
        "const o = document.getElementById('write-outcome'); \
         return (o.getAttribute('data-outcome') || '') + ' ' + (o.getAttribute('data-code') || '');",
        json!(expected),
    )
    .await
}

/// Opens `customer`'s page and waits until it has loaded.
async fn show_customer(browser: &Browser, customer: &str) -> Result<()> {
    js(
        browser,
        &format!("location.hash = '#/customers/{customer}'; return true;"),
    )
    .await?;
    until(
        browser,
        &format!("{customer} loaded"),
        "return document.getElementById('customer-id').textContent + ' ' + \
         document.getElementById('customer').getAttribute('data-loaded');",
        json!(format!("{customer} true")),
    )
    .await
}

/// Signs in on the page with a read key and, optionally, a credits key.
async fn sign_in(browser: &Browser, read: &str, credits: Option<&str>) -> Result<()> {
    until(
        browser,
        "the sign-in form",
        "return document.getElementById('sign-in').hidden;",
        json!(false),
    )
    .await?;
    type_into(browser, "#read-key", read).await?;
    if let Some(credits) = credits {
        type_into(browser, "#credits-key", credits).await?;
    }
    click(browser, "#sign-in-submit").await?;
    until(
        browser,
        "the customer list after signing in",
        "return document.getElementById('customers').hidden || \
         document.getElementById('customer').hidden === false ? 'no' : 'yes';",
        json!("yes"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_exactly_what_the_api_answers() -> Result<()> {
    // 0. The browser first: without it there is nothing to test, and the message says why.
    let work = tempfile::tempdir()?;
    let driver = Chromedriver::start(work.path()).await?;
    let (mut pipeline, gateway, api) = start_dev(work.path(), &[]).await?;
    let client = reqwest::Client::new();
    let read = sample::dev_key("acme", "read").context("acme read key")?;
    let credits = sample::dev_key("acme", "credits").context("acme credits key")?;
    let ingest = sample::dev_key("acme", "ingest").context("acme ingest key")?;
    let globex = sample::dev_key("globex", "read").context("globex read key")?;

    // 1. A grant of 5 USD for customer-7, through the gateway.
    let answer = client
        .post(format!("{gateway}/v1/customers/customer-7/grants"))
        .bearer_auth(credits)
        .json(
            &json!({"key": "console-test-pack", "amount": "5.00", "currency": "USD",
                      "priority": 1}),
        )
        .send()
        .await?;
    ensure!(
        answer.status().as_u16() == 202,
        "grant: {}",
        answer.status()
    );
    // A low-balance rule: the usage below takes the balance under 4.80, which asks for a
    // top-up to 10.
    let rule = client
        .put(format!(
            "{gateway}/v1/customers/customer-7/balance-rules/USD"
        ))
        .bearer_auth(credits)
        .json(&json!({"low_balance_threshold": "4.80", "recharge_to": "10"}))
        .send()
        .await?;
    ensure!(rule.status().as_u16() == 202, "rule: {}", rule.status());

    // 2. 25,000 large-model tokens in two one-minute windows (0.30 USD under the sample plan:
    //    10,000 free, then 0.00002 a token), and one event of customer-9 so the list has two customers.
    let now = neruba_schemas::event::now_ms();
    let at = |minutes: i64| neruba_schemas::event::format_time_ms(now - minutes * 60_000);
    let period = at(3).get(..7).context("month")?.to_owned();
    let events = json!([
        {"id": "console-1", "type": "llm.completion", "subject": "customer-7", "source": "test",
         "time": at(5), "data": {"model": "large", "tokens": 1200, "status": "ok"}},
        {"id": "console-2", "type": "llm.completion", "subject": "customer-7", "source": "test",
         "time": at(3), "data": {"model": "large", "tokens": 23800, "status": "ok"}},
        {"id": "console-3", "type": "llm.completion", "subject": "customer-9", "source": "test",
         "time": at(3), "data": {"model": "large", "tokens": 100, "status": "ok"}}
    ]);
    let sent = client
        .post(format!("{gateway}/v1/events"))
        .bearer_auth(ingest)
        .json(&events)
        .send()
        .await?;
    ensure!(sent.status().as_u16() == 200, "events: {}", sent.status());

    // 3. Once both windows are priced, a late event of 1,000 tokens in the first window:
    //    the window is revised, and an adjustment of 0.02 USD supersedes its first item.
    let customer = |rest: &str| format!("{api}/v1/customers/customer-7{rest}");
    let items_url = customer(&format!("/line-items?period={period}"));
    read_until(&client, &items_url, read, "two line items", |body| {
        body["items"].as_array().is_some_and(|i| i.len() == 2)
    })
    .await?;
    let late = json!([
        {"id": "console-4", "type": "llm.completion", "subject": "customer-7", "source": "test",
         "time": at(5), "data": {"model": "large", "tokens": 1000, "status": "ok"}}
    ]);
    let sent = client
        .post(format!("{gateway}/v1/events"))
        .bearer_auth(ingest)
        .json(&late)
        .send()
        .await?;
    ensure!(
        sent.status().as_u16() == 200,
        "late event: {}",
        sent.status()
    );

    // 4. The api's answers once everything is priced and drawn from the grant: what the page
    //    must show.
    let statement = read_until(
        &client,
        &customer(&format!("/statements/{period}")),
        read,
        "a statement of 0.32 USD covered by credit",
        |body| {
            body["statements"][0]["usage"] == "0.32"
                && body["statements"][0]["credit_applied"] == "0.32"
        },
    )
    .await?;
    let items = read_until(&client, &items_url, read, "three line items", |body| {
        body["items"].as_array().is_some_and(|i| i.len() == 3)
    })
    .await?;
    let first = &items["items"][0];
    let (from, to) = (text(&first["period_start"])?, text(&first["period_end"])?);
    let usage_url =
        format!("{api}/v1/usage?customer=customer-7&meter=llm_tokens&from={from}&to={to}");
    let usage = read_until(&client, &usage_url, read, "two usage windows", |body| {
        body["data"].as_array().is_some_and(|d| d.len() == 2)
    })
    .await?;
    let (_, balances) = get(&client, &customer("/balances"), read).await?;
    ensure!(
        dec(&balances["balances"][0]["balance"])? == d("4.68"),
        "{balances}"
    );
    let request = text(&balances["balances"][0]["outstanding_request"])?;
    ensure!(request.starts_with("be_"), "{balances}");
    read_until(
        &client,
        &format!("{api}/v1/customers"),
        read,
        "two customers",
        |body| body["customers"].as_array().is_some_and(|c| c.len() == 2),
    )
    .await?;

    // 5. The page: sign in with the read and the credits keys; the tenant's customers listed.
    let browser = driver.browser().await?;
    let result = drive(
        &browser, &client, &gateway, &api, read, credits, globex, &period, &statement, &items,
        &usage, &request,
    )
    .await;
    let closed = browser.close().await;
    result?;
    closed?;
    pipeline.terminate(Duration::from_secs(10))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    browser: &Browser,
    client: &reqwest::Client,
    gateway: &str,
    api: &str,
    read: &str,
    credits: &str,
    globex: &str,
    period: &str,
    statement: &Value,
    items: &Value,
    usage: &Value,
    request: &str,
) -> Result<()> {
    // The page and its assets: this origin only, never framed, no referrer.
    for (path, media) in [
        ("/console", "text/html"),
        ("/console/app.js", "text/javascript"),
        ("/console/style.css", "text/css"),
    ] {
        let answer = client.get(format!("{api}{path}")).send().await?;
        ensure!(
            answer.status().as_u16() == 200,
            "{path}: {}",
            answer.status()
        );
        let header = |name: &str| {
            answer
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        ensure!(header("content-type").starts_with(media), "{path}");
        ensure!(
            header("content-security-policy").contains("default-src 'none'")
                && header("content-security-policy").contains("connect-src 'self'")
                && header("content-security-policy").contains("frame-ancestors 'none'"),
            "{path}: {}",
            header("content-security-policy")
        );
    }
    browser.goto(&format!("{api}/console")).await?;
    sign_in(browser, read, Some(credits)).await?;
    let url = js(browser, "return location.href;").await?;
    ensure!(
        url.as_str().is_some_and(|u| !u.contains("nrb_")),
        "a key reached the URL: {url}"
    );
    until(
        browser,
        "customer links",
        "return document.querySelectorAll('[data-testid=customer-link]').length;",
        json!(2),
    )
    .await?;
    assert_eq!(
        texts(browser, "[data-testid=customer-link]").await?,
        vec!["customer-7", "customer-9"]
    );
    let who = texts(browser, "[data-testid=session-tenant]").await?;
    ensure!(who.first().is_some_and(|w| w.contains("acme")), "{who:?}");

    // 6. customer-7's page: the statement as the api answers it, to the digit.
    click(browser, "a[href='#/customers/customer-7']").await?;
    until(
        browser,
        "customer-7 loaded",
        "return document.getElementById('customer').getAttribute('data-loaded');",
        json!("true"),
    )
    .await?;
    let st = &statement["statements"][0];
    let cur = text(&st["currency"])?;
    assert_eq!(cur, "USD");
    let one = |testid: &str| format!("[data-testid={testid}]");
    assert_eq!(
        texts(browser, &one("statement-USD-status")).await?,
        vec![text(&st["status"])?]
    );
    for (testid, field) in [
        ("statement-USD-usage", "usage"),
        ("statement-USD-credit-applied", "credit_applied"),
        ("statement-USD-amount-due", "amount_due"),
        ("statement-USD-prior", "prior_period_amount"),
    ] {
        assert_eq!(
            texts(browser, &one(testid)).await?,
            vec![format!("{} USD", text(&st[field])?)],
            "{testid}"
        );
    }
    let api_lines: Vec<String> = st["lines"]
        .as_array()
        .context("lines")?
        .iter()
        .map(|l| Ok(format!("{} USD", text(&l["amount"])?)))
        .collect::<Result<_>>()?;
    assert_eq!(
        texts(browser, &one("statement-line-amount")).await?,
        api_lines
    );
    let api_quantities: Vec<String> = st["lines"]
        .as_array()
        .context("lines")?
        .iter()
        .map(|l| text(&l["quantity"]))
        .collect::<Result<_>>()?;
    assert_eq!(
        texts(browser, &one("statement-line-quantity")).await?,
        api_quantities
    );
    assert_eq!(api_quantities, vec!["26000"]);
    // Credit applied and amount due per meter and group: the API's, and with one line, the
    // statement's own totals.
    for (testid, field) in [
        ("statement-line-credit-applied", "credit_applied"),
        ("statement-line-amount-due", "amount_due"),
    ] {
        let api: Vec<String> = st["lines"]
            .as_array()
            .context("lines")?
            .iter()
            .map(|l| Ok(format!("{} USD", text(&l[field])?)))
            .collect::<Result<_>>()?;
        assert_eq!(texts(browser, &one(testid)).await?, api, "{testid}");
        assert_eq!(api, vec![format!("{} USD", text(&st[field])?)], "{testid}");
    }

    // 7. The usage chart: one point per window the api answers, with its exact quantity.
    let rows = usage["data"].as_array().context("usage rows")?;
    let chart = "[data-testid=usage-chart-llm_tokens]";
    assert_eq!(
        attrs(browser, chart, "data-points").await?,
        vec![rows.len().to_string()]
    );
    let points = format!("{chart} [data-testid=usage-point]");
    let api_points: Vec<String> = rows
        .iter()
        .map(|r| text(&r["quantity"]))
        .collect::<Result<_>>()?;
    assert_eq!(attrs(browser, &points, "data-quantity").await?, api_points);
    assert_eq!(api_points, vec!["2200", "23800"]);
    let api_starts: Vec<String> = rows
        .iter()
        .map(|r| text(&r["window_start"]))
        .collect::<Result<_>>()?;
    assert_eq!(
        attrs(browser, &points, "data-window-start").await?,
        api_starts
    );

    // The same usage by day, as picked on the page: the api's one day, to the digit.
    let (status, by_day) = get(
        client,
        &format!(
            "{api}/v1/usage?customer=customer-7&meter=llm_tokens&from={}&to={}&window=day",
            text(&usage["from"])?,
            text(&usage["to"])?
        ),
        read,
    )
    .await?;
    ensure!(status == 200, "{by_day}");
    let day_points: Vec<String> = by_day["data"]
        .as_array()
        .context("day rows")?
        .iter()
        .map(|r| text(&r["quantity"]))
        .collect::<Result<_>>()?;
    let pick = |window: &str| {
        format!(
            "const s = document.getElementById('usage-window-llm_tokens'); s.value = '{window}'; \
             s.dispatchEvent(new Event('change')); return true;"
        )
    };
    js(browser, &pick("day")).await?;
    let points_of = format!(
        "return Array.from(document.querySelectorAll('{points}')).map(e => e.getAttribute('data-quantity'));"
    );
    until(browser, "the usage by day", &points_of, json!(day_points)).await?;
    js(browser, &pick("")).await?;
    until(
        browser,
        "the usage by window again",
        &points_of,
        json!(api_points),
    )
    .await?;

    // 8. Line items: each amount as the api answers it, the adjustment linked to the item it
    //    supersedes; the balance and the grant.
    let api_amounts: Vec<String> = items["items"]
        .as_array()
        .context("items")?
        .iter()
        .map(|i| Ok(format!("{} USD", text(&i["amount"])?)))
        .collect::<Result<_>>()?;
    assert_eq!(texts(browser, &one("item-amount")).await?, api_amounts);
    let adjustment = items["items"]
        .as_array()
        .context("items")?
        .iter()
        .find(|i| i["kind"] == "adjustment")
        .with_context(|| format!("no adjustment: {items}"))?;
    assert_eq!(adjustment["amount"], "0.02");
    let adjustment_id = text(&adjustment["id"])?;
    let superseded = text(&adjustment["supersedes"])?;
    assert_eq!(
        attrs(browser, "tr.superseded", "data-item-id").await?,
        vec![superseded.clone()]
    );
    click(
        browser,
        &format!("[data-item-id={adjustment_id}] [data-testid=supersedes-link]"),
    )
    .await?;
    until(
        browser,
        "the superseded item focused",
        "return document.activeElement.getAttribute('data-item-id');",
        json!(superseded),
    )
    .await?;
    assert_eq!(
        texts(browser, &one("balance-USD")).await?,
        vec!["4.68".to_owned()]
    );
    // The top-up the rule asked for, shortened, with its whole id on hover.
    assert_eq!(
        attrs(browser, &one("topup-USD"), "title").await?,
        vec![request.to_owned()]
    );
    assert_eq!(
        texts(browser, &one("topup-USD")).await?,
        vec![format!("{}…", request.get(..11).unwrap_or(request))]
    );
    assert_eq!(
        attrs(browser, &one("grant-row"), "data-grant-key").await?,
        vec!["console-test-pack"]
    );
    assert_eq!(texts(browser, &one("grant-remaining")).await?, vec!["4.68"]);
    ensure!(
        !texts(browser, &one("entry")).await?.is_empty(),
        "no balance entries shown"
    );

    // 9. "Explain" the adjustment: the period total's tiers, as the api's explanation route
    //    answers them, less what was charged before it.
    let last = adjustment;
    let last_id = adjustment_id.clone();
    let (status, explained) = get(
        client,
        &format!("{api}/v1/customers/customer-7/line-items/{last_id}/explanation?period={period}"),
        read,
    )
    .await?;
    ensure!(status == 200, "{explained}");
    assert_eq!(explained["price"]["amount"], "0.32", "{explained}");
    assert_eq!(explained["previously_charged"], "0.30", "{explained}");
    assert_eq!(explained["matches_ledger"], true);
    let explain = format!("[data-item-id={last_id}] [data-testid=explain-button]");
    click(browser, &explain).await?;
    until(
        browser,
        "the explanation",
        "return document.getElementById('explanation').hidden ? '' : \
         (document.querySelector('[data-testid=explanation-item]') || {}).textContent || '';",
        json!(last_id),
    )
    .await?;
    let api_steps: Vec<String> = explained["price"]["lines"]
        .as_array()
        .context("lines")?
        .iter()
        .map(|l| text(&l["subtotal"]))
        .collect::<Result<_>>()?;
    ensure!(!api_steps.is_empty(), "{explained}");
    assert_eq!(
        texts(browser, &one("explanation-subtotal")).await?,
        api_steps
    );
    let api_kinds: Vec<String> = explained["price"]["lines"]
        .as_array()
        .context("lines")?
        .iter()
        .map(|l| text(&l["kind"]))
        .collect::<Result<_>>()?;
    ensure!(api_kinds.iter().any(|k| k == "tier"), "{explained}");
    assert_eq!(
        attrs(browser, &one("explanation-line"), "data-kind").await?,
        api_kinds
    );
    assert_eq!(
        texts(browser, &one("explanation-amount")).await?,
        vec!["0.32 USD"]
    );
    assert_eq!(
        texts(browser, &one("explanation-previously")).await?,
        vec!["0.30 USD"]
    );
    assert_eq!(
        texts(browser, &one("explanation-item-amount")).await?,
        vec![format!("{} USD", text(&last["amount"])?)]
    );
    assert_eq!(
        texts(browser, &one("explanation-text")).await?,
        vec![text(&explained["text"])?]
    );

    // Closing it gives the focus back to the button that opened it (keyboard use).
    click(browser, "#explanation-close").await?;
    until(
        browser,
        "the focus back on the Explain button",
        "const e = document.activeElement; \
         return e.getAttribute('data-testid') + ' ' + e.closest('tr').getAttribute('data-item-id');",
        json!(format!("explain-button {last_id}")),
    )
    .await?;

    // 10. A grant from the page: its idempotency key is the page's; the answer is shown; the
    //     page reads its own write (the balance rises by exactly the grant).
    let key = texts(browser, &one("grant-key")).await?;
    let key = key.first().context("the page's grant key")?.clone();
    ensure!(key.starts_with("console-") && key.len() > 30, "{key}");
    type_into(browser, "#grant-amount", "2.50").await?;
    type_into(browser, "#grant-note", "goodwill").await?;
    // A day February does not have: refused on the page (the browser would roll it over to
    // March 2, which the gateway would have taken), nothing sent.
    type_into(browser, "#grant-expires", "2099-02-30T00:00:00Z").await?;
    click(browser, "#grant-submit").await?;
    let alert = texts(browser, &one("alert")).await?;
    ensure!(
        alert
            .first()
            .is_some_and(|a| a.starts_with("Expires at must be an RFC 3339 time")),
        "{alert:?}"
    );
    assert_eq!(texts(browser, &one("grant-key")).await?, vec![key.clone()]);
    assert_eq!(
        js(
            browser,
            "return document.getElementById('write-answer').hidden;"
        )
        .await?,
        json!(true)
    );
    // An expiry with an offset: the page sends it as the gateway keeps it, in UTC.
    type_into(browser, "#grant-expires", "2099-01-01T01:00:00+01:00").await?;
    click(browser, "#grant-submit").await?;
    until(
        browser,
        "the page's grant read back",
        "return document.getElementById('status').textContent.includes('read back');",
        json!(true),
    )
    .await?;
    let answer = texts(browser, &one("write-answer-body")).await?;
    ensure!(
        answer
            .first()
            .is_some_and(|a| a.starts_with("HTTP 202") && a.contains("accepted")),
        "{answer:?}"
    );
    assert_eq!(
        attrs(browser, &one("write-outcome"), "data-outcome").await?,
        vec!["applied"]
    );
    let (_, grants) = get(
        client,
        &format!("{api}/v1/customers/customer-7/grants"),
        read,
    )
    .await?;
    let made = grants["grants"]
        .as_array()
        .context("grants")?
        .iter()
        .find(|g| g["key"] == key.as_str())
        .with_context(|| format!("no grant with the page's key {key}: {grants}"))?;
    assert_eq!(made["amount"], "2.50");
    assert_eq!(made["metadata"]["note"], "goodwill");
    assert_eq!(made["expires_at"], "2099-01-01T00:00:00.000Z");
    type_into(browser, "#grant-expires", "").await?;
    let (_, balances) = get(
        client,
        &format!("{api}/v1/customers/customer-7/balances"),
        read,
    )
    .await?;
    let balance = text(&balances["balances"][0]["balance"])?;
    assert_eq!(dec(&balances["balances"][0]["balance"])?, d("7.18"));
    assert_eq!(texts(browser, &one("balance-USD")).await?, vec![balance]);
    let remaining = format!("[data-grant-key='{key}'] [data-testid=grant-remaining]");
    assert_eq!(texts(browser, &remaining).await?, vec!["2.50"]);

    // 11. The screenshot: the customer page with the explanation open.
    click(browser, &explain).await?;
    until(
        browser,
        "the explanation again",
        "return document.getElementById('explanation').hidden;",
        json!(false),
    )
    .await?;
    js(browser, "window.scrollTo(0, 0); return true;").await?;
    let png = browser.screenshot().await?;
    ensure!(png.starts_with(b"\x89PNG"), "not a PNG");
    let artifact = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console.png");
    std::fs::write(&artifact, &png)?;
    eprintln!("console screenshot: {}", artifact.display());
    if std::env::var_os("NERUBA_UPDATE_SCREENSHOT").is_some_and(|v| v == "1") {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/console.png");
        std::fs::create_dir_all(docs.parent().context("docs dir")?)?;
        std::fs::write(&docs, &png)?;
        eprintln!("README screenshot updated: {}", docs.display());
    }

    // 12. The page voids its grant: what is left of it (2.50) leaves the balance, as the api
    //     then answers.
    let void = format!("[data-grant-key='{key}'] [data-testid=void-button]");
    click(browser, &void).await?;
    click(browser, &void).await?;
    until(
        browser,
        "the page's void read back",
        "const s = document.getElementById('status').textContent; \
         return s.startsWith('Void of') && s.includes('read back');",
        json!(true),
    )
    .await?;
    let (_, grants) = get(
        client,
        &format!("{api}/v1/customers/customer-7/grants"),
        read,
    )
    .await?;
    let voided = grants["grants"]
        .as_array()
        .context("grants")?
        .iter()
        .find(|g| g["key"] == key.as_str())
        .with_context(|| format!("no grant with the page's key {key}: {grants}"))?;
    assert_eq!(voided["status"], "voided", "{grants}");
    let status = format!("[data-grant-key='{key}'] [data-testid=grant-status]");
    assert_eq!(texts(browser, &status).await?, vec!["voided"]);
    balance_shown(browser, client, api, read, "customer-7", d("4.68")).await?;

    // 13. The same grant sent again at another scale: the test grants 2.5 USD under the key
    //     the page shows, then the page sends 2.50 under it. The balances stage applies it
    //     once, and the page, reading the grant back with equal terms, says applied. The test
    //     sends no priority (the gateway's default, 10), the page its form's as it opens, 10
    //     (it opened at 0 until December 6, 2026, so this was a `key_conflict`).
    let key = texts(browser, &one("grant-key")).await?;
    let key = key.first().context("the page's grant key")?.clone();
    grant_through_gateway(
        client,
        gateway,
        credits,
        "customer-7",
        json!({"key": key, "amount": "2.5", "currency": "USD"}),
    )
    .await?;
    grant_on_page(
        browser,
        Some("2.50"),
        "the repeated grant's outcome",
        "applied ",
    )
    .await?;
    let (_, grants) = get(
        client,
        &format!("{api}/v1/customers/customer-7/grants"),
        read,
    )
    .await?;
    let under_key: Vec<&Value> = grants["grants"]
        .as_array()
        .context("grants")?
        .iter()
        .filter(|g| g["key"] == key.as_str())
        .collect();
    assert_eq!(under_key.len(), 1, "{grants}");
    assert_eq!(under_key[0]["amount"], "2.5");
    balance_shown(browser, client, api, read, "customer-7", d("7.18")).await?;

    // 14. A key that already holds another grant: the test grants 1.00 USD under the key the
    //     page shows, then the page sends 3.00 under it. The gateway accepts both (it keeps no
    //     grants); the balances stage refuses the second (`key_conflict`), and the page says
    //     so instead of "applied", shows the balance with the 1.00 only, and takes a new key.
    let key = texts(browser, &one("grant-key")).await?;
    let key = key.first().context("the page's grant key")?.clone();
    grant_through_gateway(
        client,
        gateway,
        credits,
        "customer-7",
        json!({"key": key, "amount": "1.00", "currency": "USD"}),
    )
    .await?;
    grant_on_page(
        browser,
        Some("3.00"),
        "the conflicting grant's outcome",
        "refused key_conflict",
    )
    .await?;
    let alert = texts(browser, &one("alert")).await?;
    ensure!(
        alert
            .first()
            .is_some_and(|a| a.contains("key_conflict") && a.contains(&key)),
        "{alert:?}"
    );
    balance_shown(browser, client, api, read, "customer-7", d("8.18")).await?;
    let (_, entries) = get(
        client,
        &format!("{api}/v1/customers/customer-7/balance-entries?limit=1000"),
        read,
    )
    .await?;
    let last = entries["entries"]
        .as_array()
        .and_then(|e| e.last())
        .context("entries")?;
    assert_eq!(
        (&last["kind"], &last["code"]),
        (&json!("grant_refused"), &json!("key_conflict")),
        "{last}"
    );
    assert_eq!(
        attrs(
            browser,
            &format!("[data-testid=entry][data-seq='{}']", last["seq"]),
            "data-kind"
        )
        .await?,
        vec!["grant_refused"]
    );
    let renewed = texts(browser, &one("grant-key")).await?;
    ensure!(
        renewed.first().is_some_and(|k| *k != key),
        "{renewed:?} {key}"
    );
    assert_eq!(
        js(
            browser,
            "return document.getElementById('grant-amount').value;"
        )
        .await?,
        json!("3.00")
    );

    // 15. A customer at its bound of grants holding credit: grants whose keys and metadata
    //     fill customer-9's 256 KiB to within fewer bytes than the page's key. The page's
    //     grant is refused (`too_many_grants`: the api answers `grant_refused`); the page says
    //     so and keeps the form and its key. Once a grant is voided, the same form sent again
    //     applies.
    let fill = fill_grants(neruba_balances::book::MAX_CREDIT_GRANT_BYTES - 40);
    for grant in &fill {
        let answer = client
            .post(format!("{gateway}/v1/customers/customer-9/grants"))
            .bearer_auth(credits)
            .json(grant)
            .send()
            .await?;
        ensure!(
            answer.status().as_u16() == 202,
            "fill grant: {}",
            answer.status()
        );
    }
    let filled = d(&format!("{}.00", fill.len()));
    read_until(
        client,
        &format!("{api}/v1/customers/customer-9/balances"),
        read,
        "customer-9's fill grants applied",
        |body| {
            body["balances"][0]["balance"]
                .as_str()
                .and_then(|b| b.parse::<Decimal>().ok())
                == Some(filled)
        },
    )
    .await?;
    show_customer(browser, "customer-9").await?;
    let key = texts(browser, &one("grant-key")).await?;
    let key = key.first().context("the page's grant key")?.clone();
    ensure!(
        key.len() >= 40,
        "the fill leaves fewer bytes than the key: {key}"
    );
    grant_on_page(
        browser,
        Some("1.00"),
        "the grant past the bound",
        "refused grant_refused",
    )
    .await?;
    let alert = texts(browser, &one("alert")).await?;
    ensure!(
        alert.first().is_some_and(|a| a.contains("too_many_grants")),
        "{alert:?}"
    );
    assert_eq!(texts(browser, &one("grant-key")).await?, vec![key.clone()]);
    balance_shown(browser, client, api, read, "customer-9", filled).await?;
    let id = neruba_schemas::credit::grant_id("acme", "customer-9", &key);
    let (status, refusal) = get(
        client,
        &format!("{api}/v1/customers/customer-9/grants/{id}"),
        read,
    )
    .await?;
    assert_eq!(
        (status, &refusal["error"]["code"]),
        (404, &json!("grant_refused")),
        "{refusal}"
    );
    let void = "[data-grant-key='fill-0'] [data-testid=void-button]";
    click(browser, void).await?;
    click(browser, void).await?;
    until(
        browser,
        "the fill grant's void read back",
        "const s = document.getElementById('status').textContent; \
         return s.startsWith('Void of') && s.includes('read back');",
        json!(true),
    )
    .await?;
    // Sent again with the priority field cleared: no priority is sent, which the gateway
    // reads as its default, 10, the form's as it was sent the first time, so the same terms.
    type_into(browser, "#grant-priority", "").await?;
    grant_on_page(browser, None, "the same grant sent again", "applied ").await?;
    let (status, applied) = get(
        client,
        &format!("{api}/v1/customers/customer-9/grants/{id}"),
        read,
    )
    .await?;
    assert_eq!(
        (status, &applied["grant"]["amount"]),
        (200, &json!("1.00")),
        "{applied}"
    );
    balance_shown(browser, client, api, read, "customer-9", filled).await?;

    // 16. A customer with more grants than the grants read's first page holds (1,000): the
    //     page shows the first 1,000, in burn-down order, and says there are more; the api's
    //     second page has the last one. One grant voided first, so the other 1,000 are within
    //     the bound of grants holding credit.
    grant_through_gateway(
        client,
        gateway,
        credits,
        "customer-10",
        json!({"key": "many-void", "amount": "1.00", "currency": "USD"}),
    )
    .await?;
    let voided = neruba_schemas::credit::grant_id("acme", "customer-10", "many-void");
    let answer = client
        .post(format!(
            "{gateway}/v1/customers/customer-10/grants/{voided}/void"
        ))
        .bearer_auth(credits)
        .send()
        .await?;
    ensure!(answer.status().as_u16() == 202, "void: {}", answer.status());
    let mut sends = tokio::task::JoinSet::new();
    for n in 0..1_000 {
        let (client, gateway, credits) = (client.clone(), gateway.to_owned(), credits.to_owned());
        sends.spawn(async move {
            let body = json!({"key": format!("many-{n:04}"), "amount": "0.01", "currency": "USD"});
            grant_through_gateway(&client, &gateway, &credits, "customer-10", body).await
        });
        if sends.len() >= 16 {
            sends.join_next().await.context("a grant send")???;
        }
    }
    while let Some(sent) = sends.join_next().await {
        sent??;
    }
    read_until(
        client,
        &format!("{api}/v1/customers/customer-10/balances"),
        read,
        "customer-10's 1,000 grants applied",
        |body| {
            body["balances"][0]["balance"]
                .as_str()
                .and_then(|b| b.parse::<Decimal>().ok())
                == Some(d("10.00"))
        },
    )
    .await?;
    let (first_status, first) = get(
        client,
        &format!("{api}/v1/customers/customer-10/grants"),
        read,
    )
    .await?;
    let cursor = text(&first["next_cursor"])?;
    let (second_status, second) = get(
        client,
        &format!("{api}/v1/customers/customer-10/grants?cursor={cursor}"),
        read,
    )
    .await?;
    let page_ids = |page: &Value| -> Vec<String> {
        page["grants"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|g| g["id"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let (first_ids, second_ids) = (page_ids(&first), page_ids(&second));
    assert_eq!(
        (first_status, second_status),
        (200, 200),
        "{first} {second}"
    );
    assert_eq!(
        (first_ids.len(), second_ids.len(), &second["next_cursor"]),
        (1_000, 1, &Value::Null),
        "{second}"
    );
    show_customer(browser, "customer-10").await?;
    assert_eq!(
        attrs(browser, "[data-testid=grant-row]", "data-grant-id").await?,
        first_ids
    );
    let more = texts(browser, &one("grants-more")).await?;
    ensure!(
        more.len() == 1 && more[0].contains("the first 1000"),
        "{more:?}"
    );
    balance_shown(browser, client, api, read, "customer-10", d("10.00")).await?;
    //     Its 1,002 balance entries come 100 a page: "load more" reads the next 100, from a
    //     read model at least as new as the first page's (its `as_of` as `min_position`; was:
    //     none, so another api replica further behind could answer a short page, ending the
    //     list).
    let seqs = |values: Vec<String>| -> Vec<u64> {
        values.iter().filter_map(|s| s.parse().ok()).collect()
    };
    let shown = seqs(attrs(browser, &one("entry"), "data-seq").await?);
    assert_eq!(shown, (1..=100).collect::<Vec<u64>>());
    click(browser, "#entries-more").await?;
    until(
        browser,
        "the second page of entries",
        "return document.querySelectorAll('[data-testid=entry]').length;",
        json!(200),
    )
    .await?;
    let shown = seqs(attrs(browser, &one("entry"), "data-seq").await?);
    assert_eq!(shown, (1..=200).collect::<Vec<u64>>());
    let asked = js(
        browser,
        "return performance.getEntriesByType('resource').map((e) => e.name)\
         .filter((n) => n.includes('/customer-10/balance-entries') && n.includes('after='));",
    )
    .await?;
    let asked: Vec<&str> = asked
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let prefix =
        format!("{api}/v1/customers/customer-10/balance-entries?limit=100&after=100&min_position=");
    let [pin] = asked[..] else {
        bail!("one second page asked for: {asked:?}");
    };
    let pin = pin
        .strip_prefix(prefix.as_str())
        .with_context(|| format!("{pin} is not pinned"))?
        .replace("%3A", ":")
        .replace("%2C", ",");
    // The positions pinned are the model's, partition by partition, up to what it has now.
    let (_, now) = get(
        client,
        &format!("{api}/v1/customers/customer-10/balance-entries?limit=1"),
        read,
    )
    .await?;
    // (A partition with nothing applied, `next_offset` 0, has no position to wait for.)
    let mut now_at = BTreeMap::new();
    for p in now["as_of"].as_array().into_iter().flatten() {
        if p["next_offset"] == 0 {
            continue;
        }
        now_at.insert(
            format!("{}:{}", text(&p["topic"])?, p["partition"]),
            p["next_offset"].as_i64().context("next_offset")?,
        );
    }
    let mut pinned = BTreeMap::new();
    for item in pin.split(',') {
        let (at, offset) = item.rsplit_once(':').context("a position")?;
        pinned.insert(at.to_owned(), offset.parse::<i64>()?);
    }
    ensure!(
        !pinned.is_empty()
            && pinned.keys().eq(now_at.keys())
            && pinned.iter().all(|(at, offset)| *offset < now_at[at]),
        "pinned {pinned:?}, the model now {now_at:?}"
    );

    // 17. Another tenant's key sees nothing of acme: no customers, and customer-7 is "no
    //     such customer" (the api's 404).
    click(browser, "#sign-out").await?;
    sign_in(browser, globex, None).await?;
    until(
        browser,
        "globex's empty list",
        "return document.getElementById('customer-empty').hidden;",
        json!(false),
    )
    .await?;
    assert_eq!(texts(browser, &one("customer-link")).await?.len(), 0);
    let (status, _) = get(
        client,
        &format!("{api}/v1/customers/customer-7/statements/{period}"),
        globex,
    )
    .await?;
    assert_eq!(status, 404);
    js(
        browser,
        "location.hash = '#/customers/customer-7'; return true;",
    )
    .await?;
    until(
        browser,
        "customer-7 as globex",
        "return document.getElementById('customer-id').getAttribute('data-found');",
        json!("false"),
    )
    .await?;
    let alert = texts(browser, &one("alert")).await?;
    ensure!(
        alert
            .first()
            .is_some_and(|a| a.contains("No customer customer-7")),
        "{alert:?}"
    );
    assert_eq!(
        texts(browser, &one("statement-line-amount")).await?.len(),
        0
    );
    assert_eq!(texts(browser, &one("balance-USD")).await?.len(), 0);
    assert_eq!(texts(browser, &one("item-amount")).await?.len(), 0);
    Ok(())
}
