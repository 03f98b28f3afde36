//! The backtest report: `report.json` (the contract: `policies.<name>.sla_violation_minutes`,
//! `.replica_minutes`, `.scale_actions`), `report.md` for people, and a one-screen summary.
//! Numbers are rounded to fixed decimals and maps are ordered, so the same run writes the
//! same bytes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::Serialize;

use crate::sim::{ClusterModel, Totals};

/// Why the report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// JSON serialisation failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// A plot could not be drawn.
    #[error("plot {path}: {why}")]
    Plot {
        /// The file.
        path: String,
        /// The cause.
        why: String,
    },
}

fn round(x: f64, decimals: i32) -> f64 {
    let p = 10f64.powi(decimals);
    if x.is_finite() {
        (x * p).round() / p
    } else {
        x
    }
}

/// One policy's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PolicyResult {
    /// Minutes whose simulated p95 latency broke the SLO.
    pub sla_violation_minutes: f64,
    /// Replica-minutes billed (cost).
    pub replica_minutes: f64,
    /// Times the replica count changed.
    pub scale_actions: u64,
    /// Share of requests served (the rest waited past the timeout).
    pub served_fraction: f64,
    /// Mean replicas billed.
    pub mean_replicas: f64,
}

impl PolicyResult {
    /// From a simulation's totals.
    pub fn from_totals(t: &Totals) -> Self {
        let offered = t.served + t.unserved;
        Self {
            sla_violation_minutes: round(t.sla_violation_minutes, 3),
            replica_minutes: round(t.replica_minutes, 3),
            scale_actions: t.scale_actions,
            served_fraction: round(
                if offered > 0.0 {
                    t.served / offered
                } else {
                    1.0
                },
                6,
            ),
            mean_replicas: round(
                if t.minutes > 0.0 {
                    t.replica_minutes / t.minutes
                } else {
                    0.0
                },
                3,
            ),
        }
    }
}

/// The replayed input.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct InputInfo {
    /// The file (as given).
    pub file: String,
    /// Its time and value columns.
    pub time_column: String,
    /// Value column, read as one service's request rate.
    pub value_column: String,
    /// Rows replayed.
    pub rows: usize,
    /// Rows skipped as gaps: their time or value cell held no value (empty, `NaN`, `null`).
    #[serde(default)]
    pub missing_values: u64,
    /// The line of the first of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_missing_line: Option<u64>,
    /// Rows whose request rate was below zero: replayed as zero (no load), by every policy
    /// and the simulator alike.
    #[serde(default)]
    pub negative_values: u64,
    /// The time of the first of them (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_negative_at: Option<String>,
    /// Median sampling step, seconds.
    pub step_seconds: f64,
    /// First and last time (RFC 3339).
    pub from: String,
    /// Last time.
    pub until: String,
    /// Simulated minutes.
    pub minutes: f64,
}

/// Anomaly detection scored against labelled windows, where the input has labels.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnomalyScore {
    /// Labelled anomaly windows.
    pub windows: usize,
    /// Windows with at least one detection.
    pub detected: usize,
    /// Detections.
    pub detections: usize,
    /// Detections inside a labelled window.
    pub true_positives: usize,
    /// detected / windows.
    pub recall: f64,
    /// true_positives / detections.
    pub precision: f64,
    /// Mean minutes from a window's start to its first detection.
    pub mean_detection_delay_minutes: Option<f64>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What was replayed.
    pub input: InputInfo,
    /// The simulated service.
    pub cluster: ClusterModel,
    /// Whether the capacity per replica came from config or was derived from the load.
    pub capacity_source: String,
    /// The utilization every scaling policy targets.
    pub target_utilization: f64,
    /// Per policy: `ebb`, `hpa`, `static`, `oracle`.
    pub policies: BTreeMap<String, PolicyResult>,
    /// ebb against the HPA baseline.
    pub verdict: Verdict,
    /// Anomaly detection, where labels exist.
    pub anomalies: Option<AnomalyScore>,
    /// What ebb's decisions rested on, window by window, and what held them back.
    pub ebb_decisions: Decisions,
    /// The configuration that produced this report (kept so the run can be reproduced).
    pub config_file: String,
}

/// How ebb's policy decided: whether each window's decision rested on the forecast or on the
/// reactive rule standing in for it (and why), and what limited its scale actions. It says
/// why ebb did what it did, e.g. why it behaved exactly like the HPA on some trace.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Decisions {
    /// Windows decided.
    pub windows: u64,
    /// Windows by what the decision rested on: `forecast`, or why the reactive rule stood in
    /// (`warming_up`, `no_better_than_last`, `error_too_high`, `stale`, ...).
    pub basis: BTreeMap<String, u64>,
    /// Scale actions by the rule that fired (`forecast`, `reactive`).
    pub actions: BTreeMap<String, u64>,
    /// Scale actions changed by each safety limit (`cost_ceiling`, `up_stabilization`, ...).
    pub limited_by: BTreeMap<String, u64>,
}

impl Decisions {
    /// One sentence for `report.md`.
    pub fn sentence(&self) -> String {
        let list = |m: &BTreeMap<String, u64>| {
            let mut v: Vec<(&String, &u64)> = m.iter().collect();
            // Largest first; ties by name, so the sentence is the same every run.
            v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            v.iter()
                .map(|(k, n)| format!("{} {n}", k.replace('_', " ")))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let on_forecast = self.basis.get("forecast").copied().unwrap_or(0);
        let share = if self.windows > 0 {
            100.0 * on_forecast as f64 / self.windows as f64
        } else {
            0.0
        };
        let mut fallbacks = self.basis.clone();
        fallbacks.remove("forecast");
        let mut s = format!(
            "ebb's decisions: {on_forecast} of {} windows ({share:.0}%) rested on the forecast",
            self.windows
        );
        if !fallbacks.is_empty() {
            s.push_str(&format!(
                "; the reactive rule stood in for the others ({})",
                list(&fallbacks)
            ));
        }
        s.push('.');
        if !self.actions.is_empty() {
            s.push_str(&format!(" Scale actions by rule: {}", list(&self.actions)));
            if !self.limited_by.is_empty() {
                s.push_str(&format!("; changed by limits: {}", list(&self.limited_by)));
            }
            s.push('.');
        }
        s
    }
}

/// ebb against the HPA baseline, in two booleans and two ratios.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// ebb broke the SLO for fewer minutes than HPA.
    pub fewer_violations_than_hpa: bool,
    /// ebb billed no more replica-minutes than HPA.
    pub no_more_cost_than_hpa: bool,
    /// ebb's violation minutes over HPA's (0 when HPA had none).
    pub violation_ratio: f64,
    /// ebb's replica-minutes over HPA's.
    pub cost_ratio: f64,
}

impl Verdict {
    /// Compares `ebb` with `hpa`.
    pub fn of(ebb: &PolicyResult, hpa: &PolicyResult) -> Self {
        let ratio = |a: f64, b: f64| if b > 0.0 { round(a / b, 4) } else { 0.0 };
        Self {
            fewer_violations_than_hpa: ebb.sla_violation_minutes < hpa.sla_violation_minutes
                || (hpa.sla_violation_minutes == 0.0 && ebb.sla_violation_minutes == 0.0),
            no_more_cost_than_hpa: ebb.replica_minutes <= hpa.replica_minutes,
            violation_ratio: ratio(ebb.sla_violation_minutes, hpa.sla_violation_minutes),
            cost_ratio: ratio(ebb.replica_minutes, hpa.replica_minutes),
        }
    }
}

/// The policies a replay compares, in report order.
pub const POLICIES: [&str; 4] = ["ebb", "hpa", "static", "oracle"];

/// Writes one report file, naming it in the error.
pub(crate) fn write(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    std::fs::write(path, bytes).map_err(|source| ReportError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// A markdown table of `policies`, one row per policy in report order.
pub fn policy_table(policies: &BTreeMap<String, PolicyResult>) -> String {
    let mut out = String::new();
    out.push_str("| policy | SLA-violation minutes | replica-minutes | scale actions | served | mean replicas |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|\n");
    for name in POLICIES {
        if let Some(p) = policies.get(name) {
            out.push_str(&format!(
                "| {name} | {:.1} | {:.1} | {} | {:.4} | {:.2} |\n",
                p.sla_violation_minutes,
                p.replica_minutes,
                p.scale_actions,
                p.served_fraction,
                p.mean_replicas
            ));
        }
    }
    out
}

impl Report {
    /// Writes `report.json` and `report.md` into `dir` (which must exist).
    pub fn write(&self, dir: &Path) -> Result<(), ReportError> {
        let mut json = serde_json::to_vec_pretty(self)?;
        json.push(b'\n');
        write(&dir.join("report.json"), &json)?;
        write(&dir.join("report.md"), self.markdown().as_bytes())
    }

    /// The policy table, one row per policy.
    pub fn table(&self) -> String {
        policy_table(&self.policies)
    }

    /// `report.md`.
    pub fn markdown(&self) -> String {
        let i = &self.input;
        let c = &self.cluster;
        let mut md = format!(
            "# ebb replay: {}\n\n{} rows of `{}` as one service's request rate, every {} s, from {} to {} ({:.0} simulated minutes).\n\n",
            i.file, i.rows, i.value_column, i.step_seconds, i.from, i.until, i.minutes
        );
        if let Some(line) = i.first_missing_line {
            md.push_str(&format!(
                "{} rows held no value (an empty, `NaN` or `null` cell, the first on line {line}) and were skipped as gaps in the series.\n\n",
                i.missing_values
            ));
        }
        if let Some(at) = &i.first_negative_at {
            md.push_str(&format!(
                "{} rows held a negative request rate (the first at {at}) and were replayed as zero: a rate cannot be negative, so the column may not be the one meant.\n\n",
                i.negative_values
            ));
        }
        md.push_str(&format!(
            "Simulated service: {:.4} requests/s per replica ({}), replicas ready {} s after they are asked for, p95 = {} ms / (1 - utilization) plus queueing, SLO p95 <= {} ms (utilization {:.2}), requests dropped after {} s in queue. Scaling policies target {:.0}% utilization.\n\n",
            c.capacity_per_replica,
            self.capacity_source,
            c.startup_s,
            c.base_latency_ms,
            c.slo_ms,
            c.slo_utilization(),
            c.timeout_s,
            100.0 * self.target_utilization
        ));
        md.push_str(&self.table());
        let v = &self.verdict;
        md.push_str(&format!(
            "\nebb vs HPA: {:.0}% of its SLA-violation minutes ({}), {:.0}% of its replica-minutes ({}).\n",
            100.0 * v.violation_ratio,
            if v.fewer_violations_than_hpa { "fewer" } else { "not fewer" },
            100.0 * v.cost_ratio,
            if v.no_more_cost_than_hpa { "no more" } else { "more" },
        ));
        md.push_str(&format!("\n{}\n", self.ebb_decisions.sentence()));
        if let Some(a) = &self.anomalies {
            md.push_str(&format!(
                "\nAnomalies: {} of {} labelled windows detected (recall {:.2}), precision {:.2} over {} detections{}.\n",
                a.detected,
                a.windows,
                a.recall,
                a.precision,
                a.detections,
                a.mean_detection_delay_minutes
                    .map(|d| format!(", first detection {d:.0} min into a window on average"))
                    .unwrap_or_default()
            ));
        }
        md.push_str("\n![load and capacity](load.svg)\n\n![replicas](replicas.svg)\n\n");
        md.push_str(&format!(
            "Reproduce: `ebb replay --config {} --file {} --time-column {} --value-column {} --report DIR`\n",
            self.config_file, i.file, i.time_column, i.value_column
        ));
        md
    }

    /// The one-screen summary printed at the end of a replay.
    pub fn summary(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(out, "{}", self.table())?;
        let v = &self.verdict;
        writeln!(
            out,
            "ebb vs hpa: violations x{:.2} ({}), cost x{:.2} ({})",
            v.violation_ratio,
            if v.fewer_violations_than_hpa {
                "fewer"
            } else {
                "NOT fewer"
            },
            v.cost_ratio,
            if v.no_more_cost_than_hpa {
                "no more"
            } else {
                "MORE"
            }
        )?;
        if self.ebb_decisions.windows > 0 {
            writeln!(out, "{}", self.ebb_decisions.sentence())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decisions_sentence_names_the_share_on_the_forecast_and_why_not_largest_first() {
        let count = |pairs: &[(&str, u64)]| {
            pairs
                .iter()
                .map(|(k, n)| ((*k).to_string(), *n))
                .collect::<BTreeMap<_, _>>()
        };
        let d = Decisions {
            windows: 200,
            basis: count(&[
                ("forecast", 150),
                ("warming_up", 10),
                ("error_too_high", 40),
            ]),
            actions: count(&[("forecast", 12), ("reactive", 3)]),
            limited_by: count(&[("cost_ceiling", 2)]),
        };
        assert_eq!(
            d.sentence(),
            "ebb's decisions: 150 of 200 windows (75%) rested on the forecast; the reactive rule \
             stood in for the others (error too high 40, warming up 10). Scale actions by rule: \
             forecast 12, reactive 3; changed by limits: cost ceiling 2."
        );
        assert_eq!(
            Decisions::default().sentence(),
            "ebb's decisions: 0 of 0 windows (0%) rested on the forecast."
        );
    }
}
