//! The `kubernetes` driver: a scale command patches the scale subresource of the service's
//! Deployment or StatefulSet; a restart deletes the instance's pod (its controller starts a
//! new one). `compose/kubernetes/rbac.yaml` is the minimal role these calls need.
//!
//! Calls, exactly:
//! - `PATCH /apis/apps/v1/namespaces/{ns}/{deployments|statefulsets}/{name}/scale` with
//!   `Content-Type: application/merge-patch+json` and `{"spec":{"replicas":N}}`;
//! - `DELETE /api/v1/namespaces/{ns}/pods/{pod}`; when the pipeline pseudonymises instance
//!   ids, first `GET /api/v1/namespaces/{ns}/pods?labelSelector=...` and the pod whose name
//!   hashes (with the filter's key) to the command's instance is the one.
//!
//! In a cluster it authenticates with the pod's service-account token and CA; outside, the
//! API server, token and CA come from `[actuate.kubernetes]`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ActuateError, Driver};
use crate::config::ConfigError;
use crate::stages::decide::Command;

const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The kind of workload a service runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadKind {
    /// `apps/v1` Deployment.
    Deployment,
    /// `apps/v1` StatefulSet.
    StatefulSet,
}

/// `[actuate.kubernetes]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// API server URL. Default: in-cluster (`KUBERNETES_SERVICE_HOST`/`_PORT`).
    pub api_server: Option<String>,
    /// Bearer token file, read at each call (tokens rotate). Default the service account's.
    pub token_file: Option<PathBuf>,
    /// CA bundle (PEM) the API server's certificate is checked against. Default the service
    /// account's, when present.
    pub ca_file: Option<PathBuf>,
    /// Namespace. Default `default`.
    pub namespace: String,
    /// Workload kind. Default `deployment`.
    pub kind: WorkloadKind,
    /// Workload name per service, where it differs from the service name.
    pub names: BTreeMap<String, String>,
    /// Label selector of a service's pods; `{service}` is replaced. Default `app={service}`.
    pub pod_selector: String,
    /// Per call. Default 5s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            api_server: None,
            token_file: None,
            ca_file: None,
            namespace: "default".into(),
            kind: WorkloadKind::Deployment,
            names: BTreeMap::new(),
            pod_selector: "app={service}".into(),
            timeout: Duration::from_secs(5),
        }
    }
}

impl KubernetesConfig {
    /// Checks values serde cannot, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| {
            Err(ConfigError::Invalid {
                key: format!("actuate.kubernetes.{key}"),
                why: why.into(),
            })
        };
        if let Some(url) = &self.api_server {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return bad("api_server", "must start with http:// or https://");
            }
        }
        if self.namespace.is_empty()
            || !self
                .namespace
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return bad("namespace", "must be a DNS label");
        }
        if self.timeout.is_zero() {
            return bad("timeout", "must be positive");
        }
        Ok(())
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters pass).
fn query_escape(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Patches scales and deletes pods through the Kubernetes API.
pub struct KubernetesDriver {
    cfg: KubernetesConfig,
    base: String,
    token_file: Option<PathBuf>,
    client: reqwest::Client,
    handle: tokio::runtime::Handle,
    anonymizer: Option<ebb_udf_core::Anonymizer>,
}

/// Why the driver could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesSetupError {
    /// No API server configured and not running in a cluster.
    #[error("no API server: set actuate.kubernetes.api_server or run in a cluster")]
    NoApiServer,
    /// The CA bundle could not be read.
    #[error("CA bundle {0}: {1}")]
    Ca(PathBuf, String),
    /// The HTTP client could not be built.
    #[error("http client: {0}")]
    Client(#[from] reqwest::Error),
}

impl KubernetesDriver {
    /// A driver from config. `anon_key` is the filter's pseudonymisation key when instance
    /// ids are pseudonymised, so a restart can find its pod.
    pub fn new(
        cfg: &KubernetesConfig,
        anon_key: Option<&[u8]>,
        handle: tokio::runtime::Handle,
    ) -> Result<Self, KubernetesSetupError> {
        let sa = PathBuf::from(SA_DIR);
        let base = match &cfg.api_server {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => match (
                std::env::var("KUBERNETES_SERVICE_HOST"),
                std::env::var("KUBERNETES_SERVICE_PORT"),
            ) {
                (Ok(host), Ok(port)) => format!("https://{host}:{port}"),
                _ => return Err(KubernetesSetupError::NoApiServer),
            },
        };
        let mut builder = reqwest::Client::builder().timeout(cfg.timeout);
        let ca = cfg
            .ca_file
            .clone()
            .or_else(|| Some(sa.join("ca.crt")).filter(|p| p.exists()));
        if let Some(path) = ca {
            let pem = std::fs::read(&path)
                .map_err(|e| KubernetesSetupError::Ca(path.clone(), e.to_string()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| KubernetesSetupError::Ca(path.clone(), e.to_string()))?;
            builder = builder.add_root_certificate(cert);
        }
        let token_file = cfg
            .token_file
            .clone()
            .or_else(|| Some(sa.join("token")).filter(|p| p.exists()));
        Ok(Self {
            cfg: cfg.clone(),
            base,
            token_file,
            client: builder.build()?,
            handle,
            anonymizer: anon_key.map(ebb_udf_core::Anonymizer::new),
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = self
            .token_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
        {
            r = r.bearer_auth(token.trim());
        }
        r
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> Result<serde_json::Value, ActuateError> {
        let response = r.send().await.map_err(|e| ActuateError::GaveUp {
            attempts: 1,
            last: e.to_string(),
        })?;
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        if status.is_success() {
            Ok(body)
        } else {
            let message = body["message"].as_str().unwrap_or_default().to_string();
            Err(ActuateError::Refused(format!("{status}: {message}")))
        }
    }

    async fn scale(&self, c: &Command, replicas: u32) -> Result<String, ActuateError> {
        let name = self.cfg.names.get(&c.service).unwrap_or(&c.service);
        let kind = match self.cfg.kind {
            WorkloadKind::Deployment => "deployments",
            WorkloadKind::StatefulSet => "statefulsets",
        };
        let path = format!(
            "/apis/apps/v1/namespaces/{}/{kind}/{name}/scale",
            self.cfg.namespace
        );
        let body = serde_json::json!({"spec": {"replicas": replicas}});
        self.send(
            self.request(reqwest::Method::PATCH, &path)
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/merge-patch+json",
                )
                .body(body.to_string()),
        )
        .await?;
        Ok(format!("PATCH {path} replicas={replicas}"))
    }

    async fn restart(&self, c: &Command, instance: &str) -> Result<String, ActuateError> {
        let ns = &self.cfg.namespace;
        let pod = match &self.anonymizer {
            None => instance.to_string(),
            Some(anonymizer) => {
                let selector = self.cfg.pod_selector.replace("{service}", &c.service);
                let list = self
                    .send(self.request(
                        reqwest::Method::GET,
                        &format!(
                            "/api/v1/namespaces/{ns}/pods?labelSelector={}",
                            query_escape(&selector)
                        ),
                    ))
                    .await?;
                let names = list["items"]
                    .as_array()
                    .map(|items| {
                        items
                            .iter()
                            .filter_map(|p| p["metadata"]["name"].as_str())
                            .map(str::to_string)
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default();
                names
                    .into_iter()
                    .find(|n| n == instance || anonymizer.hash(n) == instance)
                    .ok_or_else(|| {
                        ActuateError::Unsupported(format!(
                            "no pod matching {selector} is instance {instance}"
                        ))
                    })?
            }
        };
        let path = format!("/api/v1/namespaces/{ns}/pods/{pod}");
        match self
            .send(self.request(reqwest::Method::DELETE, &path))
            .await
        {
            Ok(_) => Ok(format!("DELETE {path}")),
            // Gone already: the restart it asked for has happened.
            Err(ActuateError::Refused(m)) if m.starts_with("404") => {
                Ok(format!("DELETE {path}: already gone"))
            }
            Err(e) => Err(e),
        }
    }
}

impl Driver for KubernetesDriver {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn apply(&mut self, c: &Command) -> Result<String, ActuateError> {
        match (c.action.as_str(), c.replicas, c.instance.as_deref()) {
            ("scale", Some(n), _) => self.handle.block_on(self.scale(c, n)),
            ("restart", _, Some(i)) => self.handle.block_on(self.restart(c, i)),
            (action, ..) => Err(ActuateError::Unsupported(format!(
                "{action} without its replicas or instance"
            ))),
        }
    }
}
