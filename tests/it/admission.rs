//! Invalid manifests are refused by the real kube-apiserver, with a message
//! that says what to fix (OpenAPI schema and CEL rules from the Rust types).

use ami_copy_operator::AmiCopy;
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::json;

use crate::testbed;

fn manifest(name: &str, spec: serde_json::Value) -> DynamicObject {
    serde_json::from_value(json!({"apiVersion": "amicopy.dev/v1alpha1", "kind": "AmiCopy", "metadata": {"name": name}, "spec": spec}))
        .expect("a well-formed object")
}

fn valid() -> serde_json::Value {
    json!({"source": {"region": "us-east-1", "imageId": "ami-0123456789abcdef0"}, "destinations": [{"region": "eu-west-1"}]})
}

#[tokio::test]
async fn invalid_manifests_are_refused_with_a_readable_message() {
    let kube = testbed::kube().await;
    let ns = testbed::namespace(&kube, "admission").await;
    let api: Api<DynamicObject> = Api::namespaced_with(
        kube.clone(),
        &ns,
        &kube::api::ApiResource::erase::<AmiCopy>(&()),
    );
    let cases = [
        (
            json!({"source": {"region": "us-east-1", "imageId": "ami-xyz"}}),
            "imageId must be ami- followed by 8 or 17",
        ),
        (
            json!({"source": {"region": "useast1", "imageId": "ami-0123456789abcdef0"}}),
            "region must look like an AWS region",
        ),
        (json!({"destinations": []}), "should have at least 1 items"),
        (
            json!({"destinations": [{"region": "eu-west-1"}, {"region": "eu-west-1"}]}),
            "destinations must name each region only once",
        ),
        (
            json!({"destinations": [{"region": "eu-west-1", "kmsKeyId": "alias/images"}]}),
            "kmsKeyId needs encryption",
        ),
        (
            json!({"destinations": [{"region": "eu-west-1", "encrypted": true, "kmsKeyId": "arn:aws:kms:us-east-1:111122223333:key/abc"}]}),
            "KMS keys are regional",
        ),
        (
            json!({"tags": {"aws:createdBy": "me"}}),
            "tag keys may not start with 'aws:'",
        ),
        (
            json!({"deletionPolicy": "Keep"}),
            "supported values: \"Delete\", \"Retain\"",
        ),
        (json!({"name": "no*stars"}), "name may contain only"),
        (
            json!({"description": "d".repeat(256)}),
            "may not be more than 255",
        ),
        (json!({"source": null}), "spec.source: Required value"),
    ];
    for (i, (patch, want)) in cases.into_iter().enumerate() {
        let mut spec = valid();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                spec.as_object_mut().unwrap().remove(k);
            } else {
                spec[k] = v.clone();
            }
        }
        let err = api
            .create(
                &PostParams::default(),
                &manifest(&format!("bad-{i}"), spec.clone()),
            )
            .await
            .expect_err(&format!("{spec} must be refused"));
        let msg = err.to_string();
        assert!(msg.contains(want), "{spec}: wanted {want:?} in {msg}");
    }
    let ok = api
        .create(&PostParams::default(), &manifest("good", valid()))
        .await;
    assert!(ok.is_ok(), "a valid manifest is accepted: {ok:?}");
}

/// Every manifest under `examples/` is accepted by the real API server
/// (server-side dry run), so the documentation cannot drift from the CRD.
#[tokio::test]
async fn every_example_is_accepted() {
    let kube = testbed::kube().await;
    let ns = testbed::namespace(&kube, "examples").await;
    let api: Api<DynamicObject> = Api::namespaced_with(
        kube.clone(),
        &ns,
        &kube::api::ApiResource::erase::<AmiCopy>(&()),
    );
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).expect("examples/") {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let obj: DynamicObject = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let res = api
            .create(
                &PostParams {
                    dry_run: true,
                    ..Default::default()
                },
                &obj,
            )
            .await;
        assert!(res.is_ok(), "{} refused: {res:?}", path.display());
        seen += 1;
    }
    assert!(seen >= 5, "only {seen} examples found");
}

/// Server-side apply merges `spec.destinations` by region: two field
/// managers (a GitOps tool and a person, say) each apply their own
/// destination, and neither removes the other's, also when one applies
/// again.
#[tokio::test]
async fn two_field_managers_keep_each_others_destinations() {
    use kube::api::{Patch, PatchParams};
    let kube = testbed::kube().await;
    let ns = testbed::namespace(&kube, "ssa").await;
    let api: Api<DynamicObject> = Api::namespaced_with(
        kube.clone(),
        &ns,
        &kube::api::ApiResource::erase::<AmiCopy>(&()),
    );
    let apply = |manager: &'static str, spec: serde_json::Value| {
        let api = api.clone();
        async move {
            api.patch(
                "shared",
                &PatchParams::apply(manager),
                &Patch::Apply(&manifest("shared", spec)),
            )
            .await
            .unwrap_or_else(|e| panic!("{manager}: {e}"))
        }
    };
    let gitops = json!({"source": {"region": "us-east-1", "imageId": "ami-0123456789abcdef0"},
                        "destinations": [{"region": "eu-west-1"}]});
    apply("gitops", gitops.clone()).await;
    apply(
        "person",
        json!({"destinations": [{"region": "us-west-2", "encrypted": true}]}),
    )
    .await;
    let obj = apply("gitops", gitops).await;
    let regions: Vec<&str> = obj.data["spec"]["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["region"].as_str().unwrap())
        .collect();
    assert_eq!(regions, ["eu-west-1", "us-west-2"]);
    assert_eq!(obj.data["spec"]["destinations"][1]["encrypted"], true);
}

/// Regions and ARNs of every AWS partition are accepted: China, GovCloud,
/// the ISO partitions and the European Sovereign Cloud.
#[tokio::test]
async fn every_partition_is_accepted() {
    let kube = testbed::kube().await;
    let ns = testbed::namespace(&kube, "partitions").await;
    let api: Api<DynamicObject> = Api::namespaced_with(
        kube.clone(),
        &ns,
        &kube::api::ApiResource::erase::<AmiCopy>(&()),
    );
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    for (partition, source, region) in [
        ("aws-cn", "cn-north-1", "cn-northwest-1"),
        ("aws-us-gov", "us-gov-west-1", "us-gov-east-1"),
        ("aws-iso", "us-iso-east-1", "us-iso-west-1"),
        ("aws-iso-b", "us-isob-east-1", "us-isob-east-1"),
        ("aws-iso-e", "eu-isoe-west-1", "eu-isoe-west-1"),
        ("aws-iso-f", "us-isof-south-1", "us-isof-east-1"),
        ("aws-eusc", "eusc-de-east-1", "eusc-de-east-1"),
    ] {
        let spec = json!({
            "source": {"region": source, "imageId": "ami-0123456789abcdef0"},
            "encrypted": true,
            "destinations": [{
                "region": region,
                "kmsKeyId": format!("arn:{partition}:kms:{region}:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"),
                "roleArn": format!("arn:{partition}:iam::444455556666:role/ami-copier"),
            }],
            "sharing": {"organizationArns": [format!("arn:{partition}:organizations::111122223333:organization/o-abcde12345")]},
        });
        let res = api.create(&dry, &manifest("partition", spec)).await;
        assert!(res.is_ok(), "{partition} refused: {res:?}");
    }
}
