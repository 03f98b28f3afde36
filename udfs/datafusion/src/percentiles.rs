//! `approx_percentiles(value, p1, p2, ...)`: several approximate percentiles of one group from
//! one t-digest, as a list in the order asked.
//!
//! `approx_percentile_cont` builds a digest per percentile, and DataFusion runs it through the
//! row-at-a-time accumulator adapter: a window stage asking for p50, p95 and p99 of 10k groups
//! paid for thirty thousand digests and the adapter's per-group slicing. This function keeps
//! each group's values in a vector (a native groups accumulator), sorts them once, and reads
//! every percentile off one digest built with DataFusion's own [`TDigest`], so its answers are
//! the ones `approx_percentile_cont` gives for the same values (exactly so up to 100 values,
//! where the digest keeps every value as a centroid).

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float64Array, Float64Builder, ListBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Float64Type, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{exec_err, plan_err, Result, ScalarValue};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDFImpl, ColumnarValue, EmitTo, GroupsAccumulator, Signature, Volatility,
};
use datafusion::physical_expr::PhysicalExpr;
use datafusion_functions_aggregate_common::tdigest::{TDigest, DEFAULT_MAX_SIZE};

/// The SQL name.
pub const NAME: &str = "approx_percentiles";

/// `approx_percentiles(value, p1 [, p2 ...])`: a list of the approximate percentiles `p1`,
/// `p2`, ... (literals in [0, 1]) of `value` in each group; NULL for a group without values.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ApproxPercentiles {
    signature: Signature,
}

impl Default for ApproxPercentiles {
    fn default() -> Self {
        Self::new()
    }
}

impl ApproxPercentiles {
    /// The function.
    pub fn new() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

fn item() -> FieldRef {
    Arc::new(Field::new_list_field(DataType::Float64, true))
}

fn list_type() -> DataType {
    DataType::List(item())
}

/// The percentiles asked for: every argument after the first, each a literal in [0, 1].
fn percentiles(exprs: &[Arc<dyn PhysicalExpr>]) -> Result<Vec<f64>> {
    let empty = RecordBatch::new_empty(Arc::new(Schema::empty()));
    let mut out = Vec::with_capacity(exprs.len().saturating_sub(1));
    for expr in exprs.iter().skip(1) {
        let p = match expr.evaluate(&empty) {
            Ok(ColumnarValue::Scalar(s)) => match s {
                ScalarValue::Float64(Some(p)) => p,
                ScalarValue::Float32(Some(p)) => f64::from(p),
                other => {
                    return plan_err!("{NAME}: percentiles must be numeric literals, got {other}")
                }
            },
            _ => return plan_err!("{NAME}: percentiles must be literals"),
        };
        if !(0.0..=1.0).contains(&p) {
            return plan_err!("{NAME}: percentile {p} is outside [0, 1]");
        }
        out.push(p);
    }
    Ok(out)
}

/// The percentiles of `values` (sorted in place) from one digest; `None` when there are none.
fn estimate(values: &mut [f64], percentiles: &[f64]) -> Option<Vec<f64>> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable_by(f64::total_cmp);
    let digest = TDigest::new(DEFAULT_MAX_SIZE).merge_sorted_f64(values);
    Some(
        percentiles
            .iter()
            .map(|p| digest.estimate_quantile(*p))
            .collect(),
    )
}

fn lists<'a>(rows: impl Iterator<Item = Option<&'a [f64]>>) -> ArrayRef {
    let mut b = ListBuilder::new(Float64Builder::new()).with_field(item());
    for row in rows {
        match row {
            Some(vs) => {
                b.values().append_slice(vs);
                b.append(true);
            }
            None => b.append(false),
        }
    }
    Arc::new(b.finish())
}

fn floats(a: &ArrayRef) -> Result<&Float64Array> {
    match a.as_primitive_opt::<Float64Type>() {
        Some(f) => Ok(f),
        None => exec_err!("{NAME}: expected DOUBLE values, got {}", a.data_type()),
    }
}

impl AggregateUDFImpl for ApproxPercentiles {
    fn name(&self) -> &str {
        NAME
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        if arg_types.len() < 2 {
            return plan_err!("{NAME} takes a value and at least one percentile");
        }
        if let Some(t) = arg_types
            .iter()
            .find(|t| !t.is_numeric() && **t != DataType::Null)
        {
            return plan_err!("{NAME} takes numbers, got {t}");
        }
        Ok(vec![DataType::Float64; arg_types.len()])
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(list_type())
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format!("{}[values]", args.name),
            list_type(),
            true,
        ))])
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(PercentilesAccumulator {
            percentiles: percentiles(args.exprs)?,
            values: Vec::new(),
        }))
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(PercentilesGroups {
            percentiles: percentiles(args.exprs)?,
            values: Vec::new(),
            held: 0,
        }))
    }
}

/// One group's values (the plain accumulator, for callers without groups).
#[derive(Debug)]
struct PercentilesAccumulator {
    percentiles: Vec<f64>,
    values: Vec<f64>,
}

impl Accumulator for PercentilesAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let Some(a) = values.first() else {
            return Ok(());
        };
        self.values.extend(floats(a)?.iter().flatten());
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let got = estimate(&mut self.values, &self.percentiles);
        let array = lists(std::iter::once(got.as_deref()));
        ScalarValue::try_from_array(&array, 0)
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + (self.values.capacity() + self.percentiles.capacity()) * 8
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let array = lists(std::iter::once(Some(self.values.as_slice())));
        Ok(vec![ScalarValue::try_from_array(&array, 0)?])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let Some(a) = states.first() else {
            return Ok(());
        };
        for row in a.as_list::<i32>().iter().flatten() {
            self.values.extend(floats(&row)?.iter().flatten());
        }
        Ok(())
    }
}

/// Every group's values, by group index.
#[derive(Debug)]
struct PercentilesGroups {
    percentiles: Vec<f64>,
    values: Vec<Vec<f64>>,
    /// Values held over all groups.
    held: usize,
}

fn selected(filter: Option<&BooleanArray>, row: usize) -> bool {
    filter.is_none_or(|f| f.is_valid(row) && f.value(row))
}

impl GroupsAccumulator for PercentilesGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.values.resize_with(total_num_groups, Vec::new);
        let Some(a) = values.first() else {
            return Ok(());
        };
        let v = floats(a)?;
        for (row, g) in group_indices.iter().enumerate() {
            if v.is_valid(row) && selected(opt_filter, row) {
                if let Some(group) = self.values.get_mut(*g) {
                    group.push(v.value(row));
                    self.held += 1;
                }
            }
        }
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let mut groups = emit_to.take_needed(&mut self.values);
        self.held -= groups.iter().map(Vec::len).sum::<usize>().min(self.held);
        let estimates: Vec<Option<Vec<f64>>> = groups
            .iter_mut()
            .map(|vs| estimate(vs, &self.percentiles))
            .collect();
        Ok(lists(estimates.iter().map(Option::as_deref)))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        let groups = emit_to.take_needed(&mut self.values);
        self.held -= groups.iter().map(Vec::len).sum::<usize>().min(self.held);
        Ok(vec![lists(groups.iter().map(|vs| Some(vs.as_slice())))])
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.values.resize_with(total_num_groups, Vec::new);
        let Some(a) = values.first() else {
            return Ok(());
        };
        let rows = a.as_list::<i32>();
        for (row, g) in group_indices.iter().enumerate() {
            if !rows.is_valid(row) {
                continue;
            }
            let part = rows.value(row);
            if let Some(group) = self.values.get_mut(*g) {
                let before = group.len();
                group.extend(floats(&part)?.iter().flatten());
                self.held += group.len() - before;
            }
        }
        Ok(())
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let Some(a) = values.first() else {
            return exec_err!("{NAME}: no values");
        };
        let v = floats(a)?;
        let one: Vec<Option<[f64; 1]>> = (0..v.len())
            .map(|row| (v.is_valid(row) && selected(opt_filter, row)).then(|| [v.value(row)]))
            .collect();
        Ok(vec![lists(
            one.iter().map(|o| o.as_ref().map(<[f64; 1]>::as_slice)),
        )])
    }

    fn size(&self) -> usize {
        // Called once a batch: kept as a running count, not summed over every group.
        std::mem::size_of_val(self)
            + self.values.capacity() * std::mem::size_of::<Vec<f64>>()
            + self.held * std::mem::size_of::<f64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, ListArray};
    use datafusion::logical_expr::AggregateUDF;
    use datafusion::prelude::SessionContext;

    fn session() -> SessionContext {
        let ctx = SessionContext::new();
        ctx.register_udaf(AggregateUDF::new_from_impl(ApproxPercentiles::new()));
        ctx
    }

    /// `sql` over `t(g, v)`: 1,000 values spread over 4 groups.
    async fn query(sql: &str) -> Result<Vec<RecordBatch>> {
        let ctx = session();
        let values: Vec<f64> = (0..1000).map(|i| f64::from((i * 7919) % 1000)).collect();
        let groups: Vec<i64> = (0..1000).map(|i| i % 4).collect();
        let batch = RecordBatch::try_from_iter(vec![
            ("g", Arc::new(Int64Array::from(groups)) as ArrayRef),
            ("v", Arc::new(Float64Array::from(values)) as ArrayRef),
        ])?;
        ctx.register_batch("t", batch)?;
        ctx.sql(sql).await?.collect().await
    }

    fn list_values(batches: &[RecordBatch], col: usize) -> Vec<Vec<f64>> {
        let mut out = Vec::new();
        for b in batches {
            let l: &ListArray = b.column(col).as_list::<i32>();
            for row in l.iter() {
                out.push(row.map_or_else(Vec::new, |r| {
                    r.as_primitive::<Float64Type>().values().to_vec()
                }));
            }
        }
        out
    }

    fn floats_of(batches: &[RecordBatch], col: usize) -> Vec<f64> {
        batches
            .iter()
            .flat_map(|b| {
                b.column(col)
                    .as_primitive::<Float64Type>()
                    .values()
                    .to_vec()
            })
            .collect()
    }

    #[tokio::test]
    async fn agrees_with_approx_percentile_cont_per_group() -> Result<()> {
        let got = query(
            "SELECT g, approx_percentiles(v, 0.5, 0.95, 0.99), \
             approx_percentile_cont(0.5) WITHIN GROUP (ORDER BY v), \
             approx_percentile_cont(0.95) WITHIN GROUP (ORDER BY v), \
             approx_percentile_cont(0.99) WITHIN GROUP (ORDER BY v) \
             FROM t GROUP BY g ORDER BY g",
        )
        .await?;
        let ours = list_values(&got, 1);
        assert_eq!(ours.len(), 4);
        let theirs: Vec<Vec<f64>> = (2..5).map(|c| floats_of(&got, c)).collect();
        for (i, p) in ours.iter().enumerate() {
            assert_eq!(p.len(), 3, "group {i}: {p:?}");
            for (k, a) in p.iter().enumerate() {
                let b = theirs[k][i];
                // 250 values per group: both are t-digests of 100 centroids, fed in a different
                // order, so they agree closely rather than to the bit.
                assert!(
                    (a - b).abs() <= 10.0,
                    "group {i}, percentile {k}: {a} vs {b}"
                );
            }
        }
        Ok(())
    }

    #[tokio::test]
    async fn small_groups_get_approx_percentile_conts_exact_answer() -> Result<()> {
        let got = query(
            "SELECT approx_percentiles(v, 0.5, 0.95), \
             approx_percentile_cont(0.5) WITHIN GROUP (ORDER BY v), \
             approx_percentile_cont(0.95) WITHIN GROUP (ORDER BY v) \
             FROM t WHERE v < 50",
        )
        .await?;
        let ours = list_values(&got, 0);
        assert_eq!(
            ours,
            vec![vec![floats_of(&got, 1)[0], floats_of(&got, 2)[0]]]
        );
        Ok(())
    }

    #[tokio::test]
    async fn percentiles_come_back_in_the_order_asked() -> Result<()> {
        let got = query("SELECT approx_percentiles(v, 0.99, 0.01) FROM t").await?;
        let ours = list_values(&got, 0);
        assert_eq!(ours.len(), 1);
        assert!(ours[0][0] > ours[0][1], "{:?}", ours[0]);
        Ok(())
    }

    #[tokio::test]
    async fn a_group_without_values_gets_null() -> Result<()> {
        let got = query("SELECT approx_percentiles(v, 0.5) FROM t WHERE v < 0").await?;
        assert_eq!(got.iter().map(RecordBatch::num_rows).sum::<usize>(), 1);
        assert!(got[0].column(0).is_null(0));
        Ok(())
    }

    #[tokio::test]
    async fn a_percentile_outside_zero_to_one_is_refused() -> Result<()> {
        let ctx = session();
        let run = async {
            ctx.sql("SELECT approx_percentiles(x, 1.5) FROM (VALUES (1.0)) AS t(x)")
                .await?
                .collect()
                .await
        };
        match run.await {
            Ok(b) => panic!("1.5 is no percentile, yet got {b:?}"),
            Err(e) => assert!(e.to_string().contains("outside [0, 1]"), "{e}"),
        }
        Ok(())
    }
}
