//! Pages of a statements answer's lines.
//!
//! An answer's lines are in sections, in the answer's order: each statement's (by currency)
//! `lines`, then its `prior_period`, then the pending prior-period corrections (by currency);
//! within a section by meter, group and period start. A page holds up to its limit of them;
//! every statement and pending correction is on every page with its totals (the whole
//! statement's), its lines those of the page. A cursor names the read (customer and period)
//! and the page's last line by its section and place, not by a count, so no line is read
//! twice; a line added to an open statement between two pages is read if its place is after
//! the cursor's. Pages are read at their own positions: a reader that sees the statements
//! change between its pages (a statement opened, taking the pending corrections) starts
//! again.

use crate::model::{Place, ReadError, StoredLines};
use crate::usage::{CURSOR_GROUP_BYTES, digest_of};
use neruba_balances::book::statements::line_order;
use neruba_schemas::credit::StatementLine;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// Which list of the answer a line is in; sections sort in the answer's order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct Section {
    /// A pending prior-period correction's (after every statement's).
    pending: bool,
    currency: String,
    /// The statement's period start (empty for a pending correction): two statements of one
    /// currency in an answer are two sections.
    period_start: String,
    /// A statement's `prior_period` (after its `lines`).
    prior: bool,
}

impl Section {
    pub(crate) fn lines(currency: &str, period_start: &str) -> Self {
        Self {
            pending: false,
            currency: currency.to_owned(),
            period_start: period_start.to_owned(),
            prior: false,
        }
    }

    pub(crate) fn prior_period(currency: &str, period_start: &str) -> Self {
        Self {
            prior: true,
            ..Self::lines(currency, period_start)
        }
    }

    pub(crate) fn pending(currency: &str) -> Self {
        Self {
            pending: true,
            ..Self::lines(currency, "")
        }
    }
}

/// Where a page ended: the read's customer and period, and its last line's section and
/// place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct After {
    #[serde(rename = "c")]
    customer: String,
    #[serde(rename = "y")]
    period: String,
    #[serde(rename = "s")]
    section: Section,
    #[serde(rename = "m")]
    meter: String,
    #[serde(rename = "p")]
    period_start: String,
    /// The group as it is (`g`), or the SHA-256 of its JSON in hex (`h`) when that is longer
    /// than [`CURSOR_GROUP_BYTES`].
    #[serde(rename = "g", default, skip_serializing_if = "Option::is_none")]
    group: Option<BTreeMap<String, String>>,
    #[serde(rename = "h", default, skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
}

impl After {
    fn of(read: Read<'_>, section: &Section, line: &StatementLine) -> Self {
        let json = serde_json::to_string(&line.group).unwrap_or_default();
        let (group, digest) = if json.len() > CURSOR_GROUP_BYTES {
            (None, Some(hex::encode(digest_of(&json))))
        } else {
            (Some(line.group.clone()), None)
        };
        Self {
            customer: read.customer.to_owned(),
            period: read.period.to_owned(),
            section: section.clone(),
            meter: line.meter.clone(),
            period_start: line.period_start.clone(),
            group,
            digest,
        }
    }

    /// As the text of a cursor (hex-encoded by the caller).
    pub(crate) fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// From the text of a cursor of `read`; `None` if it is not one.
    pub(crate) fn decode(text: &str, read: Read<'_>) -> Option<Self> {
        let after: Self = serde_json::from_str(text).ok()?;
        (after.group.is_some() != after.digest.is_some()
            && after.customer == read.customer
            && after.period == read.period)
            .then_some(after)
    }

    /// The place of the page's last line in its list, if the cursor names its group (not only
    /// its digest).
    fn place(&self) -> Option<Place<'_>> {
        Some(Place {
            meter: &self.meter,
            group: self.group.as_ref()?,
            period_start: &self.period_start,
        })
    }

    /// How many of `lines` (of its section, in line order) are at or before this place;
    /// `None` for a digest no line of theirs has.
    fn taken_of(&self, lines: &[StatementLine]) -> Option<usize> {
        match (self.place(), &self.digest) {
            (Some(place), _) => Some(lines.partition_point(|line| !place.precedes(line))),
            (None, Some(digest)) => lines
                .iter()
                .rposition(|line| {
                    line.meter == self.meter
                        && line.period_start == self.period_start
                        && serde_json::to_string(&line.group)
                            .is_ok_and(|json| hex::encode(digest_of(&json)) == *digest)
                })
                .map(|at| at + 1),
            (None, None) => None,
        }
    }
}

/// Why a page could not be read.
#[derive(Debug)]
pub(crate) enum Unreadable {
    /// The cursor names no place of this answer.
    NotAPlace,
    /// A statement's lines kept apart could not be read.
    Store(ReadError),
}

/// The read a cursor belongs to: a customer's statements of one period.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Read<'a> {
    pub(crate) customer: &'a str,
    pub(crate) period: &'a str,
}

/// A section of the answer: its lines as held, or, for a statement's kept apart (a final
/// one's in runs, an open or draft one's partly in its book), where they are (read here,
/// those of the page alone, into the empty list).
pub(crate) type Listed<'a, 's> = (
    Section,
    &'a mut Vec<StatementLine>,
    Option<&'a StoredLines<'s>>,
);

/// Keeps in `sections` (the answer's, in its order) the lines of the page of up to `limit`
/// (at least one) lines after `after`; where the next page starts, if lines are left.
pub(crate) fn page(
    read: Read<'_>,
    mut sections: Vec<Listed<'_, '_>>,
    limit: usize,
    after: Option<&After>,
) -> Result<Option<After>, Unreadable> {
    sections.sort_by(|a, b| a.0.cmp(&b.0));
    let mut left = limit.max(1);
    let (mut last, mut more) = (None, false);
    for (section, lines, stored) in sections {
        let order = after.map(|after| section.cmp(&after.section));
        if let Some(stored) = stored {
            // The lines of the page and one more (to tell whether any are left): after the
            // cursor's place in its section, from the start in a later one; none in an
            // earlier one, nor once the page is full and known not to be the last.
            let (from, count) = match (order, after) {
                (Some(Ordering::Less), _) => (None, 0),
                _ if more => (None, 0),
                (Some(Ordering::Equal), Some(after)) => match after.place() {
                    Some(place) => (Some(place), left + 1),
                    // Named by its group's digest: found among every line of the section.
                    None => (None, usize::MAX),
                },
                _ => (None, left + 1),
            };
            if count > 0 {
                *lines = stored.read(from, count).map_err(Unreadable::Store)?;
            }
        }
        // In line order, whatever order older stored statements kept them in (lists read
        // from runs come in it).
        lines.sort_by(|a, b| line_order(a, &b.meter, &b.group, &b.period_start));
        if let Some(after) = after {
            match order.unwrap_or(Ordering::Greater) {
                Ordering::Less => {
                    lines.clear();
                    continue;
                }
                Ordering::Equal => {
                    let taken = after.taken_of(lines).ok_or(Unreadable::NotAPlace)?;
                    lines.drain(..taken);
                }
                Ordering::Greater => {}
            }
        }
        if lines.len() > left {
            lines.truncate(left);
            more = true;
        }
        left -= lines.len();
        if let Some(line) = lines.last() {
            last = Some(After::of(read, &section, line));
        }
    }
    Ok(if more { last } else { None })
}

#[cfg(test)]
mod tests {
    use super::*;
    use neruba_balances::book::statements::LineList;
    use neruba_schemas::credit::{Statement, StatementStatus};
    use rust_decimal::Decimal;

    const P: &str = "2026-11-01T00:00:00.000Z";
    const READ: Read<'static> = Read {
        customer: "c-1",
        period: "2026-11",
    };

    fn line(meter: &str, project: &str) -> StatementLine {
        StatementLine {
            meter: meter.into(),
            group: BTreeMap::from([("project".to_owned(), project.to_owned())]),
            period_start: "2026-11-01T00:00:00.000Z".into(),
            quantity: Decimal::ONE,
            amount: Decimal::ONE,
            credit_applied: Decimal::ZERO,
            amount_due: Decimal::ONE,
        }
    }

    /// The answer's lists: USD lines, USD prior, EUR lines (out of order), EUR pending.
    fn lists() -> Vec<(Section, Vec<StatementLine>)> {
        vec![
            (
                Section::lines("USD", P),
                vec![line("a", "p1"), line("a", "p2"), line("b", "p1")],
            ),
            (Section::prior_period("USD", P), vec![line("a", "p0")]),
            (
                Section::lines("EUR", P),
                vec![line("b", "x"), line("a", &"y".repeat(2000))],
            ),
            (Section::pending("EUR"), vec![line("c", "z")]),
        ]
    }

    /// A line as a page has it: its list's section, meter, group and period start.
    type Placed = (Section, String, BTreeMap<String, String>, String);

    /// A statement of `section`'s currency and period start holding `lines` in the list
    /// `section` names.
    fn statement_of(section: &Section, lines: &[StatementLine]) -> Statement {
        let (mut held, mut prior) = (Vec::new(), Vec::new());
        if section.prior { &mut prior } else { &mut held }.extend_from_slice(lines);
        Statement {
            id: "st_1".into(),
            currency: section.currency.clone(),
            period_start: section.period_start.clone(),
            period_end: "2026-12-01T00:00:00.000Z".into(),
            status: StatementStatus::Final,
            lines: held,
            prior_period: prior,
            usage: Decimal::ZERO,
            prior_period_amount: Decimal::ZERO,
            credit_applied: Decimal::ZERO,
            amount_due: Decimal::ZERO,
        }
    }

    /// Every page of `lists` at `limit`, read through cursors sent back as a client sends
    /// them. The lists of sections in `apart` are read from where the stores keep them: before
    /// page `final_from` (counted from 0) as an open or draft statement's, every other line
    /// kept apart by the balances fold (a line a key) and the rest held in its book; from that
    /// page on as a final statement's, stored as the ledger stage stores them (in runs of up
    /// to `run` lines). So a statement turns final between two pages, and a cursor made on
    /// one form is read on the other.
    fn read_in_pages(
        lists: &[(Section, Vec<StatementLine>)],
        (apart, final_from): (&[Section], usize),
        run: usize,
        limit: usize,
    ) -> Vec<Vec<Placed>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = rocksdb::DB::open_default(dir.path()).expect("open");
        // The book's list of a section's lines.
        let list_of = |section: &Section| {
            let key =
                neruba_balances::book::statements::key(&section.currency, &section.period_start);
            if section.prior {
                LineList::Prior(key)
            } else {
                LineList::Lines(key)
            }
        };
        // What an open statement's book holds of a list: the lines not kept apart, in order.
        let held_of = |lines: &[StatementLine]| {
            let mut held: Vec<StatementLine> = lines.iter().step_by(2).cloned().collect();
            held.sort_by(|a, b| line_order(a, &b.meter, &b.group, &b.period_start));
            held
        };
        for (section, lines) in lists.iter().filter(|(s, _)| apart.contains(s)) {
            let statement = statement_of(section, lines);
            let stored = crate::model::stored_in_runs("t", "c", &statement, run).expect("encode");
            for (key, value) in stored {
                db.put(key, value).expect("put");
            }
            let prefix = neruba_balances::state::line_list_key("t", "c", &list_of(section));
            for line in lines.iter().skip(1).step_by(2) {
                let mut key = prefix.clone();
                neruba_balances::state::push_line_place(&mut key, Place::of(line));
                db.put(key, postcard::to_stdvec(line).expect("encode"))
                    .expect("put");
            }
        }
        let total: usize = lists.iter().map(|(_, lines)| lines.len()).sum();
        let mut pages = Vec::new();
        let mut after: Option<After> = None;
        loop {
            let is_final = pages.len() >= final_from;
            let snapshot = db.snapshot();
            let stored: Vec<Option<StoredLines<'_>>> = lists
                .iter()
                .map(|(section, lines)| {
                    apart.contains(section).then(|| {
                        if is_final {
                            let prefix = crate::model::final_lines_key(
                                "t",
                                "c",
                                &statement_of(section, &[]),
                                section.prior,
                            );
                            StoredLines::runs(&snapshot, prefix)
                        } else {
                            let prefix =
                                neruba_balances::state::line_list_key("t", "c", &list_of(section));
                            StoredLines::apart(&snapshot, prefix, held_of(lines))
                        }
                    })
                })
                .collect();
            // As the read hands them over: lists kept apart empty.
            let mut lists: Vec<(Section, Vec<StatementLine>)> = lists
                .iter()
                .map(|(s, lines)| {
                    let held = if apart.contains(s) {
                        Vec::new()
                    } else {
                        lines.clone()
                    };
                    (s.clone(), held)
                })
                .collect();
            let sections = lists
                .iter_mut()
                .zip(&stored)
                .map(|((s, l), stored)| (s.clone(), l, stored.as_ref()))
                .collect();
            let cursor = after
                .as_ref()
                .map(|a| After::decode(&a.encode(), READ).expect("decodes"));
            let next = page(READ, sections, limit, cursor.as_ref()).expect("a place");
            // As a reader takes them: the answer's lists in the answer's order.
            lists.sort_by(|a, b| a.0.cmp(&b.0));
            pages.push(
                lists
                    .into_iter()
                    .flat_map(|(s, lines)| {
                        lines
                            .into_iter()
                            .map(move |l| (s.clone(), l.meter, l.group, l.period_start))
                    })
                    .collect(),
            );
            // A cursor that does not move would read for ever.
            assert!(pages.len() <= total + 1, "pages never end");
            match next {
                Some(next) => after = Some(next),
                None => return pages,
            }
        }
    }

    #[test]
    fn pages_at_every_limit_hold_every_line_once_in_the_answers_order() {
        let project = |pages: Vec<Vec<Placed>>| -> Vec<(Section, String, String)> {
            pages
                .concat()
                .into_iter()
                .map(|(s, m, g, _)| (s, m, g["project"].clone()))
                .collect()
        };
        let whole = project(read_in_pages(&lists(), (&[], 0), 1, 100));
        let long = "y".repeat(2000);
        let want: Vec<(Section, String, String)> = [
            (Section::lines("EUR", P), "a", long.as_str()),
            (Section::lines("EUR", P), "b", "x"),
            (Section::lines("USD", P), "a", "p1"),
            (Section::lines("USD", P), "a", "p2"),
            (Section::lines("USD", P), "b", "p1"),
            (Section::prior_period("USD", P), "a", "p0"),
            (Section::pending("EUR"), "c", "z"),
        ]
        .into_iter()
        .map(|(s, m, p)| (s, m.to_owned(), p.to_owned()))
        .collect();
        // Each list in line order, though `lists` has some out of it.
        assert_eq!(whole, want);
        // Held, and with the statements' lists final, kept apart.
        let apart = [
            Section::lines("EUR", P),
            Section::lines("USD", P),
            Section::prior_period("USD", P),
        ];
        let cases = [(&[][..], 1), (&apart, 1), (&apart, 2), (&apart, 128)];
        for ((apart, run), final_from) in cases.into_iter().zip([0, 0, 1, 2]) {
            for limit in 1..=8 {
                let pages = read_in_pages(&lists(), (apart, final_from), run, limit);
                assert!(pages.iter().all(|p| !p.is_empty() && p.len() <= limit));
                assert_eq!(pages.len(), want.len().div_ceil(limit), "limit {limit}");
                assert_eq!(project(pages), want, "limit {limit} {apart:?} {run}");
            }
        }
    }

    #[test]
    fn a_cursor_names_a_long_group_by_its_digest_and_nothing_else_reads_as_one() {
        let mut eur = vec![line("b", "x"), line("a", &"y".repeat(2000))];
        let next = page(
            READ,
            vec![(Section::lines("EUR", P), &mut eur, None)],
            1,
            None,
        )
        .expect("a place")
        .expect("more");
        let text = next.encode();
        assert!(text.len() < 300, "{text}");
        assert!(next.digest.is_some());
        // A line added before the place between two pages is not read again.
        let mut eur = vec![line("a", "a"), line("b", "x"), line("a", &"y".repeat(2000))];
        let after = After::decode(&text, READ).expect("decodes");
        assert!(matches!(
            page(
                READ,
                vec![(Section::lines("EUR", P), &mut eur, None)],
                5,
                Some(&after)
            ),
            Ok(None)
        ));
        assert_eq!(eur, vec![line("b", "x")]);
        // A digest no line has, and text that is not a cursor.
        let mut other = vec![line("b", "x")];
        assert!(matches!(
            page(
                READ,
                vec![(Section::lines("EUR", P), &mut other, None)],
                5,
                Some(&after)
            ),
            Err(Unreadable::NotAPlace)
        ));
        for text in [
            "",
            "{}",
            r#"{"c":"c-1","y":"2026-11","s":{"pending":false,"currency":"EUR","period_start":"","prior":false},"m":"a","p":"t"}"#,
        ] {
            assert_eq!(After::decode(text, READ), None, "{text}");
        }
        // Another customer's or period's cursor is not one of this read.
        for read in [
            Read {
                customer: "c-2",
                ..READ
            },
            Read {
                period: "2026-12",
                ..READ
            },
        ] {
            assert_eq!(After::decode(&text, read), None, "{read:?}");
        }
    }

    proptest::proptest! {
        /// Lists of lines drawn in any order (meters, groups, one too long for a cursor to
        /// carry, period starts; statements of two currencies and two periods, their prior
        /// lines, pending corrections), read page by page at any limit through cursors as a
        /// client sends them back: every line once, in the answer's order (section, then
        /// meter, group and period start), every page full but the last.
        #[test]
        fn pages_of_drawn_lists_hold_every_line_once_in_the_answers_order(
            // Per list: its section (an index into the answer's order below), and per line
            // its meter, project and period start.
            lists in proptest::collection::vec(
                (
                    0_usize..6,
                    proptest::collection::vec((0_usize..3, 0_usize..4, 0_usize..2), 0..12),
                ),
                0..6,
            ),
            limit in 1_usize..10,
            // Per statement (the first three sections': the third's prior-period lines are
            // the fourth section), whether it is final, its lists kept apart.
            apart in proptest::collection::vec(proptest::bool::ANY, 3),
            // Lines a run of a final statement's stored lines holds, and the page from
            // which those statements are final (before it, open).
            run in 1_usize..5,
            final_from in 0_usize..4,
        ) {
            let long = "y".repeat(2000);
            let projects = ["", "p1", "p2", long.as_str()];
            // The sections in the answer's order: statements by currency, then period, each
            // its lines then its prior-period lines; then pending corrections by currency.
            let in_order = [
                Section::lines("EUR", P),
                Section::lines("USD", "2026-10-15T00:00:00.000Z"),
                Section::lines("USD", P),
                Section::prior_period("USD", P),
                Section::pending("EUR"),
                Section::pending("USD"),
            ];
            // One list a section, one line a meter, group and period start in it.
            let mut drawn: BTreeMap<usize, Vec<StatementLine>> = BTreeMap::new();
            for (section, lines) in &lists {
                let list = drawn.entry(*section).or_default();
                for &(meter, project, start) in lines {
                    let mut line = line(["a", "b", "c"][meter], projects[project]);
                    if project == 0 {
                        line.group.clear();
                    }
                    line.period_start = [P, "2026-10-01T00:00:00.000Z"][start].into();
                    let same = |l: &StatementLine| {
                        (&l.meter, &l.group, &l.period_start)
                            == (&line.meter, &line.group, &line.period_start)
                    };
                    if !list.iter().any(same) {
                        list.push(line);
                    }
                }
            }
            let mut want: Vec<(usize, String, BTreeMap<String, String>, String)> = drawn
                .iter()
                .flat_map(|(&s, lines)| {
                    lines.iter().map(move |l| {
                        (s, l.meter.clone(), l.group.clone(), l.period_start.clone())
                    })
                })
                .collect();
            want.sort();
            let want: Vec<Placed> = want
                .into_iter()
                .map(|(s, m, g, p)| (in_order[s].clone(), m, g, p))
                .collect();
            let lists: Vec<(Section, Vec<StatementLine>)> = drawn
                .into_iter()
                .map(|(s, lines)| (in_order[s].clone(), lines))
                .collect();
            let apart: Vec<Section> = [0, 1, 2, 2]
                .iter()
                .zip(&in_order)
                .filter(|&(&statement, _)| apart[statement])
                .map(|(_, section)| section.clone())
                .collect();
            let pages = read_in_pages(&lists, (&apart, final_from), run, limit);
            proptest::prop_assert_eq!(pages.len(), want.len().div_ceil(limit).max(1));
            proptest::prop_assert!(pages.iter().all(|p| p.len() <= limit));
            let full = pages.split_last().is_none_or(|(_, before)| {
                before.iter().all(|p| p.len() == limit)
            });
            proptest::prop_assert!(full, "a page short before the last");
            proptest::prop_assert_eq!(pages.concat(), want);
        }
    }
}
