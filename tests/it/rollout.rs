//! From copies to rollouts, against the EC2 simulator (and moto's SSM for
//! the published parameters): IDs published only once every destination is
//! available, protection of the current copies, older copies kept while a
//! launch template or an instance uses them, disabling instead of
//! deregistering, and pausing. Assertions read what the peers hold.

use std::collections::BTreeMap;
use std::time::Duration;

use ami_copy_operator::AmiCopy;
use aws_sdk_ec2::types::{ImageState, InstanceType, RequestLaunchTemplateData};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::ec2peer::{self, error_code};
use crate::operator::{Peer, create, events_for, patch_spec, target_of};
use crate::reliability::harness::until;
use crate::testbed::{self, Operator, condition, is_ready, wait_for, wait_gone};

const SOURCE_REGION: &str = "us-east-1";
const EU: &str = "eu-west-1";
const AP: &str = "ap-southeast-2";

/// A simulator whose copies stay pending until the test finishes them.
async fn held_copies() -> Peer {
    let mut config = ec2peer::sim_config();
    config.copy_duration = Duration::from_secs(3600);
    Peer::with_sim(config).await
}

struct Bed {
    kube: Client,
    ns: String,
    api: Api<AmiCopy>,
    op: Operator,
}

async fn bed(peer: &Peer, prefix: &str) -> Bed {
    let kube = testbed::kube().await;
    let ns = testbed::namespace(&kube, prefix).await;
    let op = Operator::start_with(&kube, &ns, peer.env.endpoint(), |c| {
        c.in_use_recheck_interval = Duration::from_millis(500);
    })
    .await;
    Bed {
        api: Api::namespaced(kube.clone(), &ns),
        kube,
        ns,
        op,
    }
}

async fn ssm(region: &str) -> aws_sdk_ssm::Client {
    let conf = aws_sdk_ssm::config::Builder::from(&testbed::sdk_config().await)
        .region(aws_sdk_ssm::config::Region::new(region.to_owned()))
        .endpoint_url(ec2peer::moto_endpoint())
        .build();
    aws_sdk_ssm::Client::from_conf(conf)
}

/// The value of an SSM parameter in moto; `None` when it does not exist.
async fn parameter(region: &str, name: &str) -> Option<String> {
    match ssm(region).await.get_parameter().name(name).send().await {
        Ok(out) => out.parameter()?.value().map(str::to_owned),
        Err(e) if error_code(&e).as_deref() == Some("ParameterNotFound") => None,
        Err(e) => panic!("GetParameter {name}: {e:?}"),
    }
}

async fn config_map(kube: &Client, ns: &str, name: &str) -> Option<ConfigMap> {
    Api::<ConfigMap>::namespaced(kube.clone(), ns)
        .get_opt(name)
        .await
        .expect("read the ConfigMap")
}

fn data(cm: &ConfigMap) -> BTreeMap<String, String> {
    cm.data.clone().unwrap_or_default()
}

/// Creates the object `golden`, copying a source seeded for it to `EU`, with
/// `extra` in its spec; waits until it is Ready and returns its copy.
async fn ready_copy(peer: &Peer, b: &Bed, seed: &str, extra: serde_json::Value) -> String {
    let source = peer.seed_source(seed).await;
    let mut spec = json!({"source": {"region": SOURCE_REGION, "imageId": source},
                          "destinations": [{"region": EU}]});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    create(&b.api, "golden", spec).await;
    let o = wait_for(&b.api, "golden", "ready", is_ready).await;
    target_of(&o, EU).expect("a copy in EU")
}

/// Moves the object `name` to a new source seeded for it; the source's ID.
async fn new_source(peer: &Peer, api: &Api<AmiCopy>, name: &str, seed: &str) -> String {
    let next = peer.seed_source(seed).await;
    patch_spec(
        api,
        name,
        json!({"source": {"region": SOURCE_REGION, "imageId": next}}),
    )
    .await;
    next
}

/// Launches one instance of `image`; its ID.
async fn run_instance(ec2: &aws_sdk_ec2::Client, image: &str) -> String {
    let run = ec2
        .run_instances()
        .image_id(image)
        .instance_type(InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .expect("RunInstances");
    run.instances()[0].instance_id().unwrap().to_owned()
}

fn available_in(o: &AmiCopy, region: &str, source: &str) -> bool {
    o.status.as_ref().is_some_and(|s| {
        s.destinations.iter().any(|d| {
            d.region == region
                && d.state.as_str() == "available"
                && d.source_image_id.as_deref() == Some(source)
        })
    })
}

/// The ConfigMap and the SSM parameters appear only once the last
/// destination's copy is available, move to a new source's copies only once
/// all of those are available (the old copies are retired after that), and
/// the parameters go with the object; the ConfigMap is owned by it.
#[tokio::test]
async fn sim_ids_are_published_only_when_every_destination_is_available() {
    let peer = held_copies().await;
    let b = bed(&peer, "publish").await;
    let control = peer.control();
    let source = peer.seed_source("published").await;
    let template = format!("/amicopy/{}/golden/{{region}}", b.ns);
    let in_region = |r: &str| template.replace("{region}", r);
    create(
        &b.api,
        "golden",
        json!({"source": {"region": SOURCE_REGION, "imageId": source},
               "destinations": [{"region": EU}],
               "publish": {"configMap": {"name": "golden-ids"},
                           "ssmParameter": {"name": template}}}),
    )
    .await;
    wait_for(&b.api, "golden", "the copy started", |o| {
        target_of(o, EU).is_some()
    })
    .await;
    assert!(config_map(&b.kube, &b.ns, "golden-ids").await.is_none());
    assert_eq!(parameter(EU, &in_region(EU)).await, None);

    control.finish_copies();
    let o = wait_for(&b.api, "golden", "published", |o| {
        o.status.as_ref().is_some_and(|s| s.published.is_some())
    })
    .await;
    let eu_copy = target_of(&o, EU).unwrap();
    let cm = config_map(&b.kube, &b.ns, "golden-ids")
        .await
        .expect("the ConfigMap");
    assert_eq!(
        data(&cm),
        BTreeMap::from([
            (EU.into(), eu_copy.clone()),
            ("source".into(), source.clone())
        ])
    );
    let owner = &cm.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("AmiCopy", o.uid().unwrap().as_str(), Some(true)),
        "owned by the AmiCopy, so that it goes with it"
    );
    assert_eq!(parameter(EU, &in_region(EU)).await, Some(eu_copy.clone()));

    // A second destination: while its copy is pending, nothing moves.
    patch_spec(
        &b.api,
        "golden",
        json!({"destinations": [{"region": EU}, {"region": AP}]}),
    )
    .await;
    wait_for(&b.api, "golden", "the second copy started", |o| {
        target_of(o, AP).is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cm = config_map(&b.kube, &b.ns, "golden-ids").await.unwrap();
    assert!(
        !data(&cm).contains_key(AP),
        "half a rollout: {:?}",
        data(&cm)
    );
    assert_eq!(parameter(AP, &in_region(AP)).await, None);

    control.finish_copies();
    let o = wait_for(&b.api, "golden", "both published", |o| {
        o.status
            .as_ref()
            .and_then(|s| s.published.as_ref())
            .is_some_and(|p| p.images.len() == 2)
    })
    .await;
    let ap_copy = target_of(&o, AP).unwrap();
    assert_eq!(parameter(AP, &in_region(AP)).await, Some(ap_copy.clone()));
    assert_eq!(
        data(&config_map(&b.kube, &b.ns, "golden-ids").await.unwrap()).get(AP),
        Some(&ap_copy)
    );

    // A new source: the consumers keep the old IDs until every new copy is
    // available, and the old copies stay until then.
    let next = new_source(&peer, &b.api, "golden", "published-next").await;
    wait_for(&b.api, "golden", "the new copies started", |o| {
        o.status.as_ref().is_some_and(|s| {
            s.destinations.iter().all(|d| {
                d.source_image_id.as_deref() == Some(next.as_str()) && d.image_id.is_some()
            })
        })
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(parameter(EU, &in_region(EU)).await, Some(eu_copy.clone()));
    assert_eq!(
        data(&config_map(&b.kube, &b.ns, "golden-ids").await.unwrap()).get("source"),
        Some(&source)
    );
    let old = ec2peer::describe_image(&peer.ec2(EU), &eu_copy).await;
    assert_eq!(
        old.and_then(|i| i.state().cloned()),
        Some(ImageState::Available),
        "the old copy stays until the new ones are published"
    );

    control.finish_copies();
    let o = wait_for(
        &b.api,
        "golden",
        "the new copies published, the old retired",
        |o| {
            o.status.as_ref().is_some_and(|s| {
                s.published
                    .as_ref()
                    .is_some_and(|p| p.source_image_id == next)
                    && s.retiring.is_empty()
            })
        },
    )
    .await;
    let new_eu = target_of(&o, EU).unwrap();
    assert_eq!(parameter(EU, &in_region(EU)).await, Some(new_eu));
    assert!(
        ec2peer::describe_image(&peer.ec2(EU), &eu_copy)
            .await
            .is_none(),
        "the old copy is deregistered after the publication"
    );

    testbed::delete(&b.api, "golden").await;
    wait_gone(&b.api, "golden").await;
    assert_eq!(parameter(EU, &in_region(EU)).await, None);
    assert_eq!(parameter(AP, &in_region(AP)).await, None);
    b.op.stop().await;
}

/// A parameter outside `/amicopy/<namespace>/` is refused at once, and a
/// parameter holding an AMI this object did not make is never overwritten.
#[tokio::test]
async fn sim_publishing_never_reaches_beyond_the_namespace_or_overwrites() {
    let peer = Peer::sim().await;
    let b = bed(&peer, "publish-denied").await;
    let source = peer.seed_source("denied").await;
    create(
        &b.api,
        "elsewhere",
        json!({"source": {"region": SOURCE_REGION, "imageId": source},
               "destinations": [{"region": EU}],
               "publish": {"ssmParameter": {"name": "/amicopy/other-team/golden"}}}),
    )
    .await;
    let o = wait_for(&b.api, "elsewhere", "PublishDenied", |o| {
        condition(o, "Degraded").is_some_and(|(s, r)| s == "True" && r == "PublishDenied")
    })
    .await;
    assert!(o.status.unwrap().published.is_none());
    assert_eq!(parameter(EU, "/amicopy/other-team/golden").await, None);

    let taken = format!("/amicopy/{}/taken", b.ns);
    ssm(EU)
        .await
        .put_parameter()
        .name(&taken)
        .value("ami-0aaaaaaaaaaaaaaaa")
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .send()
        .await
        .expect("PutParameter");
    let other = peer.seed_source("taken").await;
    create(
        &b.api,
        "taken",
        json!({"source": {"region": SOURCE_REGION, "imageId": other},
               "destinations": [{"region": EU}],
               "publish": {"ssmParameter": {"name": taken}}}),
    )
    .await;
    wait_for(&b.api, "taken", "PublishConflict", |o| {
        condition(o, "Degraded").is_some_and(|(s, r)| s == "True" && r == "PublishConflict")
    })
    .await;
    assert_eq!(
        parameter(EU, &taken).await.as_deref(),
        Some("ami-0aaaaaaaaaaaaaaaa")
    );
    testbed::delete(&b.api, "taken").await;
    wait_gone(&b.api, "taken").await;
    assert_eq!(
        parameter(EU, &taken).await.as_deref(),
        Some("ami-0aaaaaaaaaaaaaaaa"),
        "not withdrawn either: it holds what someone else wrote"
    );
    b.op.stop().await;
}

/// `protect: true`: a DeregisterImage by someone else is refused, and the
/// operator still retires the copy when a new source replaces it.
#[tokio::test]
async fn sim_a_protected_copy_survives_others_and_is_retired_in_time() {
    let peer = Peer::sim().await;
    let b = bed(&peer, "protect").await;
    let source = peer.seed_source("protected").await;
    create(
        &b.api,
        "golden",
        json!({"source": {"region": SOURCE_REGION, "imageId": source},
               "destinations": [{"region": EU}], "protect": true}),
    )
    .await;
    let o = wait_for(&b.api, "golden", "ready and protected", |o| {
        is_ready(o)
            && o.status.as_ref().is_some_and(|s| {
                s.destinations[0].deregistration_protection.as_deref()
                    == Some("enabled-without-cooldown")
            })
    })
    .await;
    let copy = target_of(&o, EU).unwrap();
    let refused = peer
        .ec2(EU)
        .deregister_image()
        .image_id(&copy)
        .send()
        .await
        .expect_err("a protected image is not deregistered");
    assert_eq!(
        error_code(&refused).as_deref(),
        Some("OperationNotPermitted")
    );
    let image = ec2peer::describe_image(&peer.ec2(EU), &copy)
        .await
        .expect("still there");
    assert_eq!(image.state(), Some(&ImageState::Available));

    let next = new_source(&peer, &b.api, "golden", "protected-next").await;
    let o = wait_for(&b.api, "golden", "the old copy retired", |o| {
        is_ready(o)
            && available_in(o, EU, &next)
            && o.status.as_ref().is_some_and(|s| s.retiring.is_empty())
    })
    .await;
    assert!(
        ec2peer::describe_image(&peer.ec2(EU), &copy)
            .await
            .is_none()
    );
    let new = target_of(&o, EU).unwrap();
    until("the new copy protected", || async {
        ec2peer::describe_image(&peer.ec2(EU), &new)
            .await
            .and_then(|i| i.deregistration_protection().map(str::to_owned))
            .as_deref()
            == Some("enabled-without-cooldown")
    })
    .await;
    // The finalizer lifts it too.
    testbed::delete(&b.api, "golden").await;
    wait_gone(&b.api, "golden").await;
    assert!(ec2peer::describe_image(&peer.ec2(EU), &new).await.is_none());
    b.op.stop().await;
}

/// An older copy that a launch template's default version and an instance
/// use is kept, listed with its users, announced by a RetirementBlocked
/// Event, and retired once the template moves on and the instance is gone.
#[tokio::test]
async fn sim_a_copy_in_use_is_kept_reported_and_retired_once_unused() {
    let peer = Peer::sim().await;
    let b = bed(&peer, "in-use").await;
    let ec2 = peer.ec2(EU);
    let old = ready_copy(&peer, &b, "in-use", json!({})).await;
    let template = ec2
        .create_launch_template()
        .launch_template_name(ec2peer::unique("golden"))
        .launch_template_data(RequestLaunchTemplateData::builder().image_id(&old).build())
        .send()
        .await
        .expect("CreateLaunchTemplate");
    let template_id = template
        .launch_template()
        .and_then(|t| t.launch_template_id())
        .unwrap()
        .to_owned();
    let instance = run_instance(&ec2, &old).await;

    new_source(&peer, &b.api, "golden", "in-use-next").await;
    let o = wait_for(&b.api, "golden", "the old copy kept in use", |o| {
        is_ready(o)
            && o.status.as_ref().is_some_and(|s| {
                s.retiring
                    .iter()
                    .any(|r| r.image_id.as_deref() == Some(old.as_str()) && r.used_by.len() == 2)
            })
    })
    .await;
    let entry = &o.status.as_ref().unwrap().retiring[0];
    assert_eq!(
        entry.used_by,
        vec![
            format!("instance {instance} (running)"),
            format!("launch template {template_id} ($Default)"),
        ]
    );
    assert_eq!(entry.reason.as_deref(), Some("RetirementBlocked"));
    let new = target_of(&o, EU).unwrap();
    until("a RetirementBlocked Event", || async {
        events_for(&b.kube, &b.ns, "golden")
            .await
            .iter()
            .any(|(r, _)| r == "RetirementBlocked")
    })
    .await;
    assert!(ec2peer::describe_image(&ec2, &old).await.is_some());

    // The template moves to the new copy; the instance still runs.
    ec2.create_launch_template_version()
        .launch_template_id(&template_id)
        .launch_template_data(RequestLaunchTemplateData::builder().image_id(&new).build())
        .send()
        .await
        .expect("CreateLaunchTemplateVersion");
    ec2.modify_launch_template()
        .launch_template_id(&template_id)
        .default_version("2")
        .send()
        .await
        .expect("ModifyLaunchTemplate");
    wait_for(&b.api, "golden", "only the instance uses it", |o| {
        o.status
            .as_ref()
            .is_some_and(|s| s.retiring.first().is_some_and(|r| r.used_by.len() == 1))
    })
    .await;
    assert!(ec2peer::describe_image(&ec2, &old).await.is_some());

    ec2.terminate_instances()
        .instance_ids(&instance)
        .send()
        .await
        .expect("TerminateInstances");
    wait_for(&b.api, "golden", "the old copy retired", |o| {
        o.status.as_ref().is_some_and(|s| s.retiring.is_empty())
    })
    .await;
    assert!(ec2peer::describe_image(&ec2, &old).await.is_none());
    b.op.stop().await;
}

/// `retirement.action: Disable`: the old copy is disabled, keeps its
/// snapshots, and EC2 can enable it again.
#[tokio::test]
async fn sim_disable_leaves_images_that_can_be_enabled_again() {
    let peer = Peer::sim().await;
    let b = bed(&peer, "disable").await;
    let ec2 = peer.ec2(EU);
    let old = ready_copy(
        &peer,
        &b,
        "disable",
        json!({"retirement": {"action": "Disable"}}),
    )
    .await;
    let next = new_source(&peer, &b.api, "golden", "disable-next").await;
    wait_for(&b.api, "golden", "the old copy retired", |o| {
        is_ready(o)
            && available_in(o, EU, &next)
            && o.status.as_ref().is_some_and(|s| s.retiring.is_empty())
    })
    .await;
    let disabled = ec2
        .describe_images()
        .image_ids(&old)
        .include_disabled(true)
        .send()
        .await
        .expect("DescribeImages");
    let image = &disabled.images()[0];
    assert_eq!(image.state(), Some(&ImageState::Disabled));
    for snap in image
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs()?.snapshot_id())
    {
        assert!(peer.control().snapshot(snap).is_some(), "{snap} is kept");
    }
    b.op.stop().await;
    ec2.enable_image()
        .image_id(&old)
        .send()
        .await
        .expect("EnableImage");
    let image = ec2peer::describe_image(&ec2, &old)
        .await
        .expect("listed again");
    assert_eq!(image.state(), Some(&ImageState::Available));
}

/// `amicopy.dev/paused: "true"`: not one EC2 call for the object while a
/// new source waits, nor for its deletion; removing the annotation resumes
/// both.
#[tokio::test]
async fn sim_a_paused_object_makes_no_ec2_call_and_resumes() {
    let peer = Peer::sim().await;
    let b = bed(&peer, "paused").await;
    let control = peer.control();
    let source = peer.seed_source("paused").await;
    create(
        &b.api,
        "golden",
        json!({"source": {"region": SOURCE_REGION, "imageId": source},
               "destinations": [{"region": EU}]}),
    )
    .await;
    wait_for(&b.api, "golden", "ready", is_ready).await;
    let pause = |on: bool| {
        let value = on.then_some("true");
        json!({"metadata": {"annotations": {"amicopy.dev/paused": value}}})
    };
    let annotate = |on: bool| {
        let api = b.api.clone();
        let patch = pause(on);
        async move {
            api.patch("golden", &PatchParams::default(), &Patch::Merge(patch))
                .await
                .expect("annotate");
        }
    };
    annotate(true).await;
    wait_for(&b.api, "golden", "Paused", |o| {
        condition(o, "Paused").is_some_and(|(s, _)| s == "True")
    })
    .await;
    let next = peer.seed_source("paused-next").await;
    let calls = || control.calls().iter().map(|c| c.count).sum::<u64>();
    let before = calls();
    patch_spec(
        &b.api,
        "golden",
        json!({"source": {"region": SOURCE_REGION, "imageId": next}}),
    )
    .await;
    // Longer than the test operator's resync (3 s) and poll intervals.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        calls(),
        before,
        "no EC2 call while paused: {:?}",
        control.calls()
    );
    let o = b.api.get("golden").await.unwrap();
    assert!(!available_in(&o, EU, &next));

    annotate(false).await;
    let o = wait_for(&b.api, "golden", "resumed: the new source copied", |o| {
        is_ready(o) && available_in(o, EU, &next) && condition(o, "Paused").is_none()
    })
    .await;
    let copy = target_of(&o, EU).unwrap();

    // A paused deletion waits, without EC2 calls, until resumed.
    annotate(true).await;
    wait_for(&b.api, "golden", "Paused", |o| {
        condition(o, "Paused").is_some_and(|(s, _)| s == "True")
    })
    .await;
    let before = calls();
    testbed::delete(&b.api, "golden").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        b.api.get_opt("golden").await.unwrap().is_some(),
        "the finalizer waits"
    );
    assert_eq!(calls(), before, "no EC2 call for a paused deletion");
    assert!(
        ec2peer::describe_image(&peer.ec2(EU), &copy)
            .await
            .is_some()
    );
    annotate(false).await;
    wait_gone(&b.api, "golden").await;
    assert!(
        ec2peer::describe_image(&peer.ec2(EU), &copy)
            .await
            .is_none()
    );
    b.op.stop().await;
}

/// `lastLaunchedWithin`: an older copy launched within the window is kept
/// (EC2's lastLaunchedTime, which the simulator sets at RunInstances), even
/// once the instance is gone; without the window it is retired.
#[tokio::test]
async fn sim_a_copy_launched_lately_is_kept_within_the_window() {
    let peer = Peer::sim().await;
    let b = bed(&peer, "launched").await;
    let ec2 = peer.ec2(EU);
    let old = ready_copy(
        &peer,
        &b,
        "launched",
        json!({"retirement": {"lastLaunchedWithin": "1h"}}),
    )
    .await;
    let instance = run_instance(&ec2, &old).await;
    ec2.terminate_instances()
        .instance_ids(&instance)
        .send()
        .await
        .expect("TerminateInstances");
    new_source(&peer, &b.api, "golden", "launched-next").await;
    let o = wait_for(&b.api, "golden", "kept: launched within the hour", |o| {
        o.status.as_ref().is_some_and(|s| {
            s.retiring
                .iter()
                .any(|r| r.used_by.iter().any(|u| u.starts_with("launched at ")))
        })
    })
    .await;
    assert_eq!(
        o.status.unwrap().retiring[0].used_by.len(),
        1,
        "no instance runs"
    );
    assert!(ec2peer::describe_image(&ec2, &old).await.is_some());

    patch_spec(
        &b.api,
        "golden",
        json!({"retirement": {"lastLaunchedWithin": null}}),
    )
    .await;
    wait_for(&b.api, "golden", "retired without the window", |o| {
        o.status.as_ref().is_some_and(|s| s.retiring.is_empty())
    })
    .await;
    assert!(ec2peer::describe_image(&ec2, &old).await.is_none());
    b.op.stop().await;
}
