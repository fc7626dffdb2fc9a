//! A worker's sending thread: the outputs of a batch are handed to it as they are made, and it
//! encodes and enqueues them in that order while the worker applies the next messages (on 2
//! cores, the balances stage's enqueueing was a sixth of its batches' time). At the batch's
//! end the worker takes back every output with its delivery future, awaits the
//! acknowledgements, and only then writes the batch; sending a batch again (a failed
//! delivery) happens on the worker's thread, from the outputs taken back.

use crate::{AsDeadLetter, Config, DeadLetter, Error, Result, Sender, Sink};
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

/// How long an output waits before it is offered again to a producer whose queue was full.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(1);

/// How long an output waits for a full producer queue while nothing leaves it.
const QUEUE_FULL_PATIENCE: Duration = Duration::from_secs(10);

/// Handed outputs the thread has not taken yet, at most (each a worker's [`crate::HAND_EVERY`]
/// messages' worth): past it, the worker waits for the thread.
const HANDED_BOUND: usize = 64;

/// Every output of a batch, in order, with what enqueueing each gave.
pub(crate) type Sent<O> = (Vec<O>, Vec<std::result::Result<DeliveryFuture, KafkaError>>);

/// What the worker tells its sending thread.
enum Command<O> {
    /// Enqueue these with this producer (the worker's current one).
    Send(FutureProducer, Vec<O>),
    /// Give back the batch's outputs and their futures.
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
    /// queue has no room for waits until acknowledgements free some, stopping or not (a
    /// batch's outputs are not bounded by its messages, so none may fail for it: a failed one
    /// sends the batch again, which would overflow the same way, and a stage stopping delivers
    /// and writes its batch). It fails only if the queue holds nothing to free (the output is
    /// larger than the queue's byte bound) or nothing left it for [`QUEUE_FULL_PATIENCE`] (the
    /// broker is away; the batch is then sent again after a backoff, as for any failure).
    pub(crate) fn send(
        &self,
        producer: &FutureProducer,
        outputs: &[O],
    ) -> Vec<std::result::Result<DeliveryFuture, KafkaError>> {
        outputs
            .iter()
            .map(|output| {
                let mut waiting: Option<(Instant, i32)> = None;
                loop {
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
    commands: SyncSender<Command<O>>,
    sent: Receiver<Sent<O>>,
    /// Whether anything was handed since the last [`Outbox::finish`].
    handed: bool,
}

impl<O: AsDeadLetter + Send + 'static, X: Sender<O>> Outbox<O, X> {
    /// Starts the sending thread of stage `name`'s worker. Once `kill` is set it enqueues
    /// nothing more, as a killed process would not.
    pub(crate) fn start(
        name: &str,
        sender: X,
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
        let (give_back, sent) = mpsc::sync_channel::<Sent<O>>(1);
        let thread_sending = sending.clone();
        std::thread::Builder::new()
            .name(format!("neruba-{name}-send"))
            .spawn(move || {
                let (mut outputs, mut pending) = (Vec::new(), Vec::new());
                // Ends when the worker is gone (its side of the channel dropped).
                for command in handed {
                    match command {
                        Command::Send(producer, batch) => {
                            if kill.load(Ordering::SeqCst) {
                                continue;
                            }
                            pending.extend(thread_sending.send(&producer, &batch));
                            outputs.extend(batch);
                        }
                        Command::Finish => {
                            let batch =
                                (std::mem::take(&mut outputs), std::mem::take(&mut pending));
                            if give_back.send(batch).is_err() {
                                return;
                            }
                        }
                    }
                }
            })
            .map_err(|e| Error::Bug(format!("the sending thread did not start: {e}")))?;
        Ok(Self {
            sending,
            commands,
            sent,
            handed: false,
        })
    }

    /// What enqueues outputs, to send a batch again.
    pub(crate) fn sending(&self) -> &Sending<O, X> {
        &self.sending
    }

    /// Hands `outputs` to the thread, which enqueues them with `producer` after those handed
    /// before.
    pub(crate) fn hand(&mut self, producer: FutureProducer, outputs: Vec<O>) -> Result<()> {
        self.commands
            .send(Command::Send(producer, outputs))
            .map_err(|_| Error::Bug("the sending thread ended".into()))?;
        self.handed = true;
        Ok(())
    }

    /// Every output handed since the last call, in order, each with what enqueueing it gave
    /// (once the thread has enqueued them all).
    pub(crate) fn finish(&mut self) -> Result<Sent<O>> {
        if !std::mem::take(&mut self.handed) {
            return Ok((Vec::new(), Vec::new()));
        }
        let ended = || Error::Bug("the sending thread ended".into());
        self.commands.send(Command::Finish).map_err(|_| ended())?;
        self.sent.recv().map_err(|_| ended())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;

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

    #[test]
    fn outputs_handed_in_parts_are_enqueued_in_order_and_given_back_with_their_acknowledgements()
    -> Result<()> {
        let cluster = MockCluster::new(1)?;
        cluster.create_topic("out", 2, 1)?;
        cluster.create_topic(neruba_schemas::topics::DEAD_LETTER, 1, 1)?;
        let bootstrap = cluster.bootstrap_servers();
        let producer = neruba_kafka::clients::recoverable_output_producer(&bootstrap, "t", 0, &[])?;
        let dir = tempfile::tempdir().map_err(|e| Error::Bug(e.to_string()))?;
        let config = Config::new(bootstrap, "g", "in", dir.path());
        let kill = Arc::new(AtomicBool::new(false));
        let mut outbox = Outbox::start("test", Values, &config, "out".into(), 2, kill.clone())?;
        let (outputs, sent) = outbox.finish()?;
        assert!(outputs.is_empty() && sent.is_empty(), "nothing handed");

        let letter = DeadLetter {
            key: None,
            payload: b"bad".to_vec(),
            code: "bad_input",
            message: "refused".into(),
            offset: 7,
        };
        outbox.hand(producer.get(), vec![Out::Value("a"), Out::Value("b")])?;
        outbox.hand(producer.get(), vec![Out::Refused(letter), Out::Value("c")])?;
        let (outputs, sent) = outbox.finish()?;
        let handed: Vec<&str> = outputs
            .iter()
            .map(|o| match o {
                Out::Value(value) => value,
                Out::Refused(letter) => letter.code,
            })
            .collect();
        assert_eq!(handed, ["a", "b", "bad_input", "c"]);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Bug(e.to_string()))?;
        let mut acknowledged = Vec::new();
        for pending in sent {
            let delivered = runtime
                .block_on(pending?)
                .map_err(|_| KafkaError::Canceled)?;
            let delivery = delivered.map_err(|(e, _)| e)?;
            acknowledged.push((delivery.partition, delivery.offset));
        }
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

        // A killed worker's thread enqueues nothing more.
        kill.store(true, Ordering::SeqCst);
        outbox.hand(producer.get(), vec![Out::Value("d")])?;
        let (outputs, sent) = outbox.finish()?;
        assert!(
            outputs.is_empty() && sent.is_empty(),
            "nothing enqueued once killed"
        );
        Ok(())
    }
}
