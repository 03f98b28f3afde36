//! Replaying a recorded topic through the whole pipeline reproduces what the live pipeline
//! commanded. Its own test binary: the demo it records takes both cores for a minute.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use ebb::config::{Config, Secret};
use ebb::replay::topic::{replay_topic, Bound, TopicRange};

/// A demo run on the mock cluster, kept alive after it ends; its raw telemetry topic is
/// replayed with the demo's own settings and compared with its commands topic.
#[test]
fn replaying_a_demo_runs_raw_topic_reproduces_its_commands_on_the_mock_cluster() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mock = rdkafka::mocking::MockCluster::new(3).unwrap();
    let mut config = Config::default();
    config.http.enabled = false;
    config.sql.pg_enabled = false;
    config.demo.quick = true;
    config.filter.anonymize.key = Some(Secret::new("replay-test-key-0123456789"));
    let mut log = Vec::new();
    let report = rt
        .block_on(ebb::demo::run_on(
            &mock,
            config.clone(),
            Some(Duration::from_secs(60)),
            std::future::pending(),
            &mut log,
        ))
        .unwrap();
    assert!(report.records_in > 0);
    // What the demo ran with.
    ebb::demo::quicken(&mut config);
    config.set_brokers(&mock.bootstrap_servers());
    let commands_topic = config.topics.name(&config.topics.commands);
    let live = common::commands_of(&common::read_until_quiet(
        &config,
        &[&commands_topic],
        1,
        Duration::from_secs(3),
        Duration::from_secs(60),
    ));
    assert!(live.iter().any(|c| c["action"] == "scale"), "{live:#?}");
    assert!(live.iter().any(|c| c["action"] == "restart"), "{live:#?}");

    // The run-prefix topics, as `ebb topics apply` would make them (the mock cluster has no
    // admin API for it).
    let mut prefixed = config.clone();
    prefixed.topics.prefix = "replayed.".into();
    for spec in ebb::topics::declared(&prefixed).unwrap() {
        mock.create_topic(&spec.name, spec.partitions, 1).unwrap();
    }
    let dir = std::env::temp_dir().join(format!("ebb-replay-topic-{}", rand::random::<u32>()));
    let range = TopicRange {
        topic: config.topics.name(&config.topics.raw),
        from: Bound::Edge,
        until: Bound::Edge,
    };
    let key = b"replay-test-key-0123456789".to_vec();
    let summary = replay_topic(
        &config,
        "",
        &key,
        &range,
        &dir,
        Some("replayed."),
        rt.handle().clone(),
        &mut |_, _, _| {},
    )
    .unwrap();
    assert_eq!(summary.counts.records, report.produced);
    // Every service's recorded load went through the policy comparison too.
    for service in ["checkout", "search"] {
        let p = summary.policies.get(service);
        assert!(
            p.is_some_and(|p| ["ebb", "hpa", "static", "oracle"]
                .iter()
                .all(|n| p.contains_key(*n))),
            "{service}: {p:?}"
        );
    }
    // The fleet report: every policy summed, a page to read and its plots.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap_or_default())
            .unwrap_or_default();
    for name in ["ebb", "hpa", "static", "oracle"] {
        assert!(
            report["policies"][name]["replica_minutes"]
                .as_f64()
                .unwrap_or(0.0)
                > 0.0,
            "{name}: {report}"
        );
    }
    assert_eq!(
        report["services"].as_u64(),
        Some(summary.policies.len() as u64)
    );
    let page = std::fs::read_to_string(dir.join("report.md")).unwrap_or_default();
    assert!(page.contains("| checkout |") && page.contains("![replicas](replicas.svg)"));
    for plot in ["load.svg", "replicas.svg"] {
        assert!(
            std::fs::metadata(dir.join(plot)).is_ok_and(|m| m.len() > 1000),
            "{plot}"
        );
    }
    let replayed = common::replayed_commands(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    common::assert_replay_reproduces(&live, &replayed);
    // The same commands on the run-prefix topic; the live topic got none from the replay.
    let on_topic = common::commands_of(&common::read_until_quiet(
        &config,
        &[&format!("replayed.{commands_topic}")],
        replayed.len(),
        Duration::from_secs(2),
        Duration::from_secs(30),
    ));
    // Kafka orders a service's commands, not the topic's: compare service by service.
    let by_service = |mut cs: Vec<serde_json::Value>| {
        cs.sort_by_key(|c| c["service"].as_str().unwrap_or_default().to_string());
        cs
    };
    assert_eq!(by_service(on_topic), by_service(replayed.clone()));
    let live_after = common::commands_of(&common::read_until_quiet(
        &config,
        &[&commands_topic],
        live.len(),
        Duration::from_secs(2),
        Duration::from_secs(30),
    ));
    assert_eq!(live_after.len(), live.len());
}
