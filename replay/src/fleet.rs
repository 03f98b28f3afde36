//! Many services' replays summed into one fleet: the report of a topic replay.
//!
//! Each service is simulated on its own (its own derived capacity per replica); the fleet
//! adds their replicas, costs and violation minutes, and draws load in replica-equivalents
//! (each service's load over its capacity per replica) so services of any size add up.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::plot;
use crate::report::{policy_table, write, PolicyResult, Report, ReportError, Verdict, POLICIES};
use crate::sim::{Cluster, ClusterModel, Step, Totals};

/// Rows of the per-service table in `report.md` at most (the JSON has every service).
const MAX_ROWS: usize = 200;

/// One service's result in a fleet.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceResult {
    /// Each policy's figures on the service's load.
    pub policies: BTreeMap<String, PolicyResult>,
    /// ebb against the HPA baseline.
    pub verdict: Verdict,
    /// The capacity per replica simulated.
    pub capacity_per_replica: f64,
}

/// Services' replays as they are added.
#[derive(Debug, Default)]
pub struct Fleet {
    steps: BTreeMap<String, BTreeMap<i64, Step>>,
    totals: BTreeMap<String, Totals>,
    services: BTreeMap<String, ServiceResult>,
    model: Option<ClusterModel>,
    target_utilization: f64,
}

impl Fleet {
    /// Adds one service's report and its policies' simulations.
    pub fn add(&mut self, service: &str, report: &Report, runs: &[(&str, Cluster)]) {
        let capacity = report.cluster.capacity_per_replica;
        for (name, cluster) in runs {
            let steps = self.steps.entry((*name).to_string()).or_default();
            for s in cluster.steps() {
                let f = steps.entry(s.t_ms).or_insert(Step {
                    t_ms: s.t_ms,
                    load: 0.0,
                    ready: 0,
                    target: 0,
                    p95_ms: 0.0,
                    violated: false,
                });
                if capacity > 0.0 {
                    f.load += s.load / capacity;
                }
                f.ready = f.ready.saturating_add(s.ready);
                f.target = f.target.saturating_add(s.target);
                f.p95_ms = f.p95_ms.max(s.p95_ms);
                f.violated |= s.violated;
            }
            let t = cluster.totals();
            let sum = self.totals.entry((*name).to_string()).or_default();
            sum.sla_violation_minutes += t.sla_violation_minutes;
            sum.replica_minutes += t.replica_minutes;
            sum.scale_actions += t.scale_actions;
            sum.served += t.served;
            sum.unserved += t.unserved;
            sum.minutes = sum.minutes.max(t.minutes);
        }
        self.services.insert(
            service.to_string(),
            ServiceResult {
                policies: report.policies.clone(),
                verdict: report.verdict.clone(),
                capacity_per_replica: capacity,
            },
        );
        self.model.get_or_insert_with(|| report.cluster.clone());
        self.target_utilization = report.target_utilization;
    }

    /// Services added.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// Whether no service was added.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// The fleet's report on `source` (what was replayed) between `from` and `until`.
    pub fn report(&self, source: &str, from: Option<String>, until: Option<String>) -> FleetReport {
        let policies: BTreeMap<String, PolicyResult> = self
            .totals
            .iter()
            .map(|(name, t)| (name.clone(), PolicyResult::from_totals(t)))
            .collect();
        let none = PolicyResult::default();
        let verdict = Verdict::of(
            policies.get("ebb").unwrap_or(&none),
            policies.get("hpa").unwrap_or(&none),
        );
        let better = self
            .services
            .values()
            .filter(|s| s.verdict.fewer_violations_than_hpa && s.verdict.no_more_cost_than_hpa)
            .count();
        FleetReport {
            source: source.to_string(),
            from,
            until,
            services: self.services.len(),
            model: self.model.as_ref().map(|m| Simulated {
                startup_s: m.startup_s,
                base_latency_ms: m.base_latency_ms,
                slo_ms: m.slo_ms,
                slo_utilization: m.slo_utilization(),
                timeout_s: m.timeout_s,
            }),
            target_utilization: self.target_utilization,
            policies,
            verdict,
            services_better_than_hpa: better,
            by_service: self.services.clone(),
        }
    }

    /// Writes `report.json`, `report.md`, `load.svg` and `replicas.svg` of `report` into
    /// `dir` (which must exist).
    pub fn write(&self, report: &FleetReport, dir: &Path) -> Result<(), ReportError> {
        let mut json = serde_json::to_vec_pretty(report)?;
        json.push(b'\n');
        write(&dir.join("report.json"), &json)?;
        write(&dir.join("report.md"), report.markdown().as_bytes())?;
        let steps: Vec<(&str, Vec<Step>)> = POLICIES
            .into_iter()
            .filter_map(|name| {
                self.steps
                    .get(name)
                    .map(|s| (name, s.values().copied().collect()))
            })
            .collect();
        let runs: Vec<(&str, &[Step])> = steps.iter().map(|(n, s)| (*n, s.as_slice())).collect();
        plot::load_vs_capacity(
            &dir.join("load.svg"),
            &runs,
            1.0,
            "replicas at 100%, summed over services",
            &[],
        )?;
        plot::replicas(&dir.join("replicas.svg"), &runs)
    }
}

/// What every service of a fleet is simulated with.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Simulated {
    /// Seconds from asking for a replica to it serving.
    pub startup_s: f64,
    /// p95 latency of an idle replica, ms.
    pub base_latency_ms: f64,
    /// The latency objective on p95, ms.
    pub slo_ms: f64,
    /// The highest utilization that meets it.
    pub slo_utilization: f64,
    /// Queued requests older than this are dropped, seconds.
    pub timeout_s: f64,
}

/// A fleet's replay: `report.json` of a topic replay.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FleetReport {
    /// What was replayed.
    pub source: String,
    /// First window simulated (RFC 3339).
    pub from: Option<String>,
    /// Last.
    pub until: Option<String>,
    /// Services simulated.
    pub services: usize,
    /// The simulated service, but for the capacity per replica: each service's own, in
    /// `by_service`.
    pub model: Option<Simulated>,
    /// Utilization the policies target.
    pub target_utilization: f64,
    /// Each policy summed over the services.
    pub policies: BTreeMap<String, PolicyResult>,
    /// ebb against the HPA baseline, fleet-wide.
    pub verdict: Verdict,
    /// Services where ebb broke the SLO less than the HPA at no more cost.
    pub services_better_than_hpa: usize,
    /// Each service's figures.
    pub by_service: BTreeMap<String, ServiceResult>,
}

impl FleetReport {
    /// `report.md`.
    pub fn markdown(&self) -> String {
        let mut md = format!("# ebb replay: {}\n\n", self.source);
        md.push_str(&format!(
            "{} services' recorded load, from {} to {}, each through the cluster simulator under ebb's policy, the HPA baseline, static peak provisioning and the oracle.",
            self.services,
            self.from.as_deref().unwrap_or("-"),
            self.until.as_deref().unwrap_or("-"),
        ));
        if let Some(m) = &self.model {
            md.push_str(&format!(
                " Replicas ready {} s after they are asked for, p95 = {} ms / (1 - utilization) plus queueing, SLO p95 <= {} ms (utilization {:.2}), requests dropped after {} s in queue; policies target {:.0}% utilization; each service's capacity per replica is in `report.json`.",
                m.startup_s,
                m.base_latency_ms,
                m.slo_ms,
                m.slo_utilization,
                m.timeout_s,
                100.0 * self.target_utilization
            ));
        }
        md.push_str("\n\n## The fleet\n\n");
        md.push_str(&policy_table(&self.policies));
        let v = &self.verdict;
        md.push_str(&format!(
            "\nebb vs HPA over the fleet: {:.0}% of its SLA-violation minutes, {:.0}% of its replica-minutes. Fewer violation minutes at no more cost on {} of {} services.\n\n",
            100.0 * v.violation_ratio,
            100.0 * v.cost_ratio,
            self.services_better_than_hpa,
            self.services
        ));
        md.push_str(
            "![load and capacity](load.svg)\n\n![replicas](replicas.svg)\n\n## Services\n\n",
        );
        md.push_str("| service | ebb SLA-violation min | HPA SLA-violation min | ebb / HPA replica-min | fewer, no more cost |\n|---|---:|---:|---:|---|\n");
        // The services where ebb did worst against the HPA first: what a reader checks.
        let mut rows: Vec<(&String, &ServiceResult)> = self.by_service.iter().collect();
        let excess = |s: &ServiceResult| {
            let get = |n: &str| s.policies.get(n).map_or(0.0, |p| p.sla_violation_minutes);
            get("ebb") - get("hpa")
        };
        rows.sort_by(|a, b| excess(b.1).total_cmp(&excess(a.1)).then(a.0.cmp(b.0)));
        for (service, s) in rows.iter().take(MAX_ROWS) {
            let get = |n: &str| s.policies.get(n).cloned().unwrap_or_default();
            let (e, h) = (get("ebb"), get("hpa"));
            md.push_str(&format!(
                "| {service} | {:.1} | {:.1} | {:.3} | {} |\n",
                e.sla_violation_minutes,
                h.sla_violation_minutes,
                s.verdict.cost_ratio,
                if s.verdict.fewer_violations_than_hpa && s.verdict.no_more_cost_than_hpa {
                    "yes"
                } else {
                    "no"
                }
            ));
        }
        if rows.len() > MAX_ROWS {
            md.push_str(&format!(
                "\n{} more services in `report.json`.\n",
                rows.len() - MAX_ROWS
            ));
        }
        md.push_str("\nThe configuration used is `ebb.toml` beside this report; `summary.json` has the offsets read.\n");
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policies::{run, Static};

    fn model(capacity: f64) -> ClusterModel {
        ClusterModel {
            capacity_per_replica: capacity,
            startup_s: 60.0,
            base_latency_ms: 50.0,
            slo_ms: 250.0,
            timeout_s: 30.0,
        }
    }

    fn service(capacity: f64, replicas: u32, load: f64) -> (Report, Vec<(&'static str, Cluster)>) {
        let times: Vec<i64> = (0..10).map(|i| i * 60_000).collect();
        let loads = vec![load; 10];
        let m = model(capacity);
        let runs = vec![
            (
                "ebb",
                run(&mut Static, &times, &loads, 60_000, &m, replicas),
            ),
            (
                "hpa",
                run(&mut Static, &times, &loads, 60_000, &m, replicas + 1),
            ),
        ];
        let policies: BTreeMap<String, PolicyResult> = runs
            .iter()
            .map(|(n, c)| ((*n).to_string(), PolicyResult::from_totals(&c.totals())))
            .collect();
        let verdict = Verdict::of(&policies["ebb"], &policies["hpa"]);
        let report = Report {
            input: crate::report::InputInfo {
                file: "s".into(),
                time_column: "t".into(),
                value_column: "v".into(),
                rows: 10,
                step_seconds: 60.0,
                from: String::new(),
                until: String::new(),
                minutes: 10.0,
                ..Default::default()
            },
            cluster: m,
            capacity_source: "test".into(),
            target_utilization: 0.7,
            policies,
            verdict,
            anomalies: None,
            ebb_decisions: Default::default(),
            config_file: "ebb.toml".into(),
        };
        (report, runs)
    }

    #[test]
    fn a_fleet_adds_its_services_costs_and_replicas_in_load_units_of_each() {
        let mut fleet = Fleet::default();
        // 5 req/s on replicas of 1: 2 replicas are 250% (violating); 3.5 req/s on replicas
        // of 10: 1 replica is 35%.
        let (a, runs_a) = service(1.0, 2, 5.0);
        let (b, runs_b) = service(10.0, 1, 3.5);
        fleet.add("a", &a, &runs_a);
        fleet.add("b", &b, &runs_b);
        let r = fleet.report("topic", None, None);
        assert_eq!(r.services, 2);
        assert!((r.policies["ebb"].replica_minutes - 30.0).abs() < 1e-9);
        assert!((r.policies["hpa"].replica_minutes - 50.0).abs() < 1e-9);
        assert!((r.policies["ebb"].sla_violation_minutes - 10.0).abs() < 1e-9);
        let ebb = &fleet.steps["ebb"];
        assert_eq!(ebb.len(), 10);
        let s = ebb.values().next().copied();
        assert!(s.is_some_and(|s| s.ready == 3 && (s.load - 5.35).abs() < 1e-9 && s.violated));
        // b broke nothing either way, at less cost: it counts.
        assert!(r.markdown().contains("on 1 of 2 services"));
        assert!(r.verdict.no_more_cost_than_hpa && !r.verdict.fewer_violations_than_hpa);
    }
}
