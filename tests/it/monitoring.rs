//! The chart's alerts and dashboard: the alerting rules pass their
//! `promtool test rules` unit tests (promtool built from the Prometheus Go
//! module by `hack/testbed/build.sh promtool`), and every metric the rules
//! and the dashboard query is one the running operator exports.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::chart::render;
use crate::reliability::harness;
use crate::testbed::{self, is_ready, wait_for};

fn promtool() -> PathBuf {
    testbed::testbed_program(
        "AMICOPY_PROMTOOL",
        "PROMETHEUS_VERSION",
        "promtool",
        "promtool",
    )
}

/// The rule groups of the chart's PrometheusRule.
fn rule_groups() -> Value {
    let objects = render(
        "amicopy",
        "ops",
        &json!({"prometheusRule": {"enabled": true}}),
    );
    let rule = objects
        .iter()
        .find(|o| o["kind"] == "PrometheusRule")
        .expect("a PrometheusRule");
    json!({"groups": rule["spec"]["groups"]})
}

#[test]
fn the_alerting_rules_pass_their_promtool_unit_tests() {
    let dir = std::env::temp_dir().join(format!("amicopy-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("rules.yaml"),
        serde_yaml::to_string(&rule_groups()).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("alerts_test.yaml"),
        include_str!("../prometheus/alerts_test.yaml"),
    )
    .unwrap();
    for args in [
        vec!["check", "rules", "rules.yaml"],
        vec!["test", "rules", "alerts_test.yaml"],
    ] {
        let out = Command::new(promtool())
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Metric names (`amicopy_...`) in a PromQL expression.
fn metrics_in(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("amicopy_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

#[tokio::test]
async fn the_dashboard_and_the_alerts_query_only_metrics_the_operator_exports() {
    let mut queried = BTreeSet::new();
    let dashboard: Value = serde_json::from_str(include_str!(
        "../../charts/ami-copy-operator/files/dashboard.json"
    ))
    .unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queried.extend(metrics_in(target["expr"].as_str().unwrap()));
        }
    }
    for group in rule_groups()["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            queried.extend(metrics_in(rule["expr"].as_str().unwrap()));
        }
    }
    assert!(queried.len() >= 8, "{queried:?}");

    // One copy made by the operator binary: every family has a series.
    let bed = harness::bed("monitoring", 93, Duration::from_millis(300)).await;
    let mut op = bed.launch.spawn();
    let source = harness::seed_source(&bed.sim, "monitoring");
    harness::create(&bed.api, "watched", harness::spec(&source, &["eu-west-1"])).await;
    wait_for(&bed.api, "watched", "Ready=True", is_ready).await;
    let deadline = tokio::time::Instant::now() + testbed::WAIT;
    loop {
        let metrics = op.metrics().await;
        let exported: BTreeSet<&str> = metrics
            .text()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let missing: Vec<&String> = queried
            .iter()
            .filter(|q| !exported.contains(q.as_str()))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queried but not exported: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    testbed::delete(&bed.api, "watched").await;
    testbed::wait_gone(&bed.api, "watched").await;
    op.kill().await;
}
