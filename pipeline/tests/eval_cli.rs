//! `ebb eval`: its NAB score agrees with NAB's own scorer on a NAB-layout folder it was not
//! built around, and the forecast evaluation prints its contract line for any CSV columns.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}

fn ebb(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ebb"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ebb")
}

fn last_json(out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line {line:?}: {e}\n{stdout}"))
}

/// The Python that has NAB's scorer requirements (compose/test.sh makes it), or `None`
/// outside CI.
fn nab_python() -> Option<String> {
    match std::env::var("EBB_NAB_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true but EBB_NAB_PYTHON is not set: run compose/test.sh")
        }
        _ => {
            eprintln!("SKIPPED: EBB_NAB_PYTHON not set (compose/test.sh sets it)");
            None
        }
    }
}

/// A NAB-layout folder made of some of the shared NAB files: a file without anomalies,
/// files with one and with several windows, from different categories.
fn subset(dir: &Path) {
    let nab = shared().join("data/nab");
    let files = [
        "artificialNoAnomaly/art_daily_small_noise.csv",
        "artificialWithAnomaly/art_daily_jumpsup.csv",
        "realAWSCloudwatch/ec2_cpu_utilization_fe7f93.csv",
        "realTraffic/speed_7578.csv",
        "realTweets/Twitter_volume_GOOG.csv",
    ];
    let all: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(nab.join("combined_windows.json")).unwrap())
            .unwrap();
    let mut labels = BTreeMap::new();
    for f in files {
        let f = f.to_string();
        let target = dir.join(&f);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(nab.join(&f), &target).unwrap();
        labels.insert(f.clone(), all[&f].clone());
    }
    std::fs::write(
        dir.join("combined_windows.json"),
        serde_json::to_string_pretty(&labels).unwrap(),
    )
    .unwrap();
}

#[test]
fn eval_anomalies_agrees_with_nabs_own_scorer() {
    let Some(python) = nab_python() else {
        return;
    };
    let tmp = std::env::temp_dir().join(format!("ebb-nab-{}", rand::random::<u32>()));
    let data = tmp.join("data");
    let results = tmp.join("results");
    subset(&data);
    let out = ebb(&[
        "eval",
        "anomalies",
        "--nab",
        data.to_str().unwrap(),
        "--nab-results",
        results.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours = last_json(&out);
    for key in ["score_standard", "precision", "recall"] {
        assert!(ours[key].is_number(), "{key} missing: {ours}");
    }
    assert_eq!(ours["files"].as_array().unwrap().len(), 5);
    let scorer = Command::new(python)
        .arg(shared().join("tools/nab-scorer/score.py"))
        .args(["--data", data.to_str().unwrap()])
        .args(["--results", results.to_str().unwrap()])
        .args(["--detector", "ebb"])
        .output()
        .expect("run NAB's scorer");
    assert!(
        scorer.status.success(),
        "{}",
        String::from_utf8_lossy(&scorer.stderr)
    );
    let theirs = last_json(&scorer);
    let (a, b) = (
        ours["score_standard"].as_f64().unwrap(),
        theirs["score"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 0.01, "ebb says {a}, NAB's scorer says {b}");
    assert_eq!(ours["threshold"], theirs["threshold"]);
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn eval_forecast_reads_any_columns_and_prints_the_contract_line() {
    let tmp = std::env::temp_dir().join(format!("ebb-fc-{}.csv", rand::random::<u32>()));
    // Three days at five-minute steps, with other columns around the two that matter.
    let mut csv = String::from("host,when,load,note\n");
    for i in 0..(3 * 288) {
        let t = chrono::DateTime::from_timestamp(1_600_000_000 + i * 300, 0).unwrap();
        let day = (i as f64 / 288.0) * std::f64::consts::TAU;
        let v = 500.0 + 200.0 * day.sin() + ((i * 7919) % 13) as f64;
        csv.push_str(&format!("h1,{},{v:.3},\"a, b\"\n", t.to_rfc3339()));
    }
    std::fs::write(&tmp, csv).unwrap();
    let out = ebb(&[
        "eval",
        "forecast",
        "--file",
        tmp.to_str().unwrap(),
        "--time-column",
        "when",
        "--value-column",
        "load",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = last_json(&out);
    for h in ["1m", "5m", "15m"] {
        for key in ["mae", "skill_vs_last", "skill_vs_yesterday"] {
            assert!(j[key][h].is_number(), "{key}.{h} missing: {j}");
        }
        assert!(j["skill_vs_yesterday"][h].as_f64().unwrap() > 0.0, "{j}");
    }
    let _ = std::fs::remove_file(&tmp);
}

#[test]
fn eval_forecast_names_the_line_of_a_bad_cell() {
    let tmp = std::env::temp_dir().join(format!("ebb-bad-{}.csv", rand::random::<u32>()));
    std::fs::write(
        &tmp,
        "timestamp,value\n2024-01-01 00:00:00,1\n2024-01-01 00:05:00,oops\n",
    )
    .unwrap();
    let out = ebb(&["eval", "forecast", "--file", tmp.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(":3:") && err.contains("oops"), "{err}");
    let _ = std::fs::remove_file(&tmp);
}
