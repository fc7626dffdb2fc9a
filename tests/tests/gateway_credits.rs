//! Credit grants, voids and balance rules over HTTP against the embedded broker: every test
//! reads back what really landed on the ledger topic (or that nothing did), so "accepted" and
//! "refused" are checked against Kafka, not against the gateway's word.

use anyhow::Result;
use neruba_schemas::credit::{self, Grant, GrantRejectCode, RuleRecord, Void};
use neruba_schemas::topics::{self, stable_partition};
use neruba_tests::{Answer, GatewayHarness, LEDGER_PARTITIONS, sample};
use reqwest::Method;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::Duration;

const JSON: Option<&str> = Some("application/json");

fn key(scope: &str) -> Option<&'static str> {
    sample::DEV_KEYS
        .iter()
        .find(|(tenant, s, _)| *tenant == "acme" && *s == scope)
        .map(|(_, _, key)| *key)
}

fn credits() -> Option<&'static str> {
    key("credits")
}

fn grants(customer: &str) -> String {
    format!("/v1/customers/{customer}/grants")
}

fn rules(customer: &str, currency: &str) -> String {
    format!("/v1/customers/{customer}/balance-rules/{currency}")
}

fn code(answer: &neruba_tests::Answer) -> (u16, Option<&str>) {
    (answer.status, answer.json["error"]["code"].as_str())
}

/// Sends `body` to `path` with `method` (the harness only POSTs), as `post_to` does.
async fn send(
    h: &GatewayHarness,
    method: Method,
    path: &str,
    key: Option<&str>,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> Result<Answer> {
    let mut request = h
        .client
        .request(method, format!("{}{path}", h.base))
        .body(body);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = response.text().await?;
    let json = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{e}: {text}"))?;
    Ok(Answer {
        status,
        retry_after,
        json,
    })
}

#[tokio::test]
async fn a_grant_is_accepted_with_its_id_and_lands_in_the_customers_ledger_partition() -> Result<()>
{
    let h = GatewayHarness::start().await?;
    let body = json!({"key": "purchase-1", "amount": "25.50", "currency": "USD", "priority": 5,
        "effective_at": "2026-11-01T00:00:00Z", "expires_at": "2027-01-01T01:00:00+01:00",
        "paid": {"amount": "20", "currency": "USD"}, "metadata": {"order": "o-17"}});
    let answer = h
        .post_to(&grants("customer-7"), credits(), JSON, body.to_string())
        .await?;

    // 1. The answer: 202, the deterministic id, the position on the ledger topic.
    let id = credit::grant_id("acme", "customer-7", "purchase-1");
    let partition = stable_partition("acme/customer-7", LEDGER_PARTITIONS);
    assert_eq!(answer.status, 202, "{}", answer.json);
    assert_eq!(
        answer.json,
        json!({"id": id, "status": "accepted",
               "position": {"topic": topics::LEDGER, "partition": partition, "offset": 0}})
    );

    // 2. The record: header `grant`, key `tenant/customer`, in the partition the rater puts
    //    the customer's line items in, at the answered offset.
    let records = h.ledger_records(1).await?;
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(
        (r.record.as_deref(), r.key.as_str(), r.partition, r.offset),
        (Some("grant"), "acme/customer-7", partition, 0)
    );
    let grant: Grant = credit::decode(&r.payload)?;
    assert_eq!(
        (grant.v, grant.id.as_str(), grant.tenant.as_str()),
        (credit::GRANT_RECORD_V, id.as_str(), "acme")
    );
    assert_eq!(
        (grant.customer.as_str(), grant.key.as_str()),
        ("customer-7", "purchase-1")
    );
    let terms = &grant.terms;
    assert_eq!(terms.amount, Decimal::new(2550, 2));
    assert_eq!((terms.currency.as_str(), terms.priority), ("USD", 5));
    assert_eq!(
        (terms.effective_at.as_deref(), terms.expires_at.as_deref()),
        (
            Some("2026-11-01T00:00:00.000Z"),
            Some("2027-01-01T00:00:00.000Z")
        )
    );
    assert_eq!(
        terms.paid.as_ref().map(|p| (p.amount, p.currency.as_str())),
        Some((Decimal::new(20, 0), "USD"))
    );
    assert_eq!(
        terms.metadata.get("order").map(String::as_str),
        Some("o-17")
    );
    h.stop().await
}

/// One request that must be refused: where it goes, as whom, with what, and its answer.
struct Refused {
    method: Method,
    path: String,
    key: Option<&'static str>,
    content_type: Option<&'static str>,
    body: String,
    status: u16,
    code: &'static str,
}

/// A grant for customer `c1` with the credits key, refused `status` `code`.
fn refused(body: impl Into<String>, status: u16, code: &'static str) -> Refused {
    Refused {
        method: Method::POST,
        path: grants("c1"),
        key: credits(),
        content_type: JSON,
        body: body.into(),
        status,
        code,
    }
}

/// A `PUT` of customer `c1`'s USD rule with the credits key, refused `status` `code`.
fn rule_refused(body: impl Into<String>, status: u16, code: &'static str) -> Refused {
    Refused {
        method: Method::PUT,
        path: rules("c1", "USD"),
        ..refused(body, status, code)
    }
}

/// A `DELETE` of customer `c1`'s rule in `currency` with the credits key and no body.
fn removal_refused(currency: &str, status: u16, code: &'static str) -> Refused {
    Refused {
        method: Method::DELETE,
        path: rules("c1", currency),
        content_type: None,
        ..refused("", status, code)
    }
}

/// Sends each case and checks its answer; the codes seen.
async fn expect_refusals(
    h: &GatewayHarness,
    cases: Vec<Refused>,
) -> Result<BTreeSet<&'static str>> {
    let mut seen = BTreeSet::new();
    for case in cases {
        let answer = send(
            h,
            case.method.clone(),
            &case.path,
            case.key,
            case.content_type,
            case.body.clone(),
        )
        .await?;
        let shown: String = case.body.chars().take(80).collect();
        assert_eq!(
            code(&answer),
            (case.status, Some(case.code)),
            "{} {} {:?} {shown}: {}",
            case.method,
            case.path,
            case.key,
            answer.json
        );
        seen.insert(case.code);
    }
    Ok(seen)
}

#[tokio::test]
async fn every_refusal_answers_its_status_and_code_and_writes_nothing() -> Result<()> {
    let h = GatewayHarness::start().await?;
    let good = json!({"key": "k", "amount": "1", "currency": "USD"});
    let g = good.to_string();
    let with = |field: &str, value: Value| {
        let mut body = good.clone();
        body[field] = value;
        body.to_string()
    };
    let without = |field: &str| {
        let mut body = good.clone();
        body.as_object_mut().map(|o| o.remove(field));
        body.to_string()
    };
    let metadata: serde_json::Map<String, Value> =
        (0..33).map(|i| (format!("m{i}"), json!("v"))).collect();
    let void_of = |id: &str| format!("/v1/customers/c1/grants/{id}/void");
    let id = credit::grant_id("acme", "c1", "k");
    let upper = format!("gr_{}", id.trim_start_matches("gr_").to_uppercase());
    let padded = format!(
        r#"{{"key": "k", "amount": "1", "currency": "USD", "pad": "{}"}}"#,
        "x".repeat(64 * 1024)
    );
    let (void_path, no_body) = (void_of(&id), String::new());
    let cases = vec![
        // 1. The caller: no key, an unknown one, one without the `credits` scope.
        Refused {
            key: None,
            ..refused(g.clone(), 401, "unauthenticated")
        },
        Refused {
            key: Some("nrb_unknown"),
            ..refused(g.clone(), 401, "unauthenticated")
        },
        Refused {
            key: key("ingest"),
            ..refused(g.clone(), 403, "forbidden")
        },
        Refused {
            key: key("read"),
            ..refused(g.clone(), 403, "forbidden")
        },
        Refused {
            path: void_path.clone(),
            key: key("ingest"),
            ..refused(no_body.clone(), 403, "forbidden")
        },
        // 2. The body: not JSON, not a grant's fields, too large, not JSON by its type.
        refused("{not json", 400, "invalid_body"),
        refused("[]", 400, "invalid_body"),
        refused(with("colour", json!("red")), 400, "invalid_body"),
        refused(with("priority", json!("high")), 400, "invalid_body"),
        Refused {
            content_type: Some("text/plain"),
            ..refused(g.clone(), 415, "unsupported_media_type")
        },
        refused(padded, 413, "body_too_large"),
        // 3. The terms, each stable code.
        refused(without("key"), 422, "missing_key"),
        refused(with("key", json!("")), 422, "missing_key"),
        refused(with("key", json!("k".repeat(201))), 422, "missing_key"),
        refused(without("amount"), 422, "invalid_amount"),
        refused(with("amount", json!("0")), 422, "invalid_amount"),
        refused(with("amount", json!(-5)), 422, "invalid_amount"),
        refused(with("amount", json!("ten")), 422, "invalid_amount"),
        refused(with("amount", json!("1e18")), 422, "invalid_amount"),
        refused(with("currency", json!("XYZ")), 422, "unknown_currency"),
        refused(with("priority", json!(1001)), 422, "priority_out_of_range"),
        refused(with("priority", json!(-1)), 422, "priority_out_of_range"),
        refused(with("expires_at", json!("soon")), 422, "invalid_time"),
        refused(
            json!({"key": "k", "amount": "1", "currency": "USD",
                   "effective_at": "2026-12-01T00:00:00Z", "expires_at": "2026-11-30T00:00:00Z"})
            .to_string(),
            422,
            "expiry_before_effective",
        ),
        refused(
            with("paid", json!({"amount": "0", "currency": "USD"})),
            422,
            "invalid_paid",
        ),
        refused(
            with("paid", json!({"amount": "5", "currency": "XYZ"})),
            422,
            "invalid_paid",
        ),
        refused(
            with("metadata", Value::Object(metadata)),
            422,
            "invalid_metadata",
        ),
        // 4. The path: a control character, too long, not UTF-8; a malformed grant id.
        Refused {
            path: grants("c%01"),
            ..refused(g.clone(), 422, "invalid_customer")
        },
        Refused {
            // One character past what an event's `subject` may be (it was 257 bytes, when the
            // bound was 256 bytes and a customer billed under a longer id got no credit).
            path: grants(&"c".repeat(neruba_schemas::event::MAX_ATTRIBUTE_CHARS + 1)),
            ..refused(g.clone(), 422, "invalid_customer")
        },
        Refused {
            path: grants("%FF"),
            ..refused(g.clone(), 422, "invalid_customer")
        },
        Refused {
            path: void_of("gr_nothex"),
            ..refused(no_body.clone(), 422, "invalid_grant_id")
        },
        Refused {
            path: void_of(&upper),
            ..refused(no_body.clone(), 422, "invalid_grant_id")
        },
        // Not UTF-8 once decoded: the grant id is named, not the customer (was
        // `invalid_customer` for whichever segment it was).
        Refused {
            path: void_of("%FF"),
            ..refused(no_body.clone(), 422, "invalid_grant_id")
        },
        // 5. A void's body says nothing.
        Refused {
            path: void_path.clone(),
            ..refused(json!({"reason": "x"}).to_string(), 400, "invalid_body")
        },
    ];
    let seen = expect_refusals(&h, cases).await?;
    // Every stable refusal code of a grant or void was shown above (a rule's own two are
    // shown in `every_rule_refusal_answers_its_status_and_code_and_writes_nothing`).
    for code in GrantRejectCode::ALL {
        let rule_only = matches!(
            code,
            GrantRejectCode::InvalidThreshold | GrantRejectCode::InvalidRecharge
        );
        assert!(
            rule_only || seen.contains(code.as_str()),
            "{code:?} not exercised"
        );
    }

    // Nothing of the above was written; a valid grant then is, and is alone on the topic.
    assert!(h.ledger_records(0).await?.is_empty());
    let answer = h.post_to(&grants("c1"), credits(), JSON, g).await?;
    assert_eq!(answer.status, 202, "{}", answer.json);
    let records = h.ledger_records(1).await?;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].record.as_deref(), Some("grant"));
    h.stop().await
}

#[tokio::test]
async fn a_void_writes_a_void_record_after_its_grant_in_the_same_partition() -> Result<()> {
    let h = GatewayHarness::start().await?;
    let grant = h
        .post_to(
            &grants("customer-9"),
            credits(),
            JSON,
            json!({"key": "promo", "amount": 100, "currency": "credits"}).to_string(),
        )
        .await?;
    assert_eq!(grant.status, 202, "{}", grant.json);
    let id = credit::grant_id("acme", "customer-9", "promo");
    assert_eq!(grant.json["id"].as_str(), Some(id.as_str()));

    // An empty body and `{}` both void.
    let partition = stable_partition("acme/customer-9", LEDGER_PARTITIONS);
    let path = format!("/v1/customers/customer-9/grants/{id}/void");
    for (offset, body) in [(1, ""), (2, "{}")] {
        let answer = h.post_to(&path, credits(), None, body).await?;
        assert_eq!(answer.status, 202, "{}", answer.json);
        assert_eq!(
            answer.json,
            json!({"grant": id, "status": "accepted",
                   "position": {"topic": topics::LEDGER, "partition": partition, "offset": offset}})
        );
    }

    let records = h.ledger_records(3).await?;
    let shape: Vec<(Option<&str>, &str, i32, i64)> = records
        .iter()
        .map(|r| (r.record.as_deref(), r.key.as_str(), r.partition, r.offset))
        .collect();
    assert_eq!(
        shape,
        [
            (Some("grant"), "acme/customer-9", partition, 0),
            (Some("void"), "acme/customer-9", partition, 1),
            (Some("void"), "acme/customer-9", partition, 2),
        ]
    );
    let void: Void = credit::decode(&records[1].payload)?;
    assert_eq!(
        (
            void.v,
            void.tenant.as_str(),
            void.customer.as_str(),
            void.grant.as_str()
        ),
        (credit::VOID_RECORD_V, "acme", "customer-9", id.as_str())
    );
    h.stop().await
}

#[tokio::test]
async fn a_repeated_grant_is_accepted_again_with_the_same_id() -> Result<()> {
    let h = GatewayHarness::start().await?;
    let body = json!({"key": "retry-me", "amount": "7.25", "currency": "EUR"}).to_string();
    let first = h
        .post_to(&grants("c2"), credits(), JSON, body.clone())
        .await?;
    let second = h
        .post_to(&grants("c2"), credits(), JSON, body.clone())
        .await?;
    let id = credit::grant_id("acme", "c2", "retry-me");
    assert_eq!(
        (first.status, first.json["id"].as_str()),
        (202, Some(id.as_str()))
    );
    assert_eq!(
        (second.status, second.json["id"].as_str()),
        (202, Some(id.as_str()))
    );
    // Both are on the ledger with the same id and terms: the gateway keeps no grant state;
    // the balances stage applies a key once.
    let records = h.ledger_records(2).await?;
    let decoded: Vec<Grant> = records
        .iter()
        .map(|r| credit::decode(&r.payload))
        .collect::<Result<_, _>>()?;
    assert_eq!(decoded.len(), 2);
    assert_eq!(
        (decoded[0].id.as_str(), decoded[1].id.as_str()),
        (id.as_str(), id.as_str())
    );
    assert_eq!(decoded[0].terms, decoded[1].terms);
    h.stop().await
}

#[tokio::test]
async fn the_customer_in_the_path_is_percent_decoded() -> Result<()> {
    let h = GatewayHarness::start().await?;
    let answer = h
        .post_to(
            &grants("team%20a%2Fb"),
            credits(),
            JSON,
            json!({"key": "k", "amount": "1", "currency": "USD"}).to_string(),
        )
        .await?;
    assert_eq!(answer.status, 202, "{}", answer.json);
    assert_eq!(
        answer.json["id"].as_str(),
        Some(credit::grant_id("acme", "team a/b", "k").as_str())
    );
    let records = h.ledger_records(1).await?;
    assert_eq!(
        (records[0].key.as_str(), records[0].partition),
        (
            "acme/team a/b",
            stable_partition("acme/team a/b", LEDGER_PARTITIONS)
        )
    );
    let grant: Grant = credit::decode(&records[0].payload)?;
    assert_eq!(grant.customer, "team a/b");
    h.stop().await
}

#[tokio::test]
async fn a_tenant_over_its_rate_limit_is_refused_429_and_nothing_is_written() -> Result<()> {
    let text = sample::CATALOG_TOML.replace(
        "rate_limit = { events_per_second = 100000, burst = 200000 }",
        "rate_limit = { events_per_second = 1, burst = 1 }",
    );
    assert_ne!(text, sample::CATALOG_TOML, "acme's rate limit moved");
    let catalog = neruba_schemas::Catalog::from_toml_str(&text, "test")?;
    let h = GatewayHarness::start_with(catalog, |_| {}).await?;
    let body = |key: &str| json!({"key": key, "amount": "1", "currency": "USD"}).to_string();
    let started = std::time::Instant::now();
    let first = h.post_to(&grants("c1"), credits(), JSON, body("a")).await?;
    assert_eq!(first.status, 202, "{}", first.json);
    // The bucket refills a record a second; a request that took that long under a loaded
    // test run finds it refilled. So each kind is sent until one is refused, and the
    // ledger must hold exactly the records answered 202.
    let mut accepted_grants = vec!["a".to_owned()];
    let mut accepted_rules = 0;
    let (mut grant_refused, mut rule_refused) = (false, false);
    for attempt in 0..10 {
        if !grant_refused {
            let key = format!("b{attempt}");
            let answer = h
                .post_to(&grants("c1"), credits(), JSON, body(&key))
                .await?;
            if answer.status == 202 {
                accepted_grants.push(key);
            } else {
                assert_eq!(code(&answer), (429, Some("rate_limited")));
                assert_eq!(answer.retry_after.as_deref(), Some("1"));
                grant_refused = true;
            }
        }
        if !rule_refused {
            let rule = json!({"low_balance_threshold": "1"}).to_string();
            let answer = send(&h, Method::PUT, &rules("c1", "USD"), credits(), JSON, rule).await?;
            if answer.status == 202 {
                accepted_rules += 1;
            } else {
                assert_eq!(code(&answer), (429, Some("rate_limited")));
                rule_refused = true;
            }
        }
        if grant_refused && rule_refused {
            break;
        }
    }
    assert!(
        grant_refused && rule_refused,
        "no request was refused in 10 tries"
    );
    // A burst of 1, then a record a second: no more than that was let through.
    let refills = usize::try_from(started.elapsed().as_secs())?;
    let through = accepted_grants.len() + accepted_rules;
    assert!(through <= 2 + refills, "{through} accepted in {refills} s");
    let records = h
        .ledger_records(accepted_grants.len() + accepted_rules)
        .await?;
    let of = |kind: &'static str| {
        records
            .iter()
            .filter(move |r| r.record.as_deref() == Some(kind))
    };
    let mut granted: Vec<String> = of("grant")
        .map(|r| credit::decode::<Grant>(&r.payload).map(|grant| grant.key))
        .collect::<Result<_, _>>()?;
    granted.sort();
    accepted_grants.sort();
    assert_eq!(granted, accepted_grants);
    assert_eq!(of("rule").count(), accepted_rules);
    assert_eq!(records.len(), accepted_grants.len() + accepted_rules);
    h.stop().await
}

#[tokio::test]
async fn broker_down_means_503_with_retry_after_and_a_retry_lands_the_grant() -> Result<()> {
    let h = GatewayHarness::start_with(sample::catalog()?, |c| {
        c.delivery_timeout = Duration::from_secs(2);
    })
    .await?;
    let body = |key: &str| json!({"key": key, "amount": "3", "currency": "USD"}).to_string();
    // 1. Healthy: a grant lands.
    let first = h
        .post_to(&grants("c3"), credits(), JSON, body("before"))
        .await?;
    assert_eq!(first.status, 202, "{}", first.json);

    // 2. Outage: not acknowledged, so not accepted.
    h.kafka.set_broker_up(false)?;
    let refused = h
        .post_to(&grants("c3"), credits(), JSON, body("during"))
        .await?;
    assert_eq!(code(&refused), (503, Some("broker_unavailable")));
    assert_eq!(refused.retry_after.as_deref(), Some("5"));

    // 3. Recovery: the client retries the same request until it is accepted.
    h.kafka.set_broker_up(true)?;
    let mut last = refused;
    for _ in 0..20 {
        last = h
            .post_to(&grants("c3"), credits(), JSON, body("during"))
            .await?;
        if last.status == 202 {
            break;
        }
        assert_eq!(code(&last), (503, Some("broker_unavailable")));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let during = credit::grant_id("acme", "c3", "during");
    assert_eq!(
        (last.status, last.json["id"].as_str()),
        (202, Some(during.as_str()))
    );
    // An attempt that timed out may still have reached the broker (the balances stage applies
    // a key once); what must hold: both grants are there, and nothing else.
    let records = h.ledger_records(2).await?;
    let ids: BTreeSet<String> = records
        .iter()
        .map(|r| credit::decode::<Grant>(&r.payload).map(|g| g.id))
        .collect::<Result<_, _>>()?;
    let before = credit::grant_id("acme", "c3", "before");
    assert_eq!(ids, BTreeSet::from([before, during]));
    assert!(records.iter().all(|r| r.record.as_deref() == Some("grant")));
    h.stop().await
}

#[tokio::test]
async fn a_rule_is_set_and_removed_in_the_partition_of_the_customers_grants() -> Result<()> {
    let h = GatewayHarness::start().await?;
    let partition = stable_partition("acme/customer-5", LEDGER_PARTITIONS);
    let position =
        |offset: i64| json!({"topic": topics::LEDGER, "partition": partition, "offset": offset});
    // 1. A grant, so the rule's partition can be compared with it.
    let grant = h
        .post_to(
            &grants("customer-5"),
            credits(),
            JSON,
            json!({"key": "k", "amount": "100", "currency": "USD"}).to_string(),
        )
        .await?;
    assert_eq!(grant.status, 202, "{}", grant.json);

    // 2. Set: amounts as strings, kept as written.
    let set = send(
        &h,
        Method::PUT,
        &rules("customer-5", "USD"),
        credits(),
        JSON,
        json!({"low_balance_threshold": "10.00", "recharge_to": "50.00"}).to_string(),
    )
    .await?;
    assert_eq!(set.status, 202, "{}", set.json);
    assert_eq!(
        set.json,
        json!({"customer": "customer-5", "currency": "USD", "status": "accepted",
               "position": position(1)})
    );

    // 3. Another currency, a JSON number, no recharge.
    let credits_rule = send(
        &h,
        Method::PUT,
        &rules("customer-5", "credits"),
        credits(),
        JSON,
        r#"{"low_balance_threshold": 2.5}"#,
    )
    .await?;
    assert_eq!(credits_rule.status, 202, "{}", credits_rule.json);
    assert_eq!(credits_rule.json["position"], position(2));

    // 4. Remove the USD rule: no body, no content type.
    let removed = send(
        &h,
        Method::DELETE,
        &rules("customer-5", "USD"),
        credits(),
        None,
        "",
    )
    .await?;
    assert_eq!(removed.status, 202, "{}", removed.json);
    assert_eq!(
        removed.json,
        json!({"customer": "customer-5", "currency": "USD", "status": "accepted",
               "position": position(3)})
    );

    // 5. On the topic: the grant, then three rule records, one partition, one key.
    let records = h.ledger_records(4).await?;
    let shape: Vec<(Option<&str>, &str, i32, i64)> = records
        .iter()
        .map(|r| (r.record.as_deref(), r.key.as_str(), r.partition, r.offset))
        .collect();
    assert_eq!(
        shape,
        [
            (Some("grant"), "acme/customer-5", partition, 0),
            (Some("rule"), "acme/customer-5", partition, 1),
            (Some("rule"), "acme/customer-5", partition, 2),
            (Some("rule"), "acme/customer-5", partition, 3),
        ]
    );
    let wire = |i: usize| serde_json::from_slice::<Value>(&records[i].payload);
    assert_eq!(
        wire(1)?["rule"],
        json!({"low_balance_threshold": "10.00", "recharge_to": "50.00"})
    );
    assert_eq!(
        wire(2)?["rule"],
        json!({"low_balance_threshold": "2.5", "recharge_to": null})
    );
    assert_eq!(wire(3)?["rule"], Value::Null);
    let decoded: Vec<RuleRecord> = records[1..]
        .iter()
        .map(|r| credit::decode(&r.payload))
        .collect::<Result<_, _>>()?;
    let heads: Vec<(u8, &str, &str, &str)> = decoded
        .iter()
        .map(|r| {
            (
                r.v,
                r.tenant.as_str(),
                r.customer.as_str(),
                r.currency.as_str(),
            )
        })
        .collect();
    // Version 2: a removal keeps the rule's outstanding top-up request.
    let v = credit::RULE_RECORD_V;
    assert_eq!(v, 2);
    assert_eq!(
        heads,
        [
            (v, "acme", "customer-5", "USD"),
            (v, "acme", "customer-5", "credits"),
            (v, "acme", "customer-5", "USD"),
        ]
    );
    let usd = decoded[0]
        .rule
        .as_ref()
        .map(|r| (r.low_balance_threshold, r.recharge_to));
    assert_eq!(
        usd,
        Some((Decimal::new(1000, 2), Some(Decimal::new(5000, 2))))
    );
    assert_eq!(decoded[2].rule, None);
    h.stop().await
}

#[tokio::test]
async fn every_rule_refusal_answers_its_status_and_code_and_writes_nothing() -> Result<()> {
    let h = GatewayHarness::start().await?;
    let good = json!({"low_balance_threshold": "10", "recharge_to": "50"}).to_string();
    let threshold = |t: Value| json!({"low_balance_threshold": t}).to_string();
    let recharge = |r: Value| json!({"low_balance_threshold": "10", "recharge_to": r}).to_string();
    let padded = format!(
        r#"{{"low_balance_threshold": "10", "pad": "{}"}}"#,
        "x".repeat(64 * 1024)
    );
    let cases = vec![
        // 1. The caller: no key, an unknown one, one without the `credits` scope.
        Refused {
            key: None,
            ..rule_refused(good.clone(), 401, "unauthenticated")
        },
        Refused {
            key: Some("nrb_unknown"),
            ..rule_refused(good.clone(), 401, "unauthenticated")
        },
        Refused {
            key: key("ingest"),
            ..rule_refused(good.clone(), 403, "forbidden")
        },
        Refused {
            key: key("read"),
            ..rule_refused(good.clone(), 403, "forbidden")
        },
        Refused {
            key: key("ingest"),
            ..removal_refused("USD", 403, "forbidden")
        },
        // 2. The body: not JSON, an unknown field, not JSON by its type, too large; a removal
        //    that says something.
        rule_refused("{not json", 400, "invalid_body"),
        rule_refused(
            json!({"low_balance_threshold": "10", "notify": "ops"}).to_string(),
            400,
            "invalid_body",
        ),
        Refused {
            content_type: Some("text/plain"),
            ..rule_refused(good.clone(), 415, "unsupported_media_type")
        },
        rule_refused(padded, 413, "body_too_large"),
        Refused {
            body: json!({"reason": "x"}).to_string(),
            ..removal_refused("USD", 400, "invalid_body")
        },
        // 3. The threshold: absent, negative, finer than USD, not a number.
        rule_refused("{}", 422, "invalid_threshold"),
        rule_refused(threshold(json!("-1")), 422, "invalid_threshold"),
        rule_refused(threshold(json!(-1)), 422, "invalid_threshold"),
        rule_refused(threshold(json!("0.001")), 422, "invalid_threshold"),
        rule_refused(threshold(json!("ten")), 422, "invalid_threshold"),
        rule_refused(threshold(json!(true)), 422, "invalid_threshold"),
        // 4. The recharge: not above the threshold, finer than USD, not a number.
        rule_refused(recharge(json!("10.00")), 422, "invalid_recharge"),
        rule_refused(recharge(json!(5)), 422, "invalid_recharge"),
        rule_refused(recharge(json!("50.001")), 422, "invalid_recharge"),
        rule_refused(recharge(json!("fifty")), 422, "invalid_recharge"),
        // 5. The path: a currency nobody knows; a customer with a control character.
        Refused {
            path: rules("c1", "XYZ"),
            ..rule_refused(good.clone(), 422, "unknown_currency")
        },
        removal_refused("XYZ", 422, "unknown_currency"),
        Refused {
            path: rules("c%01", "USD"),
            ..rule_refused(good.clone(), 422, "invalid_customer")
        },
        Refused {
            path: rules("c%01", "USD"),
            ..removal_refused("USD", 422, "invalid_customer")
        },
        Refused {
            path: rules("c1", "%FF"),
            ..rule_refused(good.clone(), 422, "unknown_currency")
        },
    ];
    let seen = expect_refusals(&h, cases).await?;
    for code in [
        GrantRejectCode::InvalidBody,
        GrantRejectCode::UnknownCurrency,
        GrantRejectCode::InvalidCustomer,
        GrantRejectCode::InvalidThreshold,
        GrantRejectCode::InvalidRecharge,
    ] {
        assert!(seen.contains(code.as_str()), "{code:?} not exercised");
    }

    // Nothing of the above was written; a valid rule then is, and is alone on the topic.
    assert!(h.ledger_records(0).await?.is_empty());
    let answer = send(&h, Method::PUT, &rules("c1", "USD"), credits(), JSON, good).await?;
    assert_eq!(answer.status, 202, "{}", answer.json);
    let records = h.ledger_records(1).await?;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].record.as_deref(), Some("rule"));
    h.stop().await
}
