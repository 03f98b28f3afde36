//! Actuators: a consumer group on `commands` that carries each command out through one
//! driver (`log`, `webhook`, `kubernetes`) and records the outcome on `actuations`.
//!
//! The [`Actuator`] is wired to Kafka by the same runner as the stages (at-least-once: a
//! command's offset is committed once its actuation record is acknowledged). Everything
//! but the driver call is plain logic: a command already actuated (its id is on
//! `actuations`, read back on assignment) is not carried out again, a shadow command or a
//! `--dry-run` is recorded without acting, and a command older than `max_age` is refused as
//! stale rather than applied late.

pub mod kubernetes;
pub mod log;
pub mod webhook;

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::codec::{AvroCodec, EventSchema};
use crate::config::ConfigError;
use crate::stage::{Emitter, Input, Output, Stage};
use crate::stages::decide::Command;

/// Output name of actuation records.
pub const ACTUATIONS: &str = "actuations";
/// Command ids remembered per actuator, to refuse a second execution.
const SEEN_CAPACITY: usize = 200_000;

/// Every reason an actuator dead-letters a record: those of a command that cannot be read.
pub const REASONS: &[&str] = crate::codec::DECODE_REASONS;

/// `[actuate]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActuateConfig {
    /// Consumer group; each driver gets its own (`<group_id>-<driver>`), so a log and a
    /// webhook actuator both see every command. Default `ebb-actuate`.
    pub group_id: String,
    /// Commands decided longer ago than this are refused as stale. Default 10m.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// `[actuate.webhook]`.
    pub webhook: webhook::WebhookConfig,
    /// `[actuate.kubernetes]`.
    pub kubernetes: kubernetes::KubernetesConfig,
}

impl Default for ActuateConfig {
    fn default() -> Self {
        Self {
            group_id: "ebb-actuate".into(),
            max_age: Duration::from_secs(600),
            webhook: webhook::WebhookConfig::default(),
            kubernetes: kubernetes::KubernetesConfig::default(),
        }
    }
}

impl ActuateConfig {
    /// Checks values serde cannot, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.group_id.trim().is_empty() {
            return Err(ConfigError::Invalid {
                key: "actuate.group_id".into(),
                why: "must not be empty".into(),
            });
        }
        if self.max_age.is_zero() {
            return Err(ConfigError::Invalid {
                key: "actuate.max_age".into(),
                why: "must be positive".into(),
            });
        }
        self.webhook.validate()?;
        self.kubernetes.validate()
    }
}

/// Why a driver could not carry a command out.
#[derive(Debug, thiserror::Error)]
pub enum ActuateError {
    /// The far end refused it; trying again will not help.
    #[error("refused: {0}")]
    Refused(String),
    /// Retries ran out on a transient failure.
    #[error("gave up after {attempts} attempts: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The command cannot be carried out by this driver (e.g. no instance to restart).
    #[error("{0}")]
    Unsupported(String),
}

/// Carries commands out. Drivers do I/O; everything around them is [`Actuator`]'s.
pub trait Driver: Send {
    /// `log`, `webhook` or `kubernetes`.
    fn name(&self) -> &'static str;
    /// Carries `command` out; on success, a short description of what was done.
    fn apply(&mut self, command: &Command) -> Result<String, ActuateError>;
}

/// What an actuator did with a command: one record on `actuations` per command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Actuation {
    /// The command.
    pub command_id: String,
    /// Its service.
    pub service: String,
    /// Its action.
    pub action: String,
    /// The driver.
    pub driver: String,
    /// `applied`, `failed`, `dry_run`, `shadow` (skipped: the service is in shadow mode) or
    /// `stale` (refused: decided too long ago).
    pub outcome: String,
    /// What happened, for a person.
    pub detail: String,
    /// When the actuator handled it (RFC 3339, UTC).
    pub at: String,
}

/// What an actuator has done.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ActuateCounts {
    /// Commands applied.
    pub applied: u64,
    /// Commands a driver failed on.
    pub failed: u64,
    /// Recorded without acting (dry run or shadow).
    pub skipped: u64,
    /// Refused as too old.
    pub stale: u64,
    /// Already actuated: redeliveries.
    pub duplicates: u64,
}

/// The actuator: commands in, one actuation record out per command.
pub struct Actuator {
    driver: Box<dyn Driver>,
    dry_run: bool,
    max_age: chrono::Duration,
    clock: Arc<dyn Clock>,
    avro: AvroCodec,
    seen: HashSet<String>,
    order: VecDeque<String>,
    counts: ActuateCounts,
}

impl std::fmt::Debug for Actuator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Actuator")
            .field("driver", &self.driver.name())
            .field("dry_run", &self.dry_run)
            .finish()
    }
}

impl Actuator {
    /// An actuator over `driver`; with `dry_run`, nothing is carried out, only recorded.
    pub fn new(
        driver: Box<dyn Driver>,
        dry_run: bool,
        max_age: Duration,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            driver,
            dry_run,
            max_age: chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX),
            clock,
            avro: AvroCodec::default(),
            seen: HashSet::new(),
            order: VecDeque::new(),
            counts: ActuateCounts::default(),
        }
    }

    /// Reads Avro commands with the writer schemas in `avro`'s cache (the runner fills it).
    #[must_use]
    pub fn reading_avro(mut self, avro: AvroCodec) -> Self {
        self.avro = avro;
        self
    }

    /// What the actuator has done so far.
    pub fn counts(&self) -> ActuateCounts {
        self.counts
    }

    fn remember(&mut self, id: &str) {
        if self.seen.insert(id.to_string()) {
            self.order.push_back(id.to_string());
            while self.order.len() > SEEN_CAPACITY {
                if let Some(old) = self.order.pop_front() {
                    self.seen.remove(&old);
                }
            }
        }
    }

    fn handle(&mut self, c: &Command) -> (&'static str, String) {
        let now = self.clock.now();
        let age = chrono::DateTime::parse_from_rfc3339(&c.decided_at)
            .map(|t| now.signed_duration_since(t))
            .unwrap_or(chrono::Duration::zero());
        if c.shadow {
            self.counts.skipped += 1;
            return ("shadow", format!("shadow mode: would {}", describe(c)));
        }
        if age > self.max_age {
            self.counts.stale += 1;
            return (
                "stale",
                format!(
                    "decided {} s ago, beyond max_age: not {}",
                    age.num_seconds(),
                    describe(c)
                ),
            );
        }
        if self.dry_run {
            self.counts.skipped += 1;
            return ("dry_run", format!("dry run: would {}", describe(c)));
        }
        match self.driver.apply(c) {
            Ok(detail) => {
                self.counts.applied += 1;
                ("applied", detail)
            }
            Err(e) => {
                self.counts.failed += 1;
                tracing::error!(command = %c.command_id, driver = self.driver.name(), error = %e, "actuation failed");
                ("failed", e.to_string())
            }
        }
    }
}

/// The command in a few words: `scale checkout to 6`, `restart checkout/i-2`.
pub fn describe(c: &Command) -> String {
    match (c.action.as_str(), c.replicas, &c.instance) {
        ("scale", Some(n), _) => format!("scale {} to {n}", c.service),
        ("restart", _, Some(i)) => format!("restart {}/{i}", c.service),
        (action, ..) => format!("{action} {}", c.service),
    }
}

impl Stage for Actuator {
    fn name(&self) -> &'static str {
        "actuate"
    }

    fn process(&mut self, input: &Input<'_>, out: &mut Emitter) {
        let Some(payload) = input.payload.filter(|p| !p.is_empty()) else {
            out.dead_letter(input, "empty_payload", "no value");
            return;
        };
        let command: Command =
            match crate::codec::decode_event(payload, EventSchema::Commands, &self.avro) {
                Ok((_, c)) => c,
                Err(e) => {
                    out.dead_letter(input, e.reason(), format!("command: {e}"));
                    return;
                }
            };
        if self.seen.contains(&command.command_id) {
            self.counts.duplicates += 1;
            return;
        }
        let (outcome, detail) = self.handle(&command);
        self.remember(&command.command_id);
        let record = Actuation {
            command_id: command.command_id.clone(),
            service: command.service.clone(),
            action: command.action.clone(),
            driver: self.driver.name().to_string(),
            outcome: outcome.to_string(),
            detail,
            at: self
                .clock
                .now()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        };
        match serde_json::to_vec(&record) {
            Ok(payload) => out.emit(Output {
                output: ACTUATIONS,
                key: command.service.into_bytes(),
                payload,
                headers: vec![
                    ("ebb.command_id".into(), record.command_id.into_bytes()),
                    ("ebb.outcome".into(), outcome.as_bytes().to_vec()),
                ],
            }),
            Err(e) => tracing::error!(error = %e, "actuation record not serialisable"),
        }
    }

    fn restore_state(&mut self, _partition: i32, records: &[(Vec<u8>, Vec<u8>)]) {
        let driver = self.driver.name();
        for (_, value) in records {
            if let Ok(a) = serde_json::from_slice::<Actuation>(value) {
                if a.driver == driver {
                    self.remember(&a.command_id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
