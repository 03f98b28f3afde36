//! Backtesting for ebb: what a policy would have done to a service's latency and bill.
//!
//! [`sim::Cluster`] simulates one service's replicas under a policy: new replicas start
//! after a delay, each serves a fixed capacity, requests above capacity queue (and time out),
//! and p95 latency follows the utilization. [`policies`] holds the baselines that need no
//! forecasting (static peak provisioning and the oracle); the pipeline drives ebb's policy
//! and the HPA-style reactive rule with its own decide code. [`report`] writes what a team
//! reads: `report.json`, `report.md` and SVG plots; [`fleet`] sums many services' replays.

pub mod fleet;
pub mod plot;
pub mod policies;
pub mod report;
pub mod sim;

pub use report::{Decisions, PolicyResult, Report};
pub use sim::{Cluster, ClusterModel, Step};
