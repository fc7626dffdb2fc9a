//! Default topic names. Every component takes them as flags; these are the defaults.

/// Validated events, keyed by `tenant/customer`.
pub const EVENTS: &str = "neruba.events";
/// Events refused on the Kafka path, with their rejection code in a header.
pub const DEAD_LETTER: &str = "neruba.dead-letter";
/// Closed windows, compacted on (tenant, meter, customer, group, window).
pub const ROLLUPS: &str = "neruba.rollups";
/// Events from customers' own Kafka producers, one CloudEvent (structured JSON) per message,
/// each with its API key in the [`API_KEY_HEADER`] header; the gateway validates and routes them.
pub const RAW: &str = "neruba.raw";
/// Raw-topic header carrying the producer's API key (the same key as for HTTP).
pub const API_KEY_HEADER: &str = "neruba-api-key";

/// Priced line items, keyed by `tenant/customer`.
pub const LEDGER: &str = "neruba.ledger";

/// Dead-letter header: the stable rejection or refusal code.
pub const REJECT_CODE_HEADER: &str = "neruba-reject-code";
/// Dead-letter header: the human message.
pub const REJECT_MESSAGE_HEADER: &str = "neruba-reject-message";
/// Dead-letter header: the topic the message was read from.
pub const SOURCE_TOPIC_HEADER: &str = "neruba-source-topic";
/// Dead-letter header: its offset there.
pub const SOURCE_OFFSET_HEADER: &str = "neruba-source-offset";
/// Dead-letter header of a message kept in part: the length of its payload, whose first
/// bytes the dead letter holds (a payload too large to be produced again as it is).
pub const TRUNCATED_FROM_HEADER: &str = "neruba-truncated-from";

/// Events-topic header of a watermark tick: the aggregator writes one to an idle partition
/// (value: the new watermark, Unix milliseconds as text) and applies it when it reads it
/// back, so replaying a partition closes windows exactly where the live run did. Consumers
/// of the events topic skip messages that carry it.
pub const WATERMARK_HEADER: &str = "neruba-watermark";

/// Events-topic header of a watermark tick: the tenant whose clock it advances (event time is
/// kept per tenant within a partition). A tick without it applies to every tenant.
pub const WATERMARK_TENANT_HEADER: &str = "neruba-watermark-tenant";

/// Rollups-topic header of a rerun request ([`crate::ledger::Rerun`]); consumers of the
/// rollups topic other than the rater skip messages that carry it.
pub const RERUN_HEADER: &str = "neruba-rerun";

/// Ledger-topic header naming what a message is besides a line item (which carries none):
/// `grant`, `void` or `tick` (see [`crate::credit`]).
pub const RECORD_HEADER: &str = "neruba-record";

/// Balance entries, keyed `tenant/customer` (see [`crate::credit::BalanceEntry`]).
pub const BALANCE_ENTRIES: &str = "neruba.balance-entries";

/// Which partitions a consumer takes: through its consumer group (`None` where this is an
/// option), or statically, which needs no group coordination (a StatefulSet ordinal can name
/// its partitions; every replica restarting with the same list gets the same partitions back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assignment {
    /// Every partition of the topic.
    All,
    /// These partitions.
    Partitions(Vec<i32>),
}

impl std::str::FromStr for Assignment {
    type Err = String;

    /// `all`, or a comma-separated list of partition numbers such as `0,1,4`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.trim() == "all" {
            return Ok(Self::All);
        }
        let partitions = text
            .split(',')
            .map(|p| p.trim().parse::<i32>().ok().filter(|p| *p >= 0))
            .collect::<Option<Vec<i32>>>()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| format!("`{text}` is neither `all` nor a list of partition numbers"))?;
        Ok(Self::Partitions(partitions))
    }
}

impl Assignment {
    /// The partitions, given the topic's partition count.
    pub fn resolve(&self, topic_partitions: i32) -> Vec<i32> {
        match self {
            Self::All => (0..topic_partitions).collect(),
            Self::Partitions(list) => list.clone(),
        }
    }
}

/// FNV-1a partitioner: the same in every build and every component, so one customer's rollups
/// and line items always go to the same partition (and stay in order).
pub fn stable_partition(key: &str, partitions: i32) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let count = u32::try_from(partitions.max(1)).unwrap_or(1);
    i32::try_from(hash % count).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::{Assignment, stable_partition};

    #[test]
    fn assignments_parse_all_or_a_list() {
        assert_eq!("all".parse(), Ok(Assignment::All));
        assert_eq!(" 0, 2,5".parse(), Ok(Assignment::Partitions(vec![0, 2, 5])));
        assert!("".parse::<Assignment>().is_err());
        assert!("1,-2".parse::<Assignment>().is_err());
        assert_eq!(Assignment::All.resolve(3), vec![0, 1, 2]);
    }

    #[test]
    fn partitioning_is_stable_and_in_range() {
        // Pinned: changing the hash would reorder customers' items across a deploy.
        // FNV-1a 32 of the key modulo the count, computed independently.
        assert_eq!(stable_partition("acme/customer-7", 7), 4); // hash 2935456136
        assert_eq!(stable_partition("globex/c2", 8), 6); // hash 1929518886
        assert_eq!(stable_partition("", 7), 2); // the offset basis 2166136261
        assert_eq!(stable_partition("acme/c1", 0), 0);
        for i in 0..100 {
            let p = stable_partition(&format!("t/c{i}"), 3);
            assert!((0..3).contains(&p));
        }
    }
}
