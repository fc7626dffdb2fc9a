//! A worker's sending thread: the outputs of a batch are handed to it as they are made, and it
//! encodes and enqueues them in that order while the worker applies the next messages (on 2
//! cores, the balances stage's enqueueing was a sixth of its batches' time). At the batch's
//! end the worker takes back every output with its delivery future (a *round*), awaits the
//! acknowledgements, and only then writes the batch; sending a batch again (a failed
//! delivery) happens on the worker's thread, from the outputs taken back.
//!
//! Once the worker is killed or closed (it failed, or is gone) the thread enqueues nothing
//! more (what librdkafka already holds may still go out, as from a crashed process's last
//! moments), and a round it did not enqueue whole is given back as [`Finished::Cut`]: the
//! worker then writes nothing of that batch, so no state is ever written past an output not
//! sent. A worker's outbox, dropped, waits for its thread to end.

use crate::{AsDeadLetter, Config, DeadLetter, Error, Result, Sender, Sink};
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an output waits before it is offered again to a producer whose queue was full.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(1);

/// How long an output waits for a full producer queue while nothing leaves it.
const QUEUE_FULL_PATIENCE: Duration = Duration::from_secs(10);

/// Handings the thread has not taken yet, at most (each up to [`crate::Config::hand_every`]
/// messages' outputs): past it, the worker waits for the thread.
const HANDED_BOUND: usize = 64;

/// What enqueueing an output gave.
pub(crate) type Pending = std::result::Result<DeliveryFuture, KafkaError>;

/// A round (what was handed since the last [`Outbox::finish`]) as the thread gives it back.
pub(crate) enum Finished<O> {
    /// Nothing was handed.
    Nothing,
    /// Every output handed, in order, enqueued with `producer`, and what enqueueing each gave.
    Sent {
        producer: FutureProducer,
        outputs: Vec<O>,
        pending: Vec<Pending>,
    },
    /// The worker was killed or closed during the round: some of it was not enqueued.
    Cut,
}

/// What the worker tells its sending thread.
enum Command<O> {
    /// Enqueue these after those handed before.
    Send(Vec<O>),
    /// Give back the round.
    Finish,
}

/// What enqueues a stage's outputs and dead letters: shared by the sending thread and the
/// worker (which sends a batch again).
pub(crate) struct Sending<O, X> {
    sender: X,
    output_topic: String,
    output_partitions: i32,
    dead_letter_topic: String,
    input_topic: String,
    _outputs: std::marker::PhantomData<fn(&O)>,
}

impl<O: AsDeadLetter, X: Sender<O>> Sending<O, X> {
    /// Enqueues every output; the caller awaits the acknowledgements. An output the producer's
    /// queue has no room for waits until acknowledgements free some, a stage shutting down or
    /// not (a batch's outputs are not bounded by its messages, so none may fail for it: a
    /// failed one sends the batch again, which would overflow the same way, and a stage
    /// stopping delivers and writes its batch). It fails only if the queue holds nothing to
    /// free (the output is larger than the queue's byte bound) or nothing left it for
    /// [`QUEUE_FULL_PATIENCE`] (the broker is away; the batch is then sent again after a
    /// backoff, as for any failure). Once `stopped()` (the worker was killed or is gone), the
    /// rest are not enqueued: each fails as [`KafkaError::Canceled`].
    pub(crate) fn send(
        &self,
        producer: &FutureProducer,
        outputs: &[O],
        stopped: &dyn Fn() -> bool,
    ) -> Vec<Pending> {
        outputs
            .iter()
            .map(|output| {
                let mut waiting: Option<(Instant, i32)> = None;
                loop {
                    if stopped() {
                        break Err(KafkaError::Canceled);
                    }
                    let sent = match output.dead_letter() {
                        Some(letter) => self.send_dead_letter(producer, letter),
                        None => self.sender.send(
                            &Sink {
                                producer,
                                topic: &self.output_topic,
                                partitions: self.output_partitions,
                            },
                            output,
                        ),
                    };
                    if !matches!(
                        sent,
                        Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull))
                    ) {
                        break sent;
                    }
                    // Asked only of a full queue: the call takes librdkafka's locks.
                    let queued = producer.in_flight_count();
                    if queued == 0 {
                        break sent;
                    }
                    // The producer's own thread serves the acknowledgements that free it.
                    match waiting {
                        Some((since, before)) if queued >= before => {
                            if since.elapsed() >= QUEUE_FULL_PATIENCE {
                                break sent;
                            }
                        }
                        _ => waiting = Some((Instant::now(), queued)),
                    }
                    std::thread::sleep(QUEUE_FULL_WAIT);
                }
            })
            .collect()
    }

    fn send_dead_letter(
        &self,
        producer: &FutureProducer,
        letter: &DeadLetter,
    ) -> std::result::Result<DeliveryFuture, KafkaError> {
        let headers = neruba_kafka::dead_letter_headers(
            letter.code,
            &letter.message,
            &self.input_topic,
            letter.offset,
        );
        let mut record = FutureRecord::to(&self.dead_letter_topic)
            .payload(letter.payload.as_slice())
            .headers(headers);
        if let Some(key) = &letter.key {
            record = record.key(key.as_slice());
        }
        producer.send_result(record).map_err(|(e, _)| e)
    }
}

/// The worker's side of its sending thread.
pub(crate) struct Outbox<O, X> {
    sending: Arc<Sending<O, X>>,
    /// `None` only as the outbox is dropped (which ends the thread).
    commands: Option<SyncSender<Command<O>>>,
    finished: Receiver<Finished<O>>,
    /// Whether anything was handed since the last [`Outbox::finish`].
    handed: bool,
    /// Set once the worker failed or is gone: the thread enqueues nothing more.
    closed: Arc<AtomicBool>,
    /// Joined when the outbox is dropped, or to tell why the thread ended early.
    thread: Option<JoinHandle<()>>,
}

impl<O: AsDeadLetter + Send + 'static, X: Sender<O>> Outbox<O, X> {
    /// Starts the sending thread of stage `name`'s worker, enqueueing with `producer`'s current
    /// producer (read once a round). Once `kill` is set it enqueues nothing more, as a killed
    /// process would not.
    pub(crate) fn start(
        name: &str,
        sender: X,
        producer: neruba_kafka::Recoverable,
        config: &Config,
        output_topic: String,
        output_partitions: i32,
        kill: Arc<AtomicBool>,
    ) -> Result<Self> {
        let sending = Arc::new(Sending {
            sender,
            output_topic,
            output_partitions,
            dead_letter_topic: config.dead_letter_topic.clone(),
            input_topic: config.input_topic.clone(),
            _outputs: std::marker::PhantomData,
        });
        let (commands, handed) = mpsc::sync_channel::<Command<O>>(HANDED_BOUND);
        let (give_back, finished) = mpsc::sync_channel::<Finished<O>>(1);
        let closed = Arc::new(AtomicBool::new(false));
        let (thread_sending, thread_closed) = (sending.clone(), closed.clone());
        let thread = std::thread::Builder::new()
            // Linux keeps 15 bytes of a thread's name.
            .name(format!("{name}-send"))
            .spawn(move || {
                let stopped =
                    || kill.load(Ordering::SeqCst) || thread_closed.load(Ordering::SeqCst);
                let mut round: Option<(FutureProducer, Vec<O>, Vec<Pending>)> = None;
                let mut cut = false;
                // Ends when the worker is gone (its side of the channel dropped).
                for command in handed {
                    match command {
                        Command::Send(batch) => {
                            if cut || stopped() {
                                cut = true;
                                continue;
                            }
                            let (producer, outputs, pending) = round
                                .get_or_insert_with(|| (producer.get(), Vec::new(), Vec::new()));
                            pending.extend(thread_sending.send(producer, &batch, &stopped));
                            outputs.extend(batch);
                            // Stopped partway: the rest of the handing was not enqueued.
                            cut = stopped();
                        }
                        Command::Finish => {
                            let finished = match (std::mem::take(&mut cut), round.take()) {
                                (true, _) => Finished::Cut,
                                (false, None) => Finished::Nothing,
                                (false, Some((producer, outputs, pending))) => Finished::Sent {
                                    producer,
                                    outputs,
                                    pending,
                                },
                            };
                            if give_back.send(finished).is_err() {
                                return;
                            }
                        }
                    }
                }
            })
            .map_err(|e| Error::Bug(format!("the sending thread did not start: {e}")))?;
        Ok(Self {
            sending,
            commands: Some(commands),
            finished,
            handed: false,
            closed,
            thread: Some(thread),
        })
    }

    /// What enqueues outputs, to send a batch again.
    pub(crate) fn sending(&self) -> &Sending<O, X> {
        &self.sending
    }

    /// Hands `outputs` to the thread, which enqueues them after those handed before.
    pub(crate) fn hand(&mut self, outputs: Vec<O>) -> Result<()> {
        if self.command(Command::Send(outputs)).is_err() {
            return Err(self.ended());
        }
        self.handed = true;
        Ok(())
    }

    /// The round: everything handed since the last call (once the thread has enqueued it).
    pub(crate) fn finish(&mut self) -> Result<Finished<O>> {
        if !std::mem::take(&mut self.handed) {
            return Ok(Finished::Nothing);
        }
        if self.command(Command::Finish).is_err() {
            return Err(self.ended());
        }
        self.finished.recv().map_err(|_| self.ended())
    }

    fn command(&self, command: Command<O>) -> std::result::Result<(), ()> {
        match &self.commands {
            Some(commands) => commands.send(command).map_err(|_| ()),
            None => Err(()),
        }
    }

    /// The thread enqueues nothing more (the worker failed or is gone).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Why the thread ended (it ends only with the worker, unless it panicked).
    fn ended(&mut self) -> Error {
        let panic = self.thread.take().and_then(|thread| thread.join().err());
        let why = panic.as_ref().and_then(|p| {
            p.downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| p.downcast_ref::<String>().cloned())
        });
        Error::Bug(format!(
            "the sending thread ended: {}",
            why.as_deref().unwrap_or("no panic message")
        ))
    }
}

impl<O, X> Drop for Outbox<O, X> {
    /// Outputs still handed are not enqueued once the worker is gone; the thread, stopped
    /// between two outputs at most, is waited for.
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        drop(self.commands.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::DefaultProducerContext;

    /// A value for the output topic, or a refused input.
    enum Out {
        Value(&'static str),
        Refused(DeadLetter),
    }

    impl AsDeadLetter for Out {
        fn dead_letter(&self) -> Option<&DeadLetter> {
            match self {
                Out::Value(_) => None,
                Out::Refused(letter) => Some(letter),
            }
        }
    }

    /// Sends each value under one key, so they share a partition and its order.
    struct Values;

    impl Sender<Out> for Values {
        fn send(
            &self,
            sink: &Sink<'_>,
            output: &Out,
        ) -> std::result::Result<DeliveryFuture, KafkaError> {
            match output {
                Out::Value(value) => sink.keyed(b"k", value.as_bytes(), "k"),
                Out::Refused(_) => Err(KafkaError::Canceled),
            }
        }
    }

    /// A broker, an outbox sending to it, the outbox's kill flag, and its producer.
    struct Fixture {
        cluster: MockCluster<'static, DefaultProducerContext>,
        outbox: Outbox<Out, Values>,
        kill: Arc<AtomicBool>,
        producer: neruba_kafka::Recoverable,
    }

    /// An outbox on a fresh broker (topics `out`, 2 partitions, and the dead letters').
    fn fixture() -> Result<Fixture> {
        let cluster = MockCluster::new(1)?;
        cluster.create_topic("out", 2, 1)?;
        cluster.create_topic(neruba_schemas::topics::DEAD_LETTER, 1, 1)?;
        let bootstrap = cluster.bootstrap_servers();
        let producer = neruba_kafka::clients::recoverable_output_producer(&bootstrap, "t", 0, &[])?;
        let config = Config::new(bootstrap, "g", "in", "unused");
        let kill = Arc::new(AtomicBool::new(false));
        let outbox = Outbox::start(
            "test",
            Values,
            producer.clone(),
            &config,
            "out".into(),
            2,
            kill.clone(),
        )?;
        Ok(Fixture {
            cluster,
            outbox,
            kill,
            producer,
        })
    }

    /// How many records the partition the values go to holds.
    fn values_on_the_topic(f: &Fixture) -> Result<i64> {
        f.producer.get().flush(Duration::from_secs(10))?;
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", f.cluster.bootstrap_servers())
            .create()?;
        let partition = neruba_schemas::topics::stable_partition("k", 2);
        let (low, high) = consumer.fetch_watermarks("out", partition, Duration::from_secs(10))?;
        Ok(high - low)
    }

    #[test]
    fn outputs_handed_in_parts_are_enqueued_in_order_and_given_back_with_their_acknowledgements()
    -> Result<()> {
        let mut f = fixture()?;
        assert!(matches!(f.outbox.finish()?, Finished::Nothing));

        let letter = DeadLetter {
            key: None,
            payload: b"bad".to_vec(),
            code: "bad_input",
            message: "refused".into(),
            offset: 7,
        };
        f.outbox.hand(vec![Out::Value("a"), Out::Value("b")])?;
        f.outbox.hand(vec![Out::Refused(letter), Out::Value("c")])?;
        let Finished::Sent {
            producer,
            outputs,
            pending,
        } = f.outbox.finish()?
        else {
            panic!("the round was not sent whole");
        };
        // The producer the round went out with, which a retry compares before replacing it.
        assert_eq!(
            producer.client().native_ptr(),
            f.producer.get().client().native_ptr()
        );
        let handed: Vec<&str> = outputs
            .iter()
            .map(|o| match o {
                Out::Value(value) => value,
                Out::Refused(letter) => letter.code,
            })
            .collect();
        assert_eq!(handed, ["a", "b", "bad_input", "c"]);
        let landed = futures::executor::block_on(neruba_kafka::await_each(pending));
        let acknowledged: Vec<(i32, i64)> = landed
            .into_iter()
            .map(|l| l.map(|landed| (landed.partition, landed.offset)))
            .collect::<std::result::Result<_, _>>()?;
        let value_partition = neruba_schemas::topics::stable_partition("k", 2);
        assert_eq!(
            acknowledged,
            [
                (value_partition, 0),
                (value_partition, 1),
                (0, 0),
                (value_partition, 2)
            ],
            "each value in the order handed, the dead letter on its own topic"
        );
        Ok(())
    }

    #[test]
    fn a_round_cut_by_a_kill_or_a_close_is_given_back_as_cut_and_nothing_more_is_enqueued()
    -> Result<()> {
        for stop in ["kill", "close"] {
            let mut f = fixture()?;
            f.outbox.hand(vec![Out::Value("a")])?;
            // The first part may be enqueued or not: the round is cut either way.
            match stop {
                "kill" => f.kill.store(true, Ordering::SeqCst),
                _ => f.outbox.close(),
            }
            f.outbox.hand(vec![Out::Value("b"), Out::Value("c")])?;
            assert!(matches!(f.outbox.finish()?, Finished::Cut), "{stop}");
            // Nor is anything of a later round.
            f.outbox.hand(vec![Out::Value("d")])?;
            assert!(matches!(f.outbox.finish()?, Finished::Cut), "{stop}");
            let on_the_topic = values_on_the_topic(&f)?;
            assert!(
                on_the_topic <= 1,
                "{stop}: {on_the_topic} values enqueued, \"a\" at most"
            );
        }
        Ok(())
    }
}
