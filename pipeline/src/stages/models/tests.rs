//! The models' behaviour on synthetic telemetry: faults are seen quickly, a steady service
//! is left alone, a restored model carries on exactly, poison does not stick.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::detect::{AnomalyModel, DetectorConfig, Verdict};
use super::forecast::{ForecastConfig, Forecaster};

const NAMES: [&str; 4] = ["requests_per_s", "cpu", "latency_p95_ms", "errors_per_s"];
/// Ten-second windows.
const STEP_MS: i64 = 10_000;
const DAY: usize = 8640;

/// One window of a healthy service: a daily cycle in load, CPU following load, latency
/// and errors flat, each with noise.
fn healthy(i: usize, rng: &mut ChaCha8Rng) -> [f64; 4] {
    let day = (i as f64 / DAY as f64) * std::f64::consts::TAU;
    let load = 200.0 + 80.0 * day.sin();
    let noise = Normal::new(0.0, 1.0).map_or(0.0, |n| n.sample(rng));
    [
        load + 6.0 * noise,
        20.0 + load * 0.1 + rng.random_range(-1.0..1.0),
        80.0 + rng.random_range(-4.0..4.0),
        0.5 + rng.random_range(-0.2..0.2),
    ]
}

fn step(model: &mut AnomalyModel, v: [f64; 4], cfg: &DetectorConfig) -> Verdict {
    model.update(&v.map(Some), &NAMES, cfg)
}

fn warmed(seed: u64, windows: usize, cfg: &DetectorConfig) -> (AnomalyModel, ChaCha8Rng) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut model = AnomalyModel::new(NAMES.len());
    for i in 0..windows {
        let v = healthy(i, &mut rng);
        step(&mut model, v, cfg);
    }
    (model, rng)
}

#[test]
fn injected_faults_are_flagged_within_two_windows() {
    let cfg = DetectorConfig::default();
    type Fault = fn([f64; 4]) -> [f64; 4];
    let faults: [(&str, Fault); 4] = [
        ("latency x5", |v| [v[0], v[1], v[2] * 5.0, v[3]]),
        ("errors x30", |v| [v[0], v[1], v[2], v[3] * 30.0]),
        ("cpu pinned", |v| [v[0], 99.0, v[2] * 1.5, v[3]]),
        ("traffic gone", |v| [v[0] * 0.1, v[1] * 0.3, v[2], v[3]]),
    ];
    for (k, (name, fault)) in faults.iter().enumerate() {
        let start = 3000;
        let (mut model, mut rng) = warmed(k as u64, start, &cfg);
        let mut flagged = None;
        for w in 0..6 {
            let v = fault(healthy(start + w, &mut rng));
            let verdict = step(&mut model, v, &cfg);
            if verdict.anomalous && flagged.is_none() {
                flagged = Some((w, verdict));
            }
        }
        let Some((w, verdict)) = flagged else {
            panic!("{name}: not flagged in six windows");
        };
        assert!(w < 2, "{name}: flagged only in window {w}");
        assert!(
            verdict.kmeans.is_some() && verdict.dbscan.is_some(),
            "{name}"
        );
        assert!(!verdict.drivers.is_empty(), "{name}: no explanation");
    }
}

#[test]
fn the_explanation_names_the_faulty_signal() {
    let cfg = DetectorConfig::default();
    let (mut model, mut rng) = warmed(9, 3000, &cfg);
    let mut v = healthy(3000, &mut rng);
    v[2] *= 6.0;
    let verdict = step(&mut model, v, &cfg);
    assert!(verdict.anomalous);
    assert!(
        verdict.drivers[0].0.starts_with("latency_p95_ms."),
        "{:?}",
        verdict.drivers
    );
}

#[test]
fn a_steady_service_raises_no_anomaly_for_a_day() {
    let cfg = DetectorConfig::default();
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let mut model = AnomalyModel::new(NAMES.len());
    let mut alarms = Vec::new();
    let mut top: f64 = 0.0;
    for i in 0..DAY {
        let v = healthy(i, &mut rng);
        let verdict = step(&mut model, v, &cfg);
        top = top.max(verdict.score);
        if verdict.anomalous {
            alarms.push(i);
        }
    }
    assert!(alarms.is_empty(), "alarms at windows {alarms:?}");
    assert!(top > 0.0, "the detector never scored anything");
}

#[test]
fn a_restored_model_gives_the_same_next_outputs() -> Result<(), serde_json::Error> {
    let cfg = DetectorConfig::default();
    let fcfg = ForecastConfig::default();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut model = AnomalyModel::new(NAMES.len());
    let mut forecaster = Forecaster::new(&fcfg);
    for i in 0..1500 {
        let v = healthy(i, &mut rng);
        step(&mut model, v, &cfg);
        forecaster.update(i as i64 * STEP_MS, v[0], &fcfg);
    }
    let snapshot = serde_json::to_vec(&(&model, &forecaster))?;
    let (mut restored, mut restored_f): (AnomalyModel, Forecaster) =
        serde_json::from_slice(&snapshot)?;
    for i in 1500..1800 {
        let mut v = healthy(i, &mut rng);
        if i == 1700 {
            v[2] *= 5.0;
        }
        assert_eq!(
            step(&mut model, v, &cfg),
            step(&mut restored, v, &cfg),
            "window {i}"
        );
        let t = i as i64 * STEP_MS;
        assert_eq!(
            forecaster.update(t, v[0], &fcfg),
            restored_f.update(t, v[0], &fcfg),
            "window {i}"
        );
    }
    Ok(())
}

#[test]
fn poisoned_inputs_do_not_corrupt_the_models() {
    let cfg = DetectorConfig::default();
    let fcfg = ForecastConfig::default();
    let (mut model, mut rng) = warmed(3, 2500, &cfg);
    let mut forecaster = Forecaster::new(&fcfg);
    for i in 0..2500 {
        forecaster.update(i as i64 * STEP_MS, healthy(i, &mut rng)[0], &fcfg);
    }
    let poison = [f64::NAN, f64::INFINITY, -f64::INFINITY, 1e300, -1e300, 1e12];
    for (k, p) in poison.iter().enumerate() {
        let i = 2500 + k;
        let verdict = model.update(&[Some(*p), Some(*p), None, Some(0.5)], &NAMES, &cfg);
        assert!(verdict.score.is_finite(), "{p}: score {}", verdict.score);
        for f in forecaster.update(i as i64 * STEP_MS, *p, &fcfg) {
            assert!(f.value.is_finite(), "{p}: forecast {f:?}");
        }
    }
    // A while later, healthy windows score as healthy again and forecasts are sane.
    let mut late_alarms = 0;
    for i in 2510..3500 {
        let v = healthy(i, &mut rng);
        let verdict = step(&mut model, v, &cfg);
        assert!(verdict.score.is_finite());
        if i > 2700 && verdict.anomalous {
            late_alarms += 1;
        }
        for p in forecaster.update(i as i64 * STEP_MS, v[0], &fcfg) {
            assert!(p.value.is_finite() && p.lower.is_finite() && p.upper.is_finite());
            if i > 3000 {
                assert!((0.0..1000.0).contains(&p.value), "forecast {p:?}");
            }
        }
    }
    assert_eq!(late_alarms, 0);
}

#[test]
fn the_forecast_beats_both_naive_forecasts_on_a_daily_cycle_with_a_ramp() {
    use crate::eval::forecast::evaluate;
    use crate::eval::series::Series;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    // Three days of one-minute samples: a daily cycle, a slow upward trend, noise.
    let n = 3 * 1440;
    let values: Vec<f64> = (0..n)
        .map(|i| {
            let day = (i as f64 / 1440.0) * std::f64::consts::TAU;
            let noise = Normal::new(0.0, 4.0).map_or(0.0, |d| d.sample(&mut rng));
            300.0 + 120.0 * day.sin() + 0.05 * i as f64 + noise
        })
        .collect();
    let score = evaluate(&Series::synthetic(values), &ForecastConfig::default());
    for e in &score.horizons {
        let h = &e.horizon;
        assert!(e.n > 1000, "{h}: {} scored", e.n);
        assert!(e.skill_vs_last > 0.0, "{h}: {e:?}");
        assert!(e.skill_vs_yesterday > 0.0, "{h}: {e:?}");
        assert!(e.interval_coverage > 0.7, "{h}: {e:?}");
    }
}

#[test]
fn a_value_seen_long_after_its_target_does_not_teach_the_forecaster() {
    let cfg = ForecastConfig {
        horizons: vec![std::time::Duration::from_secs(60)],
        ..ForecastConfig::default()
    };
    // Each forecast is for a minute ahead, but the next sample comes ten minutes later: no
    // forecast ever meets its target, so none may count towards the warm-up.
    let mut gappy = Forecaster::new(&cfg);
    for i in 0..40 {
        gappy.update(i * 600_000, 100.0 + (i % 3) as f64, &cfg);
    }
    assert!(
        gappy.warming_up(),
        "scored forecasts against values seen 9 minutes late"
    );
    let mut regular = Forecaster::new(&cfg);
    for i in 0..40 {
        regular.update(i * 60_000, 100.0 + (i % 3) as f64, &cfg);
    }
    assert!(!regular.warming_up());
}

#[test]
fn a_spiky_random_walk_sampled_with_gaps_is_forecast_as_well_as_its_last_value() {
    use crate::eval::forecast::evaluate;
    use crate::eval::series::Series;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    // Ten-minute samples with missing runs (as road sensors report), a level that wanders
    // with heavy-tailed steps: nothing to learn, so the last value is as good as it gets and
    // the published forecast must not be worse.
    let (mut times, mut values) = (Vec::new(), Vec::new());
    let (mut t, mut level) = (0i64, 400.0f64);
    let step = Normal::new(0.0, 15.0).ok();
    while times.len() < 4000 {
        t += 600_000
            * if rng.random_bool(0.25) {
                rng.random_range(2..5)
            } else {
                1
            };
        let jump = if rng.random_bool(0.05) {
            rng.random_range(-300.0..300.0)
        } else {
            0.0
        };
        level = (level + step.map_or(0.0, |d| d.sample(&mut rng)) + jump).clamp(50.0, 2000.0);
        times.push(t);
        values.push(level);
    }
    let series = Series {
        raw_times: times.iter().map(|t| t.to_string()).collect(),
        raw_values: values.iter().map(|v| v.to_string()).collect(),
        times,
        values,
        ..Default::default()
    };
    let score = evaluate(&series, &ForecastConfig::default());
    for e in &score.horizons {
        assert!(e.n > 1000, "{}: {} scored", e.horizon, e.n);
        assert!(e.skill_vs_last > -0.01, "{}: {e:?}", e.horizon);
    }
}

#[test]
fn a_bad_detector_setting_names_its_key() {
    let cfg = DetectorConfig {
        clusters: 0,
        ..DetectorConfig::default()
    };
    let Err(e) = cfg.validate() else {
        panic!("clusters = 0 accepted");
    };
    assert!(e.to_string().starts_with("clusters:"), "{e}");
    let f = ForecastConfig {
        horizons: vec![],
        ..ForecastConfig::default()
    };
    let Err(e) = f.validate() else {
        panic!("no horizons accepted");
    };
    assert!(e.to_string().starts_with("horizons:"), "{e}");
}

/// Drives the stage with `windows` windows of one service's aggregates (JSON), a fault in
/// window `fault`; returns everything it emitted.
fn run_stage(windows: usize, fault: usize) -> Vec<crate::stage::Output> {
    run_stage_in(windows, fault, crate::codec::Format::Json)
}

/// [`run_stage`] with the aggregates in `format` (Avro through [`crate::codec::avro::test_codec`]).
fn run_stage_in(
    windows: usize,
    fault: usize,
    format: crate::codec::Format,
) -> Vec<crate::stage::Output> {
    let codec = crate::codec::avro::test_codec();
    let mut stage = super::ModelsStage::new(super::ModelsConfig::default(), codec.clone());
    drive(&mut stage, windows, fault, 0..0, format, &codec).0
}

/// Runs one aggregate `payload` (key `api`, partition 0, at `offset`) through `stage`; what
/// it emitted.
fn feed(stage: &mut super::ModelsStage, payload: &[u8], offset: i64) -> crate::stage::Emitter {
    use crate::stage::{Emitter, Input, Source, Stage};
    let mut emitter = Emitter::new();
    stage.process(
        &Input {
            key: Some(b"api"),
            payload: Some(payload),
            headers: Vec::new(),
            source: Source {
                topic: "aggregates".into(),
                partition: 0,
                offset,
            },
        },
        &mut emitter,
    );
    emitter
}

/// Feeds `stage` the windows of [`run_stage_in`], without the request rate in the windows
/// of `no_requests`; everything it emitted, and the events it noted.
fn drive(
    stage: &mut super::ModelsStage,
    windows: usize,
    fault: usize,
    no_requests: std::ops::Range<usize>,
    format: crate::codec::Format,
    codec: &crate::codec::AvroCodec,
) -> (
    Vec<crate::stage::Output>,
    std::collections::BTreeMap<&'static str, u64>,
) {
    use crate::stages::window::WindowAggregate;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut outputs = Vec::new();
    let mut events = std::collections::BTreeMap::new();
    let mut offset = 0;
    for w in 0..windows {
        let mut v = healthy(w, &mut rng);
        if w == fault {
            v[2] *= 8.0;
        }
        let start = 1_700_000_000_000 + w as i64 * STEP_MS;
        for (metric, value) in NAMES.iter().zip(v) {
            if *metric == NAMES[0] && no_requests.contains(&w) {
                continue;
            }
            let a = WindowAggregate {
                window_id: format!("api/{metric}/{STEP_MS}/{start}"),
                service: "api".into(),
                metric: (*metric).into(),
                unit: None,
                window_start: start,
                window_end: start + STEP_MS,
                count: 10,
                sum: value * 10.0,
                mean: value,
                min: value,
                max: value,
                stddev: None,
                p50: value,
                p95: value,
                p99: value,
                rate: 1.0,
                instances: 1,
                top_instance: None,
            };
            let payload = match format {
                crate::codec::Format::Json => serde_json::to_vec(&a).unwrap_or_default(),
                crate::codec::Format::Avro => {
                    codec.encode_aggregate(&a).unwrap_or_else(|e| panic!("{e}"))
                }
            };
            let mut emitter = feed(stage, &payload, offset);
            offset += 1;
            let (out, dead) = emitter.drain();
            assert!(dead.is_empty(), "{dead:?}");
            outputs.extend(out);
            for (e, n) in emitter.take_events() {
                *events.entry(e).or_default() += n;
            }
        }
    }
    (outputs, events)
}

#[test]
fn the_stage_flags_a_fault_and_every_output_fits_its_schema(
) -> Result<(), Box<dyn std::error::Error>> {
    use super::process::{AnomalyEvent, ForecastEvent};
    let outputs = run_stage(3000, 2900);
    let anomalies =
        apache_avro::Schema::parse_str(include_str!("../../../../schemas/anomalies.avsc"))?;
    let forecasts =
        apache_avro::Schema::parse_str(include_str!("../../../../schemas/forecasts.avsc"))?;
    let mut flagged = Vec::new();
    let mut forecast_count = 0;
    for o in &outputs {
        match o.output {
            super::ANOMALIES => {
                let e: AnomalyEvent = serde_json::from_slice(&o.payload)?;
                apache_avro::to_value(&e)?.resolve(&anomalies)?;
                flagged.push(e.window_end.clone());
            }
            super::FORECASTS => {
                let e: ForecastEvent = serde_json::from_slice(&o.payload)?;
                apache_avro::to_value(&e)?.resolve(&forecasts)?;
                assert_eq!(e.horizons.len(), 3);
                forecast_count += 1;
            }
            _ => {}
        }
    }
    // Ten-second windows, one-minute forecast steps: one per load signal and minute.
    assert_eq!(forecast_count, 2 * 3000 / 6, "one per load signal and step");
    let fault_end =
        |w: i64| crate::stages::window::aggregate::ms_to_rfc3339(1_700_000_000_000 + w * STEP_MS);
    assert!(
        flagged.contains(&fault_end(2901)) || flagged.contains(&fault_end(2902)),
        "fault not flagged within two windows: {flagged:?}"
    );
    assert!(
        flagged.len() <= 3,
        "steady windows flagged too: {flagged:?}"
    );
    Ok(())
}

#[test]
fn a_load_signal_that_stops_arriving_is_reported_once_then_forecasts_resume(
) -> Result<(), Box<dyn std::error::Error>> {
    use super::process::ForecastEvent;
    let codec = crate::codec::avro::test_codec();
    let mut stage = super::ModelsStage::new(super::ModelsConfig::default(), codec.clone());
    // The service keeps reporting CPU, latency and errors, but not its request rate, for
    // five minutes (30 windows) from window 600.
    let (outputs, events) = drive(
        &mut stage,
        900,
        usize::MAX,
        600..630,
        crate::codec::Format::Json,
        &codec,
    );
    let forecasts =
        apache_avro::Schema::parse_str(include_str!("../../../../schemas/forecasts.avsc"))?;
    let mut requests = Vec::new();
    for o in outputs.iter().filter(|o| o.output == super::FORECASTS) {
        let e: ForecastEvent = serde_json::from_slice(&o.payload)?;
        apache_avro::to_value(&e)?.resolve(&forecasts)?;
        if e.signal == NAMES[0] {
            requests.push(e);
        }
    }
    let stale: Vec<&ForecastEvent> = requests.iter().filter(|e| e.status == "no_input").collect();
    assert_eq!(stale.len(), 1, "said once, not once per step");
    assert!(stale[0].horizons.is_empty());
    assert!(stale[0].current.is_finite() && stale[0].current > 0.0);
    let gap_end =
        crate::stages::window::aggregate::ms_to_rfc3339(1_700_000_000_000 + 630 * STEP_MS);
    assert!(stale[0].made_at.as_str() <= gap_end.as_str());
    let resumed = requests
        .iter()
        .filter(|e| e.made_at > gap_end && e.status != "no_input")
        .count();
    assert_eq!(
        resumed,
        (900 - 630) / 6,
        "forecasts resume once the signal is back"
    );
    assert_eq!(stage.counts().inputs_stale, 1);
    assert_eq!(
        events,
        std::collections::BTreeMap::from([(super::process::EVENT_INPUT_MISSING, 1)])
    );
    Ok(())
}

#[test]
fn avro_aggregates_give_the_same_events_in_avro_under_the_registered_schemas(
) -> Result<(), Box<dyn std::error::Error>> {
    use super::process::{AnomalyEvent, ForecastEvent};
    use crate::codec::{decode_event, EventSchema, Format};
    let codec = crate::codec::avro::test_codec();
    let json = run_stage_in(1500, 1400, Format::Json);
    let avro = run_stage_in(1500, 1400, Format::Avro);
    assert_eq!(json.len(), avro.len());
    let mut anomalies = 0;
    for (j, a) in json.iter().zip(&avro) {
        assert_eq!(
            (j.output, &j.key, &j.headers),
            (a.output, &a.key, &a.headers)
        );
        match a.output {
            super::ANOMALIES => {
                assert_eq!(
                    &a.payload[..5],
                    &[0, 0, 0, 0, 4],
                    "framed with the anomalies id"
                );
                let (format, event) =
                    decode_event::<AnomalyEvent>(&a.payload, EventSchema::Anomalies, &codec)?;
                assert_eq!(format, Format::Avro);
                assert_eq!(event, serde_json::from_slice::<AnomalyEvent>(&j.payload)?);
                anomalies += 1;
            }
            super::FORECASTS => {
                assert_eq!(
                    &a.payload[..5],
                    &[0, 0, 0, 0, 5],
                    "framed with the forecasts id"
                );
                let (_, event) =
                    decode_event::<ForecastEvent>(&a.payload, EventSchema::Forecasts, &codec)?;
                assert_eq!(event, serde_json::from_slice::<ForecastEvent>(&j.payload)?);
            }
            // Snapshots are the stage's own state, JSON whatever the input.
            _ => assert_eq!(a.payload, j.payload),
        }
    }
    assert!(anomalies > 0, "the fault is flagged in both formats");
    Ok(())
}

#[test]
fn avro_outputs_fall_back_to_json_while_their_schema_has_no_id() {
    let codec = crate::codec::avro::test_codec();
    // A cache that can read Avro aggregates but has registered no output schema yet.
    let reader = crate::codec::AvroCodec::default();
    if let Err(e) = reader
        .schemas
        .insert(3, crate::codec::avro::AGGREGATES_SCHEMA)
    {
        panic!("{e}");
    }
    let mut stage = super::ModelsStage::new(super::ModelsConfig::default(), reader);
    let mut forecasts = 0;
    let mut offset = 0;
    for w in 0..200i64 {
        let start = 1_700_000_000_000 + w * STEP_MS;
        for metric in NAMES {
            let a = crate::stages::window::WindowAggregate {
                window_id: format!("api/{metric}/{start}"),
                service: "api".into(),
                metric: metric.into(),
                unit: None,
                window_start: start,
                window_end: start + STEP_MS,
                count: 1,
                sum: 10.0,
                mean: 10.0,
                min: 10.0,
                max: 10.0,
                stddev: None,
                p50: 10.0,
                p95: 10.0,
                p99: 10.0,
                rate: 0.1,
                instances: 1,
                top_instance: None,
            };
            let payload = codec.encode_aggregate(&a).unwrap_or_else(|e| panic!("{e}"));
            let mut out = feed(&mut stage, &payload, offset);
            offset += 1;
            let (outputs, dead) = out.drain();
            assert!(dead.is_empty(), "{dead:?}");
            for o in outputs.iter().filter(|o| o.output == super::FORECASTS) {
                assert_eq!(o.payload.first(), Some(&b'{'), "JSON, not lost");
                forecasts += 1;
            }
        }
    }
    assert!(forecasts > 0);
}

#[tokio::test]
async fn anomalies_and_forecasts_are_queryable_in_sql_once_each() {
    use crate::sql::store::WindowStore;
    use crate::sql::{SqlConfig, SqlEngine};
    use crate::stages::window::config::StoreConfig;
    // Keep every window of the run: the default hour would evict most of them.
    let keep = StoreConfig {
        retention: std::time::Duration::from_secs(100 * 3600),
        ..StoreConfig::default()
    };
    let tables = super::ModelTables {
        anomalies: std::sync::Arc::new(WindowStore::anomalies(keep.clone())),
        forecasts: std::sync::Arc::new(WindowStore::forecasts(keep)),
    };
    let codec = crate::codec::avro::test_codec();
    let mut stage = super::ModelsStage::new(super::ModelsConfig::default(), codec.clone())
        .with_tables(tables.clone());
    let outputs = drive(
        &mut stage,
        3000,
        2900,
        0..0,
        crate::codec::Format::Json,
        &codec,
    )
    .0;
    let sent = |output: &str| outputs.iter().filter(|o| o.output == output).count();
    let (anomalies, forecasts) = (sent(super::ANOMALIES), sent(super::FORECASTS));
    assert!(anomalies > 0);
    // A redelivered event (a restart re-reading its input) is still one row.
    let again: Vec<super::process::ForecastEvent> = outputs
        .iter()
        .filter(|o| o.output == super::FORECASTS)
        .take(5)
        .filter_map(|o| serde_json::from_slice(&o.payload).ok())
        .collect();
    tables
        .forecasts
        .insert_batch(super::table::forecasts_batch(&again).unwrap_or_else(|e| panic!("{e}")));
    let engine = SqlEngine::new(
        &[tables.anomalies.clone(), tables.forecasts.clone()],
        None,
        SqlConfig::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let query = |sql: &'static str| {
        let engine = &engine;
        async move {
            let r = engine.query(sql).await.unwrap_or_else(|e| panic!("{e}"));
            let (_, body) = crate::sql::http::encode(&r, crate::sql::http::Format::Json)
                .unwrap_or_else(|e| panic!("{e}"));
            serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default()
        }
    };
    let v = query(
        "SELECT count(*) AS n, max(window_end) AS last, max(top_driver) AS driver \
         FROM anomalies WHERE service = 'api'",
    )
    .await;
    assert_eq!(v["rows"][0]["n"], anomalies);
    assert!(v["rows"][0]["driver"].is_string(), "{v}");
    let v = query(
        "SELECT horizon_s, count(*) AS n, count(DISTINCT forecast_id) AS f FROM forecasts \
         WHERE signal = 'requests_per_s' GROUP BY horizon_s ORDER BY horizon_s",
    )
    .await;
    let rows = v["rows"].as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), 3, "one row per horizon: {v}");
    for row in &rows {
        assert_eq!(row["n"], forecasts / 2, "{v}");
        assert_eq!(row["n"], row["f"]);
    }
}

#[test]
fn a_service_model_state_stays_under_16_kib_through_a_day_with_faults() {
    // The budget of issue 5, counted from the models' own buffers at their default sizes:
    // the anomaly model and the two load forecasters (one step a minute) of one service,
    // through a day of ten-second windows, bursts and a gap included.
    let dcfg = DetectorConfig::default();
    let fcfg = ForecastConfig::default();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut model = AnomalyModel::new(NAMES.len());
    let mut load = [Forecaster::new(&fcfg), Forecaster::new(&fcfg)];
    let mut peak = 0;
    for i in 0..DAY {
        let mut v = healthy(i, &mut rng);
        if i % 997 < 6 {
            v[0] *= 8.0;
            v[2] *= 20.0;
        }
        step(&mut model, v, &dcfg);
        let gap = (4000..4600).contains(&i);
        if i % 6 == 5 && !gap {
            let t = i as i64 * STEP_MS;
            load[0].update(t, v[0], &fcfg);
            load[1].update(t, v[1], &fcfg);
        }
        let bytes = model.state_bytes() + load.iter().map(Forecaster::state_bytes).sum::<usize>();
        peak = peak.max(bytes);
    }
    assert!(peak < 16 * 1024, "{peak} bytes");
    // Counted for real: a warmed model is several kilobytes, not an empty shell.
    assert!(peak > 8 * 1024, "{peak} bytes");
}

#[test]
fn the_detectors_fit_on_the_thread_that_updates_them() {
    use rayon::prelude::*;
    // linfa's fits are rayon calls; from a thread outside any pool each would be handed to
    // the global pool and waited for. After one update this thread is its own pool's only
    // worker, so they, and any other rayon call made here, run right here.
    let joined = std::thread::spawn(|| {
        let cfg = DetectorConfig::default();
        let (_, _) = warmed(3, cfg.warmup + 50, &cfg);
        let me = std::thread::current().id();
        let ran_on: Vec<_> = (0..256)
            .into_par_iter()
            .map(|_| std::thread::current().id())
            .collect();
        (
            rayon::current_thread_index(),
            rayon::current_num_threads(),
            ran_on.iter().all(|t| *t == me),
        )
    })
    .join();
    assert!(matches!(joined, Ok((Some(0), 1, true))), "{joined:?}");
}
