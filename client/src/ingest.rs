//! Batched ingest: [`Ingestor::send`] queues an event, a background task packs queued events
//! into batches and POSTs them to `/v1/events`, and each event's [`Receipt`] resolves to the
//! gateway's verdict on it.
//!
//! Invariants:
//! - **bounded memory**: at most `queue_capacity` events wait in the queue, one batch is being
//!   filled, one full batch waits for a slot, and `max_in_flight` batches are being sent; when
//!   all of that is taken, [`Ingestor::send`] waits (backpressure) — nothing grows without
//!   bound;
//! - **every event taken gets exactly one outcome**: its receipt resolves to `accepted`,
//!   `duplicate` or `rejected` (with the gateway's code), or to the error that failed its
//!   batch, and it is counted once in [`Totals`];
//! - **a retry resends only what is unsettled, with the same bytes**: ids and times are fixed
//!   when an event is queued ([`crate::Event`]); when the gateway answers 503 with per-event
//!   results, the events it did accept keep that outcome and only those it could not deliver
//!   are sent again, so the gateway's deduplication is a safety net, not the mechanism;
//! - **flush covers everything sent before it**: [`Ingestor::flush`] returns once every event
//!   queued before the call has its outcome, and [`Ingestor::positions`] then covers every one
//!   of them accepted (and every duplicate whose first write the answering gateway remembers,
//!   such as a retry's after a lost answer): the gateway's `positions`, the highest offset per
//!   events-topic partition, merged over every answer, so a [`Reader::at_all`](crate::Reader::at_all) of
//!   them reads those events back once the aggregators have folded them.
//!
//! The mechanism: one channel carries events, flushes and closes in the order they were sent,
//! which is what lets a flush know which events it covers (their sequence numbers are below
//! the flush's). A batch is sealed when it holds `batch_size` events, when the next event
//! would take it past `max_batch_bytes`, when `linger` has passed since its first event, or
//! when a flush or close asks for it.

use crate::credits::Position;
use crate::error::{Error, Result};
use crate::event::{Event, Wire};
use crate::http::{Answer, Failure, Transport};
use crate::retry;
use reqwest::Method;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;

/// How the ingestor batches (set on [`ClientBuilder`](crate::ClientBuilder)).
#[derive(Debug, Clone)]
pub(crate) struct IngestConfig {
    pub(crate) batch_size: usize,
    pub(crate) max_batch_bytes: usize,
    pub(crate) linger: Duration,
    pub(crate) max_in_flight: usize,
    pub(crate) queue_capacity: usize,
    pub(crate) observer: Option<AttemptObserver>,
}

/// One ingest request attempt, as [`ClientBuilder::on_ingest_attempt`] sees it.
///
/// [`ClientBuilder::on_ingest_attempt`]: crate::ClientBuilder::on_ingest_attempt
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IngestAttempt {
    /// From sending the request to having read the whole answer (or the transport failing).
    pub elapsed: Duration,
    /// The answer's HTTP status; `None` when no answer came (connect, reset, timeout).
    pub status: Option<u16>,
    /// Events in the request (a retry after a partial 503 carries only the undelivered ones).
    pub events: usize,
}

/// The callback behind [`IngestAttempt`]s; called on the ingestor's background tasks, so it
/// must be quick (count, record a latency) and never block.
#[derive(Clone)]
pub(crate) struct AttemptObserver(pub(crate) Arc<dyn Fn(&IngestAttempt) + Send + Sync>);

impl std::fmt::Debug for AttemptObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AttemptObserver")
    }
}

/// The gateway's verdict on one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The broker acknowledged the event (`acks=all`): it will be counted.
    Accepted,
    /// The tenant had already sent this id; nothing was written, and that is not an error.
    Duplicate,
    /// The event is invalid and was not written.
    Rejected {
        /// The stable rejection code (`missing_field`, `invalid_value`, …).
        code: String,
        /// The gateway's explanation.
        message: String,
    },
}

/// Outcome counts since the ingestor started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Totals {
    /// Events answered [`Outcome::Accepted`].
    pub accepted: u64,
    /// Events answered [`Outcome::Duplicate`].
    pub duplicate: u64,
    /// Events answered [`Outcome::Rejected`].
    pub rejected: u64,
    /// Events whose batch failed as a whole (refused, or unavailable through every retry):
    /// not known to be accepted; safe to send again with the same ids.
    pub failed: u64,
}

/// The counters behind [`Totals`] and [`Ingestor::positions`], shared by the handles and the
/// background task.
#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    duplicate: AtomicU64,
    rejected: AtomicU64,
    failed: AtomicU64,
    /// The highest offset written per (topic, partition), as the gateway answered: one entry
    /// per events-topic partition at most, so bounded by the topic's partition count.
    landed: Mutex<BTreeMap<(String, i32), i64>>,
}

impl Counters {
    fn add(&self, totals: Totals) {
        self.accepted.fetch_add(totals.accepted, Ordering::Relaxed);
        self.duplicate
            .fetch_add(totals.duplicate, Ordering::Relaxed);
        self.rejected.fetch_add(totals.rejected, Ordering::Relaxed);
        self.failed.fetch_add(totals.failed, Ordering::Relaxed);
    }

    fn land(&self, positions: Vec<Position>) {
        if positions.is_empty() {
            return;
        }
        let mut landed = match self.landed.lock() {
            Ok(landed) => landed,
            Err(poisoned) => poisoned.into_inner(),
        };
        for position in positions {
            let highest = landed
                .entry((position.topic, position.partition))
                .or_insert(position.offset);
            *highest = (*highest).max(position.offset);
        }
    }

    fn landed(&self) -> Vec<Position> {
        let landed = match self.landed.lock() {
            Ok(landed) => landed,
            Err(poisoned) => poisoned.into_inner(),
        };
        landed
            .iter()
            .map(|((topic, partition), offset)| Position::new(topic.clone(), *partition, *offset))
            .collect()
    }

    fn snapshot(&self) -> Totals {
        Totals {
            accepted: self.accepted.load(Ordering::Relaxed),
            duplicate: self.duplicate.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

/// A handle for sending events in batches; made by [`Client::ingestor`](crate::Client::ingestor).
///
/// Clones share one queue and one background task, so many tasks can send through one
/// ingestor.
///
/// # What dropping guarantees
///
/// When the last handle is dropped, the background task goes on alone: it sends every event
/// already taken by [`send`](Self::send) (retrying as usual), resolves their receipts, and then
/// ends. That holds **only while the Tokio runtime runs**: a runtime shutting down (for example
/// `main` returning from `#[tokio::main]`) stops the task wherever it is, and events not yet
/// acknowledged are lost (a receipt still awaited elsewhere resolves to
/// [`Error::Interrupted`]). Call [`close`](Self::close) before the runtime ends to be sure
/// everything went out.
#[derive(Debug, Clone)]
pub struct Ingestor {
    commands: mpsc::Sender<Command>,
    counters: Arc<Counters>,
    /// Turns `true` (or its sender is dropped) when the background task has ended.
    finished: watch::Receiver<bool>,
}

/// What the handles ask of the background task, in the order they asked.
#[derive(Debug)]
enum Command {
    Event(Queued),
    Flush(oneshot::Sender<Result<Totals>>),
    Close(oneshot::Sender<Result<Totals>>),
}

/// An event taken, waiting for its batch.
#[derive(Debug)]
struct Queued {
    wire: Wire,
    reply: oneshot::Sender<Result<Outcome>>,
}

/// The future outcome of one sent event; `.await` it for the gateway's verdict.
///
/// Dropping a receipt does not cancel the event: it is sent all the same, and counted in
/// [`Totals`].
#[derive(Debug)]
pub struct Receipt {
    id: String,
    outcome: oneshot::Receiver<Result<Outcome>>,
}

impl Receipt {
    /// The event's id: the one it was given, or the one the client made up.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Future for Receipt {
    type Output = Result<Outcome>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.outcome)
            .poll(cx)
            .map(|answer| answer.unwrap_or(Err(Error::Interrupted)))
    }
}

impl Ingestor {
    /// Starts the background task on the current Tokio runtime.
    pub(crate) fn start(transport: Arc<Transport>, config: IngestConfig) -> Self {
        let (commands, receiver) = mpsc::channel(config.queue_capacity);
        let counters = Arc::new(Counters::default());
        let (finish, finished) = watch::channel(false);
        let batcher = Batcher {
            commands: receiver,
            receiving: true,
            transport,
            counters: counters.clone(),
            next_seq: 0,
            open: Batch::default(),
            deadline: None,
            sealed: None,
            in_flight: JoinSet::new(),
            flying: HashMap::new(),
            flying_seqs: BTreeSet::new(),
            flushes: Vec::new(),
            closes: Vec::new(),
            failure: None,
            config,
        };
        tokio::spawn(async move {
            batcher.run().await;
            finish.send_replace(true);
        });
        Self {
            commands,
            counters,
            finished,
        }
    }

    /// Queues `event` and returns its [`Receipt`]. Waits while the queue is full
    /// (backpressure); fails with [`Error::Closed`] once the ingestor is closed, and with
    /// [`Error::InvalidArgument`] for an event that cannot be serialized.
    ///
    /// An event without an id gets one here ([`Receipt::id`]); one without a time gets the
    /// current time.
    pub async fn send(&self, event: Event) -> Result<Receipt> {
        let wire = event.into_wire()?;
        let (reply, outcome) = oneshot::channel();
        let id = wire.id.clone();
        self.commands
            .send(Command::Event(Queued { wire, reply }))
            .await
            .map_err(|_| Error::Closed)?;
        Ok(Receipt { id, outcome })
    }

    /// Sends what is queued now, without waiting for `linger`, and returns once every event
    /// queued before the call has its outcome.
    ///
    /// `Ok` carries the [`Totals`] so far. `Err` is the first whole-batch failure (refusal,
    /// or unavailability through every retry) since the previous `flush` or `close` returned;
    /// each failure is reported by one flush, and the events concerned are counted in
    /// [`Totals::failed`] and their receipts carry the error.
    pub async fn flush(&self) -> Result<Totals> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Flush(reply))
            .await
            .map_err(|_| Error::Closed)?;
        answer.await.unwrap_or(Err(Error::Interrupted))
    }

    /// Flushes and stops: every event queued before the call (by any clone) is sent and
    /// answered, later [`send`](Self::send)s fail with [`Error::Closed`], and the background
    /// task ends. The result is [`flush`](Self::flush)'s.
    pub async fn close(self) -> Result<Totals> {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Close(reply)).await.is_err() {
            // Closed already, by a clone: wait for that close to finish. Its caller got any
            // failure; a task that vanished (its runtime shutting down) ends the wait too.
            let mut finished = self.finished.clone();
            let _ = finished.wait_for(|done| *done).await;
            return Ok(self.counters.snapshot());
        }
        answer.await.unwrap_or(Err(Error::Interrupted))
    }

    /// The outcome counts so far.
    pub fn totals(&self) -> Totals {
        self.counters.snapshot()
    }

    /// Where the events accepted so far landed: per events-topic partition, the highest
    /// offset written, from every answer read so far (after a [`flush`](Self::flush), every
    /// event queued before it). A [`Reader::at_all`](crate::Reader::at_all) of them reads the
    /// events' usage back once the aggregators have folded them (usage shows closed windows:
    /// an event of a window still open appears when its window closes). A duplicate adds
    /// where its first write landed when the gateway that answered remembers it (the same
    /// gateway, within its repeat window): so an event whose first answer was lost and whose
    /// retry is answered `duplicate` is still covered. A duplicate the gateway holds without a
    /// position (first sent through the raw topic) adds none.
    pub fn positions(&self) -> Vec<Position> {
        self.counters.landed()
    }
}

/// Events packed together, in sequence order.
#[derive(Debug, Default)]
struct Batch {
    /// The sequence number of the first event.
    first_seq: u64,
    events: Vec<Queued>,
    /// The JSON array's size so far.
    bytes: usize,
}

/// What a delivered (or failed) batch adds up to.
#[derive(Debug)]
struct Settled {
    totals: Totals,
    error: Option<Error>,
    /// Where its accepted events landed, as the answers said.
    positions: Vec<Position>,
}

/// The background task: takes commands, seals and sends batches, answers flushes.
struct Batcher {
    commands: mpsc::Receiver<Command>,
    /// False once the channel is closed and empty: what is left is to finish.
    receiving: bool,
    transport: Arc<Transport>,
    config: IngestConfig,
    counters: Arc<Counters>,
    /// The sequence number the next event taken gets.
    next_seq: u64,
    /// The batch being filled.
    open: Batch,
    /// When the open batch's linger ends.
    deadline: Option<Instant>,
    /// A full batch waiting for an in-flight slot; while there is one, nothing is taken from
    /// the channel (this is where backpressure starts).
    sealed: Option<Batch>,
    in_flight: JoinSet<Settled>,
    /// Each in-flight task's first sequence number and event count.
    flying: HashMap<tokio::task::Id, (u64, usize)>,
    /// The first sequence numbers of the batches in flight.
    flying_seqs: BTreeSet<u64>,
    /// Flushes waiting, each with the sequence number all events below which must be settled.
    flushes: Vec<(u64, oneshot::Sender<Result<Totals>>)>,
    closes: Vec<oneshot::Sender<Result<Totals>>>,
    /// The first batch failure not yet reported by a flush.
    failure: Option<Error>,
}

impl Batcher {
    async fn run(mut self) {
        loop {
            self.seal_and_dispatch();
            self.answer_flushes();
            if !self.receiving
                && self.open.events.is_empty()
                && self.sealed.is_none()
                && self.in_flight.is_empty()
            {
                break;
            }
            let can_take = self.receiving
                && self.sealed.is_none()
                && self.open.events.len() < self.config.batch_size;
            let deadline = self.deadline.filter(|_| self.sealed.is_none());
            tokio::select! {
                biased;
                Some(joined) = self.in_flight.join_next_with_id() => self.settle(joined),
                () = sleep_until(deadline), if deadline.is_some() => self.deadline = None,
                command = self.commands.recv(), if can_take => match command {
                    None => self.receiving = false,
                    Some(Command::Event(queued)) => self.take(queued),
                    Some(Command::Flush(reply)) => self.flushes.push((self.next_seq, reply)),
                    Some(Command::Close(reply)) => {
                        self.closes.push(reply);
                        // Later sends fail; what is in the channel already is still taken.
                        self.commands.close();
                    }
                },
            }
        }
        let result = match self.failure.take() {
            Some(error) => Err(error),
            None => Ok(self.counters.snapshot()),
        };
        for reply in self.closes.drain(..) {
            // A closer that stopped waiting does not need the answer.
            let _ = reply.send(result.clone());
        }
    }

    /// Adds an event to the open batch, sealing the batch first if the event would take it
    /// past the byte limit.
    fn take(&mut self, queued: Queued) {
        let size = queued.wire.json.len() + 1;
        if !self.open.events.is_empty() && self.open.bytes + size > self.config.max_batch_bytes {
            self.seal();
        }
        if self.open.events.is_empty() {
            self.open.first_seq = self.next_seq;
            self.open.bytes = 1;
            self.deadline = Some(Instant::now() + self.config.linger);
        }
        self.open.bytes += size;
        self.open.events.push(queued);
        self.next_seq += 1;
    }

    /// Seals the open batch if it is due, and starts sealed batches while there are slots.
    fn seal_and_dispatch(&mut self) {
        loop {
            if self.sealed.is_none() && !self.open.events.is_empty() {
                let full = self.open.events.len() >= self.config.batch_size;
                let lingered = self.deadline.is_none_or(|d| d <= Instant::now());
                let asked = !self.receiving
                    || self
                        .flushes
                        .iter()
                        .any(|(target, _)| *target > self.open.first_seq);
                if full || lingered || asked {
                    self.seal();
                }
            }
            if self.in_flight.len() >= self.config.max_in_flight {
                return;
            }
            let Some(batch) = self.sealed.take() else {
                return;
            };
            let (first_seq, count) = (batch.first_seq, batch.events.len());
            let task = self.in_flight.spawn(deliver(
                self.transport.clone(),
                self.config.observer.clone(),
                batch.events,
            ));
            self.flying.insert(task.id(), (first_seq, count));
            self.flying_seqs.insert(first_seq);
        }
    }

    /// Moves the open batch to the sealed slot (which must be free).
    fn seal(&mut self) {
        debug_assert!(self.sealed.is_none(), "one sealed batch at a time");
        self.sealed = Some(std::mem::take(&mut self.open));
        self.deadline = None;
    }

    fn settle(&mut self, joined: Result<(tokio::task::Id, Settled), JoinError>) {
        let (id, settled) = match joined {
            Ok((id, settled)) => (id, settled),
            Err(e) => {
                // The task panicked or was cancelled: its receipts resolve to `Interrupted`
                // (their senders were dropped with it).
                let count = self.flying.get(&e.id()).map_or(0, |(_, count)| *count);
                let settled = Settled {
                    totals: Totals {
                        failed: u64::try_from(count).unwrap_or(u64::MAX),
                        ..Totals::default()
                    },
                    error: Some(Error::Interrupted),
                    positions: Vec::new(),
                };
                (e.id(), settled)
            }
        };
        if let Some((first_seq, _)) = self.flying.remove(&id) {
            self.flying_seqs.remove(&first_seq);
        }
        self.counters.add(settled.totals);
        self.counters.land(settled.positions);
        if self.failure.is_none() {
            self.failure = settled.error;
        }
    }

    /// The lowest sequence number without an outcome (the next one if all have one).
    fn lowest_unsettled(&self) -> u64 {
        if let Some(first) = self.flying_seqs.first() {
            return *first;
        }
        if let Some(sealed) = &self.sealed {
            return sealed.first_seq;
        }
        if !self.open.events.is_empty() {
            return self.open.first_seq;
        }
        self.next_seq
    }

    fn answer_flushes(&mut self) {
        if self.flushes.is_empty() {
            return;
        }
        let lowest = self.lowest_unsettled();
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.flushes)
            .into_iter()
            .partition(|(target, _)| *target <= lowest);
        self.flushes = waiting;
        for (_, reply) in done {
            let result = match self.failure.take() {
                Some(error) => Err(error),
                None => Ok(self.counters.snapshot()),
            };
            // A flusher that stopped waiting does not need the answer.
            let _ = reply.send(result);
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The answer to `POST /v1/events`: one result per event, in request order, and where the
/// accepted ones landed.
#[derive(Debug, Deserialize)]
struct IngestAnswer {
    results: Vec<EventResult>,
    /// `<topic>:<partition>:<offset>` per events-topic partition written to (absent from a
    /// gateway older than positions).
    #[serde(default)]
    positions: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct EventResult {
    id: Option<String>,
    status: String,
    code: Option<String>,
    message: Option<String>,
}

/// Sends one batch until every event has an outcome or the batch failed, then resolves the
/// receipts.
async fn deliver(
    transport: Arc<Transport>,
    observer: Option<AttemptObserver>,
    events: Vec<Queued>,
) -> Settled {
    let mut outcomes: Vec<Option<Outcome>> = vec![None; events.len()];
    let mut positions = Vec::new();
    let result = send_until_settled(
        &transport,
        observer.as_ref(),
        &events,
        &mut outcomes,
        &mut positions,
    )
    .await;
    let mut totals = Totals::default();
    for (queued, outcome) in events.into_iter().zip(outcomes) {
        let answer = match (outcome, &result) {
            (Some(outcome), _) => {
                match outcome {
                    Outcome::Accepted => totals.accepted += 1,
                    Outcome::Duplicate => totals.duplicate += 1,
                    Outcome::Rejected { .. } => totals.rejected += 1,
                }
                Ok(outcome)
            }
            (None, Err(error)) => {
                totals.failed += 1;
                Err(error.clone())
            }
            (None, Ok(())) => {
                totals.failed += 1;
                Err(Error::Interrupted)
            }
        };
        // A caller that dropped its receipt does not need the answer.
        let _ = queued.reply.send(answer);
    }
    Settled {
        totals,
        error: result.err(),
        positions,
    }
}

/// The attempts of one batch: each sends the events still without an outcome; the positions
/// every answer gave are added to `positions`.
async fn send_until_settled(
    transport: &Transport,
    observer: Option<&AttemptObserver>,
    events: &[Queued],
    outcomes: &mut [Option<Outcome>],
    positions: &mut Vec<Position>,
) -> Result<()> {
    let url = transport.url(&["v1", "events"])?;
    let mut attempts = 0;
    loop {
        let pending: Vec<usize> = (0..events.len())
            .filter(|i| outcomes.get(*i).is_some_and(Option::is_none))
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        attempts += 1;
        let body = array_of(events, &pending);
        let started = Instant::now();
        let sent = transport.send(Method::POST, url.clone(), Some(body)).await;
        if let Some(AttemptObserver(observe)) = observer {
            observe(&IngestAttempt {
                elapsed: started.elapsed(),
                status: sent.as_ref().ok().map(|answer| answer.status),
                events: pending.len(),
            });
        }
        let failure = match sent {
            Err(e) => Failure::transport(&e),
            Ok(answer) if answer.status == 200 => {
                let (results, landed) = read_results(&answer, events, &pending)?;
                positions.extend(landed);
                record(outcomes, &pending, results, &answer)?;
                if pending
                    .iter()
                    .any(|i| outcomes.get(*i).is_some_and(Option::is_none))
                {
                    return Err(Error::Protocol {
                        status: answer.status,
                        message: "`not_delivered` in a 200 answer".to_owned(),
                    });
                }
                return Ok(());
            }
            Ok(answer) if retry::is_retryable_status(answer.status) => {
                // A 503 from the gateway says which events did land: they keep their outcome
                // and are not sent again.
                if answer.status == 503
                    && let Ok((results, landed)) = read_results(&answer, events, &pending)
                {
                    positions.extend(landed);
                    record(outcomes, &pending, results, &answer)?;
                }
                Failure::answer(&answer)
            }
            Ok(answer) => return Err(answer.refused()),
        };
        transport.pause(attempts, failure).await?;
    }
}

/// The JSON array of the events at `indexes`.
fn array_of(events: &[Queued], indexes: &[usize]) -> Vec<u8> {
    let picked = || indexes.iter().filter_map(|i| events.get(*i));
    let size = picked().map(|q| q.wire.json.len() + 1).sum::<usize>() + 1;
    let mut body = Vec::with_capacity(size);
    body.push(b'[');
    for (n, queued) in picked().enumerate() {
        if n > 0 {
            body.push(b',');
        }
        body.extend_from_slice(queued.wire.json.as_bytes());
    }
    body.push(b']');
    body
}

/// The answer's results, checked against what was sent (one per event, same ids), and its
/// positions.
fn read_results(
    answer: &Answer,
    events: &[Queued],
    pending: &[usize],
) -> Result<(Vec<EventResult>, Vec<Position>)> {
    let IngestAnswer { results, positions } = answer.decode("ingest answer")?;
    let positions = positions
        .iter()
        .map(|text| {
            text.parse::<Position>().map_err(|_| Error::Protocol {
                status: answer.status,
                message: format!("`{text}` is not a position"),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if results.len() != pending.len() {
        return Err(Error::Protocol {
            status: answer.status,
            message: format!(
                "{} results for {} events sent",
                results.len(),
                pending.len()
            ),
        });
    }
    for (result, index) in results.iter().zip(pending) {
        let sent = events.get(*index).map(|q| q.wire.id.as_str());
        if let (Some(answered), Some(sent)) = (result.id.as_deref(), sent)
            && answered != sent
        {
            return Err(Error::Protocol {
                status: answer.status,
                message: format!("result for `{answered}` where `{sent}` was sent"),
            });
        }
    }
    Ok((results, positions))
}

/// Records the settled results; `not_delivered` ones stay without an outcome.
fn record(
    outcomes: &mut [Option<Outcome>],
    pending: &[usize],
    results: Vec<EventResult>,
    answer: &Answer,
) -> Result<()> {
    for (result, index) in results.into_iter().zip(pending) {
        let outcome = match result.status.as_str() {
            "accepted" => Outcome::Accepted,
            "duplicate" => Outcome::Duplicate,
            "rejected" => Outcome::Rejected {
                code: result.code.unwrap_or_else(|| "unknown".to_owned()),
                message: result.message.unwrap_or_default(),
            },
            "not_delivered" => continue,
            other => {
                return Err(Error::Protocol {
                    status: answer.status,
                    message: format!("unknown event status `{other}`"),
                });
            }
        };
        if let Some(slot) = outcomes.get_mut(*index) {
            *slot = Some(outcome);
        }
    }
    Ok(())
}
