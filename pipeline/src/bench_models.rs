//! `ebb bench models`: one round of model updates (one window per service) for many
//! services on one core, the model state each service costs, and River (Python online ML)
//! doing k-means on the same features, as a ratio.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::Serialize;

use crate::stages::models::detect::{AnomalyModel, DetectorConfig};
use crate::stages::models::forecast::{ForecastConfig, Forecaster};

/// River's side of the comparison: per-service `river.cluster.KMeans`, one `learn_one` and
/// one `predict_one` per window, on the feature vectors ebb's detector computed.
pub const RIVER_SCRIPT: &str = include_str!("../../compose/bench/river_kmeans.py");

/// Windows River learns before its timed round.
const RIVER_WARM: usize = 32;

const SIGNALS: [&str; 4] = ["requests_per_s", "cpu", "latency_p95_ms", "errors_per_s"];

/// What the benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct ModelsFigures {
    /// Services.
    pub services: usize,
    /// Ten-second windows each service saw before the timed round (so k-means, DBSCAN and
    /// the forecasters, fed once per one-minute step, are all active).
    pub warm_windows: usize,
    /// Seconds for one full round (anomaly models and two forecasters per service: the
    /// worst case, where every service's forecast step ends in this window).
    pub round_s: f64,
    /// Model updates per second (services per second in that round).
    pub updates_per_s: f64,
    /// Seconds for the k-means + DBSCAN detector alone in one round.
    pub detector_round_s: f64,
    /// Memory per service (anomaly model + two forecasters), bytes: resident-set growth,
    /// so allocator overhead included.
    pub bytes_per_service: f64,
    /// Model state per service, bytes, as the models count it (sizes and reserved buffer
    /// capacities; no allocator overhead), the mean over all services.
    pub state_bytes_per_service: f64,
    /// The largest counted state of any one service, bytes.
    pub max_state_bytes: usize,
    /// Snapshot size per service (JSON), bytes.
    pub snapshot_bytes_per_service: f64,
    /// River k-means updates per second on the same features, if run.
    pub river_updates_per_s: Option<f64>,
    /// ebb detector updates per second / River's.
    pub ratio_vs_river: Option<f64>,
    /// Why River did not run, if it did not.
    pub river_error: Option<String>,
}

fn signals(service: usize, w: usize) -> [f64; 4] {
    // Deterministic, different per service: a cycle, a scale, a little noise.
    let h = (service as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
    let scale = 1.0 + (h % 100) as f64;
    let noise = ((w as u64 * 7919 + h) % 101) as f64 / 101.0 - 0.5;
    let cycle = (w as f64 / 40.0 + (h % 7) as f64).sin();
    [
        scale * (100.0 + 20.0 * cycle + 3.0 * noise),
        30.0 + 10.0 * cycle + noise,
        80.0 + 5.0 * noise,
        0.2 + 0.05 * noise,
    ]
}

fn resident_bytes() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096.0)
}

/// Runs the benchmark; `python` is a Python with River for the comparison.
pub fn models(services: usize, warm_windows: usize, python: Option<&str>) -> ModelsFigures {
    let dcfg = DetectorConfig::default();
    let fcfg = ForecastConfig::default();
    let before = resident_bytes();
    let mut models: Vec<(AnomalyModel, [Forecaster; 2])> = Vec::with_capacity(services);
    for s in 0..services {
        let mut m = AnomalyModel::new(SIGNALS.len());
        let mut f = [Forecaster::new(&fcfg), Forecaster::new(&fcfg)];
        for w in 0..warm_windows {
            let v = signals(s, w);
            m.update(&v.map(Some), &SIGNALS, &dcfg);
            // As in the stage: 10 s windows, load forecast once per one-minute step.
            if w % 6 == 5 {
                let t = w as i64 * 10_000;
                f[0].update(t, v[0], &fcfg);
                f[1].update(t, v[1], &fcfg);
            }
        }
        models.push((m, f));
    }
    let after = resident_bytes();
    let bytes_per_service = match (before, after) {
        (Some(b), Some(a)) => (a - b).max(0.0) / services as f64,
        _ => f64::NAN,
    };
    let counted: Vec<usize> = models
        .iter()
        .map(|(m, f)| m.state_bytes() + f.iter().map(Forecaster::state_bytes).sum::<usize>())
        .collect();
    let state_bytes_per_service =
        counted.iter().sum::<usize>() as f64 / counted.len().max(1) as f64;
    let max_state_bytes = counted.iter().copied().max().unwrap_or(0);
    let sample = services.min(200);
    let snapshot_bytes: usize = models
        .iter()
        .take(sample)
        .map(|m| serde_json::to_vec(m).map_or(0, |v| v.len()))
        .sum();

    let w = warm_windows;
    let t0 = Instant::now();
    let mut flagged = 0usize;
    for (s, (m, f)) in models.iter_mut().enumerate() {
        let v = signals(s, w);
        flagged += usize::from(m.update(&v.map(Some), &SIGNALS, &dcfg).anomalous);
        let t = w as i64 * 10_000;
        f[0].update(t, v[0], &fcfg);
        f[1].update(t, v[1], &fcfg);
    }
    let round_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for (s, (m, _)) in models.iter_mut().enumerate() {
        let v = signals(s, w + 1);
        flagged += usize::from(m.update(&v.map(Some), &SIGNALS, &dcfg).anomalous);
    }
    let detector_round_s = t1.elapsed().as_secs_f64();
    std::hint::black_box(flagged);

    let (river_updates_per_s, river_error) = match python {
        None => (None, Some("no --python given".to_string())),
        Some(py) => match river(py, services, warm_windows) {
            Ok(r) => (Some(r), None),
            Err(e) => (None, Some(e)),
        },
    };
    let updates_per_s = services as f64 / round_s;
    let detector_per_s = services as f64 / detector_round_s;
    ModelsFigures {
        services,
        warm_windows,
        round_s,
        updates_per_s,
        detector_round_s,
        bytes_per_service,
        state_bytes_per_service,
        max_state_bytes,
        snapshot_bytes_per_service: snapshot_bytes as f64 / sample.max(1) as f64,
        river_updates_per_s,
        ratio_vs_river: river_updates_per_s.map(|r| detector_per_s / r),
        river_error,
    }
}

/// Feeds River the feature vectors ebb's detector sees (one 12-dimensional vector per
/// service and window) and reads back its timed round's updates per second.
fn river(python: &str, services: usize, warm_windows: usize) -> Result<f64, String> {
    let dcfg = DetectorConfig::default();
    let mut input = String::new();
    for s in 0..services {
        let mut m = AnomalyModel::new(SIGNALS.len());
        for w in 0..=warm_windows {
            let f = m.features_of(&signals(s, w).map(Some), &dcfg);
            // River warms on the last windows only: its k-means settles in a few dozen,
            // and Python would otherwise spend minutes on the warm-up alone.
            if w + RIVER_WARM < warm_windows {
                continue;
            }
            let line: Vec<String> = f.iter().map(|x| format!("{x:.5}")).collect();
            input.push_str(&line.join(","));
            input.push('\n');
        }
    }
    let mut child = Command::new(python)
        .arg("-c")
        .arg(RIVER_SCRIPT)
        .arg(services.to_string())
        .arg((warm_windows.min(RIVER_WARM) + 1).to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{python}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| format!("writing to River: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("River: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "River failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or_default())
        .map_err(|e| format!("River's answer {text:?}: {e}"))?;
    v["updates_per_s"]
        .as_f64()
        .ok_or_else(|| format!("River's answer lacks updates_per_s: {v}"))
}
