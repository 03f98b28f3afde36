//! Closing windows: buffered rows in, one aggregate per (service, metric, window) out,
//! computed by DataFusion over an Arrow batch.
//!
//! Every window that closes at one watermark step is aggregated in one query, so the cost
//! of planning is paid once per step, not once per series: with 10k series that is the
//! difference between a hash aggregation and ten thousand tiny queries.

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use datafusion::arrow::array::{
    Array, ArrayRef, DictionaryArray, Float64Array, Float64Builder, Int64Array, Int64Builder,
    ListArray, RecordBatch, StringArray, StringBuilder, TimestampMillisecondBuilder,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, UInt32Type};
use datafusion::arrow::error::ArrowError;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::error::DataFusionError;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{collect, ExecutionPlan};
use datafusion::prelude::{SessionConfig, SessionContext};
use serde::Serialize;

/// Why a window could not be aggregated.
#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    /// DataFusion refused the query or failed running it.
    #[error("datafusion: {0}")]
    DataFusion(#[from] DataFusionError),
    /// A batch could not be built.
    #[error("arrow: {0}")]
    Arrow(#[from] ArrowError),
    /// The runtime for DataFusion could not start.
    #[error("runtime: {0}")]
    Runtime(#[from] std::io::Error),
    /// A result column had an unexpected type.
    #[error("unexpected result column {0}")]
    Column(&'static str),
}

/// Rows buffered for open windows: one row per (record, window it falls in).
#[derive(Debug, Default)]
pub struct Rows {
    service: StringBuilder,
    metric: StringBuilder,
    unit: StringBuilder,
    instance: StringBuilder,
    value: Float64Builder,
    window_start: Int64Builder,
    window_end: Int64Builder,
    len: usize,
}

impl Rows {
    /// Appends one row.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        service: &str,
        metric: &str,
        unit: Option<&str>,
        instance: &str,
        value: f64,
        window_start: i64,
        window_end: i64,
    ) {
        self.service.append_value(service);
        self.metric.append_value(metric);
        self.unit.append_option(unit);
        self.instance.append_value(instance);
        self.value.append_value(value);
        self.window_start.append_value(window_start);
        self.window_end.append_value(window_end);
        self.len += 1;
    }

    /// Rows buffered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffered rows as a batch, leaving the builders empty.
    pub fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        self.len = 0;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.service.finish()),
            Arc::new(self.metric.finish()),
            Arc::new(self.unit.finish()),
            Arc::new(self.instance.finish()),
            Arc::new(self.value.finish()),
            Arc::new(self.window_start.finish()),
            Arc::new(self.window_end.finish()),
        ];
        RecordBatch::try_new(buffered_schema(), columns)
    }
}

/// The schema of buffered rows (window bounds in epoch milliseconds).
pub fn buffered_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("service", DataType::Utf8, false),
        Field::new("metric", DataType::Utf8, false),
        Field::new("unit", DataType::Utf8, true),
        Field::new("instance", DataType::Utf8, false),
        Field::new("value", DataType::Float64, false),
        Field::new("window_start", DataType::Int64, false),
        Field::new("window_end", DataType::Int64, false),
    ]))
}

/// One closed window's aggregate: what goes to the aggregates topic and the `windows` table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WindowAggregate {
    /// Deterministic id: `service/metric/size_ms/start_ms`. A re-emitted window has the same
    /// id, so downstream overwrites instead of double counting.
    pub window_id: String,
    /// Service.
    pub service: String,
    /// Metric.
    pub metric: String,
    /// Unit, if the samples had one.
    pub unit: Option<String>,
    /// Window start, epoch milliseconds (inclusive).
    #[serde(serialize_with = "rfc3339_ms")]
    pub window_start: i64,
    /// Window end, epoch milliseconds (exclusive).
    #[serde(serialize_with = "rfc3339_ms")]
    pub window_end: i64,
    /// Samples.
    pub count: i64,
    /// Sum of values.
    pub sum: f64,
    /// Mean.
    pub mean: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
    /// Sample standard deviation; none for a single sample.
    pub stddev: Option<f64>,
    /// Approximate median (t-digest).
    pub p50: f64,
    /// Approximate 95th percentile.
    pub p95: f64,
    /// Approximate 99th percentile.
    pub p99: f64,
    /// Samples per second over the window.
    pub rate: f64,
    /// Distinct instances that reported.
    pub instances: i64,
    /// The instance that reported the window's highest value (ties: the smallest id): with
    /// error rates or latencies, the instance a restart policy would look at.
    pub top_instance: Option<String>,
}

fn rfc3339_ms<S: serde::Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&ms_to_rfc3339(*ms))
}

/// Epoch milliseconds as RFC 3339 UTC with millisecond precision.
pub fn ms_to_rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The deterministic id of a window.
pub fn window_id(service: &str, metric: &str, start_ms: i64, end_ms: i64) -> String {
    format!("{service}/{metric}/{}/{start_ms}", end_ms - start_ms)
}

// Distinct instances are counted over integer keys (DataFusion's native groups accumulator
// for DISTINCT takes integers, strings go through its slow per-group adapter), and the three
// percentiles come from one t-digest per window instead of three (`approx_percentiles`).
const QUERY: &str = "SELECT service, metric, window_start, window_end, max(unit) AS unit, \
    count(value) AS n, sum(value) AS total, avg(value) AS mean, min(value) AS lo, max(value) AS hi, \
    stddev(value) AS sd, \
    approx_percentiles(value, 0.5, 0.95, 0.99) AS ps, \
    count(DISTINCT instance_key) AS instances, \
    first_value(instance ORDER BY value DESC, instance ASC) AS top_instance \
    FROM buffered GROUP BY service, metric, window_start, window_end";

/// The schema the query reads: the buffered rows plus `instance_key`.
fn query_schema() -> SchemaRef {
    let mut fields: Vec<Field> = buffered_schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new("instance_key", DataType::UInt32, true));
    Arc::new(Schema::new(fields))
}

/// `batch` with `instance_key`: each row's instance as a small integer (equal strings, equal
/// keys), for counting distinct instances.
fn with_instance_keys(
    batch: RecordBatch,
    schema: SchemaRef,
) -> Result<RecordBatch, AggregateError> {
    let dict = cast(
        batch.column(3),
        &DataType::Dictionary(Box::new(DataType::UInt32), Box::new(DataType::Utf8)),
    )?;
    let keys = dict
        .as_any()
        .downcast_ref::<DictionaryArray<UInt32Type>>()
        .ok_or(AggregateError::Column("instance_key"))?
        .keys()
        .clone();
    let mut columns = batch.columns().to_vec();
    columns.push(Arc::new(keys));
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// The table the cached plan reads: whatever batch was put in it last, taken when the plan
/// runs. Planning the query anew at every step (parse, analyse, optimise, plan) cost as much
/// as running it when a step closes a few thousand windows.
#[derive(Debug)]
struct Slot {
    schema: SchemaRef,
    batch: std::sync::Mutex<Option<RecordBatch>>,
}

impl Slot {
    fn put(&self, batch: RecordBatch) {
        // Nothing can panic while the lock is held, but a poisoned slot is still a slot.
        *self
            .batch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(batch);
    }

    fn take(&self) -> Option<RecordBatch> {
        self.batch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

impl PartitionStream for Slot {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let batches = self.take().into_iter().collect();
        let schema = Arc::clone(&self.schema);
        match MemoryStream::try_new(batches, Arc::clone(&schema), None) {
            Ok(stream) => Box::pin(stream),
            // `try_new` without a projection cannot fail; an empty stream is its own answer.
            Err(_) => Box::pin(datafusion::physical_plan::EmptyRecordBatchStream::new(
                schema,
            )),
        }
    }
}

/// Runs the window query. One partition, so results depend only on the rows and their
/// order, never on thread timing: a rebuilt window aggregates to the same bytes.
pub struct Aggregator {
    ctx: SessionContext,
    runtime: tokio::runtime::Runtime,
    slot: Arc<Slot>,
    /// Built at the first step, not in `new`: a stage is often built inside an async
    /// runtime, where this one's `block_on` may not run.
    plan: std::sync::OnceLock<Arc<dyn ExecutionPlan>>,
}

impl std::fmt::Debug for Aggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Aggregator")
    }
}

impl Aggregator {
    /// A single-partition DataFusion session on its own current-thread runtime, so a stage
    /// can aggregate from a plain (non-async) `process`, with the query planned once.
    pub fn new() -> Result<Self, AggregateError> {
        let config = SessionConfig::new()
            .with_target_partitions(1)
            .with_batch_size(8192)
            .with_information_schema(false);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let ctx = SessionContext::new_with_config(config);
        for udaf in ebb_udf_datafusion::aggregates() {
            ctx.register_udaf(udaf);
        }
        let schema = query_schema();
        let slot = Arc::new(Slot {
            schema: Arc::clone(&schema),
            batch: std::sync::Mutex::new(None),
        });
        let table = StreamingTable::try_new(schema, vec![Arc::clone(&slot) as _])?;
        ctx.register_table("buffered", Arc::new(table))?;
        Ok(Self {
            ctx,
            runtime,
            slot,
            plan: std::sync::OnceLock::new(),
        })
    }

    /// The window query's physical plan, planned at the first call.
    fn plan(&self) -> Result<Arc<dyn ExecutionPlan>, AggregateError> {
        if let Some(plan) = self.plan.get() {
            return Ok(Arc::clone(plan));
        }
        let ctx = &self.ctx;
        let plan = self
            .runtime
            .block_on(async { ctx.sql(QUERY).await?.create_physical_plan().await })?;
        Ok(Arc::clone(self.plan.get_or_init(|| plan)))
    }

    /// Aggregates every window in `batch`, sorted by (service, metric, window_start,
    /// window_end).
    pub fn aggregate(&self, batch: RecordBatch) -> Result<Vec<WindowAggregate>, AggregateError> {
        if batch.num_rows() == 0 {
            return Ok(Vec::new());
        }
        let batch = with_instance_keys(batch, Arc::clone(self.slot.schema()))?;
        let plan = self.plan()?;
        self.slot.put(batch);
        let task = self.ctx.task_ctx();
        let results = self.runtime.block_on(collect(plan, task));
        // A failed run must not leave its rows for the next step's.
        self.slot.take();
        let results = results?;
        let mut out = Vec::new();
        for b in &results {
            decode(b, &mut out)?;
        }
        out.sort_by(|a, b| {
            (&a.service, &a.metric, a.window_start, a.window_end).cmp(&(
                &b.service,
                &b.metric,
                b.window_start,
                b.window_end,
            ))
        });
        Ok(out)
    }
}

fn col<'a, T: 'static>(
    b: &'a RecordBatch,
    i: usize,
    name: &'static str,
) -> Result<&'a T, AggregateError> {
    b.column(i)
        .as_any()
        .downcast_ref::<T>()
        .ok_or(AggregateError::Column(name))
}

fn f64_col(b: &RecordBatch, i: usize, name: &'static str) -> Result<Float64Array, AggregateError> {
    let c = cast(b.column(i), &DataType::Float64)?;
    c.as_any()
        .downcast_ref::<Float64Array>()
        .cloned()
        .ok_or(AggregateError::Column(name))
}

fn str_col(b: &RecordBatch, i: usize, name: &'static str) -> Result<StringArray, AggregateError> {
    let c = cast(b.column(i), &DataType::Utf8)?;
    c.as_any()
        .downcast_ref::<StringArray>()
        .cloned()
        .ok_or(AggregateError::Column(name))
}

fn decode(b: &RecordBatch, out: &mut Vec<WindowAggregate>) -> Result<(), AggregateError> {
    let service = str_col(b, 0, "service")?;
    let metric = str_col(b, 1, "metric")?;
    let start = col::<Int64Array>(b, 2, "window_start")?;
    let end = col::<Int64Array>(b, 3, "window_end")?;
    let unit = str_col(b, 4, "unit")?;
    let n = col::<Int64Array>(b, 5, "n")?;
    let [total, mean, lo, hi, sd] = [(6, "total"), (7, "mean"), (8, "lo"), (9, "hi"), (10, "sd")]
        .map(|(i, name)| f64_col(b, i, name));
    let (total, mean, lo, hi, sd) = (total?, mean?, lo?, hi?, sd?);
    let ps = col::<ListArray>(b, 11, "ps")?;
    let instances = col::<Int64Array>(b, 12, "instances")?;
    let top = str_col(b, 13, "top_instance")?;
    for i in 0..b.num_rows() {
        let (s, e) = (start.value(i), end.value(i));
        let count = n.value(i);
        // A window has at least one value, so its percentile list is never empty.
        let p = ps.value(i);
        let p = p
            .as_any()
            .downcast_ref::<Float64Array>()
            .filter(|p| p.len() == 3)
            .ok_or(AggregateError::Column("ps"))?;
        #[allow(clippy::cast_precision_loss)]
        let rate = ebb_udf_core::rate(count as f64, (e - s) as f64 / 1000.0).unwrap_or(0.0);
        out.push(WindowAggregate {
            window_id: window_id(service.value(i), metric.value(i), s, e),
            service: service.value(i).to_string(),
            metric: metric.value(i).to_string(),
            unit: (!unit.is_null(i)).then(|| unit.value(i).to_string()),
            window_start: s,
            window_end: e,
            count,
            sum: total.value(i),
            mean: mean.value(i),
            min: lo.value(i),
            max: hi.value(i),
            stddev: (!sd.is_null(i)).then(|| sd.value(i)),
            p50: p.value(0),
            p95: p.value(1),
            p99: p.value(2),
            rate,
            instances: instances.value(i),
            top_instance: (!top.is_null(i)).then(|| top.value(i).to_string()),
        });
    }
    Ok(())
}

/// The Arrow schema of the `windows` table.
pub fn windows_schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("window_id", DataType::Utf8, false),
        Field::new("service", DataType::Utf8, false),
        Field::new("metric", DataType::Utf8, false),
        Field::new("unit", DataType::Utf8, true),
        Field::new("window_start", ts.clone(), false),
        Field::new("window_end", ts, false),
        Field::new("count", DataType::Int64, false),
        Field::new("sum", DataType::Float64, false),
        Field::new("mean", DataType::Float64, false),
        Field::new("min", DataType::Float64, false),
        Field::new("max", DataType::Float64, false),
        Field::new("stddev", DataType::Float64, true),
        Field::new("p50", DataType::Float64, false),
        Field::new("p95", DataType::Float64, false),
        Field::new("p99", DataType::Float64, false),
        Field::new("rate", DataType::Float64, false),
        Field::new("instances", DataType::Int64, false),
        Field::new("top_instance", DataType::Utf8, true),
    ]))
}

/// Aggregates as a `windows` batch.
pub fn to_batch(rows: &[WindowAggregate]) -> Result<RecordBatch, ArrowError> {
    let n = rows.len();
    let mut id = StringBuilder::with_capacity(n, n * 48);
    let mut service = StringBuilder::with_capacity(n, n * 16);
    let mut metric = StringBuilder::with_capacity(n, n * 16);
    let mut unit = StringBuilder::with_capacity(n, n * 4);
    let mut start = TimestampMillisecondBuilder::with_capacity(n);
    let mut end = TimestampMillisecondBuilder::with_capacity(n);
    let mut count = Int64Builder::with_capacity(n);
    let mut floats: [Float64Builder; 9] = std::array::from_fn(|_| Float64Builder::with_capacity(n));
    let mut stddev = Float64Builder::with_capacity(n);
    let mut instances = Int64Builder::with_capacity(n);
    let mut top = StringBuilder::with_capacity(n, n * 16);
    for r in rows {
        id.append_value(&r.window_id);
        service.append_value(&r.service);
        metric.append_value(&r.metric);
        unit.append_option(r.unit.as_deref());
        start.append_value(r.window_start);
        end.append_value(r.window_end);
        count.append_value(r.count);
        for (b, v) in floats.iter_mut().zip([
            r.sum, r.mean, r.min, r.max, r.p50, r.p95, r.p99, r.rate, 0.0,
        ]) {
            b.append_value(v);
        }
        stddev.append_option(r.stddev);
        instances.append_value(r.instances);
        top.append_option(r.top_instance.as_deref());
    }
    let [mut sum, mut mean, mut min, mut max, mut p50, mut p95, mut p99, mut rate, _] = floats;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(id.finish()),
        Arc::new(service.finish()),
        Arc::new(metric.finish()),
        Arc::new(unit.finish()),
        Arc::new(start.finish().with_timezone("UTC")),
        Arc::new(end.finish().with_timezone("UTC")),
        Arc::new(count.finish()),
        Arc::new(sum.finish()),
        Arc::new(mean.finish()),
        Arc::new(min.finish()),
        Arc::new(max.finish()),
        Arc::new(stddev.finish()),
        Arc::new(p50.finish()),
        Arc::new(p95.finish()),
        Arc::new(p99.finish()),
        Arc::new(rate.finish()),
        Arc::new(instances.finish()),
        Arc::new(top.finish()),
    ];
    RecordBatch::try_new(windows_schema(), columns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agg(rows: &[(&str, &str, &str, f64, i64)]) -> Vec<WindowAggregate> {
        let mut b = Rows::default();
        for (svc, metric, inst, v, start) in rows {
            b.push(svc, metric, Some("ms"), inst, *v, *start, start + 10_000);
        }
        let batch = b.finish().unwrap_or_else(|e| panic!("{e}"));
        Aggregator::new()
            .and_then(|a| a.aggregate(batch))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn one_aggregate_per_service_metric_and_window_with_exact_moments() {
        let out = agg(&[
            ("api", "cpu", "a", 10.0, 0),
            ("api", "cpu", "b", 20.0, 0),
            ("api", "cpu", "a", 30.0, 0),
            ("api", "cpu", "a", 99.0, 10_000),
            ("web", "cpu", "a", 5.0, 0),
        ]);
        assert_eq!(out.len(), 3);
        let w = &out[0];
        assert_eq!(w.window_id, "api/cpu/10000/0");
        assert_eq!(
            (w.count, w.sum, w.mean, w.min, w.max),
            (3, 60.0, 20.0, 10.0, 30.0)
        );
        assert_eq!(w.stddev, Some(10.0));
        assert_eq!(w.instances, 2);
        assert!((w.rate - 0.3).abs() < 1e-12);
        assert_eq!(w.unit.as_deref(), Some("ms"));
        assert!(w.p50 >= 10.0 && w.p50 <= 30.0 && w.p95 <= 30.0);
        assert_eq!(out[1].window_start, 10_000);
        assert_eq!(out[1].stddev, None, "one sample has no sample deviation");
        assert_eq!(out[2].service, "web");
    }

    #[test]
    fn percentiles_are_close_to_exact_on_many_samples() {
        let rows: Vec<(&str, &str, &str, f64, i64)> = (0..1000)
            .map(|i| ("s", "m", "i", f64::from(i), 0))
            .collect();
        let w = &agg(&rows)[0];
        assert!((w.p50 - 499.5).abs() < 5.0, "{}", w.p50);
        assert!((w.p95 - 949.0).abs() < 5.0, "{}", w.p95);
        assert!((w.p99 - 989.0).abs() < 5.0, "{}", w.p99);
    }

    #[test]
    fn the_same_rows_aggregate_to_the_same_bits() {
        let rows: Vec<(&str, &str, &str, f64, i64)> = (0..5000)
            .map(|i| ("s", "m", "i", f64::from(i * 7919 % 1013) / 3.0, 0))
            .collect();
        let (a, b) = (agg(&rows), agg(&rows));
        assert_eq!(
            serde_json::to_string(&a).unwrap_or_default(),
            serde_json::to_string(&b).unwrap_or_default()
        );
    }

    #[test]
    fn one_planned_query_aggregates_each_step_from_its_own_rows_only() {
        let batch = |rows: &[(&str, f64)]| {
            let mut b = Rows::default();
            for (inst, v) in rows {
                b.push("api", "cpu", None, inst, *v, 0, 10_000);
            }
            b.finish().unwrap_or_else(|e| panic!("{e}"))
        };
        let a = Aggregator::new().unwrap_or_else(|e| panic!("{e}"));
        let run = |rows: &[(&str, f64)]| a.aggregate(batch(rows)).unwrap_or_else(|e| panic!("{e}"));
        let first = run(&[("a", 1.0), ("b", 3.0)]);
        let second = run(&[("c", 10.0)]);
        assert_eq!(
            (first[0].count, first[0].sum, first[0].instances),
            (2, 4.0, 2)
        );
        assert_eq!(second.len(), 1);
        assert_eq!(
            (second[0].count, second[0].sum, second[0].instances),
            (1, 10.0, 1),
            "the second step sees none of the first step's rows"
        );
        assert_eq!(second[0].top_instance.as_deref(), Some("c"));
        assert!(run(&[]).is_empty());
        // The same rows through a fresh plan and through the reused one: the same bits.
        let rows = [("a", 2.5), ("b", 7.0), ("a", 1.0)];
        assert_eq!(
            serde_json::to_string(&run(&rows)).unwrap_or_default(),
            serde_json::to_string(
                &Aggregator::new()
                    .and_then(|f| f.aggregate(batch(&rows)))
                    .unwrap_or_else(|e| panic!("{e}"))
            )
            .unwrap_or_default()
        );
    }

    #[test]
    fn an_aggregator_built_inside_an_async_runtime_aggregates_outside_it() {
        // As `ebb run window` and the demo build their stages: in async code, then move them
        // to a blocking thread.
        let outer = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let a = outer
            .block_on(async { Aggregator::new() })
            .unwrap_or_else(|e| panic!("{e}"));
        let mut b = Rows::default();
        b.push("api", "cpu", None, "a", 1.0, 0, 10_000);
        let batch = b.finish().unwrap_or_else(|e| panic!("{e}"));
        let out = std::thread::spawn(move || a.aggregate(batch).map(|o| o.len()))
            .join()
            .unwrap_or_else(|_| panic!("the aggregating thread panicked"));
        assert_eq!(out.unwrap_or_else(|e| panic!("{e}")), 1);
    }

    #[test]
    fn aggregates_round_trip_into_the_windows_schema() {
        let out = agg(&[("api", "cpu", "a", 1.0, 0)]);
        let batch = to_batch(&out).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(batch.num_rows(), 1);
        assert_eq!(batch.schema(), windows_schema());
        assert_eq!(ms_to_rfc3339(1_500), "1970-01-01T00:00:01.500Z");
    }
}
