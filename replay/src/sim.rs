//! One service's replicas under a policy, step by step.
//!
//! The model, stated once: each ready replica serves `capacity_per_replica` requests per
//! second; a replica asked for becomes ready `startup_s` later (and is billed from the moment
//! it is asked for); removing replicas takes effect at once. Requests beyond capacity queue,
//! and those that would wait longer than `timeout_s` are dropped (unserved). The p95 latency
//! of a step is the M/M/1-style `base / (1 - utilization)` (utilization capped at 0.99),
//! plus the wait of the queue left at its end; a step whose p95 exceeds the SLO counts its
//! minutes as SLA-violation minutes.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// The simulated service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterModel {
    /// Requests per second one replica serves at 100%.
    pub capacity_per_replica: f64,
    /// Seconds from asking for a replica to it serving.
    pub startup_s: f64,
    /// p95 latency of an idle replica, ms.
    pub base_latency_ms: f64,
    /// The latency objective on p95, ms.
    pub slo_ms: f64,
    /// Queued requests older than this are dropped, seconds.
    pub timeout_s: f64,
}

impl ClusterModel {
    /// The highest utilization whose p95 meets the SLO (with no queue).
    pub fn slo_utilization(&self) -> f64 {
        (1.0 - self.base_latency_ms / self.slo_ms).clamp(0.0, 0.99)
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Step {
    /// Step start, epoch ms.
    pub t_ms: i64,
    /// Offered load, requests per second.
    pub load: f64,
    /// Replicas serving.
    pub ready: u32,
    /// Replicas asked for (billed).
    pub target: u32,
    /// Simulated p95 latency, ms (infinite with no replica).
    pub p95_ms: f64,
    /// Whether the step broke the SLO.
    pub violated: bool,
}

/// Totals over a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Totals {
    /// Minutes whose p95 broke the SLO.
    pub sla_violation_minutes: f64,
    /// Replica-minutes billed.
    pub replica_minutes: f64,
    /// Times the target changed.
    pub scale_actions: u64,
    /// Requests served.
    pub served: f64,
    /// Requests dropped after waiting `timeout_s`.
    pub unserved: f64,
    /// Simulated minutes.
    pub minutes: f64,
}

/// A service's replicas over time.
#[derive(Debug, Clone)]
pub struct Cluster {
    model: ClusterModel,
    ready: u32,
    starting: VecDeque<(i64, u32)>,
    target: u32,
    backlog: f64,
    totals: Totals,
    steps: Vec<Step>,
}

impl Cluster {
    /// A cluster running `replicas` ready replicas.
    pub fn new(model: ClusterModel, replicas: u32) -> Self {
        Self {
            model,
            ready: replicas,
            starting: VecDeque::new(),
            target: replicas,
            backlog: 0.0,
            totals: Totals::default(),
            steps: Vec::new(),
        }
    }

    /// The model.
    pub fn model(&self) -> &ClusterModel {
        &self.model
    }

    /// Replicas serving now.
    pub fn ready(&self) -> u32 {
        self.ready
    }

    /// Replicas asked for.
    pub fn target(&self) -> u32 {
        self.target
    }

    /// Asks for `n` replicas at `t_ms`.
    pub fn scale(&mut self, t_ms: i64, n: u32) {
        if n == self.target {
            return;
        }
        self.totals.scale_actions += 1;
        if n > self.target {
            let startup_ms = (self.model.startup_s * 1000.0).round() as i64;
            self.starting
                .push_back((t_ms + startup_ms, n - self.target));
        } else {
            // Fewest-served first: replicas still starting are cancelled before ready ones go.
            let mut remove = self.target - n;
            while remove > 0 {
                match self.starting.back_mut() {
                    Some((_, k)) if *k > remove => {
                        *k -= remove;
                        remove = 0;
                    }
                    Some((_, k)) => {
                        remove -= *k;
                        self.starting.pop_back();
                    }
                    None => {
                        self.ready = self.ready.saturating_sub(remove);
                        remove = 0;
                    }
                }
            }
        }
        self.target = n;
    }

    /// Serves `load` requests per second for `dt_s` seconds from `t_ms`. Replicas whose
    /// start-up ends inside the step serve from that moment on.
    pub fn step(&mut self, t_ms: i64, dt_s: f64, load: f64) -> Step {
        let load = load.max(0.0);
        let end_ms = t_ms + ((dt_s * 1000.0).round() as i64).max(1);
        self.ready_by(t_ms);
        let (mut from, mut p95_ms, mut violated_s) = (t_ms, 0.0_f64, 0.0);
        loop {
            let until = self
                .starting
                .front()
                .map_or(end_ms, |(at, _)| (*at).clamp(from, end_ms));
            let seconds = (until - from) as f64 / 1000.0;
            if seconds > 0.0 {
                let p95 = self.serve(seconds, load);
                p95_ms = p95_ms.max(p95);
                if p95 > self.model.slo_ms {
                    violated_s += seconds;
                }
            }
            if until >= end_ms {
                break;
            }
            self.ready_by(until);
            from = until;
        }
        let minutes = dt_s / 60.0;
        let violated = violated_s > 0.0;
        self.totals.minutes += minutes;
        self.totals.replica_minutes += f64::from(self.target) * minutes;
        self.totals.sla_violation_minutes += violated_s / 60.0;
        let step = Step {
            t_ms,
            load,
            ready: self.ready,
            target: self.target,
            p95_ms,
            violated,
        };
        self.steps.push(step);
        // Replicas whose start-up ends with the step are ready when a policy looks at its end
        // (the step's own record keeps the replicas that served it).
        self.ready_by(end_ms);
        step
    }

    /// Counts the replicas whose start-up has ended by `t_ms` as ready.
    fn ready_by(&mut self, t_ms: i64) {
        while self.starting.front().is_some_and(|(at, _)| *at <= t_ms) {
            if let Some((_, k)) = self.starting.pop_front() {
                self.ready += k;
            }
        }
    }

    /// Serves `load` for `seconds` on the ready replicas; returns the p95 latency, ms.
    fn serve(&mut self, seconds: f64, load: f64) -> f64 {
        let m = &self.model;
        let capacity = f64::from(self.ready) * m.capacity_per_replica;
        let demand = load * seconds + self.backlog;
        let served = demand.min(capacity * seconds);
        let mut backlog = demand - served;
        let max_backlog = capacity * m.timeout_s;
        if backlog > max_backlog {
            self.totals.unserved += backlog - max_backlog;
            backlog = max_backlog;
        }
        self.backlog = backlog;
        self.totals.served += served;
        if capacity <= 0.0 {
            if load > 0.0 {
                f64::INFINITY
            } else {
                0.0
            }
        } else {
            let u = (load / capacity).min(0.99);
            m.base_latency_ms / (1.0 - u) + 1000.0 * backlog / capacity
        }
    }

    /// Totals so far.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Every step so far.
    pub fn steps(&self) -> &[Step] {
        &self.steps
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
    fn new_replicas_serve_only_after_their_startup_and_are_billed_from_the_ask() {
        let mut c = Cluster::new(model(), 2);
        c.scale(0, 4);
        let s = c.step(0, 30.0, 15.0);
        assert_eq!((s.ready, s.target), (2, 4));
        assert!(!s.violated, "15 on 20 is 75%: {s:?}");
        let s = c.step(60_000, 30.0, 15.0);
        assert_eq!(s.ready, 4);
        assert!((c.totals().replica_minutes - 4.0).abs() < 1e-9);
        assert_eq!(c.totals().scale_actions, 1);
    }

    #[test]
    fn replicas_whose_startup_ends_with_the_step_count_as_ready_at_its_end() {
        // Asked for at 0, ready at 60 s: a policy deciding at the end of the step from 0 to
        // 60 s sees them, as the HPA sees pods that turned ready by its next sync.
        let mut c = Cluster::new(model(), 2);
        c.scale(0, 4);
        let s = c.step(0, 60.0, 15.0);
        assert_eq!(c.ready(), 4, "{s:?}");
        assert_eq!(s.ready, 2, "the step itself was served by two: {s:?}");
    }

    #[test]
    fn replicas_ready_inside_a_long_step_serve_its_rest() {
        let mut c = Cluster::new(model(), 1);
        c.scale(0, 3);
        // 20/s on 10/s for the first minute, then on 30/s for four (which drain the queue).
        let s = c.step(0, 300.0, 20.0);
        assert_eq!(s.ready, 3);
        assert!(s.violated);
        let t = c.totals();
        assert!(
            (t.sla_violation_minutes - 1.0).abs() < 1e-9,
            "only the minute before the replicas came: {t:?}"
        );
        assert!(t.unserved > 0.0);
        assert!((t.replica_minutes - 15.0).abs() < 1e-9);
    }

    #[test]
    fn overload_queues_breaks_the_slo_and_drops_what_waits_too_long() {
        let mut c = Cluster::new(model(), 1);
        let s = c.step(0, 60.0, 30.0);
        assert!(s.violated);
        // 20/s more than capacity for 60 s: 1200 queued, at most 30 s (300) kept.
        assert!((c.totals().unserved - 900.0).abs() < 1e-6);
        assert!((c.totals().sla_violation_minutes - 1.0).abs() < 1e-9);
        // Enough replicas drain it.
        c.scale(60_000, 10);
        c.step(120_000, 60.0, 30.0);
        let s = c.step(180_000, 60.0, 30.0);
        assert!(!s.violated, "{s:?}");
    }

    #[test]
    fn scaling_down_cancels_starting_replicas_first() {
        let mut c = Cluster::new(model(), 3);
        c.scale(0, 6);
        c.scale(1000, 4);
        c.step(2000, 1.0, 0.0);
        assert_eq!((c.ready(), c.target()), (3, 4));
        c.scale(3000, 2);
        assert_eq!((c.ready(), c.target()), (2, 2));
        let s = c.step(120_000, 1.0, 0.0);
        assert_eq!(s.ready, 2, "cancelled replicas never arrive");
        assert!((model().slo_utilization() - 0.8).abs() < 1e-12);
    }
}
