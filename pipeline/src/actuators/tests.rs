use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};

use super::kubernetes::{KubernetesConfig, KubernetesDriver};
use super::webhook::{signature, WebhookConfig, WebhookDriver};
use super::{ActuateError, Actuation, Actuator, Driver, ACTUATIONS};
use crate::clock::Clock;
use crate::stage::{Emitter, Input, Source, Stage};
use crate::stages::decide::process::Evidence;
use crate::stages::decide::Command;

type Err = Box<dyn std::error::Error>;

fn command(id: &str, action: &str, shadow: bool) -> Command {
    Command {
        command_id: id.into(),
        service: "checkout".into(),
        action: action.into(),
        replicas: (action == "scale").then_some(6),
        instance: (action == "restart").then(|| "checkout-5f01".into()),
        policy: if action == "scale" {
            "forecast"
        } else {
            "restart"
        }
        .into(),
        reason: "because".into(),
        evidence: Evidence::default(),
        decided_at: "2026-12-01T10:00:00.000Z".into(),
        shadow,
    }
}

struct FixedClock(chrono::DateTime<chrono::Utc>);

impl Clock for FixedClock {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.0
    }
}

fn at(text: &str) -> Arc<dyn Clock> {
    let t = chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&chrono::Utc))
        .unwrap_or_default();
    Arc::new(FixedClock(t))
}

/// A driver that counts what it was asked to do.
struct Counting(Arc<Mutex<Vec<String>>>);

impl Driver for Counting {
    fn name(&self) -> &'static str {
        "log"
    }
    fn apply(&mut self, c: &Command) -> Result<String, ActuateError> {
        if let Ok(mut v) = self.0.lock() {
            v.push(c.command_id.clone());
        }
        Ok("done".into())
    }
}

/// Runs `payload` through `a`; its outputs and dead-letter reasons.
fn run_payload(a: &mut Actuator, payload: &[u8]) -> (Vec<crate::stage::Output>, Vec<String>) {
    let mut emitter = Emitter::new();
    a.process(
        &Input {
            key: Some(b"checkout"),
            payload: Some(payload),
            headers: Vec::new(),
            source: Source {
                topic: "commands".into(),
                partition: 0,
                offset: 0,
            },
        },
        &mut emitter,
    );
    let (outputs, dead) = emitter.drain();
    (
        outputs,
        dead.into_iter().map(|d| d.reason.to_string()).collect(),
    )
}

fn actuate(a: &mut Actuator, c: &Command) -> Option<Actuation> {
    let payload = serde_json::to_vec(c).unwrap_or_default();
    let (outputs, dead) = run_payload(a, &payload);
    assert!(dead.is_empty());
    outputs
        .into_iter()
        .find(|o| o.output == ACTUATIONS)
        .and_then(|o| serde_json::from_slice(&o.payload).ok())
}

#[test]
fn a_command_is_carried_out_once_however_often_it_is_delivered() {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let clock = at("2026-12-01T10:00:05Z");
    let mut a = Actuator::new(
        Box::new(Counting(calls.clone())),
        false,
        Duration::from_secs(600),
        clock.clone(),
    );
    let c = command("checkout/1/scale", "scale", false);
    let first = actuate(&mut a, &c).map(|r| r.outcome);
    assert_eq!(first.as_deref(), Some("applied"));
    assert_eq!(
        actuate(&mut a, &c),
        None,
        "a redelivery is not actuated again"
    );
    // A new actuator that read the actuations topic back knows it too.
    let record = serde_json::to_vec(&Actuation {
        command_id: c.command_id.clone(),
        service: "checkout".into(),
        action: "scale".into(),
        driver: "log".into(),
        outcome: "applied".into(),
        detail: String::new(),
        at: String::new(),
    })
    .unwrap_or_default();
    let mut b = Actuator::new(
        Box::new(Counting(calls.clone())),
        false,
        Duration::from_secs(600),
        clock,
    );
    b.restore_state(0, &[(b"checkout".to_vec(), record)]);
    assert_eq!(actuate(&mut b, &c), None);
    assert_eq!(calls.lock().map(|v| v.len()).unwrap_or_default(), 1);
}

#[test]
fn shadow_dry_run_and_stale_commands_are_recorded_not_carried_out() {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let mut live = Actuator::new(
        Box::new(Counting(calls.clone())),
        false,
        Duration::from_secs(600),
        at("2026-12-01T10:00:05Z"),
    );
    let shadow = actuate(&mut live, &command("a", "scale", true));
    assert_eq!(shadow.map(|r| r.outcome).as_deref(), Some("shadow"));
    let mut late = Actuator::new(
        Box::new(Counting(calls.clone())),
        false,
        Duration::from_secs(600),
        at("2026-12-01T11:00:00Z"),
    );
    let stale = actuate(&mut late, &command("b", "scale", false));
    assert_eq!(stale.map(|r| r.outcome).as_deref(), Some("stale"));
    let mut dry = Actuator::new(
        Box::new(Counting(calls.clone())),
        true,
        Duration::from_secs(600),
        at("2026-12-01T10:00:05Z"),
    );
    let Some(r) = actuate(&mut dry, &command("c", "restart", false)) else {
        panic!("no actuation record");
    };
    assert_eq!(r.outcome, "dry_run");
    assert!(
        r.detail.contains("restart checkout/checkout-5f01"),
        "{}",
        r.detail
    );
    assert!(calls.lock().map(|v| v.is_empty()).unwrap_or_default());
}

/// One request as the test server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    uri: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// A real HTTP server on loopback answering from a script of (status, delay, body).
struct Server {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    runtime: tokio::runtime::Runtime,
}

fn server(script: Vec<(u16, Duration, &'static str)>) -> Result<Server, Err> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let script = Arc::new(Mutex::new(VecDeque::from(script)));
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let url = format!("http://{}", listener.local_addr()?);
    let (record, answers) = (seen.clone(), script.clone());
    let app = axum::Router::new().fallback(
        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let (record, answers) = (record.clone(), answers.clone());
            async move {
                if let Ok(mut r) = record.lock() {
                    r.push(Seen {
                        method,
                        uri: uri.to_string(),
                        headers,
                        body: body.to_vec(),
                    });
                }
                let (status, delay, text) = answers
                    .lock()
                    .ok()
                    .and_then(|mut a| a.pop_front())
                    .unwrap_or((200, Duration::ZERO, "{}"));
                tokio::time::sleep(delay).await;
                (
                    StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
                    text.to_string(),
                )
            }
        },
    );
    runtime.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(Server { url, seen, runtime })
}

impl Server {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

fn webhook_cfg(secret: Option<&str>) -> WebhookConfig {
    WebhookConfig {
        url: None,
        secret: secret.map(crate::config::Secret::new),
        timeout: Duration::from_millis(300),
        max_attempts: 3,
        backoff: Duration::from_millis(20),
    }
}

#[test]
fn webhook_signs_the_body_and_retries_a_server_error() -> Result<(), Err> {
    let s = server(vec![
        (503, Duration::ZERO, "busy"),
        (200, Duration::ZERO, "ok"),
    ])?;
    let mut d = WebhookDriver::new(
        format!("{}/hooks/ebb", s.url),
        &webhook_cfg(Some("s3cret")),
        s.runtime.handle().clone(),
    )?;
    let c = command("checkout/1/scale", "scale", false);
    let detail = d.apply(&c)?;
    assert!(detail.contains("attempt 2"), "{detail}");
    let seen = s.seen();
    assert_eq!(seen.len(), 2);
    for r in &seen {
        assert_eq!(r.method, Method::POST);
        assert_eq!(r.uri, "/hooks/ebb");
        let sent: Command = serde_json::from_slice(&r.body)?;
        assert_eq!(sent, c);
        // The receiver's check: recompute the HMAC over the body it got.
        let header = r
            .headers
            .get("x-ebb-signature")
            .and_then(|v| v.to_str().ok());
        assert_eq!(header, Some(signature(b"s3cret", &r.body).as_str()));
        assert_ne!(header, Some(signature(b"other", &r.body).as_str()));
        let id = r
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok());
        assert_eq!(id, Some("checkout/1/scale"));
    }
    Ok(())
}

#[test]
fn webhook_does_not_retry_a_refusal_and_gives_up_on_timeouts() -> Result<(), Err> {
    let s = server(vec![(400, Duration::ZERO, "bad command")])?;
    let mut d = WebhookDriver::new(
        s.url.clone(),
        &webhook_cfg(None),
        s.runtime.handle().clone(),
    )?;
    match d.apply(&command("x", "scale", false)) {
        Err(ActuateError::Refused(m)) => assert!(m.contains("400") && m.contains("bad command")),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(s.seen().len(), 1, "a 4xx is not retried");
    assert!(s.seen()[0].headers.get("x-ebb-signature").is_none());

    let slow = Duration::from_millis(1500);
    let s = server(vec![(200, slow, ""), (200, slow, ""), (200, slow, "")])?;
    let mut d = WebhookDriver::new(
        s.url.clone(),
        &webhook_cfg(None),
        s.runtime.handle().clone(),
    )?;
    match d.apply(&command("y", "scale", false)) {
        Err(ActuateError::GaveUp { attempts, .. }) => assert_eq!(attempts, 3),
        other => panic!("expected to give up, got {other:?}"),
    }
    assert_eq!(s.seen().len(), 3);
    Ok(())
}

/// A driver against `url` whose token file holds `token` verbatim.
fn k8s_with(
    url: &str,
    handle: tokio::runtime::Handle,
    key: Option<&[u8]>,
    token: &str,
) -> Result<KubernetesDriver, Err> {
    static FILES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("ebb-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let n = FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let token_file = dir.join(format!("token-{n}"));
    std::fs::write(&token_file, token)?;
    let cfg = KubernetesConfig {
        api_server: Some(url.into()),
        token_file: Some(token_file),
        namespace: "shop".into(),
        names: [("checkout".to_string(), "checkout-web".to_string())].into(),
        ..KubernetesConfig::default()
    };
    Ok(handle.block_on(KubernetesDriver::new(&cfg, key, handle.clone()))?)
}

/// A driver whose token file was written by `echo`: trailing newline and all.
fn k8s(
    url: &str,
    handle: tokio::runtime::Handle,
    key: Option<&[u8]>,
) -> Result<KubernetesDriver, Err> {
    k8s_with(url, handle, key, "tok-123\n")
}

#[test]
fn kubernetes_uses_the_named_kubeconfig_context_and_its_credentials() -> Result<(), Err> {
    let s = server(vec![(200, Duration::ZERO, "{}")])?;
    // The current context points nowhere; the named one is the test server.
    let kubeconfig = format!(
        "apiVersion: v1
kind: Config
current-context: elsewhere
contexts:
- name: elsewhere
  context: {{cluster: nowhere, user: nobody}}
- name: shop-admin
  context: {{cluster: local, user: ebb}}
clusters:
- name: nowhere
  cluster: {{server: \"http://127.0.0.1:1\"}}
- name: local
  cluster: {{server: \"{}\"}}
users:
- name: nobody
  user: {{token: wrong}}
- name: ebb
  user: {{token: tok-kc}}
",
        s.url
    );
    let dir = std::env::temp_dir().join(format!("ebb-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("config");
    std::fs::write(&path, kubeconfig)?;
    let cfg = KubernetesConfig {
        kubeconfig: Some(path.clone()),
        context: Some("shop-admin".into()),
        namespace: "shop".into(),
        ..KubernetesConfig::default()
    };
    cfg.validate()?;
    // Built inside the runtime, as `ebb actuate` builds it.
    let handle = s.runtime.handle().clone();
    let mut d = s
        .runtime
        .block_on(KubernetesDriver::new(&cfg, None, handle))?;
    d.apply(&command("c", "scale", false))?;
    let seen = s.seen();
    assert_eq!(
        seen[0]
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer tok-kc")
    );
    assert_eq!(
        split(&seen[0].uri).0,
        "/apis/apps/v1/namespaces/shop/deployments/checkout/scale"
    );
    // A context that is not there fails at start-up, naming the key and the file.
    let missing = KubernetesConfig {
        context: Some("prod".into()),
        ..cfg.clone()
    };
    let handle = s.runtime.handle().clone();
    let err = s
        .runtime
        .block_on(KubernetesDriver::new(&missing, None, handle))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.starts_with("actuate.kubernetes.kubeconfig "), "{err}");
    assert!(err.contains("prod"), "{err}");
    // Naming the server directly and a kubeconfig too is ambiguous.
    let both = KubernetesConfig {
        api_server: Some(s.url.clone()),
        ..cfg
    };
    let err = both
        .validate()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("actuate.kubernetes.api_server"), "{err}");
    Ok(())
}

#[test]
fn a_missing_or_empty_token_file_fails_at_start_up_naming_the_key() -> Result<(), Err> {
    let s = server(Vec::new())?;
    let cfg = KubernetesConfig {
        api_server: Some(s.url.clone()),
        token_file: Some("/nonexistent/ebb/token".into()),
        ..KubernetesConfig::default()
    };
    let handle = s.runtime.handle().clone();
    let err = s
        .runtime
        .block_on(KubernetesDriver::new(&cfg, None, handle))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("actuate.kubernetes.token_file /nonexistent/ebb/token"),
        "{err}"
    );
    let err = k8s_with(&s.url, s.runtime.handle().clone(), None, " \n")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("empty"), "{err}");
    Ok(())
}

/// What an API server answers to a scale patch and a pod delete.
const SCALE: &str = r#"{"apiVersion":"autoscaling/v1","kind":"Scale","metadata":{"name":"checkout-web","namespace":"shop"},"spec":{"replicas":6},"status":{"replicas":4}}"#;
const DELETED: &str =
    r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"checkout-5f01","namespace":"shop"}}"#;

/// A request's path and its query pairs (still percent-encoded).
fn split(uri: &str) -> (&str, Vec<&str>) {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    (path, query.split('&').filter(|p| !p.is_empty()).collect())
}

#[test]
fn kubernetes_patches_the_scale_subresource_and_deletes_the_pod() -> Result<(), Err> {
    let s = server(vec![
        (200, Duration::ZERO, SCALE),
        (200, Duration::ZERO, DELETED),
    ])?;
    let mut d = k8s(&s.url, s.runtime.handle().clone(), None)?;
    d.apply(&command("a", "scale", false))?;
    d.apply(&command("b", "restart", false))?;
    let seen = s.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].method, Method::PATCH);
    assert_eq!(
        split(&seen[0].uri),
        (
            "/apis/apps/v1/namespaces/shop/deployments/checkout-web/scale",
            vec![]
        )
    );
    assert_eq!(
        seen[0]
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/merge-patch+json")
    );
    let body: serde_json::Value = serde_json::from_slice(&seen[0].body)?;
    assert_eq!(body, serde_json::json!({"spec": {"replicas": 6}}));
    assert_eq!(
        seen[0]
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer tok-123")
    );
    assert_eq!(seen[1].method, Method::DELETE);
    assert_eq!(
        split(&seen[1].uri).0,
        "/api/v1/namespaces/shop/pods/checkout-5f01"
    );
    // The API server's refusal is reported with its status and message.
    let s = server(vec![(
        403,
        Duration::ZERO,
        r#"{"apiVersion":"v1","kind":"Status","status":"Failure","message":"deployments.apps \"checkout-web\" is forbidden","reason":"Forbidden","code":403}"#,
    )])?;
    let mut d = k8s(&s.url, s.runtime.handle().clone(), None)?;
    match d.apply(&command("c", "scale", false)) {
        Err(ActuateError::Refused(m)) => {
            assert!(m.starts_with("403: ") && m.contains("forbidden"), "{m}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    Ok(())
}

#[test]
fn kubernetes_finds_the_pod_behind_a_pseudonym() -> Result<(), Err> {
    let key = b"filter-key";
    let pods = r#"{"apiVersion":"v1","kind":"PodList","metadata":{"resourceVersion":"7"},"items":[{"metadata":{"name":"checkout-7d9-a"}},{"metadata":{"name":"checkout-7d9-b"}}]}"#;
    let s = server(vec![
        (200, Duration::ZERO, pods),
        (
            404,
            Duration::ZERO,
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"pods \"checkout-7d9-b\" not found","reason":"NotFound","details":{"name":"checkout-7d9-b","kind":"pods"},"code":404}"#,
        ),
    ])?;
    // A token file without a newline is handed to kube to re-read as it rotates.
    let mut d = k8s_with(&s.url, s.runtime.handle().clone(), Some(key), "tok-456")?;
    let mut c = command("r", "restart", false);
    c.instance = Some(ebb_udf_core::anonymize(key, "checkout-7d9-b"));
    let detail = d.apply(&c)?;
    assert!(detail.contains("already gone"), "{detail}");
    let seen = s.seen();
    assert_eq!(
        seen[0]
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer tok-456")
    );
    assert_eq!(seen[0].method, Method::GET);
    let (path, query) = split(&seen[0].uri);
    assert_eq!(path, "/api/v1/namespaces/shop/pods");
    assert!(query.contains(&"labelSelector=app%3Dcheckout"), "{query:?}");
    assert_eq!(seen[1].method, Method::DELETE);
    assert_eq!(
        split(&seen[1].uri).0,
        "/api/v1/namespaces/shop/pods/checkout-7d9-b"
    );
    // An instance no pod hashes to is refused, not guessed.
    let s = server(vec![(200, Duration::ZERO, pods)])?;
    let mut d = k8s(&s.url, s.runtime.handle().clone(), Some(key))?;
    c.instance = Some("0123456789abcdef".into());
    assert!(matches!(d.apply(&c), Err(ActuateError::Unsupported(_))));
    assert_eq!(s.seen().len(), 1, "nothing deleted");
    Ok(())
}

#[test]
fn avro_commands_are_carried_out_and_unreadable_ones_dead_lettered_with_the_reason(
) -> Result<(), Err> {
    let codec = crate::codec::avro::test_codec();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let mut a = Actuator::new(
        Box::new(Counting(calls.clone())),
        false,
        Duration::from_secs(600),
        at("2026-12-01T10:00:05Z"),
    )
    .reading_avro(codec.clone());
    let c = command("checkout/1/restart", "restart", false);
    let payload = codec.encode_event(crate::codec::EventSchema::Commands, &c)?;
    let (outputs, dead) = run_payload(&mut a, &payload);
    assert!(dead.is_empty(), "{dead:?}");
    let record: Actuation = serde_json::from_slice(&outputs[0].payload)?;
    assert_eq!(
        (record.command_id.as_str(), record.outcome.as_str()),
        ("checkout/1/restart", "applied")
    );
    assert_eq!(
        calls.lock().map(|v| v.clone()).unwrap_or_default(),
        ["checkout/1/restart"]
    );
    // A schema id the registry never gave, and a truncated datum.
    let mut unknown = payload.clone();
    unknown[4] = 99;
    assert_eq!(run_payload(&mut a, &unknown).1, ["unknown_schema_id"]);
    assert_eq!(
        run_payload(&mut a, &payload[..payload.len() - 4]).1,
        ["malformed"]
    );
    assert_eq!(
        run_payload(&mut a, b"{\"command_id\": 1}").1,
        ["wrong_type"]
    );
    assert_eq!(calls.lock().map(|v| v.len()).unwrap_or_default(), 1);
    Ok(())
}

#[test]
fn an_avro_command_written_under_a_newer_compatible_schema_is_read() -> Result<(), Err> {
    // A producer that evolved commands.avsc with a defaulted field: readers of ours still act.
    let mut schema: serde_json::Value = serde_json::from_str(crate::codec::avro::COMMANDS_SCHEMA)?;
    if let Some(fields) = schema["fields"].as_array_mut() {
        fields.push(serde_json::json!({"name": "ticket", "type": "string", "default": ""}));
    }
    let newer = apache_avro::Schema::parse_str(&schema.to_string())?;
    let codec = crate::codec::avro::test_codec();
    codec.schemas.insert(42, &schema.to_string())?;
    let c = command("checkout/2/scale", "scale", false);
    let value = apache_avro::to_value(&c)?;
    let apache_avro::types::Value::Record(mut fields) = value else {
        panic!("a command is a record");
    };
    fields.push((
        "ticket".into(),
        apache_avro::types::Value::String("OPS-1".into()),
    ));
    let value = apache_avro::types::Value::Record(fields).resolve(&newer)?;
    let mut payload = vec![0, 0, 0, 0, 42];
    payload.extend(
        apache_avro::writer::datum::GenericDatumWriter::builder(&newer)
            .build()?
            .write_value_to_vec(value)?,
    );
    let (_, read) = crate::codec::decode_event::<Command>(
        &payload,
        crate::codec::EventSchema::Commands,
        &codec,
    )?;
    assert_eq!(read, c);
    Ok(())
}
