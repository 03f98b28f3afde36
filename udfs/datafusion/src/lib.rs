//! ebb's scalar functions as DataFusion UDFs: one `ScalarUDFImpl` per function, each a thin
//! adapter from Arrow arrays to the plain functions in `ebb-udf-core`.
//!
//! Every function takes scalars or arrays of any string type DataFusion coerces to, returns
//! NULL for NULL input, and returns NULL (not an error) where the core function has no
//! answer, so one odd row does not fail a whole query.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, Float64Array, Float64Builder, StringArray, StringBuilder,
    TimestampMicrosecondBuilder,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::{exec_err, Result};
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::{
    AggregateUDF, ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    TypeSignature, Volatility,
};
use ebb_udf_core::Anonymizer;

pub mod percentiles;

/// The time zone of `to_utc`'s result.
pub const UTC: &str = "UTC";

/// Every ebb UDF, with `anonymize`'s one-argument form keyed by `anon_key` (the filter's key)
/// when one is given.
pub fn all(anon_key: Option<&[u8]>) -> Vec<ScalarUDF> {
    vec![
        ScalarUDF::new_from_impl(Anonymize::new(anon_key)),
        ScalarUDF::new_from_impl(ToUtc::new()),
        ScalarUDF::new_from_impl(RobustZ::new()),
        ScalarUDF::new_from_impl(Rate::new()),
    ]
}

/// Every ebb aggregate function.
pub fn aggregates() -> Vec<AggregateUDF> {
    vec![AggregateUDF::new_from_impl(
        percentiles::ApproxPercentiles::new(),
    )]
}

/// Registers every ebb UDF and aggregate with a session (or any function registry).
pub fn register(registry: &mut dyn FunctionRegistry, anon_key: Option<&[u8]>) -> Result<()> {
    for udf in all(anon_key) {
        registry.register_udf(Arc::new(udf))?;
    }
    for udaf in aggregates() {
        registry.register_udaf(Arc::new(udaf))?;
    }
    Ok(())
}

fn arrays(args: &ScalarFunctionArgs) -> Result<Vec<ArrayRef>> {
    ColumnarValue::values_to_arrays(&args.args)
}

fn strings(a: &ArrayRef) -> Result<StringArray> {
    let utf8 = cast(a, &DataType::Utf8)?;
    match utf8.as_any().downcast_ref::<StringArray>() {
        Some(s) => Ok(s.clone()),
        None => exec_err!("expected a string argument, got {}", a.data_type()),
    }
}

fn floats(a: &ArrayRef) -> Result<Float64Array> {
    let f = cast(a, &DataType::Float64)?;
    match f.as_any().downcast_ref::<Float64Array>() {
        Some(s) => Ok(s.clone()),
        None => exec_err!("expected a numeric argument, got {}", a.data_type()),
    }
}

fn get(s: &StringArray, i: usize) -> Option<&str> {
    (!s.is_null(i)).then(|| s.value(i))
}

fn getf(s: &Float64Array, i: usize) -> Option<f64> {
    (!s.is_null(i)).then(|| s.value(i))
}

/// `anonymize(text [, key])`: the keyed pseudonym the filter gives an identifier.
/// With one argument the session's key is used (ebb's SQL is given the filter's key), so a
/// query can find the pseudonym of a known instance id.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Anonymize {
    signature: Signature,
    key: Option<Redacted>,
}

/// Key bytes that never print.
#[derive(PartialEq, Eq, Hash)]
struct Redacted(Vec<u8>);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Anonymize {
    /// `anonymize`, with the key its one-argument form uses.
    pub fn new(key: Option<&[u8]>) -> Self {
        Self {
            signature: Signature::one_of(
                vec![TypeSignature::String(1), TypeSignature::String(2)],
                Volatility::Immutable,
            ),
            key: key.map(|k| Redacted(k.to_vec())),
        }
    }
}

impl ScalarUDFImpl for Anonymize {
    fn name(&self) -> &str {
        "anonymize"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = arrays(&args)?;
        let values = strings(&arrays[0])?;
        let mut out = StringBuilder::with_capacity(values.len(), values.len() * 32);
        if let Some(keys) = arrays.get(1) {
            let keys = strings(keys)?;
            // Keys are nearly always one literal: build the HMAC state once per distinct key.
            let mut cached: Option<(String, Anonymizer)> = None;
            for i in 0..values.len() {
                match (get(&values, i), get(&keys, i)) {
                    (Some(v), Some(k)) => {
                        if cached.as_ref().is_none_or(|(ck, _)| ck != k) {
                            cached = Some((k.to_string(), Anonymizer::new(k.as_bytes())));
                        }
                        match &cached {
                            Some((_, a)) => out.append_value(a.hash(v)),
                            None => out.append_null(),
                        }
                    }
                    _ => out.append_null(),
                }
            }
        } else {
            let Some(Redacted(key)) = &self.key else {
                return exec_err!(
                    "anonymize(text) needs the anonymization key (EBB_ANON_KEY or filter.anonymize.key); \
                     pass one explicitly as anonymize(text, key)"
                );
            };
            let a = Anonymizer::new(key);
            for i in 0..values.len() {
                match get(&values, i) {
                    Some(v) => out.append_value(a.hash(v)),
                    None => out.append_null(),
                }
            }
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

/// `to_utc(text, zone)`: any timestamp the filter accepts, as a UTC timestamp; naive local
/// times are read in `zone`. NULL when it cannot be read.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ToUtc {
    signature: Signature,
}

impl ToUtc {
    /// `to_utc`.
    pub fn new() -> Self {
        Self {
            signature: Signature::string(2, Volatility::Immutable),
        }
    }
}

impl Default for ToUtc {
    fn default() -> Self {
        Self::new()
    }
}

impl ScalarUDFImpl for ToUtc {
    fn name(&self) -> &str {
        "to_utc"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into())))
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = arrays(&args)?;
        let (texts, zones) = (strings(&arrays[0])?, strings(&arrays[1])?);
        let mut out = TimestampMicrosecondBuilder::with_capacity(texts.len());
        for i in 0..texts.len() {
            let v = match (get(&texts, i), get(&zones, i)) {
                (Some(t), Some(z)) => ebb_udf_core::to_utc_micros(t, z),
                _ => None,
            };
            out.append_option(v);
        }
        Ok(ColumnarValue::Array(Arc::new(
            out.finish().with_timezone(UTC),
        )))
    }
}

macro_rules! float_udf {
    ($(#[$doc:meta])* $ty:ident, $name:literal, $arity:literal, |$a:ident| $body:expr) => {
        $(#[$doc])*
        #[derive(Debug, PartialEq, Eq, Hash)]
        pub struct $ty {
            signature: Signature,
        }

        impl $ty {
            #[doc = concat!("`", $name, "`.")]
            pub fn new() -> Self {
                Self {
                    signature: Signature::uniform(
                        $arity,
                        vec![DataType::Float64],
                        Volatility::Immutable,
                    ),
                }
            }
        }

        impl Default for $ty {
            fn default() -> Self {
                Self::new()
            }
        }

        impl ScalarUDFImpl for $ty {
            fn name(&self) -> &str {
                $name
            }
            fn signature(&self) -> &Signature {
                &self.signature
            }
            fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
                Ok(DataType::Float64)
            }
            fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
                let cols = arrays(&args)?
                    .iter()
                    .map(floats)
                    .collect::<Result<Vec<_>>>()?;
                let rows = cols.first().map_or(0, Array::len);
                let mut out = Float64Builder::with_capacity(rows);
                for i in 0..rows {
                    let $a: Option<Vec<f64>> = cols.iter().map(|c| getf(c, i)).collect();
                    out.append_option($a.and_then(|$a| $body));
                }
                Ok(ColumnarValue::Array(Arc::new(out.finish())))
            }
        }
    };
}

float_udf!(
    /// `robust_z(value, median, mad)`: the filter's outlier score; NULL without spread.
    RobustZ,
    "robust_z",
    3,
    |a| ebb_udf_core::robust_z(a[0], a[1], a[2])
);

float_udf!(
    /// `rate(count, seconds)`: events per second over a window; NULL for an empty duration.
    Rate,
    "rate",
    2,
    |a| ebb_udf_core::rate(a[0], a[1])
);

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::TimestampMicrosecondArray;
    use datafusion::prelude::SessionContext;

    async fn one_row(ctx: &SessionContext, sql: &str) -> ArrayRef {
        let batches = ctx
            .sql(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(batches.len(), 1, "{sql}");
        batches[0].column(0).clone()
    }

    fn session(key: Option<&[u8]>) -> SessionContext {
        let mut ctx = SessionContext::new();
        if let Err(e) = register(&mut ctx, key) {
            panic!("register: {e}");
        }
        ctx
    }

    #[tokio::test]
    async fn sql_results_equal_the_core_functions() {
        let ctx = session(Some(b"k1"));
        let a = one_row(&ctx, "SELECT anonymize('web-1')").await;
        let a = strings(&a).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.value(0), ebb_udf_core::anonymize(b"k1", "web-1"));
        let a2 = one_row(&ctx, "SELECT anonymize('web-1', 'k2')").await;
        let a2 = strings(&a2).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a2.value(0), ebb_udf_core::anonymize(b"k2", "web-1"));

        let t = one_row(
            &ctx,
            "SELECT to_utc('2026-03-29 02:30:00', 'Europe/Berlin'), to_utc('2026-11-23T10:00:00+01:00', 'UTC')",
        )
        .await;
        let t = t
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .cloned()
            .unwrap_or_else(|| panic!("timestamp expected"));
        assert!(t.is_null(0), "a skipped local hour has no UTC instant");

        let z = one_row(&ctx, "SELECT robust_z(12.9652, 10, 2)").await;
        let z = floats(&z).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(Some(z.value(0)), ebb_udf_core::robust_z(12.9652, 10.0, 2.0));
        let r = one_row(&ctx, "SELECT rate(50, 10), rate(5, 0)").await;
        let r = floats(&r).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.value(0), 5.0);
    }

    #[tokio::test]
    async fn functions_work_over_columns_and_keep_nulls() {
        let ctx = session(None);
        let sql = "SELECT to_utc(t, 'UTC') AS u, rate(c, s) AS r FROM (VALUES \
                   ('2026-11-23T10:00:00Z', 10.0, 2.0), (NULL, NULL, 1.0), ('1700000000', 3.0, 0.0)) AS v(t, c, s)";
        let batches = ctx
            .sql(sql)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let b = &batches[0];
        let u = b
            .column(0)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .cloned()
            .unwrap_or_else(|| panic!("timestamp expected"));
        assert_eq!(
            Some(u.value(0)),
            ebb_udf_core::to_utc_micros("2026-11-23T10:00:00Z", "UTC")
        );
        assert!(u.is_null(1));
        assert_eq!(u.value(2), 1_700_000_000_000_000);
        let r = floats(b.column(1)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.value(0), 5.0);
        assert!(r.is_null(1) && r.is_null(2));
    }

    fn vectors(name: &str) -> Vec<Vec<serde_json::Value>> {
        let all: serde_json::Value = serde_json::from_str(include_str!("../../vectors.json"))
            .unwrap_or_else(|e| panic!("vectors.json: {e}"));
        all[name]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.as_array().cloned().unwrap_or_default())
            .collect()
    }

    fn literal(v: &serde_json::Value) -> String {
        match v {
            serde_json::Value::String(s) => format!("'{}'", s.replace('\'', "''")),
            // Rust's shortest round-trip form, cast so SQL reads the very same double.
            serde_json::Value::Number(n) => {
                format!("CAST('{}' AS DOUBLE)", n.as_f64().unwrap_or(f64::NAN))
            }
            other => panic!("unexpected vector value {other}"),
        }
    }

    async fn column(
        ctx: &SessionContext,
        function: &str,
        rows: &[Vec<serde_json::Value>],
    ) -> ArrayRef {
        let values: Vec<String> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let args: Vec<String> = r.iter().map(literal).collect();
                format!("({i}, {})", args.join(", "))
            })
            .collect();
        let arity = rows.first().map_or(0, Vec::len);
        let names: Vec<String> = (0..arity).map(|i| format!("a{i}")).collect();
        let sql = format!(
            "SELECT {function}({}) FROM (VALUES {}) AS v(i, {}) ORDER BY i",
            names.join(", "),
            values.join(", "),
            names.join(", ")
        );
        let batches = ctx
            .sql(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let arrays: Vec<ArrayRef> = batches.iter().map(|b| b.column(0).clone()).collect();
        let refs: Vec<&dyn Array> = arrays.iter().map(|a| a.as_ref()).collect();
        datafusion::arrow::compute::concat(&refs).unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test]
    async fn every_shared_vector_gives_the_core_answer_in_sql() {
        let ctx = session(None);
        let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
        let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);

        let rows = vectors("anonymize");
        let out =
            strings(&column(&ctx, "anonymize", &rows).await).unwrap_or_else(|e| panic!("{e}"));
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(
                out.value(i),
                ebb_udf_core::anonymize(s(&r[1]).as_bytes(), &s(&r[0])),
                "row {i}"
            );
        }

        let rows = vectors("to_utc");
        let out = column(&ctx, "to_utc", &rows).await;
        let out = out
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .cloned()
            .unwrap_or_else(|| panic!("timestamp expected"));
        for (i, r) in rows.iter().enumerate() {
            let got = (!out.is_null(i)).then(|| out.value(i));
            assert_eq!(
                got,
                ebb_udf_core::to_utc_micros(&s(&r[0]), &s(&r[1])),
                "row {i}: {r:?}"
            );
        }

        for (name, core) in [
            (
                "robust_z",
                (|a: &[f64]| ebb_udf_core::robust_z(a[0], a[1], a[2])) as fn(&[f64]) -> Option<f64>,
            ),
            ("rate", |a: &[f64]| ebb_udf_core::rate(a[0], a[1])),
        ] {
            let rows = vectors(name);
            let out = floats(&column(&ctx, name, &rows).await).unwrap_or_else(|e| panic!("{e}"));
            for (i, r) in rows.iter().enumerate() {
                let args: Vec<f64> = r.iter().map(f).collect();
                assert_eq!(
                    (!out.is_null(i)).then(|| out.value(i).to_bits()),
                    core(&args).map(f64::to_bits),
                    "{name} row {i}"
                );
            }
        }
    }

    #[tokio::test]
    async fn anonymize_without_a_key_names_what_is_missing() {
        let ctx = session(None);
        let err = match ctx.sql("SELECT anonymize('x')").await {
            Ok(df) => df.collect().await.err(),
            Err(e) => Some(e),
        };
        let msg = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("EBB_ANON_KEY"), "{msg}");
    }
}
