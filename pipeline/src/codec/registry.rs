//! The Confluent-compatible schema registry, through `schema_registry_converter`.
//!
//! What matters to the pipeline is telling "the registry does not know this id" (bad data:
//! dead-letter it) from "the registry is not answering" (transient: retry, never drop).

use std::time::Duration;

use schema_registry_converter::async_impl::schema_registry::{
    get_all_versions, get_schema_by_id, is_compatible_schema, post_schema, SrSettings,
};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{RawError, SchemaType, SuppliedSchema};

/// Registry errors, classified by what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry answered that the id or subject does not exist.
    #[error("not found in the schema registry: {0}")]
    NotFound(String),
    /// The registry refused the schema (incompatible, invalid).
    #[error("the schema registry refused: {0}")]
    Refused(String),
    /// No answer, or a server error: try again later.
    #[error("schema registry unavailable: {0}")]
    Unavailable(String),
    /// The settings themselves are wrong (bad URL).
    #[error("schema registry settings: {0}")]
    Config(String),
}

impl RegistryError {
    /// True if retrying can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, RegistryError::Unavailable(_))
    }
}

fn describe(e: &SRCError) -> String {
    match &e.cause {
        Some(c) => format!("{}: {c}", e.error),
        None => e.error.clone(),
    }
}

fn classify(e: SRCError) -> RegistryError {
    use std::error::Error as _;
    let text = describe(&e);
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(raw) = s.downcast_ref::<RawError>() {
            // Confluent error codes: 404xx not found, 409 incompatible, 422xx invalid,
            // 5xxxx server side.
            return match raw.error_code {
                40400..=40499 | 404 => RegistryError::NotFound(text),
                409 | 42200..=42299 | 422 => RegistryError::Refused(text),
                _ if text.contains("status 404") => RegistryError::NotFound(text),
                _ if text.contains("status 409") || text.contains("status 422") => {
                    RegistryError::Refused(text)
                }
                _ => RegistryError::Unavailable(text),
            };
        }
        source = s.source();
    }
    if text.contains("status 404") {
        RegistryError::NotFound(text)
    } else if text.contains("status 409") || text.contains("status 422") {
        RegistryError::Refused(text)
    } else {
        // Connection refused, timeouts, 5xx, unparseable answers: the registry may recover.
        RegistryError::Unavailable(text)
    }
}

/// A handle on one schema registry.
#[derive(Clone)]
pub struct Registry {
    settings: std::sync::Arc<SrSettings>,
    url: String,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registry({})", self.url)
    }
}

impl Registry {
    /// Connects (lazily) to the registry at `url`, with a per-request timeout.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, RegistryError> {
        let settings = SrSettings::new_builder(url.trim_end_matches('/').to_string())
            .set_timeout(timeout)
            .build()
            .map_err(|e| RegistryError::Config(describe(&e)))?;
        Ok(Self {
            settings: std::sync::Arc::new(settings),
            url: url.to_string(),
        })
    }

    /// The registry's base URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The Avro schema text registered under `id`.
    pub async fn schema_by_id(&self, id: u32) -> Result<String, RegistryError> {
        get_schema_by_id(id, &self.settings)
            .await
            .map(|s| s.schema)
            .map_err(classify)
    }

    /// Registers an Avro schema under `subject` (or finds it) and returns its id.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let supplied = SuppliedSchema::new(None, SchemaType::Avro, schema.to_string());
        post_schema(&self.settings, subject.to_string(), supplied)
            .await
            .map(|s| s.id)
            .map_err(classify)
    }

    /// Whether `schema` is compatible with what `subject` holds; `None` if the subject is new.
    pub async fn is_compatible(
        &self,
        subject: &str,
        schema: &str,
    ) -> Result<Option<bool>, RegistryError> {
        // Ask for versions first: some registries (AxonOps 0.2) answer a compatibility check
        // on a subject that does not exist with "compatible" instead of Confluent's 404.
        match get_all_versions(&self.settings, subject.to_string())
            .await
            .map_err(classify)
        {
            Ok(versions) if versions.is_empty() => return Ok(None),
            Ok(_) => {}
            Err(RegistryError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        }
        let supplied = SuppliedSchema::new(None, SchemaType::Avro, schema.to_string());
        match is_compatible_schema(&self.settings, subject.to_string(), supplied).await {
            Ok(ok) => Ok(Some(ok)),
            Err(e) => match classify(e) {
                RegistryError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }
}
