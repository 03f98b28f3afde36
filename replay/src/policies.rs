//! Driving a policy over a load series, and the baselines that need no forecasting.

use crate::sim::{Cluster, ClusterModel};

/// A scaling policy as the simulator sees it.
pub trait Policy {
    /// After step `i` (ending at `t_ms`, load `load`), the replicas to ask for, if it changes.
    fn decide(&mut self, i: usize, t_ms: i64, load: f64, cluster: &Cluster) -> Option<u32>;
}

/// Runs `policy` over `loads` sampled at `times` (epoch ms), each step lasting `step_ms`,
/// from `initial` replicas.
pub fn run(
    policy: &mut dyn Policy,
    times: &[i64],
    loads: &[f64],
    step_ms: i64,
    model: &ClusterModel,
    initial: u32,
) -> Cluster {
    let mut cluster = Cluster::new(model.clone(), initial);
    let dt_s = step_ms as f64 / 1000.0;
    for (i, (&t, &load)) in times.iter().zip(loads).enumerate() {
        cluster.step(t, dt_s, load);
        let end = t + step_ms;
        if let Some(n) = policy.decide(i, end, load, &cluster) {
            cluster.scale(end, n);
        }
    }
    cluster
}

/// Replicas that serve `load` at `utilization`.
pub fn replicas_for(load: f64, model: &ClusterModel, utilization: f64) -> u32 {
    let x = load.max(0.0) / (model.capacity_per_replica * utilization);
    if x.is_finite() {
        (x.ceil() as u32).max(1)
    } else {
        1
    }
}

/// Provisioned once for the peak: never scales.
#[derive(Debug)]
pub struct Static;

impl Policy for Static {
    fn decide(&mut self, _: usize, _: i64, _: f64, _: &Cluster) -> Option<u32> {
        None
    }
}

/// The replicas a static deployment needs for the series' peak at `utilization`.
pub fn static_replicas(loads: &[f64], model: &ClusterModel, utilization: f64) -> u32 {
    let peak = loads.iter().copied().fold(0.0, f64::max);
    replicas_for(peak, model, utilization)
}

/// Knows the future: asks for exactly what each coming step needs at the highest
/// utilization that meets the SLO, early enough for the start-up delay. The lower bound on
/// cost at (almost) no violation.
#[derive(Debug)]
pub struct Oracle {
    needs: Vec<u32>,
    ahead: usize,
}

impl Oracle {
    /// An oracle for `loads`, sampled `step_ms` apart.
    pub fn new(loads: &[f64], model: &ClusterModel, step_ms: i64) -> Self {
        // A hair under the SLO's utilization, so rounding never lands on the boundary.
        let u = model.slo_utilization() * 0.98;
        let needs = loads.iter().map(|&l| replicas_for(l, model, u)).collect();
        let ahead = ((model.startup_s * 1000.0) / step_ms.max(1) as f64).ceil() as usize;
        Self {
            needs,
            ahead: ahead.max(1),
        }
    }

    /// What the first steps need (the initial deployment).
    pub fn initial(&self) -> u32 {
        self.needs[..(self.ahead + 1).min(self.needs.len())]
            .iter()
            .copied()
            .max()
            .unwrap_or(1)
    }
}

impl Policy for Oracle {
    fn decide(&mut self, i: usize, _: i64, _: f64, _: &Cluster) -> Option<u32> {
        // Asked for now, a replica serves from step i + 1 + ahead; until the next decision's
        // replicas can serve, steps i + 1 ..= i + 1 + ahead rely on this target.
        let from = (i + 1).min(self.needs.len());
        let to = (i + 2 + self.ahead).min(self.needs.len());
        self.needs[from..to].iter().copied().max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ClusterModel {
        ClusterModel {
            capacity_per_replica: 10.0,
            startup_s: 60.0,
            base_latency_ms: 50.0,
            slo_ms: 250.0,
            timeout_s: 30.0,
        }
    }

    #[test]
    fn the_oracle_never_breaks_the_slo_and_costs_no_more_than_static() {
        let loads: Vec<f64> = (0..500)
            .map(|i| {
                100.0 + 80.0 * ((i as f64) / 40.0).sin() + if i % 97 == 0 { 150.0 } else { 0.0 }
            })
            .collect();
        let times: Vec<i64> = (0..500).map(|i| i * 60_000).collect();
        let m = model();
        let mut oracle = Oracle::new(&loads, &m, 60_000);
        let initial = oracle.initial();
        let o = run(&mut oracle, &times, &loads, 60_000, &m, initial).totals();
        let n = static_replicas(&loads, &m, 0.7);
        let s = run(&mut Static, &times, &loads, 60_000, &m, n).totals();
        assert_eq!(o.sla_violation_minutes, 0.0);
        assert_eq!(s.sla_violation_minutes, 0.0);
        assert!(o.replica_minutes < s.replica_minutes);
        assert_eq!(s.scale_actions, 0);
    }
}
