//! The one place that wires a stage to Kafka.
//!
//! At-least-once, pipelined: records are processed and their outputs produced as they
//! arrive; a partition's offset is stored for commit only once every output of every record
//! before it has been acknowledged by the broker (failures are re-sent with back-off). Waiting
//! for a flush per batch instead cost ~100 ms a batch and capped the stage at ~18k records/s. A crash at any point re-reads uncommitted input; output keys are
//! deterministic, so a re-read overwrites rather than duplicates downstream state.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use crate::clock::Clock;
use crate::codec::registry::{Registry, RegistryError};
use crate::codec::{confluent_schema_id, SchemaCache};
use crate::config::RunnerConfig;
use crate::metrics::{Metrics, PartitionLabel, StageLabel};
use crate::stage::{Checkpoint, DeadLetter, Emitter, Input, Output, Restore, Source, Stage};

mod transactional;
pub use transactional::run_transactional;

/// Why a runner stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// A Kafka client could not be created or subscribed (bad config, not an outage).
    #[error("kafka client: {0}")]
    Client(#[from] KafkaError),
    /// A stage has an output that no topic was given for.
    #[error("stage output {0:?} has no topic")]
    UnknownOutput(String),
    /// A crash injected by `crash_before_commit`.
    #[error("crashed on purpose before committing transaction {0}")]
    InjectedCrash(u64),
    /// Shutdown gave up waiting for the broker; uncommitted input will be read again.
    #[error("shutdown timed out after {0:?} waiting for the broker to acknowledge outputs")]
    ShutdownTimeout(Duration),
}

/// An output schema the runner registers so the stage can encode Avro.
#[derive(Debug, Clone)]
pub struct OutputSchema {
    /// The key the codec looks the id up by (e.g. `telemetry.clean`).
    pub key: &'static str,
    /// The registry subject (e.g. `telemetry.clean-value`, prefix included).
    pub subject: String,
    /// The Avro schema text.
    pub schema: &'static str,
}

/// Registry access for stages that read or write Avro.
#[derive(Debug, Clone)]
pub struct AvroSupport {
    /// The registry.
    pub registry: Registry,
    /// The cache the stage's codec reads.
    pub cache: SchemaCache,
    /// Schemas to register for the stage's outputs.
    pub outputs: Vec<OutputSchema>,
    /// Runtime to run registry calls on.
    pub handle: tokio::runtime::Handle,
}

/// Everything a runner needs besides the stage.
#[derive(Clone)]
pub struct RunContext {
    /// librdkafka properties for every client.
    pub kafka: BTreeMap<String, String>,
    /// Consumer group.
    pub group_id: String,
    /// Topics the stage reads (several only when co-partitioned: same partition count and
    /// keys, so partition n of each lands on the same consumer).
    pub input_topics: Vec<String>,
    /// Topic for each of the stage's named outputs.
    pub outputs: HashMap<&'static str, String>,
    /// Dead-letter topic.
    pub dead_letter_topic: String,
    /// Loop settings.
    pub settings: RunnerConfig,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The clock handed to the stage.
    pub clock: Arc<dyn Clock>,
    /// Set to stop: the runner finishes its batch, commits and returns.
    pub shutdown: Arc<AtomicBool>,
    /// Registry access, if Avro is in play.
    pub avro: Option<AvroSupport>,
    /// The stage's state topic (compacted, partitioned like the input), read back into the
    /// stage for each partition it is assigned.
    pub state_topic: Option<String>,
    /// Fault injection for tests of the transactional runner: after this many committed
    /// transactions, the next one is produced (and flushed) but never committed, and the
    /// runner returns at once, as if the process had been killed there.
    pub crash_before_commit: Option<u64>,
}

impl std::fmt::Debug for RunContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunContext")
            .field("group_id", &self.group_id)
            .field("input_topics", &self.input_topics)
            .finish()
    }
}

/// What a finished run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunSummary {
    /// Records consumed and acknowledged.
    pub consumed: u64,
    /// Outputs acknowledged.
    pub emitted: u64,
    /// Dead letters acknowledged.
    pub dead_lettered: u64,
}

/// A client config with the passthrough properties applied.
pub fn client_config(kafka: &BTreeMap<String, String>) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in kafka {
        c.set(k, v);
    }
    c
}

/// Sets `key` unless the user's `[kafka]` properties already did.
pub fn set_default(c: &mut ClientConfig, key: &str, value: &str) {
    if c.get(key).is_none() {
        c.set(key, value);
    }
}

struct ConsumerCtx {
    stage: &'static str,
    metrics: Arc<Metrics>,
    /// Partitions assigned or revoked since the loop last looked, for the stage to hear of
    /// before it sees any record of theirs.
    rebalances: Mutex<Vec<PartitionEvent>>,
    /// Commit the stored offsets when partitions are revoked (at-least-once). Never under
    /// transactions: offsets commit only inside a committed transaction, or the next owner
    /// would skip what an aborted one consumed.
    commit_on_revoke: bool,
}

/// A partition given to, or taken from, this consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PartitionEvent {
    Assigned(String, i32),
    Revoked(String, i32),
}

impl ConsumerCtx {
    /// Counts `change` partitions more (or fewer) held by this consumer.
    fn held(&self, change: i64) {
        self.metrics
            .stage(self.stage)
            .partitions
            .fetch_add(change, Ordering::Relaxed);
        self.metrics
            .partitions
            .get_or_create(&StageLabel {
                stage: self.stage.to_string(),
            })
            .inc_by(change);
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl ClientContext for ConsumerCtx {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                // -1 is librdkafka's internal unassigned partition; lag -1 means unknown.
                if *partition >= 0 && p.consumer_lag >= 0 {
                    self.metrics
                        .consumer_lag
                        .get_or_create(&PartitionLabel {
                            stage: self.stage.to_string(),
                            topic: topic.clone(),
                            partition: partition.to_string(),
                        })
                        .set(p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for ConsumerCtx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            if let Ok(mut q) = self.rebalances.lock() {
                q.extend(
                    partitions_of(tpl)
                        .into_iter()
                        .map(|(t, p)| PartitionEvent::Revoked(t, p)),
                );
            }
            // Offsets stored so far belong to acknowledged batches: commit them before the
            // partitions move, so the next owner starts where this one stopped.
            if self.commit_on_revoke {
                match consumer.commit_consumer_state(CommitMode::Sync) {
                    Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
                    Err(e) => warn!(stage = self.stage, error = %e, "commit on revoke failed"),
                }
            }
            self.held(-i64::try_from(tpl.count()).unwrap_or(0));
            info!(
                stage = self.stage,
                partitions = tpl.count(),
                "partitions revoked"
            );
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            if let Ok(mut q) = self.rebalances.lock() {
                q.extend(
                    partitions_of(tpl)
                        .into_iter()
                        .map(|(t, p)| PartitionEvent::Assigned(t, p)),
                );
            }
            self.held(i64::try_from(tpl.count()).unwrap_or(0));
            info!(
                stage = self.stage,
                partitions = tpl.count(),
                "partitions assigned"
            );
        }
    }
}

/// The outputs of one input record still waiting for the broker, and what they were, so the
/// metrics count a record only once all of its outputs are acknowledged.
#[derive(Debug, Default)]
struct Tracker {
    remaining: AtomicUsize,
    outputs: BTreeMap<&'static str, u64>,
    reasons: BTreeMap<&'static str, u64>,
    kafka_ts_ms: Option<i64>,
}

/// A failed delivery, owned so it can be re-sent.
struct Failed {
    record: Outgoing,
    tracker: Arc<Tracker>,
    error: String,
}

#[derive(Default)]
struct DeliveryCtx {
    failed: Mutex<Vec<Failed>>,
}

impl ClientContext for DeliveryCtx {}

impl ProducerContext for DeliveryCtx {
    type DeliveryOpaque = Arc<Tracker>;

    fn delivery(&self, result: &DeliveryResult<'_>, tracker: Arc<Tracker>) {
        match result {
            Ok(_) => {
                tracker.remaining.fetch_sub(1, Ordering::AcqRel);
            }
            Err((e, msg)) => {
                let headers = msg
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
                let record = Outgoing {
                    topic: msg.topic().to_string(),
                    key: msg.key().map(<[u8]>::to_vec),
                    payload: msg.payload().map(<[u8]>::to_vec),
                    headers,
                };
                if let Ok(mut f) = self.failed.lock() {
                    f.push(Failed {
                        record,
                        tracker,
                        error: e.to_string(),
                    });
                }
            }
        }
    }
}

/// One record to produce, owned so it can be re-sent.
struct Outgoing {
    topic: String,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
}

/// The headers of a dead letter from `stage`: the record's own, then the stage, the reason,
/// its detail and where the record came from.
pub(crate) fn dead_letter_headers(stage: &str, dl: &DeadLetter) -> Vec<(String, Vec<u8>)> {
    let mut headers = dl.headers.clone();
    headers.push(("ebb.stage".into(), stage.as_bytes().to_vec()));
    headers.push(("ebb.reason".into(), dl.reason.as_bytes().to_vec()));
    headers.push(("ebb.detail".into(), dl.detail.as_bytes().to_vec()));
    headers.push(("ebb.source".into(), dl.source.to_string().into_bytes()));
    headers
}

fn dead_letter_record(stage: &str, topic: &str, dl: DeadLetter) -> Outgoing {
    Outgoing {
        topic: topic.to_string(),
        headers: dead_letter_headers(stage, &dl),
        key: dl.key,
        payload: dl.payload,
    }
}

/// Kafka headers of `(key, value)` pairs, in order.
pub(crate) fn owned_headers(headers: &[(String, Vec<u8>)]) -> OwnedHeaders {
    headers.iter().fold(
        OwnedHeaders::new_with_capacity(headers.len()),
        |hs, (k, v)| {
            hs.insert(Header {
                key: k,
                value: Some(v),
            })
        },
    )
}

/// Enqueues one record, waiting (and serving delivery reports) while librdkafka's queue is full.
fn send(producer: &BaseProducer<DeliveryCtx>, r: &Outgoing, tracker: &Arc<Tracker>) {
    let mut rec: BaseRecord<'_, [u8], [u8], Arc<Tracker>> =
        BaseRecord::with_opaque_to(&r.topic, tracker.clone()).headers(owned_headers(&r.headers));
    if let Some(k) = &r.key {
        rec = rec.key(k.as_slice());
    }
    if let Some(p) = &r.payload {
        rec = rec.payload(p.as_slice());
    }
    loop {
        match producer.send(rec) {
            Ok(()) => return,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                rec = back;
                producer.poll(Duration::from_millis(10));
            }
            Err((e, back)) => {
                // Not queueable now (e.g. unknown topic): treat it as a failed delivery, so it
                // is re-sent with back-off like any other.
                let record = Outgoing {
                    topic: r.topic.clone(),
                    key: r.key.clone(),
                    payload: r.payload.clone(),
                    headers: r.headers.clone(),
                };
                if let Ok(mut f) = producer.context().failed.lock() {
                    f.push(Failed {
                        record,
                        tracker: back.delivery_opaque,
                        error: e.to_string(),
                    });
                }
                return;
            }
        }
    }
}

/// One consumed record waiting for its outputs, and the stage's checkpoint after it.
type Entry = (i64, Arc<Tracker>, Option<Checkpoint>);

/// Records of one partition waiting for their outputs, in consumption order.
type Waiting = VecDeque<Entry>;

/// The commit position of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Position {
    topic: String,
    partition: i32,
    /// Next offset to consume, as far as acknowledged outputs go.
    next: i64,
    /// The stage's checkpoint at `next`, if it keeps state.
    checkpoint: Option<Checkpoint>,
}

impl Position {
    /// The offset to commit (a stateful stage may need older records again) and the
    /// metadata that tells the next owner what was already done.
    fn commit(&self) -> (i64, Option<String>) {
        match self.checkpoint {
            None => (self.next, None),
            Some(c) => {
                let processed = c.processed_until.map_or(self.next, |p| p.max(self.next));
                let offset = c.replay_from.map_or(self.next, |r| r.min(self.next));
                (
                    offset,
                    Some(Restore::to_metadata(processed, c.watermark_ms)),
                )
            }
        }
    }
}

/// What one `advance` released.
#[derive(Default)]
struct Advanced {
    /// The new position of each partition that moved.
    offsets: Vec<Position>,
    /// Trackers of the records now fully acknowledged.
    done: Vec<Arc<Tracker>>,
}

/// Offsets consumed but not yet safe to commit, per partition, in consumption order.
#[derive(Default)]
struct Pending {
    partitions: HashMap<(String, i32), Waiting>,
    count: usize,
}

impl Pending {
    fn push(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        tracker: Arc<Tracker>,
        checkpoint: Option<Checkpoint>,
    ) {
        self.partitions
            .entry((topic.to_string(), partition))
            .or_default()
            .push_back((offset, tracker, checkpoint));
        self.count += 1;
    }

    /// Forgets a revoked partition: its records are the new owner's to re-read.
    fn drop_partition(&mut self, topic: &str, partition: i32) {
        if let Some(q) = self.partitions.remove(&(topic.to_string(), partition)) {
            self.count -= q.len();
        }
    }

    /// Pops every fully delivered prefix: the next offset to commit per partition, and the
    /// trackers of the records now done.
    fn advance(&mut self) -> Advanced {
        let mut out = Advanced::default();
        for ((topic, partition), queue) in &mut self.partitions {
            let mut next = None;
            while queue
                .front()
                .is_some_and(|(_, t, _)| t.remaining.load(Ordering::Acquire) == 0)
            {
                if let Some((offset, t, checkpoint)) = queue.pop_front() {
                    next = Some((offset + 1, checkpoint));
                    out.done.push(t);
                }
            }
            if let Some((next, checkpoint)) = next {
                out.offsets.push(Position {
                    topic: topic.clone(),
                    partition: *partition,
                    next,
                    checkpoint,
                });
            }
        }
        self.count -= out.done.len();
        out
    }
}

/// Runs `stage` with [`run`] on a thread of its own, named after the stage.
pub fn spawn<S: Stage + Send + 'static>(
    stage: S,
    ctx: RunContext,
) -> std::io::Result<std::thread::JoinHandle<Result<RunSummary, RunnerError>>> {
    std::thread::Builder::new()
        .name(stage.name().into())
        .spawn(move || run(stage, ctx))
}

/// Runs `stage` with [`run_transactional`] on a thread of its own, named after the stage.
pub fn spawn_transactional<S: Stage + Send + 'static>(
    stage: S,
    ctx: RunContext,
    transactional_id: String,
) -> std::io::Result<std::thread::JoinHandle<Result<RunSummary, RunnerError>>> {
    std::thread::Builder::new()
        .name(stage.name().into())
        .spawn(move || run_transactional(stage, ctx, &transactional_id))
}

/// Waits, polling every millisecond, until every record `producer` sent is acknowledged or
/// `timeout` passes. rust-rdkafka's `flush` (also inside `commit_transaction`) naps 100 ms
/// between polls, which adds that much to whatever waits on it.
pub fn settle<C: ProducerContext>(producer: &BaseProducer<C>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while producer.in_flight_count() > 0 && Instant::now() < deadline {
        producer.poll(Duration::from_millis(1));
    }
}

/// The stage's consumer: `cc` with the shared defaults, subscribed to the input topics.
/// `commit_on_revoke` only for at-least-once (see [`ConsumerCtx`]).
fn subscribed(
    name: &'static str,
    ctx: &RunContext,
    mut cc: ClientConfig,
    commit_on_revoke: bool,
) -> Result<BaseConsumer<ConsumerCtx>, RunnerError> {
    set_default(&mut cc, "auto.offset.reset", "earliest");
    set_default(&mut cc, "statistics.interval.ms", "5000");
    if let Some(wait) = ctx.settings.fetch_wait {
        set_default(&mut cc, "fetch.wait.max.ms", &wait.as_millis().to_string());
    }
    let consumer: BaseConsumer<ConsumerCtx> = cc.create_with_context(ConsumerCtx {
        stage: name,
        metrics: ctx.metrics.clone(),
        rebalances: Mutex::new(Vec::new()),
        commit_on_revoke,
    })?;
    let topics: Vec<&str> = ctx.input_topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(consumer)
}

/// Runs `stage` until `ctx.shutdown` is set. Blocking: call it on its own thread.
///
/// Pipelined at-least-once: outputs are produced as records are processed, delivery reports
/// are served from this loop, and a partition's offset advances only over a prefix of records
/// whose every output the broker has acknowledged. Failed deliveries are re-sent with
/// back-off, never dropped. At most `runner.max_in_flight` records wait at once.
pub fn run<S: Stage>(mut stage: S, ctx: RunContext) -> Result<RunSummary, RunnerError> {
    let name = stage.name();
    let mut cc = client_config(&ctx.kafka);
    cc.set("group.id", &ctx.group_id)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false");
    let consumer = subscribed(name, &ctx, cc, true)?;
    let mut pc = client_config(&ctx.kafka);
    set_default(&mut pc, "enable.idempotence", "true");
    set_default(&mut pc, "linger.ms", "5");
    set_default(&mut pc, "compression.type", "lz4");
    // Dead letters carry whatever arrived, up to the raw topic's own limit.
    set_default(&mut pc, "message.max.bytes", "10485760");
    let producer: BaseProducer<DeliveryCtx> = pc.create_with_context(DeliveryCtx::default())?;
    if let Some(avro) = &ctx.avro {
        register_outputs(avro, &ctx, name, false);
    }
    info!(stage = name, group = %ctx.group_id, input = ?ctx.input_topics, "stage running");

    let label = StageLabel {
        stage: name.to_string(),
    };
    let mut loop_state = Loop {
        summary: RunSummary::default(),
        pending: Pending::default(),
        backoff: ctx.settings.retry_backoff,
    };
    let mut emitter = Emitter::new();
    while !ctx.shutdown.load(Ordering::Relaxed) {
        // Outputs a stage emits on time alone (window close, model schedule) belong to no
        // input record: their tracker holds no offset back.
        stage.on_time(ctx.clock.now(), &mut emitter);
        if !emitter.is_empty() {
            let (tracker, records) = collect(name, &ctx, &mut emitter, None)?;
            for r in &records {
                send(&producer, r, &tracker);
            }
        }
        let started = Instant::now();
        let mut consumed = 0usize;
        // Waiting for input while deliveries are outstanding would hold their offsets back.
        let mut timeout = if loop_state.pending.count > 0 {
            Duration::from_millis(5)
        } else {
            ctx.settings.poll_timeout
        };
        while consumed < ctx.settings.batch_size
            && loop_state.pending.count < ctx.settings.max_in_flight
        {
            let polled = consumer.poll(timeout);
            // A rebalance happens inside poll: tell the stage before it sees a record of a
            // partition it was just given.
            handle_rebalances(&consumer, &mut stage, &mut loop_state.pending, &ctx);
            let Some(polled) = polled else {
                break;
            };
            timeout = Duration::ZERO;
            let msg = match polled {
                Ok(m) => m,
                Err(e) => {
                    // Broker outages surface here; librdkafka reconnects by itself.
                    warn!(stage = name, error = %e, "consumer error (will retry)");
                    break;
                }
            };
            let payload = msg.payload();
            if let (Some(avro), Some(p)) = (&ctx.avro, payload) {
                ensure_schema(avro, &ctx, name, p);
            }
            let headers: Vec<(&str, &[u8])> = msg
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|Header { key, value }| (key, value.unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default();
            let input = Input {
                key: msg.key(),
                payload,
                headers,
                source: Source {
                    topic: msg.topic().to_string(),
                    partition: msg.partition(),
                    offset: msg.offset(),
                },
            };
            stage.process(&input, &mut emitter);
            let (tracker, records) =
                collect(name, &ctx, &mut emitter, msg.timestamp().to_millis())?;
            for r in &records {
                send(&producer, r, &tracker);
            }
            let checkpoint = stage.checkpoint(msg.partition());
            loop_state.pending.push(
                msg.topic(),
                msg.partition(),
                msg.offset(),
                tracker,
                checkpoint,
            );
            consumed += 1;
        }
        stage.flush(&mut emitter);
        if !emitter.is_empty() {
            let (tracker, records) = collect(name, &ctx, &mut emitter, None)?;
            for r in &records {
                send(&producer, r, &tracker);
            }
        }
        producer.poll(Duration::ZERO);
        loop_state.settle(&consumer, &producer, &ctx, &label);
        if consumed > 0 {
            ctx.metrics
                .batch_seconds
                .get_or_create(&label)
                .observe(started.elapsed().as_secs_f64());
        }
        if loop_state.pending.count >= ctx.settings.max_in_flight {
            // Back-pressure: let the broker catch up before reading more.
            producer.poll(Duration::from_millis(10));
        }
    }
    // Shutdown: everything processed must be acknowledged and committed before we go.
    let since = Instant::now();
    while loop_state.pending.count > 0 {
        if since.elapsed() > ctx.settings.shutdown_timeout {
            commit(&consumer, name);
            return Err(RunnerError::ShutdownTimeout(ctx.settings.shutdown_timeout));
        }
        producer.poll(Duration::from_millis(50));
        loop_state.settle(&consumer, &producer, &ctx, &label);
    }
    // Outputs that hold no offset (on-time emissions) still deserve their ack before exit.
    if producer.flush(ctx.settings.shutdown_timeout).is_err() {
        warn!(
            stage = name,
            "some on-time outputs were not acknowledged before shutdown"
        );
    }
    commit(&consumer, name);
    consumer.unsubscribe();
    let s = &loop_state.summary;
    info!(
        stage = name,
        consumed = s.consumed,
        emitted = s.emitted,
        dead_lettered = s.dead_lettered,
        "stage stopped"
    );
    Ok(loop_state.summary)
}

/// Tells the stage of partitions assigned or revoked in the last poll. An assigned
/// partition's committed metadata is read back so a stateful stage knows what its previous
/// owner already emitted.
fn handle_rebalances<S: Stage>(
    consumer: &BaseConsumer<ConsumerCtx>,
    stage: &mut S,
    pending: &mut Pending,
    ctx: &RunContext,
) {
    let events: Vec<PartitionEvent> = consumer
        .context()
        .rebalances
        .lock()
        .map(|mut q| std::mem::take(&mut *q))
        .unwrap_or_default();
    if events.is_empty() {
        return;
    }
    let mut assigned = TopicPartitionList::new();
    for event in events {
        match event {
            PartitionEvent::Revoked(topic, partition) => {
                pending.drop_partition(&topic, partition);
                stage.revoked(partition);
            }
            PartitionEvent::Assigned(topic, partition) => {
                assigned.add_partition(&topic, partition);
            }
        }
    }
    if assigned.count() == 0 {
        return;
    }
    let committed = match consumer
        .committed_offsets(assigned.clone(), ctx.settings.shutdown_timeout)
    {
        Ok(c) => c,
        Err(e) => {
            // Without the metadata the stage starts empty: windows already emitted may be
            // emitted again (same ids), nothing is lost.
            warn!(stage = stage.name(), error = %e, "committed offsets unreadable; rebuilding state from scratch");
            assigned
        }
    };
    if let Some(topic) = &ctx.state_topic {
        // Co-partitioned inputs share one state partition: read it once.
        let partitions: std::collections::BTreeSet<i32> =
            committed.elements().iter().map(|e| e.partition()).collect();
        for partition in partitions {
            let records = read_state(ctx, topic, partition);
            info!(
                stage = stage.name(),
                partition,
                records = records.len(),
                "state read back"
            );
            stage.restore_state(partition, &records);
        }
    }
    for e in committed.elements() {
        let restore = Restore::from_metadata(e.metadata());
        debug!(
            stage = stage.name(),
            partition = e.partition(),
            ?restore,
            "partition assigned"
        );
        stage.assigned(e.partition(), restore);
    }
}

/// Reads one partition of a state topic from its start to its current end, with a private
/// consumer that joins no group (live groups are not disturbed and nothing is committed).
/// A broker that cannot be reached gives what was read (possibly nothing), with a warning:
/// the stage then starts the models it found no state for afresh. That is a loss of
/// learned state, not of records, and it never blocks the partition.
fn read_state(ctx: &RunContext, topic: &str, partition: i32) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut config = client_config(&ctx.kafka);
    config.set("group.id", format!("{}.state-reader", ctx.group_id));
    config.set("enable.auto.commit", "false");
    config.set("enable.partition.eof", "true");
    // State written in transactions counts only once committed.
    config.set("isolation.level", "read_committed");
    let consumer: BaseConsumer = match config.create() {
        Ok(c) => c,
        Err(e) => {
            warn!(topic, partition, error = %e, "cannot create the state reader");
            return Vec::new();
        }
    };
    let timeout = ctx.settings.shutdown_timeout.max(Duration::from_secs(5));
    let (low, high) = match consumer.fetch_watermarks(topic, partition, timeout) {
        Ok(w) => w,
        Err(e) => {
            warn!(topic, partition, error = %e, "state topic unreadable; starting without it");
            return Vec::new();
        }
    };
    if high <= low {
        return Vec::new();
    }
    let mut tpl = TopicPartitionList::new();
    if tpl
        .add_partition_offset(topic, partition, Offset::Offset(low))
        .is_err()
        || consumer.assign(&tpl).is_err()
    {
        return Vec::new();
    }
    let deadline = Instant::now() + timeout * 6;
    let mut records = Vec::new();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if let (Some(k), Some(v)) = (m.key(), m.payload()) {
                    records.push((k.to_vec(), v.to_vec()));
                }
                if m.offset() + 1 >= high {
                    break;
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => debug!(topic, partition, error = %e, "state read"),
            None => {}
        }
    }
    records
}

fn commit(consumer: &BaseConsumer<ConsumerCtx>, stage: &str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => warn!(stage, error = %e, "commit failed; uncommitted input will be read again"),
    }
}

/// Turns what the stage emitted into records to produce and the tracker that follows them.
fn collect(
    stage: &'static str,
    ctx: &RunContext,
    emitter: &mut Emitter,
    kafka_ts_ms: Option<i64>,
) -> Result<(Arc<Tracker>, Vec<Outgoing>), RunnerError> {
    let (outputs, dead_letters) = emitter.drain();
    let mut tracker = Tracker {
        kafka_ts_ms,
        ..Tracker::default()
    };
    let mut records = Vec::with_capacity(outputs.len() + dead_letters.len());
    for Output {
        output,
        key,
        payload,
        headers,
    } in outputs
    {
        let topic = ctx
            .outputs
            .get(output)
            .ok_or_else(|| RunnerError::UnknownOutput(output.to_string()))?;
        *tracker.outputs.entry(output).or_default() += 1;
        records.push(Outgoing {
            topic: topic.clone(),
            key: Some(key),
            payload: Some(payload),
            headers,
        });
    }
    for dl in dead_letters {
        *tracker.reasons.entry(dl.reason).or_default() += 1;
        records.push(dead_letter_record(stage, &ctx.dead_letter_topic, dl));
    }
    tracker.remaining = AtomicUsize::new(records.len());
    Ok((Arc::new(tracker), records))
}

/// The loop's bookkeeping between polls.
struct Loop {
    summary: RunSummary,
    pending: Pending,
    backoff: Duration,
}

impl Loop {
    /// Re-sends failed deliveries (with back-off), then stores the offsets of every record
    /// whose outputs are all acknowledged and counts those records in the metrics.
    fn settle(
        &mut self,
        consumer: &BaseConsumer<ConsumerCtx>,
        producer: &BaseProducer<DeliveryCtx>,
        ctx: &RunContext,
        label: &StageLabel,
    ) {
        let failed: Vec<Failed> = producer
            .context()
            .failed
            .lock()
            .map(|mut f| std::mem::take(&mut *f))
            .unwrap_or_default();
        if let Some(first) = failed.first() {
            error!(stage = %label.stage, failed = failed.len(), first_error = %first.error, retry_in = ?self.backoff, "outputs not acknowledged; re-sending");
            ctx.metrics
                .retries
                .get_or_create(label)
                .inc_by(failed.len() as u64);
            std::thread::sleep(self.backoff);
            self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
            for f in &failed {
                send(producer, &f.record, &f.tracker);
            }
        } else {
            self.backoff = ctx.settings.retry_backoff;
        }
        let Advanced { offsets, done } = self.pending.advance();
        if !offsets.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for position in &offsets {
                let (offset, metadata) = position.commit();
                let mut elem = tpl.add_partition(&position.topic, position.partition);
                if let Err(e) = elem.set_offset(Offset::Offset(offset)) {
                    warn!(stage = %label.stage, error = %e, "cannot record offset");
                }
                if let Some(m) = metadata {
                    elem.set_metadata(m);
                }
            }
            // Fails only for partitions revoked meanwhile; the new owner reads those records
            // again, which at-least-once allows.
            if let Err(e) = consumer.store_offsets(&tpl) {
                debug!(stage = %label.stage, error = %e, "offsets not stored (partition revoked?)");
            }
        }
        if done.is_empty() {
            return;
        }
        let mut outputs: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut reasons: BTreeMap<&'static str, u64> = BTreeMap::new();
        let now_ms = ctx.clock.now().timestamp_millis();
        let latency = ctx.metrics.record_latency_seconds.get_or_create(label);
        for t in &done {
            for (k, n) in &t.outputs {
                *outputs.entry(k).or_default() += n;
            }
            for (k, n) in &t.reasons {
                *reasons.entry(k).or_default() += n;
            }
            if let Some(ts) = t.kafka_ts_ms {
                #[allow(clippy::cast_precision_loss)]
                latency.observe((now_ms - ts).max(0) as f64 / 1000.0);
            }
        }
        let consumed = done.len() as u64;
        self.summary.consumed += consumed;
        self.summary.emitted += outputs.values().sum::<u64>();
        self.summary.dead_lettered += reasons.values().sum::<u64>();
        ctx.metrics
            .record_batch(&label.stage, consumed, &outputs, &reasons);
    }
}

/// Makes sure the writer schema a payload names is in the cache (or known to be missing),
/// retrying while the registry is unreachable: an outage must not turn good records into
/// dead letters.
fn ensure_schema(avro: &AvroSupport, ctx: &RunContext, stage: &str, payload: &[u8]) {
    let Some(id) = confluent_schema_id(payload) else {
        return;
    };
    if avro.cache.knows(id) {
        return;
    }
    if avro
        .cache
        .output_id(avro.outputs.first().map_or("", |o| o.key))
        .is_none()
    {
        register_outputs(avro, ctx, stage, true);
    }
    let mut backoff = ctx.settings.retry_backoff;
    loop {
        match avro.handle.block_on(avro.registry.schema_by_id(id)) {
            Ok(text) => {
                if let Err(e) = avro.cache.insert(id, &text) {
                    warn!(stage, id, error = %e, "registry schema unusable; its records will be dead-lettered");
                    avro.cache.insert_missing(id);
                }
                return;
            }
            Err(RegistryError::NotFound(_)) => {
                avro.cache.insert_missing(id);
                return;
            }
            Err(e) if e.is_transient() && !ctx.shutdown.load(Ordering::Relaxed) => {
                warn!(stage, id, error = %e, retry_in = ?backoff, "schema registry unreachable");
                ctx.metrics
                    .retries
                    .get_or_create(&StageLabel {
                        stage: stage.to_string(),
                    })
                    .inc();
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Err(e) => {
                warn!(stage, id, error = %e, "schema lookup failed; its records will be dead-lettered");
                return;
            }
        }
    }
}

/// Registers the stage's output schemas. With `insist`, retries while the registry is
/// unreachable (an Avro record is waiting to be encoded); without, tries once.
fn register_outputs(avro: &AvroSupport, ctx: &RunContext, stage: &str, insist: bool) {
    for out in &avro.outputs {
        let mut backoff = ctx.settings.retry_backoff;
        loop {
            match avro
                .handle
                .block_on(avro.registry.register(&out.subject, out.schema))
            {
                Ok(id) => {
                    avro.cache.set_output_id(out.key, id);
                    info!(stage, subject = %out.subject, id, "output schema registered");
                    break;
                }
                Err(e) if insist && e.is_transient() && !ctx.shutdown.load(Ordering::Relaxed) => {
                    warn!(stage, subject = %out.subject, error = %e, retry_in = ?backoff, "schema registry unreachable");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                Err(e) => {
                    warn!(stage, subject = %out.subject, error = %e, "cannot register output schema yet");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(remaining: usize) -> Arc<Tracker> {
        Arc::new(Tracker {
            remaining: AtomicUsize::new(remaining),
            ..Tracker::default()
        })
    }

    #[test]
    fn offsets_advance_only_over_a_fully_acknowledged_prefix() {
        let mut p = Pending::default();
        let (a, b, c) = (tracker(1), tracker(2), tracker(0));
        p.push("raw", 0, 10, a.clone(), None);
        p.push("raw", 0, 11, b.clone(), None);
        p.push("raw", 0, 12, c, None);
        p.push("raw", 1, 5, tracker(0), None);
        let first = p.advance();
        let at = |partition: i32, next: i64| Position {
            topic: "raw".into(),
            partition,
            next,
            checkpoint: None,
        };
        assert_eq!(
            first.offsets,
            vec![at(1, 6)],
            "partition 0 waits for offset 10"
        );
        assert_eq!(p.count, 3);
        b.remaining.store(0, Ordering::Release);
        assert!(
            p.advance().offsets.is_empty(),
            "11 and 12 are done, but 10 is not"
        );
        a.remaining.store(0, Ordering::Release);
        let last = p.advance();
        assert_eq!(last.offsets, vec![at(0, 13)]);
        assert_eq!(last.done.len(), 3);
        assert_eq!(p.count, 0);
    }

    #[test]
    fn a_stateful_stage_commits_its_oldest_open_record_with_the_processed_position() {
        let checkpoint = Checkpoint {
            replay_from: Some(40),
            watermark_ms: 1_000,
            processed_until: None,
        };
        let position = Position {
            topic: "clean".into(),
            partition: 0,
            next: 57,
            checkpoint: Some(checkpoint),
        };
        let (offset, meta) = position.commit();
        assert_eq!(offset, 40);
        assert_eq!(
            meta.as_deref().and_then(Restore::from_metadata),
            Some(Restore {
                processed_until: 57,
                watermark_ms: 1_000
            })
        );
        // Still rebuilding after a restart: the previous owner's position is kept, not lowered.
        let rebuilding = Position {
            next: 45,
            checkpoint: Some(Checkpoint {
                processed_until: Some(57),
                ..checkpoint
            }),
            ..position
        };
        let (offset, meta) = rebuilding.commit();
        assert_eq!(offset, 40);
        assert_eq!(
            meta.as_deref()
                .and_then(Restore::from_metadata)
                .map(|r| r.processed_until),
            Some(57)
        );
    }
}
