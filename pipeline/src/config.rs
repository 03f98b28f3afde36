//! `ebb.toml`: one typed config for `run`, `demo` and `replay`, validated once at start-up.
//!
//! Precedence, lowest first: built-in defaults (written on each field), the file named by
//! `--config` or `EBB_CONFIG`, `EBB_*` environment variables, command-line flags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::demo::DemoConfig;
use crate::sql::SqlConfig;
use crate::stages::filter::FilterConfig;
use crate::stages::window::WindowConfig;

/// A configuration problem, always naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("config key {key}: {why}")]
    Invalid {
        /// Dotted key, e.g. `filter.outliers.window`.
        key: String,
        /// What is wrong.
        why: String,
    },
}

/// A secret string: deserialised like a string, never printed.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret's bytes, for the one place that needs them.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// librdkafka properties passed to every client as they are, e.g.
    /// `"bootstrap.servers" = "127.0.0.1:9092"` (the default), `"security.protocol"`, ...
    pub kafka: BTreeMap<String, String>,
    /// The schema registry.
    pub registry: RegistryConfig,
    /// Topic names.
    pub topics: TopicsConfig,
    /// The HTTP endpoint (metrics, health).
    pub http: HttpConfig,
    /// How stages are wired to Kafka.
    pub runner: RunnerConfig,
    /// The filter stage.
    pub filter: FilterConfig,
    /// The window stage and its store.
    pub window: WindowConfig,
    /// SQL over the store: `ebb sql`, `POST /sql`, the PostgreSQL protocol.
    pub sql: SqlConfig,
    /// The anomaly detectors and the forecaster (`ebb eval` reads them too).
    pub models: crate::stages::models::ModelsConfig,
    /// The scale and restart policies.
    pub decide: crate::stages::decide::DecideConfig,
    /// The actuators that carry commands out.
    pub actuate: crate::actuators::ActuateConfig,
    /// The simulated service of `ebb replay`.
    pub replay: crate::replay::ReplayConfig,
    /// `ebb demo` and its synthetic telemetry.
    pub demo: DemoConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            kafka: BTreeMap::from([(
                "bootstrap.servers".to_string(),
                "127.0.0.1:9092".to_string(),
            )]),
            registry: RegistryConfig::default(),
            topics: TopicsConfig::default(),
            http: HttpConfig::default(),
            runner: RunnerConfig::default(),
            filter: FilterConfig::default(),
            window: WindowConfig::default(),
            sql: SqlConfig::default(),
            models: Default::default(),
            decide: Default::default(),
            actuate: Default::default(),
            replay: Default::default(),
            demo: DemoConfig::default(),
        }
    }
}

/// `[registry]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Base URL of a Confluent-compatible registry; `EBB_REGISTRY_URL` overrides. Without one,
    /// Avro records cannot be decoded and are dead-lettered as `unknown_schema_id`. Default none.
    pub url: Option<String>,
    /// Per-request timeout. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            url: None,
            timeout: Duration::from_secs(5),
        }
    }
}

/// `[topics]`: the names stages read and write. Declarations (partitions, retention) live
/// in `topics/topics.toml`; these are the names, so one cluster can hold several pipelines.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    /// Put in front of every topic name (e.g. `staging.`); `EBB_TOPIC_PREFIX` overrides.
    /// Default empty.
    pub prefix: String,
    /// Raw telemetry. Default `telemetry.raw`.
    pub raw: String,
    /// Clean telemetry. Default `telemetry.clean`.
    pub clean: String,
    /// Dead letters. Default `telemetry.dead-letter`.
    pub dead_letter: String,
    /// Records after their window's grace. Default `telemetry.late`.
    pub late: String,
    /// Window aggregates. Default `aggregates`.
    pub aggregates: String,
    /// Anomaly events. Default `anomalies`.
    pub anomalies: String,
    /// Forecasts. Default `forecasts`.
    pub forecasts: String,
    /// Compacted model snapshots. Default `model-state`.
    pub model_state: String,
    /// Scale and restart commands. Default `commands`.
    pub commands: String,
    /// What actuators did with each command. Default `actuations`.
    pub actuations: String,
    /// The decide stage's compacted state changelog. Default `decide-state`.
    pub decide_state: String,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            prefix: String::new(),
            raw: "telemetry.raw".into(),
            clean: "telemetry.clean".into(),
            dead_letter: "telemetry.dead-letter".into(),
            late: "telemetry.late".into(),
            aggregates: "aggregates".into(),
            anomalies: "anomalies".into(),
            forecasts: "forecasts".into(),
            model_state: "model-state".into(),
            commands: "commands".into(),
            actuations: "actuations".into(),
            decide_state: "decide-state".into(),
        }
    }
}

impl TopicsConfig {
    /// The full name of a topic, prefix included.
    pub fn name(&self, base: &str) -> String {
        format!("{}{}", self.prefix, base)
    }
}

/// `[http]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Serve `/metrics` and `/healthz`. Default on.
    pub enabled: bool,
    /// Listen address; `EBB_HTTP_LISTEN` overrides. Default `127.0.0.1:9470`.
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:9470".into(),
        }
    }
}

/// `[runner]`: the consume-process-produce loop.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunnerConfig {
    /// Records read per poll round before delivery reports are served. Default 2000.
    pub batch_size: usize,
    /// Records processed but not yet acknowledged at most; beyond it the stage stops reading
    /// until the broker catches up. Bounds memory and the re-reads after a crash. Default 20000.
    pub max_in_flight: usize,
    /// How long a poll waits for the first record of a batch. Default 100 ms.
    #[serde(with = "humantime_serde")]
    pub poll_timeout: Duration,
    /// How long shutdown may wait for in-flight outputs before giving up (uncommitted input is
    /// then read again on restart; nothing is lost). Default 30 s.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// First back-off when outputs fail or the registry is down; doubles up to 30 s. Default 500 ms.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// librdkafka's `fetch.wait.max.ms` for stage consumers (unless `[kafka]` sets it).
    /// Unset, librdkafka's 500 ms: a broker answers as soon as data arrives anyway. The mock
    /// cluster answers only when the wait runs out, so the demo sets 10 ms.
    #[serde(default, with = "humantime_serde")]
    pub fetch_wait: Option<Duration>,
    /// librdkafka's `fetch.queue.backoff.ms` for stage consumers (unless `[kafka]` sets it):
    /// how long a partition whose prefetch queue reached `queued.min.messages` waits before it
    /// is fetched again. librdkafka's 1 s left a stage that consumes slower than the broker
    /// sends idle for most of each second once it had drained the queue (a consume-and-produce
    /// loop ran at 270k records/s with it, 660k–730k without). Default 10 ms.
    #[serde(with = "humantime_serde")]
    pub fetch_queue_backoff: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            batch_size: 2000,
            max_in_flight: 20_000,
            poll_timeout: Duration::from_millis(100),
            shutdown_timeout: Duration::from_secs(30),
            retry_backoff: Duration::from_millis(500),
            fetch_wait: None,
            fetch_queue_backoff: Duration::from_millis(10),
        }
    }
}

/// An environment lookup, injected so tests do not touch the process environment.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

impl Config {
    /// Parses a config from TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Loads defaults, then the file (if any), then `EBB_*` variables from `env`, and validates.
    pub fn load(path: Option<&Path>, env: Env<'_>) -> Result<Self, ConfigError> {
        let path = path
            .map(Path::to_path_buf)
            .or_else(|| env("EBB_CONFIG").map(PathBuf::from));
        let mut config = match &path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.clone(),
                    source,
                })?;
                Self::from_toml(&text, p)?
            }
            None => Self::default(),
        };
        config.apply_env(env);
        config.validate()?;
        Ok(config)
    }

    /// Applies `EBB_BROKERS`, `EBB_REGISTRY_URL`, `EBB_ANON_KEY`, `EBB_TOPIC_PREFIX`,
    /// `EBB_HTTP_LISTEN`, `EBB_PG_LISTEN`, `EBB_DECIDE_TRANSACTIONAL_ID` and
    /// `EBB_WEBHOOK_SECRET`.
    pub fn apply_env(&mut self, env: Env<'_>) {
        if let Some(v) = env("EBB_BROKERS") {
            self.kafka.insert("bootstrap.servers".into(), v);
        }
        if let Some(v) = env("EBB_REGISTRY_URL") {
            self.registry.url = Some(v);
        }
        if let Some(v) = env("EBB_ANON_KEY") {
            self.filter.anonymize.key = Some(Secret::new(v));
        }
        if let Some(v) = env("EBB_TOPIC_PREFIX") {
            self.topics.prefix = v;
        }
        if let Some(v) = env("EBB_HTTP_LISTEN") {
            self.http.listen = v;
        }
        if let Some(v) = env("EBB_PG_LISTEN") {
            self.sql.pg_listen = v;
        }
        if let Some(v) = env("EBB_DECIDE_TRANSACTIONAL_ID") {
            self.decide.transactional_id = v;
        }
        if let Some(v) = env("EBB_WEBHOOK_SECRET") {
            self.actuate.webhook.secret = Some(Secret::new(v));
        }
    }

    /// Checks everything serde cannot; the first problem is returned, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| {
            Err(ConfigError::Invalid {
                key: key.into(),
                why: why.into(),
            })
        };
        match self.kafka.get("bootstrap.servers") {
            Some(b) if !b.trim().is_empty() => {}
            _ => {
                return bad(
                    "kafka.\"bootstrap.servers\"",
                    "must name at least one broker (or set EBB_BROKERS)",
                )
            }
        }
        if let Some(url) = &self.registry.url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return bad("registry.url", "must start with http:// or https://");
            }
        }
        if self.registry.timeout.is_zero() {
            return bad("registry.timeout", "must be positive");
        }
        for (key, name) in [
            ("topics.raw", &self.topics.raw),
            ("topics.clean", &self.topics.clean),
            ("topics.dead_letter", &self.topics.dead_letter),
            ("topics.late", &self.topics.late),
            ("topics.aggregates", &self.topics.aggregates),
            ("topics.anomalies", &self.topics.anomalies),
            ("topics.forecasts", &self.topics.forecasts),
            ("topics.model_state", &self.topics.model_state),
            ("topics.commands", &self.topics.commands),
            ("topics.actuations", &self.topics.actuations),
            ("topics.decide_state", &self.topics.decide_state),
        ] {
            let full = self.topics.name(name);
            if full.is_empty()
                || full.len() > 249
                || !full
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                return bad(
                    key,
                    "a Kafka topic name is 1-249 characters of [a-zA-Z0-9._-]",
                );
            }
        }
        if self.http.enabled && self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(
                "http.listen",
                "must be an address:port such as 127.0.0.1:9470",
            );
        }
        if self.runner.batch_size == 0 {
            return bad("runner.batch_size", "must be positive");
        }
        if self.runner.max_in_flight == 0 {
            return bad("runner.max_in_flight", "must be positive");
        }
        if self.runner.poll_timeout.is_zero() {
            return bad("runner.poll_timeout", "must be positive");
        }
        if self.runner.fetch_queue_backoff > Duration::from_secs(300) {
            // librdkafka's own limit; past it every stage consumer would fail to start.
            return bad("runner.fetch_queue_backoff", "must be at most 300s");
        }
        self.filter.validate()?;
        self.window.validate()?;
        self.sql.validate()?;
        self.models.validate()?;
        let signals: Vec<&str> = self
            .models
            .signals
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        self.decide.validate(&signals)?;
        self.actuate.validate()?;
        self.replay.validate()?;
        self.demo.validate()?;
        Ok(())
    }

    /// Sets the brokers (e.g. from `--brokers`).
    pub fn set_brokers(&mut self, brokers: &str) {
        self.kafka
            .insert("bootstrap.servers".into(), brokers.to_string());
    }

    /// The configured brokers.
    pub fn brokers(&self) -> &str {
        self.kafka
            .get("bootstrap.servers")
            .map_or("", String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::default();
        assert!(c.validate().is_ok());
        assert_eq!(c.brokers(), "127.0.0.1:9092");
        assert_eq!(c.filter.max_payload_bytes, 65_536);
        assert_eq!(c.filter.time.max_age, Duration::from_secs(7 * 86_400));
    }

    #[test]
    fn unknown_keys_fail_naming_the_key() {
        let err = Config::from_toml("[filter]\nmax_paylod_bytes = 3\n", Path::new("ebb.toml"));
        let msg = err
            .map(|_| ())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("max_paylod_bytes"), "{msg}");
    }

    #[test]
    fn invalid_values_fail_naming_the_key() {
        let c = Config::from_toml("[filter.outliers]\nwindow = 1\n", Path::new("x.toml"));
        let msg = c
            .and_then(|c| c.validate())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("filter.outliers.window"), "{msg}");
        let c = Config::from_toml(
            "[filter.time]\nlocal_zone = \"Mars/Base\"\n",
            Path::new("x.toml"),
        );
        let msg = c
            .and_then(|c| c.validate())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("filter.time.local_zone"), "{msg}");
        let c = Config::from_toml("[filter.time]\nmax_age = \"soon\"\n", Path::new("x.toml"));
        assert!(c.is_err());
        let c = Config::from_toml(
            "[runner]\nfetch_queue_backoff = \"10m\"\n",
            Path::new("x.toml"),
        );
        let msg = c
            .and_then(|c| c.validate())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("runner.fetch_queue_backoff"), "{msg}");
    }

    #[test]
    fn environment_overrides_file_and_secret_is_never_printed() {
        let env = |k: &str| match k {
            "EBB_BROKERS" => Some("10.1.1.1:9092".to_string()),
            "EBB_ANON_KEY" => Some("hunter2-hunter2".to_string()),
            _ => None,
        };
        let mut c = Config::from_toml(
            "[kafka]\n\"bootstrap.servers\" = \"a:1\"\n",
            Path::new("x.toml"),
        )
        .unwrap_or_default();
        c.apply_env(&env);
        assert_eq!(c.brokers(), "10.1.1.1:9092");
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2"),
            "secret leaked into Debug output"
        );
        assert!(Config::load(None, &no_env).is_ok());
    }

    #[test]
    fn durations_read_as_human_text() {
        let c = Config::from_toml(
            "[filter.time]\nmax_age = \"30d\"\nmax_future = \"90s\"\n",
            Path::new("x.toml"),
        )
        .unwrap_or_default();
        assert_eq!(c.filter.time.max_age, Duration::from_secs(30 * 86_400));
        assert_eq!(c.filter.time.max_future, Duration::from_secs(90));
    }
}
