//! Tails that stop once idle (`neruba events tail`, `neruba ledger tail`, `--exit-when-idle`):
//! they print everything the topic held when they started, however slow the broker.

use anyhow::Result;
use neruba::embedded::EmbeddedKafka;
use neruba_schemas::{Event, topics};
use neruba_tests::{EventWriter, event};
use serde_json::{Value, json};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Five events written to the events topic of `partitions` partitions, then every answer of
/// the broker slowed to `round_trip`, then a tail that stops after 500 ms idle: it must print
/// all five.
async fn a_slow_broker_tailed(partitions: i32, round_trip: Duration) -> Result<()> {
    let kafka = EmbeddedKafka::start(&[(topics::EVENTS, partitions)])?;
    let writer = EventWriter::new(kafka.bootstrap_servers())?;
    let at = neruba_schemas::event::parse_time_ms("2026-11-10T12:00:00Z")?;
    let events: Vec<Event> = (0..5)
        .map(|i| {
            event(
                "acme",
                &format!("e-{i}"),
                "api_call",
                "c1",
                at + i,
                json!({}),
            )
        })
        .collect();
    writer.send(0, &events[..3]).await?;
    writer.send(partitions - 1, &events[3..]).await?;
    kafka.set_round_trip_time(round_trip)?;
    let bootstrap = kafka.bootstrap_servers().to_owned();
    let (counts, printed) = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut out = Vec::new();
        let counts = neruba::events::tail(
            &bootstrap,
            &[],
            topics::EVENTS,
            None,
            Some(Duration::from_millis(500)),
            &CancellationToken::new(),
            &mut out,
        )?;
        Ok((counts, String::from_utf8(out)?))
    })
    .await??;
    assert_eq!((counts.printed, counts.undecodable), (5, 0));
    let mut ids = printed
        .lines()
        .map(|line| {
            let line: Value = serde_json::from_str(line)?;
            Ok(line["id"].as_str().unwrap_or_default().to_owned())
        })
        .collect::<Result<Vec<_>>>()?;
    ids.sort_unstable();
    assert_eq!(ids, ["e-0", "e-1", "e-2", "e-3", "e-4"]);
    Ok(())
}

#[tokio::test]
async fn a_tail_that_stops_once_idle_prints_what_was_written_even_from_a_slow_broker() -> Result<()>
{
    // Was: the idle clock started before the first fetch, so a broker slower to answer than
    // the idle time ended the tail before it printed anything. Every answer now takes three
    // times the idle time.
    a_slow_broker_tailed(2, Duration::from_millis(1500)).await
}

#[tokio::test]
async fn a_tail_keeps_its_connection_to_a_broker_slower_than_a_second() -> Result<()> {
    // Was: once idle with a partition not read to its end, the tail asked for the partition's
    // oldest offset every 2 s with a 1 s timeout, over its consumer's own connection, which
    // librdkafka closes when a request times out (`socket.max.fails`). Against a broker taking
    // 3 s to answer, the consumer lost its connection, and the fetch in flight on it, every
    // 2 s, and the tail gave up with the partition unread. (With one partition the consumer's
    // first fetch is still in flight when the tail first finds itself idle; with two, finding
    // where each ended took long enough that the fetch was in and the test above passed but
    // now and then.)
    a_slow_broker_tailed(1, Duration::from_secs(3)).await
}
