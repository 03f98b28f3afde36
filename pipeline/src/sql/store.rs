//! The store of closed windows, anomalies, forecasts and commands that SQL
//! reads: Arrow batches in memory, bounded by a time retention and a row cap, spilled to
//! Parquet when configured.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use datafusion::arrow::array::BooleanArray;
use datafusion::arrow::array::{Array, RecordBatch, StringArray, TimestampMillisecondArray};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::parquet::arrow::ArrowWriter;
use tracing::warn;

use crate::stages::window::aggregate::{to_batch, windows_schema, WindowAggregate};
use crate::stages::window::config::StoreConfig;

struct Stored {
    batch: RecordBatch,
    newest_ms: i64,
    oldest_ms: i64,
}

#[derive(Default)]
struct Inner {
    batches: VecDeque<Stored>,
    ids: HashSet<String>,
    rows: usize,
    newest_ms: i64,
    spilled: u64,
}

/// A bounded, append-only table of Arrow batches with a unique string id in column 0 and an
/// event-time timestamp column used for retention.
pub struct WindowStore {
    name: &'static str,
    schema: SchemaRef,
    time_column: usize,
    config: StoreConfig,
    inner: RwLock<Inner>,
}

impl std::fmt::Debug for WindowStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowStore")
            .field("name", &self.name)
            .field("rows", &self.rows())
            .finish()
    }
}

impl WindowStore {
    /// The `windows` table: window aggregates, retained by `window_end`.
    pub fn windows(config: StoreConfig) -> Self {
        Self::new("windows", windows_schema(), 5, config)
    }

    /// The `commands` table: decide's commands, retained by `decided_at`.
    pub fn commands(config: StoreConfig) -> Self {
        Self::new(
            "commands",
            crate::stages::decide::table::commands_schema(),
            crate::stages::decide::table::TIME_COLUMN,
            config,
        )
    }

    /// The `anomalies` table: the models' anomaly events, retained by `window_end`.
    pub fn anomalies(config: StoreConfig) -> Self {
        use crate::stages::models::table;
        Self::new(
            "anomalies",
            table::anomalies_schema(),
            table::ANOMALIES_TIME_COLUMN,
            config,
        )
    }

    /// The `forecasts` table: the models' forecasts, a row per horizon, retained by `made_at`.
    pub fn forecasts(config: StoreConfig) -> Self {
        use crate::stages::models::table;
        Self::new(
            "forecasts",
            table::forecasts_schema(),
            table::FORECASTS_TIME_COLUMN,
            config,
        )
    }

    /// A table named `name` with `schema`; column 0 must be a unique Utf8 id and
    /// `time_column` a millisecond timestamp.
    pub fn new(
        name: &'static str,
        schema: SchemaRef,
        time_column: usize,
        config: StoreConfig,
    ) -> Self {
        Self {
            name,
            schema,
            time_column,
            config,
            inner: RwLock::new(Inner {
                newest_ms: i64::MIN,
                ..Inner::default()
            }),
        }
    }

    /// The table's name in SQL.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The table's schema.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Rows held in memory.
    pub fn rows(&self) -> usize {
        self.inner.read().map(|i| i.rows).unwrap_or(0)
    }

    /// Where spilled Parquet files live, if spilling is on.
    pub fn spill_dir(&self) -> Option<&Path> {
        self.config.spill_dir.as_deref()
    }

    /// Adds window aggregates; windows already held (a re-emitted window after a restart)
    /// are ignored, so a query never sees one twice.
    pub fn insert(&self, rows: &[WindowAggregate]) {
        match to_batch(rows) {
            Ok(b) => self.insert_batch(b),
            Err(e) => warn!(table = self.name, error = %e, "rows not stored"),
        }
    }

    /// Adds a batch of this table's schema.
    pub fn insert_batch(&self, batch: RecordBatch) {
        if batch.num_rows() == 0 || batch.schema() != self.schema {
            return;
        }
        let Ok(mut inner) = self.inner.write() else {
            return;
        };
        let Some(ids) = batch.column(0).as_any().downcast_ref::<StringArray>() else {
            return;
        };
        let keep: BooleanArray = (0..ids.len())
            .map(|i| Some(inner.ids.insert(ids.value(i).to_string())))
            .collect();
        let batch = match filter_record_batch(&batch, &keep) {
            Ok(b) if b.num_rows() > 0 => b,
            _ => return,
        };
        let Some(times) = batch
            .column(self.time_column)
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
        else {
            return;
        };
        let (mut oldest, mut newest) = (i64::MAX, i64::MIN);
        for i in 0..times.len() {
            oldest = oldest.min(times.value(i));
            newest = newest.max(times.value(i));
        }
        inner.rows += batch.num_rows();
        inner.newest_ms = inner.newest_ms.max(newest);
        inner.batches.push_back(Stored {
            batch,
            newest_ms: newest,
            oldest_ms: oldest,
        });
        self.evict(&mut inner);
    }

    fn evict(&self, inner: &mut Inner) {
        let retention = i64::try_from(self.config.retention.as_millis()).unwrap_or(i64::MAX);
        let horizon = inner.newest_ms.saturating_sub(retention);
        let spilled_before = inner.spilled;
        while let Some(front) = inner.batches.front() {
            let too_old = front.newest_ms < horizon;
            let too_many = inner.rows > self.config.max_rows;
            if !(too_old || too_many) {
                break;
            }
            let Some(old) = inner.batches.pop_front() else {
                break;
            };
            inner.rows -= old.batch.num_rows();
            if let Some(ids) = old.batch.column(0).as_any().downcast_ref::<StringArray>() {
                for i in 0..ids.len() {
                    inner.ids.remove(ids.value(i));
                }
            }
            if let Some(dir) = &self.config.spill_dir {
                match self.spill(dir, &old, inner.spilled) {
                    Ok(()) => inner.spilled += 1,
                    Err(e) => warn!(table = self.name, error = %e, "spill failed; rows dropped"),
                }
            }
        }
        // Expiry lists the spill directory: do it only when this insert spilled something,
        // not on every window close.
        if inner.spilled > spilled_before {
            let keep = i64::try_from(self.config.spill_retention.as_millis()).unwrap_or(i64::MAX);
            self.expire_spilled(inner.newest_ms.saturating_sub(keep));
        }
    }

    fn spill(&self, dir: &Path, s: &Stored, seq: u64) -> Result<(), String> {
        let dir = &dir.join(self.name);
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // The newest time is in the name so expiry needs no file reads.
        let path = dir.join(format!(
            "{}-{}-{}-{seq}.parquet",
            self.name, s.newest_ms, s.oldest_ms
        ));
        let tmp = path.with_extension("parquet.tmp");
        let file = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let mut w =
            ArrowWriter::try_new(file, self.schema.clone(), None).map_err(|e| e.to_string())?;
        w.write(&s.batch).map_err(|e| e.to_string())?;
        w.close().map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn expire_spilled(&self, before_ms: i64) {
        for path in self.spilled_files() {
            let newest = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(self.name))
                .and_then(|n| n.strip_prefix('-'))
                .and_then(|n| n.split('-').next())
                .and_then(|n| n.parse::<i64>().ok());
            if newest.is_some_and(|n| n < before_ms) {
                if let Err(e) = std::fs::remove_file(&path) {
                    warn!(file = %path.display(), error = %e, "expired spill file not removed");
                }
            }
        }
    }

    /// The Parquet files this table spilled, oldest name first.
    pub fn spilled_files(&self) -> Vec<PathBuf> {
        let Some(dir) = &self.config.spill_dir else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(dir.join(self.name)) else {
            return Vec::new();
        };
        let prefix = format!("{}-", self.name);
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|x| x == "parquet")
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix))
            })
            .collect();
        files.sort();
        files
    }

    /// The batches held in memory now (cheap: Arrow arrays are shared, not copied).
    pub fn snapshot(&self) -> Vec<RecordBatch> {
        self.inner
            .read()
            .map(|i| i.batches.iter().map(|s| s.batch.clone()).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn window(service: &str, start: i64) -> WindowAggregate {
        WindowAggregate {
            window_id: crate::stages::window::aggregate::window_id(
                service,
                "cpu",
                start,
                start + 10_000,
            ),
            service: service.into(),
            metric: "cpu".into(),
            unit: None,
            window_start: start,
            window_end: start + 10_000,
            count: 1,
            sum: 1.0,
            mean: 1.0,
            min: 1.0,
            max: 1.0,
            stddev: None,
            p50: 1.0,
            p95: 1.0,
            p99: 1.0,
            rate: 0.1,
            instances: 1,
            top_instance: None,
        }
    }

    #[test]
    fn a_window_stored_twice_is_held_once() {
        let store = WindowStore::windows(StoreConfig::default());
        store.insert(&[window("a", 0), window("b", 0)]);
        store.insert(&[window("a", 0), window("a", 10_000)]);
        assert_eq!(store.rows(), 3);
    }

    #[test]
    fn retention_and_row_cap_evict_the_oldest_windows() {
        let store = WindowStore::windows(StoreConfig {
            retention: Duration::from_secs(60),
            max_rows: 5,
            ..StoreConfig::default()
        });
        for i in 0..4 {
            store.insert(&[window("a", i * 10_000)]);
        }
        store.insert(&[window("a", 200_000)]);
        assert_eq!(
            store.rows(),
            1,
            "everything older than a minute before the newest goes"
        );
        for i in 0..10 {
            store.insert(&[window("b", 200_000 + i * 1_000)]);
        }
        assert!(store.rows() <= 5);
        // An evicted id may be stored again (a late replay of an old window).
        store.insert(&[window("a", 200_000)]);
    }

    #[test]
    fn evicted_windows_spill_to_parquet_when_configured() {
        let dir = std::env::temp_dir().join(format!("ebb-spill-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = WindowStore::windows(StoreConfig {
            retention: Duration::from_secs(60),
            spill_dir: Some(dir.clone()),
            ..StoreConfig::default()
        });
        store.insert(&[window("a", 0)]);
        store.insert(&[window("a", 500_000)]);
        let files = store.spilled_files();
        assert_eq!(files.len(), 1, "{files:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
