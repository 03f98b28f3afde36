//! ebb's SQL: one DataFusion session over the window store, read-only, time- and
//! memory-limited, served three ways (`ebb sql`, `POST /sql`, the PostgreSQL protocol).

pub mod http;
pub mod pg;
pub mod store;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::union::UnionExec;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::Statement;
use serde::Deserialize;

use self::store::WindowStore;
use crate::config::ConfigError;

/// `[sql]`: the query endpoints and their limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqlConfig {
    /// Serve the PostgreSQL wire protocol. Default on.
    pub pg_enabled: bool,
    /// Where psql and BI tools connect; `EBB_PG_LISTEN` overrides. Default `127.0.0.1:5470`.
    pub pg_listen: String,
    /// A query running longer is cancelled. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Memory one query may use for sorts, joins and aggregations; beyond it the query fails
    /// with a clear error instead of taking the stage down. Default 268435456 (256 MiB).
    pub memory_limit_bytes: usize,
    /// Rows returned at most; a longer result is cut and says so. Default 100,000.
    pub max_rows: usize,
}

impl Default for SqlConfig {
    fn default() -> Self {
        Self {
            pg_enabled: true,
            pg_listen: "127.0.0.1:5470".into(),
            timeout: Duration::from_secs(30),
            memory_limit_bytes: 256 * 1024 * 1024,
            max_rows: 100_000,
        }
    }
}

impl SqlConfig {
    /// Checks what serde cannot, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| {
            Err(ConfigError::Invalid {
                key: key.into(),
                why: why.into(),
            })
        };
        if self.pg_enabled && self.pg_listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(
                "sql.pg_listen",
                "must be an address:port such as 127.0.0.1:5470",
            );
        }
        if self.timeout.is_zero() {
            return bad("sql.timeout", "must be positive");
        }
        if self.memory_limit_bytes < 1024 * 1024 {
            return bad("sql.memory_limit_bytes", "must be at least 1048576 (1 MiB)");
        }
        if self.max_rows == 0 {
            return bad("sql.max_rows", "must be positive");
        }
        Ok(())
    }
}

/// Why a query gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// A statement that would change something.
    #[error("ebb's SQL is read-only: {0} is refused (use SELECT, EXPLAIN or SHOW)")]
    ReadOnly(String),
    /// Not SQL, or several statements.
    #[error("{0}")]
    Syntax(String),
    /// Ran past `sql.timeout`.
    #[error("query cancelled after {0:?} (sql.timeout)")]
    Timeout(Duration),
    /// Needed more than `sql.memory_limit_bytes`.
    #[error("query needs more memory than sql.memory_limit_bytes allows: {0}")]
    Memory(String),
    /// Planning or execution failed (unknown table or column, type error, ...).
    #[error("{0}")]
    Query(String),
}

impl From<DataFusionError> for SqlError {
    fn from(e: DataFusionError) -> Self {
        match e.find_root() {
            DataFusionError::ResourcesExhausted(m) => SqlError::Memory(m.clone()),
            DataFusionError::SQL(..) => SqlError::Syntax(e.to_string()),
            _ => SqlError::Query(e.to_string()),
        }
    }
}

/// A query's answer.
#[derive(Debug, Clone)]
pub struct QueryResult {
    /// Column names and types.
    pub schema: SchemaRef,
    /// Rows.
    pub batches: Vec<RecordBatch>,
    /// True when `sql.max_rows` cut the result.
    pub truncated: bool,
    /// Time taken.
    pub elapsed: Duration,
}

impl QueryResult {
    /// Rows returned.
    pub fn row_count(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }
}

/// What a statement is, for the read-only rule: `None` when allowed, else its name.
pub fn refused_statement(statement: &Statement) -> Option<String> {
    match statement {
        Statement::Query(_)
        | Statement::Explain { .. }
        | Statement::ExplainTable { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowFunctions { .. } => None,
        other => {
            // The statement's leading keywords name it well enough: "DROP TABLE", "INSERT".
            let text = other.to_string();
            let words: Vec<&str> = text.split_whitespace().take(2).collect();
            let name = match words.as_slice() {
                [first, second]
                    if matches!(
                        first.to_ascii_uppercase().as_str(),
                        "CREATE" | "DROP" | "ALTER" | "TRUNCATE"
                    ) =>
                {
                    format!(
                        "{} {}",
                        first.to_ascii_uppercase(),
                        second.to_ascii_uppercase()
                    )
                }
                [first, ..] => first.to_ascii_uppercase(),
                [] => "this statement".into(),
            };
            Some(name)
        }
    }
}

/// Parses `sql` as exactly one statement and refuses anything but a read.
pub fn check_read_only(sql: &str) -> Result<(), SqlError> {
    let statements = DFParser::parse_sql(sql).map_err(|e| SqlError::Syntax(e.to_string()))?;
    if statements.len() != 1 {
        return Err(SqlError::Syntax(format!(
            "expected one statement, got {}",
            statements.len()
        )));
    }
    for s in &statements {
        match s {
            DfStatement::Statement(st) => {
                if let Some(name) = refused_statement(st) {
                    return Err(SqlError::ReadOnly(name));
                }
            }
            DfStatement::Explain(_) => {}
            DfStatement::CreateExternalTable(_) => {
                return Err(SqlError::ReadOnly("CREATE EXTERNAL TABLE".into()))
            }
            DfStatement::CopyTo(_) => return Err(SqlError::ReadOnly("COPY".into())),
            other => {
                return Err(SqlError::ReadOnly(
                    other
                        .to_string()
                        .split_whitespace()
                        .next()
                        .unwrap_or("this")
                        .to_uppercase(),
                ))
            }
        }
    }
    Ok(())
}

/// A store as a table: every scan sees the store as it is at that moment (memory, plus the
/// Parquet files it spilled).
#[derive(Debug)]
pub struct StoreTable {
    store: Arc<WindowStore>,
}

#[async_trait]
impl TableProvider for StoreTable {
    fn schema(&self) -> SchemaRef {
        self.store.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let mem = MemTable::try_new(self.store.schema(), vec![self.store.snapshot()])?;
        let mem_plan = mem.scan(state, projection, filters, limit).await?;
        let spilled = self.store.spilled_files();
        let Some(dir) = self.store.spill_dir().filter(|_| !spilled.is_empty()) else {
            return Ok(mem_plan);
        };
        let url = ListingTableUrl::parse(dir.join(self.store.name()).to_string_lossy())?;
        let options =
            ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
        let config = ListingTableConfig::new(url)
            .with_listing_options(options)
            .with_schema(self.store.schema());
        let files = ListingTable::try_new(config)?;
        let file_plan = files.scan(state, projection, filters, limit).await?;
        UnionExec::try_new(vec![mem_plan, file_plan])
    }
}

/// The SQL session: tables over the stores, ebb's UDFs, and the limits.
pub struct SqlEngine {
    ctx: Arc<SessionContext>,
    config: SqlConfig,
}

impl std::fmt::Debug for SqlEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlEngine").finish()
    }
}

impl SqlEngine {
    /// A session over `stores` (each registered under its name), with ebb's UDFs; the
    /// one-argument `anonymize` uses `anon_key`.
    pub fn new(
        stores: &[Arc<WindowStore>],
        anon_key: Option<&[u8]>,
        config: SqlConfig,
    ) -> Result<Self, SqlError> {
        // No spilling: a query over its memory budget fails with a clear error instead of
        // filling the disk of a host that runs the pipeline.
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(config.memory_limit_bytes, 1.0)
            .with_disk_manager_builder(
                DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
            )
            .build_arc()?;
        let session = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema("ebb", "public");
        let mut ctx = SessionContext::new_with_config_rt(session, runtime);
        ebb_udf_datafusion::register(&mut ctx, anon_key)?;
        for store in stores {
            ctx.register_table(
                store.name(),
                Arc::new(StoreTable {
                    store: store.clone(),
                }),
            )?;
        }
        Ok(Self {
            ctx: Arc::new(ctx),
            config,
        })
    }

    /// The session, for the PostgreSQL front end.
    pub fn context(&self) -> Arc<SessionContext> {
        self.ctx.clone()
    }

    /// The limits.
    pub fn config(&self) -> &SqlConfig {
        &self.config
    }

    /// Runs one read-only statement within the time, memory and row limits.
    pub async fn query(&self, sql: &str) -> Result<QueryResult, SqlError> {
        let started = Instant::now();
        check_read_only(sql)?;
        let options = datafusion::execution::context::SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let max = self.config.max_rows;
        let run = async {
            let df = self.ctx.sql_with_options(sql, options).await?;
            let schema = Arc::new(df.schema().as_arrow().clone());
            // One row past the cap tells a cut result from one that fits exactly.
            let batches = df.limit(0, Some(max + 1))?.collect().await?;
            Ok::<_, DataFusionError>((schema, batches))
        };
        let (schema, batches) = tokio::time::timeout(self.config.timeout, run)
            .await
            .map_err(|_| SqlError::Timeout(self.config.timeout))??;
        let (batches, truncated) = cut(batches, max);
        Ok(QueryResult {
            schema,
            batches,
            truncated,
            elapsed: started.elapsed(),
        })
    }
}

fn cut(batches: Vec<RecordBatch>, max: usize) -> (Vec<RecordBatch>, bool) {
    let mut out = Vec::with_capacity(batches.len());
    let mut left = max;
    let mut truncated = false;
    for b in batches {
        if left == 0 {
            truncated |= b.num_rows() > 0;
            continue;
        }
        if b.num_rows() > left {
            out.push(b.slice(0, left));
            truncated = true;
            left = 0;
        } else {
            left -= b.num_rows();
            out.push(b);
        }
    }
    (out, truncated)
}

#[cfg(test)]
mod tests;
