//! **models**: window aggregates in; per service, anomalies (k-means and DBSCAN over the
//! service's own normal states, combined) and load forecasts out.

pub mod config;
pub mod detect;
pub mod forecast;
pub mod process;
pub mod table;

#[cfg(test)]
mod tests;

pub use config::ModelsConfig;
pub use process::{
    ModelTables, ModelsCounts, ModelsStage, ANOMALIES, EVENTS, FORECASTS, REASONS, STATE,
};
