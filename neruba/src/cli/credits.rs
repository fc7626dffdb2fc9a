//! `neruba credits grant|void|rule|show`: prepaid credit for operators. `grant`, `void` and
//! `rule` go through the gateway's own door: the same validation ([`GrantRequest::validate`],
//! [`RuleRequest::validate`], [`credits::rule_removal`]) and the same ledger write
//! ([`LedgerWriter::write`]), so a grant or rule made here is the record the HTTP route would
//! have written. `show` reads a customer's grants, voids, rules and balance entries back.

use super::{load_catalog, parse_key_value, shutdown_on_signal};
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use neruba::sample;
use neruba_ingest_gateway::credits::{
    self, CreditRecord, GRANT_RECORD, GrantAccepted, LedgerWriter, RULE_RECORD, RuleAccepted,
    VOID_RECORD, VoidAccepted,
};
use neruba_kafka::clients::TopicEnds;
use neruba_schemas::Catalog;
use neruba_schemas::credit::{self, GrantRequest, RuleRequest, Void};
use neruba_schemas::{event, topics};
use rdkafka::Message;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Headers;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How long the broker has to acknowledge a grant, void or rule.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Subcommand)]
pub(crate) enum CreditsCommand {
    /// Grant prepaid credit to a customer (written to the ledger topic, acks=all); prints the
    /// grant's id and position as JSON.
    Grant(GrantArgs),
    /// Void what is left of a grant; prints the void's position as JSON.
    Void(VoidArgs),
    /// Set (or with `--remove` remove) a customer's low-balance rule in one currency; prints
    /// its position as JSON.
    Rule(RuleArgs),
    /// Print a customer's grants, voids and rules (ledger topic) and balance entries as NDJSON.
    Show(ShowArgs),
}

/// Where the ledger is.
#[derive(Debug, Args)]
pub(crate) struct LedgerArgs {
    /// Kafka bootstrap servers, e.g. the address `neruba dev` prints.
    #[arg(long, env = "NERUBA_BROKERS")]
    pub(crate) brokers: String,
    /// Topic grants, voids and rules are written to (the raters' ledger topic).
    #[arg(long, env = "NERUBA_LEDGER_TOPIC", default_value = topics::LEDGER)]
    pub(crate) ledger_topic: String,
    /// Extra librdkafka setting `key=value` (SASL, TLS); repeatable, comma-separated in env.
    #[arg(long = "kafka-opt", env = "NERUBA_KAFKA_OPTS", value_delimiter = ',', value_parser = parse_key_value)]
    pub(crate) kafka_opts: Vec<(String, String)>,
}

#[derive(Debug, Args)]
pub(crate) struct GrantArgs {
    #[command(flatten)]
    pub(crate) ledger: LedgerArgs,
    /// Tenant of the customer (must be in the catalog).
    #[arg(long, env = "NERUBA_TENANT")]
    pub(crate) tenant: String,
    /// Customer to grant to.
    #[arg(long, env = "NERUBA_CUSTOMER")]
    pub(crate) customer: String,
    /// Idempotency key, unique per tenant and customer: the grant's id derives from it.
    #[arg(long, env = "NERUBA_KEY")]
    pub(crate) key: String,
    /// Amount, a positive exact decimal.
    #[arg(long, env = "NERUBA_AMOUNT")]
    pub(crate) amount: String,
    /// ISO 4217 currency or a unit of the catalog (e.g. `credits`).
    #[arg(long, env = "NERUBA_CURRENCY")]
    pub(crate) currency: String,
    /// 0–1000, lower burns first (default 10).
    #[arg(long, env = "NERUBA_PRIORITY")]
    pub(crate) priority: Option<i64>,
    /// RFC 3339 time: usage in windows starting from it may draw on the grant (default: any).
    #[arg(long, env = "NERUBA_EFFECTIVE_AT")]
    pub(crate) effective_at: Option<String>,
    /// RFC 3339 time, exclusive: windows starting from it may not (default: never expires).
    #[arg(long, env = "NERUBA_EXPIRES_AT")]
    pub(crate) expires_at: Option<String>,
    /// Catalog file (its tenants and units); the built-in sample catalog when absent.
    #[arg(long, env = "NERUBA_CATALOG")]
    pub(crate) catalog: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct VoidArgs {
    #[command(flatten)]
    pub(crate) ledger: LedgerArgs,
    /// Tenant of the customer.
    #[arg(long, env = "NERUBA_TENANT")]
    pub(crate) tenant: String,
    /// Customer whose grant is voided.
    #[arg(long, env = "NERUBA_CUSTOMER")]
    pub(crate) customer: String,
    /// The grant's id (`gr_…`, as `grant` printed it).
    #[arg(long, env = "NERUBA_GRANT")]
    pub(crate) grant: String,
}

#[derive(Debug, Args)]
pub(crate) struct RuleArgs {
    #[command(flatten)]
    pub(crate) ledger: LedgerArgs,
    /// Tenant of the customer (must be in the catalog).
    #[arg(long, env = "NERUBA_TENANT")]
    pub(crate) tenant: String,
    /// Customer whose rule it is.
    #[arg(long, env = "NERUBA_CUSTOMER")]
    pub(crate) customer: String,
    /// ISO 4217 currency or a unit of the catalog the rule watches the balance in.
    #[arg(long, env = "NERUBA_CURRENCY")]
    pub(crate) currency: String,
    /// Low-balance threshold, an exact decimal ≥ 0: crossing below it emits `low_balance`.
    #[arg(long, env = "NERUBA_THRESHOLD", required_unless_present = "remove")]
    pub(crate) threshold: Option<String>,
    /// Recharge target above the threshold: the crossing also asks for a top-up to it.
    #[arg(long, env = "NERUBA_RECHARGE_TO", requires = "threshold")]
    pub(crate) recharge_to: Option<String>,
    /// Remove the customer's rule in the currency instead of setting one.
    #[arg(long, env = "NERUBA_REMOVE", conflicts_with_all = ["threshold", "recharge_to"])]
    pub(crate) remove: bool,
    /// Catalog file (its tenants and units); the built-in sample catalog when absent.
    #[arg(long, env = "NERUBA_CATALOG")]
    pub(crate) catalog: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct ShowArgs {
    #[command(flatten)]
    pub(crate) ledger: LedgerArgs,
    /// Topic balance entries are read from.
    #[arg(long, env = "NERUBA_BALANCE_ENTRIES_TOPIC", default_value = topics::BALANCE_ENTRIES)]
    pub(crate) balance_entries_topic: String,
    /// Tenant of the customer.
    #[arg(long, env = "NERUBA_TENANT")]
    pub(crate) tenant: String,
    /// Customer to show.
    #[arg(long, env = "NERUBA_CUSTOMER")]
    pub(crate) customer: String,
    /// Stop once everything already written was read and nothing more arrived for this long
    /// (default: follow until interrupted); fail, naming the partition, if one cannot be read
    /// that far within 30 s more.
    #[arg(long, env = "NERUBA_EXIT_WHEN_IDLE", value_parser = humantime::parse_duration)]
    pub(crate) exit_when_idle: Option<Duration>,
}

/// Runs a credits command.
pub(crate) async fn run(command: CreditsCommand, shutdown: CancellationToken) -> Result<()> {
    match command {
        CreditsCommand::Grant(args) => grant(args).await,
        CreditsCommand::Void(args) => void(args).await,
        CreditsCommand::Rule(args) => rule(args).await,
        CreditsCommand::Show(args) => {
            let shutdown = shutdown_on_signal(&shutdown);
            tokio::task::spawn_blocking(move || {
                show(&args, &shutdown, &mut std::io::stdout().lock())
            })
            .await?
        }
    }
}

/// The gateway's writer (its producer, `acks=all` and idempotent) to the ledger topic.
fn writer(args: &LedgerArgs) -> Result<LedgerWriter> {
    let (brokers, options) = (args.brokers.clone(), args.kafka_opts.clone());
    let producer = neruba_kafka::Recoverable::new(move || {
        neruba_ingest_gateway::kafka::build_producer(&brokers, DELIVERY_TIMEOUT, &options)
    })?;
    Ok(LedgerWriter::new(producer, &args.ledger_topic))
}

/// `--catalog` (the built-in sample when absent), which must hold `tenant`.
fn catalog_with(path: Option<&PathBuf>, tenant: &str) -> Result<Catalog> {
    let catalog = match path {
        Some(path) => load_catalog(path)?,
        None => sample::catalog()?,
    };
    if catalog.tenant(tenant).is_none() {
        bail!("no tenant `{tenant}` in the catalog");
    }
    Ok(catalog)
}

async fn grant(args: GrantArgs) -> Result<()> {
    let catalog = catalog_with(args.catalog.as_ref(), &args.tenant)?;
    let request = GrantRequest {
        key: Some(args.key),
        amount: Some(serde_json::Value::String(args.amount)),
        currency: Some(args.currency),
        priority: args.priority.map(serde_json::Value::from),
        effective_at: args.effective_at,
        expires_at: args.expires_at,
        paid: None,
        metadata: None,
    };
    let grant = request
        .validate(&catalog, &args.tenant, &args.customer, event::now_ms())
        .map_err(|refused| anyhow::anyhow!("grant refused: {refused}"))?;
    let position = writer(&args.ledger)?
        .write(CreditRecord::Grant(&grant))
        .await
        .context("write the grant")?;
    print_line(&serde_json::to_string(&GrantAccepted {
        id: grant.id,
        status: "accepted".to_owned(),
        position,
    })?)
}

async fn void(args: VoidArgs) -> Result<()> {
    credit::check_customer(&args.customer).map_err(|r| anyhow::anyhow!("void refused: {r}"))?;
    if !credit::is_grant_id(&args.grant) {
        bail!(
            "void refused: invalid_grant_id: `{}` is not a grant id (`gr_` and 32 lower-case hex digits)",
            args.grant
        );
    }
    let void = Void {
        v: credit::VOID_RECORD_V,
        tenant: args.tenant,
        customer: args.customer,
        grant: args.grant,
        received_at: event::format_time_ms(event::now_ms()),
    };
    let position = writer(&args.ledger)?
        .write(CreditRecord::Void(&void))
        .await
        .context("write the void")?;
    print_line(&serde_json::to_string(&VoidAccepted {
        grant: void.grant,
        status: "accepted".to_owned(),
        position,
    })?)
}

async fn rule(args: RuleArgs) -> Result<()> {
    let catalog = catalog_with(args.catalog.as_ref(), &args.tenant)?;
    let now = event::now_ms();
    // clap requires `--threshold` unless `--remove`, and refuses the two together.
    let validated = if args.remove {
        credits::rule_removal(&catalog, &args.tenant, &args.customer, &args.currency, now)
    } else {
        RuleRequest {
            low_balance_threshold: args.threshold.map(serde_json::Value::String),
            recharge_to: args.recharge_to.map(serde_json::Value::String),
        }
        .validate(&catalog, &args.tenant, &args.customer, &args.currency, now)
    };
    let rule = validated.map_err(|refused| anyhow::anyhow!("rule refused: {refused}"))?;
    let position = writer(&args.ledger)?
        .write(CreditRecord::Rule(&rule))
        .await
        .context("write the rule")?;
    print_line(&serde_json::to_string(&RuleAccepted::new(rule, position))?)
}

fn print_line(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    Ok(())
}

/// Reads the ledger and balance-entries topics from the beginning and writes each of the
/// customer's records as one line, `{"topic", "partition", "offset", "record", "value"}`
/// (`record`: `grant`, `void`, `rule` or `balance_entry`), until `shutdown`, or until it has
/// read everything both topics held when it started and nothing more arrived for
/// `exit_when_idle`. Blocking.
fn show(args: &ShowArgs, shutdown: &CancellationToken, out: &mut dyn Write) -> Result<()> {
    let key = format!("{}/{}", args.tenant, args.customer);
    let reader = |topic: &str| {
        neruba_kafka::clients::topic_reader(
            &args.ledger.brokers,
            "neruba-credits-show",
            topic,
            &args.ledger.kafka_opts,
            Duration::from_secs(10),
        )
    };
    let ledger = reader(&args.ledger.ledger_topic)
        .with_context(|| format!("read the ledger topic `{}`", args.ledger.ledger_topic))?;
    // Before the balances stage has run the entries topic may not exist yet; the grants,
    // voids and rules are still worth showing. Any other failure (a broker too slow to
    // answer) is an error: a show without its entries would read as a customer without any.
    let entries = match reader(&args.balance_entries_topic) {
        Ok(consumer) => Some(consumer),
        Err(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition)) => {
            eprintln!(
                "balance entries topic `{}` does not exist yet; showing the ledger only",
                args.balance_entries_topic
            );
            None
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "read the balance entries topic `{}`",
                    args.balance_entries_topic
                )
            });
        }
    };
    // Where each topic ended, for a show that stops once idle: a slow first fetch must not
    // end it before it printed what was already written.
    let ends = |consumer: &BaseConsumer, topic: &str| {
        TopicEnds::fetch(consumer, topic, Duration::from_secs(10))
            .with_context(|| format!("read where topic `{topic}` ends"))
    };
    let mut ledger_ends = match args.exit_when_idle {
        Some(_) => Some(ends(&ledger, &args.ledger.ledger_topic)?),
        None => None,
    };
    let mut entries_ends = match (args.exit_when_idle, &entries) {
        (Some(_), Some(entries)) => Some(ends(entries, &args.balance_entries_topic)?),
        _ => None,
    };
    let mut last = Instant::now();
    while !shutdown.is_cancelled() {
        let mut got = poll_one(&ledger, &key, true, out)?;
        if let Some(entries) = &entries {
            got |= poll_one(entries, &key, false, out)?;
        }
        if got {
            last = Instant::now();
        } else if let (Some(idle), Some(ledger_ends)) = (args.exit_when_idle, ledger_ends.as_mut())
        {
            let mut readers = vec![(&ledger, ledger_ends)];
            if let (Some(entries), Some(entries_ends)) = (&entries, entries_ends.as_mut()) {
                readers.push((entries, entries_ends));
            }
            if TopicEnds::idle_done(idle, TopicEnds::PATIENCE, last, &mut readers)
                .map_err(anyhow::Error::msg)?
            {
                break;
            }
        }
    }
    Ok(())
}

/// Polls `consumer` once and prints its message if it is the customer's; whether a message
/// arrived.
fn poll_one(consumer: &BaseConsumer, key: &str, ledger: bool, out: &mut dyn Write) -> Result<bool> {
    let Some(message) = consumer.poll(Duration::from_millis(50)) else {
        return Ok(false);
    };
    let message = message?;
    if message.key() != Some(key.as_bytes()) {
        return Ok(true);
    }
    let record = if ledger {
        // A line item carries no record header; ticks have their own.
        let kind = message.headers().and_then(|headers| {
            headers
                .iter()
                .find(|h| h.key == topics::RECORD_HEADER)
                .and_then(|h| h.value)
        });
        match kind {
            Some(kind) if kind == GRANT_RECORD.as_bytes() => GRANT_RECORD,
            Some(kind) if kind == VOID_RECORD.as_bytes() => VOID_RECORD,
            Some(kind) if kind == RULE_RECORD.as_bytes() => RULE_RECORD,
            _ => return Ok(true),
        }
    } else {
        "balance_entry"
    };
    let value: serde_json::Value =
        match serde_json::from_slice(message.payload().unwrap_or_default()) {
            Ok(value) => value,
            Err(e) => {
                eprintln!(
                    "{} partition {} offset {}: not JSON: {e}",
                    message.topic(),
                    message.partition(),
                    message.offset()
                );
                return Ok(true);
            }
        };
    let line = serde_json::json!({
        "topic": message.topic(),
        "partition": message.partition(),
        "offset": message.offset(),
        "record": record,
        "value": value,
    });
    serde_json::to_writer(&mut *out, &line)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use neruba::embedded::EmbeddedKafka;

    #[tokio::test]
    async fn show_that_stops_once_idle_prints_what_was_written_even_from_a_slow_broker()
    -> Result<()> {
        // Was: the idle clock started before the first fetch, so on a broker slower to answer
        // than `--exit-when-idle` a support person was shown no grants at all.
        let kafka = EmbeddedKafka::start(&[(topics::LEDGER, 2), (topics::BALANCE_ENTRIES, 2)])?;
        let ledger = LedgerArgs {
            brokers: kafka.bootstrap_servers().to_owned(),
            ledger_topic: topics::LEDGER.to_owned(),
            kafka_opts: Vec::new(),
        };
        let catalog = sample::catalog()?;
        let mut written = Vec::new();
        for key in ["first", "second"] {
            let grant = GrantRequest {
                key: Some(key.to_owned()),
                amount: Some(serde_json::Value::String("5".to_owned())),
                currency: Some("USD".to_owned()),
                priority: None,
                effective_at: None,
                expires_at: None,
                paid: None,
                metadata: None,
            }
            .validate(&catalog, "acme", "customer-7", event::now_ms())
            .map_err(|refused| anyhow::anyhow!("grant refused: {refused}"))?;
            writer(&ledger)?
                .write(CreditRecord::Grant(&grant))
                .await
                .context("write the grant")?;
            written.push(grant.id);
        }
        // Every answer of the broker now takes three times the idle time.
        kafka.set_round_trip_time(Duration::from_millis(1500))?;
        let args = ShowArgs {
            ledger,
            balance_entries_topic: topics::BALANCE_ENTRIES.to_owned(),
            tenant: "acme".to_owned(),
            customer: "customer-7".to_owned(),
            exit_when_idle: Some(Duration::from_millis(500)),
        };
        let printed = tokio::task::spawn_blocking(move || -> Result<String> {
            let mut out = Vec::new();
            show(&args, &CancellationToken::new(), &mut out)?;
            Ok(String::from_utf8(out)?)
        })
        .await??;
        let shown = printed
            .lines()
            .map(|line| {
                let line: serde_json::Value = serde_json::from_str(line)?;
                Ok((
                    line["record"].as_str().unwrap_or_default().to_owned(),
                    line["value"]["id"].as_str().unwrap_or_default().to_owned(),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let expected: Vec<(String, String)> = written
            .into_iter()
            .map(|id| ("grant".to_owned(), id))
            .collect();
        assert_eq!(shown, expected);
        Ok(())
    }
}
