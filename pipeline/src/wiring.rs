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
use crate::runner::{AvroSupport, RunContext};
use crate::schemas;
use crate::stages::filter::{FilterStage, CLEAN, REASONS};

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
    let cache = SchemaCache::default();
    let avro = registry(config)?.map(|registry| AvroSupport {
        registry,
        cache: cache.clone(),
        outputs: schemas::filter_outputs(&config.topics),
        handle,
    });
    let stage = FilterStage::new(
        config.filter.clone(),
        key,
        AvroCodec { schemas: cache },
        clock.now(),
    );
    let topics = &config.topics;
    let ctx = RunContext {
        kafka: config.kafka.clone(),
        group_id: config.filter.group_id.clone(),
        input_topic: topics.name(&topics.raw),
        outputs: HashMap::from([(CLEAN, topics.name(&topics.clean))]),
        dead_letter_topic: topics.name(&topics.dead_letter),
        settings: config.runner.clone(),
        metrics,
        clock,
        shutdown,
        avro,
    };
    Ok((stage, ctx))
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

/// Serves `/metrics` and `/healthz` on `listener` until the returned handle is dropped.
pub fn serve_http(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) -> HttpServer {
    let stop = Arc::new(tokio::sync::Notify::new());
    let notified = stop.clone();
    tokio::spawn(async move {
        let router = crate::metrics::router(metrics);
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
