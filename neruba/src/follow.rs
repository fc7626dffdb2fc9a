//! Reading a topic from its beginning, until interrupted or idle: what `neruba ledger tail` and
//! `neruba events tail` share.

use rdkafka::message::BorrowedMessage;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Reads `topic` from the beginning (as `group`, committing nothing) and hands each message to
/// `each`, until `shutdown`, or until nothing arrived for `exit_when_idle`. Blocking.
pub(crate) fn follow(
    brokers: &str,
    kafka_options: &[(String, String)],
    group: &str,
    topic: &str,
    exit_when_idle: Option<Duration>,
    shutdown: &CancellationToken,
    mut each: impl FnMut(&BorrowedMessage<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let consumer = neruba_kafka::clients::topic_reader(
        brokers,
        group,
        topic,
        kafka_options,
        Duration::from_secs(10),
    )?;
    let mut last = Instant::now();
    while !shutdown.is_cancelled() {
        let message = match consumer.poll(Duration::from_millis(100)) {
            None => {
                if exit_when_idle.is_some_and(|idle| last.elapsed() >= idle) {
                    break;
                }
                continue;
            }
            Some(message) => message?,
        };
        last = Instant::now();
        each(&message)?;
    }
    Ok(())
}
