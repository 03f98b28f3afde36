//! The PostgreSQL wire protocol, through `datafusion-postgres`, so `psql` and BI tools can
//! query the store. ebb adds one hook in front of the crate's own: writes are refused with
//! SQLSTATE 25006, and simple-protocol queries run within `sql.timeout`, `sql.max_rows` and
//! the session's memory limit.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::common::ParamValues;
use datafusion::datasource::MemTable;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::Statement;
use datafusion_postgres::arrow_pg::datatypes::df::encode_dataframe;
use datafusion_postgres::auth::AuthManager;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::setup_pg_catalog;
use datafusion_postgres::hooks::cursor::CursorStatementHook;
use datafusion_postgres::hooks::set_show::SetShowHook;
use datafusion_postgres::hooks::transactions::TransactionStatementHook;
use datafusion_postgres::hooks::HookClient;
use datafusion_postgres::pgwire::api::portal::Format;
use datafusion_postgres::pgwire::api::results::Response;
use datafusion_postgres::pgwire::api::ClientInfo;
use datafusion_postgres::pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use datafusion_postgres::pgwire::types::format::FormatOptions;
use datafusion_postgres::{QueryHook, ServerOptions};
use tracing::{info, warn};

use super::{refused_statement, SqlEngine, SqlError};

fn pg_error(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".to_string(),
        code.to_string(),
        message,
    )))
}

fn to_pg(e: &SqlError) -> PgWireError {
    let code = match e {
        SqlError::ReadOnly(_) => "25006",
        SqlError::Timeout(_) => "57014",
        SqlError::Memory(_) => "53200",
        SqlError::Syntax(_) => "42601",
        SqlError::Query(_) => "XX000",
    };
    pg_error(code, e.to_string())
}

fn is_transaction_or_session(s: &Statement) -> bool {
    matches!(
        s,
        Statement::StartTransaction { .. }
            | Statement::Commit { .. }
            | Statement::Rollback { .. }
            | Statement::Set(_)
            | Statement::Declare { .. }
            | Statement::Fetch { .. }
            | Statement::Close { .. }
            | Statement::Discard { .. }
            | Statement::Deallocate { .. }
    )
}

/// Refuses writes; runs reads within the limits.
pub struct ReadOnlyHook {
    engine: Arc<SqlEngine>,
}

impl ReadOnlyHook {
    fn refuse(statement: &Statement) -> Option<PgWireError> {
        if is_transaction_or_session(statement) {
            return None;
        }
        refused_statement(statement).map(|name| to_pg(&SqlError::ReadOnly(name)))
    }
}

#[async_trait]
impl QueryHook for ReadOnlyHook {
    async fn handle_simple_query(
        &self,
        statement: &Statement,
        ctx: &SessionContext,
        client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        if let Some(e) = Self::refuse(statement) {
            return Some(Err(e));
        }
        if !matches!(statement, Statement::Query(_)) {
            return None;
        }
        let result = match self.engine.query(&statement.to_string()).await {
            Ok(r) => r,
            Err(e) => return Some(Err(to_pg(&e))),
        };
        let table = match MemTable::try_new(result.schema.clone(), vec![result.batches]) {
            Ok(t) => t,
            Err(e) => return Some(Err(PgWireError::ApiError(Box::new(e)))),
        };
        let df = match ctx.read_table(Arc::new(table)) {
            Ok(df) => df,
            Err(e) => return Some(Err(PgWireError::ApiError(Box::new(e)))),
        };
        let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
        Some(
            encode_dataframe(df, &Format::UnifiedText, Some(options))
                .await
                .map(Response::Query),
        )
    }

    async fn handle_extended_parse_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        _client: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        Self::refuse(statement).map(Err)
    }

    async fn handle_extended_query(
        &self,
        statement: &Statement,
        _plan: &LogicalPlan,
        _params: &ParamValues,
        _ctx: &SessionContext,
        client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        if let Some(e) = Self::refuse(statement) {
            return Some(Err(e));
        }
        // The crate runs extended-protocol queries itself (it knows the portal's result
        // formats); give it ebb's timeout unless the client set its own.
        let timeout_ms = self.engine.config().timeout.as_millis().to_string();
        client
            .metadata_mut()
            .entry("statement_timeout_ms".to_string())
            .or_insert(timeout_ms);
        None
    }
}

/// Serves the PostgreSQL protocol on `addr` until the task is dropped. The address is
/// checked first, so a taken port is reported at start-up rather than lost in a task.
pub async fn serve(
    engine: Arc<SqlEngine>,
    addr: SocketAddr,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    drop(tokio::net::TcpListener::bind(addr).await?);
    let ctx = engine.context();
    setup_pg_catalog(&ctx, "ebb", Arc::new(AuthManager::default()))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let opts = ServerOptions::new()
        .with_host(addr.ip().to_string())
        .with_port(addr.port());
    let hooks: Vec<Arc<dyn QueryHook>> = vec![
        Arc::new(ReadOnlyHook { engine }),
        Arc::new(CursorStatementHook),
        Arc::new(SetShowHook),
        Arc::new(TransactionStatementHook),
    ];
    info!(%addr, "postgres protocol listening");
    Ok(tokio::spawn(async move {
        if let Err(e) = datafusion_postgres::serve_with_hooks(ctx, &opts, hooks).await {
            warn!(%addr, error = %e, "postgres protocol endpoint stopped");
        }
    }))
}
