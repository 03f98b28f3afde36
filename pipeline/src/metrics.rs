//! Prometheus metrics for every stage, and the HTTP endpoint that serves them.
//!
//! Every count the runner keeps is kept here once: the `/metrics` page, the demo's live
//! summary and its final JSON line all read the same numbers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels naming a stage.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    /// Stage name.
    pub stage: String,
}

/// Labels naming a stage and a dead-letter reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Stage name.
    pub stage: String,
    /// Reason.
    pub reason: String,
}

/// Labels naming a stage and an output.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutputLabel {
    /// Stage name.
    pub stage: String,
    /// Output name.
    pub output: String,
}

/// Labels naming a stage and an event it noted about its own state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    /// Stage name.
    pub stage: String,
    /// Event.
    pub event: String,
}

/// Labels naming a partition a stage consumes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    /// Stage name.
    pub stage: String,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: String,
}

fn latency_histogram() -> Histogram {
    // 100 µs to ~13 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// Counts one stage keeps, readable without scraping.
#[derive(Debug, Default)]
pub struct StageCounts {
    /// Records consumed.
    pub records_in: AtomicU64,
    /// Records emitted to outputs (acknowledged).
    pub records_out: AtomicU64,
    /// Records emitted, by output name (acknowledged).
    pub by_output: Mutex<BTreeMap<String, u64>>,
    /// Dead letters by reason (acknowledged).
    pub dead_lettered: Mutex<BTreeMap<String, u64>>,
    /// Partitions this instance's consumer holds now.
    pub partitions: std::sync::atomic::AtomicI64,
}

impl StageCounts {
    /// Records emitted to `output` so far.
    pub fn output(&self, output: &str) -> u64 {
        self.by_output
            .lock()
            .map(|m| m.get(output).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Total dead letters.
    pub fn dead_lettered_total(&self) -> u64 {
        self.dead_lettered
            .lock()
            .map(|m| m.values().sum())
            .unwrap_or(0)
    }

    /// A copy of the dead letters by reason.
    pub fn dead_lettered_by_reason(&self) -> BTreeMap<String, u64> {
        self.dead_lettered
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }
}

/// All of ebb's metrics.
pub struct Metrics {
    registry: Registry,
    /// Records consumed, per stage.
    pub records_in: Family<StageLabel, Counter>,
    /// Records emitted, per stage and output.
    pub records_out: Family<OutputLabel, Counter>,
    /// Records dead-lettered, per stage and reason.
    pub records_rejected: Family<ReasonLabel, Counter>,
    /// Time to process and deliver one batch.
    pub batch_seconds: Family<StageLabel, Histogram>,
    /// From a record's Kafka timestamp to its outputs being acknowledged.
    pub record_latency_seconds: Family<StageLabel, Histogram>,
    /// Consumer lag per partition (from librdkafka statistics).
    pub consumer_lag: Family<PartitionLabel, Gauge>,
    /// Retries of failed deliveries or registry calls.
    pub retries: Family<StageLabel, Counter>,
    /// Partitions a stage's consumer holds: a member of a group with none is idle (more
    /// instances than partitions).
    pub partitions: Family<StageLabel, Gauge>,
    /// Events a stage noted about its own state (forecast model resets, load signals gone
    /// missing).
    pub events: Family<EventLabel, Counter>,
    stages: Mutex<BTreeMap<String, Arc<StageCounts>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ebb");
        let records_in = Family::<StageLabel, Counter>::default();
        let records_out = Family::<OutputLabel, Counter>::default();
        let records_rejected = Family::<ReasonLabel, Counter>::default();
        let batch_seconds = Family::<StageLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let record_latency_seconds = Family::<StageLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let consumer_lag = Family::<PartitionLabel, Gauge>::default();
        let retries = Family::<StageLabel, Counter>::default();
        let partitions = Family::<StageLabel, Gauge>::default();
        let events = Family::<EventLabel, Counter>::default();
        registry.register(
            "records_in",
            "Records consumed by a stage",
            records_in.clone(),
        );
        registry.register(
            "records_out",
            "Records a stage emitted and the broker acknowledged",
            records_out.clone(),
        );
        registry.register(
            "records_rejected",
            "Records sent to the dead-letter topic, by reason",
            records_rejected.clone(),
        );
        registry.register(
            "batch_seconds",
            "Time to process and deliver one batch",
            batch_seconds.clone(),
        );
        registry.register(
            "record_latency_seconds",
            "From a record's Kafka timestamp until its outputs were acknowledged",
            record_latency_seconds.clone(),
        );
        registry.register(
            "consumer_lag",
            "Records behind the partition's high watermark",
            consumer_lag.clone(),
        );
        registry.register(
            "retries",
            "Retried deliveries and registry calls",
            retries.clone(),
        );
        registry.register(
            "partitions",
            "Partitions the stage's consumer holds",
            partitions.clone(),
        );
        registry.register(
            "stage_events",
            "Events a stage noted about its own state: forecast model resets, load signals gone missing",
            events.clone(),
        );
        Self {
            registry,
            records_in,
            records_out,
            records_rejected,
            batch_seconds,
            record_latency_seconds,
            consumer_lag,
            retries,
            partitions,
            events,
            stages: Mutex::new(BTreeMap::new()),
        }
    }

    /// The plain counts of one stage (created on first use).
    pub fn stage(&self, name: &str) -> Arc<StageCounts> {
        match self.stages.lock() {
            Ok(mut m) => m.entry(name.to_string()).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    /// Creates a stage's rejection counters at zero, one per reason it can give, so
    /// dashboards and `rate()` see every reason from the start, not from its first occurrence.
    pub fn declare_reasons(&self, stage: &str, reasons: &[&str]) {
        for reason in reasons {
            let label = ReasonLabel {
                stage: stage.to_string(),
                reason: (*reason).to_string(),
            };
            self.records_rejected.get_or_create(&label).inc_by(0);
        }
    }

    /// Creates a stage's event counters at zero, one per event it can note.
    pub fn declare_events(&self, stage: &str, events: &[&str]) {
        for event in events {
            self.events
                .get_or_create(&EventLabel {
                    stage: stage.to_string(),
                    event: (*event).to_string(),
                })
                .inc_by(0);
        }
    }

    /// Counts the events noted with an acknowledged batch.
    pub fn record_events(&self, stage: &str, events: &BTreeMap<&'static str, u64>) {
        for (event, n) in events {
            self.events
                .get_or_create(&EventLabel {
                    stage: stage.to_string(),
                    event: (*event).to_string(),
                })
                .inc_by(*n);
        }
    }

    /// Records an acknowledged batch.
    pub fn record_batch(
        &self,
        stage: &str,
        consumed: u64,
        outputs: &BTreeMap<&'static str, u64>,
        rejected: &BTreeMap<&'static str, u64>,
    ) {
        let label = StageLabel {
            stage: stage.to_string(),
        };
        self.records_in.get_or_create(&label).inc_by(consumed);
        let counts = self.stage(stage);
        counts.records_in.fetch_add(consumed, Ordering::Relaxed);
        for (output, n) in outputs {
            self.records_out
                .get_or_create(&OutputLabel {
                    stage: stage.to_string(),
                    output: (*output).to_string(),
                })
                .inc_by(*n);
            counts.records_out.fetch_add(*n, Ordering::Relaxed);
            if let Ok(mut m) = counts.by_output.lock() {
                *m.entry((*output).to_string()).or_default() += n;
            }
        }
        if let Ok(mut by_reason) = counts.dead_lettered.lock() {
            for (reason, n) in rejected {
                self.records_rejected
                    .get_or_create(&ReasonLabel {
                        stage: stage.to_string(),
                        reason: (*reason).to_string(),
                    })
                    .inc_by(*n);
                *by_reason.entry((*reason).to_string()).or_default() += n;
            }
        };
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The HTTP routes.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        StatusCode::OK,
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                        .into_response()
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
}

/// Serves `router` on an already bound listener.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_reasons_appear_at_zero_before_they_happen() {
        let m = Metrics::new();
        m.declare_reasons("filter", &["outlier", "malformed"]);
        let page = m.encode();
        assert!(
            page.contains("ebb_records_rejected_total{stage=\"filter\",reason=\"outlier\"} 0"),
            "{page}"
        );
    }

    #[test]
    fn declared_events_start_at_zero_and_count_what_batches_noted() {
        let m = Metrics::new();
        m.declare_events("models", &["forecast_model_reset", "load_signal_missing"]);
        m.record_events("models", &BTreeMap::from([("load_signal_missing", 2)]));
        let page = m.encode();
        for line in [
            "ebb_stage_events_total{stage=\"models\",event=\"forecast_model_reset\"} 0",
            "ebb_stage_events_total{stage=\"models\",event=\"load_signal_missing\"} 2",
        ] {
            assert!(page.contains(line), "{line} not in {page}");
        }
    }

    #[test]
    fn batch_counts_reach_both_the_page_and_the_summary() {
        let m = Metrics::new();
        m.record_batch(
            "filter",
            10,
            &BTreeMap::from([("clean", 7)]),
            &BTreeMap::from([("malformed", 2), ("outlier", 1)]),
        );
        let page = m.encode();
        assert!(
            page.contains("ebb_records_in_total{stage=\"filter\"} 10"),
            "{page}"
        );
        assert!(
            page.contains("ebb_records_rejected_total{stage=\"filter\",reason=\"malformed\"} 2"),
            "{page}"
        );
        let s = m.stage("filter");
        assert_eq!(s.records_in.load(Ordering::Relaxed), 10);
        assert_eq!(s.records_out.load(Ordering::Relaxed), 7);
        assert_eq!(s.dead_lettered_total(), 3);
    }
}
