//! The Numenta Anomaly Benchmark's scoring, ported rule for rule from NAB's `sweeper.py` and
//! `optimizer.py`: scaled-sigmoid credit inside labelled windows, weighted false positives
//! outside them, a probationary period, one threshold optimised over the whole corpus, and
//! normalisation against a detector that never fires. Any folder laid out like NAB's
//! `data/` (`<category>/<file>.csv` with `timestamp,value`) with `combined_windows.json`
//! beside the categories can be loaded and scored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::series::{read_series, ReadMode, Series, SeriesError};

/// NAB's probationary share of each file: its first 15% (at most 750 rows) is not scored.
pub const PROBATION: f64 = 0.15;

/// What can go wrong loading a NAB-layout folder.
#[derive(Debug, thiserror::Error)]
pub enum NabError {
    /// A file or folder could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The labels file is not what NAB writes.
    #[error("{path}: {why}")]
    Labels {
        /// The labels file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A data file could not be read as a series.
    #[error(transparent)]
    Series(#[from] SeriesError),
    /// No data files at all.
    #[error("{0}: no <category>/<file>.csv data files found")]
    Empty(PathBuf),
}

/// A cost profile (NAB's `profiles.json`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Profile {
    /// Weight of a detected window.
    pub tp: f64,
    /// Weight of a false positive.
    pub fp: f64,
    /// Weight of a missed window.
    pub fn_: f64,
}

impl Profile {
    /// NAB's standard profile.
    pub const STANDARD: Profile = Profile {
        tp: 1.0,
        fp: 0.11,
        fn_: 1.0,
    };
}

/// One labelled data file.
#[derive(Debug, Clone)]
pub struct NabFile {
    /// `category/file.csv`, as in `combined_windows.json`.
    pub rel: String,
    /// The series.
    pub series: Series,
    /// Labelled windows as inclusive row ranges.
    pub windows: Vec<(usize, usize)>,
}

/// Where the labels of the data folder `dir` are: `combined_windows.json` among the
/// category folders, beside `dir`, or in NAB's own `labels/` beside `dir`. A NAB checkout's
/// root stands for its `data/`.
fn locate(dir: &Path) -> (PathBuf, PathBuf) {
    let candidates = |d: &Path| {
        [
            d.join("combined_windows.json"),
            d.join("../combined_windows.json"),
            d.join("../labels/combined_windows.json"),
        ]
    };
    let data = dir.join("data");
    let roots: &[&Path] = if data.is_dir() && !dir.join("combined_windows.json").is_file() {
        &[&data, dir]
    } else {
        &[dir]
    };
    for root in roots {
        if let Some(found) = candidates(root).into_iter().find(|p| p.is_file()) {
            return (root.to_path_buf(), found);
        }
    }
    (dir.to_path_buf(), dir.join("combined_windows.json"))
}

/// Loads every `<category>/*.csv` under `dir` with its windows from the
/// `combined_windows.json` that goes with it (see `locate`). A file the labels do not list
/// has no windows (NAB warns and does the same); a window boundary that is not one of the
/// file's timestamps is an error, as in NAB.
pub fn load_corpus(dir: &Path) -> Result<Vec<NabFile>, NabError> {
    let (data_dir, labels_path) = locate(dir);
    let dir = data_dir.as_path();
    let text = std::fs::read_to_string(&labels_path).map_err(|source| NabError::Io {
        path: labels_path.clone(),
        source,
    })?;
    let labels: BTreeMap<String, Vec<Vec<String>>> =
        serde_json::from_str(&text).map_err(|e| NabError::Labels {
            path: labels_path.clone(),
            why: e.to_string(),
        })?;
    let mut files = Vec::new();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| NabError::Io { path, source }
    };
    let mut categories: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    categories.sort();
    for category in categories {
        let mut csvs: Vec<PathBuf> = std::fs::read_dir(&category)
            .map_err(io(&category))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "csv"))
            .collect();
        csvs.sort();
        for path in csvs {
            let (Some(cat), Some(name)) = (
                category.file_name().and_then(|n| n.to_str()),
                path.file_name().and_then(|n| n.to_str()),
            ) else {
                continue;
            };
            let rel = format!("{cat}/{name}");
            let series = read_series(&path, "timestamp", "value", ReadMode::Exact)?;
            let mut windows = Vec::new();
            for w in labels.get(&rel).map(Vec::as_slice).unwrap_or_default() {
                let [start, end] = w.as_slice() else {
                    return Err(NabError::Labels {
                        path: labels_path.clone(),
                        why: format!("{rel}: a window is not [start, end]"),
                    });
                };
                let find = |t: &str| -> Result<usize, NabError> {
                    let ms = super::series::parse_time(t).map_err(|_| NabError::Labels {
                        path: labels_path.clone(),
                        why: format!("{rel}: window bound {t:?} is not a timestamp"),
                    })?;
                    series
                        .times
                        .iter()
                        .position(|&x| x == ms)
                        .ok_or_else(|| NabError::Labels {
                            path: labels_path.clone(),
                            why: format!("{rel}: window bound {t} is not a timestamp of the file"),
                        })
                };
                windows.push((find(start)?, find(end)?));
            }
            windows.sort_unstable();
            files.push(NabFile {
                rel,
                series,
                windows,
            });
        }
    }
    if files.is_empty() {
        return Err(NabError::Empty(dir.to_path_buf()));
    }
    Ok(files)
}

/// A scorable row: its anomaly score, its sweep credit, and its window (global id).
#[derive(Debug, Clone, Copy)]
struct Point {
    score: f64,
    credit: f64,
    window: Option<usize>,
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// NAB's scaled sigmoid of a relative position (-1 = a window's left edge, 0 its right).
fn scaled_sigmoid(position: f64) -> f64 {
    if position > 3.0 {
        -1.0
    } else {
        2.0 * sigmoid(-5.0 * position) - 1.0
    }
}

/// Rows NAB leaves out at the start of a file of `n` rows.
pub fn probation_rows(n: usize) -> usize {
    ((PROBATION * n as f64).floor()).min(PROBATION * 5000.0) as usize
}

/// The scorable rows of one file (NAB's `calcSweepScore` less the probationary rows);
/// window ids start at `first_window`.
fn sweep(file: &NabFile, scores: &[f64], profile: Profile, first_window: usize) -> Vec<Point> {
    let n = file.series.len();
    let probation = probation_rows(n);
    let max_tp = scaled_sigmoid(-1.0);
    let mut points = Vec::with_capacity(n.saturating_sub(probation));
    let mut windows = file.windows.iter().enumerate().peekable();
    let mut current: Option<(usize, usize, f64)> = None; // (id, right index, width)
    let mut previous: Option<(usize, f64)> = None; // (right index, width)
    for i in 0..n {
        if current.is_none() {
            if let Some(&(w, &(left, right))) = windows.peek() {
                if left == i {
                    current = Some((first_window + w, right, (right - left + 1) as f64));
                    windows.next();
                }
            }
        }
        let credit = match current {
            Some((_, right, width)) => {
                let position = -((right as f64) - i as f64 + 1.0) / width;
                scaled_sigmoid(position) * profile.tp / max_tp
            }
            None => {
                let unweighted = match previous {
                    None => -1.0,
                    Some((right, width)) if width > 1.0 => {
                        scaled_sigmoid((right as f64 - i as f64).abs() / (width - 1.0))
                    }
                    Some(_) => -1.0,
                };
                unweighted * profile.fp
            }
        };
        if i >= probation {
            points.push(Point {
                score: scores.get(i).copied().unwrap_or(0.0),
                credit,
                window: current.map(|(id, _, _)| id),
            });
        }
        if let Some((_, right, width)) = current {
            if right == i {
                previous = Some((right, width));
                current = None;
            }
        }
    }
    points
}

/// Counts and score of one file (or the corpus) at one threshold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Tally {
    /// NAB raw score.
    pub score: f64,
    /// Detected rows inside windows.
    pub tp: u64,
    /// Undetected rows outside windows.
    pub tn: u64,
    /// Detected rows outside windows.
    pub fp: u64,
    /// Undetected rows inside windows.
    pub fn_: u64,
    /// Windows with at least one detection.
    pub windows_detected: u64,
    /// Windows with scorable rows.
    pub windows: u64,
}

impl Tally {
    /// Row precision: detections that fell inside a labelled window.
    pub fn precision(&self) -> f64 {
        if self.tp + self.fp == 0 {
            0.0
        } else {
            self.tp as f64 / (self.tp + self.fp) as f64
        }
    }

    /// Window recall: labelled windows with at least one detection.
    pub fn recall(&self) -> f64 {
        if self.windows == 0 {
            0.0
        } else {
            self.windows_detected as f64 / self.windows as f64
        }
    }

    fn add(&mut self, o: &Tally) {
        self.score += o.score;
        self.tp += o.tp;
        self.tn += o.tn;
        self.fp += o.fp;
        self.fn_ += o.fn_;
        self.windows_detected += o.windows_detected;
        self.windows += o.windows;
    }
}

/// Scores points at `threshold` (a row is a detection when its score is at least it).
fn tally(points: &[Point], threshold: f64, profile: Profile) -> Tally {
    let mut best: BTreeMap<usize, Option<f64>> = BTreeMap::new();
    let mut t = Tally::default();
    let mut fp_sum = 0.0;
    for p in points {
        let detected = p.score >= threshold;
        match (p.window, detected) {
            (Some(w), true) => {
                t.tp += 1;
                let e = best.entry(w).or_insert(None);
                *e = Some(e.map_or(p.credit, |b: f64| b.max(p.credit)));
            }
            (Some(w), false) => {
                t.fn_ += 1;
                best.entry(w).or_insert(None);
            }
            (None, true) => {
                t.fp += 1;
                fp_sum += p.credit;
            }
            (None, false) => t.tn += 1,
        }
    }
    t.windows = best.len() as u64;
    t.windows_detected = best.values().filter(|b| b.is_some()).count() as u64;
    t.score = fp_sum
        + best
            .values()
            .map(|b| b.map_or(-profile.fn_, |c| c.max(-profile.fn_)))
            .sum::<f64>();
    t
}

/// The threshold NAB's optimiser picks over all files: the one with the best summed score,
/// the highest such threshold on a tie (NAB's stable sort keeps the first it met).
fn optimise(points: &[Point], profile: Profile) -> f64 {
    let mut order: Vec<&Point> = points.iter().collect();
    order.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut parts: BTreeMap<usize, f64> = BTreeMap::new();
    for p in points {
        if let Some(w) = p.window {
            parts.insert(w, -profile.fn_);
        }
    }
    let mut windows_sum: f64 = parts.values().sum();
    let mut fp_sum = 0.0;
    let (mut best_score, mut best_threshold) = (windows_sum, 1.1);
    let mut current = 1.1;
    for p in order {
        if p.score != current {
            let s = fp_sum + windows_sum;
            if s > best_score {
                best_score = s;
                best_threshold = current;
            }
            current = p.score;
        }
        match p.window {
            None => fp_sum += p.credit,
            Some(w) => {
                if let Some(part) = parts.get_mut(&w) {
                    if p.credit > *part {
                        windows_sum += p.credit - *part;
                        *part = p.credit;
                    }
                }
            }
        }
    }
    if fp_sum + windows_sum > best_score {
        best_threshold = current;
    }
    best_threshold
}

/// One file's figures at the corpus threshold.
#[derive(Debug, Clone, Serialize)]
pub struct FileScore {
    /// `category/file.csv`.
    pub file: String,
    /// Its tally.
    #[serde(flatten)]
    pub tally: Tally,
    /// NAB's normalised score for this file alone (at the corpus threshold); `None` for a
    /// file without windows, where it is undefined.
    pub score_standard: Option<f64>,
    /// Precision of its rows.
    pub precision: f64,
    /// Recall of its windows.
    pub recall: f64,
}

/// The corpus figures.
#[derive(Debug, Clone, Serialize)]
pub struct CorpusScore {
    /// NAB's normalised score: 100 (raw - null) / (perfect - null).
    pub score_standard: f64,
    /// The optimised threshold.
    pub threshold: f64,
    /// Raw score at it.
    pub raw: f64,
    /// The null detector's raw score.
    pub null: f64,
    /// A perfect detector's raw score (tp weight x windows).
    pub perfect: f64,
    /// Row precision at the threshold.
    pub precision: f64,
    /// Window recall at the threshold.
    pub recall: f64,
    /// Summed tally.
    pub tally: Tally,
    /// Per file.
    pub files: Vec<FileScore>,
}

/// Scores `scores[i]` (one anomaly score per row of `files[i]`) the way NAB's
/// `run.py --optimize --score --normalize` does.
pub fn score_corpus(files: &[NabFile], scores: &[Vec<f64>], profile: Profile) -> CorpusScore {
    let mut per_file = Vec::with_capacity(files.len());
    let mut null_per_file = Vec::with_capacity(files.len());
    let mut first = 0;
    for (file, s) in files.iter().zip(scores) {
        per_file.push(sweep(file, s, profile, first));
        null_per_file.push(sweep(file, &vec![0.0; file.series.len()], profile, first));
        first += file.windows.len();
    }
    let all: Vec<Point> = per_file.iter().flatten().copied().collect();
    let threshold = optimise(&all, profile);
    let null_all: Vec<Point> = null_per_file.iter().flatten().copied().collect();
    let null_threshold = optimise(&null_all, profile);
    let null = tally(&null_all, null_threshold, profile).score;
    let perfect = profile.tp * first as f64;
    let normalise = |raw: f64, null: f64, perfect: f64| {
        if perfect - null == 0.0 {
            0.0
        } else {
            100.0 * (raw - null) / (perfect - null)
        }
    };
    let mut total = Tally::default();
    let mut file_scores = Vec::with_capacity(files.len());
    for ((file, points), null_points) in files.iter().zip(&per_file).zip(&null_per_file) {
        let t = tally(points, threshold, profile);
        total.add(&t);
        let file_null = tally(null_points, null_threshold, profile).score;
        let file_perfect = profile.tp * file.windows.len() as f64;
        file_scores.push(FileScore {
            file: file.rel.clone(),
            score_standard: (!file.windows.is_empty())
                .then(|| normalise(t.score, file_null, file_perfect)),
            precision: t.precision(),
            recall: t.recall(),
            tally: t,
        });
    }
    CorpusScore {
        score_standard: normalise(total.score, null, perfect),
        threshold,
        raw: total.score,
        null,
        perfect,
        precision: total.precision(),
        recall: total.recall(),
        tally: total,
        files: file_scores,
    }
}

/// Writes NAB's results layout: `dir/<detector>/<category>/<detector>_<file>.csv` with
/// `timestamp,value,anomaly_score,label`, one row per data row, the timestamps as the data
/// file spelled them.
pub fn write_results(
    dir: &Path,
    detector: &str,
    files: &[NabFile],
    scores: &[Vec<f64>],
) -> Result<(), NabError> {
    for (file, s) in files.iter().zip(scores) {
        let (category, name) = file.rel.split_once('/').unwrap_or(("", file.rel.as_str()));
        let folder = dir.join(detector).join(category);
        std::fs::create_dir_all(&folder).map_err(|source| NabError::Io {
            path: folder.clone(),
            source,
        })?;
        let path = folder.join(format!("{detector}_{name}"));
        let mut out = String::with_capacity(file.series.len() * 48);
        out.push_str("timestamp,value,anomaly_score,label\n");
        let mut label = vec![0u8; file.series.len()];
        for &(l, r) in &file.windows {
            for x in &mut label[l..=r] {
                *x = 1;
            }
        }
        let rows = file
            .series
            .raw_times
            .iter()
            .zip(&file.series.raw_values)
            .zip(&label)
            .enumerate();
        for (i, ((time, value), label)) in rows {
            use std::fmt::Write;
            let score = format_score(s.get(i).copied().unwrap_or(0.0));
            let _ = writeln!(out, "{time},{value},{score},{label}");
        }
        std::fs::write(&path, out).map_err(|source| NabError::Io { path, source })?;
    }
    Ok(())
}

/// Scores are rounded to 9 decimals before scoring and writing, so that what NAB's scorer
/// parses from the file is exactly what ebb scored.
pub fn round_score(s: f64) -> f64 {
    let s = if s.is_finite() {
        s.clamp(0.0, 1.0)
    } else {
        0.0
    };
    (s * 1e9).round() / 1e9
}

fn format_score(s: f64) -> String {
    format!("{:.9}", round_score(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(n: usize, windows: Vec<(usize, usize)>) -> NabFile {
        NabFile {
            rel: "cat/f.csv".into(),
            series: Series::synthetic((0..n).map(|i| i as f64).collect()),
            windows,
        }
    }

    #[test]
    fn a_detection_at_a_windows_left_edge_earns_full_credit() {
        let f = file(1000, vec![(500, 599)]);
        let mut s = vec![0.0; 1000];
        s[500] = 1.0;
        let c = score_corpus(&[f], &[s], Profile::STANDARD);
        assert!((c.raw - 1.0).abs() < 1e-9, "{c:?}");
        assert!((c.score_standard - 100.0).abs() < 1e-9);
        assert_eq!(c.tally.windows_detected, 1);
    }

    #[test]
    fn the_null_detector_scores_zero_and_false_positives_cost() {
        let f = file(1000, vec![(500, 599)]);
        let c = score_corpus(
            std::slice::from_ref(&f),
            &[vec![0.0; 1000]],
            Profile::STANDARD,
        );
        assert_eq!(c.score_standard, 0.0);
        assert_eq!(c.null, -1.0);
        // One detection far before the window: -fp weight, worse than staying silent, so the
        // optimiser keeps the threshold above it.
        let mut s = vec![0.0; 1000];
        s[300] = 0.9;
        let c = score_corpus(&[f], &[s], Profile::STANDARD);
        assert!(c.threshold > 0.9);
        assert_eq!(c.raw, -1.0);
    }

    #[test]
    fn only_the_best_detection_in_a_window_counts_and_late_ones_earn_less() {
        let f = file(1000, vec![(500, 599)]);
        let mut late = vec![0.0; 1000];
        late[590] = 1.0;
        let mut both = late.clone();
        both[510] = 1.0;
        let late = score_corpus(std::slice::from_ref(&f), &[late], Profile::STANDARD);
        let both = score_corpus(&[f], &[both], Profile::STANDARD);
        assert!(late.raw < both.raw && late.raw > 0.0);
        assert!(both.raw < 1.0);
    }

    #[test]
    fn rows_in_the_probationary_period_are_not_scored() {
        assert_eq!(probation_rows(1000), 150);
        assert_eq!(probation_rows(100_000), 750);
        let f = file(1000, vec![(10, 20), (500, 599)]);
        let c = score_corpus(&[f], &[vec![0.0; 1000]], Profile::STANDARD);
        // The first window lies in probation: it is neither missed nor found, yet a perfect
        // detector is credited for it, as in NAB.
        assert_eq!(c.tally.windows, 1);
        assert_eq!(c.perfect, 2.0);
    }

    #[test]
    fn a_nab_checkout_is_read_from_its_root_or_its_data_folder_with_labels_beside() {
        let root = std::env::temp_dir().join(format!("ebb-nab-{}", rand::random::<u32>()));
        let cat = root.join("data").join("realThings");
        std::fs::create_dir_all(&cat).unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir_all(root.join("labels")).unwrap_or_else(|e| panic!("{e}"));
        let mut csv = String::from("timestamp,value\n");
        for m in 0..10 {
            csv.push_str(&format!("2026-01-05 00:{m:02}:00,{m}\n"));
        }
        std::fs::write(cat.join("a.csv"), csv).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            root.join("labels").join("combined_windows.json"),
            r#"{"realThings/a.csv": [["2026-01-05 00:03:00.000000", "2026-01-05 00:05:00.000000"]]}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        for dir in [root.clone(), root.join("data")] {
            let files = load_corpus(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            assert_eq!(files.len(), 1, "{}", dir.display());
            assert_eq!(files[0].rel, "realThings/a.csv");
            assert_eq!(files[0].windows, vec![(3, 5)]);
        }
        let _ = std::fs::remove_dir_all(&root);
    }
}
