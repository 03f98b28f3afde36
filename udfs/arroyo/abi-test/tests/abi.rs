//! Every shared test vector through every plugin's Arroyo ABI gives the core's answer.

use arrow::array::{Array, Float64Array, Int64Array, StringArray};
use ebb_arroyo_abi_test::{plugin_path, Plugin};
use serde_json::Value;

fn vectors(name: &str) -> Vec<Vec<Value>> {
    let all: Value = serde_json::from_str(include_str!("../../../vectors.json"))
        .unwrap_or_else(|e| panic!("vectors.json: {e}"));
    all[name]
        .as_array()
        .unwrap_or_else(|| panic!("no vectors for {name}"))
        .iter()
        .map(|row| row.as_array().cloned().unwrap_or_default())
        .collect()
}

fn plugin(name: &str) -> Plugin {
    Plugin::load(&plugin_path(name)).unwrap_or_else(|e| panic!("{e}"))
}

fn strings(rows: &[Vec<Value>], col: usize) -> StringArray {
    rows.iter().map(|r| r[col].as_str()).collect()
}

fn floats(rows: &[Vec<Value>], col: usize) -> Float64Array {
    rows.iter().map(|r| r[col].as_f64()).collect()
}

#[test]
fn anonymize_through_the_arroyo_abi_matches_the_core() {
    let rows = vectors("anonymize");
    let out = plugin("anonymize")
        .call(vec![
            strings(&rows, 0).into_data(),
            strings(&rows, 1).into_data(),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    let out = out
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap_or_else(|| panic!("utf8"));
    for (i, r) in rows.iter().enumerate() {
        let (v, k) = (r[0].as_str().unwrap_or(""), r[1].as_str().unwrap_or(""));
        assert_eq!(
            out.value(i),
            ebb_udf_core::anonymize(k.as_bytes(), v),
            "row {i}"
        );
    }
}

#[test]
fn to_utc_through_the_arroyo_abi_matches_the_core() {
    let rows = vectors("to_utc");
    let out = plugin("to_utc")
        .call(vec![
            strings(&rows, 0).into_data(),
            strings(&rows, 1).into_data(),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    let out = out
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap_or_else(|| panic!("int64"));
    let mut nulls = 0;
    for (i, r) in rows.iter().enumerate() {
        let expected =
            ebb_udf_core::to_utc_micros(r[0].as_str().unwrap_or(""), r[1].as_str().unwrap_or(""));
        let got = (!out.is_null(i)).then(|| out.value(i));
        nulls += usize::from(got.is_none());
        assert_eq!(got, expected, "row {i}: {r:?}");
    }
    assert!(nulls >= 2, "the vectors include unreadable input");
}

#[test]
fn robust_z_and_rate_through_the_arroyo_abi_match_the_core_bit_for_bit() {
    let rows = vectors("robust_z");
    let out = plugin("robust_z")
        .call(vec![
            floats(&rows, 0).into_data(),
            floats(&rows, 1).into_data(),
            floats(&rows, 2).into_data(),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    let out = out
        .as_any()
        .downcast_ref::<Float64Array>()
        .unwrap_or_else(|| panic!("f64"));
    for (i, r) in rows.iter().enumerate() {
        let f = |c: usize| r[c].as_f64().unwrap_or(f64::NAN);
        let expected = ebb_udf_core::robust_z(f(0), f(1), f(2)).map(f64::to_bits);
        assert_eq!(
            (!out.is_null(i)).then(|| out.value(i).to_bits()),
            expected,
            "row {i}"
        );
    }
    let rows = vectors("rate");
    let out = plugin("rate")
        .call(vec![
            floats(&rows, 0).into_data(),
            floats(&rows, 1).into_data(),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    let out = out
        .as_any()
        .downcast_ref::<Float64Array>()
        .unwrap_or_else(|| panic!("f64"));
    for (i, r) in rows.iter().enumerate() {
        let f = |c: usize| r[c].as_f64().unwrap_or(f64::NAN);
        let expected = ebb_udf_core::rate(f(0), f(1)).map(f64::to_bits);
        assert_eq!(
            (!out.is_null(i)).then(|| out.value(i).to_bits()),
            expected,
            "row {i}"
        );
    }
}
