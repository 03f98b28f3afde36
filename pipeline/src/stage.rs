//! The stage contract: what every stage (filter, window, models, decide) looks like to the
//! runner, to `ebb demo` and to replay.
//!
//! A stage is a plain value. `process` takes one record and emits zero or more outputs or a
//! dead letter; `on_time` hears that time moved on. Neither touches Kafka, the network or
//! the wall clock, so the same value runs under the Kafka runner, in tests and in replay.

use chrono::{DateTime, Utc};

/// Where a record came from: the coordinates a dead letter names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Topic it was read from.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.topic, self.partition, self.offset)
    }
}

/// One record handed to a stage, borrowed from the consumer's buffer.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    /// The Kafka key, if any.
    pub key: Option<&'a [u8]>,
    /// The value; `None` for a tombstone.
    pub payload: Option<&'a [u8]>,
    /// Headers as (name, value) pairs, in order.
    pub headers: Vec<(&'a str, &'a [u8])>,
    /// Where it was read.
    pub source: Source,
}

/// A record a stage emits to one of its named outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// Logical output name (e.g. `clean`); the runner maps it to a topic.
    pub output: &'static str,
    /// The key: deterministic, so a redelivered input overwrites rather than duplicates.
    pub key: Vec<u8>,
    /// The encoded value.
    pub payload: Vec<u8>,
    /// Extra headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A rejected record: the original bytes, unchanged, with the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Stable machine reason (e.g. `malformed`), used in the header and metrics labels.
    pub reason: &'static str,
    /// Human detail, e.g. the parser's message.
    pub detail: String,
    /// The original key.
    pub key: Option<Vec<u8>>,
    /// The original value.
    pub payload: Option<Vec<u8>>,
    /// The original headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Where it came from.
    pub source: Source,
}

/// Collects what a stage emits for the runner (or a test) to deliver.
#[derive(Debug, Default)]
pub struct Emitter {
    outputs: Vec<Output>,
    dead_letters: Vec<DeadLetter>,
}

impl Emitter {
    /// An empty emitter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Emits a record to a named output.
    pub fn emit(&mut self, output: Output) {
        self.outputs.push(output);
    }

    /// Rejects `input`: its original key, value and headers go to the dead-letter topic.
    pub fn dead_letter(
        &mut self,
        input: &Input<'_>,
        reason: &'static str,
        detail: impl Into<String>,
    ) {
        self.dead_letters.push(DeadLetter {
            reason,
            detail: detail.into(),
            key: input.key.map(<[u8]>::to_vec),
            payload: input.payload.map(<[u8]>::to_vec),
            headers: input
                .headers
                .iter()
                .map(|(k, v)| ((*k).to_string(), v.to_vec()))
                .collect(),
            source: input.source.clone(),
        });
    }

    /// Outputs emitted so far.
    pub fn outputs(&self) -> &[Output] {
        &self.outputs
    }

    /// Dead letters emitted so far.
    pub fn dead_letters(&self) -> &[DeadLetter] {
        &self.dead_letters
    }

    /// Takes everything emitted, leaving the emitter empty for the next batch.
    pub fn drain(&mut self) -> (Vec<Output>, Vec<DeadLetter>) {
        (
            std::mem::take(&mut self.outputs),
            std::mem::take(&mut self.dead_letters),
        )
    }

    /// True when nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.outputs.is_empty() && self.dead_letters.is_empty()
    }
}

/// A pipeline stage.
pub trait Stage {
    /// The stage's name, as in `ebb run <name>`, metrics labels and the `ebb.stage` header.
    fn name(&self) -> &'static str;

    /// Handles one record. Same state and input give the same outputs.
    fn process(&mut self, input: &Input<'_>, out: &mut Emitter);

    /// Time moved on to `now` (wall time from the runner, simulated time in replay).
    fn on_time(&mut self, _now: DateTime<Utc>, _out: &mut Emitter) {}
}
