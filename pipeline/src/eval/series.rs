//! One time series read from a file: a time column and a value column, by name. CSV, JSON
//! lines (`.jsonl`, `.ndjson`) and Parquet (`.parquet`) are told apart by the extension.

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
    /// A JSON lines or Parquet file could not be read.
    #[error("{0}: {1}")]
    Read(PathBuf, String),
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
    /// Rows skipped because a cell held no value (empty, `NaN`, `null`, `NA`...).
    pub missing: u64,
    /// The line (or row) of the first of them.
    pub first_missing: Option<u64>,
}

/// How strictly a file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// Every row must hold a time and a value, and the cells are kept as written (NAB's
    /// results repeat them row for row).
    Exact,
    /// A row whose time or value cell holds no value is a gap in the series: skipped and
    /// counted, as exports of real metrics have them. Anything else unreadable is still an
    /// error naming its line.
    Gaps,
}

/// Cells that spell "no value" in the exports people replay (pandas' default set, less
/// the exotic ones).
fn is_missing(cell: &str) -> bool {
    const NONE: &[&str] = &[
        "", "nan", "-nan", "+nan", "null", "none", "na", "n/a", "#n/a", "<na>", "nil", "-",
    ];
    let c = cell.trim();
    c.len() <= 5 && NONE.iter().any(|n| c.eq_ignore_ascii_case(n))
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
            ..Self::default()
        }
    }

    /// Whether the rows are in time order (equal times allowed).
    pub fn is_time_ordered(&self) -> bool {
        self.times.windows(2).all(|w| w[0] <= w[1])
    }

    /// Puts the rows in time order, rows of equal time as written. Exports are not always
    /// in order (a merge of several files, a query without ORDER BY), and every reader of a
    /// series walks it forward in time.
    pub fn sort_by_time(&mut self) {
        if self.is_time_ordered() {
            return;
        }
        let mut order: Vec<usize> = (0..self.times.len()).collect();
        order.sort_by_key(|&i| self.times[i]);
        self.times = order.iter().map(|&i| self.times[i]).collect();
        self.values = order.iter().map(|&i| self.values[i]).collect();
        if self.raw_times.len() == order.len() {
            self.raw_times = order.iter().map(|&i| self.raw_times[i].clone()).collect();
        }
        if self.raw_values.len() == order.len() {
            self.raw_values = order.iter().map(|&i| self.raw_values[i].clone()).collect();
        }
    }

    /// The median spacing between rows in time order, in milliseconds (at least 1).
    pub fn step_ms(&self) -> i64 {
        let mut sorted;
        let times = if self.is_time_ordered() {
            &self.times
        } else {
            sorted = self.times.clone();
            sorted.sort_unstable();
            &sorted
        };
        let mut d: Vec<i64> = times
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
pub fn parse_time(text: &str) -> Result<i64, ebb_udf_core::TimeError> {
    ebb_udf_core::time::to_utc(text.trim(), "UTC").map(|t| t.timestamp_millis())
}

/// Reads `time_column` and `value_column` of the file at `path` (CSV, or JSON lines or
/// Parquet by extension). A bad cell is an error naming its line (or row); under
/// [`ReadMode::Gaps`] a cell with no value skips its row, counted in [`Series::missing`].
pub fn read_series(
    path: &Path,
    time_column: &str,
    value_column: &str,
    mode: ReadMode,
) -> Result<Series, SeriesError> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let columns = Columns {
        time: time_column,
        value: value_column,
        mode,
        decimal_comma: false,
    };
    let series = match ext.as_str() {
        "jsonl" | "ndjson" => read_jsonl(path, columns)?,
        "parquet" => read_parquet(path, columns)?,
        _ => read_csv(path, columns)?,
    };
    if series.len() < 2 {
        return Err(SeriesError::TooShort(path.to_path_buf()));
    }
    let mut series = series;
    // Exact readers repeat the rows as written (NAB's results); the others read a series.
    if mode == ReadMode::Gaps {
        series.sort_by_time();
    }
    Ok(series)
}

/// The two columns read, and how.
#[derive(Clone, Copy)]
struct Columns<'a> {
    time: &'a str,
    value: &'a str,
    mode: ReadMode,
    /// Values may write their decimals after a comma (`12,5`), as files delimited by
    /// semicolons do where the comma is the decimal mark.
    decimal_comma: bool,
}

/// A finite number; with `decimal_comma`, `12,5` is 12.5 too.
fn parse_value(cell: &str, decimal_comma: bool) -> Option<f64> {
    let x = match cell.parse::<f64>() {
        Ok(x) => x,
        Err(_) if decimal_comma && cell.matches(',').count() == 1 && !cell.contains('.') => {
            cell.replacen(',', ".", 1).parse::<f64>().ok()?
        }
        Err(_) => return None,
    };
    x.is_finite().then_some(x)
}

/// The delimiter of a delimited text file, from its header line: the one of `,` `;` tab
/// `|` that splits it most (a comma on a tie or when none does). Spreadsheets in much of
/// Europe write `;`, and `.tsv` exports tabs.
fn sniff_delimiter(path: &Path) -> u8 {
    use std::io::{BufRead, Read};
    let Ok(file) = std::fs::File::open(path) else {
        return b',';
    };
    let mut header = Vec::new();
    let mut reader = std::io::BufReader::new(file).take(64 * 1024);
    if reader.read_until(b'\n', &mut header).is_err() {
        return b',';
    }
    [b',', b';', b'\t', b'|']
        .into_iter()
        .map(|d| (header.iter().filter(|&&b| b == d).count(), d))
        .fold((0, b','), |best, c| if c.0 > best.0 { c } else { best })
        .1
}

/// Adds one row, checking both cells; `line` and `bad` name the row in an error. `None`
/// stands for a null (Parquet, JSON) cell.
fn push_row(
    series: &mut Series,
    columns: Columns<'_>,
    (time, value): (Option<&str>, Option<&str>),
    line: u64,
    bad: impl Fn(String) -> SeriesError,
) -> Result<(), SeriesError> {
    let (tc, vc) = (columns.time, columns.value);
    if columns.mode == ReadMode::Gaps
        && (time.is_none_or(is_missing) || value.is_none_or(is_missing))
    {
        series.missing += 1;
        series.first_missing.get_or_insert(line);
        return Ok(());
    }
    let (Some(time), Some(value)) = (time, value) else {
        let column = if time.is_none() { tc } else { vc };
        return Err(bad(format!("{column} is null")));
    };
    let ms = parse_time(time).map_err(|e| bad(format!("{tc}: {e}")))?;
    let x: f64 = parse_value(value.trim(), columns.decimal_comma)
        .ok_or_else(|| bad(format!("{vc} {value:?} is not a finite number")))?;
    series.times.push(ms);
    series.values.push(x);
    if columns.mode == ReadMode::Exact {
        series.raw_times.push(time.to_string());
        series.raw_values.push(value.to_string());
    }
    Ok(())
}

fn read_jsonl(path: &Path, columns: Columns<'_>) -> Result<Series, SeriesError> {
    use std::io::BufRead;
    let file = std::fs::File::open(path)
        .map_err(|e| SeriesError::Read(path.to_path_buf(), e.to_string()))?;
    let mut series = Series::default();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| SeriesError::Read(path.to_path_buf(), e.to_string()))?;
        let n = u64::try_from(i + 1).unwrap_or(u64::MAX);
        let bad = |why: String| SeriesError::Cell {
            path: path.to_path_buf(),
            line: n,
            why,
        };
        if line.trim().is_empty() {
            continue;
        }
        let row: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let cell = |column: &str| match row.get(column) {
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(v @ serde_json::Value::Number(_)) => Ok(Some(v.to_string())),
            Some(serde_json::Value::Null) => Ok(None),
            Some(other) => Err(bad(format!("{column} is {other}, not a string or number"))),
            // An absent field is a misspelt column far more often than a gap.
            None => Err(bad(format!("no field {column:?}"))),
        };
        let (time, value) = (cell(columns.time)?, cell(columns.value)?);
        push_row(
            &mut series,
            columns,
            (time.as_deref(), value.as_deref()),
            n,
            bad,
        )?;
    }
    Ok(series)
}

fn read_parquet(path: &Path, columns: Columns<'_>) -> Result<Series, SeriesError> {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::compute::cast;
    use datafusion::arrow::datatypes::{DataType, Float64Type, TimeUnit, TimestampMillisecondType};
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let fail = |e: &dyn std::fmt::Display| SeriesError::Read(path.to_path_buf(), e.to_string());
    let file = std::fs::File::open(path).map_err(|e| fail(&e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| fail(&e))?
        .build()
        .map_err(|e| fail(&e))?;
    let mut series = Series::default();
    let mut row = 0u64;
    for batch in reader {
        let batch = batch.map_err(|e| fail(&e))?;
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .cloned()
                .ok_or_else(|| SeriesError::NoColumn {
                    path: path.to_path_buf(),
                    column: name.to_string(),
                    header: batch
                        .schema()
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                })
        };
        let (t, v) = (column(columns.time)?, column(columns.value)?);
        let values = cast(&v, &DataType::Float64).map_err(|e| fail(&e))?;
        let values = values.as_primitive::<Float64Type>();
        // Timestamps are taken as stored (UTC); anything else as text, as a CSV cell would.
        let stamps = match t.data_type() {
            DataType::Timestamp(..) | DataType::Date32 | DataType::Date64 => Some(
                cast(&t, &DataType::Timestamp(TimeUnit::Millisecond, None))
                    .map_err(|e| fail(&e))?,
            ),
            _ => None,
        };
        let texts = match stamps {
            Some(_) => None,
            None => Some(cast(&t, &DataType::Utf8).map_err(|e| fail(&e))?),
        };
        for i in 0..batch.num_rows() {
            row += 1;
            let bad = |why: String| SeriesError::Cell {
                path: path.to_path_buf(),
                line: row,
                why,
            };
            let value = (!values.is_null(i)).then(|| values.value(i).to_string());
            let time = match (&stamps, &texts) {
                (Some(s), _) if !s.is_null(i) => {
                    let ms = s.as_primitive::<TimestampMillisecondType>().value(i);
                    Some(crate::stages::window::aggregate::ms_to_rfc3339(ms))
                }
                (None, Some(t)) if !t.is_null(i) => Some(t.as_string::<i32>().value(i).to_string()),
                _ => None,
            };
            push_row(
                &mut series,
                columns,
                (time.as_deref(), value.as_deref()),
                row,
                bad,
            )?;
        }
    }
    Ok(series)
}

fn read_csv(path: &Path, columns: Columns<'_>) -> Result<Series, SeriesError> {
    let io = |source| SeriesError::Io {
        path: path.to_path_buf(),
        source,
    };
    let delimiter = sniff_delimiter(path);
    let columns = Columns {
        decimal_comma: delimiter != b',',
        ..columns
    };
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .delimiter(delimiter)
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
    let (t, v) = (find(columns.time)?, find(columns.value)?);
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
        push_row(
            &mut series,
            columns,
            (Some(cell(t)), Some(cell(v))),
            line,
            bad,
        )?;
    }
    Ok(series)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Float64Array, StringArray, TimestampMillisecondArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use datafusion::arrow::record_batch::RecordBatch;
    use std::sync::Arc;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("ebb-series-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
        d
    }

    fn write_parquet(path: &Path, batch: &RecordBatch) {
        let file = std::fs::File::create(path).unwrap_or_else(|e| panic!("{e}"));
        let mut w = datafusion::parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None)
            .unwrap_or_else(|e| panic!("{e}"));
        w.write(batch).unwrap_or_else(|e| panic!("{e}"));
        w.close().unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn csv_json_lines_and_parquet_give_the_same_series() {
        let d = dir();
        let csv = d.join("load.csv");
        std::fs::write(
            &csv,
            "ts,rps\n2026-01-05 00:00:00,10.5\n2026-01-05 00:05:00,12\n2026-01-05 00:10:00,9\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let jsonl = d.join("load.jsonl");
        std::fs::write(
            &jsonl,
            "{\"ts\":\"2026-01-05T00:00:00Z\",\"rps\":10.5}\n\n{\"ts\":1767571500,\"rps\":\"12\"}\n{\"ts\":\"2026-01-05T01:10:00+01:00\",\"rps\":9}\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let parquet = d.join("load.parquet");
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                false,
            ),
            Field::new("rps", DataType::Float64, false),
            Field::new("note", DataType::Utf8, true),
        ]));
        let t0 = 1_767_571_200_000i64;
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(TimestampMillisecondArray::from(vec![
                    t0,
                    t0 + 300_000,
                    t0 + 600_000,
                ])),
                Arc::new(Float64Array::from(vec![10.5, 12.0, 9.0])),
                Arc::new(StringArray::from(vec![Some("a"), None, Some("c")])),
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        write_parquet(&parquet, &batch);

        let read = |p: &Path| {
            read_series(p, "ts", "rps", ReadMode::Gaps).unwrap_or_else(|e| panic!("{e}"))
        };
        let (a, b, c) = (read(&csv), read(&jsonl), read(&parquet));
        assert_eq!(a.times, vec![t0, t0 + 300_000, t0 + 600_000]);
        assert_eq!(a.values, vec![10.5, 12.0, 9.0]);
        for s in [&b, &c] {
            assert_eq!(s.times, a.times);
            assert_eq!(s.values, a.values);
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn semicolon_and_tab_delimited_files_are_read_with_their_decimal_commas() {
        let d = dir();
        let semi = d.join("excel.csv");
        std::fs::write(
            &semi,
            "\u{feff}ts;rps\n2026-01-05 00:00:00;1,5\n2026-01-05 00:01:00;2\n2026-01-05 00:02:00;1e3\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let s = read_series(&semi, "ts", "rps", ReadMode::Gaps).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.values, vec![1.5, 2.0, 1000.0]);
        let tsv = d.join("export.tsv");
        std::fs::write(&tsv, "ts\trps\n1767571200\t1.5\n1767571260\t2.5\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let s = read_series(&tsv, "ts", "rps", ReadMode::Gaps).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.values, vec![1.5, 2.5]);
        // In a comma-delimited file a comma is never a decimal mark.
        let comma = d.join("plain.csv");
        std::fs::write(&comma, "ts,rps\n1767571200,\"1,5\"\n1767571260,2\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let e = read_series(&comma, "ts", "rps", ReadMode::Gaps).map(|_| ());
        assert!(e.is_err_and(|e| e.to_string().contains(":2:")));
    }

    #[test]
    fn rows_out_of_time_order_are_read_in_time_order_and_spaced_by_their_times() {
        let d = dir();
        let csv = d.join("shuffled.csv");
        // One-minute rows written out of order, two of them at the same time.
        std::fs::write(
            &csv,
            "ts,rps\n2026-01-05 00:03:00,4\n2026-01-05 00:00:00,1\n2026-01-05 00:02:00,3\n\
             2026-01-05 00:01:00,2\n2026-01-05 00:04:00,5\n2026-01-05 00:02:00,3.5\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let s = read_series(&csv, "ts", "rps", ReadMode::Gaps).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.values, vec![1.0, 2.0, 3.0, 3.5, 4.0, 5.0]);
        assert!(s.is_time_ordered());
        assert_eq!(s.step_ms(), 60_000);
        let exact =
            read_series(&csv, "ts", "rps", ReadMode::Exact).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            exact.raw_values[0], "4",
            "exact reads keep the file's order"
        );
        assert_eq!(exact.step_ms(), 60_000, "spacing counts in time order");
    }

    #[test]
    fn cells_with_no_value_are_gaps_counted_but_garbage_is_still_an_error() {
        let d = dir();
        let csv = d.join("gaps.csv");
        std::fs::write(
            &csv,
            "ts,rps\n2026-01-05 00:00:00,1\n2026-01-05 00:01:00,\n2026-01-05 00:02:00,NaN\n\
             2026-01-05 00:03:00,null\n,4\n2026-01-05 00:05:00,N/A\n2026-01-05 00:06:00,7\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let s = read_series(&csv, "ts", "rps", ReadMode::Gaps).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.values, vec![1.0, 7.0]);
        assert_eq!((s.missing, s.first_missing), (5, Some(3)));
        assert!(s.raw_times.is_empty(), "cells are kept only when asked for");
        let exact = read_series(&csv, "ts", "rps", ReadMode::Exact).map(|_| ());
        assert!(
            exact.as_ref().is_err_and(|e| e.to_string().contains(":3:")),
            "{exact:?}"
        );

        let jsonl = d.join("gaps.jsonl");
        std::fs::write(
            &jsonl,
            "{\"ts\":1767571200,\"rps\":1}\n{\"ts\":1767571260,\"rps\":null}\n{\"ts\":1767571320,\"rps\":3}\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let s = read_series(&jsonl, "ts", "rps", ReadMode::Gaps).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (s.values.len(), s.missing, s.first_missing),
            (2, 1, Some(2))
        );

        let parquet = d.join("gaps.parquet");
        let schema = Arc::new(Schema::new(vec![
            Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true),
            Field::new("rps", DataType::Float64, true),
        ]));
        let t0 = 1_767_571_200_000i64;
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(TimestampMillisecondArray::from(vec![
                    Some(t0),
                    Some(t0 + 60_000),
                    None,
                    Some(t0 + 180_000),
                ])),
                Arc::new(Float64Array::from(vec![
                    Some(1.0),
                    None,
                    Some(3.0),
                    Some(4.0),
                ])),
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        write_parquet(&parquet, &batch);
        let s =
            read_series(&parquet, "ts", "rps", ReadMode::Gaps).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.values, vec![1.0, 4.0]);
        assert_eq!((s.missing, s.first_missing), (2, Some(2)));
        let exact = read_series(&parquet, "ts", "rps", ReadMode::Exact).map(|_| ());
        assert!(
            exact
                .as_ref()
                .is_err_and(|e| e.to_string().contains("rps is null")),
            "{exact:?}"
        );

        let garbage = d.join("garbage.csv");
        std::fs::write(
            &garbage,
            "ts,rps\n2026-01-05 00:00:00,1\n2026-01-05 00:01:00,lots\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let e = read_series(&garbage, "ts", "rps", ReadMode::Gaps).map(|_| ());
        assert!(
            e.as_ref()
                .is_err_and(|e| e.to_string().contains(":3:") && e.to_string().contains("lots")),
            "{e:?}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_bad_json_line_or_missing_column_is_an_error_naming_it() {
        let d = dir();
        let jsonl = d.join("bad.jsonl");
        std::fs::write(
            &jsonl,
            "{\"ts\":\"2026-01-05T00:00:00Z\",\"rps\":1}\n{\"ts\":\"2026-01-05T00:01:00Z\"}\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let e = read_series(&jsonl, "ts", "rps", ReadMode::Gaps)
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|e| e.contains(":2:") && e.contains("rps")),
            "{e:?}"
        );
        let parquet_missing = read_series(&d.join("none.parquet"), "ts", "rps", ReadMode::Gaps);
        assert!(parquet_missing.is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
