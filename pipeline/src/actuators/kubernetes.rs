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
//! The calls go through `kube`'s client, which finds the cluster as `kubectl` does (the
//! kubeconfig's current context, then the pod's service account) unless
//! `[actuate.kubernetes]` names a kubeconfig and context, or an `api_server`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde::Deserialize;

use super::{ActuateError, Driver};
use crate::config::ConfigError;
use crate::stages::decide::Command;

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
    /// API server URL. Default: the kubeconfig's current context (`KUBECONFIG` or
    /// `~/.kube/config`), else in-cluster (the pod's service account).
    pub api_server: Option<String>,
    /// A kubeconfig file to use instead of `KUBECONFIG` or `~/.kube/config` (as
    /// `kubectl --kubeconfig`).
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use instead of its current one (as `kubectl --context`).
    pub context: Option<String>,
    /// With `api_server`: a bearer token file, re-read as it rotates.
    pub token_file: Option<PathBuf>,
    /// CA bundle (PEM) the API server's certificate is checked against. Default: the
    /// kubeconfig's or service account's, else the system's.
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
            kubeconfig: None,
            context: None,
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
            if self.kubeconfig.is_some() || self.context.is_some() {
                return bad(
                    "api_server",
                    "names the cluster directly; leave kubeconfig and context unset with it",
                );
            }
        }
        if self.token_file.is_some() && self.api_server.is_none() {
            return bad(
                "token_file",
                "goes with api_server (a kubeconfig names its own credentials)",
            );
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

/// Patches scales and deletes pods through the Kubernetes API, with `kube`'s client.
pub struct KubernetesDriver {
    cfg: KubernetesConfig,
    client: kube::Client,
    handle: tokio::runtime::Handle,
    anonymizer: Option<ebb_udf_core::Anonymizer>,
}

/// Why the driver could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesSetupError {
    /// The kubeconfig (or context) named in config could not be used.
    #[error("actuate.kubernetes.kubeconfig {0}: {1}")]
    Kubeconfig(String, String),
    /// No API server configured, no kubeconfig, and not running in a cluster.
    #[error(
        "no Kubernetes API server: set actuate.kubernetes.api_server, provide a kubeconfig \
         (KUBECONFIG or ~/.kube/config), or run in a cluster ({0})"
    )]
    NoApiServer(String),
    /// `api_server` is not a URL.
    #[error("actuate.kubernetes.api_server {0:?}: {1}")]
    ApiServer(String, String),
    /// The bearer token file could not be read, or is empty.
    #[error("actuate.kubernetes.token_file {0}: {1}")]
    TokenFile(PathBuf, String),
    /// The CA bundle could not be read.
    #[error("CA bundle {0}: {1}")]
    Ca(PathBuf, String),
    /// The client could not be built (TLS set-up, for one).
    #[error("kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// Points the client at a bearer token file, checked now so a bad path fails at start-up.
///
/// kube re-reads the file as it refreshes (service-account tokens rotate) but sends its
/// content verbatim, while kubectl trims it; a file written by `echo` ends in a newline that
/// would make every request fail. Such a file is used trimmed, as read now.
fn bearer_token(
    config: &mut kube::Config,
    path: &std::path::Path,
) -> Result<(), KubernetesSetupError> {
    let bad = |e: String| KubernetesSetupError::TokenFile(path.to_path_buf(), e);
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(bad("the file is empty".into()));
    }
    if token.len() == text.len() {
        config.auth_info.token_file = Some(path.to_string_lossy().into_owned());
    } else {
        tracing::warn!(
            path = %path.display(),
            "token file has surrounding whitespace; using it trimmed, as read at start-up \
             (a rotated token is not picked up until restart)"
        );
        config.auth_info.token = Some(token.to_string().into());
    }
    Ok(())
}

/// The DER certificates of a PEM bundle.
fn der_certificates(path: &std::path::Path) -> Result<Vec<Vec<u8>>, KubernetesSetupError> {
    let bad = |e: String| KubernetesSetupError::Ca(path.to_path_buf(), e);
    let text = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let certs: Vec<Vec<u8>> = pem::parse_many(&text)
        .map_err(|e| bad(e.to_string()))?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .collect();
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE in it".into()));
    }
    Ok(certs)
}

impl KubernetesDriver {
    /// A driver from config. `anon_key` is the filter's pseudonymisation key when instance
    /// ids are pseudonymised, so a restart can find its pod.
    ///
    /// With `api_server` set, that server with `token_file` and `ca_file`; otherwise what
    /// `kubectl` would use: the kubeconfig (`KUBECONFIG` or `~/.kube/config`, its current
    /// context, exec plugins and client certificates included), else the pod's service account.
    pub async fn new(
        cfg: &KubernetesConfig,
        anon_key: Option<&[u8]>,
        handle: tokio::runtime::Handle,
    ) -> Result<Self, KubernetesSetupError> {
        let mut config = match &cfg.api_server {
            Some(url) => {
                let uri = url
                    .parse::<http::Uri>()
                    .map_err(|e| KubernetesSetupError::ApiServer(url.clone(), e.to_string()))?;
                let mut config = kube::Config::new(uri);
                if let Some(path) = &cfg.token_file {
                    bearer_token(&mut config, path)?;
                }
                config
            }
            None if cfg.kubeconfig.is_some() || cfg.context.is_some() => {
                let named = cfg.kubeconfig.as_ref().map_or_else(
                    || "(KUBECONFIG or ~/.kube/config)".to_string(),
                    |p| p.display().to_string(),
                );
                let bad = |e: String| KubernetesSetupError::Kubeconfig(named.clone(), e);
                let kubeconfig = match &cfg.kubeconfig {
                    Some(path) => kube::config::Kubeconfig::read_from(path),
                    None => kube::config::Kubeconfig::read(),
                }
                .map_err(|e| bad(e.to_string()))?;
                let options = kube::config::KubeConfigOptions {
                    context: cfg.context.clone(),
                    ..Default::default()
                };
                kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .map_err(|e| bad(e.to_string()))?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| KubernetesSetupError::NoApiServer(e.to_string()))?,
        };
        if let Some(ca) = &cfg.ca_file {
            config.root_cert = Some(der_certificates(ca)?);
            config.root_cert_file = None;
        }
        config.default_namespace.clone_from(&cfg.namespace);
        config.connect_timeout = Some(cfg.timeout);
        config.read_timeout = Some(cfg.timeout);
        config.write_timeout = Some(cfg.timeout);
        // The client's middleware spawns onto the runtime it is built in.
        let client = {
            let _runtime = handle.enter();
            kube::Client::try_from(config)?
        };
        Ok(Self {
            cfg: cfg.clone(),
            client,
            handle,
            anonymizer: anon_key.map(ebb_udf_core::Anonymizer::new),
        })
    }

    async fn scale(&self, c: &Command, replicas: u32) -> Result<String, ActuateError> {
        let name = self.cfg.names.get(&c.service).unwrap_or(&c.service);
        let ns = &self.cfg.namespace;
        let patch = Patch::Merge(serde_json::json!({"spec": {"replicas": replicas}}));
        let params = PatchParams::default();
        let (kind, result) = match self.cfg.kind {
            WorkloadKind::Deployment => (
                "deployments",
                Api::<Deployment>::namespaced(self.client.clone(), ns)
                    .patch_scale(name, &params, &patch)
                    .await,
            ),
            WorkloadKind::StatefulSet => (
                "statefulsets",
                Api::<StatefulSet>::namespaced(self.client.clone(), ns)
                    .patch_scale(name, &params, &patch)
                    .await,
            ),
        };
        result.map_err(failure)?;
        Ok(format!(
            "PATCH /apis/apps/v1/namespaces/{ns}/{kind}/{name}/scale replicas={replicas}"
        ))
    }

    async fn restart(&self, c: &Command, instance: &str) -> Result<String, ActuateError> {
        let ns = &self.cfg.namespace;
        let pods = Api::<Pod>::namespaced(self.client.clone(), ns);
        let pod = match &self.anonymizer {
            None => instance.to_string(),
            Some(anonymizer) => {
                let selector = self.cfg.pod_selector.replace("{service}", &c.service);
                let list = pods
                    .list(&ListParams::default().labels(&selector))
                    .await
                    .map_err(failure)?;
                list.items
                    .into_iter()
                    .filter_map(|p| p.metadata.name)
                    .find(|n| n == instance || anonymizer.hash(n) == instance)
                    .ok_or_else(|| {
                        ActuateError::Unsupported(format!(
                            "no pod matching {selector} is instance {instance}"
                        ))
                    })?
            }
        };
        let path = format!("/api/v1/namespaces/{ns}/pods/{pod}");
        match pods.delete(&pod, &DeleteParams::default()).await {
            Ok(_) => Ok(format!("DELETE {path}")),
            // Gone already: the restart it asked for has happened. kube takes the code from the
            // Status body the server sent, so the reason is checked too.
            Err(kube::Error::Api(status)) if status.code == 404 || status.reason == "NotFound" => {
                Ok(format!("DELETE {path}: already gone"))
            }
            Err(e) => Err(failure(e)),
        }
    }
}

/// A failed call as the actuator reports it: the API server's refusal with its status, or a
/// transport failure.
fn failure(e: kube::Error) -> ActuateError {
    match e {
        // A Status body without a code still names its reason; show whichever the server gave.
        kube::Error::Api(status) if status.code == 0 => {
            ActuateError::Refused(format!("{}: {}", status.reason, status.message))
        }
        kube::Error::Api(status) => {
            ActuateError::Refused(format!("{}: {}", status.code, status.message))
        }
        other => ActuateError::GaveUp {
            attempts: 1,
            last: other.to_string(),
        },
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
