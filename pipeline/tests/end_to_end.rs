//! End to end on real Kafka: telemetry from `ebb produce` through `ebb run all` to commands,
//! and `ebb replay --topic` of the recorded telemetry giving the same commands.
//! Its own test binary, so it never shares the machine with the demo tests of `cli.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::ebb;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Target;

/// The demo's minute-scale settings, for `ebb run all` on a real broker; `{id}` keeps this
/// run's consumer groups and transactional id apart from any other.
const QUICK_TOML: &str = r#"
[sql]
pg_enabled = false

[filter]
group_id = "{id}.filter"

[window]
group_id = "{id}.window"
size = "2s"
metrics = {}
allowed_lateness = "500ms"
grace = "500ms"
idle_timeout = "3s"

[models]
group_id = "{id}.models"
forecast_step = "2s"
snapshot_every = 10

[models.forecast]
horizons = ["10s", "30s", "60s"]

[models.detector]
warmup = 10
baseline_halflife = 30.0
alert_score = 0.35

[decide]
group_id = "{id}.decide"
transactional_id = "{id}.decide-tx"

[decide.scale]
up_stabilization = "4s"
down_stabilization = "30s"
cooldown = "10s"
startup_time = "10s"
forecast_staleness = "10s"

[decide.restart]
anomaly_hold = "30s"
interval = "300s"
"#;

/// Real Kafka, every stage: a minute of synthetic telemetry from `ebb produce` through
/// `ebb run all` yields a forecast- or rule-led scale-up of the ramping service and one restart
/// of the faulty instance, each with its reason; replaying the raw topic reproduces them.
#[test]
fn real_kafka_run_all_commands_scale_and_restart_and_a_topic_replay_reproduces_them() {
    let Some(target) = Target::real() else { return };
    let brokers = target.brokers();
    let id = format!("e2e{}", rand::random::<u32>());
    let prefix = format!("{id}.");
    let dir = std::env::temp_dir().join(&id);
    std::fs::create_dir_all(&dir).unwrap();
    let config_file = dir.join("ebb.toml");
    std::fs::write(&config_file, QUICK_TOML.replace("{id}", &id)).unwrap();
    let ebb_here = || {
        let mut c = ebb();
        c.arg("--config")
            .arg(&config_file)
            .env("EBB_TOPIC_PREFIX", &prefix)
            .env("EBB_ANON_KEY", "e2e-test-key-0123456789");
        c
    };
    let applied = ebb_here()
        .args(["topics", "apply", "--brokers", &brokers])
        .output()
        .unwrap();
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let log = dir.join("run-all.log");
    let mut pipeline = ebb_here()
        .args(["run", "all", "--brokers", &brokers, "--http", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let log_tail = || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    let produced = ebb_here()
        .args([
            "produce",
            "--synthetic",
            "--brokers",
            &brokers,
            "--duration",
            "60s",
        ])
        .output()
        .unwrap();
    assert!(
        produced.status.success(),
        "{}",
        String::from_utf8_lossy(&produced.stderr)
    );
    assert!(
        pipeline.try_wait().unwrap().is_none(),
        "ebb run all exited early:\n{}",
        log_tail()
    );
    let mut config = ebb::config::Config::default();
    config.set_brokers(&brokers);
    config.topics.prefix = prefix.clone();
    let commands = config.topics.name(&config.topics.commands);
    // Whatever arrived, once the topic has been quiet a while: a failure shows the log.
    let got = common::read_until_quiet(
        &config,
        &[&commands],
        0,
        Duration::from_secs(20),
        Duration::from_secs(120),
    );
    let _ = Command::new("kill")
        .args(["-TERM", &pipeline.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while pipeline.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = pipeline.kill();
    let tail = log_tail();

    // The recorded raw topic, replayed through the same stages on a simulated clock, gives
    // the commands the live pipeline gave.
    let replay_dir = dir.join("replay");
    let replayed = ebb_here()
        .args(["replay", "--brokers", &brokers, "--topic"])
        .arg(config.topics.name(&config.topics.raw))
        .arg("--report")
        .arg(&replay_dir)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        replayed.status.success(),
        "{}",
        String::from_utf8_lossy(&replayed.stderr)
    );
    let stdout = String::from_utf8_lossy(&replayed.stdout);
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    assert!(
        summary["counts"]["records"].as_u64().unwrap_or(0) > 0,
        "{stdout}"
    );
    let replayed_commands = common::replayed_commands(&replay_dir);
    let _ = std::fs::remove_dir_all(&dir);

    let commands = common::commands_of(&got);
    common::assert_replay_reproduces(&commands, &replayed_commands);
    let scale_up = commands.iter().find(|c| {
        c["action"] == "scale"
            && c["service"] == "checkout"
            && c["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("scale up"))
    });
    assert!(
        scale_up.is_some(),
        "no scale-up of checkout: {commands:#?}\nrun all said:\n{tail}"
    );
    let restarts: Vec<&serde_json::Value> = commands
        .iter()
        .filter(|c| c["action"] == "restart")
        .collect();
    assert_eq!(restarts.len(), 1, "{commands:#?}\nrun all said:\n{tail}");
    assert_eq!(restarts[0]["service"], "search");
    assert!(
        restarts[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("while an anomaly was open")),
        "{}",
        restarts[0]["reason"]
    );
}
