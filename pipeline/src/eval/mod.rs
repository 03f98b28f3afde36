//! `ebb eval`: the models measured on recorded, labelled data nobody here made. The anomaly
//! detectors run exactly as in the models stage (online, one window at a time, no peeking
//! ahead) and are scored with NAB's rules; the forecaster is scored against naive forecasts.

pub mod forecast;
pub mod nab;
pub mod series;

use std::path::Path;

use crate::stages::models::detect::{AnomalyModel, DetectorConfig};

/// The detector name used in NAB's results layout.
pub const DETECTOR: &str = "ebb";

/// What `ebb eval` can fail on.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The NAB folder.
    #[error(transparent)]
    Nab(#[from] nab::NabError),
    /// A series file.
    #[error(transparent)]
    Series(#[from] series::SeriesError),
}

/// Per-row anomaly scores of one series, from a fresh model fed one row at a time.
pub fn anomaly_scores(values: &[f64], cfg: &DetectorConfig) -> Vec<f64> {
    let mut model = AnomalyModel::new(1);
    values
        .iter()
        .map(|&v| nab::round_score(model.update(&[Some(v)], &["value"], cfg).score))
        .collect()
}

/// Runs the detectors over every file of a NAB-layout folder and scores them with NAB's
/// standard profile; writes NAB's results layout under `results` when given.
pub fn anomalies(
    dir: &Path,
    results: Option<&Path>,
    cfg: &DetectorConfig,
) -> Result<nab::CorpusScore, EvalError> {
    let files = nab::load_corpus(dir)?;
    let scores: Vec<Vec<f64>> = files
        .iter()
        .map(|f| anomaly_scores(&f.series.values, cfg))
        .collect();
    if let Some(out) = results {
        nab::write_results(out, DETECTOR, &files, &scores)?;
    }
    Ok(nab::score_corpus(&files, &scores, nab::Profile::STANDARD))
}
