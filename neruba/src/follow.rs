//! Reading a topic from its beginning, until interrupted or idle: what `neruba ledger tail` and
//! `neruba events tail` share.

use neruba_kafka::clients::TopicEnds;
use rdkafka::message::BorrowedMessage;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Reads `topic` from the beginning (as `group`, committing nothing) and hands each message to
/// `each`, until `shutdown`, or until it has read everything the topic held when it started
/// and nothing more arrived for `exit_when_idle`. Blocking.
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
    // Only a tail that stops once idle needs to know where the topic ended.
    let mut ends = match exit_when_idle {
        Some(_) => Some(TopicEnds::fetch(&consumer, topic, Duration::from_secs(10))?),
        None => None,
    };
    let mut last = Instant::now();
    while !shutdown.is_cancelled() {
        let message = match consumer.poll(Duration::from_millis(100)) {
            None => {
                if let (Some(idle), Some(ends)) = (exit_when_idle, ends.as_mut())
                    && TopicEnds::idle_done(
                        idle,
                        TopicEnds::PATIENCE,
                        last,
                        &mut [(&consumer, ends)],
                    )
                    .map_err(anyhow::Error::msg)?
                {
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
