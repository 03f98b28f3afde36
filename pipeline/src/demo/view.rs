//! The demo's live view: a consumer on the pipeline's output topics, as any dashboard would
//! be, keeping per service the load, the forecast, the last anomaly and the last command.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use serde::Deserialize;

use crate::runner::client_config;
use crate::stages::decide::Command;
use crate::stages::models::process::{AnomalyEvent, ForecastEvent};

/// What the view knows of one service.
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// Load in the last window.
    pub load: Option<f64>,
    /// Replicas that reported.
    pub replicas: Option<i64>,
    /// Latest forecast: value, upper bound, horizon in seconds, status.
    pub forecast: Option<(f64, f64, i64, String)>,
    /// Last anomaly: window end and score.
    pub anomaly: Option<(String, f64)>,
    /// Last command, in a few words.
    pub command: Option<String>,
}

/// The view's state.
#[derive(Debug, Default)]
pub struct View {
    /// Per service.
    pub rows: BTreeMap<String, Row>,
    /// Commands seen, by action.
    pub commands: BTreeMap<String, u64>,
}

#[derive(Deserialize)]
struct AggregateLine {
    service: String,
    metric: String,
    mean: f64,
    instances: i64,
}

/// The topics the view reads.
#[derive(Debug, Clone)]
pub struct ViewTopics {
    /// Window aggregates.
    pub aggregates: String,
    /// Forecasts.
    pub forecasts: String,
    /// Anomalies.
    pub anomalies: String,
    /// Commands.
    pub commands: String,
}

/// Starts the view's consumer thread; it stops when `stop` is set.
pub fn spawn(
    kafka: &BTreeMap<String, String>,
    topics: ViewTopics,
    load_metric: String,
    stop: Arc<AtomicBool>,
) -> Result<(Arc<Mutex<View>>, std::thread::JoinHandle<()>), rdkafka::error::KafkaError> {
    let mut cc = client_config(kafka);
    cc.set("group.id", "ebb-demo-view")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer = cc.create()?;
    consumer.subscribe(&[
        &topics.aggregates,
        &topics.forecasts,
        &topics.anomalies,
        &topics.commands,
    ])?;
    let view = Arc::new(Mutex::new(View::default()));
    let shared = view.clone();
    let thread = std::thread::Builder::new()
        .name("demo-view".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                let Some(payload) = m.payload() else {
                    continue;
                };
                let Ok(mut v) = shared.lock() else {
                    return;
                };
                let topic = m.topic();
                if topic == topics.aggregates {
                    if let Ok(a) = serde_json::from_slice::<AggregateLine>(payload) {
                        if a.metric == load_metric {
                            let row = v.rows.entry(a.service).or_default();
                            row.load = Some(a.mean * a.instances.max(1) as f64);
                            row.replicas = Some(a.instances);
                        }
                    }
                } else if topic == topics.forecasts {
                    if let Ok(f) = serde_json::from_slice::<ForecastEvent>(payload) {
                        if f.signal == load_metric {
                            if let Some(p) = f.horizons.first() {
                                v.rows.entry(f.service).or_default().forecast =
                                    Some((p.value, p.upper, p.horizon_ms / 1000, f.status));
                            }
                        }
                    }
                } else if topic == topics.anomalies {
                    if let Ok(a) = serde_json::from_slice::<AnomalyEvent>(payload) {
                        v.rows.entry(a.service).or_default().anomaly =
                            Some((a.window_end, a.score));
                    }
                } else if topic == topics.commands {
                    if let Ok(c) = serde_json::from_slice::<Command>(payload) {
                        *v.commands.entry(c.action.clone()).or_default() += 1;
                        let what = crate::actuators::describe(&c);
                        v.rows.entry(c.service).or_default().command = Some(what);
                    }
                }
            }
        })
        .map_err(|_| rdkafka::error::KafkaError::Canceled)?;
    Ok((view, thread))
}

/// Prints the per-service table.
pub fn print_table(view: &View, out: &mut dyn Write) {
    let _ = writeln!(
        out,
        "  {:<12} {:>9} {:>8} {:>22} {:>16}  last command",
        "service", "load/s", "replicas", "forecast (upper, h)", "last anomaly"
    );
    for (service, r) in &view.rows {
        let forecast = match &r.forecast {
            Some((v, u, h, status)) if status == "ok" => format!("{v:.0} ({u:.0}, {h}s)"),
            Some((v, _, _, status)) => format!("{v:.0} [{status}]"),
            None => "-".into(),
        };
        let anomaly = r.anomaly.as_ref().map_or("-".into(), |(end, score)| {
            format!("{} {score:.2}", end.get(11..19).unwrap_or(end))
        });
        let _ = writeln!(
            out,
            "  {:<12} {:>9} {:>8} {:>22} {:>16}  {}",
            service,
            r.load.map_or("-".into(), |l| format!("{l:.0}")),
            r.replicas.map_or("-".into(), |n| n.to_string()),
            forecast,
            anomaly,
            r.command.as_deref().unwrap_or("-"),
        );
    }
}
