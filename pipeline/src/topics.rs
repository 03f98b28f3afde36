//! Topics as code: `topics/topics.toml`, and `ebb topics apply`.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewPartitions, NewTopic, OwnedResourceSpecifier,
    ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use serde::Deserialize;

use crate::config::{Config, TopicsConfig};
use crate::runner::client_config;

/// The declarations shipped with ebb.
pub const TOPICS_TOML: &str = include_str!("../../topics/topics.toml");

/// Topic errors.
#[derive(Debug, thiserror::Error)]
pub enum TopicsError {
    /// The declaration file is wrong.
    #[error("topics file: {0}")]
    Parse(String),
    /// The cluster could not be reached or refused a request.
    #[error("kafka admin: {0}")]
    Kafka(#[from] KafkaError),
    /// A topic-level failure from the broker.
    #[error("topic {topic}: {error}")]
    Topic {
        /// The topic.
        topic: String,
        /// The broker's answer.
        error: String,
    },
}

/// One declared topic.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    /// Base name (before the prefix).
    pub name: String,
    /// Ties the topic to a name override in `[topics]` (`raw`, `clean`, `dead_letter`).
    pub role: Option<String>,
    /// Partitions.
    pub partitions: i32,
    /// Wanted replication factor.
    pub replication: i32,
    /// What the topic carries.
    pub doc: Option<String>,
    /// Topic configs.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicsFile {
    topic: Vec<TopicSpec>,
}

/// Parses a topics file and checks it.
pub fn parse(text: &str) -> Result<Vec<TopicSpec>, TopicsError> {
    let file: TopicsFile = toml::from_str(text).map_err(|e| TopicsError::Parse(e.to_string()))?;
    for t in &file.topic {
        if t.partitions < 1 || t.replication < 1 {
            return Err(TopicsError::Parse(format!(
                "{}: partitions and replication must be at least 1",
                t.name
            )));
        }
    }
    Ok(file.topic)
}

/// The declared topics, each under the name `config` gives it (prefix and overrides applied).
pub fn resolve(specs: &[TopicSpec], topics: &TopicsConfig) -> Vec<TopicSpec> {
    specs
        .iter()
        .map(|t| {
            let base = match t.role.as_deref() {
                Some("raw") => topics.raw.as_str(),
                Some("clean") => topics.clean.as_str(),
                Some("dead_letter") => topics.dead_letter.as_str(),
                Some("late") => topics.late.as_str(),
                Some("aggregates") => topics.aggregates.as_str(),
                Some("anomalies") => topics.anomalies.as_str(),
                Some("forecasts") => topics.forecasts.as_str(),
                Some("model_state") => topics.model_state.as_str(),
                Some("commands") => topics.commands.as_str(),
                Some("actuations") => topics.actuations.as_str(),
                Some("decide_state") => topics.decide_state.as_str(),
                _ => t.name.as_str(),
            };
            TopicSpec {
                name: topics.name(base),
                ..t.clone()
            }
        })
        .collect()
}

/// The shipped declarations, resolved for `config`.
pub fn declared(config: &Config) -> Result<Vec<TopicSpec>, TopicsError> {
    Ok(resolve(&parse(TOPICS_TOML)?, &config.topics))
}

/// One change `apply` made (or, dry, would make).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Created with this many partitions and this replication.
    Created {
        /// Partitions.
        partitions: i32,
        /// Replication used.
        replication: i32,
    },
    /// Partitions added.
    Partitions {
        /// Before.
        from: i32,
        /// After.
        to: i32,
    },
    /// A config value set.
    Config {
        /// Key.
        key: String,
        /// Before.
        from: Option<String>,
        /// After.
        to: String,
    },
    /// Left alone, with why (e.g. more partitions than declared).
    Kept(String),
    /// Nothing to do.
    Unchanged,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Created {
                partitions,
                replication,
            } => {
                write!(
                    f,
                    "created ({partitions} partitions, replication {replication})"
                )
            }
            Change::Partitions { from, to } => write!(f, "partitions {from} -> {to}"),
            Change::Config { key, from, to } => write!(
                f,
                "{key}: {} -> {to}",
                from.as_deref().unwrap_or("(default)")
            ),
            Change::Kept(why) => write!(f, "kept: {why}"),
            Change::Unchanged => f.write_str("unchanged"),
        }
    }
}

/// Creates or updates the declared topics; returns each topic's changes.
pub async fn apply(
    kafka: &BTreeMap<String, String>,
    specs: &[TopicSpec],
    dry_run: bool,
) -> Result<Vec<(String, Vec<Change>)>, TopicsError> {
    let admin: AdminClient<DefaultClientContext> = client_config(kafka).create()?;
    let timeout = Duration::from_secs(30);
    let metadata = admin.inner().fetch_metadata(None, timeout)?;
    let brokers = i32::try_from(metadata.brokers().len()).unwrap_or(1).max(1);
    let existing: BTreeMap<String, i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| {
            (
                t.name().to_string(),
                i32::try_from(t.partitions().len()).unwrap_or(0),
            )
        })
        .collect();
    let opts = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let mut report = Vec::new();

    let mut to_create = Vec::new();
    for spec in specs.iter().filter(|s| !existing.contains_key(&s.name)) {
        let replication = spec.replication.min(brokers);
        let mut changes = vec![Change::Created {
            partitions: spec.partitions,
            replication,
        }];
        if replication < spec.replication {
            changes.push(Change::Kept(format!(
                "replication {} wanted, the cluster has {brokers} broker(s)",
                spec.replication
            )));
        }
        to_create.push((spec, replication));
        report.push((spec.name.clone(), changes));
    }
    if !dry_run && !to_create.is_empty() {
        let new_topics: Vec<NewTopic<'_>> = to_create
            .iter()
            .map(|(spec, replication)| {
                spec.config.iter().fold(
                    NewTopic::new(
                        &spec.name,
                        spec.partitions,
                        TopicReplication::Fixed(*replication),
                    ),
                    |t, (k, v)| t.set(k, v),
                )
            })
            .collect();
        for result in admin.create_topics(new_topics.iter(), &opts).await? {
            if let Err((topic, code)) = result {
                // Another apply may have raced us to it: that is success too.
                if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                    return Err(TopicsError::Topic {
                        topic,
                        error: code.to_string(),
                    });
                }
            }
        }
    }

    let present: Vec<&TopicSpec> = specs
        .iter()
        .filter(|s| existing.contains_key(&s.name))
        .collect();
    if present.is_empty() {
        return Ok(report);
    }
    let resources: Vec<ResourceSpecifier<'_>> = present
        .iter()
        .map(|s| ResourceSpecifier::Topic(&s.name))
        .collect();
    let described = admin.describe_configs(resources.iter(), &opts).await?;
    for (spec, desc) in present.iter().zip(described) {
        let mut changes = Vec::new();
        let have = existing.get(&spec.name).copied().unwrap_or(0);
        if have < spec.partitions {
            changes.push(Change::Partitions {
                from: have,
                to: spec.partitions,
            });
            if !dry_run {
                let np =
                    NewPartitions::new(&spec.name, usize::try_from(spec.partitions).unwrap_or(1));
                for r in admin.create_partitions([&np], &opts).await? {
                    if let Err((topic, code)) = r {
                        return Err(TopicsError::Topic {
                            topic,
                            error: code.to_string(),
                        });
                    }
                }
            }
        } else if have > spec.partitions {
            changes.push(Change::Kept(format!(
                "{have} partitions, {} declared (Kafka cannot shrink a topic)",
                spec.partitions
            )));
        }
        let current = match desc {
            Ok(resource) => {
                if !matches!(resource.specifier, OwnedResourceSpecifier::Topic(_)) {
                    continue;
                }
                resource
                    .entries
                    .into_iter()
                    .map(|e| (e.name, e.value))
                    .collect::<BTreeMap<_, _>>()
            }
            Err(code) => {
                return Err(TopicsError::Topic {
                    topic: spec.name.clone(),
                    error: code.to_string(),
                })
            }
        };
        let mut differs = false;
        for (k, v) in &spec.config {
            let now = current.get(k).cloned().flatten();
            if now.as_deref() != Some(v.as_str()) {
                differs = true;
                changes.push(Change::Config {
                    key: k.clone(),
                    from: now,
                    to: v.clone(),
                });
            }
        }
        if differs && !dry_run {
            let alter = spec.config.iter().fold(
                AlterConfig::new(ResourceSpecifier::Topic(&spec.name)),
                |a, (k, v)| a.set(k, v),
            );
            for r in admin.alter_configs([&alter], &opts).await? {
                if let Err((_, code)) = r {
                    return Err(TopicsError::Topic {
                        topic: spec.name.clone(),
                        error: code.to_string(),
                    });
                }
            }
        }
        if changes.is_empty() {
            changes.push(Change::Unchanged);
        }
        report.push((spec.name.clone(), changes));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_declarations_parse_and_cover_the_contract_topics() {
        let specs = match parse(TOPICS_TOML) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        for want in [
            "telemetry.raw",
            "telemetry.clean",
            "telemetry.dead-letter",
            "aggregates",
            "commands",
            "model-state",
        ] {
            assert!(names.contains(&want), "{want} missing");
        }
        let dl = specs.iter().find(|s| s.name == "telemetry.dead-letter");
        let raw = specs.iter().find(|s| s.name == "telemetry.raw");
        let max = |s: Option<&TopicSpec>| {
            s.and_then(|s| s.config.get("max.message.bytes"))
                .and_then(|v| v.parse::<u64>().ok())
        };
        assert!(max(raw) >= Some(1_100_000), "raw carries ~1 MB payloads");
        assert!(
            max(dl) > max(raw),
            "every raw record fits in the dead-letter topic"
        );
        let state = specs
            .iter()
            .find(|s| s.name == "model-state")
            .map(|s| s.config.get("cleanup.policy").cloned());
        assert_eq!(state, Some(Some("compact".into())));
    }

    #[test]
    fn prefix_and_role_overrides_rename_topics() {
        let specs = parse(TOPICS_TOML).unwrap_or_default();
        let topics = TopicsConfig {
            prefix: "t1.".into(),
            raw: "metrics".into(),
            ..TopicsConfig::default()
        };
        let resolved = resolve(&specs, &topics);
        assert!(resolved.iter().any(|s| s.name == "t1.metrics"));
        assert!(resolved.iter().any(|s| s.name == "t1.telemetry.clean"));
        assert!(resolved.iter().any(|s| s.name == "t1.commands"));
    }
}
