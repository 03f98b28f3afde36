//! The stage contract: what every stage (filter, window, models, decide) looks like to the
//! runner, to `ebb demo` and to replay.
//!
//! A stage is a plain value. `process` takes one record and emits zero or more outputs or a
//! dead letter; `on_time` hears that time moved on. Neither touches Kafka, the network or
//! the wall clock, so the same value runs under the Kafka runner, in tests and in replay.

use std::collections::BTreeMap;

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
    events: BTreeMap<&'static str, u64>,
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

    /// Notes an event about the stage's own state (a model reset, an input gone missing),
    /// counted in the metrics once the batch it came with is delivered.
    pub fn note(&mut self, event: &'static str) {
        *self.events.entry(event).or_default() += 1;
    }

    /// Takes the events noted so far.
    pub fn take_events(&mut self) -> BTreeMap<&'static str, u64> {
        std::mem::take(&mut self.events)
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

/// Where a stateful stage needs a partition re-read from, and the watermark its state had,
/// as of the records processed so far. The runner commits `replay_from` (not the processed
/// position) and hands both back through [`Restore`] after a restart or rebalance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// Oldest offset still needed to rebuild open state; `None` when nothing is open.
    pub replay_from: Option<i64>,
    /// The stage's event-time watermark on the partition, epoch milliseconds.
    pub watermark_ms: i64,
    /// While the stage is still re-reading what a previous owner processed, that owner's
    /// position: the runner keeps it in the commit rather than writing a smaller one.
    pub processed_until: Option<i64>,
}

/// What a stage is told when it is given a partition that was checkpointed before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restore {
    /// Records before this offset were processed (and their outputs acknowledged) by the
    /// previous owner; they are read again only to rebuild state, never to emit anew.
    pub processed_until: i64,
    /// The watermark the previous owner had reached at `processed_until`.
    pub watermark_ms: i64,
}

impl Restore {
    /// The offset-commit metadata that carries a checkpoint.
    pub fn to_metadata(processed_until: i64, watermark_ms: i64) -> String {
        format!("ebb.v1;next={processed_until};wm={watermark_ms}")
    }

    /// Reads commit metadata written by [`Restore::to_metadata`]; `None` for anything else.
    pub fn from_metadata(text: &str) -> Option<Self> {
        let rest = text.strip_prefix("ebb.v1;")?;
        let (mut next, mut wm) = (None, None);
        for part in rest.split(';') {
            match part.split_once('=') {
                Some(("next", v)) => next = v.parse().ok(),
                Some(("wm", v)) => wm = v.parse().ok(),
                _ => {}
            }
        }
        Some(Self {
            processed_until: next?,
            watermark_ms: wm?,
        })
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

    /// The runner is about to make what was processed so far durable (a transaction commit,
    /// or a batch's offsets): emit the state changed since the last flush, as a changelog.
    fn flush(&mut self, _out: &mut Emitter) {}

    /// For stateful stages: what must be re-read of `partition` to rebuild the state held
    /// now. Stateless stages keep the default (`None`): commit at the processed position.
    fn checkpoint(&self, _partition: i32) -> Option<Checkpoint> {
        None
    }

    /// `partition` is now this stage's; `restore` is what its previous owner checkpointed.
    fn assigned(&mut self, _partition: i32, _restore: Option<Restore>) {}

    /// `partition` is no longer this stage's: drop its state.
    fn revoked(&mut self, _partition: i32) {}

    /// For stages with a state topic: the records of `partition` of that topic, read from
    /// its start when the partition was assigned (oldest first, so later ones win).
    fn restore_state(&mut self, _partition: i32, _records: &[(Vec<u8>, Vec<u8>)]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_metadata_round_trips_and_ignores_foreign_text() {
        let text = Restore::to_metadata(42, -7);
        assert_eq!(
            Restore::from_metadata(&text),
            Some(Restore {
                processed_until: 42,
                watermark_ms: -7
            })
        );
        assert_eq!(Restore::from_metadata(""), None);
        assert_eq!(Restore::from_metadata("ebb.v1;next=1"), None);
        assert_eq!(Restore::from_metadata("someone else's"), None);
    }
}
