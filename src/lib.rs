//! AmiCopy operator: copies Amazon Machine Images across AWS regions and keeps
//! the copies in step with their source.
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod controller;
pub mod ec2;
pub mod error;
pub mod events;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod policy;
pub mod server;
pub mod status;
pub mod tracker;
pub mod usage;

pub use api::{AmiCopy, AmiCopySpec, AmiCopyStatus};
pub use error::{Error, Result};

/// The CRD as YAML, exactly as committed under `crds/`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&AmiCopy::crd()).expect("the CRD serializes to YAML")
}

/// The `AmiCopyPolicy` CRD as YAML, exactly as committed under `crds/`.
pub fn policy_crd_yaml() -> String {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&policy::AmiCopyPolicy::crd()).expect("the CRD serializes to YAML")
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;
    use serde_json::json;

    use super::*;

    #[test]
    fn the_crds_use_only_formats_kubernetes_knows() {
        // kube-apiserver warns of any other ("unrecognized format") at
        // every `kubectl apply`.
        let known = [
            "int32",
            "int64",
            "float",
            "double",
            "byte",
            "date",
            "date-time",
            "password",
        ];
        for crd in [crd_yaml(), policy_crd_yaml()] {
            for line in crd.lines() {
                if let Some(format) = line.trim().strip_prefix("format: ") {
                    assert!(known.contains(&format), "format {format} in the CRDs");
                }
            }
        }
    }

    #[test]
    fn committed_policy_crd_matches_the_rust_types() {
        let committed = include_str!("../crds/amicopy.dev_amicopypolicies.yaml");
        assert!(
            committed == policy_crd_yaml(),
            "crds/amicopy.dev_amicopypolicies.yaml is stale: run `cargo run -- crd --kind AmiCopyPolicy > crds/amicopy.dev_amicopypolicies.yaml`"
        );
    }

    #[test]
    fn committed_crd_matches_the_rust_types() {
        let committed = include_str!("../crds/amicopy.dev_amicopies.yaml");
        assert!(
            committed == crd_yaml(),
            "crds/amicopy.dev_amicopies.yaml is stale: run `cargo run -- crd > crds/amicopy.dev_amicopies.yaml`"
        );
    }

    fn object(spec: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": "amicopy.dev/v1alpha1", "kind": "AmiCopy", "metadata": {"name": "x", "namespace": "y"}, "spec": spec})
    }

    fn cel_errors(spec: serde_json::Value) -> Vec<String> {
        let schema = serde_json::to_value(
            AmiCopy::crd().spec.versions[0]
                .schema
                .clone()
                .unwrap()
                .open_api_v3_schema
                .unwrap(),
        )
        .unwrap();
        match kube::core::cel::Validator::new().validate(&schema, &object(spec), None) {
            Ok(()) => Vec::new(),
            Err(errs) => errs.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    fn base() -> serde_json::Value {
        json!({"source": {"region": "us-east-1", "imageId": "ami-0123456789abcdef0"}, "destinations": [{"region": "eu-west-1"}]})
    }

    #[test]
    fn cel_rules_accept_valid_specs() {
        let mut full = base();
        full["destinations"] = json!([
            {"region": "eu-west-1"},
            {"region": "ap-southeast-2", "encrypted": true, "kmsKeyId": "arn:aws:kms:ap-southeast-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"},
            {"region": "us-gov-west-1", "encrypted": true, "kmsKeyId": "alias/images"},
        ]);
        full["name"] = json!("golden [base] (v1) it's/ok@x_y.z");
        full["tags"] = json!({"team": "platform"});
        for spec in [
            base(),
            full,
            json!({"source": {"region": "us-east-1", "imageId": "ami-12345678"}, "destinations": [{"region": "eu-west-1"}], "encrypted": true, "destinations": [{"region": "eu-west-1", "kmsKeyId": "alias/k"}]}),
        ] {
            assert_eq!(cel_errors(spec.clone()), Vec::<String>::new(), "{spec}");
        }
    }

    #[test]
    fn cel_rules_refuse_bad_specs_with_a_readable_message() {
        let cases = [
            (
                json!({"source": {"region": "us-east-1", "imageId": "ami-123"}}),
                "8 or 17",
            ),
            (
                json!({"source": {"region": "US-EAST-1", "imageId": "ami-0123456789abcdef0"}}),
                "AWS region",
            ),
            (
                json!({"destinations": [{"region": "eu-west-1"}, {"region": "eu-west-1"}]}),
                "only once",
            ),
            (
                json!({"destinations": [{"region": "eu-west-1", "kmsKeyId": "alias/k"}]}),
                "needs encryption",
            ),
            (
                json!({"destinations": [{"region": "eu-west-1", "encrypted": false, "kmsKeyId": "alias/k"}]}),
                "needs encryption",
            ),
            (
                json!({"destinations": [{"region": "eu-west-1", "encrypted": true, "kmsKeyId": "arn:aws:kms:us-east-1:111122223333:key/abc"}]}),
                "another region",
            ),
            (
                json!({"destinations": [{"region": "eu-west-1", "encrypted": true, "kmsKeyId": "not a key"}]}),
                "KMS key ID",
            ),
            (json!({"tags": {"aws:cost": "x"}}), "aws:"),
            (json!({"tags": {"amicopy.dev/uid": "x"}}), "amicopy.dev/"),
            (json!({"name": "bad*name"}), "name may contain"),
        ];
        for (patch, want) in cases {
            let mut spec = base();
            for (k, v) in patch.as_object().unwrap() {
                spec[k] = v.clone();
            }
            let errs = cel_errors(spec.clone());
            assert!(
                errs.iter().any(|e| e.contains(want)),
                "{spec}: wanted {want:?} in {errs:?}"
            );
        }
    }
}
