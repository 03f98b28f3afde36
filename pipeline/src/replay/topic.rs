//! Reading a recorded topic between two points, without disturbing anyone: the partitions
//! are assigned by hand (no consumer group joins, no offset is committed), so live consumer
//! groups never rebalance or lose their place because of a replay.
//!
//! Records of all partitions come out merged by timestamp (ties by partition), each
//! partition in its own order: the order a pipeline keeping up with the topic saw them.

use std::collections::VecDeque;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};
use tracing::warn;

use super::chain::Recorded;
use crate::config::Config;
use crate::runner::{client_config, set_default};

/// One end of the range to replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// The partition's first (for `from`) or its end when the replay starts (for `until`).
    Edge,
    /// An offset, the same on every partition (`until` is exclusive).
    Offset(i64),
    /// A timestamp, epoch ms: records stamped at or after it (`from`), or before it (`until`).
    Time(i64),
}

/// What to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRange {
    /// The topic, as named on the cluster (with any prefix).
    pub topic: String,
    /// Where to start.
    pub from: Bound,
    /// Where to stop.
    pub until: Bound,
}

/// Why a topic could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// The client could not be made or the cluster not asked.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The topic is not on the cluster.
    #[error("topic {0} does not exist on the cluster")]
    Missing(String),
    /// Outputs written to topics were not all acknowledged.
    #[error("{0} replay outputs were not delivered to their topics")]
    Lost(u64),
}

/// A partition's slice of the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionRange {
    /// Partition.
    pub partition: i32,
    /// First offset to read.
    pub start: i64,
    /// First offset not to read.
    pub end: i64,
}

/// The records of a topic range, merged across partitions.
pub struct TopicSource {
    consumer: BaseConsumer,
    ranges: Vec<PartitionRange>,
    buffers: Vec<VecDeque<Recorded>>,
    /// Next offset expected per partition (records at or past `end` are not wanted).
    next: Vec<i64>,
    timeout: Duration,
}

impl std::fmt::Debug for TopicSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicSource")
            .field("ranges", &self.ranges)
            .finish()
    }
}

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

impl TopicSource {
    /// Resolves `range` on the cluster of `config` and assigns its partitions.
    pub fn open(config: &Config, range: &TopicRange) -> Result<Self, TopicError> {
        let mut cc = client_config(&config.kafka);
        // Never joined (partitions are assigned), but librdkafka wants a group id to exist.
        set_default(&mut cc, "group.id", "ebb-replay");
        cc.set("enable.auto.commit", "false");
        cc.set("enable.auto.offset.store", "false");
        set_default(&mut cc, "isolation.level", "read_committed");
        let consumer: BaseConsumer = cc.create()?;
        let metadata = consumer.fetch_metadata(Some(&range.topic), METADATA_TIMEOUT)?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == range.topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(TopicError::Missing(range.topic.clone()));
        }
        let at_time = |ms: i64, fallback: &[(i32, i64)]| -> Result<Vec<i64>, TopicError> {
            let mut tpl = TopicPartitionList::new();
            for p in &partitions {
                tpl.add_partition_offset(&range.topic, *p, Offset::Offset(ms))?;
            }
            let found = consumer.offsets_for_times(tpl, METADATA_TIMEOUT)?;
            Ok(partitions
                .iter()
                .map(|p| {
                    let high = fallback.iter().find(|(q, _)| q == p).map_or(0, |(_, h)| *h);
                    match found.find_partition(&range.topic, *p).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => o,
                        // No record at or after the time: the partition's end.
                        _ => high,
                    }
                })
                .collect())
        };
        let mut marks = Vec::new();
        for p in &partitions {
            let (low, high) = consumer.fetch_watermarks(&range.topic, *p, METADATA_TIMEOUT)?;
            marks.push((*p, low, high));
        }
        let highs: Vec<(i32, i64)> = marks.iter().map(|(p, _, h)| (*p, *h)).collect();
        let starts = match range.from {
            Bound::Edge => marks.iter().map(|m| m.1).collect(),
            Bound::Offset(o) => marks.iter().map(|m| o.clamp(m.1, m.2)).collect(),
            Bound::Time(ms) => at_time(ms, &highs)?,
        };
        let ends = match range.until {
            Bound::Edge => marks.iter().map(|m| m.2).collect(),
            Bound::Offset(o) => marks.iter().map(|m| o.clamp(m.1, m.2)).collect(),
            Bound::Time(ms) => at_time(ms, &highs)?,
        };
        let ranges: Vec<PartitionRange> = partitions
            .iter()
            .zip(starts.iter().zip(&ends))
            .map(|(p, (s, e))| PartitionRange {
                partition: *p,
                start: (*s).max(marks.iter().find(|m| m.0 == *p).map_or(0, |m| m.1)),
                end: *e,
            })
            .collect();
        let mut tpl = TopicPartitionList::new();
        for r in ranges.iter().filter(|r| r.start < r.end) {
            tpl.add_partition_offset(&range.topic, r.partition, Offset::Offset(r.start))?;
        }
        consumer.assign(&tpl)?;
        let n = ranges.len();
        Ok(Self {
            consumer,
            next: ranges.iter().map(|r| r.start).collect(),
            ranges,
            buffers: vec![VecDeque::new(); n],
            timeout: Duration::from_millis(200),
        })
    }

    /// Each partition's slice of the range.
    pub fn ranges(&self) -> &[PartitionRange] {
        &self.ranges
    }

    /// Offsets in the range (an upper bound on its records: transaction markers and
    /// compacted records take offsets too).
    pub fn offsets(&self) -> u64 {
        self.ranges
            .iter()
            .map(|r| u64::try_from(r.end - r.start).unwrap_or(0))
            .sum()
    }

    fn done(&self, i: usize) -> bool {
        self.next[i] >= self.ranges[i].end
    }

    /// Fetches until every partition not yet finished has a record waiting.
    fn fill(&mut self) {
        let mut quiet_since = std::time::Instant::now();
        while (0..self.ranges.len()).any(|i| self.buffers[i].is_empty() && !self.done(i)) {
            match self.consumer.poll(self.timeout) {
                Some(Ok(m)) => {
                    quiet_since = std::time::Instant::now();
                    let Some(i) = self
                        .ranges
                        .iter()
                        .position(|r| r.partition == m.partition())
                    else {
                        continue;
                    };
                    if m.offset() >= self.ranges[i].end || m.offset() < self.next[i] {
                        continue;
                    }
                    self.next[i] = m.offset() + 1;
                    self.buffers[i].push_back(Recorded {
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec),
                        headers: m
                            .headers()
                            .map(|hs| {
                                hs.iter()
                                    .map(|h| {
                                        (h.key.to_string(), h.value.unwrap_or_default().to_vec())
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                        partition: m.partition(),
                        offset: m.offset(),
                        timestamp_ms: m.timestamp().to_millis(),
                    });
                }
                Some(Err(e)) => {
                    // A broker outage is waited out: the range is still there to read.
                    warn!(error = %e, "replay read failed; retrying");
                    std::thread::sleep(Duration::from_millis(500));
                }
                None => {
                    if quiet_since.elapsed() > Duration::from_secs(30) {
                        // Waited out, not given up on: the range is still there to read.
                        warn!("no records from the replayed topic for 30 s; still waiting");
                        quiet_since = std::time::Instant::now();
                    }
                    // The end offsets were read at the start; transaction markers and
                    // aborted records fill the gap to them without ever arriving.
                    for i in 0..self.ranges.len() {
                        if self.buffers[i].is_empty()
                            && self
                                .fetch_position(i)
                                .is_some_and(|p| p >= self.ranges[i].end)
                        {
                            self.next[i] = self.ranges[i].end;
                        }
                    }
                }
            }
        }
    }

    /// The consumer's fetch position on partition `i`, if known.
    fn fetch_position(&self, i: usize) -> Option<i64> {
        let tpl = self.consumer.position().ok()?;
        let topic = tpl.elements().first()?.topic().to_string();
        match tpl
            .find_partition(&topic, self.ranges[i].partition)?
            .offset()
        {
            Offset::Offset(o) => Some(o),
            _ => None,
        }
    }
}

impl Iterator for TopicSource {
    type Item = Recorded;

    fn next(&mut self) -> Option<Recorded> {
        self.fill();
        let i = (0..self.buffers.len())
            .filter(|i| !self.buffers[*i].is_empty())
            .min_by_key(|i| {
                let r = &self.buffers[*i][0];
                (r.timestamp_ms.unwrap_or(i64::MIN), r.partition)
            })?;
        self.buffers[i].pop_front()
    }
}

/// Writes the chain's outputs as JSON lines, one file per topic role, in emission order.
/// Avro outputs (an Avro input's) are written as the JSON the stage writes for JSON input.
#[derive(Debug)]
pub struct FileSink {
    dir: std::path::PathBuf,
    files: std::collections::BTreeMap<&'static str, std::io::BufWriter<std::fs::File>>,
    error: Option<std::io::Error>,
    codec: crate::codec::AvroCodec,
}

/// The roles a topic replay writes to files; clean telemetry is left out (it is as big as
/// the input and says nothing a backtest needs).
pub const WRITTEN: &[&str] = &["aggregates", "late", "anomalies", "forecasts", "commands"];

impl FileSink {
    /// A sink writing `<role>.jsonl` and `dead-letters.jsonl` into `dir`, reading Avro
    /// outputs with the schemas in `schemas`.
    pub fn new(dir: &std::path::Path, schemas: crate::codec::SchemaCache) -> Self {
        Self {
            dir: dir.to_path_buf(),
            files: std::collections::BTreeMap::new(),
            error: None,
            codec: crate::codec::AvroCodec { schemas },
        }
    }

    fn write(&mut self, name: &'static str, line: &[u8]) {
        if self.error.is_some() {
            return;
        }
        use std::io::Write;
        let file = match self.files.entry(name) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                match std::fs::File::create(self.dir.join(format!("{name}.jsonl"))) {
                    Ok(f) => v.insert(std::io::BufWriter::new(f)),
                    Err(e) => {
                        self.error = Some(e);
                        return;
                    }
                }
            }
        };
        if let Err(e) = file.write_all(line).and_then(|()| file.write_all(b"\n")) {
            self.error = Some(e);
        }
    }

    /// Flushes every file; the first write error, if any.
    pub fn close(mut self) -> std::io::Result<()> {
        use std::io::Write;
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        for (_, mut f) in std::mem::take(&mut self.files) {
            f.flush()?;
        }
        Ok(())
    }
}

/// An Avro output of `role` as the JSON its stage writes for JSON input.
fn avro_as_json(
    role: &str,
    payload: &[u8],
    codec: &crate::codec::AvroCodec,
) -> Result<Vec<u8>, String> {
    use crate::codec::{self, EventSchema};
    use crate::stages::decide::Command;
    use crate::stages::models::process::{AnomalyEvent, ForecastEvent};
    let json = match role {
        "aggregates" => codec::decode_aggregate(payload, codec)
            .map_err(|e| e.to_string())
            .and_then(|(_, a)| serde_json::to_vec(&a).map_err(|e| e.to_string()))?,
        "late" => codec::decode_clean(payload, codec)
            .map_err(|e| e.to_string())
            .and_then(|(_, c)| codec::json::encode_clean(&c).map_err(|e| e.to_string()))?,
        "anomalies" => codec::decode_event::<AnomalyEvent>(payload, EventSchema::Anomalies, codec)
            .map_err(|e| e.to_string())
            .and_then(|(_, a)| serde_json::to_vec(&a).map_err(|e| e.to_string()))?,
        "forecasts" => codec::decode_event::<ForecastEvent>(payload, EventSchema::Forecasts, codec)
            .map_err(|e| e.to_string())
            .and_then(|(_, f)| serde_json::to_vec(&f).map_err(|e| e.to_string()))?,
        "commands" => codec::decode_event::<Command>(payload, EventSchema::Commands, codec)
            .map_err(|e| e.to_string())
            .and_then(|(_, c)| serde_json::to_vec(&c).map_err(|e| e.to_string()))?,
        other => return Err(format!("no JSON form for {other}")),
    };
    Ok(json)
}

impl super::chain::Sink for FileSink {
    fn output(&mut self, role: &'static str, output: &crate::stage::Output) {
        if !WRITTEN.contains(&role) {
            return;
        }
        if crate::codec::Format::detect(&output.payload) == Some(crate::codec::Format::Json) {
            self.write(role, &output.payload);
            return;
        }
        match avro_as_json(role, &output.payload, &self.codec) {
            Ok(line) => self.write(role, &line),
            Err(e) => {
                // Unreadable (which the stage that wrote it rules out): the key, size and
                // why still say it happened.
                let line = serde_json::json!({
                    "key": String::from_utf8_lossy(&output.key),
                    "avro_bytes": output.payload.len(),
                    "error": e.to_string(),
                });
                self.write(role, line.to_string().as_bytes());
            }
        }
    }

    fn dead_letter(&mut self, stage: &'static str, dead: &crate::stage::DeadLetter) {
        let line = serde_json::json!({
            "stage": stage,
            "reason": dead.reason,
            "detail": dead.detail,
            "source": dead.source.to_string(),
        });
        self.write("dead-letters", line.to_string().as_bytes());
    }
}

/// What a topic replay did, written to `summary.json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TopicSummary {
    /// The topic read.
    pub topic: String,
    /// Each partition's offsets read, `[start, end)`.
    pub partitions: Vec<(i32, i64, i64)>,
    /// Simulated time covered (RFC 3339, UTC).
    pub from: Option<String>,
    /// See `from`.
    pub until: Option<String>,
    /// Everything that went through the stages.
    pub counts: super::chain::ChainCounts,
    /// Per service, on its recorded load: ebb's policy, the HPA baseline, static
    /// provisioning and the oracle on the cluster simulator (as `ebb replay --file`); summed
    /// over the fleet in `report.json`.
    pub policies: std::collections::BTreeMap<
        String,
        std::collections::BTreeMap<String, ebb_replay::PolicyResult>,
    >,
    /// ebb against the HPA baseline over the fleet.
    pub verdict: ebb_replay::report::Verdict,
    /// Services where ebb broke the SLO less than the HPA at no more cost.
    pub services_better_than_hpa: usize,
}

/// Each service's recorded load through the policy comparison of `ebb replay --file`,
/// summed into a fleet as it goes (the simulations are not kept).
fn compare_policies(config: &Config, loads: &Loads) -> ebb_replay::fleet::Fleet {
    let mut fleet = ebb_replay::fleet::Fleet::default();
    for (service, windows) in loads.by_service.iter().filter(|(_, w)| w.len() >= 2) {
        let series = crate::eval::series::Series {
            times: windows.iter().map(|w| w.0).collect(),
            values: windows.iter().map(|w| w.1).collect(),
            ..Default::default()
        };
        let input = ebb_replay::report::InputInfo {
            file: service.clone(),
            time_column: "window_start".into(),
            value_column: loads.spec.name.clone(),
            rows: series.times.len(),
            step_seconds: series.step_ms() as f64 / 1000.0,
            ..Default::default()
        };
        let outcome = super::replay_series(config, &series, input, "ebb.toml", &[]);
        fleet.add(service, &outcome.report, &outcome.runs);
    }
    fleet
}

/// Why a topic replay failed.
#[derive(Debug, thiserror::Error)]
pub enum TopicReplayError {
    /// The topic could not be read.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// The window stage's engine would not start.
    #[error(transparent)]
    Aggregate(#[from] crate::stages::window::aggregate::AggregateError),
    /// The outputs could not be written.
    #[error("{0}: {1}")]
    Write(std::path::PathBuf, std::io::Error),
    /// The report could not be written.
    #[error("report in {0}: {1}")]
    Report(std::path::PathBuf, ebb_replay::report::ReportError),
    /// The run-prefix topics could not be made.
    #[error(transparent)]
    Topics(crate::topics::TopicsError),
    /// Avro records need the registry, which could not be used.
    #[error("schema registry: {0}")]
    Registry(#[from] crate::codec::registry::RegistryError),
}

/// Avro input through the registry: the writer schemas of the records, and the ids of the
/// schemas the stages write (registered as `ebb run` registers them).
struct AvroInput {
    registry: crate::codec::registry::Registry,
    cache: crate::codec::SchemaCache,
    handle: tokio::runtime::Handle,
    registered: bool,
}

impl AvroInput {
    fn prepare(&mut self, config: &Config, payload: &[u8]) -> Result<(), TopicReplayError> {
        let Some(id) = crate::codec::confluent_schema_id(payload) else {
            return Ok(());
        };
        if !self.registered {
            let topics = &config.topics;
            for out in crate::schemas::filter_outputs(topics)
                .into_iter()
                .chain(crate::schemas::window_outputs(topics))
                .chain(crate::schemas::models_outputs(topics))
                .chain(crate::schemas::decide_outputs(topics))
            {
                let id = self
                    .handle
                    .block_on(self.registry.register(&out.subject, out.schema))?;
                self.cache.set_output_id(out.key, id);
            }
            self.registered = true;
        }
        if self.cache.knows(id) {
            return Ok(());
        }
        match self.handle.block_on(self.registry.schema_by_id(id)) {
            Ok(text) => {
                if self.cache.insert(id, &text).is_err() {
                    self.cache.insert_missing(id);
                }
            }
            // The filter dead-letters the record with its reason.
            Err(crate::codec::registry::RegistryError::NotFound(_)) => {
                self.cache.insert_missing(id);
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }
}

/// Replays `range` through the whole pipeline into `dir`: `<role>.jsonl` per output,
/// `dead-letters.jsonl`, `summary.json` and the config used (`ebb.toml`); with `to_topics`,
/// also to the topics of that run prefix. `progress` hears (records done, offsets in the
/// range, simulated time) every so often. Avro records are read through the registry of
/// `config`, on `handle`.
#[allow(clippy::too_many_arguments)]
pub fn replay_topic(
    config: &Config,
    config_toml: &str,
    anon_key: &[u8],
    range: &TopicRange,
    dir: &std::path::Path,
    to_topics: Option<&str>,
    handle: tokio::runtime::Handle,
    progress: &mut dyn FnMut(u64, u64, Option<i64>),
) -> Result<TopicSummary, TopicReplayError> {
    let source = TopicSource::open(config, range)?;
    let write_err = |path: std::path::PathBuf| move |e| TopicReplayError::Write(path, e);
    std::fs::create_dir_all(dir).map_err(write_err(dir.to_path_buf()))?;
    let config_path = dir.join("ebb.toml");
    std::fs::write(&config_path, config_toml).map_err(write_err(config_path.clone()))?;
    let total = source.offsets();
    let partitions = source
        .ranges()
        .iter()
        .map(|r| (r.partition, r.start, r.end))
        .collect();
    let schemas = crate::codec::SchemaCache::default();
    let mut avro = crate::wiring::registry(config)?.map(|registry| AvroInput {
        registry,
        cache: schemas.clone(),
        handle: handle.clone(),
        registered: false,
    });
    let mut files = FileSink::new(dir, schemas.clone());
    let mut topics = to_topics
        .map(|prefix| TopicSink::create(config, prefix, &handle))
        .transpose()?;
    let mut loads = Loads::new(config, schemas.clone());
    let mut sink = Both(&mut files, topics.as_mut(), &mut loads);
    let mut chain: Option<super::chain::Chain> = None;
    let mut done = 0u64;
    for record in source {
        if let (Some(avro), Some(payload)) = (&mut avro, &record.payload) {
            avro.prepare(config, payload)?;
        }
        let c = match &mut chain {
            Some(c) => c,
            None => chain.insert(super::chain::Chain::new(
                config,
                anon_key,
                schemas.clone(),
                record.timestamp_ms.unwrap_or(0),
            )?),
        };
        c.push(&record, &mut sink);
        done += 1;
        if done.is_multiple_of(1024) {
            progress(done, total, c.now_ms());
        }
    }
    let counts = match &mut chain {
        Some(c) => {
            c.finish(&mut sink);
            progress(done, total, c.now_ms());
            c.counts().clone()
        }
        None => super::chain::ChainCounts::default(),
    };
    files.close().map_err(write_err(dir.to_path_buf()))?;
    if let Some(t) = topics {
        t.close()?;
    }
    let fleet = compare_policies(config, &loads);
    let from = counts
        .first_ms
        .map(crate::stages::window::aggregate::ms_to_rfc3339);
    let until = counts
        .last_ms
        .map(crate::stages::window::aggregate::ms_to_rfc3339);
    let report = fleet.report(&format!("topic {}", range.topic), from, until);
    fleet
        .write(&report, dir)
        .map_err(|e| TopicReplayError::Report(dir.to_path_buf(), e))?;
    let summary = TopicSummary {
        topic: range.topic.clone(),
        partitions,
        policies: report
            .by_service
            .into_iter()
            .map(|(service, s)| (service, s.policies))
            .collect(),
        verdict: report.verdict,
        services_better_than_hpa: report.services_better_than_hpa,
        from: report.from,
        until: report.until,
        counts,
    };
    let path = dir.join("summary.json");
    let text = serde_json::to_string_pretty(&summary).unwrap_or_default();
    std::fs::write(&path, text + "\n").map_err(write_err(path.clone()))?;
    Ok(summary)
}

/// Counts the deliveries that failed, so a replay to topics says when it lost something.
#[derive(Default)]
struct Failures(std::sync::atomic::AtomicU64);

impl rdkafka::ClientContext for Failures {}

impl rdkafka::producer::ProducerContext for Failures {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, (): ()) {
        if result.is_err() {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Writes the chain's outputs to the topics of a run prefix (`<prefix><topic>`), never to
/// the live ones: a replay's commands can then feed a dry-run actuator or a dashboard.
pub struct TopicSink {
    producer: rdkafka::producer::BaseProducer<Failures>,
    names: std::collections::BTreeMap<&'static str, String>,
    dead_letter: String,
}

impl std::fmt::Debug for TopicSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicSink")
            .field("names", &self.names)
            .finish()
    }
}

impl TopicSink {
    /// Creates (or brings in line) every topic under `prefix` on the cluster of `config`,
    /// and a producer for them.
    pub fn create(
        config: &Config,
        prefix: &str,
        handle: &tokio::runtime::Handle,
    ) -> Result<Self, TopicReplayError> {
        let mut run = config.clone();
        run.topics.prefix = format!("{prefix}{}", config.topics.prefix);
        let mut pc = client_config(&run.kafka);
        set_default(&mut pc, "linger.ms", "5");
        let producer: rdkafka::producer::BaseProducer<Failures> = pc
            .create_with_context(Failures::default())
            .map_err(TopicError::Kafka)?;
        let metadata = producer
            .client()
            .fetch_metadata(None, METADATA_TIMEOUT)
            .map_err(TopicError::Kafka)?;
        let existing: std::collections::BTreeSet<&str> = metadata
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| t.name())
            .collect();
        let missing: Vec<_> = crate::topics::declared(&run)
            .map_err(TopicReplayError::Topics)?
            .into_iter()
            .filter(|spec| !existing.contains(spec.name.as_str()))
            .collect();
        if !missing.is_empty() {
            handle
                .block_on(crate::topics::apply(&run.kafka, &missing, false))
                .map_err(TopicReplayError::Topics)?;
        }
        let t = &run.topics;
        let names = [
            ("aggregates", t.name(&t.aggregates)),
            ("late", t.name(&t.late)),
            ("anomalies", t.name(&t.anomalies)),
            ("forecasts", t.name(&t.forecasts)),
            ("commands", t.name(&t.commands)),
        ]
        .into_iter()
        .collect();
        Ok(Self {
            producer,
            names,
            dead_letter: t.name(&t.dead_letter),
        })
    }

    fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(String, Vec<u8>)],
    ) {
        let mut record: rdkafka::producer::BaseRecord<'_, [u8], [u8], ()> =
            rdkafka::producer::BaseRecord::with_opaque_to(topic, ())
                .headers(crate::runner::owned_headers(headers));
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = payload {
            record = record.payload(p);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((e, back)) => {
                    if !matches!(
                        e,
                        KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull)
                    ) {
                        warn!(topic, error = %e, "replay output not sent");
                        self.producer
                            .context()
                            .0
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return;
                    }
                    record = back;
                    self.producer.poll(Duration::from_millis(10));
                }
            }
        }
    }

    /// Waits for every output to be acknowledged; an error if any was lost.
    pub fn close(self) -> Result<(), TopicError> {
        crate::runner::settle(&self.producer, Duration::from_secs(60));
        let failed = self
            .producer
            .context()
            .0
            .load(std::sync::atomic::Ordering::Relaxed)
            + u64::try_from(self.producer.in_flight_count()).unwrap_or(0);
        if failed > 0 {
            return Err(TopicError::Lost(failed));
        }
        Ok(())
    }
}

impl super::chain::Sink for TopicSink {
    fn output(&mut self, role: &'static str, output: &crate::stage::Output) {
        let Some(topic) = self.names.get(role) else {
            return;
        };
        self.send(
            topic,
            Some(&output.key),
            Some(&output.payload),
            &output.headers,
        );
        self.producer.poll(Duration::ZERO);
    }

    fn dead_letter(&mut self, stage: &'static str, dead: &crate::stage::DeadLetter) {
        let headers = crate::runner::dead_letter_headers(stage, dead);
        let topic = self.dead_letter.clone();
        self.send(
            &topic,
            dead.key.as_deref(),
            dead.payload.as_deref(),
            &headers,
        );
    }
}

/// Each service's load per window (decide's load signal), from the aggregates, for the
/// policy comparison.
struct Loads {
    spec: crate::stages::models::config::SignalSpec,
    by_service: std::collections::BTreeMap<String, Vec<(i64, f64)>>,
    /// Avro aggregates (an Avro input's) are read with the replay's schemas.
    codec: crate::codec::AvroCodec,
}

impl Loads {
    fn new(config: &Config, schemas: crate::codec::SchemaCache) -> Self {
        let name = &config.decide.load_signal;
        let spec = config
            .models
            .signals
            .iter()
            .find(|s| &s.name == name)
            .cloned()
            .unwrap_or_else(|| crate::stages::models::config::SignalSpec {
                name: name.clone(),
                metric: name.clone(),
                statistic: crate::stages::models::config::Statistic::Total,
            });
        Self {
            spec,
            by_service: std::collections::BTreeMap::new(),
            codec: crate::codec::AvroCodec { schemas },
        }
    }

    fn aggregate(&mut self, payload: &[u8]) {
        let Ok((_, a)) = crate::codec::decode_aggregate(payload, &self.codec) else {
            return;
        };
        if !self.spec.matches(&a.metric) {
            return;
        }
        let v = self.spec.statistic.of(&a);
        if v.is_finite() {
            self.by_service
                .entry(a.service)
                .or_default()
                .push((a.window_start, v));
        }
    }
}

/// Both sinks at once, and the loads.
struct Both<'a>(&'a mut FileSink, Option<&'a mut TopicSink>, &'a mut Loads);

impl super::chain::Sink for Both<'_> {
    fn output(&mut self, role: &'static str, output: &crate::stage::Output) {
        if role == "aggregates" {
            self.2.aggregate(&output.payload);
        }
        self.0.output(role, output);
        if let Some(t) = self.1.as_mut() {
            t.output(role, output);
        }
    }

    fn dead_letter(&mut self, stage: &'static str, dead: &crate::stage::DeadLetter) {
        self.0.dead_letter(stage, dead);
        if let Some(t) = self.1.as_mut() {
            t.dead_letter(stage, dead);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::FileSink;
    use crate::codec::{avro::test_codec, EventSchema};
    use crate::replay::chain::Sink;
    use crate::stage::Output;
    use crate::stages::decide::process::Evidence;
    use crate::stages::decide::Command;

    #[test]
    fn avro_outputs_are_written_as_the_json_a_json_run_writes(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("ebb-filesink-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir)?;
        let codec = test_codec();
        let command = Command {
            command_id: "api/1/scale".into(),
            service: "api".into(),
            action: "scale".into(),
            replicas: Some(5),
            instance: None,
            policy: "reactive".into(),
            reason: "load".into(),
            evidence: Evidence::default(),
            decided_at: "2026-12-01T10:00:00.000Z".into(),
            shadow: false,
        };
        let mut sink = FileSink::new(&dir, codec.schemas.clone());
        for payload in [
            codec.encode_event(EventSchema::Commands, &command)?,
            serde_json::to_vec(&command)?,
        ] {
            sink.output(
                "commands",
                &Output {
                    output: "commands",
                    key: b"api".to_vec(),
                    payload,
                    headers: Vec::new(),
                },
            );
        }
        sink.close()?;
        let text = std::fs::read_to_string(dir.join("commands.jsonl"))?;
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], lines[1], "the Avro command reads as its JSON");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
