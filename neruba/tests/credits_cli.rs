//! `neruba credits grant|void|rule|show` against an embedded broker: grant, void and rule
//! write the records the HTTP routes write (same validation, same partition), a refused grant
//! or rule writes nothing, and `show` prints exactly one customer's grants, voids, rules and
//! balance entries.

use neruba::embedded::EmbeddedKafka;
use neruba_schemas::credit::{self, BalanceEntry, EntryKind, Grant, RuleRecord};
use neruba_schemas::topics::{self, stable_partition};
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use std::process::Command;
use std::time::Duration;

const PARTITIONS: i32 = 3;

fn neruba(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_neruba"))
        .args(args)
        .env("NERUBA_LOG", "warn")
        .output()
        .unwrap_or_else(|e| panic!("run neruba: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn entry(customer: &str, seq: u64, amount: i64) -> BalanceEntry {
    let grant = credit::grant_id("acme", customer, "cli-1");
    BalanceEntry {
        v: 1,
        id: credit::entry_id("acme", customer, &grant, Some(&grant), EntryKind::Grant, 0),
        tenant: "acme".into(),
        customer: customer.into(),
        seq,
        kind: EntryKind::Grant,
        currency: "USD".into(),
        cause: grant.clone(),
        grant: Some(grant),
        series: None,
        amount: Decimal::new(amount, 0),
        balance_before: Decimal::ZERO,
        balance_after: Decimal::new(amount, 0),
        code: None,
        rule: None,
        statement: None,
    }
}

#[test]
fn grant_void_and_show_through_the_command_line() -> anyhow::Result<()> {
    let kafka = EmbeddedKafka::start(&[
        (topics::LEDGER, PARTITIONS),
        (topics::BALANCE_ENTRIES, PARTITIONS),
    ])?;
    let brokers = kafka.bootstrap_servers().to_owned();
    let b = brokers.as_str();
    let partition = stable_partition("acme/customer-7", PARTITIONS);

    // 1. A grant: the id from (tenant, customer, key), the customer's partition.
    let (ok, stdout, stderr) = neruba(&[
        "credits",
        "grant",
        "--brokers",
        b,
        "--tenant",
        "acme",
        "--customer",
        "customer-7",
        "--key",
        "cli-1",
        "--amount",
        "12.50",
        "--currency",
        "USD",
        "--priority",
        "3",
    ]);
    assert!(ok, "{stderr}");
    let id = credit::grant_id("acme", "customer-7", "cli-1");
    let answer: Value = serde_json::from_str(&stdout)?;
    assert_eq!(
        answer,
        json!({"id": id, "status": "accepted",
               "position": {"topic": topics::LEDGER, "partition": partition, "offset": 0}})
    );

    // 2. Refusals say their code and write nothing.
    let (ok, _, stderr) = neruba(&[
        "credits",
        "grant",
        "--brokers",
        b,
        "--tenant",
        "acme",
        "--customer",
        "customer-7",
        "--key",
        "cli-2",
        "--amount",
        "0",
        "--currency",
        "USD",
    ]);
    assert!(!ok);
    assert!(stderr.contains("grant refused: invalid_amount"), "{stderr}");
    let (ok, _, stderr) = neruba(&[
        "credits",
        "void",
        "--brokers",
        b,
        "--tenant",
        "acme",
        "--customer",
        "customer-7",
        "--grant",
        "gr_123",
    ]);
    assert!(!ok);
    assert!(stderr.contains("invalid_grant_id"), "{stderr}");
    let (ok, _, stderr) = neruba(&[
        "credits",
        "grant",
        "--brokers",
        b,
        "--tenant",
        "nobody",
        "--customer",
        "c",
        "--key",
        "k",
        "--amount",
        "1",
        "--currency",
        "USD",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("no tenant `nobody` in the catalog"),
        "{stderr}"
    );

    // 3. A void of it, after it in the same partition.
    let (ok, stdout, stderr) = neruba(&[
        "credits",
        "void",
        "--brokers",
        b,
        "--tenant",
        "acme",
        "--customer",
        "customer-7",
        "--grant",
        &id,
    ]);
    assert!(ok, "{stderr}");
    let answer: Value = serde_json::from_str(&stdout)?;
    assert_eq!(
        answer,
        json!({"grant": id, "status": "accepted",
               "position": {"topic": topics::LEDGER, "partition": partition, "offset": 1}})
    );

    // 4. Balance entries (as the balances stage would write them) for this customer and
    //    another; and another customer's grant on the ledger.
    let producer: BaseProducer = ClientConfig::new().set("bootstrap.servers", b).create()?;
    for e in [entry("customer-7", 1, 12), entry("customer-8", 1, 99)] {
        let key = e.partition_key();
        let payload = credit::encode(&e);
        producer
            .send(
                BaseRecord::to(topics::BALANCE_ENTRIES)
                    .key(&key)
                    .payload(&payload)
                    .partition(stable_partition(&key, PARTITIONS)),
            )
            .map_err(|(e, _)| e)?;
    }
    producer.flush(Duration::from_secs(10))?;
    let (ok, _, stderr) = neruba(&[
        "credits",
        "grant",
        "--brokers",
        b,
        "--tenant",
        "acme",
        "--customer",
        "customer-8",
        "--key",
        "cli-1",
        "--amount",
        "99",
        "--currency",
        "USD",
    ]);
    assert!(ok, "{stderr}");

    // 5. `show` prints customer-7's grant, void and entry, nothing of customer-8's.
    let (ok, stdout, stderr) = neruba(&[
        "credits",
        "show",
        "--brokers",
        b,
        "--tenant",
        "acme",
        "--customer",
        "customer-7",
        "--exit-when-idle",
        "3s",
    ]);
    assert!(ok, "{stderr}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let shape = |record: &str| -> Vec<(String, i64, i64)> {
        lines
            .iter()
            .filter(|l| l["record"] == record)
            .map(|l| {
                (
                    l["topic"].as_str().unwrap_or_default().to_owned(),
                    l["partition"].as_i64().unwrap_or(-1),
                    l["offset"].as_i64().unwrap_or(-1),
                )
            })
            .collect()
    };
    assert_eq!(lines.len(), 3, "{stdout}");
    let ledger = topics::LEDGER.to_owned();
    assert_eq!(shape("grant"), [(ledger.clone(), i64::from(partition), 0)]);
    assert_eq!(shape("void"), [(ledger, i64::from(partition), 1)]);
    assert_eq!(
        shape("balance_entry"),
        [(topics::BALANCE_ENTRIES.to_owned(), i64::from(partition), 0)]
    );
    let grant: Grant = serde_json::from_value(
        lines
            .iter()
            .find(|l| l["record"] == "grant")
            .map(|l| l["value"].clone())
            .unwrap_or_default(),
    )?;
    assert_eq!(
        (grant.id.as_str(), grant.terms.amount, grant.terms.priority),
        (id.as_str(), Decimal::new(1250, 2), 3)
    );
    let shown: BalanceEntry = serde_json::from_value(
        lines
            .iter()
            .find(|l| l["record"] == "balance_entry")
            .map(|l| l["value"].clone())
            .unwrap_or_default(),
    )?;
    assert_eq!(shown, entry("customer-7", 1, 12));
    Ok(())
}

#[test]
fn rule_set_refused_and_removed_through_the_command_line() -> anyhow::Result<()> {
    let kafka = EmbeddedKafka::start(&[
        (topics::LEDGER, PARTITIONS),
        (topics::BALANCE_ENTRIES, PARTITIONS),
    ])?;
    let brokers = kafka.bootstrap_servers().to_owned();
    let rule = |extra: &[&str]| {
        let mut args = vec![
            "credits",
            "rule",
            "--brokers",
            brokers.as_str(),
            "--tenant",
            "acme",
            "--customer",
            "customer-7",
            "--currency",
            "USD",
        ];
        args.extend_from_slice(extra);
        neruba(&args)
    };
    let partition = stable_partition("acme/customer-7", PARTITIONS);
    let answer = |offset: i64| {
        json!({"customer": "customer-7", "currency": "USD", "status": "accepted",
               "position": {"topic": topics::LEDGER, "partition": partition, "offset": offset}})
    };

    // 1. Refusals say their code and write nothing; clap refuses impossible combinations.
    let refusals: [(&[&str], &str); 6] = [
        (&["--threshold=-1"], "rule refused: invalid_threshold"),
        (&["--threshold", "0.001"], "rule refused: invalid_threshold"),
        (&["--threshold", "ten"], "rule refused: invalid_threshold"),
        (
            &["--threshold", "10", "--recharge-to", "10"],
            "rule refused: invalid_recharge",
        ),
        (&[], "--threshold"),
        (&["--threshold", "10", "--remove"], "--remove"),
    ];
    for (extra, expected) in refusals {
        let (ok, _, stderr) = rule(extra);
        assert!(!ok, "{extra:?} was accepted");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
    }
    let (ok, _, stderr) = neruba(&[
        "credits",
        "rule",
        "--brokers",
        &brokers,
        "--tenant",
        "acme",
        "--customer",
        "customer-7",
        "--currency",
        "XYZ",
        "--remove",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("rule refused: unknown_currency"),
        "{stderr}"
    );

    // 2. Set, then remove: the gateway's answer, in the customer's partition.
    let (ok, stdout, stderr) = rule(&["--threshold", "10.00", "--recharge-to", "50"]);
    assert!(ok, "{stderr}");
    assert_eq!(serde_json::from_str::<Value>(&stdout)?, answer(0));
    let (ok, stdout, stderr) = rule(&["--remove"]);
    assert!(ok, "{stderr}");
    assert_eq!(serde_json::from_str::<Value>(&stdout)?, answer(1));

    // 3. `show` prints both rule records, exactly as written.
    let (ok, stdout, stderr) = neruba(&[
        "credits",
        "show",
        "--brokers",
        &brokers,
        "--tenant",
        "acme",
        "--customer",
        "customer-7",
        "--exit-when-idle",
        "3s",
    ]);
    assert!(ok, "{stderr}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let shape: Vec<(&str, i64, i64)> = lines
        .iter()
        .map(|l| {
            (
                l["record"].as_str().unwrap_or_default(),
                l["partition"].as_i64().unwrap_or(-1),
                l["offset"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    let p = i64::from(partition);
    assert_eq!(shape, [("rule", p, 0), ("rule", p, 1)], "{stdout}");
    assert_eq!(
        lines[0]["value"]["rule"],
        json!({"low_balance_threshold": "10.00", "recharge_to": "50"})
    );
    let removed: RuleRecord = serde_json::from_value(lines[1]["value"].clone())?;
    assert_eq!(
        (
            removed.tenant.as_str(),
            removed.customer.as_str(),
            removed.currency.as_str(),
            removed.rule
        ),
        ("acme", "customer-7", "USD", None)
    );
    Ok(())
}
