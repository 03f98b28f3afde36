//! `POST /sql`: the query in the body (plain text, or JSON `{"sql": "..."}`), the answer as
//! JSON (default), CSV, or an Arrow IPC stream, chosen by `?format=` or the Accept header.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::arrow::json::ArrayWriter;
use serde::Deserialize;

use super::{QueryResult, SqlEngine, SqlError};

/// Media type of an Arrow IPC stream.
pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

/// Answer formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `{"columns": [...], "rows": [{...}], ...}`.
    Json,
    /// A header line, then rows.
    Csv,
    /// Arrow IPC stream.
    Arrow,
}

#[derive(Debug, Deserialize)]
struct Params {
    format: Option<Format>,
}

#[derive(Debug, Deserialize)]
struct Body {
    sql: String,
}

/// `/sql` routes over `engine`.
pub fn router(engine: Arc<SqlEngine>) -> Router {
    Router::new().route("/sql", post(handle)).with_state(engine)
}

fn pick_format(params: &Params, headers: &HeaderMap) -> Format {
    if let Some(f) = params.format {
        return f;
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if accept.contains(ARROW_STREAM) {
        Format::Arrow
    } else if accept.contains("text/csv") {
        Format::Csv
    } else {
        Format::Json
    }
}

fn error(status: StatusCode, e: &SqlError) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({ "error": e.to_string() }).to_string(),
    )
        .into_response()
}

async fn handle(
    State(engine): State<Arc<SqlEngine>>,
    Query(params): Query<Params>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let text = String::from_utf8_lossy(&body);
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let sql = if is_json {
        match serde_json::from_str::<Body>(&text) {
            Ok(b) => b.sql,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &SqlError::Syntax(format!("body: expected {{\"sql\": \"...\"}}: {e}")),
                )
            }
        }
    } else {
        text.into_owned()
    };
    let result = match engine.query(&sql).await {
        Ok(r) => r,
        Err(e) => {
            let status = match e {
                SqlError::ReadOnly(_) => StatusCode::FORBIDDEN,
                SqlError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
                SqlError::Memory(_) => StatusCode::INSUFFICIENT_STORAGE,
                SqlError::Syntax(_) | SqlError::Query(_) => StatusCode::BAD_REQUEST,
            };
            return error(status, &e);
        }
    };
    match encode(&result, pick_format(&params, &headers)) {
        Ok((content_type, bytes)) => {
            let mut resp = (
                StatusCode::OK,
                [(header::CONTENT_TYPE, content_type)],
                bytes,
            )
                .into_response();
            if let Ok(v) = result.truncated.to_string().parse() {
                resp.headers_mut().insert("x-ebb-truncated", v);
            }
            resp
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &SqlError::Query(e)),
    }
}

/// Encodes a result as `format`: (content type, body).
pub fn encode(result: &QueryResult, format: Format) -> Result<(&'static str, Vec<u8>), String> {
    match format {
        Format::Arrow => {
            let mut buf = Vec::new();
            let mut w =
                StreamWriter::try_new(&mut buf, &result.schema).map_err(|e| e.to_string())?;
            for b in &result.batches {
                w.write(b).map_err(|e| e.to_string())?;
            }
            w.finish().map_err(|e| e.to_string())?;
            drop(w);
            Ok((ARROW_STREAM, buf))
        }
        Format::Csv => {
            let mut buf = Vec::new();
            {
                let mut w = datafusion::arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut buf);
                if result.batches.is_empty() {
                    let empty =
                        datafusion::arrow::array::RecordBatch::new_empty(result.schema.clone());
                    w.write(&empty).map_err(|e| e.to_string())?;
                }
                for b in &result.batches {
                    w.write(b).map_err(|e| e.to_string())?;
                }
            }
            Ok(("text/csv; charset=utf-8", buf))
        }
        Format::Json => {
            let mut rows = Vec::new();
            {
                let mut w = ArrayWriter::new(&mut rows);
                for b in &result.batches {
                    w.write(b).map_err(|e| e.to_string())?;
                }
                w.finish().map_err(|e| e.to_string())?;
            }
            let rows: serde_json::Value = if rows.is_empty() {
                serde_json::Value::Array(Vec::new())
            } else {
                serde_json::from_slice(&rows).map_err(|e| e.to_string())?
            };
            let columns: Vec<serde_json::Value> = result
                .schema
                .fields()
                .iter()
                .map(|f| serde_json::json!({ "name": f.name(), "type": f.data_type().to_string() }))
                .collect();
            let body = serde_json::json!({
                "columns": columns,
                "rows": rows,
                "row_count": result.row_count(),
                "truncated": result.truncated,
                "elapsed_ms": result.elapsed.as_secs_f64() * 1000.0,
            });
            Ok(("application/json", body.to_string().into_bytes()))
        }
    }
}
