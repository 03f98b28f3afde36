//! One time series read from a CSV file: a time column and a value column, by name.

use std::path::{Path, PathBuf};

/// What can go wrong reading a series.
#[derive(Debug, thiserror::Error)]
pub enum SeriesError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: csv::Error,
    },
    /// A named column is not in the header.
    #[error("{path}: no column {column:?} in the header (columns: {header})")]
    NoColumn {
        /// The file.
        path: PathBuf,
        /// The missing column.
        column: String,
        /// The header it has.
        header: String,
    },
    /// A cell could not be read.
    #[error("{path}:{line}: {why}")]
    Cell {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: u64,
        /// What is wrong.
        why: String,
    },
    /// Fewer than two rows.
    #[error("{0}: fewer than two data rows")]
    TooShort(PathBuf),
}

/// A series: event times (UTC milliseconds), values, and the cells as written.
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// Event times, UTC epoch milliseconds.
    pub times: Vec<i64>,
    /// Values.
    pub values: Vec<f64>,
    /// The time cells as the file spelled them.
    pub raw_times: Vec<String>,
    /// The value cells as the file spelled them.
    pub raw_values: Vec<String>,
}

impl Series {
    /// Rows.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// A series of `values` one minute apart from the epoch (for tests and benchmarks).
    pub fn synthetic(values: Vec<f64>) -> Self {
        let times: Vec<i64> = (0..values.len() as i64).map(|i| i * 60_000).collect();
        Self {
            raw_times: times.iter().map(|t| t.to_string()).collect(),
            raw_values: values.iter().map(|v| v.to_string()).collect(),
            times,
            values,
        }
    }

    /// The median spacing between rows, in milliseconds (at least 1).
    pub fn step_ms(&self) -> i64 {
        let mut d: Vec<i64> = self
            .times
            .windows(2)
            .map(|w| w[1] - w[0])
            .filter(|d| *d > 0)
            .collect();
        if d.is_empty() {
            return 1;
        }
        let mid = d.len() / 2;
        *d.select_nth_unstable(mid).1
    }
}

/// Parses a timestamp as NAB and most exports write it (naive times are UTC), to epoch ms.
pub fn parse_time(text: &str) -> Option<i64> {
    ebb_udf_core::time::to_utc(text.trim(), "UTC")
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Reads `time_column` and `value_column` of the CSV at `path`. Every row must parse: a bad
/// cell is an error naming its line, never a silently skipped row.
pub fn read_series(
    path: &Path,
    time_column: &str,
    value_column: &str,
) -> Result<Series, SeriesError> {
    let io = |source| SeriesError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(path)
        .map_err(io)?;
    let header = reader.headers().map_err(io)?.clone();
    let find = |column: &str| {
        header
            .iter()
            .position(|h| h == column)
            .ok_or_else(|| SeriesError::NoColumn {
                path: path.to_path_buf(),
                column: column.to_string(),
                header: header.iter().collect::<Vec<_>>().join(","),
            })
    };
    let (t, v) = (find(time_column)?, find(value_column)?);
    let mut series = Series::default();
    let mut record = csv::StringRecord::new();
    while reader.read_record(&mut record).map_err(io)? {
        let line = record.position().map_or(0, |p| p.line());
        let cell = |i: usize| record.get(i).unwrap_or("");
        let bad = |why: String| SeriesError::Cell {
            path: path.to_path_buf(),
            line,
            why,
        };
        let (time, value) = (cell(t), cell(v));
        let ms = parse_time(time)
            .ok_or_else(|| bad(format!("{time_column} {time:?} is not a timestamp")))?;
        let x: f64 = value
            .parse()
            .ok()
            .filter(|x: &f64| x.is_finite())
            .ok_or_else(|| bad(format!("{value_column} {value:?} is not a finite number")))?;
        series.times.push(ms);
        series.values.push(x);
        series.raw_times.push(time.to_string());
        series.raw_values.push(value.to_string());
    }
    if series.len() < 2 {
        return Err(SeriesError::TooShort(path.to_path_buf()));
    }
    Ok(series)
}
