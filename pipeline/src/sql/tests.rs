//! SQL over the store, without a network.

use std::sync::Arc;

use super::store::WindowStore;
use super::*;
use crate::stages::window::aggregate::{window_id, WindowAggregate};
use crate::stages::window::config::StoreConfig;

fn window(service: &str, start: i64, p95: f64) -> WindowAggregate {
    WindowAggregate {
        window_id: window_id(service, "latency_ms", start, start + 10_000),
        service: service.into(),
        metric: "latency_ms".into(),
        unit: Some("ms".into()),
        window_start: start,
        window_end: start + 10_000,
        count: 4,
        sum: 40.0,
        mean: 10.0,
        min: 1.0,
        max: 20.0,
        stddev: Some(2.0),
        p50: 9.0,
        p95,
        p99: 20.0,
        rate: 0.4,
        instances: 2,
        top_instance: None,
    }
}

fn engine(config: SqlConfig) -> (Arc<WindowStore>, SqlEngine) {
    let store = Arc::new(WindowStore::windows(StoreConfig::default()));
    store.insert(&[window("api", 0, 15.0), window("web", 10_000, 17.0)]);
    let engine = SqlEngine::new(std::slice::from_ref(&store), Some(b"k"), config)
        .unwrap_or_else(|e| panic!("{e}"));
    (store, engine)
}

#[tokio::test]
async fn windows_are_queryable_and_see_new_rows_at_once() {
    let (store, engine) = engine(SqlConfig::default());
    let q = "SELECT service, window_start, p95 FROM windows ORDER BY window_start DESC LIMIT 5";
    let r = engine.query(q).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.row_count(), 2);
    store.insert(&[window("db", 20_000, 30.0)]);
    let r = engine.query(q).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.row_count(), 3);
    let (_, body) = http::encode(&r, http::Format::Json).unwrap_or_else(|e| panic!("{e}"));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    assert_eq!(v["rows"][0]["service"], "db");
    assert_eq!(v["rows"][0]["p95"], 30.0);
    assert_eq!(v["columns"][1]["name"], "window_start");
}

#[tokio::test]
async fn ebb_functions_are_available_in_sql() {
    let (_, engine) = engine(SqlConfig::default());
    let r = engine
        .query("SELECT anonymize('web-1') AS a, rate(count, 10) AS r FROM windows LIMIT 1")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (_, body) = http::encode(&r, http::Format::Json).unwrap_or_else(|e| panic!("{e}"));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    assert_eq!(v["rows"][0]["a"], ebb_udf_core::anonymize(b"k", "web-1"));
    assert_eq!(v["rows"][0]["r"], 0.4);
}

#[tokio::test]
async fn writes_are_refused_with_a_clear_message() {
    let (_, engine) = engine(SqlConfig::default());
    for (sql, name) in [
        ("DROP TABLE windows", "DROP TABLE"),
        ("INSERT INTO windows SELECT * FROM windows", "INSERT"),
        ("CREATE TABLE t AS SELECT 1", "CREATE TABLE"),
        ("DELETE FROM windows", "DELETE"),
        ("COPY windows TO '/tmp/x.csv'", "COPY"),
        (
            "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'",
            "CREATE EXTERNAL TABLE",
        ),
    ] {
        match engine.query(sql).await {
            Err(SqlError::ReadOnly(n)) => assert_eq!(n, name, "{sql}"),
            other => panic!("{sql}: expected a read-only refusal, got {other:?}"),
        }
    }
    let msg = SqlError::ReadOnly("DROP TABLE".into()).to_string();
    assert!(
        msg.contains("read-only") && msg.contains("DROP TABLE"),
        "{msg}"
    );
    // The table is still there.
    assert!(engine.query("SELECT count(*) FROM windows").await.is_ok());
}

#[tokio::test]
async fn a_query_over_the_memory_limit_fails_cleanly() {
    let (_, engine) = engine(SqlConfig {
        memory_limit_bytes: 1024 * 1024,
        ..SqlConfig::default()
    });
    let r = engine
        .query("SELECT value % 2000000 AS k, count(*) FROM generate_series(1, 4000000) AS t(value) GROUP BY k ORDER BY k")
        .await;
    match r {
        Err(SqlError::Memory(m)) => assert!(!m.is_empty()),
        other => panic!(
            "expected a memory error, got {:?}",
            other.map(|r| r.row_count())
        ),
    }
    // The engine keeps serving.
    assert!(engine.query("SELECT 1").await.is_ok());
}

#[tokio::test]
async fn long_results_are_cut_at_max_rows_and_say_so() {
    let (_, engine) = engine(SqlConfig {
        max_rows: 10,
        ..SqlConfig::default()
    });
    let r = engine
        .query("SELECT * FROM generate_series(1, 100)")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.row_count(), 10);
    assert!(r.truncated);
    let r = engine
        .query("SELECT * FROM generate_series(1, 10)")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!r.truncated, "exactly max_rows is not cut");
}

#[tokio::test]
async fn unknown_columns_and_bad_syntax_are_errors_not_panics() {
    let (_, engine) = engine(SqlConfig::default());
    assert!(matches!(
        engine.query("SELEC 1").await,
        Err(SqlError::Syntax(_))
    ));
    assert!(matches!(
        engine.query("SELECT nope FROM windows").await,
        Err(SqlError::Query(_))
    ));
    assert!(matches!(
        engine.query("SELECT 1; SELECT 2").await,
        Err(SqlError::Syntax(_))
    ));
}
