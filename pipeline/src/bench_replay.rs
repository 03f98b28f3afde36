//! `ebb bench replay`: how fast a replay drives the whole pipeline (filter, window, models,
//! decide) on a simulated clock, for many services over a simulated span, on one core.
//!
//! The synthetic fleet of the demo (one instance per service, five metrics, one sample per
//! metric every `interval`) is generated tick by tick outside the timed part; only the
//! chain's work is timed. Default settings but for one-minute windows (the default 10 s
//! windows would each hold a single sample at this rate), so the figure is what a backtest
//! of a real fleet costs.

use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use serde::Serialize;

use crate::config::{Config, Secret};
use crate::demo::generator::{Generator, GeneratorConfig, WireFormat};
use crate::replay::chain::{Chain, Collect, Recorded};
use crate::stages::window::aggregate::AggregateError;

/// What the benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayFigures {
    /// Services.
    pub services: usize,
    /// Simulated span, hours.
    pub simulated_hours: f64,
    /// Seconds between a metric's samples.
    pub interval_s: f64,
    /// Records through the chain.
    pub records: u64,
    /// Seconds in the chain (generation excluded).
    pub wall_s: f64,
    /// Records per second of wall time.
    pub records_per_s: f64,
    /// Simulated seconds per wall second.
    pub simulated_per_wall: f64,
    /// Commands decided.
    pub commands: u64,
    /// Window aggregates emitted.
    pub aggregates: u64,
    /// Peak resident memory of the process, MiB (Linux), if known.
    pub peak_rss_mib: Option<f64>,
}

/// Peak resident set size, from /proc (Linux only).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Replays `hours` of `services` sampled every `interval` through the chain.
pub fn run(
    services: usize,
    hours: f64,
    interval: Duration,
    partitions: i32,
) -> Result<ReplayFigures, AggregateError> {
    let mut config = Config::default();
    config.window.size = Duration::from_secs(60);
    config.filter.anonymize.key = Some(Secret::new("bench-replay-key-0123456789"));
    let generator_config = GeneratorConfig {
        services,
        instances: 1,
        fault_rate: 0.0,
        seed: 7,
        incidents: true,
    };
    let mut generator = Generator::new(generator_config, WireFormat::Json);
    let start_ms = Utc
        .with_ymd_and_hms(2026, 1, 5, 0, 0, 0)
        .single()
        .map_or(0, |t| t.timestamp_millis());
    let step_ms = i64::try_from(interval.as_millis()).unwrap_or(10_000).max(1);
    let ticks = ((hours * 3_600_000.0) / step_ms as f64).ceil() as i64;
    let key = config
        .filter
        .anonymize
        .key
        .as_ref()
        .map(|k| k.expose().to_vec())
        .unwrap_or_default();
    let mut chain = Chain::new(&config, &key, Default::default(), start_ms)?;
    let mut sink = Collect {
        keep: vec!["commands"],
        ..Collect::default()
    };
    let mut offsets = vec![0i64; usize::try_from(partitions.max(1)).unwrap_or(1)];
    let mut timed = Duration::ZERO;
    for tick in 0..ticks {
        let at_ms = start_ms + tick * step_ms;
        let at = Utc.timestamp_millis_opt(at_ms).single().unwrap_or_default();
        let records: Vec<Recorded> = generator
            .tick(at)
            .into_iter()
            .map(|g| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                g.key.hash(&mut h);
                let p = (h.finish() % offsets.len() as u64) as usize;
                let offset = offsets[p];
                offsets[p] += 1;
                Recorded {
                    key: Some(g.key),
                    payload: Some(g.payload),
                    headers: Vec::new(),
                    partition: i32::try_from(p).unwrap_or(0),
                    offset,
                    timestamp_ms: Some(at_ms),
                }
            })
            .collect();
        let began = Instant::now();
        for r in &records {
            chain.push(r, &mut sink);
        }
        timed += began.elapsed();
    }
    let began = Instant::now();
    chain.finish(&mut sink);
    timed += began.elapsed();
    let counts = chain.counts();
    let wall_s = timed.as_secs_f64().max(1e-9);
    let simulated_s = (ticks * step_ms) as f64 / 1000.0;
    Ok(ReplayFigures {
        services,
        simulated_hours: simulated_s / 3600.0,
        interval_s: step_ms as f64 / 1000.0,
        records: counts.records,
        wall_s,
        records_per_s: counts.records as f64 / wall_s,
        simulated_per_wall: simulated_s / wall_s,
        commands: counts.commands.values().sum(),
        aggregates: counts.outputs.get("aggregates").copied().unwrap_or(0),
        peak_rss_mib: peak_rss_mib(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_replay_bench_drives_every_stage_and_decides() {
        let f = run(3, 0.5, Duration::from_secs(10), 6).unwrap_or_else(|e| panic!("{e}"));
        // 3 services x 5 metrics x 180 ticks, give or take the generator's bad records.
        assert!(f.records >= 3 * 5 * 180, "{f:?}");
        // One-minute windows over half an hour: about 30 per (service, metric).
        assert!(f.aggregates >= 3 * 5 * 25, "{f:?}");
        assert!(f.commands > 0, "{f:?}");
    }
}
