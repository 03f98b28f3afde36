use std::time::Duration;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::config::{DecideConfig, ScaleConfig, ServiceLimits};
use super::policy::{self, ForecastView, Observation, ScaleState};
use super::process::{Command, DecideInputs, DecideStage, COMMANDS, STATE};
use crate::codec::{decode_event, AvroCodec, EventSchema, Format};
use crate::stage::{Emitter, Input, Output, Source, Stage};
use crate::stages::models::process::AnomalyEvent;
use crate::stages::models::{ModelsConfig, ModelsStage};
use crate::stages::window::aggregate::ms_to_rfc3339;
use crate::stages::window::WindowAggregate;

const T0: i64 = 1_700_000_040_000 - 1_700_000_040_000 % 86_400_000;
const MINUTE: i64 = 60_000;

fn inputs() -> DecideInputs {
    DecideInputs {
        aggregates: "aggregates".into(),
        forecasts: "forecasts".into(),
        anomalies: "anomalies".into(),
    }
}

fn decide_stage(cfg: DecideConfig) -> DecideStage {
    DecideStage::new(
        cfg,
        &ModelsConfig::default().signals,
        inputs(),
        AvroCodec::default(),
    )
}

/// One window of one service as the window stage would report it.
#[derive(Debug, Clone)]
struct Window {
    start: i64,
    size: i64,
    load: f64,
    cpu: f64,
    instances: i64,
    /// (top instance, its max over the median) of errors.
    errors: (Option<String>, f64),
}

fn aggregates(service: &str, w: &Window) -> Vec<WindowAggregate> {
    let agg = |metric: &str, mean: f64, max: f64, p50: f64, top: Option<String>| WindowAggregate {
        window_id: format!("{service}/{metric}/{}/{}", w.size, w.start),
        service: service.into(),
        metric: metric.into(),
        unit: None,
        window_start: w.start,
        window_end: w.start + w.size,
        count: 10,
        sum: mean * 10.0,
        mean,
        min: p50,
        max,
        stddev: None,
        p50,
        p95: max,
        p99: max,
        rate: 1.0,
        instances: w.instances,
        top_instance: top,
    };
    let per_instance = w.load / w.instances as f64;
    let errors = 0.01 * per_instance;
    vec![
        agg(
            "requests_per_s",
            per_instance,
            per_instance,
            per_instance,
            None,
        ),
        agg("cpu", w.cpu, w.cpu, w.cpu, None),
        agg("latency_p95_ms", 50.0, 55.0, 50.0, Some("i-0".into())),
        agg(
            "errors_per_s",
            errors,
            errors * w.errors.1,
            errors,
            w.errors.0.clone(),
        ),
    ]
}

/// Feeds a stage one record of `topic` and returns its outputs.
fn feed(stage: &mut impl Stage, topic: &str, offset: i64, payload: &[u8]) -> Vec<Output> {
    let mut emitter = Emitter::new();
    stage.process(
        &Input {
            key: None,
            payload: Some(payload),
            headers: Vec::new(),
            source: Source {
                topic: topic.into(),
                partition: 0,
                offset,
            },
        },
        &mut emitter,
    );
    let (out, dead) = emitter.drain();
    assert!(dead.is_empty(), "{dead:?}");
    out
}

/// The models and decide stages wired as in the pipeline, in process.
struct Pipeline {
    models: Option<ModelsStage>,
    decide: DecideStage,
    offset: i64,
    /// The aggregates' wire format; Avro through [`crate::codec::avro::test_codec`].
    format: Format,
    codec: AvroCodec,
}

impl Pipeline {
    fn new(cfg: DecideConfig, with_models: bool) -> Self {
        Self::in_format(cfg, with_models, Format::Json)
    }

    fn in_format(cfg: DecideConfig, with_models: bool, format: Format) -> Self {
        let codec = crate::codec::avro::test_codec();
        let models_cfg = ModelsConfig::default();
        let mut decide = DecideStage::new(
            cfg,
            &ModelsConfig::default().signals,
            inputs(),
            codec.clone(),
        );
        if with_models {
            decide = decide.expecting_forecasts_every(models_cfg.forecast_step);
        }
        let models = with_models.then(|| ModelsStage::new(models_cfg, codec.clone()));
        Self {
            models,
            decide,
            offset: 0,
            format,
            codec,
        }
    }

    fn command(&self, o: &Output) -> Command {
        match decode_event::<Command>(&o.payload, EventSchema::Commands, &self.codec) {
            Ok((format, c)) => {
                assert_eq!(
                    format, self.format,
                    "commands leave in the aggregates' format"
                );
                c
            }
            Err(e) => panic!("command does not parse: {e}"),
        }
    }

    /// One window through models and decide; the commands it produced.
    fn window(&mut self, service: &str, w: &Window) -> Vec<Command> {
        let mut commands = Vec::new();
        for a in aggregates(service, w) {
            let payload = match self.format {
                Format::Json => serde_json::to_vec(&a).unwrap_or_default(),
                Format::Avro => self
                    .codec
                    .encode_aggregate(&a)
                    .unwrap_or_else(|e| panic!("{e}")),
            };
            self.offset += 1;
            for o in feed(&mut self.decide, "aggregates", self.offset, &payload) {
                if o.output == COMMANDS {
                    commands.push(self.command(&o));
                }
            }
            let Some(models) = self.models.as_mut() else {
                continue;
            };
            for o in feed(models, "aggregates", self.offset, &payload) {
                let topic = match o.output {
                    crate::stages::models::FORECASTS => "forecasts",
                    crate::stages::models::ANOMALIES => "anomalies",
                    _ => continue,
                };
                // The forecast made at the window's end completes the window's decision.
                for o in feed(&mut self.decide, topic, self.offset, &o.payload) {
                    if o.output == COMMANDS {
                        commands.push(self.command(&o));
                    }
                }
            }
        }
        commands
    }
}

/// Load that ramps every morning from 240 to three times that over an hour (08:00-09:00),
/// holds, and falls back in the evening, with 2% noise. Replicas follow the commands at once.
/// Returns the first scale-up on day three (minutes from the ramp's start) and its command.
fn first_scale_up(with_models: bool) -> Option<(i64, Command)> {
    first_scale_up_in(with_models, Format::Json)
}

fn first_scale_up_in(with_models: bool, format: Format) -> Option<(i64, Command)> {
    let mut p = Pipeline::in_format(DecideConfig::default(), with_models, format);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let noise = Normal::new(0.0, 0.02).unwrap_or_else(|_| unreachable!("valid"));
    let ramp_from = 2 * 1440 + 8 * 60;
    let mut replicas: u32 = 4;
    for m in 0..(ramp_from + 90) {
        let minute = m % 1440;
        let shape = |from: i64| ((minute - from) as f64 / 60.0).clamp(0.0, 1.0);
        let ramp = 1.0 + 2.0 * (shape(8 * 60) - shape(18 * 60));
        let load = 240.0 * ramp * (1.0 + noise.sample(&mut rng));
        let w = Window {
            start: T0 + m * MINUTE,
            size: MINUTE,
            load,
            // Capacity 100 per replica: utilization is load / (replicas x 100).
            cpu: 100.0 * load / (f64::from(replicas) * 100.0),
            instances: i64::from(replicas),
            errors: (None, 1.0),
        };
        let commands = p.window("api", &w);
        let scale = commands.into_iter().find(|c| c.action == "scale");
        if let Some(target) = scale.as_ref().and_then(|c| c.replicas) {
            replicas = target;
        }
        if m >= ramp_from - 30 {
            if let Some(c) = scale.filter(|c| c.replicas > Some(4)) {
                return Some((m - ramp_from, c));
            }
        }
    }
    None
}

#[test]
fn a_load_ramp_scales_up_before_the_reactive_rule_would() {
    let Some((ebb_at, ebb)) = first_scale_up(true) else {
        panic!("the forecast policy never scaled up");
    };
    let Some((reactive_at, reactive)) = first_scale_up(false) else {
        panic!("the reactive rule never scaled up");
    };
    assert_eq!(ebb.policy, "forecast", "{}", ebb.reason);
    assert_eq!(reactive.policy, "reactive");
    assert!(
        reactive.evidence.fallback.as_deref() == Some("no forecast"),
        "{:?}",
        reactive.evidence.fallback
    );
    // The forecast may lead the ramp by its start-up horizon, not by half an hour.
    assert!(ebb_at > -10, "scaled long before the ramp: {}", ebb.reason);
    assert!(
        ebb_at < reactive_at,
        "forecast scaled up at minute {ebb_at}, the reactive rule at {reactive_at}"
    );
    assert!(ebb.replicas > Some(4), "{}", ebb.reason);
    assert!(ebb.reason.contains("forecast"), "{}", ebb.reason);
}

#[test]
fn avro_aggregates_give_the_same_commands_in_avro_through_models_and_decide() {
    // Models write Avro forecasts and anomalies for Avro aggregates; decide reads them and
    // writes Avro commands (checked in `Pipeline::command`); the decisions do not change.
    let json = first_scale_up_in(true, Format::Json);
    let avro = first_scale_up_in(true, Format::Avro);
    assert!(json.is_some());
    assert_eq!(json, avro);
}

#[test]
fn a_decision_waits_for_and_uses_the_forecast_made_at_its_windows_end() {
    let mut p = Pipeline::new(DecideConfig::default(), true);
    let mut decided_with: Vec<(i64, Option<i64>)> = Vec::new();
    for m in 0..240 {
        // A steady climb: every window is decided, by scaling or not.
        let load = 200.0 + 2.0 * m as f64;
        let w = Window {
            start: T0 + m * MINUTE,
            size: MINUTE,
            load,
            cpu: load / 4.0,
            instances: 4,
            errors: (None, 1.0),
        };
        for c in p.window("api", &w) {
            if c.action == "scale" {
                let end = w.start + w.size;
                decided_with.push((end, c.evidence.forecast.map(|f| f.made_at_ms)));
            }
        }
    }
    let with_forecast: Vec<&(i64, Option<i64>)> =
        decided_with.iter().filter(|(_, f)| f.is_some()).collect();
    assert!(!with_forecast.is_empty(), "{decided_with:?}");
    for (end, made_at) in with_forecast {
        assert_eq!(
            *made_at,
            Some(*end),
            "decided at {end} with an older forecast"
        );
    }
}

fn obs(end: i64, load: f64, replicas: u32, forecast: Option<f64>) -> Observation {
    Observation {
        window_start: end - MINUTE,
        window_end: end,
        load: Some(load),
        replicas,
        utilization: None,
        forecast: forecast.map(|v| ForecastView {
            made_at_ms: end - MINUTE,
            ready: true,
            status: "ok".into(),
            horizon_ms: MINUTE,
            value: v,
            lower: v * 0.9,
            upper: v * 1.1,
            method: "model".into(),
            recent_mae: Some(v * 0.05),
        }),
        anomaly_open: false,
    }
}

fn limits(max_replicas: u32) -> ServiceLimits {
    ServiceLimits {
        shadow: false,
        capacity_per_replica: Some(100.0),
        min_replicas: 1,
        max_replicas,
    }
}

#[test]
fn with_up_stabilization_a_one_window_spike_scales_nothing() {
    // Off by default (the HPA's 0s); a user who would rather ride out spikes sets it.
    let cfg = ScaleConfig {
        up_stabilization: Duration::from_secs(120),
        ..ScaleConfig::default()
    };
    let mut state = ScaleState::default();
    let mut actions = Vec::new();
    for m in 1..30 {
        // Load 250 on 4 replicas of 100 at a 70% target; one window at four times that, and
        // the forecast made after it echoes the spike for one window.
        let load = if m == 15 { 1000.0 } else { 250.0 };
        let forecast = if m == 16 { 900.0 } else { 250.0 };
        if let Some(d) = policy::scale(
            &mut state,
            &cfg,
            &limits(50),
            &obs(T0 + m * MINUTE, load, 4, Some(forecast)),
        ) {
            actions.push((m, d.reason));
        }
    }
    assert!(actions.is_empty(), "{actions:?}");
}

#[test]
fn an_overload_now_is_scaled_for_even_when_the_forecast_calls_it_passing() {
    // 4 replicas of 100 at a 70% target carry 280; 320 is 80% of what they can serve, over
    // the tolerance, while the forecast (300, up to 330: the load is inside its interval)
    // plans for 303, which the fleet carries within the tolerance.
    let cfg = ScaleConfig::default();
    let mut state = ScaleState::default();
    for m in 1..10 {
        let _ = policy::scale(
            &mut state,
            &cfg,
            &limits(50),
            &obs(T0 + m * MINUTE, 250.0, 4, Some(250.0)),
        );
    }
    let d = policy::scale(
        &mut state,
        &cfg,
        &limits(50),
        &obs(T0 + 10 * MINUTE, 320.0, 4, Some(300.0)),
    );
    let d = d.unwrap_or_else(|| panic!("an overloaded service was left as it was"));
    assert_eq!((d.from, d.target), (4, 5), "{}", d.reason);
    assert_eq!(d.planned_load, Some(320.0), "{}", d.reason);
    // Within the tolerance the forecast still leads: 300 is 75% of the fleet.
    let mut state = ScaleState::default();
    for m in 1..11 {
        let load = if m == 10 { 300.0 } else { 250.0 };
        let d = policy::scale(
            &mut state,
            &cfg,
            &limits(50),
            &obs(T0 + m * MINUTE, load, 4, Some(250.0)),
        );
        assert!(d.is_none(), "{d:?}");
    }
}

#[test]
fn a_sustained_step_is_met_in_the_window_the_hpa_rule_meets_it() {
    // 250 on 4 replicas of 100, then 1200 for good, which the forecast did not see coming:
    // 18 replicas at 70%, more than one 100% step from 4.
    let cfg = ScaleConfig::default();
    let hpa = cfg.hpa_baseline();
    let run = |cfg: &ScaleConfig| {
        let mut state = ScaleState::default();
        let mut replicas = 4;
        let mut reached = None;
        for m in 1..30 {
            let load = if m < 10 { 250.0 } else { 1200.0 };
            let forecast = (cfg.cost_ceiling > 0.0).then_some(250.0);
            if let Some(d) = policy::scale(
                &mut state,
                cfg,
                &limits(50),
                &obs(T0 + m * MINUTE, load, replicas, forecast),
            ) {
                replicas = d.target;
            }
            if replicas >= 18 && reached.is_none() {
                reached = Some(m);
            }
        }
        (reached, replicas)
    };
    let (ours, theirs) = (run(&cfg), run(&hpa));
    assert_eq!(theirs, (Some(10), 18), "the HPA rule, as a reference");
    assert_eq!(ours.0, theirs.0, "ebb {ours:?}, HPA rule {theirs:?}");
    assert!(ours.1 >= 18, "{ours:?}");
}

#[test]
fn a_sustained_drop_scales_down_only_after_the_stabilization_window() {
    let cfg = ScaleConfig::default();
    let mut state = ScaleState::default();
    let mut replicas = 10;
    let mut actions = Vec::new();
    for m in 1..40 {
        let load = if m < 10 { 690.0 } else { 200.0 };
        if let Some(d) = policy::scale(
            &mut state,
            &cfg,
            &limits(50),
            &obs(T0 + m * MINUTE, load, replicas, Some(load)),
        ) {
            replicas = d.target;
            actions.push((m, d.target, d.reason));
        }
    }
    let (first, ..) = actions.first().cloned().unwrap_or((0, 0, String::new()));
    // The drop is seen at minute 10; five minutes of higher recommendations hold it.
    assert!(first >= 15, "scaled down at minute {first}: {actions:?}");
    assert!(first <= 16, "never scaled down in time: {actions:?}");
    assert!(actions.iter().all(|(_, t, _)| *t < 10));
    assert!(
        actions
            .windows(2)
            .all(|w| w[0].1 - w[1].1 <= cfg.max_step_down),
        "{actions:?}"
    );
    // 200 plus a tenth of the interval's upper half (10%): 202 at 100 x 70% needs 3.
    assert_eq!(replicas, 3);
}

#[test]
fn steps_and_max_replicas_hold_under_a_forecast_that_goes_wild() {
    // Without the cost ceiling, which would hold the service at the HPA rule's count: the
    // step and replica limits alone must stop the forecast.
    // One step period per window, so each decision may take one step.
    let cfg = ScaleConfig {
        cost_ceiling: 0.0,
        step_period: Duration::from_secs(60),
        ..ScaleConfig::default()
    };
    let mut state = ScaleState::default();
    let mut replicas = 3;
    let mut actions = 0;
    for m in 1..200 {
        let wild = 1e9 * (m as f64).sin().abs() + if m % 7 == 0 { f64::MAX } else { 0.0 };
        if let Some(d) = policy::scale(
            &mut state,
            &cfg,
            &limits(20),
            &obs(T0 + m * MINUTE, 250.0, replicas, Some(wild)),
        ) {
            assert!(d.target <= 20, "{}", d.reason);
            // As the HPA's policies: the larger of the absolute and the percent step.
            let up = cfg
                .max_step_up
                .max(replicas * cfg.max_step_up_percent / 100);
            assert!(d.target <= replicas + up, "{}", d.reason);
            assert!(d.target + cfg.max_step_down >= replicas, "{}", d.reason);
            replicas = d.target;
            actions += 1;
        }
        assert!(replicas <= 20);
    }
    assert_eq!(replicas, 20, "the wild forecast pushed to the cap");
    // 3 -> 7 (four at most) -> 14 (100% at most) -> 20 (the cap).
    assert_eq!(actions, 3, "at most max(4, 100%) replicas a step");
}

/// 300 minutes of a load near 250 (4 replicas of 100 at 70%) under a forecast half as much
/// again: the policy's state and the replica-minutes it asked for.
fn biased_forecast(cfg: &ScaleConfig) -> (ScaleState, f64) {
    let mut state = ScaleState::default();
    let mut replicas = 4;
    let mut billed = 0.0;
    for m in 1..300 {
        let load = 250.0 + 20.0 * (m as f64 / 9.0).sin();
        if let Some(d) = policy::scale(
            &mut state,
            cfg,
            &limits(50),
            &obs(T0 + m * MINUTE, load, replicas, Some(load * 1.5)),
        ) {
            replicas = d.target;
        }
        billed += f64::from(replicas);
    }
    (state, billed)
}

#[test]
fn a_forecast_biased_high_costs_no_more_than_the_hpa_rule() {
    let cfg = ScaleConfig::default();
    let (state, billed) = biased_forecast(&cfg);
    assert!((billed - state.replica_minutes).abs() < 1e-9);
    assert!(
        state.replica_minutes <= state.baseline_minutes + 6.0,
        "{} replica-minutes against the HPA rule's {}",
        state.replica_minutes,
        state.baseline_minutes
    );
    assert!(state.baseline_minutes >= 4.0 * 299.0);
    let (free, billed_free) = biased_forecast(&ScaleConfig {
        cost_ceiling: 0.0,
        ..cfg
    });
    assert!(
        billed_free > 1.3 * billed,
        "without the ceiling the bias is bought: {billed_free} vs {billed}"
    );
    assert!(free.baseline.is_none() && free.baseline_minutes == 0.0);
}

#[test]
fn at_the_cost_ceiling_a_rise_is_followed_as_the_hpa_rule_would_and_the_command_says_so() {
    let cfg = ScaleConfig::default();
    let mut state = ScaleState::default();
    // Nothing saved yet: the first decision is at the ceiling. 560 on 4 needs 8 by the HPA
    // rule; the forecast of 900 (upper 990) would ask for 13.
    let Some(d) = policy::scale(
        &mut state,
        &cfg,
        &limits(50),
        &obs(T0 + MINUTE, 560.0, 4, Some(900.0)),
    ) else {
        panic!("140% utilization must scale up");
    };
    assert_eq!(d.policy, policy::ScalePolicy::Forecast);
    assert_eq!(d.target, 8, "{}", d.reason);
    assert!(d.limits.contains(&"cost_ceiling"), "{:?}", d.limits);
    assert!(
        d.reason.contains("no headroom: at the cost ceiling"),
        "{}",
        d.reason
    );
    assert!(d.reason.contains("cost_ceiling"), "{}", d.reason);
}

#[test]
fn stale_warming_or_reset_forecasts_fall_back_to_the_reactive_rule_and_say_so() {
    let cfg = ScaleConfig::default();
    for (case, made_ago, status, says) in [
        ("stale", 10 * MINUTE, "ok", "stale"),
        ("warming", MINUTE, "warming_up", "warming up"),
        ("reset", MINUTE, "model_reset", "model reset"),
    ] {
        let mut state = ScaleState::default();
        let mut o = obs(T0 + 60 * MINUTE, 560.0, 4, Some(100.0));
        if let Some(f) = o.forecast.as_mut() {
            f.made_at_ms = o.window_end - made_ago;
            f.ready = status == "ok";
            f.status = status.into();
        }
        let Some(d) = policy::scale(&mut state, &cfg, &limits(50), &o) else {
            panic!("{case}: 140% utilization must scale up");
        };
        assert_eq!(d.policy, policy::ScalePolicy::Reactive, "{case}");
        // ceil(4 x 1.4 / 0.7) = 8.
        assert_eq!(d.target, 8, "{case}: {}", d.reason);
        let why = d.fallback.unwrap_or_default();
        assert!(why.contains(says), "{case}: {why}");
    }
}

#[test]
fn no_scale_down_while_an_anomaly_is_open() {
    let cfg = ScaleConfig::default();
    let mut state = ScaleState::default();
    for m in 1..30 {
        let mut o = obs(T0 + m * MINUTE, 100.0, 10, Some(100.0));
        o.anomaly_open = true;
        assert_eq!(policy::scale(&mut state, &cfg, &limits(50), &o), None);
    }
}

fn anomaly(service: &str, end: i64) -> Vec<u8> {
    let e = AnomalyEvent {
        anomaly_id: format!("{service}/{end}"),
        service: service.into(),
        window_start: ms_to_rfc3339(end - MINUTE),
        window_end: ms_to_rfc3339(end),
        score: 0.9,
        severity: "high".into(),
        kmeans: None,
        dbscan: None,
        drivers: Vec::new(),
        signals: Vec::new(),
        model_version: 1,
    };
    serde_json::to_vec(&e).unwrap_or_default()
}

/// A service whose instance `i-2` crash-loops from minute 30: its errors stand ten times the
/// median, and the models flag the service every few windows.
fn crash_loop(instances: i64, minutes: i64, shadow: bool) -> Vec<Command> {
    sick_between(instances, minutes, shadow, |m| m >= 30)
}

#[tokio::test]
async fn commands_are_queryable_in_sql_once_each_with_their_reasons() {
    use crate::sql::store::WindowStore;
    use crate::sql::{SqlConfig, SqlEngine};
    use crate::stages::window::config::StoreConfig;
    let store = std::sync::Arc::new(WindowStore::commands(StoreConfig::default()));
    let mut p = Pipeline::new(DecideConfig::default(), false);
    p.decide = decide_stage(DecideConfig::default()).with_store(store.clone());
    let mut sent = Vec::new();
    for m in 0..50 {
        let start = T0 + m * MINUTE;
        let sick = m >= 30;
        if sick && m % 4 == 0 {
            p.offset += 1;
            feed(&mut p.decide, "anomalies", p.offset, &anomaly("api", start));
        }
        let w = Window {
            start,
            size: MINUTE,
            load: if m < 20 { 280.0 } else { 560.0 },
            cpu: if m < 20 { 70.0 } else { 140.0 },
            instances: 4,
            errors: if sick {
                (Some("i-2".into()), 10.0)
            } else {
                (Some("i-0".into()), 1.2)
            },
        };
        sent.extend(p.window("api", &w));
    }
    assert!(sent.iter().any(|c| c.action == "scale"));
    assert!(sent.iter().any(|c| c.action == "restart"));
    // The same commands again, as after an aborted transaction: still one row each.
    store.insert_batch(super::table::to_batch(&sent).unwrap_or_else(|e| panic!("{e}")));
    let engine =
        SqlEngine::new(&[store], None, SqlConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    let r = engine
        .query(
            "SELECT action, count(*) AS n, max(reason) AS reason FROM commands \
             WHERE service = 'api' GROUP BY action ORDER BY action",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (_, body) = crate::sql::http::encode(&r, crate::sql::http::Format::Json)
        .unwrap_or_else(|e| panic!("{e}"));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let count = |action: &str| sent.iter().filter(|c| c.action == action).count();
    assert_eq!(v["rows"][0]["action"], "restart");
    assert_eq!(v["rows"][0]["n"], count("restart"));
    assert!(v["rows"][0]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("i-2")));
    assert_eq!(v["rows"][1]["action"], "scale");
    assert_eq!(v["rows"][1]["n"], count("scale"));
}

/// As `crash_loop`, with `i-2` sick in the minutes `sick` says.
fn sick_between(
    instances: i64,
    minutes: i64,
    shadow: bool,
    sick: impl Fn(i64) -> bool,
) -> Vec<Command> {
    let cfg = DecideConfig {
        shadow,
        ..DecideConfig::default()
    };
    let mut p = Pipeline::new(cfg, false);
    let mut commands = Vec::new();
    for m in 0..minutes {
        let start = T0 + m * MINUTE;
        let sick = sick(m);
        if sick && m % 4 == 0 {
            p.offset += 1;
            feed(&mut p.decide, "anomalies", p.offset, &anomaly("api", start));
        }
        let w = Window {
            start,
            size: MINUTE,
            load: 280.0,
            cpu: 70.0,
            instances,
            errors: if sick {
                (Some("i-2".into()), 10.0)
            } else {
                (Some("i-0".into()), 1.2)
            },
        };
        commands.extend(p.window("api", &w));
    }
    commands
}

#[test]
fn a_crash_looping_instance_is_restarted_once_not_repeatedly() {
    let commands = crash_loop(4, 39, false);
    let restarts: Vec<&Command> = commands.iter().filter(|c| c.action == "restart").collect();
    assert_eq!(restarts.len(), 1, "{commands:#?}");
    let r = restarts[0];
    assert_eq!(r.instance.as_deref(), Some("i-2"));
    assert_eq!(r.policy, "restart");
    assert_eq!(r.evidence.health_metric.as_deref(), Some("errors_per_s"));
    assert!(r.reason.contains("i-2") && r.reason.contains("errors_per_s"));
    assert!(!r.evidence.anomaly_scores.is_empty());
    // Still sick long after the restart interval: a restart that did not help is not
    // repeated.
    let longer = crash_loop(4, 39 + 60, false);
    assert_eq!(
        longer.iter().filter(|c| c.action == "restart").count(),
        1,
        "restarted again though the last restart did not help"
    );
    assert!(
        commands.iter().all(|c| !c.shadow),
        "shadow is off by default"
    );
}

#[test]
fn an_instance_that_recovered_and_fell_sick_again_is_restarted_again() {
    // Sick from minute 30, restarted, well from 40, sick again from 60.
    let commands = sick_between(4, 80, false, |m| (30..40).contains(&m) || m >= 60);
    let restarts: Vec<&Command> = commands.iter().filter(|c| c.action == "restart").collect();
    assert_eq!(restarts.len(), 2, "{commands:#?}");
    assert!(restarts
        .iter()
        .all(|c| c.instance.as_deref() == Some("i-2")));
}

#[test]
fn a_lone_instance_is_never_restarted_and_shadow_mode_marks_commands() {
    assert!(crash_loop(1, 60, false)
        .iter()
        .all(|c| c.action != "restart"));
    let shadowed = crash_loop(4, 39, true);
    assert!(!shadowed.is_empty());
    assert!(shadowed.iter().all(|c| c.shadow));
}

#[test]
fn an_instance_that_stands_out_without_an_anomaly_is_left_alone() {
    let mut p = Pipeline::new(DecideConfig::default(), false);
    for m in 0..60 {
        let w = Window {
            start: T0 + m * MINUTE,
            size: MINUTE,
            load: 280.0,
            cpu: 70.0,
            instances: 4,
            errors: (Some("i-3".into()), 10.0),
        };
        assert!(p.window("api", &w).iter().all(|c| c.action != "restart"));
    }
}

#[test]
fn every_command_fits_its_schema_and_ids_are_deterministic(
) -> Result<(), Box<dyn std::error::Error>> {
    let schema = apache_avro::Schema::parse_str(include_str!("../../../../schemas/commands.avsc"))?;
    let mut commands = crash_loop(4, 39, false);
    let Some((_, ramp)) = first_scale_up(true) else {
        panic!("no scale-up");
    };
    commands.push(ramp);
    assert!(commands.iter().any(|c| c.action == "scale"));
    assert!(commands.iter().any(|c| c.action == "restart"));
    for c in &commands {
        apache_avro::to_value(c)?.resolve(&schema)?;
        assert!(c.command_id.starts_with("api/"));
        assert!(c.command_id.ends_with(&c.action));
    }
    assert_eq!(commands, {
        let mut again = crash_loop(4, 39, false);
        again.extend(first_scale_up(true).map(|(_, c)| c));
        again
    });
    Ok(())
}

#[test]
fn restored_state_continues_exactly_where_it_left_off() {
    let run = |split: Option<i64>| -> Vec<Command> {
        let mut p = Pipeline::new(DecideConfig::default(), true);
        let mut commands = Vec::new();
        for m in 0..300 {
            if split == Some(m) {
                // Flush the changelog, drop the stage, restore a new one from it.
                let mut emitter = Emitter::new();
                p.decide.flush(&mut emitter);
                let (outputs, _) = emitter.drain();
                let records: Vec<(Vec<u8>, Vec<u8>)> = outputs
                    .into_iter()
                    .filter(|o| o.output == STATE)
                    .map(|o| (o.key, o.payload))
                    .collect();
                assert!(!records.is_empty());
                let mut fresh = decide_stage(DecideConfig::default())
                    .expecting_forecasts_every(ModelsConfig::default().forecast_step);
                fresh.restore_state(0, &records);
                p.decide = fresh;
            }
            let load = 150.0 + 2.0 * m as f64;
            let w = Window {
                start: T0 + m * MINUTE + MINUTE / 2,
                size: MINUTE,
                load,
                cpu: 100.0 * load / 400.0,
                instances: 4,
                errors: (None, 1.0),
            };
            commands.extend(p.window("api", &w));
        }
        commands
    };
    let whole = run(None);
    assert!(whole.iter().any(|c| c.action == "scale"));
    assert_eq!(whole, run(Some(137)));
}

#[test]
fn config_validation_names_the_key() {
    let signals = ["requests_per_s", "cpu"];
    let problem = |cfg: &DecideConfig| match cfg.validate(&signals) {
        Err(e) => e.to_string(),
        Ok(()) => String::new(),
    };
    let mut cfg = DecideConfig::default();
    cfg.scale.max_replicas = 0;
    let err = problem(&cfg);
    assert!(err.contains("decide.scale.max_replicas"), "{err}");
    let cfg = DecideConfig {
        load_signal: "nope".into(),
        ..DecideConfig::default()
    };
    let err = problem(&cfg);
    assert!(err.contains("decide.load_signal"), "{err}");
    let mut cfg = DecideConfig::default();
    cfg.restart.interval = Duration::ZERO;
    let err = problem(&cfg);
    assert!(err.contains("decide.restart.interval"), "{err}");
    for (ceiling, ok) in [(0.0, true), (1.0, true), (0.2, false), (f64::NAN, false)] {
        let mut cfg = DecideConfig::default();
        cfg.scale.cost_ceiling = ceiling;
        let err = problem(&cfg);
        assert_eq!(err.is_empty(), ok, "{ceiling}: {err}");
        assert!(
            ok || err.contains("key decide.scale.cost_ceiling:"),
            "{err}"
        );
    }
    let mut cfg = DecideConfig::default();
    cfg.scale.headroom = 2.0;
    assert!(problem(&cfg).contains("key decide.scale.headroom:"));
    assert!(DecideConfig::default().validate(&signals).is_ok());
}
