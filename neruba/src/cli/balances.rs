//! `neruba balances` (a member of the balances consumer group). Its stage flags
//! ([`BalancesArgs`]) are shared with `dev`.

use super::{load_catalog, millis, parse_key_value};
use anyhow::Result;
use clap::Args;
use neruba_schemas::topics;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub(crate) struct BalancesCommandArgs {
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    #[arg(long, env = "NERUBA_BROKERS")]
    pub(crate) brokers: String,
    /// Catalog file (`.toml`, `.yaml` or `.yml`): its longest meter window is how long past a
    /// grant's expiry (beside `--balances-expiry-grace`) the stage waits from the start.
    /// Without it, the longest window a ledger partition has priced so far.
    #[arg(long, env = "NERUBA_CATALOG")]
    pub(crate) catalog: Option<PathBuf>,
    /// Address `/metrics`, `/healthz` and `/readyz` listen on.
    #[arg(
        long,
        env = "NERUBA_BALANCES_OPS_LISTEN",
        default_value = "0.0.0.0:9093"
    )]
    pub(crate) ops_listen: SocketAddr,
    /// Directory holding one RocksDB database per assigned ledger partition.
    #[arg(long, env = "NERUBA_BALANCES_STATE_DIR")]
    pub(crate) state_dir: PathBuf,
    /// Topic line items, grants and voids are read from.
    #[arg(long, env = "NERUBA_LEDGER_TOPIC", default_value = topics::LEDGER)]
    pub(crate) ledger_topic: String,
    /// Topic ledger records that cannot be read are produced to, with their code.
    #[arg(long, env = "NERUBA_DEAD_LETTER_TOPIC", default_value = topics::DEAD_LETTER)]
    pub(crate) dead_letter_topic: String,
    /// The aggregators' correction horizon (their `--aggregator-correction-horizon`): how late
    /// a line item for a period can still come; `--finalize-after` may not exceed it.
    #[arg(long, env = "NERUBA_BALANCES_CORRECTION_HORIZON", default_value = "35days", value_parser = humantime::parse_duration)]
    pub(crate) correction_horizon: Duration,
    #[command(flatten)]
    pub(crate) balances: BalancesArgs,
    /// Extra librdkafka setting `key=value`; repeatable, comma-separated in env.
    #[arg(long = "kafka-opt", env = "NERUBA_KAFKA_OPTS", value_delimiter = ',', value_parser = parse_key_value)]
    pub(crate) kafka_opts: Vec<(String, String)>,
}

/// Balances settings shared by `balances` and `dev`.
#[derive(Debug, Args)]
pub(crate) struct BalancesArgs {
    /// Consumer group of the balances stage.
    #[arg(
        long,
        env = "NERUBA_BALANCES_GROUP_ID",
        default_value = "neruba-balances"
    )]
    pub(crate) balances_group_id: String,
    /// Static group membership id (e.g. the pod name), so a restart gets its partitions back
    /// at once.
    #[arg(long, env = "NERUBA_BALANCES_INSTANCE_ID")]
    pub(crate) balances_instance_id: Option<String>,
    /// Take these ledger partitions (`all`, or `0,1,4`) statically instead of through the group.
    #[arg(long, env = "NERUBA_BALANCES_ASSIGN")]
    pub(crate) balances_assign: Option<topics::Assignment>,
    /// Topic balance entries are produced to (keyed `tenant/customer`).
    #[arg(long, env = "NERUBA_BALANCE_ENTRIES_TOPIC", default_value = topics::BALANCE_ENTRIES)]
    pub(crate) balance_entries_topic: String,
    /// A grant expires once the wall clock passes its `expires_at` plus this plus the longest
    /// window the ledger partition has priced (at most a day): long enough for the line items
    /// of the windows that began before its expiry to arrive first (the aggregator closes a
    /// window up to its grace plus its idle timeout after it ends).
    #[arg(long, env = "NERUBA_BALANCES_EXPIRY_GRACE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub(crate) balances_expiry_grace: Duration,
    /// A statement is `draft` from its period's end until this much later, then `final`
    /// (items for it after that go to the earliest later statement not yet final). At most the
    /// correction horizon.
    #[arg(long, env = "NERUBA_BALANCES_FINALIZE_AFTER", default_value = "3days", value_parser = humantime::parse_duration)]
    pub(crate) finalize_after: Duration,
    /// Most ledger records applied before the batch's entries are delivered and its books
    /// written (a batch ends sooner when nothing more is queued).
    #[arg(long, env = "NERUBA_BALANCES_MAX_BATCH", default_value_t = neruba_balances::DEFAULT_MAX_BATCH)]
    pub(crate) balances_max_batch: usize,
    /// Bytes of customers' books a worker holds decoded before its batch ends, estimated (a
    /// book at 5 bytes for each byte stored and 1 KiB, a statement line put back into one or
    /// carried by an entry at 1 KiB and its text); a tick due for more customers than fit
    /// is applied in parts within it (0: every record in a batch of its own, and a tick a
    /// customer at a time). The worker may hold twice this for a moment, while a full batch's
    /// books are freed.
    #[arg(long, env = "NERUBA_BALANCES_BOOKS_HELD_BYTES", default_value_t = neruba_balances::state::BOOKS_HELD_BYTES)]
    pub(crate) balances_books_held_bytes: usize,
    /// Bytes of books a worker keeps in their stored form between batches, to decode instead
    /// of reading them again (0: none).
    #[arg(long, env = "NERUBA_BALANCES_BOOKS_KEPT_BYTES", default_value_t = neruba_balances::state::BOOKS_KEPT_BYTES)]
    pub(crate) balances_books_kept_bytes: usize,
    /// `/readyz` turns false when a ledger partition is behind and has not moved for this long.
    #[arg(long, env = "NERUBA_BALANCES_STUCK_AFTER", default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) balances_stuck_after: Duration,
}

impl BalancesArgs {
    /// The stage's config; `correction_horizon` is the aggregators' (how late an item for a
    /// period can come), which the finalisation delay may not exceed.
    pub(crate) fn config(
        &self,
        brokers: &str,
        ledger_topic: &str,
        dead_letter_topic: &str,
        state_dir: &Path,
        correction_horizon: Duration,
    ) -> Result<neruba_balances::Config> {
        if self.finalize_after > correction_horizon {
            anyhow::bail!(
                "--finalize-after ({}) exceeds the correction horizon ({}): statements must be \
                 final by the time no correction can come any more",
                humantime::format_duration(self.finalize_after),
                humantime::format_duration(correction_horizon)
            );
        }
        if self.balances_max_batch == 0 {
            anyhow::bail!("--balances-max-batch must be positive");
        }
        let mut config = neruba_balances::Config::new(brokers, state_dir);
        config.stage.max_batch = self.balances_max_batch;
        config.stage.group_id = self.balances_group_id.clone();
        config.stage.instance_id = self.balances_instance_id.clone();
        config.stage.assignment = self.balances_assign.clone();
        config.stage.input_topic = ledger_topic.to_owned();
        config.stage.dead_letter_topic = dead_letter_topic.to_owned();
        config.stage.stuck_after = self.balances_stuck_after;
        config.entries_topic = self.balance_entries_topic.clone();
        config.expiry_grace_ms = millis(self.balances_expiry_grace)?;
        config.finalize_after_ms = millis(self.finalize_after)?;
        config.books_held_bytes = self.balances_books_held_bytes;
        config.books_kept_bytes = self.balances_books_kept_bytes;
        Ok(config)
    }
}

/// The stage's config from the command's arguments (reads the catalog if one is given).
fn stage_config(args: &BalancesCommandArgs) -> Result<neruba_balances::Config> {
    let mut config = args.balances.config(
        &args.brokers,
        &args.ledger_topic,
        &args.dead_letter_topic,
        &args.state_dir,
        args.correction_horizon,
    )?;
    if let Some(path) = &args.catalog {
        config.window_floor_ms = load_catalog(path)?.longest_window_ms();
    }
    config.stage.kafka_options = args.kafka_opts.clone();
    Ok(config)
}

/// Runs a balances stage until `shutdown` (or SIGTERM) stops it.
pub(crate) async fn run(args: BalancesCommandArgs, shutdown: CancellationToken) -> Result<()> {
    let config = stage_config(&args)?;
    super::stage::run(
        "balances",
        &shutdown,
        args.ops_listen,
        None,
        |registry, shutdown| {
            let running = neruba_balances::start(config, registry, shutdown)?;
            Ok((running.health(), async move { Ok(running.wait().await?) }))
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// The settings `neruba dev` takes for both stages.
    #[derive(Debug, Parser)]
    struct Defaults {
        #[command(flatten)]
        aggregator: super::super::aggregator::AggregatorArgs,
        #[command(flatten)]
        balances: BalancesArgs,
    }

    #[derive(Debug, Parser)]
    struct Command {
        #[command(flatten)]
        balances: BalancesCommandArgs,
    }

    #[test]
    fn a_catalog_sets_how_long_past_an_expiry_the_stage_waits_from_the_start() {
        let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/../catalog/sample.toml");
        let args = [
            "neruba",
            "--brokers",
            "127.0.0.1:9092",
            "--state-dir",
            "state",
        ];
        let without = Command::try_parse_from(args).expect("arguments");
        assert_eq!(
            stage_config(&without.balances)
                .expect("config")
                .window_floor_ms,
            0
        );
        let with = Command::try_parse_from(args.into_iter().chain(["--catalog", sample]))
            .expect("arguments");
        // The sample's storage meter: 5-minute windows.
        assert_eq!(
            stage_config(&with.balances)
                .expect("config")
                .window_floor_ms,
            5 * 60_000
        );
    }

    #[test]
    fn by_default_a_grant_outlasts_the_pricing_of_the_windows_before_its_expiry() {
        // Was: with no grace the expiry tick, written when the wall clock passed
        // `expires_at`, reached the ledger before the line items of the windows just before
        // it, which the aggregator closes up to its grace plus its idle timeout later: their
        // usage went uncovered though credit was left for it.
        let defaults = Defaults::try_parse_from(["neruba"]).expect("the defaults parse");
        let (aggregator, balances) = (&defaults.aggregator, &defaults.balances);
        let window_closed = aggregator.grace + aggregator.idle_timeout;
        // Room too for a stage as far behind as it may be before it is reported stuck.
        assert!(
            balances.balances_expiry_grace >= window_closed + aggregator.stuck_after,
            "{balances:?} against {aggregator:?}"
        );
        let config = balances
            .config(
                "127.0.0.1:9092",
                "neruba.ledger",
                "neruba.dead-letter",
                Path::new("state"),
                Duration::from_secs(35 * 86_400),
            )
            .expect("config");
        assert_eq!(
            config.expiry_grace_ms,
            neruba_balances::DEFAULT_EXPIRY_GRACE_MS
        );
    }
}
