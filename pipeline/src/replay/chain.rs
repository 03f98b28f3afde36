//! The whole pipeline in one thread on a simulated clock: filter, window, models and decide,
//! the very stage values `ebb run` wires to Kafka, with each stage's outputs handed straight
//! to the next instead of through topics.
//!
//! Time is the input's own: before a record is processed every stage hears `on_time` at the
//! record's timestamp (the time Kafka stamped it, i.e. when the live pipeline saw it), so the
//! idle-partition rule and the filter's clock checks judge the record as the live run did.
//! A record keeps its input partition through every stage, as a service's records keep
//! theirs when every topic has the same partition count and the same key. Nothing here reads
//! the wall clock or draws a random number: the same records and config give the same
//! outputs, in the same order.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, TimeZone, Utc};

use crate::codec::{AvroCodec, Format, SchemaCache};
use crate::config::Config;
use crate::record::CleanSample;
use crate::stage::{DeadLetter, Emitter, Input, Output, Source, Stage};
use crate::stages::decide::{DecideInputs, DecideStage, COMMANDS};
use crate::stages::filter::{FilterStage, CLEAN};
use crate::stages::models::{ModelsStage, ANOMALIES, FORECASTS};
use crate::stages::window::aggregate::AggregateError;
use crate::stages::window::{WindowStage, AGGREGATES, LATE};

/// One recorded input record: a raw telemetry record as it sat on its topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// The Kafka key.
    pub key: Option<Vec<u8>>,
    /// The value; `None` for a tombstone.
    pub payload: Option<Vec<u8>>,
    /// Headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Partition it was read from.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Kafka's timestamp, epoch ms; `None` when the record has none.
    pub timestamp_ms: Option<i64>,
}

/// Where the chain's outputs go: files, prefixed topics, or a test's vectors.
pub trait Sink {
    /// A stage emitted `output` to the topic of `role` (`clean`, `aggregates`, `late`,
    /// `anomalies`, `forecasts`, `commands`).
    fn output(&mut self, role: &'static str, output: &Output);
    /// A stage rejected a record.
    fn dead_letter(&mut self, stage: &'static str, dead: &DeadLetter);
}

/// What went through the chain.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ChainCounts {
    /// Raw records read.
    pub records: u64,
    /// Outputs by topic role.
    pub outputs: BTreeMap<String, u64>,
    /// Dead letters by stage and reason (`filter/out_of_range`).
    pub dead_letters: BTreeMap<String, u64>,
    /// Commands by action.
    pub commands: BTreeMap<String, u64>,
    /// The simulated clock's first and last reading, epoch ms.
    pub first_ms: Option<i64>,
    /// See `first_ms`.
    pub last_ms: Option<i64>,
}

/// The four stages, chained.
pub struct Chain {
    filter: FilterStage,
    window: WindowStage,
    models: ModelsStage,
    decide: DecideStage,
    topics: ChainTopics,
    now: Option<DateTime<Utc>>,
    /// Offsets of the stage-to-stage "topics", per (role, partition), so every stage sees
    /// the increasing offsets a real topic would give it.
    offsets: HashMap<(&'static str, i32), i64>,
    counts: ChainCounts,
    /// Reads the commands decide wrote, in either format, to count them by action.
    codec: AvroCodec,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("counts", &self.counts)
            .finish()
    }
}

/// Topic names as the stages know them (decide tells its inputs apart by topic).
#[derive(Debug, Clone)]
struct ChainTopics {
    raw: String,
    clean: String,
    aggregates: String,
    forecasts: String,
    anomalies: String,
}

fn to_time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

impl Chain {
    /// The stages of `config`, pseudonymising with `anon_key`, with the clock at `start`.
    /// Avro inputs are decoded through `schemas` (filled by the caller from the registry).
    pub fn new(
        config: &Config,
        anon_key: &[u8],
        schemas: SchemaCache,
        start_ms: i64,
    ) -> Result<Self, AggregateError> {
        let topics = &config.topics;
        let names = ChainTopics {
            raw: topics.name(&topics.raw),
            clean: topics.name(&topics.clean),
            aggregates: topics.name(&topics.aggregates),
            forecasts: topics.name(&topics.forecasts),
            anomalies: topics.name(&topics.anomalies),
        };
        let codec = || AvroCodec {
            schemas: schemas.clone(),
        };
        let start = to_time(start_ms);
        let decide = DecideStage::new(
            config.decide.clone(),
            &config.models.signals,
            DecideInputs {
                aggregates: names.aggregates.clone(),
                forecasts: names.forecasts.clone(),
                anomalies: names.anomalies.clone(),
            },
            codec(),
        )
        .expecting_forecasts_every(config.models.forecast_step);
        Ok(Self {
            filter: FilterStage::new(config.filter.clone(), anon_key, codec(), start),
            window: WindowStage::new(config.window.clone(), codec(), None, start)?,
            models: ModelsStage::new(config.models.clone(), codec()),
            decide,
            topics: names,
            now: None,
            offsets: HashMap::new(),
            counts: ChainCounts::default(),
            codec: codec(),
        })
    }

    /// What went through so far.
    pub fn counts(&self) -> &ChainCounts {
        &self.counts
    }

    /// The simulated clock, epoch ms.
    pub fn now_ms(&self) -> Option<i64> {
        self.now.map(|t| t.timestamp_millis())
    }

    /// Moves the simulated clock to `ms` (never back) and lets every stage hear it.
    pub fn advance(&mut self, ms: i64, sink: &mut dyn Sink) {
        let t = to_time(ms);
        if self.now.is_some_and(|now| now >= t) {
            return;
        }
        self.now = Some(t);
        self.counts.first_ms.get_or_insert(ms);
        self.counts.last_ms = Some(ms);
        // What stages emit on time carries its partition in nothing but the service key, which
        // is what every later stage keys its state by; partition 0 stands in.
        let mut e = Emitter::new();
        self.filter.on_time(t, &mut e);
        self.deliver_filter(e, None, 0, sink);
        let mut e = Emitter::new();
        self.window.on_time(t, &mut e);
        self.deliver_window(e, 0, sink);
        let mut e = Emitter::new();
        self.models.on_time(t, &mut e);
        self.deliver_models(e, 0, sink);
        let mut e = Emitter::new();
        self.decide.on_time(t, &mut e);
        self.deliver_decide(e, sink);
    }

    /// Runs one raw record through every stage.
    pub fn push(&mut self, record: &Recorded, sink: &mut dyn Sink) {
        if let Some(ms) = record.timestamp_ms.filter(|ms| *ms >= 0) {
            self.advance(ms, sink);
        }
        self.counts.records += 1;
        let input = Input {
            key: record.key.as_deref(),
            payload: record.payload.as_deref(),
            headers: record
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect(),
            source: Source {
                topic: self.topics.raw.clone(),
                partition: record.partition,
                offset: record.offset,
            },
        };
        let mut e = Emitter::new();
        let sample = self.filter.process_sample(&input, &mut e);
        self.deliver_filter(e, sample, record.partition, sink);
    }

    /// The end of the input: every open window closes (a bounded replay decides every
    /// window it saw), and what that yields runs through models and decide.
    pub fn finish(&mut self, sink: &mut dyn Sink) {
        let mut e = Emitter::new();
        self.window.flush(&mut e);
        self.deliver_window(e, 0, sink);
    }

    fn dead_letters(&mut self, stage: &'static str, dead: Vec<DeadLetter>, sink: &mut dyn Sink) {
        for d in dead {
            *self
                .counts
                .dead_letters
                .entry(format!("{stage}/{}", d.reason))
                .or_default() += 1;
            sink.dead_letter(stage, &d);
        }
    }

    fn emitted(&mut self, role: &'static str, output: &Output, sink: &mut dyn Sink) {
        *self.counts.outputs.entry(role.to_string()).or_default() += 1;
        sink.output(role, output);
    }

    /// Emits `output` under `role` and gives its place on the stage-to-stage `topic` for the
    /// next stage: offsets increase per (role, partition), as on a real topic.
    fn pass(
        &mut self,
        role: &'static str,
        topic: String,
        output: &Output,
        partition: i32,
        sink: &mut dyn Sink,
    ) -> Source {
        self.emitted(role, output, sink);
        let next = self.offsets.entry((role, partition)).or_insert(0);
        let offset = *next;
        *next += 1;
        Source {
            topic,
            partition,
            offset,
        }
    }

    /// Hands the filter's clean records to the window stage. `sample` is the one the filter
    /// decided on, already decoded: the window stage takes it as is, as a Kafka Streams
    /// topology hands objects between processors of one thread, instead of decoding the
    /// bytes the filter just encoded (a third of the chain's time went to such round trips).
    fn deliver_filter(
        &mut self,
        mut e: Emitter,
        mut sample: Option<(Format, CleanSample)>,
        partition: i32,
        sink: &mut dyn Sink,
    ) {
        let (outputs, dead) = e.drain();
        self.dead_letters("filter", dead, sink);
        for o in outputs {
            if o.output != CLEAN {
                continue;
            }
            let source = self.pass(CLEAN, self.topics.clean.clone(), &o, partition, sink);
            let offset = source.offset;
            let input = as_input(&o, source);
            let mut w = Emitter::new();
            match sample.take() {
                Some((format, s)) => self.window.accept(
                    partition,
                    offset,
                    &s,
                    format,
                    Some((&input, &o.payload)),
                    &mut w,
                ),
                None => self.window.process(&input, &mut w),
            }
            self.deliver_window(w, partition, sink);
        }
    }

    fn deliver_window(&mut self, mut e: Emitter, partition: i32, sink: &mut dyn Sink) {
        let (outputs, dead) = e.drain();
        self.dead_letters("window", dead, sink);
        for o in outputs {
            match o.output {
                AGGREGATES => {
                    let topic = self.topics.aggregates.clone();
                    let source = self.pass(AGGREGATES, topic, &o, partition, sink);
                    let mut m = Emitter::new();
                    let mut d = Emitter::new();
                    // Decoded once for both readers; bytes that do not decode take each
                    // stage's own path, so each dead-letters them as it would from a topic.
                    match crate::codec::decode_aggregate(&o.payload, &self.codec) {
                        Ok((format, a)) => {
                            self.models
                                .on_aggregate(&a, format, partition, source.offset, &mut m);
                            self.decide.on_aggregate(a, format, partition, &mut d);
                        }
                        Err(_) => {
                            let input = as_input(&o, source);
                            self.models.process(&input, &mut m);
                            self.decide.process(&input, &mut d);
                        }
                    }
                    self.deliver_decide(d, sink);
                    self.deliver_models(m, partition, sink);
                }
                LATE => self.emitted(LATE, &o, sink),
                _ => {}
            }
        }
    }

    fn deliver_models(&mut self, mut e: Emitter, partition: i32, sink: &mut dyn Sink) {
        let (outputs, dead) = e.drain();
        self.dead_letters("models", dead, sink);
        for o in outputs {
            let (role, topic) = match o.output {
                ANOMALIES => (ANOMALIES, self.topics.anomalies.clone()),
                FORECASTS => (FORECASTS, self.topics.forecasts.clone()),
                // Model snapshots are how a live stage survives a restart; a replay has none.
                _ => continue,
            };
            let source = self.pass(role, topic, &o, partition, sink);
            let mut d = Emitter::new();
            self.decide.process(&as_input(&o, source), &mut d);
            self.deliver_decide(d, sink);
        }
    }

    fn deliver_decide(&mut self, mut e: Emitter, sink: &mut dyn Sink) {
        let (outputs, dead) = e.drain();
        self.dead_letters("decide", dead, sink);
        for o in outputs {
            if o.output != COMMANDS {
                continue;
            }
            let action = crate::codec::decode_event::<crate::stages::decide::Command>(
                &o.payload,
                crate::codec::EventSchema::Commands,
                &self.codec,
            )
            .map_or_else(|_| "unreadable".to_string(), |(_, c)| c.action);
            *self.counts.commands.entry(action).or_default() += 1;
            self.emitted(COMMANDS, &o, sink);
        }
    }
}

fn as_input(o: &Output, source: Source) -> Input<'_> {
    Input {
        key: Some(&o.key),
        payload: Some(&o.payload),
        headers: o
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect(),
        source,
    }
}

/// Collects every output in memory, for tests and benchmarks.
#[derive(Debug, Default)]
pub struct Collect {
    /// Outputs by role, in emission order.
    pub outputs: BTreeMap<&'static str, Vec<Output>>,
    /// Dead letters, in order.
    pub dead_letters: Vec<(&'static str, DeadLetter)>,
    /// Roles to keep; empty keeps every role.
    pub keep: Vec<&'static str>,
}

impl Sink for Collect {
    fn output(&mut self, role: &'static str, output: &Output) {
        if self.keep.is_empty() || self.keep.contains(&role) {
            self.outputs.entry(role).or_default().push(output.clone());
        }
    }

    fn dead_letter(&mut self, stage: &'static str, dead: &DeadLetter) {
        self.dead_letters.push((stage, dead.clone()));
    }
}
