//! Builds stages and their runner contexts from one [`Config`]: the single place that
//! `ebb run`, `ebb demo` and the tests assemble the pipeline, so they cannot drift apart.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use crate::clock::Clock;
use crate::codec::registry::{Registry, RegistryError};
use crate::codec::{AvroCodec, SchemaCache};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::runner::{AvroSupport, OutputSchema, RunContext};
use crate::schemas;
use crate::sql::store::WindowStore;
use crate::sql::SqlEngine;
use crate::stages::decide::{
    DecideInputs, DecideStage, COMMANDS as DECIDE_COMMANDS, STATE as DECIDE_STATE,
};
use crate::stages::filter::{FilterStage, CLEAN, REASONS};
use crate::stages::models::{ModelTables, ModelsStage, ANOMALIES, FORECASTS, STATE};
use crate::stages::window::aggregate::AggregateError;
use crate::stages::window::{WindowStage, AGGREGATES, LATE};

/// Why a stage could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum WiringError {
    /// The registry URL is unusable.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// DataFusion could not start.
    #[error(transparent)]
    Aggregate(#[from] AggregateError),
}

/// The HMAC key for anonymisation: `EBB_ANON_KEY` / `filter.anonymize.key`, or else a random
/// per-process key (with a warning, since pseudonyms then change on restart).
pub fn anonymization_key(config: &Config, random: impl FnOnce() -> [u8; 32]) -> Vec<u8> {
    match &config.filter.anonymize.key {
        Some(key) => {
            if key.expose().len() < 16 {
                warn!("the anonymisation key is shorter than 16 bytes: pseudonyms are easier to reverse");
            }
            key.expose().to_vec()
        }
        None => {
            warn!("EBB_ANON_KEY is not set: using a random key for this process; pseudonyms will differ after a restart");
            random().to_vec()
        }
    }
}

/// Registry client and schema cache, if a registry is configured.
pub fn registry(config: &Config) -> Result<Option<Registry>, RegistryError> {
    config
        .registry
        .url
        .as_deref()
        .map(|url| Registry::new(url, config.registry.timeout))
        .transpose()
}

/// The schema cache a stage's codec reads and, when a registry is configured, the runner's
/// access to it (it registers `outputs` at start-up and fills the cache as ids appear).
fn avro_support(
    config: &Config,
    outputs: Vec<OutputSchema>,
    handle: tokio::runtime::Handle,
) -> Result<(SchemaCache, Option<AvroSupport>), RegistryError> {
    let cache = SchemaCache::default();
    let avro = registry(config)?.map(|registry| AvroSupport {
        registry,
        cache: cache.clone(),
        outputs,
        handle,
    });
    Ok((cache, avro))
}

/// What every stage's context shares: brokers, dead-letter topic, loop settings, metrics,
/// clock, shutdown flag and registry access. Each stage adds its outputs (and state topic).
fn context(
    config: &Config,
    group_id: &str,
    input: &str,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    shutdown: Arc<AtomicBool>,
    avro: Option<AvroSupport>,
) -> RunContext {
    let topics = &config.topics;
    RunContext {
        kafka: config.kafka.clone(),
        group_id: group_id.to_string(),
        input_topics: vec![topics.name(input)],
        outputs: HashMap::new(),
        dead_letter_topic: topics.name(&topics.dead_letter),
        settings: config.runner.clone(),
        metrics,
        clock,
        shutdown,
        avro,
        state_topic: None,
        crash_before_commit: None,
    }
}

/// The filter stage and the context that wires it to Kafka.
pub fn filter(
    config: &Config,
    key: &[u8],
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    shutdown: Arc<AtomicBool>,
    handle: tokio::runtime::Handle,
) -> Result<(FilterStage, RunContext), RegistryError> {
    metrics.declare_reasons("filter", REASONS);
    let (cache, avro) = avro_support(config, schemas::filter_outputs(&config.topics), handle)?;
    let stage = FilterStage::new(
        config.filter.clone(),
        key,
        AvroCodec { schemas: cache },
        clock.now(),
    );
    let topics = &config.topics;
    let ctx = RunContext {
        outputs: HashMap::from([(CLEAN, topics.name(&topics.clean))]),
        ..context(
            config,
            &config.filter.group_id,
            &topics.raw,
            metrics,
            clock,
            shutdown,
            avro,
        )
    };
    Ok((stage, ctx))
}

/// The window stage and the context that wires it to Kafka. Closed windows also go to
/// `store`, when given, for SQL.
pub fn window(
    config: &Config,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    shutdown: Arc<AtomicBool>,
    handle: tokio::runtime::Handle,
    store: Option<Arc<WindowStore>>,
) -> Result<(WindowStage, RunContext), WiringError> {
    metrics.declare_reasons("window", crate::stages::window::REASONS);
    let (cache, avro) = avro_support(config, schemas::window_outputs(&config.topics), handle)?;
    let stage = WindowStage::new(
        config.window.clone(),
        AvroCodec { schemas: cache },
        store,
        clock.now(),
    )?;
    let topics = &config.topics;
    let ctx = RunContext {
        outputs: HashMap::from([
            (AGGREGATES, topics.name(&topics.aggregates)),
            (LATE, topics.name(&topics.late)),
        ]),
        ..context(
            config,
            &config.window.group_id,
            &topics.clean,
            metrics,
            clock,
            shutdown,
            avro,
        )
    };
    Ok((stage, ctx))
}

/// The models stage and the context that wires it to Kafka (aggregates in; anomalies,
/// forecasts and snapshots out; snapshots read back on assignment). Anomalies and forecasts
/// also go to `tables`, when given, for SQL.
pub fn models(
    config: &Config,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    shutdown: Arc<AtomicBool>,
    handle: tokio::runtime::Handle,
    tables: Option<ModelTables>,
) -> Result<(ModelsStage, RunContext), WiringError> {
    metrics.declare_reasons("models", crate::stages::models::REASONS);
    metrics.declare_events("models", crate::stages::models::EVENTS);
    // Anomalies and forecasts leave in the format their window's aggregates came in.
    let (cache, avro) = avro_support(config, schemas::models_outputs(&config.topics), handle)?;
    let mut stage = ModelsStage::new(config.models.clone(), AvroCodec { schemas: cache });
    if let Some(tables) = tables {
        stage = stage.with_tables(tables);
    }
    let topics = &config.topics;
    let ctx = RunContext {
        outputs: HashMap::from([
            (ANOMALIES, topics.name(&topics.anomalies)),
            (FORECASTS, topics.name(&topics.forecasts)),
            (STATE, topics.name(&topics.model_state)),
        ]),
        state_topic: Some(topics.name(&topics.model_state)),
        ..context(
            config,
            &config.models.group_id,
            &topics.aggregates,
            metrics,
            clock,
            shutdown,
            avro,
        )
    };
    Ok((stage, ctx))
}

/// The decide stage and the context that wires it to Kafka: aggregates, forecasts and
/// anomalies in (co-partitioned by service); commands and its state changelog out, in
/// transactions (see [`crate::runner::run_transactional`]).
pub fn decide(
    config: &Config,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    shutdown: Arc<AtomicBool>,
    handle: tokio::runtime::Handle,
    store: Option<Arc<WindowStore>>,
) -> Result<(DecideStage, RunContext), WiringError> {
    metrics.declare_reasons("decide", crate::stages::decide::REASONS);
    let (cache, avro) = avro_support(config, schemas::decide_outputs(&config.topics), handle)?;
    let topics = &config.topics;
    let inputs = DecideInputs {
        aggregates: topics.name(&topics.aggregates),
        forecasts: topics.name(&topics.forecasts),
        anomalies: topics.name(&topics.anomalies),
    };
    let input_topics = vec![
        inputs.aggregates.clone(),
        inputs.forecasts.clone(),
        inputs.anomalies.clone(),
    ];
    let mut stage = DecideStage::new(
        config.decide.clone(),
        &config.models.signals,
        inputs,
        AvroCodec { schemas: cache },
    )
    .expecting_forecasts_every(config.models.forecast_step);
    if let Some(store) = store {
        stage = stage.with_store(store);
    }
    let ctx = RunContext {
        input_topics,
        outputs: HashMap::from([
            (DECIDE_COMMANDS, topics.name(&topics.commands)),
            (DECIDE_STATE, topics.name(&topics.decide_state)),
        ]),
        state_topic: Some(topics.name(&topics.decide_state)),
        ..context(
            config,
            &config.decide.group_id,
            &topics.aggregates,
            metrics,
            clock,
            shutdown,
            avro,
        )
    };
    Ok((stage, ctx))
}

/// An actuator over `driver` and the context that wires it to the commands topic: one
/// consumer group per driver, outcomes to `actuations`, read back on assignment so a
/// command is never carried out twice. Avro commands are read through the registry.
pub fn actuator(
    config: &Config,
    driver: Box<dyn crate::actuators::Driver>,
    dry_run: bool,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    shutdown: Arc<AtomicBool>,
    handle: tokio::runtime::Handle,
) -> Result<(crate::actuators::Actuator, RunContext), RegistryError> {
    metrics.declare_reasons("actuate", crate::actuators::REASONS);
    let (cache, avro) = avro_support(config, Vec::new(), handle)?;
    let topics = &config.topics;
    let group = format!("{}-{}", config.actuate.group_id, driver.name());
    let stage =
        crate::actuators::Actuator::new(driver, dry_run, config.actuate.max_age, clock.clone())
            .reading_avro(AvroCodec { schemas: cache });
    let ctx = RunContext {
        outputs: HashMap::from([(
            crate::actuators::ACTUATIONS,
            topics.name(&topics.actuations),
        )]),
        state_topic: Some(topics.name(&topics.actuations)),
        ..context(
            config,
            &group,
            &topics.commands,
            metrics,
            clock,
            shutdown,
            avro,
        )
    };
    Ok((stage, ctx))
}

/// The tables SQL reads and the engine over them.
#[derive(Debug, Clone)]
pub struct Sql {
    /// Closed windows, filled by the window stage.
    pub windows: Arc<WindowStore>,
    /// Anomalies and forecasts, filled by the models stage.
    pub models: ModelTables,
    /// Commands, filled by the decide stage.
    pub commands: Arc<WindowStore>,
    /// The session over all of them.
    pub engine: Arc<SqlEngine>,
}

/// The stores of windows, anomalies, forecasts and commands, and the SQL engine over them.
pub fn sql(config: &Config, anon_key: Option<&[u8]>) -> Result<Sql, crate::sql::SqlError> {
    let store = &config.window.store;
    let windows = Arc::new(WindowStore::windows(store.clone()));
    let models = ModelTables {
        anomalies: Arc::new(WindowStore::anomalies(store.clone())),
        forecasts: Arc::new(WindowStore::forecasts(store.clone())),
    };
    let commands = Arc::new(WindowStore::commands(store.clone()));
    let engine = SqlEngine::new(
        &[
            windows.clone(),
            models.anomalies.clone(),
            models.forecasts.clone(),
            commands.clone(),
        ],
        anon_key,
        config.sql.clone(),
    )?;
    Ok(Sql {
        windows,
        models,
        commands,
        engine: Arc::new(engine),
    })
}

/// The HTTP endpoint, served until this is dropped.
#[derive(Debug)]
pub struct HttpServer {
    stop: Arc<tokio::sync::Notify>,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        // notify_one keeps a permit, so a stop before the server first waits is not lost.
        self.stop.notify_one();
    }
}

/// Serves `/metrics`, `/healthz` and, with an engine, `POST /sql` on `listener` until the
/// returned handle is dropped.
pub fn serve_http(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    sql: Option<Arc<SqlEngine>>,
) -> HttpServer {
    let stop = Arc::new(tokio::sync::Notify::new());
    let notified = stop.clone();
    tokio::spawn(async move {
        let mut router = crate::metrics::router(metrics);
        if let Some(engine) = sql {
            router = router.merge(crate::sql::http::router(engine));
        }
        if let Err(e) =
            crate::metrics::serve_on(listener, router, async move { notified.notified().await })
                .await
        {
            warn!(error = %e, "http endpoint stopped");
        }
    });
    HttpServer { stop }
}

/// Binds the HTTP endpoint if enabled. In the demo a taken port is a warning (the pipeline
/// still runs); for `ebb run` it is an error, since an unscraped stage is a blind one.
pub async fn bind_http(config: &Config) -> std::io::Result<Option<tokio::net::TcpListener>> {
    if !config.http.enabled {
        return Ok(None);
    }
    let addr: std::net::SocketAddr = config.http.listen.parse().map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("http.listen: {e}"),
        )
    })?;
    tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpListener::bind(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "binding http.listen timed out",
            )
        })?
        .map(Some)
}
