//! The policy's rules as the operator applies them. The table of cases in
//! `tests/policy/cases.yaml` is shared with the admission test, which
//! applies the same cases through kube-apiserver and the chart's
//! ValidatingAdmissionPolicy.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use serde::Deserialize;
use serde_json::json;

use super::*;

#[derive(Deserialize)]
struct Table {
    policy: AmiCopyPolicySpec,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    spec: AmiCopySpec,
    denied: Vec<String>,
    #[serde(default)]
    values: Vec<String>,
}

fn table() -> Table {
    serde_yaml::from_str(include_str!("../../tests/policy/cases.yaml")).expect("the cases parse")
}

#[test]
fn every_case_of_the_shared_table_is_judged_as_it_says() {
    let table = table();
    let team = Governing {
        name: "team".into(),
        spec: table.policy,
    };
    assert!(table.cases.len() >= 15, "the table covers every rule");
    for case in table.cases {
        let denials = team.check(&case.spec, Some("123456789012"));
        let rules: Vec<&str> = denials.iter().map(|d| d.rule).collect();
        let values: Vec<&str> = denials.iter().map(|d| d.value.as_str()).collect();
        assert_eq!(rules, case.denied, "{}: rules", case.name);
        assert_eq!(values, case.values, "{}: values", case.name);
        for d in &denials {
            let message = d.message();
            assert!(
                message.contains("AmiCopyPolicy team") && message.contains(&d.value),
                "{}: {message}",
                case.name
            );
        }
    }
}

fn spec(v: serde_json::Value) -> AmiCopySpec {
    serde_json::from_value(v).expect("an AmiCopy spec")
}

#[test]
fn the_default_policy_allows_same_account_copies_only() {
    let default = Governing::default_policy();
    let own = Some("123456789012");
    let plain = spec(
        json!({"source": {"region": "us-east-1", "imageId": "ami-12345678"},
        "destinations": [{"region": "ap-southeast-2"}]}),
    );
    assert!(default.check(&plain, own).is_empty());
    let own_key = spec(
        json!({"source": {"region": "us-east-1", "imageId": "ami-12345678"},
        "encrypted": true,
        "destinations": [{"region": "eu-west-1", "kmsKeyId": "arn:aws:kms:eu-west-1:123456789012:key/k"}]}),
    );
    assert!(
        default.check(&own_key, own).is_empty(),
        "a key of this account"
    );
    let rules = |s: &AmiCopySpec| -> Vec<&'static str> {
        default.check(s, own).iter().map(|d| d.rule).collect()
    };
    let other_key = spec(
        json!({"source": {"region": "us-east-1", "imageId": "ami-12345678"},
        "encrypted": true,
        "destinations": [{"region": "eu-west-1", "kmsKeyId": "arn:aws:kms:eu-west-1:999999999999:key/k"}]}),
    );
    assert_eq!(rules(&other_key), ["kmsKeys"]);
    let role = spec(
        json!({"source": {"region": "us-east-1", "imageId": "ami-12345678"},
        "destinations": [{"region": "eu-west-1", "roleArn": "arn:aws:iam::999999999999:role/r"}]}),
    );
    assert_eq!(rules(&role), ["roles"]);
    let shared = spec(
        json!({"source": {"region": "us-east-1", "imageId": "ami-12345678"},
        "destinations": [{"region": "eu-west-1"}], "sharing": {"accounts": ["999999999999"]}}),
    );
    assert_eq!(rules(&shared), ["sharing.accounts"]);
    // The source's owner, as EC2 reports it.
    assert!(default.source_owner("123456789012", None, own));
    assert!(!default.source_owner("999999999999", None, own));
    assert!(
        !default.source_owner("123456789012", None, None),
        "own account unknown"
    );
    assert!(!default.source_owner("137112412989", Some("amazon"), own));
}

#[test]
fn a_judgement_blocks_destinations_refuses_the_object_or_trims_the_sharing() {
    let team = Governing {
        name: "team".into(),
        spec: table().policy,
    };
    let s = spec(
        json!({"source": {"region": "us-east-1", "imageId": "ami-12345678"},
        "destinations": [{"region": "eu-west-1"}, {"region": "ap-east-1"}],
        "sharing": {"accounts": ["444400001111", "999900001111"], "snapshots": true}}),
    );
    let j = judge(
        std::slice::from_ref(&team),
        &s,
        Some(("123456789012", None)),
        Some("123456789012"),
    );
    assert_eq!(j.blocked.keys().collect::<Vec<_>>(), ["ap-east-1"]);
    assert!(j.blocked["ap-east-1"].contains("regions \"ap-east-1\""));
    assert_eq!(j.global, None);
    let sharing = j.sharing.expect("sharing");
    assert_eq!(
        sharing.accounts,
        ["444400001111"],
        "the refused account is dropped"
    );
    assert_eq!(sharing.snapshots, None, "and the snapshots' sharing");
    assert_eq!(j.denials.len(), 3);
    let foreign = judge(
        &[team],
        &s,
        Some(("999999999999", None)),
        Some("123456789012"),
    );
    let why = foreign.global.expect("the whole object is refused");
    assert!(why.contains("sourceOwners \"999999999999\""), "{why}");
}

#[test]
fn patterns_are_exact_values_or_prefixes_ending_in_a_star() {
    let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(allows(&p(&["eu-west-1"]), "eu-west-1"));
    assert!(!allows(&p(&["eu-west-1"]), "eu-west-10"));
    assert!(allows(&p(&["eu-*"]), "eu-central-2"));
    assert!(!allows(&p(&["eu-*"]), "us-east-1"));
    assert!(allows(&p(&["*"]), "anything"));
    assert!(
        !allows(&p(&["*-1"]), "eu-west-1"),
        "a star only ends a pattern"
    );
    assert!(!allows(&[], "eu-west-1"));
}

#[test]
fn a_namespace_is_selected_by_labels_and_expressions() {
    let labels = BTreeMap::from([
        ("team".to_string(), "a".to_string()),
        ("amicopy.dev/policy".to_string(), "team-a".to_string()),
    ]);
    let expr = |key: &str, operator: &str, values: &[&str]| LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }]),
        ..LabelSelector::default()
    };
    assert!(selects(None, &labels), "no selector: every namespace");
    let by_label = LabelSelector {
        match_labels: Some(BTreeMap::from([("team".into(), "a".into())])),
        ..LabelSelector::default()
    };
    assert!(selects(Some(&by_label), &labels));
    assert!(!selects(Some(&by_label), &BTreeMap::new()));
    assert!(selects(Some(&expr("team", "In", &["a", "b"])), &labels));
    assert!(!selects(Some(&expr("team", "NotIn", &["a"])), &labels));
    assert!(selects(Some(&expr("team", "Exists", &[])), &labels));
    assert!(!selects(
        Some(&expr("amicopy.dev/policy", "DoesNotExist", &[])),
        &labels
    ));
    assert!(selects(
        Some(&expr("amicopy.dev/policy", "DoesNotExist", &[])),
        &BTreeMap::new()
    ));
}
