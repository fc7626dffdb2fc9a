//! The billing reads end to end through `neruba dev`: a grant and events in over the gateway,
//! then every read of the api, with exact decimals; read-your-writes with `min_position`;
//! another tenant's key sees nothing; malformed parameters get their stable codes.

mod common;

use anyhow::{Context, Result, bail};
use common::start_dev;
use neruba::sample;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn d(text: &str) -> Decimal {
    text.parse().expect("decimal literal")
}

/// A decimal field of a JSON answer.
fn dec(value: &Value) -> Decimal {
    value
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a decimal string: {value}"))
}

async fn get(client: &reqwest::Client, url: &str, key: &str) -> Result<(u16, Value)> {
    let response = client.get(url).bearer_auth(key).send().await?;
    let status = response.status().as_u16();
    let body: Value = response.json().await.context("a JSON answer")?;
    Ok((status, body))
}

/// The `field` list of every page of `url` read one entry a page (`limit=1`), following
/// `next_cursor`; each page must answer 200.
async fn pages_of_one(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    field: &str,
) -> Result<Vec<Vec<Value>>> {
    let join = if url.contains('?') { '&' } else { '?' };
    let (mut pages, mut cursor) = (Vec::new(), String::new());
    loop {
        let (status, page) = get(client, &format!("{url}{join}limit=1{cursor}"), key).await?;
        assert_eq!(status, 200, "{page}");
        pages.push(page[field].as_array().context("a list")?.clone());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => return Ok(pages),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_answers_exactly_and_only_for_its_tenant() -> Result<()> {
    let work = tempfile::tempdir()?;
    let (mut pipeline, gateway, api) = start_dev(work.path(), &[]).await?;
    let client = reqwest::Client::new();
    let read = sample::dev_key("acme", "read").context("acme read key")?;
    let other = sample::dev_key("globex", "read").context("globex read key")?;
    let credits = sample::dev_key("acme", "credits").context("acme credits key")?;
    let ingest = sample::dev_key("acme", "ingest").context("acme ingest key")?;

    // A grant, then its read at the position the write answered: there at once.
    let answer: Value = client
        .post(format!("{gateway}/v1/customers/customer-7/grants"))
        .bearer_auth(credits)
        .json(&json!({"key": "api-test-pack", "amount": "5", "currency": "USD"}))
        .send()
        .await?
        .json()
        .await?;
    let grant_id = answer["id"].as_str().context("grant id")?.to_owned();
    let position = &answer["position"];
    let min_position = format!(
        "{}:{}:{}",
        position["topic"].as_str().context("topic")?,
        position["partition"],
        position["offset"]
    );
    let (status, grants) = get(
        &client,
        &format!("{api}/v1/customers/customer-7/grants?min_position={min_position}"),
        read,
    )
    .await?;
    assert_eq!(status, 200, "{grants}");
    assert_eq!(grants["grants"][0]["id"], grant_id.as_str());
    assert_eq!(dec(&grants["grants"][0]["amount"]), d("5"));
    assert_eq!(dec(&grants["grants"][0]["remaining"]), d("5"));
    assert_eq!(grants["grants"][0]["status"], "active");
    let offset = position["offset"].as_i64().context("offset")?;
    assert!(
        grants["as_of"][0]["next_offset"]
            .as_i64()
            .context("as_of")?
            > offset
    );

    // 25,000 large-model tokens: 0.30 USD under the sample catalog, drawn from the grant.
    let now = neruba_schemas::event::now_ms();
    let time = neruba_schemas::event::format_time_ms(now - 3 * 60_000);
    let period = time.get(..7).context("month")?.to_owned();
    let events = json!([
        {"id": "api-1", "type": "llm.completion", "subject": "customer-7", "source": "test",
         "time": time, "data": {"model": "large", "tokens": 1200, "status": "ok"}},
        {"id": "api-2", "type": "llm.completion", "subject": "customer-7", "source": "test",
         "time": time, "data": {"model": "large", "tokens": 23800, "status": "ok"}}
    ]);
    let sent = client
        .post(format!("{gateway}/v1/events"))
        .bearer_auth(ingest)
        .json(&events)
        .send()
        .await?;
    assert_eq!(sent.status().as_u16(), 200);

    let items_url = format!("{api}/v1/customers/customer-7/line-items?period={period}");
    let started = Instant::now();
    let items = loop {
        let (status, items) = get(&client, &items_url, read).await?;
        assert_eq!(status, 200, "{items}");
        let total: Decimal = items["items"]
            .as_array()
            .context("items")?
            .iter()
            .map(|i| dec(&i["amount"]))
            .sum();
        if total == d("0.30") {
            break items;
        }
        if started.elapsed() > Duration::from_secs(40) {
            bail!("line items never added up to 0.30: {items}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for item in items["items"].as_array().context("items")? {
        assert_eq!(item["meter"], "llm_tokens");
        assert_eq!(item["superseded"], false);
    }
    // One item a page: the same items, in the same order.
    let paged = pages_of_one(&client, &items_url, read, "items")
        .await?
        .concat();
    assert_eq!(Some(&paged), items["items"].as_array());

    // Usage from the rollups: the month's tokens equal the line items' period quantity,
    // whichever way they are bucketed; CSV says the same.
    let last = items["items"]
        .as_array()
        .and_then(|i| i.last())
        .context("an item")?;
    let (from, to) = (
        last["period_start"].as_str().context("period start")?,
        last["period_end"].as_str().context("period end")?,
    );
    assert_eq!(dec(&last["period_quantity"]), d("25000"));
    let usage = |query: String| {
        format!("{api}/v1/usage?customer=customer-7&meter=llm_tokens&from={from}&to={to}{query}")
    };
    // The usage read model follows the rollups topic on its own: it may not have read the
    // windows the line items came from yet, or only one of them (was: read once, a 404 or a
    // partial quantity when it had not).
    let started = Instant::now();
    let (status, total) = loop {
        let (status, total) = get(&client, &usage("&window=none".into()), read).await?;
        let whole = status == 200 && dec(&total["data"][0]["quantity"]) == d("25000");
        if whole || started.elapsed() > Duration::from_secs(40) {
            break (status, total);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, 200, "{total}");
    assert_eq!(total["aggregation"], "sum");
    assert_eq!(total["data"].as_array().map(Vec::len), Some(1), "{total}");
    assert_eq!(total["data"][0]["group"], json!({"model": "large"}));
    assert_eq!(dec(&total["data"][0]["quantity"]), d("25000"));
    assert_eq!(total["data"][0]["events"], 2);
    let (status, windows) = get(&client, &usage(String::new()), read).await?;
    assert_eq!(status, 200, "{windows}");
    assert_eq!(windows["window"], "1m");
    let by_window: Decimal = windows["data"]
        .as_array()
        .context("data")?
        .iter()
        .map(|r| dec(&r["quantity"]))
        .sum();
    assert_eq!(by_window, d("25000"));
    let (status, merged) = get(&client, &usage("&window=day&group_by=".into()), read).await?;
    assert_eq!(status, 200, "{merged}");
    assert_eq!(merged["data"][0]["group"], json!({}));
    assert_eq!(dec(&merged["data"][0]["quantity"]), d("25000"));
    let response = client
        .get(usage("&window=none".into()))
        .bearer_auth(read)
        .header("accept", "text/csv")
        .send()
        .await?;
    // Its `as_of` in a header (was: none), at least as new as the JSON read's before it.
    let as_of = response
        .headers()
        .get("neruba-as-of")
        .and_then(|v| v.to_str().ok())
        .context("a Neruba-As-Of header")?
        .to_owned();
    let before = &merged["as_of"][0];
    let (at, offset) = as_of.rsplit_once(':').context("topic:partition:offset")?;
    assert_eq!(
        at,
        format!(
            "{}:{}",
            before["topic"].as_str().unwrap_or_default(),
            before["partition"]
        ),
        "{as_of} against {before}"
    );
    assert!(
        offset.parse::<i64>()? >= before["next_offset"].as_i64().context("next_offset")?,
        "{as_of} against {before}"
    );
    let csv = response.text().await?;
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&"window_start,window_end,model,quantity,events")
    );
    assert_eq!(lines.len(), 2, "{csv}");
    assert!(lines[1].ends_with(",large,25000,2"), "{csv}");
    // Another tenant asking for this customer (under its own meter): no such customer.
    let theirs_url =
        format!("{api}/v1/usage?customer=customer-7&meter=storage_gb_hours&from={from}&to={to}");
    let (status, theirs) = get(&client, &theirs_url, other).await?;
    assert_eq!(
        (status, theirs["error"]["code"].as_str()),
        (404, Some("customer_not_found"))
    );
    let usage_cases = [
        ("&window=week", 400, "invalid_window"),
        ("&group_by=colour", 422, "unknown_group"),
        ("&filter[colour]=red", 422, "unknown_group"),
        ("&colour=red", 400, "unknown_parameter"),
    ];
    for (query, status, code) in usage_cases {
        let (got, body) = get(&client, &usage(query.into()), read).await?;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{query}: {body}"
        );
    }
    for (url, status, code) in [
        (
            format!("{api}/v1/usage?customer=customer-7&meter=nope&from={from}&to={to}"),
            422,
            "unknown_meter",
        ),
        (
            format!("{api}/v1/usage?customer=customer-7&meter=llm_tokens&from={to}&to={from}"),
            400,
            "invalid_range",
        ),
        (
            format!("{api}/v1/usage?customer=customer-7&meter=llm_tokens&from=yesterday&to={to}"),
            400,
            "invalid_time",
        ),
        (
            // 50,001 one-minute windows start in it, though it lasts 50,000 minutes and 2 ms
            // (was: answered, the length floored to 50,000 windows).
            format!(
                "{api}/v1/usage?customer=customer-7&meter=llm_tokens\
                 &from=2026-02-28T23:59:59.999Z&to=2026-04-04T17:20:00.001Z"
            ),
            400,
            "invalid_range",
        ),
        (
            format!("{api}/v1/usage?meter=llm_tokens&from={from}&to={to}"),
            400,
            "missing_parameter",
        ),
    ] {
        let (got, body) = get(&client, &url, read).await?;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{url}: {body}"
        );
    }

    // The statement: usage = Σ line items, all of it from credit.
    let (status, statements) = get(
        &client,
        &format!("{api}/v1/customers/customer-7/statements/{period}"),
        read,
    )
    .await?;
    assert_eq!(status, 200, "{statements}");
    let statement = &statements["statements"][0];
    assert_eq!(statement["status"], "open");
    assert_eq!(statements["pending_prior_period"], json!([]));
    assert_eq!(statement["currency"], "USD");
    assert_eq!(dec(&statement["usage"]), d("0.30"));
    assert_eq!(dec(&statement["credit_applied"]), d("0.30"));
    assert_eq!(dec(&statement["amount_due"]), d("0"));
    // In pages of one line: the same lines in the same order, every page with the
    // statement's totals.
    let lines_of = |answer: &Value| -> Vec<Value> {
        answer["statements"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| {
                let lines = s["lines"].as_array().cloned().unwrap_or_default();
                lines
                    .into_iter()
                    .chain(s["prior_period"].as_array().cloned().unwrap_or_default())
            })
            .collect()
    };
    let whole = lines_of(&statements);
    assert!(!whole.is_empty(), "{statements}");
    assert_eq!(statements["next_cursor"], Value::Null);
    let (mut paged, mut cursor, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let (status, page) = get(
            &client,
            &format!("{api}/v1/customers/customer-7/statements/{period}?limit=1{cursor}"),
            read,
        )
        .await?;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["statements"][0]["usage"], statement["usage"], "{page}");
        let lines = lines_of(&page);
        assert_eq!(lines.len(), 1, "{page}");
        paged.extend(lines);
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(next) if pages < whole.len() => cursor = format!("&cursor={next}"),
            next => {
                assert_eq!(next, None, "a page past the last line: {page}");
                break;
            }
        }
    }
    assert_eq!(paged, whole);

    // The balance: 5 − 0.30, and the entries fold to it.
    let (status, balances) = get(
        &client,
        &format!("{api}/v1/customers/customer-7/balances"),
        read,
    )
    .await?;
    assert_eq!(status, 200, "{balances}");
    assert_eq!(balances["balances"][0]["currency"], "USD");
    assert_eq!(dec(&balances["balances"][0]["balance"]), d("4.70"));
    assert_eq!(dec(&balances["balances"][0]["available"]), d("4.70"));
    let (status, entries) = get(
        &client,
        &format!("{api}/v1/customers/customer-7/balance-entries"),
        read,
    )
    .await?;
    assert_eq!(status, 200, "{entries}");
    let entries = entries["entries"].as_array().context("entries")?.clone();
    let moves = ["grant", "consume", "restore", "expire", "void"];
    let folded: Decimal = entries
        .iter()
        .filter(|e| moves.contains(&e["kind"].as_str().unwrap_or_default()))
        .map(|e| dec(&e["amount"]))
        .sum();
    assert_eq!(folded, d("4.70"));
    assert_eq!(entries[0]["kind"], "grant");
    // Paged one at a time, the same entries.
    let mut after = 0;
    let mut paged = Vec::new();
    loop {
        let (status, page) = get(
            &client,
            &format!("{api}/v1/customers/customer-7/balance-entries?after={after}&limit=1"),
            read,
        )
        .await?;
        assert_eq!(status, 200, "{page}");
        paged.extend(
            page["entries"]
                .as_array()
                .context("entries")?
                .iter()
                .cloned(),
        );
        match page["next_after"].as_u64() {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(paged, entries);

    let (status, one) = get(
        &client,
        &format!("{api}/v1/customers/customer-7/grants/{grant_id}"),
        read,
    )
    .await?;
    assert_eq!(status, 200);
    assert_eq!(dec(&one["grant"]["remaining"]), d("4.70"));
    let (_, customers) = get(&client, &format!("{api}/v1/customers"), read).await?;
    let ids: Vec<&str> = customers["customers"]
        .as_array()
        .context("customers")?
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    assert!(ids.contains(&"customer-7"), "{customers}");

    // Another tenant's key: every read of acme's customer is a 404, the list has none of it.
    for path in [
        "balances".to_owned(),
        "grants".to_owned(),
        format!("grants/{grant_id}"),
        "balance-entries".to_owned(),
        format!("statements/{period}"),
        format!("line-items?period={period}"),
    ] {
        let (status, body) = get(
            &client,
            &format!("{api}/v1/customers/customer-7/{path}"),
            other,
        )
        .await?;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["error"]["code"], "customer_not_found", "{path}");
    }
    let (_, theirs) = get(&client, &format!("{api}/v1/customers"), other).await?;
    assert_eq!(theirs["customers"], json!([]), "{theirs}");

    // Refusals with their stable codes.
    let cases = [
        (
            "/v1/customers/customer-7/balances",
            ingest,
            403,
            "forbidden",
        ),
        (
            "/v1/customers/customer-7/balances",
            "nope",
            401,
            "unauthenticated",
        ),
        (
            "/v1/customers/customer-7/statements/2026-13",
            read,
            400,
            "invalid_period",
        ),
        (
            "/v1/customers/customer-7/line-items?period=last",
            read,
            400,
            "invalid_period",
        ),
        (
            "/v1/customers/customer-7/balance-entries?limit=0",
            read,
            400,
            "invalid_limit",
        ),
        (
            "/v1/customers/customer-7/balance-entries?limit=100000",
            read,
            400,
            "invalid_limit",
        ),
        (
            "/v1/customers/customer-7/balance-entries?after=-1",
            read,
            400,
            "invalid_after",
        ),
        ("/v1/customers?cursor=zz", read, 400, "invalid_cursor"),
        (
            "/v1/customers/customer-7/grants?cursor=302f677b7d",
            read,
            400,
            "invalid_cursor",
        ),
        (
            "/v1/customers/customer-7/grants?limit=1001",
            read,
            400,
            "invalid_limit",
        ),
        ("/v1/customers/%FF/balances", read, 400, "invalid_path"),
        (
            "/v1/customers/customer-7/balances?colour=red",
            read,
            400,
            "unknown_parameter",
        ),
        (
            "/v1/customers/customer-7/balances?min_position=x",
            read,
            400,
            "invalid_position",
        ),
        (
            "/v1/customers/customer-7/balances?min_position=neruba.events:0:1",
            read,
            422,
            "unsupported_position",
        ),
        (
            "/v1/customers/nobody/balances",
            read,
            404,
            "customer_not_found",
        ),
    ];
    for (path, key, status, code) in cases {
        let (got, body) = get(&client, &format!("{api}{path}"), key).await?;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{path}: {body}"
        );
    }
    // The scheme is case-insensitive, as at the gateway (RFC 9110 11.1).
    for scheme in ["bearer", "BEARER"] {
        let response = client
            .get(format!("{api}/v1/customers/customer-7/balances"))
            .header("authorization", format!("{scheme}  {read}"))
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 200, "{scheme}");
    }
    // A position the model has not reached: 503 after the bounded wait, with Retry-After.
    let far = format!(
        "{}:{}:999999",
        position["topic"].as_str().unwrap_or_default(),
        position["partition"]
    );
    let response = client
        .get(format!(
            "{api}/v1/customers/customer-7/balances?min_position={far}"
        ))
        .bearer_auth(read)
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );

    // Three more grants, one burning first, one last, and one effective only in a year (paid
    // for, so in the balance, but not available to usage now): pages of one grant, in
    // burn-down order, are the whole list.
    let mut last = String::new();
    let next_year = neruba_schemas::event::format_time_ms(now + 365 * 86_400_000);
    for (key, amount, priority, effective_at) in [
        ("api-test-last", "1", 99, None),
        ("api-test-first", "1", 0, None),
        ("api-test-next-year", "2", 10, Some(next_year.as_str())),
    ] {
        let answer: Value = client
            .post(format!("{gateway}/v1/customers/customer-7/grants"))
            .bearer_auth(credits)
            .json(
                &json!({"key": key, "amount": amount, "currency": "USD", "priority": priority,
                          "effective_at": effective_at}),
            )
            .send()
            .await?
            .json()
            .await?;
        let at = &answer["position"];
        last = format!(
            "{}:{}:{}",
            at["topic"].as_str().context("topic")?,
            at["partition"],
            at["offset"]
        );
    }
    let grants_url = format!("{api}/v1/customers/customer-7/grants");
    let (status, whole) = get(&client, &format!("{grants_url}?min_position={last}"), read).await?;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["next_cursor"], Value::Null);
    let keys = |answer: &Value| -> Vec<String> {
        answer["grants"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|g| g["key"].as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(
        keys(&whole),
        [
            "api-test-first",
            "api-test-pack",
            "api-test-next-year",
            "api-test-last"
        ]
    );
    // The balance counts every grant holding credit; what usage now could draw on leaves out
    // the one not yet effective: 4.70 + 1 + 1 + 2, of which 2 from next year.
    let (status, balances) = get(
        &client,
        &format!("{api}/v1/customers/customer-7/balances?min_position={last}"),
        read,
    )
    .await?;
    assert_eq!(status, 200, "{balances}");
    let usd = &balances["balances"][0];
    assert_eq!(
        (
            dec(&usd["balance"]),
            dec(&usd["available"]),
            usd["active_grants"].as_u64()
        ),
        (d("8.70"), d("6.70"), Some(4)),
        "{balances}"
    );
    let pages = pages_of_one(&client, &grants_url, read, "grants").await?;
    assert!(pages.iter().all(|page| page.len() == 1), "{pages:?}");
    assert_eq!(Value::Array(pages.concat()), whole["grants"]);
    // A grants cursor is its customer's: another's is refused.
    let (_, first) = get(&client, &format!("{grants_url}?limit=1"), read).await?;
    let theirs = first["next_cursor"].as_str().context("a cursor")?;
    let (status, refused) = get(
        &client,
        &format!("{api}/v1/customers/customer-8/grants?cursor={theirs}"),
        read,
    )
    .await?;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (400, Some("invalid_cursor")),
        "{refused}"
    );
    pipeline.terminate(Duration::from_secs(10))?;
    Ok(())
}

/// A `GET` of `url`: the status, the `Retry-After` header, the JSON answer, and how long it
/// took.
async fn timed_get(
    client: &reqwest::Client,
    url: &str,
    key: &str,
) -> Result<(u16, Option<String>, Value, Duration)> {
    let started = Instant::now();
    let response = client.get(url).bearer_auth(key).send().await?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: Value = response.json().await.context("a JSON answer")?;
    Ok((status, retry_after, body, started.elapsed()))
}

/// The `positions` of an ingest answer.
fn positions_of(answer: &Value) -> Result<Vec<String>> {
    answer["positions"]
        .as_array()
        .context("positions")?
        .iter()
        .map(|p| p.as_str().map(str::to_owned).context("a position string"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_read_at_the_events_positions_includes_late_events_with_their_exact_quantity()
-> Result<()> {
    // Long enough for the aggregator in `dev` to fold, write and commit a late event on a
    // loaded machine before the read at its position gives up.
    const READ_WAIT: Duration = Duration::from_secs(10);
    let work = tempfile::tempdir()?;
    let (mut pipeline, gateway, api) = start_dev(work.path(), &["--api-read-wait", "10s"]).await?;
    let client = reqwest::Client::new();
    let read = sample::dev_key("acme", "read").context("acme read key")?;
    let ingest = sample::dev_key("acme", "ingest").context("acme ingest key")?;
    let send = |events: Value| {
        let client = client.clone();
        let url = format!("{gateway}/v1/events");
        async move {
            let response = client
                .post(url)
                .bearer_auth(ingest)
                .json(&events)
                .send()
                .await?;
            let status = response.status().as_u16();
            let body: Value = response.json().await?;
            anyhow::ensure!(status == 200, "ingest answered {status}: {body}");
            Ok::<Value, anyhow::Error>(body)
        }
    };
    // One 1-minute window ten minutes ago (the sample's `llm_tokens`: sum of tokens, by model).
    let now = neruba_schemas::event::now_ms();
    let window_start = (now - 10 * 60_000) / 60_000 * 60_000;
    let at = |second: i64| neruba_schemas::event::format_time_ms(window_start + second * 1000);
    let (from, to) = (at(0), at(60));
    let event = |id: &str, customer: &str, second: i64, tokens: u32| {
        json!({"id": id, "type": "llm.completion", "subject": customer, "source": "test",
               "time": at(second), "data": {"model": "large", "tokens": tokens, "status": "ok"}})
    };
    let customers = ["ryw-a", "ryw-b", "ryw-c", "ryw-d"];
    let usage = |customer: &str, min_position: &str| {
        format!(
            "{api}/v1/usage?customer={customer}&meter=llm_tokens&from={from}&to={to}\
             &window=none{min_position}"
        )
    };

    // 1. A first event per customer; the window closes once the partitions are idle (1 s).
    let first: Vec<Value> = customers
        .iter()
        .map(|c| event(&format!("{c}-1"), c, 10, 100))
        .collect();
    let answer = send(Value::Array(first)).await?;
    assert_eq!(answer["accepted"], 4, "{answer}");
    let started = Instant::now();
    for customer in customers {
        loop {
            let (status, body) = get(&client, &usage(customer, ""), read).await?;
            if status == 200 && body["data"][0]["quantity"] == "100" {
                break;
            }
            if started.elapsed() > Duration::from_secs(40) {
                bail!("{customer}'s window never closed: {status} {body}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // 2. A late event per customer into that closed window (each a revision), then usage at
    //    the answered positions: there at once, exactly, with no polling.
    let late: Vec<Value> = customers
        .iter()
        .map(|c| event(&format!("{c}-2"), c, 40, 250))
        .collect();
    let answer = send(Value::Array(late)).await?;
    assert_eq!(answer["accepted"], 4, "{answer}");
    let positions = positions_of(&answer)?;
    assert!(
        !positions.is_empty() && positions.iter().all(|p| p.starts_with("neruba.events:")),
        "{answer}"
    );
    let min_position = format!("&min_position={}", positions.join(","));
    for customer in customers {
        let (status, _, body, _) =
            timed_get(&client, &usage(customer, &min_position), read).await?;
        assert_eq!(status, 200, "{customer}: {body}");
        assert_eq!(body["data"].as_array().map(Vec::len), Some(1), "{body}");
        assert_eq!(body["data"][0]["group"], json!({"model": "large"}));
        assert_eq!(
            dec(&body["data"][0]["quantity"]),
            d("350"),
            "{customer}: {body}"
        );
        assert_eq!(body["data"][0]["events"], 2, "{customer}: {body}");
    }

    // 3. A position past anything written: 503 `not_caught_up` once the wait (10 s) is over,
    //    alone or beside positions that are caught up.
    let far = "neruba.events:0:999999";
    for list in [far.to_owned(), format!("{},{far}", positions.join(","))] {
        let url = usage("ryw-a", &format!("&min_position={list}"));
        let (status, retry_after, body, took) = timed_get(&client, &url, read).await?;
        assert_eq!(
            (
                status,
                body["error"]["code"].as_str(),
                retry_after.as_deref()
            ),
            (503, Some("not_caught_up"), Some("1")),
            "{list}: {body}"
        );
        assert!(
            took >= READ_WAIT && took < READ_WAIT + Duration::from_secs(3),
            "{list}: answered after {took:?}"
        );
    }

    // 4. A malformed item anywhere in the list: 400 `invalid_position`; a partition the
    //    events topic does not have (it has 4) or a topic the api does not follow: 422.
    let good = positions[0].as_str();
    let too_many = vec![good; neruba_api::MAX_POSITIONS + 1].join(",");
    let cases = [
        (format!("{good},"), 400, "invalid_position"),
        (format!(",{good}"), 400, "invalid_position"),
        (format!("{good},,{good}"), 400, "invalid_position"),
        (format!("{good},neruba.events:0:x"), 400, "invalid_position"),
        (
            format!("{good},neruba.events:0:-1"),
            400,
            "invalid_position",
        ),
        (
            format!("{good},neruba.events:-1:0"),
            400,
            "invalid_position",
        ),
        (format!("{good},:0:1"), 400, "invalid_position"),
        (too_many, 400, "invalid_position"),
        (
            format!("{good},neruba.events:4:0"),
            422,
            "unsupported_position",
        ),
        (
            format!("{good},neruba.dead-letter:0:0"),
            422,
            "unsupported_position",
        ),
    ];
    for (list, status, code) in cases {
        let url = usage("ryw-a", &format!("&min_position={list}"));
        let (got, _, body, _) = timed_get(&client, &url, read).await?;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{list}: {body}"
        );
    }
    // An events position says nothing about the ledger: the ledger reads refuse it.
    let (got, _, body, _) = timed_get(
        &client,
        &format!("{api}/v1/customers/ryw-a/balances?min_position={good}"),
        read,
    )
    .await?;
    assert_eq!(
        (got, body["error"]["code"].as_str()),
        (422, Some("unsupported_position")),
        "{body}"
    );
    pipeline.terminate(Duration::from_secs(10))?;
    Ok(())
}
