//! Property 5: bad input. Malformed or hostile manifests are refused at
//! admission with a message naming what to fix (these cases add to the ones
//! in admission.rs), or accepted and reported by a Degraded condition; none
//! crashes the operator, makes it loop, or leaves anything in the peer.

use std::time::Duration;

use ami_copy_operator::AmiCopy;
use ec2_sim::{Permission, SeedImage};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams, ValidationDirective};
use serde_json::{Value, json};

use super::harness::{self, Launch, condition_of, is_degraded, leaks};
use crate::testbed::{self, is_ready, wait_for, wait_gone};

fn valid() -> Value {
    json!({"source": {"region": "us-east-1", "imageId": "ami-0123456789abcdef0"},
           "destinations": [{"region": "eu-west-1"}]})
}

fn with(field: &str, value: Value) -> Value {
    let mut spec = valid();
    if value.is_null() {
        spec.as_object_mut().unwrap().remove(field);
    } else {
        spec[field] = value;
    }
    spec
}

fn many_tags(n: usize) -> Value {
    (0..n)
        .map(|i| (format!("k{i}"), json!("v")))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// `n` distinct destinations in regions that look real but do not exist.
fn regions(n: usize) -> Value {
    (0..n)
        .map(|i| json!({"region": format!("{}-nowhere-{}", ["zz", "zy"][i / 99], i % 99 + 1)}))
        .collect()
}

/// (case, spec or None for no spec at all, metadata.name, what the refusal must say)
fn refusals() -> Vec<(&'static str, Option<Value>, String, &'static str)> {
    let src = |image: Value, region: Value| json!({"region": region, "imageId": image});
    let dest = |d: Value| json!([d]);
    let name = |n: &str| n.to_owned();
    vec![
        ("no spec", None, name("r-no-spec"), "spec: Required value"),
        (
            "no destinations",
            Some(with("destinations", Value::Null)),
            name("r-no-dest"),
            "spec.destinations: Required value",
        ),
        (
            "destinations a string",
            Some(with("destinations", json!("eu-west-1"))),
            name("r-dest-string"),
            "must be of type array",
        ),
        (
            "destination a string",
            Some(with("destinations", json!(["eu-west-1"]))),
            name("r-dest-item-string"),
            "must be of type object",
        ),
        (
            "destination null",
            Some(with("destinations", json!([null]))),
            name("r-dest-null"),
            "must be of type object",
        ),
        (
            "encrypted a string",
            Some(with("encrypted", json!("yes"))),
            name("r-enc-string"),
            "must be of type boolean",
        ),
        (
            "copyImageTags a string",
            Some(with("copyImageTags", json!("true"))),
            name("r-cit-string"),
            "must be of type boolean",
        ),
        (
            "imageId a number",
            Some(with("source", src(json!(123), json!("us-east-1")))),
            name("r-image-number"),
            "must be of type string",
        ),
        (
            "tags a list",
            Some(with("tags", json!(["a", "b"]))),
            name("r-tags-list"),
            "must be of type object",
        ),
        (
            "tag value a number",
            Some(with("tags", json!({"team": 7}))),
            name("r-tag-number"),
            "must be of type string",
        ),
        (
            "101 destinations",
            Some(with("destinations", regions(101))),
            name("r-101-dest"),
            "must have at most 100 items",
        ),
        (
            "amicopy.dev/ tag key",
            Some(with("tags", json!({"amicopy.dev/uid": "steal"}))),
            name("r-reserved-tag"),
            "reserved by the operator",
        ),
        (
            "aws: tag key, other case",
            Some(with("tags", json!({"aws:Created": "x"}))),
            name("r-aws-tag"),
            "reserved by AWS",
        ),
        (
            "41 tags",
            Some(with("tags", many_tags(41))),
            name("r-41-tags"),
            "must have at most 40 items",
        ),
        (
            "tag key of 129",
            Some(with("tags", json!({"k".repeat(129): "v"}))),
            name("r-long-key"),
            "tag keys must be 1 to 128 characters",
        ),
        (
            "tag value of 257",
            Some(with("tags", json!({"k": "v".repeat(257)}))),
            name("r-long-value"),
            "values at most 256",
        ),
        (
            "empty tag key",
            Some(with("tags", json!({"": "v"}))),
            name("r-empty-key"),
            "tag keys must be 1 to 128 characters",
        ),
        (
            "name of 107",
            Some(with("name", json!("n".repeat(107)))),
            name("r-long-name"),
            "may not be more than 106",
        ),
        (
            "name of 2",
            Some(with("name", json!("ab"))),
            name("r-short-name"),
            "should be at least 3",
        ),
        (
            "name with a zero-width space",
            Some(with("name", json!("golden\u{200b}base"))),
            name("r-zwsp-name"),
            "name may contain only",
        ),
        (
            "name with an accent",
            Some(with("name", json!("gölden"))),
            name("r-accent-name"),
            "name may contain only",
        ),
        (
            "imageId with a Cyrillic a",
            Some(with(
                "source",
                src(json!("\u{430}mi-0123456789abcdef0"), json!("us-east-1")),
            )),
            name("r-cyrillic"),
            "imageId must be ami- followed by 8 or 17",
        ),
        (
            "imageId upper-case hex",
            Some(with(
                "source",
                src(json!("ami-0123456789ABCDEF0"), json!("us-east-1")),
            )),
            name("r-upper-hex"),
            "imageId must be ami- followed by 8 or 17",
        ),
        (
            "imageId of 9 digits",
            Some(with(
                "source",
                src(json!("ami-012345678"), json!("us-east-1")),
            )),
            name("r-9-digits"),
            "imageId must be ami- followed by 8 or 17",
        ),
        (
            "source region with a trailing space",
            Some(with(
                "source",
                src(json!("ami-0123456789abcdef0"), json!("us-east-1 ")),
            )),
            name("r-space-region"),
            "region must look like an AWS region",
        ),
        (
            "destination region upper case",
            Some(with("destinations", dest(json!({"region": "EU-WEST-1"})))),
            name("r-upper-region"),
            "region must look like an AWS region",
        ),
        (
            "destination region with a newline",
            Some(with("destinations", dest(json!({"region": "eu-west-1\n"})))),
            name("r-newline-region"),
            "region must look like an AWS region",
        ),
        (
            "destination region of 40",
            Some(with(
                "destinations",
                dest(json!({"region": format!("eu-{}-1", "w".repeat(35))})),
            )),
            name("r-long-region"),
            "may not be more than 32",
        ),
        (
            "kmsKeyId garbage",
            Some(with(
                "destinations",
                dest(json!({"region": "eu-west-1", "encrypted": true, "kmsKeyId": "not a key"})),
            )),
            name("r-kms-garbage"),
            "kmsKeyId must be a KMS key ID",
        ),
        (
            "kmsKeyId empty",
            Some(with(
                "destinations",
                dest(json!({"region": "eu-west-1", "encrypted": true, "kmsKeyId": ""})),
            )),
            name("r-kms-empty"),
            "should be at least 1",
        ),
        (
            "KMS alias ARN of another region",
            Some(with(
                "destinations",
                dest(
                    json!({"region": "eu-west-1", "encrypted": true, "kmsKeyId": "arn:aws:kms:us-west-2:111122223333:alias/images"}),
                ),
            )),
            name("r-kms-alias-region"),
            "KMS keys are regional",
        ),
        (
            "deletionPolicy lower case",
            Some(with("deletionPolicy", json!("delete"))),
            name("r-policy-case"),
            "supported values: \"Delete\", \"Retain\"",
        ),
        (
            "metadata.name with upper case",
            Some(valid()),
            name("Golden_Base"),
            "a lowercase RFC 1123 subdomain",
        ),
        (
            "metadata.name of 254",
            Some(valid()),
            "n".repeat(254),
            "must be no more than 253",
        ),
    ]
}

#[tokio::test]
async fn hostile_manifests_are_refused_with_what_to_fix() {
    let kube = testbed::kube().await;
    let ns = testbed::namespace(&kube, "hostile").await;
    let api: Api<DynamicObject> = Api::namespaced_with(
        kube.clone(),
        &ns,
        &kube::api::ApiResource::erase::<AmiCopy>(&()),
    );
    let cases = refusals();
    assert!(cases.len() >= 25);
    for (case, spec, name, want) in &cases {
        let mut obj = json!({"apiVersion": "amicopy.dev/v1alpha1", "kind": "AmiCopy", "metadata": {"name": name}});
        if let Some(spec) = spec {
            obj["spec"] = spec.clone();
        }
        let obj: DynamicObject = serde_json::from_value(obj).unwrap();
        let err = api
            .create(&PostParams::default(), &obj)
            .await
            .expect_err(&format!("{case} must be refused"));
        let msg = err.to_string();
        assert!(msg.contains(want), "{case}: wanted {want:?} in {msg}");
    }

    // Unknown fields: server-side apply refuses them (the typed patch has
    // no place for them); create prunes them (structural schema), with a
    // warning.
    let mut spec = valid();
    spec["sourceRegion"] = json!("us-west-2");
    spec["destinations"][0]["encrypt"] = json!(true);
    let obj: DynamicObject = serde_json::from_value(json!({"apiVersion": "amicopy.dev/v1alpha1", "kind": "AmiCopy", "metadata": {"name": "unknown-fields"}, "spec": spec})).unwrap();
    let strict = PatchParams::apply("hostile").validation(ValidationDirective::Strict);
    let err = api
        .patch("unknown-fields", &strict, &Patch::Apply(&obj))
        .await
        .expect_err("server-side apply refuses unknown fields");
    assert!(
        err.to_string()
            .contains(".spec.sourceRegion: field not declared in schema"),
        "{err}"
    );
    let stored = api
        .create(&PostParams::default(), &obj)
        .await
        .expect("accepted without strict validation");
    assert!(
        stored.data["spec"].get("sourceRegion").is_none(),
        "pruned: {:?}",
        stored.data["spec"]
    );
    assert!(
        stored.data["spec"]["destinations"][0]
            .get("encrypt")
            .is_none()
    );
    eprintln!(
        "hostile manifests: {} refused with what to fix; unknown fields pruned or refused (strict)",
        cases.len()
    );
}

/// Accepted manifests that cannot work (or work in a surprising way):
/// (name, spec, what the status must show: a Degraded reason, or Ready).
#[tokio::test]
async fn accepted_bad_input_is_reported_quietly_and_leaves_nothing() {
    let kube = testbed::kube().await;
    let ns = testbed::namespace(&kube, "accepted-bad").await;
    let api: Api<AmiCopy> = Api::namespaced(kube, &ns);
    let mut config = crate::ec2peer::sim_config();
    config.seed = Some(50);
    config.copy_duration = Duration::from_millis(300);
    config.regions_without_paravirtual = vec!["eu-north-1".into()];
    let sim = ec2_sim::Simulator::start(config).await.unwrap();
    let launch = Launch::new(&ns, &sim.endpoint());
    let mut op = launch.spawn();

    let plain = harness::seed_source(&sim, "plain");
    let encrypted = sim.seed_image(SeedImage {
        encrypted: true,
        ..SeedImage::new("us-east-1", "encrypted")
    });
    let store = sim.seed_image(SeedImage {
        root_device_type: "instance-store".into(),
        ..SeedImage::new("us-east-1", "store")
    });
    let paravirtual = sim.seed_image(SeedImage {
        virtualization_type: "paravirtual".into(),
        ..SeedImage::new("us-east-1", "pv")
    });
    let market = sim.seed_image(SeedImage {
        owner: Some("210987654321".into()),
        billing_products: vec!["bp-0123456789abcdef0".into()],
        launch_permissions: vec![Permission::UserId(crate::ec2peer::ACCOUNT.into())],
        ..SeedImage::new("us-east-1", "market")
    });
    let failed_source = sim.seed_image(SeedImage {
        state: Some(ec2_sim::ImageState::Failed),
        ..SeedImage::new("us-east-1", "broken")
    });
    let on = |image: &str, dests: Value| json!({"source": {"region": "us-east-1", "imageId": image}, "destinations": dests});
    let one = |region: &str| json!([{"region": region}]);
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "missing-image",
            on("ami-0000000000000dead", one("eu-west-1")),
            "SourceNotFound",
        ),
        (
            "downgrade",
            on(
                &encrypted,
                json!([{"region": "eu-west-1", "encrypted": false}]),
            ),
            "EncryptionDowngradeNotSupported",
        ),
        (
            "instance-store-encrypted",
            on(&store, json!([{"region": "eu-west-1", "encrypted": true}])),
            "EncryptionNotSupportedForInstanceStore",
        ),
        (
            "paravirtual",
            on(&paravirtual, one("eu-north-1")),
            "ParavirtualNotSupported",
        ),
        (
            "marketplace",
            on(&market, one("eu-west-1")),
            "MarketplaceImageNotCopyable",
        ),
        (
            "failed-source",
            on(&failed_source, one("eu-west-1")),
            "SourceNotAvailable",
        ),
        (
            "unknown-source-region",
            json!({"source": {"region": "xx-fake-1", "imageId": plain}, "destinations": one("eu-west-1")}),
            "RegionUnavailable",
        ),
        (
            "unknown-destination-region",
            on(
                &plain,
                json!([{"region": "eu-west-1"}, {"region": "zz-nowhere-1"}]),
            ),
            "RegionUnavailable",
        ),
        (
            "a-hundred-unknown-regions",
            on(
                &plain,
                json!(
                    (0..100)
                        .map(|i| json!({"region": format!("zz-nowhere-{i}")}))
                        .collect::<Vec<_>>()
                ),
            ),
            "RegionUnavailable",
        ),
        ("same-region", on(&plain, one("us-east-1")), "Ready"),
        (
            "unicode-tags",
            json!({"source": {"region": "us-east-1", "imageId": plain}, "destinations": one("eu-central-1"), "tags": {"équipe": "平台 🚀"}, "description": "\u{202e}gnp.exe copy"}),
            "Ready",
        ),
    ];
    for (name, spec, _) in &cases {
        harness::create(&api, name, spec.clone()).await;
    }
    for (name, _, want) in &cases {
        let obj = wait_for(&api, name, want, |o| {
            if *want == "Ready" {
                is_ready(o)
            } else {
                is_degraded(o)
            }
        })
        .await;
        if *want != "Ready" {
            let (_, reason, message) = condition_of(&obj, "Degraded").unwrap();
            assert_eq!(&reason, want, "{name}: {message}");
            assert!(!message.is_empty(), "{name}: a message says what to do");
        }
    }
    op.assert_alive();

    // Settled: a fixed number of calls, not a loop. Each object may be
    // looked at a few more times (status writes, backoff of a failing
    // region), each time with a bounded number of calls per region.
    let before = harness::total_calls(&sim);
    let reconciles_before = op.metrics().await.reconciles();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let settle = harness::total_calls(&sim) - before;
    let reconciles = op.metrics().await.reconciles() - reconciles_before;
    eprintln!(
        "accepted bad input: {} objects settled; {settle} EC2 requests and {reconciles} reconciles in 5 s after settling",
        cases.len()
    );
    let destinations = cases.len() as u64;
    assert!(
        settle <= 3 * 2 * destinations,
        "{settle} requests in 5 s: a hot loop"
    );
    assert!(
        reconciles <= 4 * cases.len() as u64,
        "{reconciles} reconciles in 5 s: a hot loop"
    );

    for (name, _, _) in &cases {
        testbed::delete(&api, name).await;
    }
    for (name, _, _) in &cases {
        wait_gone(&api, name).await;
    }
    assert_eq!(leaks(&sim, &Default::default()), Vec::<String>::new());
    op.assert_alive();
    op.kill().await;
}
