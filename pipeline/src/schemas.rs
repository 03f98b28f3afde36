//! The Avro schemas in `schemas/`, and `ebb schemas register`.

use crate::codec::avro::{
    EventSchema, AGGREGATES_KEY, AGGREGATES_SCHEMA, CLEAN_KEY, CLEAN_SCHEMA, RAW_SCHEMA,
};
use crate::codec::registry::{Registry, RegistryError};
use crate::config::TopicsConfig;
use crate::runner::OutputSchema;

/// A schema registered for a topic's values (TopicNameStrategy: subject `<topic>-value`).
#[derive(Debug, Clone)]
pub struct TopicSchema {
    /// Topic (prefix included).
    pub topic: String,
    /// Avro schema text.
    pub schema: &'static str,
}

impl TopicSchema {
    /// The registry subject.
    pub fn subject(&self) -> String {
        format!("{}-value", self.topic)
    }
}

/// The schemas of every topic whose values are Avro-framed. (Dead letters are the original
/// bytes, so their topic has no value schema; `schemas/telemetry.dead-letter.avsc` describes
/// them as ebb reports them.)
pub fn topic_schemas(topics: &TopicsConfig) -> Vec<TopicSchema> {
    vec![
        TopicSchema {
            topic: topics.name(&topics.raw),
            schema: RAW_SCHEMA,
        },
        TopicSchema {
            topic: topics.name(&topics.clean),
            schema: CLEAN_SCHEMA,
        },
        TopicSchema {
            topic: topics.name(&topics.aggregates),
            schema: AGGREGATES_SCHEMA,
        },
        TopicSchema {
            topic: topics.name(&topics.anomalies),
            schema: EventSchema::Anomalies.text(),
        },
        TopicSchema {
            topic: topics.name(&topics.forecasts),
            schema: EventSchema::Forecasts.text(),
        },
        TopicSchema {
            topic: topics.name(&topics.commands),
            schema: EventSchema::Commands.text(),
        },
    ]
}

fn event_output(kind: EventSchema, topic: String) -> OutputSchema {
    OutputSchema {
        key: kind.key(),
        subject: format!("{topic}-value"),
        schema: kind.text(),
    }
}

/// The models stage's output schemas (anomalies, forecasts), for the runner to register.
pub fn models_outputs(topics: &TopicsConfig) -> Vec<OutputSchema> {
    vec![
        event_output(EventSchema::Anomalies, topics.name(&topics.anomalies)),
        event_output(EventSchema::Forecasts, topics.name(&topics.forecasts)),
    ]
}

/// The decide stage's output schema (commands), for the runner to register.
pub fn decide_outputs(topics: &TopicsConfig) -> Vec<OutputSchema> {
    vec![event_output(
        EventSchema::Commands,
        topics.name(&topics.commands),
    )]
}

/// The window stage's output schema, for the runner to register.
pub fn window_outputs(topics: &TopicsConfig) -> Vec<OutputSchema> {
    vec![OutputSchema {
        key: AGGREGATES_KEY,
        subject: format!("{}-value", topics.name(&topics.aggregates)),
        schema: AGGREGATES_SCHEMA,
    }]
}

/// The filter's output schema, for the runner to register.
pub fn filter_outputs(topics: &TopicsConfig) -> Vec<OutputSchema> {
    vec![OutputSchema {
        key: CLEAN_KEY,
        subject: format!("{}-value", topics.name(&topics.clean)),
        schema: CLEAN_SCHEMA,
    }]
}

/// What registering one subject did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// Subject.
    pub subject: String,
    /// Id the registry gave.
    pub id: u32,
    /// `new subject`, or `compatible` with what was there.
    pub compatibility: &'static str,
}

/// Checks each schema's compatibility with its subject, then registers it.
/// Stops at the first incompatible schema, naming it.
pub async fn register_all(
    registry: &Registry,
    schemas: &[TopicSchema],
) -> Result<Vec<Registered>, RegistryError> {
    let mut out = Vec::new();
    for s in schemas {
        let subject = s.subject();
        let compatibility = match registry.is_compatible(&subject, s.schema).await? {
            None => "new subject",
            Some(true) => "compatible",
            Some(false) => {
                return Err(RegistryError::Refused(format!(
                    "{subject}: the schema is not compatible with the registered versions"
                )))
            }
        };
        let id = registry.register(&subject, s.schema).await?;
        out.push(Registered {
            subject,
            id,
            compatibility,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_schema_parses() {
        for text in [
            RAW_SCHEMA,
            CLEAN_SCHEMA,
            AGGREGATES_SCHEMA,
            EventSchema::Anomalies.text(),
            EventSchema::Forecasts.text(),
            EventSchema::Commands.text(),
            include_str!("../../schemas/telemetry.dead-letter.avsc"),
        ] {
            assert!(apache_avro::Schema::parse_str(text).is_ok(), "{text}");
        }
    }

    #[test]
    fn subjects_follow_the_topic_name_strategy_with_prefix() {
        let topics = TopicsConfig {
            prefix: "x.".into(),
            ..TopicsConfig::default()
        };
        let subjects: Vec<String> = topic_schemas(&topics)
            .iter()
            .map(TopicSchema::subject)
            .collect();
        assert_eq!(
            subjects,
            vec![
                "x.telemetry.raw-value",
                "x.telemetry.clean-value",
                "x.aggregates-value",
                "x.anomalies-value",
                "x.forecasts-value",
                "x.commands-value"
            ]
        );
    }
}
