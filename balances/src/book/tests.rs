//! The SPEC's invariants over random interleavings of grants, voids, ticks and items, and the
//! named cases.

use super::*;
use crate::state::{PartitionState, Record};
use neruba_schemas::credit::{BalanceRule, GrantTerms, StatementStatus, grant_id};
use neruba_schemas::event::format_time_ms;
use neruba_schemas::ledger::Kind;
use neruba_stage::Input;
use proptest::prelude::*;
use std::cmp::Ordering;

const T0: i64 = 1_796_083_200_000; // 2026-12-01T00:00:00Z
const MIN: i64 = 60_000;
/// The billing period of the items these tests make: 30 days.
const PERIOD: i64 = 30 * 86_400_000;

fn d(text: &str) -> Decimal {
    text.parse().expect("decimal")
}

fn grant(
    key: &str,
    amount: Decimal,
    currency: &str,
    priority: u16,
    effective: Option<i64>,
    expires: Option<i64>,
) -> Grant {
    Grant {
        v: 1,
        id: grant_id("acme", "c1", key),
        tenant: "acme".into(),
        customer: "c1".into(),
        key: key.into(),
        terms: GrantTerms {
            amount,
            currency: currency.into(),
            priority,
            effective_at: effective.map(format_time_ms),
            expires_at: expires.map(format_time_ms),
            paid: None,
            metadata: BTreeMap::new(),
        },
        received_at: format_time_ms(T0),
    }
}

fn item(
    id: &str,
    meter: &str,
    period: i64,
    window: i64,
    amount: Decimal,
    currency: &str,
) -> LineItem {
    LineItem {
        v: 1,
        id: id.into(),
        kind: if amount.is_sign_negative() {
            Kind::Adjustment
        } else {
            Kind::Usage
        },
        tenant: "acme".into(),
        customer: "c1".into(),
        meter: meter.into(),
        group: BTreeMap::new(),
        period_start: format_time_ms(period),
        period_end: format_time_ms(period + PERIOD),
        window_start: format_time_ms(window),
        window_end: format_time_ms(window + MIN),
        window_quantity: Decimal::ONE,
        window_events: 1,
        period_quantity: Decimal::ONE,
        amount,
        period_amount: amount,
        currency: currency.into(),
        price_plan: "p".into(),
        price_version: 1,
        revision: 1,
        supersedes: None,
    }
}

/// A void of grant `id` of customer c1, in record version `v`.
fn void_of(id: &str, v: u8) -> credit::Void {
    credit::Void {
        v,
        tenant: "acme".into(),
        customer: "c1".into(),
        grant: id.to_owned(),
        received_at: format_time_ms(T0),
    }
}

#[derive(Debug, Clone)]
enum Op {
    Grant {
        key: u8,
        cents: i64,
        currency: bool,
        priority: u16,
        effective: Option<i64>,
        expires: Option<i64>,
        /// The record version (1 to [`credit::GRANT_RECORD_V`]): each folds as it did when
        /// written.
        v: u8,
    },
    Void {
        key: u8,
        /// The record version (1 to [`credit::VOID_RECORD_V`]).
        v: u8,
    },
    Tick {
        at: i64,
    },
    Item {
        n: u16,
        meter: bool,
        /// The billing period: the one before T0's, T0's, the one after.
        period: u8,
        /// The group: none, or one of values of different lengths.
        group: u8,
        window: i64,
        cents: i64,
        currency: bool,
    },
    /// Sets (or with `None`, removes) the USD rule.
    Rule {
        rule: Option<(i64, Option<i64>)>,
    },
    /// The payment side answers the outstanding USD top-up request, if any, with a grant.
    Topup {
        cents: i64,
    },
}

fn currency(usd: bool) -> &'static str {
    if usd { "USD" } else { "EUR" }
}

fn op() -> impl Strategy<Value = Op> {
    let minute = 0_i64..120;
    // Weighted so that the tick past T0's period (after which every grant with an expiry
    // arrives expired) comes late in a run, if at all.
    prop_oneof![
        4 => (
            0_u8..6,
            1_i64..10_000,
            any::<bool>(),
            0_u16..3,
            proptest::option::of(0_i64..60),
            proptest::option::of(30_i64..150),
            1_u8..=credit::GRANT_RECORD_V
        )
            .prop_map(
                |(key, cents, currency, priority, effective, expires, v)| Op::Grant {
                    key,
                    cents,
                    currency,
                    priority,
                    effective: effective.map(|m| T0 + m * MIN),
                    expires: expires.map(|m| T0 + m * MIN),
                    v,
                }
            ),
        4 => (0_u8..7, 1_u8..=credit::VOID_RECORD_V).prop_map(|(key, v)| Op::Void { key, v }),
        4 => proptest::option::of((0_i64..5_000, proptest::option::of(1_i64..10_000)))
            .prop_map(|rule| Op::Rule { rule }),
        4 => (1_i64..10_000).prop_map(|cents| Op::Topup { cents }),
        4 => minute.clone().prop_map(|m| Op::Tick { at: T0 + m * MIN }),
        // Past the end of T0's period: its statement turns draft, then final.
        1 => minute.clone().prop_map(|m| Op::Tick {
            at: T0 + PERIOD + m * MIN
        }),
        4 => (
            0_u16..40,
            any::<bool>(),
            0_u8..3,
            0_u8..4,
            minute,
            -3_000_i64..6_000,
            any::<bool>()
        )
            .prop_map(|(n, meter, period, group, m, cents, currency)| Op::Item {
                n,
                meter,
                period,
                group,
                window: T0 + m * MIN,
                cents,
                currency,
            }),
    ]
}

/// Everything one run produced, to check against.
struct Run {
    book: Book,
    entries: Vec<BalanceEntry>,
    /// Per series key: the sum of its distinct items' amounts.
    item_sums: BTreeMap<String, Decimal>,
    /// The records the book was given, in order, as the ledger topic carries them.
    records: Vec<(Vec<u8>, Record)>,
}

const GRACE: i64 = 0;
/// The statements' finalisation delay in these tests: half an hour, so runs reach `final`.
const FINAL: i64 = 30 * MIN;

fn run(ops: &[Op], check_burn_order: bool) -> Run {
    let mut book = Book::default();
    let mut entries = Vec::new();
    let mut records = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut item_sums: BTreeMap<String, Decimal> = BTreeMap::new();
    let mut clock = i64::MIN;
    // The rule model, written apart from `rules.rs`: the rule, whether the balance is known to
    // be below it, and the outstanding request.
    let mut rule: Option<BalanceRule> = None;
    let mut below = false;
    let mut outstanding: Option<String> = None;
    for op in ops {
        match op {
            // A removed rule's request stays outstanding until a grant resolves it.
            Op::Rule { rule: None } => {
                rule = None;
                below = false;
            }
            Op::Rule { rule: Some(_) } if rule.is_none() => below = false,
            _ => {}
        }
        let produced = match op {
            Op::Grant {
                key,
                cents,
                currency: usd,
                priority,
                effective,
                expires,
                v,
            } => {
                let expires = match (effective, expires) {
                    (Some(from), Some(to)) if to <= from => None,
                    _ => *expires,
                };
                let g = Grant {
                    v: *v,
                    ..grant(
                        &format!("k{key}"),
                        Decimal::new(*cents, 2),
                        currency(*usd),
                        *priority,
                        *effective,
                        expires,
                    )
                };
                records.push((credit::encode(&g), Record::Grant));
                book.apply_grant(&g, clock, GRACE)
            }
            Op::Void { key, v } => {
                let void = void_of(&grant_id("acme", "c1", &format!("k{key}")), *v);
                records.push((credit::encode(&void), Record::Void));
                book.apply_void(&void)
            }
            // A tick that does not move the clock on changes nothing (the partition reads
            // ticks that way: its clock never goes back).
            Op::Tick { at } if *at <= clock => continue,
            Op::Tick { at } => {
                clock = *at;
                let tick = credit::Tick {
                    v: 1,
                    at_ms: clock,
                    finalize_after_ms: Some(FINAL),
                };
                records.push((credit::encode(&tick), Record::Tick));
                book.apply_tick("acme", "c1", clock, GRACE, FINAL)
            }
            Op::Rule { rule: new } => {
                let new = new.map(|(threshold, recharge)| BalanceRule {
                    low_balance_threshold: Decimal::new(threshold, 2),
                    recharge_to: recharge.map(|r| Decimal::new(threshold + r, 2)),
                });
                rule.clone_from(&new);
                let record = RuleRecord {
                    v: credit::RULE_RECORD_V,
                    tenant: "acme".into(),
                    customer: "c1".into(),
                    currency: "USD".into(),
                    rule: new,
                    received_at: format_time_ms(T0),
                };
                records.push((credit::encode(&record), Record::Rule));
                book.apply_rule(&record)
            }
            Op::Topup { cents } => {
                let Some(request) = outstanding.take() else {
                    continue;
                };
                let g = Grant {
                    v: credit::GRANT_RECORD_V,
                    ..grant(&request, Decimal::new(*cents, 2), "USD", 10, None, None)
                };
                records.push((credit::encode(&g), Record::Grant));
                book.apply_grant(&g, clock, GRACE)
            }
            Op::Item {
                n,
                meter,
                period,
                group,
                window,
                cents,
                currency: usd,
            } => {
                let period_start = T0 + (i64::from(*period) - 1) * PERIOD;
                let mut li = item(
                    &format!("li_{n}_{meter}_{period}_{group}_{cents}"),
                    if *meter { "m1" } else { "m2" },
                    period_start,
                    *window,
                    Decimal::new(*cents, 2),
                    currency(*usd),
                );
                if *group > 0 {
                    let value = ["a", "bb", "a-longer-one"][usize::from(*group - 1)];
                    li.group = [("project".to_owned(), value.to_owned())].into();
                }
                if !seen.insert(li.id.clone()) {
                    continue;
                }
                let series = Series {
                    meter: li.meter.clone(),
                    group: li.group.clone(),
                    period_start: li.period_start.clone(),
                };
                *item_sums
                    .entry(series_key(&li.currency, &series))
                    .or_default() += li.amount;
                records.push((li.encode(), Record::LineItem));
                let before = book.clone();
                let produced = book.apply_item(&li);
                if check_burn_order && li.amount > Decimal::ZERO {
                    assert_eq!(
                        consumption(&produced),
                        reference_consumption(&before, &li),
                        "burn-down order for {li:?}"
                    );
                }
                produced
            }
        };
        // What the rule model expects of this record: a crossing below gives one
        // `low_balance`, and a top-up unless one is outstanding.
        let balance = book.balance("USD");
        let alerts: Vec<&BalanceEntry> = produced
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::LowBalance | EntryKind::TopupRequested))
            .collect();
        let mut expected = Vec::new();
        if let Some(rule) = &rule {
            if balance >= rule.low_balance_threshold {
                below = false;
            } else if !below {
                below = true;
                expected.push((EntryKind::LowBalance, Decimal::ZERO));
                if let (Some(to), None) = (rule.recharge_to, &outstanding) {
                    expected.push((EntryKind::TopupRequested, to - balance));
                }
            }
        }
        assert_eq!(
            alerts
                .iter()
                .map(|e| (e.kind, e.amount))
                .collect::<Vec<_>>(),
            expected,
            "{op:?} at balance {balance}"
        );
        for alert in alerts {
            assert_eq!(alert.rule.as_ref(), rule.as_ref());
            assert_eq!(alert.balance_after, balance);
            if alert.kind == EntryKind::TopupRequested {
                outstanding = Some(alert.id.clone());
            }
        }
        entries.extend(produced);
    }
    Run {
        book,
        entries,
        item_sums,
        records,
    }
}

fn consumption(entries: &[BalanceEntry]) -> Vec<(Option<String>, Decimal)> {
    entries
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::Consume | EntryKind::Uncovered))
        .map(|e| {
            (
                e.grant.clone(),
                if e.kind == EntryKind::Consume {
                    -e.amount
                } else {
                    e.amount
                },
            )
        })
        .collect()
}

/// The burn-down order written independently of [`burn_order`]: a comparator over the SPEC's
/// four keys, then a greedy draw.
fn reference_consumption(book: &Book, li: &LineItem) -> Vec<(Option<String>, Decimal)> {
    let start = neruba_schemas::event::parse_time_ms(&li.window_start).expect("time");
    let mut eligible: Vec<&GrantState> = book
        .grants
        .values()
        .filter(|g| {
            g.status == Status::Active
                && g.remaining > Decimal::ZERO
                && g.grant.terms.currency == li.currency
        })
        .filter(|g| g.grant.terms.effective_ms() <= start)
        .filter(|g| match g.grant.terms.expires_ms() {
            Some(end) => start < end,
            None => true,
        })
        .map(|g| &**g)
        .collect();
    eligible.sort_by(|a, b| {
        let (a, b) = (&a.grant, &b.grant);
        a.terms
            .priority
            .cmp(&b.terms.priority)
            .then_with(|| match (a.terms.expires_ms(), b.terms.expires_ms()) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(x), Some(y)) => x.cmp(&y),
            })
            .then_with(|| a.terms.effective_ms().cmp(&b.terms.effective_ms()))
            .then_with(|| a.id.cmp(&b.id))
    });
    let mut left = li.amount;
    let mut out = Vec::new();
    for g in eligible {
        if left <= Decimal::ZERO {
            break;
        }
        let take = if g.remaining < left {
            g.remaining
        } else {
            left
        };
        out.push((Some(g.grant.id.clone()), take));
        left -= take;
    }
    if left > Decimal::ZERO {
        out.push((None, left));
    }
    out
}

fn check_invariants(r: &Run) {
    // Sequence numbers 1..n without gaps.
    for (i, e) in r.entries.iter().enumerate() {
        assert_eq!(e.seq, u64::try_from(i + 1).expect("seq"), "{e:?}");
    }
    // Per currency: before(n) = after(n−1); the balance moves only by the balance kinds, and
    // their sum is the balance.
    let mut last: BTreeMap<&str, Decimal> = BTreeMap::new();
    let mut sums: BTreeMap<&str, Decimal> = BTreeMap::new();
    for e in &r.entries {
        if e.currency.is_empty() {
            assert_eq!(e.kind, EntryKind::GrantRefused);
            continue;
        }
        let previous = last.get(e.currency.as_str()).copied().unwrap_or_default();
        assert_eq!(e.balance_before, previous, "{e:?}");
        let moves = e.kind.moves_balance();
        let expected_after = if moves {
            e.balance_before + e.amount
        } else {
            e.balance_before
        };
        assert_eq!(e.balance_after, expected_after, "{e:?}");
        if moves {
            *sums.entry(&e.currency).or_default() += e.amount;
        }
        last.insert(&e.currency, e.balance_after);
    }
    for (currency, sum) in &sums {
        assert_eq!(*sum, r.book.balance(currency), "{currency}");
    }
    // Each grant: remaining = amount − consumed + restored − expired − voided ≥ 0.
    for g in r.book.grants.values() {
        assert_eq!(
            g.remaining,
            g.grant.terms.amount - g.consumed + g.restored - g.expired - g.voided,
            "{g:?}"
        );
        assert!(g.remaining >= Decimal::ZERO, "{g:?}");
        if g.status != Status::Active {
            assert_eq!(g.remaining, Decimal::ZERO, "{g:?}");
        }
    }
    // Each grant's amounts are its entries': grant, consume, restore, expire and void.
    for g in r.book.grants.values() {
        let sum = |kind: EntryKind| -> Decimal {
            r.entries
                .iter()
                .filter(|e| e.kind == kind && e.grant.as_deref() == Some(g.grant.id.as_str()))
                .map(|e| e.amount)
                .sum()
        };
        assert_eq!(
            (
                sum(EntryKind::Grant),
                -sum(EntryKind::Consume),
                sum(EntryKind::Restore),
                -sum(EntryKind::Expire),
                -sum(EntryKind::Void),
            ),
            (
                g.grant.terms.amount,
                g.consumed,
                g.restored,
                g.expired,
                g.voided
            ),
            "{g:?}"
        );
    }
    // Per series: Σ consume − Σ restore + Σ uncovered = Σ line-item amounts.
    let mut by_series: BTreeMap<String, Decimal> = BTreeMap::new();
    for e in &r.entries {
        let Some(series) = &e.series else { continue };
        let part = match e.kind {
            EntryKind::Consume => -e.amount,
            EntryKind::Restore => -e.amount,
            EntryKind::Uncovered => e.amount,
            _ => continue,
        };
        *by_series
            .entry(series_key(&e.currency, series))
            .or_default() += part;
    }
    for (key, sum) in &r.item_sums {
        assert_eq!(
            by_series.get(key).copied().unwrap_or_default(),
            *sum,
            "{key}"
        );
    }
    // Ids are unique.
    let ids: std::collections::BTreeSet<&str> = r.entries.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), r.entries.len());
    check_statements(r);
}

/// Every statement adds up; every item amount is on exactly one statement (final ones from
/// the entries, the others and the carried ones from the book); each is final at most once.
fn check_statements(r: &Run) {
    let mut finals = std::collections::BTreeSet::new();
    let (mut listed, mut due) = (Decimal::ZERO, Decimal::ZERO);
    let adds_up = |s: &neruba_schemas::credit::Statement| {
        assert_eq!(
            s.usage + s.prior_period_amount,
            s.credit_applied + s.amount_due,
            "{s:?}"
        );
        assert_eq!(
            s.usage,
            s.lines.iter().map(|l| l.amount).sum::<Decimal>(),
            "{s:?}"
        );
        assert_eq!(
            s.prior_period_amount,
            s.prior_period.iter().map(|l| l.amount).sum::<Decimal>(),
            "{s:?}"
        );
        // Line by line too: each line's amount was drawn from credit or is due, and the lines
        // share out the statement's credit and due exactly.
        let lines = || s.lines.iter().chain(&s.prior_period);
        for line in lines() {
            assert_eq!(line.amount, line.credit_applied + line.amount_due, "{s:?}");
        }
        assert_eq!(
            s.credit_applied,
            lines().map(|l| l.credit_applied).sum::<Decimal>(),
            "{s:?}"
        );
        assert_eq!(
            s.amount_due,
            lines().map(|l| l.amount_due).sum::<Decimal>(),
            "{s:?}"
        );
    };
    for e in &r.entries {
        let Some(s) = &e.statement else { continue };
        adds_up(s);
        assert_eq!(e.amount, s.amount_due);
        assert!(!finals.contains(&s.id), "changed after final: {e:?}");
        if e.kind == EntryKind::StatementFinal {
            finals.insert(s.id.clone());
            listed += s.usage + s.prior_period_amount;
            due += s.amount_due;
        }
    }
    for state in r.book.statements.values() {
        adds_up(&state.statement);
        listed += state.statement.usage + state.statement.prior_period_amount;
        due += state.statement.amount_due;
    }
    for carried in r.book.carried.values() {
        listed += carried.amount;
        due += carried.amount_due;
    }
    assert_eq!(listed, r.item_sums.values().copied().sum::<Decimal>());
    let uncovered: Decimal = r
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::Uncovered)
        .map(|e| e.amount)
        .sum();
    assert_eq!(due, uncovered);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn every_interleaving_keeps_the_money_invariants(ops in proptest::collection::vec(op(), 0..60)) {
        let first = run(&ops, true);
        check_invariants(&first);
        // A replay into a fresh book gives byte-identical entries.
        let again = run(&ops, false);
        let bytes = |r: &Run| r.entries.iter().map(|e| serde_json::to_string(e).expect("json")).collect::<Vec<_>>();
        prop_assert_eq!(bytes(&first), bytes(&again));
        // Repeating every grant (same terms) changes nothing more.
        let mut book = first.book.clone();
        for g in first.book.grants.values() {
            prop_assert!(book.apply_grant(&g.grant, i64::MIN, GRACE).is_empty());
        }
        prop_assert_eq!(&book, &first.book);
        // The stored form reads back as the same book, and so does one stored as JSON (the
        // form books were written in before).
        let stored = book.encode().expect("encode");
        let decoded = Book::decode(&stored).expect("decode");
        prop_assert_eq!(&decoded, &book);
        // Byte for byte: a decimal's scale (1.5 against 1.50, which compare equal) survives.
        prop_assert_eq!(decoded.encode().expect("encode"), stored.clone());
        // JSON never carried the refusals a book remembers (they came after it).
        let legacy = serde_json::to_vec(&book).expect("json");
        let forgetful = Book { refused: VecDeque::new(), ..book.clone() };
        prop_assert_eq!(&Book::decode(&legacy).expect("decode JSON"), &forgetful);
        prop_assert!(stored.len() < legacy.len() || book == Book::default());
    }

    #[test]
    fn a_partition_keeping_everything_apart_folds_as_one_book_that_keeps_it(
        ops in proptest::collection::vec(op(), 0..60),
        commit_every in 1_usize..8,
        reopen_at in 0_usize..60,
    ) {
        // The partition store keeps old series and spent grants apart from their books and
        // puts one back before a record can touch it; keeping none in the book, every record
        // that touches one finds it apart. Its entries and the book it reads back must be the
        // fold's of one book that kept everything, whatever the batches and restarts.
        let expected = run(&ops, false);
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = rocksdb::Cache::new_lru_cache(1 << 20);
        let open = || {
            PartitionState::open(dir.path(), 0, &cache, GRACE)
                .expect("open")
                .keeping(0, 0, 0)
                // Lines put back whole are deleted by a range deletion from two on.
                .deleting_ranges_from(2)
        };
        let mut state = open();
        let mut entries = Vec::new();
        let mut keep = |outputs: Vec<crate::state::Output>| {
            entries.extend(outputs.into_iter().filter_map(|o| match o {
                crate::state::Output::Entry(e) => Some(*e),
                _ => None,
            }));
        };
        for (n, (payload, record)) in expected.records.iter().enumerate() {
            let input = Input {
                offset: i64::try_from(n).expect("small"),
                key: None,
                payload,
            };
            state.apply(input, *record).expect("apply");
            if n % commit_every == 0 || n == reopen_at {
                keep(state.take_outputs());
                neruba_stage::Partition::commit(&mut state).expect("commit");
            }
            if n == reopen_at {
                drop(state);
                state = open();
            }
        }
        keep(state.take_outputs());
        neruba_stage::Partition::commit(&mut state).expect("commit");
        prop_assert_eq!(&entries, &expected.entries);
        let db = neruba_stage::Partition::store(&state).db();
        let read = crate::state::read_book(db, "acme", "c1").expect("read");
        // The grants a page at a time, from the book and from the spent ones kept apart in
        // burn-down order: the book's grants in that order, each once.
        let mut want: Vec<&GrantState> = expected.book.grants.values().map(|g| &**g).collect();
        want.sort_by_key(|g| burn_order(&g.grant));
        for limit in [1, 2, 5] {
            let mut pages: Vec<GrantState> = Vec::new();
            loop {
                let after = pages.last().map(|g| burn_place(&g.grant));
                let page = crate::state::grants_after(&db.snapshot(), "acme", "c1", after, limit)
                    .expect("read")
                    .unwrap_or_default();
                let last = page.len() < limit;
                pages.extend(page);
                if last {
                    break;
                }
            }
            prop_assert_eq!(pages.iter().collect::<Vec<_>>(), want.clone(), "limit {}", limit);
        }
        // The spent grants kept apart in burn-down order are those kept apart by id: a grant
        // put back into its book leaves both.
        let under = |kind: u8| -> Vec<(Vec<u8>, Vec<u8>)> {
            let prefix = crate::state::customer_key(kind, "acme", "c1");
            db.prefix_iterator(&prefix)
                .map(|entry| entry.expect("entry"))
                .take_while(|(key, _)| key.starts_with(&prefix))
                .map(|(key, value)| (key[prefix.len()..].to_vec(), value.to_vec()))
                .collect()
        };
        let by_id: std::collections::BTreeMap<String, Vec<u8>> = under(b'G')
            .into_iter()
            .map(|(rest, value)| {
                let (id, _) = neruba_stage::keys::read_part(&rest).expect("an id");
                (String::from_utf8(id.to_vec()).expect("utf-8"), value)
            })
            .collect();
        let prefix_len = crate::state::customer_key(b'H', "acme", "c1").len();
        let in_order = under(b'H');
        prop_assert_eq!(in_order.len(), by_id.len());
        for (rest, value) in &in_order {
            let state: GrantState = postcard::from_bytes(value).expect("a grant");
            let key = crate::state::spent_grant_place_key("acme", "c1", burn_place(&state.grant));
            prop_assert_eq!(&key[prefix_len..], &rest[..]);
            prop_assert_eq!(by_id.get(&state.grant.id), Some(value));
        }
        let mut book = read.unwrap_or_default();
        // What the store reads back is the book but for the old series it keeps apart.
        book.series.clone_from(&expected.book.series);
        prop_assert_eq!(&book, &expected.book);
    }
}

#[test]
fn usage_burns_by_priority_then_expiry_and_the_rest_is_uncovered() {
    let mut book = Book::default();
    let late = grant("late", d("10"), "USD", 10, None, Some(T0 + 100 * MIN));
    let soon = grant("soon", d("5"), "USD", 10, None, Some(T0 + 50 * MIN));
    let first = grant("first", d("3"), "USD", 1, None, None);
    for g in [&late, &soon, &first] {
        book.apply_grant(g, T0, GRACE);
    }
    let entries = book.apply_item(&item("li_1", "m1", T0, T0, d("20.50"), "USD"));
    let drawn: Vec<(EntryKind, Option<&str>, Decimal, Decimal)> = entries
        .iter()
        .map(|e| (e.kind, e.grant.as_deref(), e.amount, e.balance_after))
        .collect();
    assert_eq!(
        drawn,
        vec![
            (
                EntryKind::Consume,
                Some(first.id.as_str()),
                d("-3"),
                d("15")
            ),
            (EntryKind::Consume, Some(soon.id.as_str()), d("-5"), d("10")),
            (EntryKind::Consume, Some(late.id.as_str()), d("-10"), d("0")),
            (EntryKind::Uncovered, None, d("2.50"), d("0")),
        ]
    );
}

#[test]
fn a_correction_unwinds_uncovered_first_then_the_last_grant_drawn() {
    let mut book = Book::default();
    let a = grant("a", d("4"), "USD", 1, None, None);
    let b = grant("b", d("4"), "USD", 2, None, None);
    book.apply_grant(&a, T0, GRACE);
    book.apply_grant(&b, T0, GRACE);
    book.apply_item(&item("li_1", "m1", T0, T0, d("10"), "USD"));
    let entries = book.apply_item(&item("li_2", "m1", T0, T0 + MIN, d("-3.5"), "USD"));
    let unwound: Vec<(EntryKind, Option<&str>, Decimal)> = entries
        .iter()
        .map(|e| (e.kind, e.grant.as_deref(), e.amount))
        .collect();
    assert_eq!(
        unwound,
        vec![
            (EntryKind::Uncovered, None, d("-2")),
            (EntryKind::Restore, Some(b.id.as_str()), d("1.5"))
        ]
    );
    assert_eq!(book.balance("USD"), d("1.5"));
    // More than was ever allocated: the rest is owed back.
    let entries = book.apply_item(&item("li_3", "m1", T0, T0 + 2 * MIN, d("-10"), "USD"));
    let unwound: Vec<(EntryKind, Option<&str>, Decimal)> = entries
        .iter()
        .map(|e| (e.kind, e.grant.as_deref(), e.amount))
        .collect();
    assert_eq!(
        unwound,
        vec![
            (EntryKind::Restore, Some(b.id.as_str()), d("2.5")),
            (EntryKind::Restore, Some(a.id.as_str()), d("4")),
            (EntryKind::Uncovered, None, d("-3.5")),
        ]
    );
    assert_eq!(book.balance("USD"), d("8"));
}

#[test]
fn credit_restored_to_an_expired_or_voided_grant_expires_again_at_once() {
    // SPEC: credit restored to a grant that has since expired or been voided expires again.
    // Was: on a voided grant it was voided again, as it still is for grants of record version
    // 1 and 2 (a replay of an old ledger gives what it gave).
    for (v, again) in [
        (credit::GRANT_RECORD_V, EntryKind::Expire),
        (credit::GRANT_BOUNDED_V, EntryKind::Void),
        (1, EntryKind::Void),
    ] {
        let mut book = Book::default();
        let expiring = Grant {
            v,
            ..grant("x", d("5"), "USD", 1, None, Some(T0 + 10 * MIN))
        };
        let voided = Grant {
            v,
            ..grant("v", d("5"), "USD", 2, None, None)
        };
        book.apply_grant(&expiring, T0, GRACE);
        book.apply_grant(&voided, T0, GRACE);
        book.apply_item(&item("li_1", "m1", T0, T0, d("8"), "USD"));
        // Expiry exactly at the tick's time.
        let expired = book.apply_tick("acme", "c1", T0 + 10 * MIN, GRACE, FINAL);
        assert!(expired.is_empty(), "nothing left to expire: {expired:?}");
        let void = book.apply_void(&void_of(&voided.id, credit::VOID_RECORD_V));
        assert_eq!(kinds(&void), vec![(EntryKind::Void, d("-2"), d("0"))]);
        let entries = book.apply_item(&item("li_2", "m1", T0, T0 + MIN, d("-8"), "USD"));
        let kinds: Vec<(EntryKind, Option<&str>, Decimal, Decimal)> = entries
            .iter()
            .map(|e| (e.kind, e.grant.as_deref(), e.amount, e.balance_after))
            .collect();
        let (v_id, x_id) = (Some(voided.id.as_str()), Some(expiring.id.as_str()));
        assert_eq!(
            kinds,
            vec![
                (EntryKind::Restore, v_id, d("3"), d("3")),
                (again, v_id, d("-3"), d("0")),
                (EntryKind::Restore, x_id, d("5"), d("5")),
                (EntryKind::Expire, x_id, d("-5"), d("0")),
            ],
            "version {v}"
        );
        // The voided grant stays voided; what it expired and voided add up.
        let state = &book.grants[&voided.id];
        let (expired, voided_amount) = match again {
            EntryKind::Expire => (d("3"), d("2")),
            _ => (d("0"), d("5")),
        };
        assert_eq!(
            (
                state.status,
                state.remaining,
                state.consumed,
                state.restored,
                state.expired,
                state.voided
            ),
            (
                Status::Voided,
                d("0"),
                d("3"),
                d("3"),
                expired,
                voided_amount
            ),
            "version {v}"
        );
    }
}

#[test]
fn a_window_starting_exactly_at_expiry_is_not_covered_and_expiry_is_exclusive() {
    let mut book = Book::default();
    let g = grant("g", d("5"), "USD", 1, Some(T0), Some(T0 + 10 * MIN));
    book.apply_grant(&g, T0, GRACE);
    let at_end = book.apply_item(&item("li_1", "m1", T0, T0 + 10 * MIN, d("1"), "USD"));
    assert_eq!(consumption(&at_end), vec![(None, d("1"))]);
    let before_start = book.apply_item(&item("li_2", "m1", T0, T0 - MIN, d("1"), "USD"));
    assert_eq!(consumption(&before_start), vec![(None, d("1"))]);
    let inside = book.apply_item(&item("li_3", "m1", T0, T0 + 9 * MIN, d("1"), "USD"));
    assert_eq!(consumption(&inside), vec![(Some(g.id.clone()), d("1"))]);
    // The tick exactly at expiry (+ no grace) expires the rest.
    let expired = book.apply_tick("acme", "c1", T0 + 10 * MIN, GRACE, FINAL);
    assert_eq!(consumption(&expired), vec![]);
    assert_eq!(
        expired
            .iter()
            .map(|e| (e.kind, e.amount))
            .collect::<Vec<_>>(),
        vec![(EntryKind::Expire, d("-4"))]
    );
}

#[test]
fn a_key_reused_with_other_terms_is_refused_and_currencies_never_mix() {
    let mut book = Book::default();
    let g = grant("k", d("5"), "USD", 1, None, None);
    book.apply_grant(&g, T0, GRACE);
    assert!(book.apply_grant(&g, T0, GRACE).is_empty());
    let other = grant("k", d("6"), "USD", 1, None, None);
    let refused = book.apply_grant(&other, T0, GRACE);
    assert_eq!(
        refused
            .iter()
            .map(|e| (e.kind, e.code.as_deref(), e.balance_before, e.balance_after))
            .collect::<Vec<_>>(),
        vec![(
            EntryKind::GrantRefused,
            Some("key_conflict"),
            d("5"),
            d("5")
        )]
    );
    // The same refused request again, written as version 1 or 2 (before refusals were
    // remembered): refused again, each attempt an entry of its own (its own sequence number,
    // so its own id), and the balance untouched, as a replay of an old ledger must give.
    let again = book.apply_grant(&other, T0, GRACE);
    assert_eq!(
        again
            .iter()
            .map(|e| (e.kind, e.code.as_deref(), e.seq, e.balance_after))
            .collect::<Vec<_>>(),
        vec![(EntryKind::GrantRefused, Some("key_conflict"), 3, d("5"))]
    );
    assert_ne!(again[0].id, refused[0].id);
    let eur = book.apply_item(&item("li_1", "m1", T0, T0, d("2"), "EUR"));
    assert_eq!(consumption(&eur), vec![(None, d("2"))]);
    assert_eq!(book.balance("USD"), d("5"));
    assert_eq!(book.balance("EUR"), d("0"));
}

/// Each entry's kind, code and sequence number.
fn codes(entries: &[BalanceEntry]) -> Vec<(EntryKind, Option<String>, u64)> {
    entries
        .iter()
        .map(|e| (e.kind, e.code.clone(), e.seq))
        .collect()
}

/// What [`codes`] gives of one `grant_refused` entry of `code`, numbered `seq`.
fn refusal(code: &str, seq: u64) -> Vec<(EntryKind, Option<String>, u64)> {
    vec![(EntryKind::GrantRefused, Some(code.to_owned()), seq)]
}

#[test]
fn a_refused_grant_sent_again_changes_nothing() {
    // Was: each delivery of a refused grant record added another `grant_refused` entry, so a
    // client retrying a conflicting request grew the customer's entries without end.
    let v3 = |key: &str, amount: &str| Grant {
        v: credit::GRANT_RECORD_V,
        ..grant(key, d(amount), "USD", 1, None, None)
    };
    let conflict = |seq| refusal("key_conflict", seq);
    let mut book = Book::default();
    assert_eq!(
        codes(&book.apply_grant(&v3("k", "5"), T0, GRACE)),
        [(EntryKind::Grant, None, 1)]
    );
    let other = v3("k", "6");
    assert_eq!(codes(&book.apply_grant(&other, T0, GRACE)), conflict(2));
    // The same request again, received later (`received_at` is not a term): nothing.
    let retried = Grant {
        received_at: "2026-12-02T00:00:00Z".into(),
        ..other.clone()
    };
    let before = book.clone();
    assert_eq!(book.apply_grant(&retried, T0, GRACE), vec![]);
    assert_eq!(book, before);
    // Other terms under the same key are refused, once each.
    assert_eq!(
        codes(&book.apply_grant(&v3("k", "7"), T0, GRACE)),
        conflict(3)
    );
    assert_eq!(book.apply_grant(&v3("k", "7"), T0, GRACE), vec![]);
    assert_eq!(book.balance("USD"), d("5"));

    // The book remembers the newest refusals only: the oldest one forgotten, its request sent
    // again is refused again, and remembered again.
    for n in 0..REMEMBERED_REFUSALS {
        let e = book.apply_grant(&v3("k", &format!("{}", 100 + n)), T0, GRACE);
        assert_eq!(codes(&e), conflict(4 + n as u64), "refusal {n}");
    }
    assert_eq!(book.refused.len(), REMEMBERED_REFUSALS);
    let last = 4 + REMEMBERED_REFUSALS as u64;
    assert_eq!(codes(&book.apply_grant(&other, T0, GRACE)), conflict(last));
    assert_eq!(book.apply_grant(&other, T0, GRACE), vec![]);

    // Its stored form keeps what it remembers; a book that remembers nothing is stored as
    // before, and a release before this one reads the book, passing over what it remembers.
    let stored = book.encode().expect("encode");
    let read = Book::decode(&stored).expect("decode");
    assert_eq!(read, book);
    let older: Book = postcard::from_bytes(&stored[1..]).expect("read as before");
    assert_eq!(older.grants, book.grants);
    assert_eq!(older.seq, book.seq);
    let mut forgetful = book.clone();
    forgetful.refused.clear();
    let plain = forgetful.encode().expect("encode");
    // The tag, the count, the digests.
    assert_eq!(plain.len() + 1 + 1 + REMEMBERED_REFUSALS * 16, stored.len());
    let mut body = vec![0xB1];
    body.extend(postcard::to_allocvec(&forgetful).expect("postcard"));
    assert_eq!(plain, body);
    // Whatever else follows the book, or its refusals, is refused, not passed over.
    let mut unknown = stored.clone();
    unknown[plain.len()] = 0x02;
    assert!(Book::decode(&unknown).is_err());
    let mut longer = stored.clone();
    longer.push(0x01);
    assert!(Book::decode(&longer).is_err());

    // Terms equal as compared are one refusal, however their amounts are written.
    let mut book = Book::default();
    book.apply_grant(&v3("k", "5"), T0, GRACE);
    assert_eq!(
        codes(&book.apply_grant(&v3("k", "6"), T0, GRACE)),
        conflict(2)
    );
    assert_eq!(book.apply_grant(&v3("k", "6.00"), T0, GRACE), vec![]);
}

#[test]
fn a_void_of_an_unknown_grant_sent_again_changes_nothing() {
    let unknown = grant_id("acme", "c1", "never-granted");
    let refused = |seq| refusal("unknown_grant", seq);
    let mut book = Book::default();
    let void = void_of(&unknown, credit::VOID_RECORD_V);
    assert_eq!(codes(&book.apply_void(&void)), refused(1));
    // Sent again (a client's retry, received later): nothing.
    let retried = credit::Void {
        received_at: format_time_ms(T0 + MIN),
        ..void.clone()
    };
    assert_eq!(book.apply_void(&retried), vec![]);
    // What the book remembers is stored with it.
    let stored = Book::decode(&book.encode().expect("encode")).expect("decode");
    assert_eq!(stored, book);
    assert_eq!(stored.refused.len(), 1);
    // Written as version 1, before voids were remembered: an entry each time, as then, and
    // nothing remembered of it.
    let mut fresh = Book::default();
    fresh.apply_void(&void_of(&unknown, 1));
    assert!(fresh.refused.is_empty());
    let old = void_of(&unknown, 1);
    assert_eq!(codes(&book.apply_void(&old)), refused(2));
    assert_eq!(codes(&book.apply_void(&old)), refused(3));
    // Once the grant is there, the same void voids it.
    let g = Grant {
        v: credit::GRANT_RECORD_V,
        ..grant("never-granted", d("4"), "USD", 1, None, None)
    };
    // Applied, it takes the void's place among the refusals remembered.
    assert_eq!(book.refused.len(), 1);
    assert_eq!(
        kinds(&book.apply_grant(&g, T0, GRACE)),
        vec![(EntryKind::Grant, d("4"), d("4"))]
    );
    assert!(book.refused.is_empty());
    assert_eq!(
        kinds(&book.apply_void(&void)),
        vec![(EntryKind::Void, d("-4"), d("0"))]
    );
}

#[test]
fn a_refused_grant_of_record_version_2_is_refused_with_an_entry_each_time() {
    // What the gateway wrote before refusals were remembered: a replay gives what it gave.
    let v2 = |key: &str, amount: &str| Grant {
        v: credit::GRANT_BOUNDED_V,
        ..grant(key, d(amount), "USD", 10, None, None)
    };
    let mut book = Book::default();
    for n in 0..MAX_CREDIT_GRANTS {
        book.apply_grant(&v2(&format!("g{n:04}"), "0.01"), T0, GRACE);
    }
    let seq = book.seq;
    // Each sent twice: an entry each time.
    let extra = v2("extra", "7");
    let other = v2("g0001", "0.02");
    for (n, (g, code)) in [(&extra, TOO_MANY_GRANTS), (&other, "key_conflict")]
        .into_iter()
        .flat_map(|sent| [sent, sent])
        .enumerate()
    {
        let n = u64::try_from(n).expect("small");
        assert_eq!(
            codes(&book.apply_grant(g, T0, GRACE)),
            refusal(code, seq + 1 + n)
        );
    }
    assert!(book.refused.is_empty());
    assert_eq!(book.balance("USD"), d("10.00"));
}

#[test]
fn a_grant_refused_for_the_bound_and_sent_again_applies_once_it_fits() {
    let bounded = |key: &str, amount: &str| Grant {
        v: credit::GRANT_RECORD_V,
        ..grant(key, d(amount), "USD", 10, None, None)
    };
    let mut book = Book::default();
    for n in 0..MAX_CREDIT_GRANTS {
        book.apply_grant(&bounded(&format!("g{n:04}"), "0.01"), T0, GRACE);
    }
    let extra = bounded("extra", "7");
    let e = book.apply_grant(&extra, T0, GRACE);
    assert_eq!(
        e.iter()
            .map(|e| (e.kind, e.code.as_deref()))
            .collect::<Vec<_>>(),
        vec![(EntryKind::GrantRefused, Some(TOO_MANY_GRANTS))]
    );
    // Sent again while the customer is still at the bound: nothing.
    assert_eq!(book.apply_grant(&extra, T0, GRACE), vec![]);
    // Once a grant is spent it applies, and is no longer remembered as refused.
    book.apply_item(&item("li_1", "m1", T0, T0, d("0.01"), "USD"));
    let e = book.apply_grant(&extra, T0, GRACE);
    assert_eq!(kinds(&e), vec![(EntryKind::Grant, d("7"), d("16.99"))]);
    assert!(book.refused.is_empty());
    // Refused for the bound and remembered, a request then sent with other terms under its
    // key applies once there is room; the first request sent again is a key conflict, not
    // passed over as already refused.
    let first = bounded("late", "3");
    let code = |e: &[BalanceEntry]| e.iter().map(|e| e.code.clone()).collect::<Vec<_>>();
    assert_eq!(
        code(&book.apply_grant(&first, T0, GRACE)),
        [Some(TOO_MANY_GRANTS.to_owned())]
    );
    book.apply_void(&void_of(
        &grant_id("acme", "c1", "g0001"),
        credit::VOID_RECORD_V,
    ));
    let e = book.apply_grant(&bounded("late", "4"), T0, GRACE);
    assert_eq!(kinds(&e), vec![(EntryKind::Grant, d("4"), d("20.98"))]);
    assert_eq!(
        code(&book.apply_grant(&first, T0, GRACE)),
        [Some("key_conflict".to_owned())]
    );
}

fn rule(threshold: &str, recharge_to: Option<&str>) -> RuleRecord {
    RuleRecord {
        v: credit::RULE_RECORD_V,
        tenant: "acme".into(),
        customer: "c1".into(),
        currency: "USD".into(),
        rule: Some(BalanceRule {
            low_balance_threshold: d(threshold),
            recharge_to: recharge_to.map(d),
        }),
        received_at: format_time_ms(T0),
    }
}

fn kinds(entries: &[BalanceEntry]) -> Vec<(EntryKind, Decimal, Decimal)> {
    entries
        .iter()
        .map(|e| (e.kind, e.amount, e.balance_after))
        .collect()
}

#[test]
fn a_low_balance_fires_once_per_crossing_and_one_top_up_is_outstanding() {
    let mut book = Book::default();
    book.apply_grant(&grant("pack", d("20"), "USD", 10, None, None), T0, GRACE);
    assert!(book.apply_rule(&rule("5", Some("25"))).is_empty());
    // 20 → 12: above the threshold, nothing.
    let e = book.apply_item(&item("li_1", "m1", T0, T0, d("8"), "USD"));
    assert_eq!(kinds(&e), vec![(EntryKind::Consume, d("-8"), d("12"))]);
    // 12 → 4: the crossing, and a top-up to 25.
    let e = book.apply_item(&item("li_2", "m1", T0, T0, d("8"), "USD"));
    assert_eq!(
        kinds(&e),
        vec![
            (EntryKind::Consume, d("-8"), d("4")),
            (EntryKind::LowBalance, d("0"), d("4")),
            (EntryKind::TopupRequested, d("21"), d("4")),
        ]
    );
    let request = e[2].id.clone();
    // Still below: nothing more, however much usage follows (no runaway).
    let e = book.apply_item(&item("li_3", "m1", T0, T0, d("3"), "USD"));
    assert_eq!(kinds(&e), vec![(EntryKind::Consume, d("-3"), d("1"))]);
    // A restore back above re-arms; the next crossing alerts again, but the first request is
    // still outstanding, so no second top-up.
    let e = book.apply_item(&item("li_4", "m1", T0, T0, d("-10"), "USD"));
    assert_eq!(kinds(&e), vec![(EntryKind::Restore, d("10"), d("11"))]);
    let e = book.apply_item(&item("li_5", "m1", T0, T0, d("7"), "USD"));
    assert_eq!(
        kinds(&e),
        vec![
            (EntryKind::Consume, d("-7"), d("4")),
            (EntryKind::LowBalance, d("0"), d("4")),
        ]
    );
    // The payment side answers the request: a grant keyed by its id resolves it.
    let e = book.apply_grant(&grant(&request, d("21"), "USD", 10, None, None), T0, GRACE);
    assert_eq!(kinds(&e), vec![(EntryKind::Grant, d("21"), d("25"))]);
    assert_eq!(book.rules["USD"].outstanding, None);
    // The next crossing asks again. (Equal priority and no expiry: the top-up's grant id
    // sorts first.)
    assert!(grant_id("acme", "c1", &request) < grant_id("acme", "c1", "pack"));
    let e = book.apply_item(&item("li_6", "m1", T0, T0, d("22"), "USD"));
    assert_eq!(
        kinds(&e),
        vec![
            (EntryKind::Consume, d("-21"), d("4")),
            (EntryKind::Consume, d("-1"), d("3")),
            (EntryKind::LowBalance, d("0"), d("3")),
            (EntryKind::TopupRequested, d("22"), d("3")),
        ]
    );
}

#[test]
fn a_top_up_asks_for_recharge_to_less_what_is_available_and_what_is_pending() {
    // 10 usable now, 30 paid for and effective in a month (pending); the rule at 35, up to 50.
    let mut book = Book::default();
    let now = grant("now", d("10"), "USD", 10, None, None);
    let later = grant("later", d("30"), "USD", 10, Some(T0 + PERIOD), None);
    book.apply_grant(&now, T0, GRACE);
    book.apply_grant(&later, T0, GRACE);
    assert!(book.apply_rule(&rule("35", Some("50"))).is_empty());
    // Usage now draws on the effective grant only: 40 → 32, below 35.
    let e = book.apply_item(&item("li_1", "m1", T0, T0, d("8"), "USD"));
    // Available (effective at the partition's clock) and pending (not yet effective), summed
    // here from the grants, not from the book's balance.
    let part = |pending: bool| -> Decimal {
        book.grants
            .values()
            .filter(|g| g.status == Status::Active)
            .filter(|g| (g.grant.terms.effective_ms() > T0) == pending)
            .map(|g| g.remaining)
            .sum()
    };
    assert_eq!((part(false), part(true)), (d("2"), d("30")));
    // 50 − 2 − 30 = 18.
    assert_eq!(
        kinds(&e),
        vec![
            (EntryKind::Consume, d("-8"), d("32")),
            (EntryKind::LowBalance, d("0"), d("32")),
            (EntryKind::TopupRequested, d("18"), d("32")),
        ]
    );
    assert_eq!(e[0].grant.as_deref(), Some(now.id.as_str()));
}

#[test]
fn removing_a_rule_keeps_its_top_up_request_outstanding_so_a_new_rule_does_not_ask_twice() {
    let mut book = Book::default();
    book.apply_grant(&grant("pack", d("20"), "USD", 10, None, None), T0, GRACE);
    book.apply_rule(&rule("5", Some("25")));
    let e = book.apply_item(&item("li_1", "m1", T0, T0, d("16"), "USD"));
    let request = e
        .iter()
        .find(|e| e.kind == EntryKind::TopupRequested)
        .map(|e| e.id.clone())
        .expect("a top-up request");
    let mut removal = rule("5", None);
    removal.rule = None;
    assert!(book.apply_rule(&removal).is_empty());
    // Set again while the payment is under way: below the threshold, so an alert, but the
    // request is still outstanding and no second one is made.
    let e = book.apply_rule(&rule("5", Some("25")));
    assert_eq!(kinds(&e), vec![(EntryKind::LowBalance, d("0"), d("4"))]);
    assert_eq!(
        book.rules["USD"].outstanding.as_deref(),
        Some(request.as_str())
    );
    // The payment lands: resolved, and the balance is above the threshold again.
    let e = book.apply_grant(&grant(&request, d("21"), "USD", 10, None, None), T0, GRACE);
    assert_eq!(kinds(&e), vec![(EntryKind::Grant, d("21"), d("25"))]);
    assert_eq!(book.rules["USD"].outstanding, None);
    // Resolved while no rule was set: a rule set later starts with none outstanding.
    let e = book.apply_item(&item("li_2", "m1", T0, T0, d("22"), "USD"));
    let second = e
        .iter()
        .find(|e| e.kind == EntryKind::TopupRequested)
        .map(|e| e.id.clone())
        .expect("a second request once the first was resolved");
    book.apply_rule(&removal);
    book.apply_grant(&grant(&second, d("10"), "USD", 10, None, None), T0, GRACE);
    assert!(book.unresolved_requests.is_empty());
    book.apply_rule(&rule("5", Some("25")));
    assert_eq!(book.rules["USD"].outstanding, None);
}

#[test]
fn a_version_1_rule_removal_drops_its_request_as_it_did_when_written() {
    // A ledger written before rule records were version 2 replays to the entries it gave:
    // the rule set again asks for a second top-up.
    let mut book = Book::default();
    book.apply_grant(&grant("pack", d("20"), "USD", 10, None, None), T0, GRACE);
    book.apply_rule(&rule("5", Some("25")));
    book.apply_item(&item("li_1", "m1", T0, T0, d("16"), "USD"));
    let mut removal = rule("5", None);
    removal.v = 1;
    removal.rule = None;
    assert!(book.apply_rule(&removal).is_empty());
    assert!(book.unresolved_requests.is_empty());
    let e = book.apply_rule(&rule("5", Some("25")));
    assert_eq!(
        kinds(&e),
        vec![
            (EntryKind::LowBalance, d("0"), d("4")),
            (EntryKind::TopupRequested, d("21"), d("4")),
        ]
    );
}

#[test]
fn a_rule_set_below_its_threshold_alerts_at_once_and_a_removed_one_never() {
    let mut book = Book::default();
    let e = book.apply_rule(&rule("10", None));
    assert_eq!(kinds(&e), vec![(EntryKind::LowBalance, d("0"), d("0"))]);
    assert_eq!(e[0].cause, "rule/USD");
    let mut removal = rule("10", None);
    removal.rule = None;
    assert!(book.apply_rule(&removal).is_empty());
    book.apply_grant(&grant("pack", d("20"), "USD", 10, None, None), T0, GRACE);
    let e = book.apply_item(&item("li_1", "m1", T0, T0, d("15"), "USD"));
    assert_eq!(kinds(&e), vec![(EntryKind::Consume, d("-15"), d("5"))]);
}

#[test]
fn a_statement_turns_draft_then_final_and_a_late_item_is_carried_to_the_next() {
    let day = 86_400_000;
    let november = T0 - 30 * day; // 2026-11-01
    let mut book = Book::default();
    book.apply_grant(
        &grant("pack", d("5"), "USD", 10, None, None),
        november,
        GRACE,
    );
    book.apply_item(&item("li_1", "m1", november, november, d("3.25"), "USD"));
    book.apply_item(&item("li_2", "m1", november, november + MIN, d("4"), "USD"));
    let open = &book.statements[&statements::key("USD", &format_time_ms(november))];
    assert_eq!(open.statement.status, StatementStatus::Open);
    assert_eq!(book.next_deadline(), Some(T0));
    // Before the period ends nothing changes; at its end, draft (amount due 2.25).
    assert!(
        book.apply_tick("acme", "c1", T0 - 1, GRACE, 3 * day)
            .is_empty()
    );
    let e = book.apply_tick("acme", "c1", T0, GRACE, 3 * day);
    assert_eq!(
        kinds(&e),
        vec![(EntryKind::StatementDraft, d("2.25"), d("0"))]
    );
    let draft = e[0].statement.as_deref().expect("statement");
    assert_eq!(draft.status, StatementStatus::Draft);
    assert_eq!(
        (draft.usage, draft.credit_applied, draft.amount_due),
        (d("7.25"), d("5"), d("2.25"))
    );
    assert_eq!(draft.lines.len(), 1);
    assert_eq!(draft.lines[0].amount, d("7.25"));
    // A draft still takes its period's items; final three days after the period's end.
    book.apply_item(&item(
        "li_3",
        "m1",
        november,
        november + 2 * MIN,
        d("1"),
        "USD",
    ));
    assert_eq!(book.next_deadline(), Some(T0 + 3 * day));
    let e = book.apply_tick("acme", "c1", T0 + 3 * day, GRACE, day);
    assert_eq!(
        kinds(&e),
        vec![(EntryKind::StatementFinal, d("3.25"), d("0"))]
    );
    let fin = e[0].statement.as_deref().expect("statement");
    assert_eq!(fin.status, StatementStatus::Final);
    assert_eq!(
        fin.id,
        credit::statement_id("acme", "c1", "USD", &format_time_ms(november))
    );
    assert!(book.statements.is_empty());
    // A correction for November now waits, then joins December's statement as a prior-period
    // adjustment; December's own usage is its usage.
    book.apply_item(&item(
        "li_4",
        "m1",
        november,
        november + 3 * MIN,
        d("-0.50"),
        "USD",
    ));
    assert_eq!(book.carried["USD"].amount, d("-0.50"));
    book.apply_item(&item("li_5", "m1", T0, T0 + 4 * day, d("2"), "USD"));
    let december = &book.statements[&statements::key("USD", &format_time_ms(T0))].statement;
    assert_eq!(
        (
            december.usage,
            december.prior_period_amount,
            december.amount_due,
            december.prior_period[0].period_start.clone()
        ),
        (d("2"), d("-0.50"), d("1.50"), format_time_ms(november))
    );
    // Nothing after a final statement changes it: a repeated tick finalises nothing again.
    assert!(
        book.apply_tick("acme", "c1", T0 + 3 * day + 1, GRACE, day)
            .is_empty()
    );
}

/// A book as the balances stage stored it before books were postcard (JSON), taken from a
/// running stage: it must read back as the same book.
const LEGACY_JSON_BOOK: &str = r#"{"seq":15,"grants":{"gr_8d01e37efb6bdac030d965662d885cbc":{"grant":{"v":1,"id":"gr_8d01e37efb6bdac030d965662d885cbc","tenant":"acme","customer":"customer-0","key":"pack","terms":{"amount":"20","currency":"USD","priority":10,"effective_at":null,"expires_at":null,"paid":null,"metadata":{}},"received_at":"2026-11-28T19:42:53.674Z"},"status":"Active","remaining":"0.00","consumed":"20.00","restored":"0","expired":"0","voided":"0"}},"balances":{"USD":"0.00"},"series":{"[\"USD\",\"api_calls\",{},\"2026-11-03T00:00:00.000Z\"]":[{"grant":"gr_8d01e37efb6bdac030d965662d885cbc","amount":"20.00"},{"grant":null,"amount":"3.50"}]},"rules":{},"statements":{"[\"USD\",\"2026-11-03T00:00:00.000Z\"]":{"statement":{"id":"st_bbd8120f3a7a5984b670673ecde2cb49","currency":"USD","period_start":"2026-11-03T00:00:00.000Z","period_end":"2026-12-03T00:00:00.000Z","status":"open","lines":[{"meter":"api_calls","group":{},"period_start":"2026-11-03T00:00:00.000Z","quantity":"11","amount":"23.50","credit_applied":"20.00","amount_due":"3.50"}],"prior_period":[],"usage":"23.50","prior_period_amount":"0","credit_applied":"20.00","amount_due":"3.50"},"period_start_ms":1793664000000,"period_end_ms":1796256000000,"final_at_ms":null}},"final_through":{},"carried":{}}"#;

/// A book with every field and option filled.
fn full_book() -> Book {
    let mut book = Book::default();
    let mut paid = grant("pack", d("20.50"), "USD", 7, Some(T0), Some(T0 + 9 * MIN));
    paid.terms.paid = Some(neruba_schemas::credit::Money {
        amount: d("19.99"),
        currency: "EUR".into(),
    });
    paid.terms.metadata.insert("order".into(), "o-1".into());
    book.apply_grant(&paid, T0, GRACE);
    book.apply_grant(&grant("promo", d("1.5"), "USD", 1, None, None), T0, GRACE);
    book.apply_rule(&rule("5", Some("25")));
    book.apply_item(&item("li_1", "m1", T0, T0, d("18.25"), "USD"));
    let mut removal = rule("5", None);
    removal.rule = None;
    book.apply_rule(&removal);
    book.apply_tick("acme", "c1", T0 + 31 * 86_400_000, GRACE, FINAL);
    book.apply_item(&item("li_2", "m1", T0, T0 + MIN, d("-0.75"), "USD"));
    book.apply_item(&item(
        "li_3",
        "m1",
        T0 + 31 * 86_400_000,
        T0 + 31 * 86_400_000,
        d("2"),
        "EUR",
    ));
    book
}

#[test]
fn a_book_stored_as_json_before_reads_back() {
    let book = Book::decode(LEGACY_JSON_BOOK.as_bytes()).expect("legacy book");
    assert_eq!(book.seq, 15);
    assert_eq!(book.balances["USD"].to_string(), "0.00");
    let grant = &book.grants["gr_8d01e37efb6bdac030d965662d885cbc"];
    assert_eq!(
        (grant.consumed.to_string(), grant.remaining.to_string()),
        ("20.00".into(), "0.00".into())
    );
    let statement = &book
        .statements
        .values()
        .next()
        .expect("statement")
        .statement;
    assert_eq!(statement.amount_due.to_string(), "3.50");
    // And it is written back in the stored form, which reads back the same.
    let stored = book.encode().expect("encode");
    assert_eq!(Book::decode(&stored).expect("decode"), book);
}

#[test]
fn the_stored_form_of_a_book_is_fixed() {
    // postcard writes fields by position, without names or defaults: a field added to the
    // book or to a type in it changes these bytes, and books stored before could no longer be
    // read. Such a change needs a new tag byte and a decoder for the layout before it.
    let book = full_book();
    assert!(!book.unresolved_requests.is_empty() && !book.final_through.is_empty());
    let stored = book.encode().expect("encode");
    let hex: String = stored.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, GOLDEN_BOOK_HEX);
    assert_eq!(Book::decode(&stored).expect("decode"), book);
}

#[test]
fn a_book_stored_with_decimals_as_text_still_reads() {
    // The same layout, as written before decimals were stored compactly
    // (`neruba_schemas::decimal::stored`): every decimal reads back with its scale.
    let hex = GOLDEN_BOOK_TEXT_DECIMALS_HEX;
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16).expect("hex"))
        .collect();
    let book = Book::decode(&bytes).expect("decode");
    assert_eq!(book, full_book());
    assert_eq!(
        serde_json::to_string(&book).expect("json"),
        serde_json::to_string(&full_book()).expect("json")
    );
}

const GOLDEN_BOOK_TEXT_DECIMALS_HEX: &str = concat!(
    "b10c022367725f3337666165323334653861343765643936346661343830616433623435306538012367725f33",
    "376661653233346538613437656439363466613438306164336234353065380461636d650263310570726f6d6f",
    "03312e3503555344010000000018323032362d31322d30315430303a30303a30302e3030305a0003302e300331",
    "2e350130013001302367725f366461313165666166653935383466323838626232643338663665393833656201",
    "2367725f36646131316566616665393538346632383862623264333866366539383365620461636d6502633104",
    "7061636b0532302e353003555344070118323032362d31322d30315430303a30303a30302e3030305a01183230",
    "32362d31322d30315430303a30393a30302e3030305a010531392e39390345555201056f72646572036f2d3118",
    "323032362d31322d30315430303a30303a30302e3030305a0101300531362e373504302e373504342e35300130",
    "010355534404302e3030022a5b22455552222c226d31222c7b7d2c22323032372d30312d30315430303a30303a",
    "30302e3030305a225d010001322a5b22555344222c226d31222c7b7d2c22323032362d31322d30315430303a30",
    "303a30302e3030305a225d02012367725f33376661653233346538613437656439363466613438306164336234",
    "3530653803312e35012367725f3664613131656661666539353834663238386262326433386636653938336562",
    "0531362e30300001035553442362655f3634346531333135623734336263333739623639373064646330313532",
    "32333901225b22455552222c22323032372d30312d30315430303a30303a30302e3030305a225d2373745f3333",
    "3334636234393263613035643433323561393333393531346334626663360345555218323032372d30312d3031",
    "5430303a30303a30302e3030305a18323032372d30312d33315430303a30303a30302e3030305a0001026d3100",
    "18323032372d30312d30315430303a30303a30302e3030305a013101320130013200013201300130013280d0de",
    "e8d96880f0d490ed6800010355534480e0ab96d968010355534401026d310018323032362d31322d3031543030",
    "3a30303a30302e3030305a0131052d302e3735052d302e37350130052d302e3735052d302e37350130",
);

const GOLDEN_BOOK_HEX: &str = concat!(
    "b10c022367725f3337666165323334653861343765643936346661343830616433623435306538012367725f33",
    "376661653233346538613437656439363466613438306164336234353065380461636d650263310570726f6d6f",
    "02810f03555344010000000018323032362d31322d30315430303a30303a30302e3030305a0002810002810f02",
    "80000280000280002367725f366461313165666166653935383466323838626232643338663665393833656201",
    "2367725f36646131316566616665393538346632383862623264333866366539383365620461636d6502633104",
    "7061636b0382821003555344070118323032362d31322d30315430303a30303a30302e3030305a011832303236",
    "2d31322d30315430303a30393a30302e3030305a010382cf0f0345555201056f72646572036f2d311832303236",
    "2d31322d30315430303a30303a30302e3030305a0102800003828b0d02824b0382c20302800001035553440282",
    "00022a5b22455552222c226d31222c7b7d2c22323032372d30312d30315430303a30303a30302e3030305a225d",
    "01000280022a5b22555344222c226d31222c7b7d2c22323032362d31322d30315430303a30303a30302e303030",
    "5a225d02012367725f333766616532333465386134376564393634666134383061643362343530653802810f01",
    "2367725f36646131316566616665393538346632383862623264333866366539383365620382c00c0001035553",
    "442362655f363434653133313562373433626333373962363937306464633031353232333901225b2245555222",
    "2c22323032372d30312d30315430303a30303a30302e3030305a225d2373745f33333334636234393263613035",
    "643433323561393333393531346334626663360345555218323032372d30312d30315430303a30303a30302e30",
    "30305a18323032372d30312d33315430303a30303a30302e3030305a0001026d310018323032372d30312d3031",
    "5430303a30303a30302e3030305a0280010280020280000280020002800202800002800002800280d0dee8d968",
    "80f0d490ed6800010355534480e0ab96d968010355534401026d310018323032362d31322d30315430303a3030",
    "3a30302e3030305a02800102a24b02a24b02800002a24b02a24b028000",
);

#[test]
fn a_statement_too_large_for_its_entry_goes_on_it_without_its_lines() {
    // Was: the draft entry carried the whole statement, here 3,000 groups of 300-byte values
    // (about 1.2 MB of JSON): more than a producer sends, so it was never acknowledged and
    // the stage's partitions stopped for good.
    let day = 86_400_000;
    let november = T0 - 30 * day;
    let mut book = Book::default();
    for n in 0..3_000 {
        let mut usage = item(
            &format!("li_{n}"),
            "m1",
            november,
            november,
            d("0.01"),
            "USD",
        );
        usage.group = BTreeMap::from([("model".to_owned(), format!("{n:0>300}"))]);
        book.apply_item(&usage);
    }
    let small = item("li_x", "m1", november, november, d("1"), "EUR");
    book.apply_item(&small);
    let e = book.apply_tick("acme", "c1", T0, GRACE, 3 * day);
    let on_the_topic: Vec<BalanceEntry> = e
        .iter()
        .map(|entry| statements::on_the_topic(entry).into_owned())
        .collect();
    let drafts: Vec<(&str, Option<&str>, usize, Decimal, Decimal)> = on_the_topic
        .iter()
        .filter_map(|entry| {
            let s = entry.statement.as_deref()?;
            Some((
                entry.currency.as_str(),
                entry.code.as_deref(),
                s.lines.len(),
                s.usage,
                s.amount_due,
            ))
        })
        .collect();
    assert_eq!(
        drafts,
        vec![
            ("EUR", None, 1, d("1"), d("1")),
            ("USD", Some(statements::LINES_OMITTED), 0, d("30"), d("30")),
        ]
    );
    for entry in &on_the_topic {
        let json = serde_json::to_vec(entry).expect("json");
        assert!(
            json.len() < statements::STATEMENT_ENTRY_MAX + 4_096,
            "{}",
            json.len()
        );
    }
    // The fold's entry keeps the statement whole (what the api's read model stores, a final
    // statement included), as does the book.
    let whole: Vec<usize> = e
        .iter()
        .filter_map(|entry| Some(entry.statement.as_deref()?.lines.len()))
        .collect();
    assert_eq!(whole, vec![1, 3_000]);
    let kept = &book.statements[&statements::key("USD", &format_time_ms(november))];
    assert_eq!(kept.statement.lines.len(), 3_000);
}

#[test]
fn grants_past_a_customers_bound_of_grants_holding_credit_are_refused_until_one_is_spent() {
    // Was: every grant a client sent was kept, and each line item of the customer looked
    // through all of them while its book, holding them, was written after every record.
    let bounded = |key: &str, amount: &str| Grant {
        v: credit::GRANT_RECORD_V,
        ..grant(key, d(amount), "USD", 10, None, None)
    };
    let codes = |e: &[BalanceEntry]| -> Vec<(EntryKind, Option<String>)> {
        e.iter().map(|e| (e.kind, e.code.clone())).collect()
    };
    let refused = vec![(EntryKind::GrantRefused, Some("too_many_grants".to_owned()))];
    let mut book = Book::default();
    for n in 0..MAX_CREDIT_GRANTS {
        let e = book.apply_grant(&bounded(&format!("g{n:04}"), "0.01"), T0, GRACE);
        assert_eq!(codes(&e), [(EntryKind::Grant, None)], "grant {n}");
    }
    let full = book.clone();
    // One more is refused, and nothing of it kept: the balance and the book are unchanged.
    let extra = bounded("extra", "7");
    let e = book.apply_grant(&extra, T0, GRACE);
    assert_eq!(
        kinds(&e),
        vec![(EntryKind::GrantRefused, d("0"), d("10.00"))]
    );
    assert_eq!(codes(&e), refused);
    assert_eq!(book.grants, full.grants);
    // A grant repeated at the bound (a client's retry) is compared with the one applied, as
    // ever: the same terms change nothing, other terms are a key conflict.
    assert!(
        book.apply_grant(&bounded("g0005", "0.01"), T0, GRACE)
            .is_empty()
    );
    assert_eq!(
        codes(&book.apply_grant(&bounded("g0005", "0.02"), T0, GRACE)),
        [(EntryKind::GrantRefused, Some("key_conflict".to_owned()))]
    );
    // A grant written before the bound (record version 1) is applied, as it was then.
    let mut replayed = full.clone();
    let legacy = grant("legacy", d("0.01"), "USD", 10, None, None);
    let e = replayed.apply_grant(&legacy, T0, GRACE);
    assert_eq!(kinds(&e), vec![(EntryKind::Grant, d("0.01"), d("10.01"))]);
    // Usage spends a grant (all draw down alike: the lowest id first), and the same request
    // sent again is then applied; the next is refused.
    let e = book.apply_item(&item("li_1", "m1", T0, T0, d("0.01"), "USD"));
    assert_eq!(kinds(&e), vec![(EntryKind::Consume, d("-0.01"), d("9.99"))]);
    let e = book.apply_grant(&extra, T0, GRACE);
    assert_eq!(kinds(&e), vec![(EntryKind::Grant, d("7"), d("16.99"))]);
    assert_eq!(
        codes(&book.apply_grant(&bounded("next", "1"), T0, GRACE)),
        refused
    );
    // At the bound, the customer's rule asks for a top-up; the grant answering it is applied
    // (it has been paid for) and resolves the request.
    let e = book.apply_rule(&rule("100", Some("150")));
    let request = e
        .iter()
        .find(|e| e.kind == EntryKind::TopupRequested)
        .map(|e| (e.id.clone(), e.amount))
        .expect("a top-up request");
    assert_eq!(request.1, d("133.01"));
    let e = book.apply_grant(&bounded(&request.0, "133.01"), T0, GRACE);
    assert_eq!(
        kinds(&e),
        vec![(EntryKind::Grant, d("133.01"), d("150.00"))]
    );
    assert_eq!(book.rules["USD"].outstanding, None);
    let holding = book.grants.values().filter(|g| !g.is_spent()).count();
    assert_eq!(holding, MAX_CREDIT_GRANTS + 1);

    // Keys and metadata are bounded together: seven grants of 32 KiB of metadata fit in
    // 256 KiB, an eighth does not.
    let heavy = |n: usize| {
        let mut g = bounded(&format!("heavy-{n}"), "1");
        g.terms.metadata = (0..32)
            .map(|i| (format!("{i:0>512}"), "v".repeat(512)))
            .collect();
        g
    };
    let mut book = Book::default();
    for n in 0..7 {
        assert_eq!(
            codes(&book.apply_grant(&heavy(n), T0, GRACE)),
            [(EntryKind::Grant, None)]
        );
    }
    assert_eq!(codes(&book.apply_grant(&heavy(7), T0, GRACE)), refused);
    assert!(held_bytes(&heavy(0)) * 8 > MAX_CREDIT_GRANT_BYTES);
}
