//! The `webhook` driver: POSTs each command as JSON to a URL, signed with HMAC-SHA256, and
//! retries transient failures (timeouts, 408, 429, 5xx) with exponential back-off.
//!
//! Headers: `X-Ebb-Signature: sha256=<hex of HMAC-SHA256(secret, body)>` (when a secret is
//! set), `X-Ebb-Command-Id` and `Idempotency-Key` (the command id, so a receiver can drop a
//! redelivery).

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use super::{ActuateError, Driver};
use crate::config::{ConfigError, Secret};
use crate::stages::decide::Command;

/// `[actuate.webhook]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Where commands are POSTed (`--url` overrides). No default.
    pub url: Option<String>,
    /// HMAC key signing each body; `EBB_WEBHOOK_SECRET` overrides. Unset, bodies go unsigned.
    pub secret: Option<Secret>,
    /// Per attempt. Default 2s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts per command, the first included. Default 5.
    pub max_attempts: u32,
    /// Wait before the second attempt; doubled each time, capped at 30s. Default 200ms.
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            url: None,
            secret: None,
            timeout: Duration::from_secs(2),
            max_attempts: 5,
            backoff: Duration::from_millis(200),
        }
    }
}

impl WebhookConfig {
    /// Checks values serde cannot, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| {
            Err(ConfigError::Invalid {
                key: format!("actuate.webhook.{key}"),
                why: why.into(),
            })
        };
        if let Some(url) = &self.url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return bad("url", "must start with http:// or https://");
            }
        }
        if self.timeout.is_zero() {
            return bad("timeout", "must be positive");
        }
        if self.max_attempts == 0 {
            return bad("max_attempts", "must be at least 1");
        }
        Ok(())
    }
}

/// The signature header's value for `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC-SHA256 takes keys of any length"),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// POSTs commands to one URL.
pub struct WebhookDriver {
    url: String,
    secret: Option<Secret>,
    cfg: WebhookConfig,
    client: reqwest::Client,
    handle: tokio::runtime::Handle,
}

impl WebhookDriver {
    /// A driver for `url`, running its requests on `handle`.
    pub fn new(
        url: String,
        cfg: &WebhookConfig,
        handle: tokio::runtime::Handle,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder().timeout(cfg.timeout).build()?;
        Ok(Self {
            url,
            secret: cfg.secret.clone(),
            cfg: cfg.clone(),
            client,
            handle,
        })
    }

    async fn post(&self, c: &Command, body: Vec<u8>) -> Result<String, ActuateError> {
        let mut wait = self.cfg.backoff;
        let mut last = String::new();
        for attempt in 1..=self.cfg.max_attempts {
            let mut request = self
                .client
                .post(&self.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("X-Ebb-Command-Id", &c.command_id)
                .header("Idempotency-Key", &c.command_id);
            if let Some(secret) = &self.secret {
                request = request.header("X-Ebb-Signature", signature(secret.expose(), &body));
            }
            match request.body(body.clone()).send().await {
                Ok(r) if r.status().is_success() => {
                    return Ok(format!(
                        "POST {} -> {} (attempt {attempt})",
                        self.url,
                        r.status()
                    ));
                }
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    let transient = status.is_server_error()
                        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                        || status == reqwest::StatusCode::REQUEST_TIMEOUT;
                    last = format!("{status}: {}", text.chars().take(200).collect::<String>());
                    if !transient {
                        return Err(ActuateError::Refused(last));
                    }
                }
                Err(e) => last = e.to_string(),
            }
            if attempt < self.cfg.max_attempts {
                tracing::warn!(command = %c.command_id, attempt, error = %last, retry_in = ?wait, "webhook failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
        Err(ActuateError::GaveUp {
            attempts: self.cfg.max_attempts,
            last,
        })
    }
}

impl Driver for WebhookDriver {
    fn name(&self) -> &'static str {
        "webhook"
    }

    fn apply(&mut self, c: &Command) -> Result<String, ActuateError> {
        let body = serde_json::to_vec(c).map_err(|e| ActuateError::Unsupported(e.to_string()))?;
        self.handle.block_on(self.post(c, body))
    }
}
