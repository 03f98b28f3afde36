//! Exactly-once wiring for the decide stage: consume, transform and produce inside one
//! Kafka transaction per batch, with the input offsets committed in the same transaction
//! (KIP-447: the consumer group's metadata fences a zombie that lost its partitions).
//!
//! A batch's commands, its state changelog records and its offsets become visible together
//! or not at all. When a transaction must be aborted (a broker outage, a rebalance in the
//! middle of a batch), the stage's in-memory state for the batch is wrong: the runner drops
//! it, reads the committed changelog back, seeks to the committed offsets and goes again.
//! Only a fenced producer (another instance took over our transactional id) stops the run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message};
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use super::{
    client_config, collect, handle_rebalances, read_state, send, ConsumerCtx, DeliveryCtx, Pending,
    RunContext, RunSummary, RunnerError, Tally, Topics, Tracker,
};
use crate::metrics::StageLabel;
use crate::stage::{Emitter, Input, Source, Stage};

/// Runs `stage` until `ctx.shutdown` is set, one transaction per batch. Blocking.
pub fn run_transactional<S: Stage>(
    mut stage: S,
    ctx: RunContext,
    transactional_id: &str,
) -> Result<RunSummary, RunnerError> {
    let name = stage.name();
    let mut cc = client_config(&ctx.kafka);
    cc.set("group.id", &ctx.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        // Co-partitioned inputs: partition n of every input topic to the same member.
        .set("partition.assignment.strategy", "range");
    let consumer = super::subscribed(name, &ctx, cc, false)?;
    let mut pc = client_config(&ctx.kafka);
    pc.set("transactional.id", transactional_id);
    super::set_default(&mut pc, "linger.ms", "1");
    super::set_default(&mut pc, "transaction.timeout.ms", "60000");
    let producer: BaseProducer<DeliveryCtx> = pc.create_with_context(DeliveryCtx::default())?;
    let timeout = ctx.settings.shutdown_timeout.max(Duration::from_secs(10));
    // Retried: a broker that is not up yet is an outage, not a reason to exit.
    let mut backoff = ctx.settings.retry_backoff;
    loop {
        match producer.init_transactions(timeout) {
            Ok(()) => break,
            Err(e) if is_fatal(&e) => return Err(e.into()),
            Err(e) => {
                if ctx.shutdown.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok(RunSummary::default());
                }
                warn!(stage = name, error = %e, "cannot start transactions yet; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    if let Some(avro) = &ctx.avro {
        super::register_outputs(avro, &ctx, name, false);
    }
    info!(stage = name, group = %ctx.group_id, input = ?ctx.input_topics, transactional_id, "stage running (transactional)");
    let label = StageLabel {
        stage: name.to_string(),
    };
    let mut summary = RunSummary::default();
    let mut pending = Pending::default();
    let topics = Topics::new(&ctx);
    let mut emitter = Emitter::new();
    let mut backoff = ctx.settings.retry_backoff;
    let mut committed = 0u64;
    while !ctx.shutdown.load(std::sync::atomic::Ordering::Relaxed) {
        let started = Instant::now();
        let mut batch = Vec::new();
        let mut timeout_poll = ctx.settings.poll_timeout;
        while batch.len() < ctx.settings.batch_size {
            let polled = consumer.poll(timeout_poll);
            handle_rebalances(&consumer, &mut stage, &mut pending, &ctx);
            match polled {
                None => break,
                Some(Ok(m)) => {
                    batch.push(m.detach());
                    timeout_poll = Duration::ZERO;
                }
                Some(Err(e)) => {
                    warn!(stage = name, error = %e, "consumer error (will retry)");
                    break;
                }
            }
        }
        stage.on_time(ctx.clock.now(), &mut emitter);
        if batch.is_empty() && emitter.is_empty() {
            continue;
        }
        let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for m in &batch {
            if let (Some(avro), Some(p)) = (&ctx.avro, m.payload()) {
                super::ensure_schema(avro, &ctx, name, p);
            }
            let headers: Vec<(&str, &[u8])> = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|Header { key, value }| (key, value.unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default();
            stage.process(
                &Input {
                    key: m.key(),
                    payload: m.payload(),
                    headers,
                    source: Source {
                        topic: m.topic().to_string(),
                        partition: m.partition(),
                        offset: m.offset(),
                    },
                },
                &mut emitter,
            );
            next.insert((m.topic().to_string(), m.partition()), m.offset() + 1);
        }
        stage.flush(&mut emitter);
        let mut tally = Tally::default();
        let mut records = Vec::new();
        collect(name, &topics, &mut emitter, &mut tally, &mut records)?;
        let tracker = Arc::new(Tracker {
            remaining: AtomicUsize::new(records.len()),
        });
        let result = (|| -> Result<(), Step> {
            producer.begin_transaction()?;
            for r in &records {
                send(&producer, r, &tracker);
            }
            if ctx.crash_before_commit == Some(committed) {
                // The batch's outputs reach the broker inside the open transaction, and
                // nothing commits it: what a kill -9 here would leave behind.
                let _ = producer.flush(timeout);
                return Err(Step::Crash);
            }
            if !next.is_empty() {
                let mut tpl = TopicPartitionList::new();
                for ((topic, partition), offset) in &next {
                    tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
                }
                let metadata = consumer.group_metadata().ok_or(Step::NoGroupMetadata)?;
                producer.send_offsets_to_transaction(&tpl, &metadata, timeout)?;
            }
            // commit_transaction flushes first, but rust-rdkafka's flush polls in 100 ms
            // naps: settled here, the commit finds nothing outstanding and a window's
            // commands reach readers ~100 ms sooner.
            super::settle(&producer, timeout);
            producer.commit_transaction(timeout)?;
            Ok(())
        })();
        // Delivery failures inside a transaction surface as its failure: nothing to re-send.
        if let Ok(mut f) = producer.context().failed.lock() {
            f.clear();
        }
        match result {
            Ok(()) => {
                committed += 1;
                debug!(
                    stage = name,
                    consumed = batch.len(),
                    produced = records.len(),
                    "transaction committed"
                );
                backoff = ctx.settings.retry_backoff;
                let consumed = batch.len() as u64;
                let (outputs, reasons) = (&tally.outputs, &tally.reasons);
                summary.consumed += consumed;
                summary.emitted += outputs.values().sum::<u64>();
                summary.dead_lettered += reasons.values().sum::<u64>();
                ctx.metrics.record_batch(name, consumed, outputs, reasons);
                ctx.metrics.record_events(name, &tally.events);
                let now_ms = ctx.clock.now().timestamp_millis();
                let latency = ctx.metrics.record_latency_seconds.get_or_create(&label);
                for m in &batch {
                    if let Some(ts) = m.timestamp().to_millis() {
                        #[allow(clippy::cast_precision_loss)]
                        latency.observe((now_ms - ts).max(0) as f64 / 1000.0);
                    }
                }
                ctx.metrics
                    .batch_seconds
                    .get_or_create(&label)
                    .observe(started.elapsed().as_secs_f64());
            }
            Err(Step::Crash) => return Err(RunnerError::InjectedCrash(committed)),
            Err(Step::Kafka(e)) if is_fatal(&e) => {
                warn!(stage = name, error = %e, "transactions fenced or fatal; stopping");
                return Err(e.into());
            }
            Err(e) => {
                warn!(stage = name, error = %e, retry_in = ?backoff, "transaction aborted; rewinding to the last commit");
                ctx.metrics.retries.get_or_create(&label).inc();
                if let Err(e) = producer.abort_transaction(timeout) {
                    if is_fatal(&e) {
                        return Err(e.into());
                    }
                    warn!(stage = name, error = %e, "abort failed");
                }
                emitter.drain();
                emitter.take_events();
                rewind(&consumer, &mut stage, &ctx, timeout);
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    consumer.unsubscribe();
    info!(
        stage = name,
        consumed = summary.consumed,
        emitted = summary.emitted,
        "stage stopped"
    );
    Ok(summary)
}

/// Why a batch's transaction did not commit.
#[derive(Debug, thiserror::Error)]
enum Step {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("the consumer has no group metadata yet")]
    NoGroupMetadata,
    #[error("injected crash")]
    Crash,
}

fn is_fatal(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(t) if t.is_fatal())
}

/// After an abort: forget the batch's effect on the stage (drop its state, read the
/// committed changelog back) and seek every assigned partition to its committed offset.
fn rewind<S: Stage>(
    consumer: &BaseConsumer<ConsumerCtx>,
    stage: &mut S,
    ctx: &RunContext,
    timeout: Duration,
) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    let partitions: BTreeSet<i32> = assignment
        .elements()
        .iter()
        .map(|e| e.partition())
        .collect();
    for p in &partitions {
        stage.revoked(*p);
    }
    if let Some(topic) = &ctx.state_topic {
        for p in &partitions {
            let records = read_state(ctx, topic, *p);
            stage.restore_state(*p, &records);
        }
    }
    for p in &partitions {
        stage.assigned(*p, None);
    }
    let committed = match consumer.committed_offsets(assignment.clone(), timeout) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "committed offsets unreadable after an abort");
            return;
        }
    };
    for e in committed.elements() {
        let offset = match e.offset() {
            Offset::Offset(o) => Offset::Offset(o),
            _ => Offset::Beginning,
        };
        if let Err(err) = consumer.seek(e.topic(), e.partition(), offset, timeout) {
            warn!(topic = e.topic(), partition = e.partition(), error = %err, "seek after abort failed");
        }
    }
}
