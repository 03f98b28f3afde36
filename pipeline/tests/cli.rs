//! The `ebb` command's contract, as outside checks use it.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Target;

fn ebb() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ebb"));
    c.env_remove("EBB_CONFIG")
        .env_remove("EBB_TOPIC_PREFIX")
        .env("RUST_LOG", "warn");
    c
}

#[test]
fn demo_json_last_line_accounts_for_every_record() {
    let out = ebb()
        .args([
            "demo",
            "--duration",
            "6s",
            "--json",
            "--http",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().expect("a last line");
    let v: serde_json::Value = serde_json::from_str(last).expect("last line is JSON");
    let (records_in, records_out) = (v["in"].as_u64().unwrap(), v["out"].as_u64().unwrap());
    let dead: u64 = v["dead_lettered"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert!(records_in > 0);
    assert_eq!(records_in, records_out + dead, "{last}");
}

#[test]
fn bad_config_fails_at_startup_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("ebb-cfg-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ebb.toml");
    std::fs::write(&file, "[filter.outliers]\nthreshold = -1\n").unwrap();
    let out = ebb()
        .args(["config", "check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("filter.outliers.threshold"));
}

#[test]
fn topics_apply_is_idempotent_and_run_filter_exits_zero_on_sigterm() {
    let Some(target) = Target::real() else { return };
    let brokers = target.brokers();
    let prefix = format!("cli{}.", rand::random::<u32>());
    let apply = || {
        ebb()
            .args(["topics", "apply", "--brokers", &brokers])
            .env("EBB_TOPIC_PREFIX", &prefix)
            .output()
            .unwrap()
    };
    let first = apply();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let text = String::from_utf8_lossy(&first.stdout);
    assert!(
        text.contains(&format!("{prefix}telemetry.raw")) && text.contains("created"),
        "{text}"
    );
    let second = apply();
    let text = String::from_utf8_lossy(&second.stdout);
    assert!(
        second.status.success() && !text.contains("created") && text.contains("unchanged"),
        "{text}"
    );

    let mut child = ebb()
        .args([
            "run",
            "filter",
            "--brokers",
            &brokers,
            "--http",
            "127.0.0.1:0",
        ])
        .env("EBB_TOPIC_PREFIX", &prefix)
        .env("EBB_ANON_KEY", "cli-test-key-0123456789")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        child.try_wait().unwrap().is_none(),
        "run filter keeps running"
    );
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "run filter did not stop within 30 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn schemas_register_checks_then_registers_each_subject() {
    let Some(target) = Target::real() else { return };
    let prefix = format!("cli{}.", rand::random::<u32>());
    let registry = target.registry().unwrap();
    let register = || {
        ebb()
            .args(["schemas", "register", "--registry", &registry])
            .env("EBB_TOPIC_PREFIX", &prefix)
            .output()
            .unwrap()
    };
    let out = register();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{prefix}telemetry.raw-value")) && text.contains("new subject"),
        "{text}"
    );
    let again = register();
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.status.success() && text.contains("compatible") && !text.contains("new subject"),
        "{text}"
    );
}
