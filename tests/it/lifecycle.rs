//! Beyond one copy, against the EC2 simulator (moto models neither
//! deprecation nor snapshot permissions on copies, nor time-based copies):
//! a source followed by selector, generations kept by `retain` and pins,
//! launch and snapshot sharing, deprecation, time-based copies, and tags kept
//! in step with the spec. Assertions read what the simulator holds.

use std::collections::BTreeMap;
use std::time::Duration;

use ami_copy_operator::AmiCopy;
use ec2_sim::{Permission, SeedImage};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::ec2peer::{self, PeerEnv};
use crate::operator::{Peer, create, patch_spec, snapshot_ids, tags, target_of};
use crate::reliability::harness::until;
use crate::testbed::{self, Operator, condition, is_ready, wait_for};

const SOURCE_REGION: &str = "us-east-1";
const ACCOUNT: &str = "111122223333";
const ORG: &str = "arn:aws:organizations::111122223333:organization/o-abcde12345";

async fn sim(copy: Duration) -> Peer {
    let mut config = ec2peer::sim_config();
    config.copy_duration = copy;
    Peer {
        env: PeerEnv::with_sim(config).await,
    }
}

async fn operator(peer: &Peer, prefix: &str) -> (Api<AmiCopy>, Operator) {
    let kube = testbed::kube().await;
    let ns = testbed::namespace(&kube, prefix).await;
    let op = Operator::start_with(&kube, &ns, peer.env.endpoint(), |c| {
        c.source_refresh_interval = Duration::from_secs(1);
    })
    .await;
    (Api::namespaced(kube, &ns), op)
}

/// Sharing with an account (launch and snapshots) and an organization,
/// deprecation 30 days after creation, and a 60-minute time-based copy; then
/// the account is removed from `sharing` and loses both permissions.
#[tokio::test]
async fn sim_sharing_deprecation_and_time_based_copies() {
    let peer = sim(Duration::from_millis(300)).await;
    let (api, op) = operator(&peer, "sharing").await;
    let source = peer.seed_source("shared").await;
    create(
        &api,
        "shared",
        json!({"source": {"region": SOURCE_REGION, "imageId": source},
               "destinations": [{"region": "eu-west-1"}],
               "sharing": {"accounts": [ACCOUNT], "organizationArns": [ORG], "snapshots": true},
               "deprecateAfter": "30d",
               "snapshotCopyCompletionDurationMinutes": 60}),
    )
    .await;
    let shared = wait_for(&api, "shared", "shared and deprecated", |o| {
        is_ready(o)
            && o.status.as_ref().is_some_and(|s| {
                let d = &s.destinations[0];
                d.shared_with.len() == 3 && d.deprecation_time.is_some()
            })
    })
    .await;
    let id = target_of(&shared, "eu-west-1").unwrap();
    let control = peer.control();
    let img = control.image(&id).unwrap();
    assert!(
        img.launch_permissions
            .contains(&Permission::UserId(ACCOUNT.into())),
        "{:?}",
        img.launch_permissions
    );
    assert!(
        img.launch_permissions
            .contains(&Permission::OrganizationArn(ORG.into()))
    );
    assert!(!img.is_public());
    let deprecation = img.deprecation_time.expect("deprecated");
    let days = (deprecation - img.creation_date).whole_days();
    assert!(
        (29..=30).contains(&days),
        "deprecated {days} days after creation"
    );
    for snap in img.snapshot_ids() {
        let snap = control.snapshot(snap).unwrap();
        assert!(
            snap.create_volume_permissions
                .contains(&Permission::UserId(ACCOUNT.into()))
        );
        assert_eq!(
            snap.completion_duration_minutes,
            Some(60),
            "time-based copy"
        );
    }

    patch_spec(
        &api,
        "shared",
        json!({"sharing": {"accounts": [], "organizationArns": [ORG], "snapshots": true}}),
    )
    .await;
    wait_for(&api, "shared", "the account's permission removed", |o| {
        o.status
            .as_ref()
            .is_some_and(|s| s.destinations[0].shared_with.len() == 1)
    })
    .await;
    let img = control.image(&id).unwrap();
    assert_eq!(
        img.launch_permissions,
        vec![Permission::OrganizationArn(ORG.into())]
    );
    for snap in img.snapshot_ids() {
        assert!(
            control
                .snapshot(snap)
                .unwrap()
                .create_volume_permissions
                .is_empty()
        );
    }
    op.stop().await;
}

/// `sharing.public` is refused without `--allow-public-images`; the other
/// permissions are still applied.
#[tokio::test]
async fn sim_public_sharing_is_refused_by_default() {
    let peer = sim(Duration::from_millis(300)).await;
    let (api, op) = operator(&peer, "public").await;
    let source = peer.seed_source("public").await;
    create(
        &api,
        "public",
        json!({"source": {"region": SOURCE_REGION, "imageId": source},
               "destinations": [{"region": "eu-west-1"}],
               "sharing": {"public": true, "accounts": [ACCOUNT]}}),
    )
    .await;
    let obj = wait_for(&api, "public", "Degraded PublicSharingNotAllowed", |o| {
        condition(o, "Degraded") == Some(("True".into(), "PublicSharingNotAllowed".into()))
            && o.status
                .as_ref()
                .is_some_and(|s| s.destinations[0].shared_with.len() == 1)
    })
    .await;
    let img = peer
        .control()
        .image(&target_of(&obj, "eu-west-1").unwrap())
        .unwrap();
    assert!(!img.is_public());
    assert_eq!(
        img.launch_permissions,
        vec![Permission::UserId(ACCOUNT.into())]
    );
    op.stop().await;
}

/// A selector follows the newest matching AMI: a newer build appears, is
/// copied, and the old copy is retired once the new one is available.
#[tokio::test]
async fn sim_selector_follows_the_newest_matching_image() {
    let peer = sim(Duration::from_millis(300)).await;
    let (api, op) = operator(&peer, "selector").await;
    let control = peer.control();
    let family = format!("golden-{}", api.namespace().unwrap_or_default());
    let seed = |name: String| SeedImage {
        tags: [("family".to_string(), family.clone())]
            .into_iter()
            .collect(),
        ..SeedImage::new(SOURCE_REGION, name)
    };
    let first = control.seed_image(seed(format!("{family}-2026.11.01")));
    control.advance(Duration::from_secs(3600));
    let _other_family =
        control.seed_image(SeedImage::new(SOURCE_REGION, format!("{family}-unrelated")));
    let obj = create(
        &api,
        "follow",
        json!({"source": {"region": SOURCE_REGION,
                          "selector": {"name": format!("{family}-2026*"), "tags": {"family": family}}},
               "destinations": [{"region": "eu-west-1"}]}),
    )
    .await;
    let uid = obj.uid().unwrap();
    let v1 = wait_for(&api, "follow", "the first build copied", |o| {
        is_ready(o)
            && o.status
                .as_ref()
                .is_some_and(|s| s.source_image_id.as_deref() == Some(first.as_str()))
    })
    .await;
    let resolved = v1
        .status
        .as_ref()
        .unwrap()
        .resolved_source
        .clone()
        .expect("resolvedSource");
    assert_eq!(resolved.image_id, first);
    let old_copy = target_of(&v1, "eu-west-1").unwrap();

    control.advance(Duration::from_secs(3600));
    let second = control.seed_image(seed(format!("{family}-2026.11.08")));
    let v2 = wait_for(
        &api,
        "follow",
        "the newer build copied, the old copy retired",
        |o| {
            is_ready(o)
                && o.status.as_ref().is_some_and(|s| {
                    s.source_image_id.as_deref() == Some(second.as_str()) && s.retiring.is_empty()
                })
        },
    )
    .await;
    assert_ne!(target_of(&v2, "eu-west-1").unwrap(), old_copy);
    assert_eq!(
        peer.owned_ids("eu-west-1", &uid).await,
        vec![target_of(&v2, "eu-west-1").unwrap()]
    );
    op.stop().await;
}

/// `retain: 2` keeps the previous generation; a pinned older source keeps its
/// copy too; everything older is retired.
#[tokio::test]
async fn sim_retain_and_pin_keep_older_generations() {
    let peer = sim(Duration::from_millis(300)).await;
    let (api, op) = operator(&peer, "retain").await;
    let mut sources = Vec::new();
    for i in 1..=4 {
        sources.push(peer.seed_source(&format!("gen{i}")).await);
    }
    let obj = create(
        &api,
        "gens",
        json!({"source": {"region": SOURCE_REGION, "imageId": sources[0]},
               "destinations": [{"region": "eu-west-1"}], "retain": 2}),
    )
    .await;
    let uid = obj.uid().unwrap();
    let mut copies = Vec::new();
    for (i, source) in sources.iter().enumerate() {
        if i > 0 {
            // Each copy is created later than the one before.
            peer.control().advance(Duration::from_secs(3600));
            patch_spec(
                &api,
                "gens",
                json!({"source": {"region": SOURCE_REGION, "imageId": source}}),
            )
            .await;
        }
        if i == 1 {
            // Pin the first generation.
            api.patch(
                "gens",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {"amicopy.dev/pinned-sources": sources[0]}}})),
            )
            .await
            .unwrap();
        }
        let ready = wait_for(&api, "gens", "the generation copied", |o| {
            is_ready(o)
                && o.status.as_ref().is_some_and(|s| {
                    s.source_image_id.as_deref() == Some(source.as_str()) && s.retiring.is_empty()
                })
        })
        .await;
        copies.push(target_of(&ready, "eu-west-1").unwrap());
    }
    let last = wait_for(&api, "gens", "two older generations kept", |o| {
        o.status.as_ref().is_some_and(|s| s.generations.len() == 2)
    })
    .await;
    let mut kept: Vec<String> = last
        .status
        .unwrap()
        .generations
        .iter()
        .filter_map(|g| g.image_id.clone())
        .collect();
    kept.sort();
    let mut want = vec![copies[0].clone(), copies[2].clone()];
    want.sort();
    assert_eq!(
        kept, want,
        "the pinned first and the previous (third) generation"
    );
    let mut owned = peer.owned_ids("eu-west-1", &uid).await;
    owned.sort();
    let mut expected = vec![copies[0].clone(), copies[2].clone(), copies[3].clone()];
    expected.sort();
    assert_eq!(owned, expected, "the second generation was retired");
    assert!(peer.control().image(&copies[1]).is_none());
    op.stop().await;
}

/// Tags follow `spec.tags` on images and snapshots: changed, added and
/// removed keys; a tag someone else put on the copy stays.
#[tokio::test]
async fn sim_tags_follow_the_spec_without_touching_foreign_tags() {
    tags_follow_the_spec_without_touching_foreign_tags(sim(Duration::from_millis(300)).await).await;
}

#[tokio::test]
async fn moto_tags_follow_the_spec_without_touching_foreign_tags() {
    tags_follow_the_spec_without_touching_foreign_tags(Peer::moto().await).await;
}

/// Tags changed, added and removed in the spec reach the copy and its
/// snapshots; a tag someone else put on the copy stays. Read through the
/// EC2 API, so the same assertions hold for moto and the simulator.
async fn tags_follow_the_spec_without_touching_foreign_tags(peer: Peer) {
    let (api, op) = operator(&peer, "tags").await;
    let source = peer.seed_source("tags").await;
    create(
        &api,
        "tagged",
        json!({"source": {"region": SOURCE_REGION, "imageId": source},
               "destinations": [{"region": "eu-west-1"}], "tags": {"team": "platform", "env": "prod"}}),
    )
    .await;
    let ready = wait_for(&api, "tagged", "Ready=True", is_ready).await;
    let id = target_of(&ready, "eu-west-1").unwrap();
    let ec2 = peer.ec2("eu-west-1");
    ec2.create_tags()
        .resources(&id)
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key("cost-center")
                .value("42")
                .build(),
        )
        .send()
        .await
        .unwrap();
    patch_spec(
        &api,
        "tagged",
        json!({"tags": {"team": "security", "env": null, "tier": "gold"}}),
    )
    .await;
    wait_for(&api, "tagged", "tag keys recorded", |o| {
        o.status
            .as_ref()
            .is_some_and(|s| s.tag_keys == ["team", "tier"])
    })
    .await;
    let in_step = |tags: &BTreeMap<String, String>| {
        tags.get("team").map(String::as_str) == Some("security")
            && tags.get("tier").map(String::as_str) == Some("gold")
            && !tags.contains_key("env")
    };
    until("the copy's tags in step with the spec", || async {
        let img = peer.image("eu-west-1", &id).await.expect("the copy");
        in_step(&tags(&img))
    })
    .await;
    let img = peer.image("eu-west-1", &id).await.expect("the copy");
    assert_eq!(
        tags(&img).get("cost-center").map(String::as_str),
        Some("42"),
        "a foreign tag stays"
    );
    for snap in snapshot_ids(&img) {
        let tags = peer
            .snapshot_tags("eu-west-1", &snap)
            .await
            .expect("the snapshot");
        assert!(in_step(&tags), "{snap}: {tags:?}");
    }
    op.stop().await;
}

/// A destination with a role: the operator assumes it through STS and the
/// copy is made, tracked and cleaned up in the role's account; the source is
/// shared with that account (image and snapshot), as AWS requires. A second
/// destination without a role copies in the operator's own account. A
/// destination dropped, or moved to another account, has its copy retired
/// in the account it was made in.
#[tokio::test]
async fn sim_cross_account_destination_through_an_assumed_role() {
    const OTHER: &str = "222233334444";
    let role = format!("arn:aws:iam::{OTHER}:role/ami-copier");
    let mut config = ec2peer::sim_config();
    config.copy_duration = Duration::from_millis(300);
    config
        .roles
        .insert(role.clone(), Some("amicopy-test".into()));
    let peer = Peer {
        env: PeerEnv::with_sim(config).await,
    };
    let (api, op) = operator(&peer, "cross-account").await;
    let source = peer.seed_source("shared-source").await;

    // Share the source and its snapshot with the other account.
    let ec2 = peer.ec2(SOURCE_REGION);
    let src = peer.control().image(&source).unwrap();
    ec2.modify_image_attribute()
        .image_id(&source)
        .launch_permission(
            aws_sdk_ec2::types::LaunchPermissionModifications::builder()
                .add(
                    aws_sdk_ec2::types::LaunchPermission::builder()
                        .user_id(OTHER)
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    for snap in src.snapshot_ids() {
        ec2.modify_snapshot_attribute()
            .snapshot_id(snap)
            .attribute(aws_sdk_ec2::types::SnapshotAttributeName::CreateVolumePermission)
            .create_volume_permission(
                aws_sdk_ec2::types::CreateVolumePermissionModifications::builder()
                    .add(
                        aws_sdk_ec2::types::CreateVolumePermission::builder()
                            .user_id(OTHER)
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await
            .unwrap();
    }

    let obj = create(
        &api,
        "across",
        json!({"source": {"region": SOURCE_REGION, "imageId": source},
               "destinations": [
                   {"region": "eu-west-1", "roleArn": role, "externalId": "amicopy-test"},
                   {"region": "ap-southeast-2"}]}),
    )
    .await;
    let uid = obj.uid().unwrap();
    let ready = wait_for(&api, "across", "Ready=True", is_ready).await;
    let control = peer.control();
    let there = control
        .image(&target_of(&ready, "eu-west-1").unwrap())
        .unwrap();
    assert_eq!(
        there.owner,
        OTHER,
        "copied into the role's account; calls: {:?}",
        control.calls()
    );
    assert_eq!(there.tags.get("amicopy.dev/uid"), Some(&uid));
    let here = control
        .image(&target_of(&ready, "ap-southeast-2").unwrap())
        .unwrap();
    assert_eq!(here.owner, ec2peer::ACCOUNT);
    let status = ready.status.unwrap();
    assert_eq!(
        status
            .destinations
            .iter()
            .find(|d| d.region == "eu-west-1")
            .unwrap()
            .role_arn
            .as_deref(),
        Some(role.as_str())
    );

    testbed::delete(&api, "across").await;
    testbed::wait_gone(&api, "across").await;
    assert!(
        control.image(&there.id).is_none(),
        "deregistered in the other account"
    );
    for snap in there.snapshot_ids() {
        assert!(control.snapshot(snap).is_none(), "its snapshot deleted");
    }
    assert!(control.image(&source).is_some(), "the source stays");

    // The cross-account destination dropped from the spec: its copy is
    // retired through the role and the external ID the status recorded (the
    // role's trust policy wants that ID, and the spec no longer names it).
    let spec = json!({"source": {"region": SOURCE_REGION, "imageId": source},
                      "destinations": [
                          {"region": "eu-west-1", "roleArn": role, "externalId": "amicopy-test"},
                          {"region": "ap-southeast-2"}]});
    create(&api, "dropped", spec).await;
    let ready = wait_for(&api, "dropped", "Ready=True", is_ready).await;
    let dropped = control
        .image(&target_of(&ready, "eu-west-1").unwrap())
        .unwrap();
    assert_eq!(dropped.owner, OTHER);
    patch_spec(
        &api,
        "dropped",
        json!({"destinations": [{"region": "ap-southeast-2"}]}),
    )
    .await;
    wait_for(&api, "dropped", "the other account's copy retired", |o| {
        is_ready(o)
            && o.status
                .as_ref()
                .is_some_and(|s| s.retiring.is_empty() && target_of(o, "eu-west-1").is_none())
    })
    .await;
    assert!(
        control.image(&dropped.id).is_none(),
        "deregistered in the other account; calls: {:?}",
        control.calls()
    );
    for snap in dropped.snapshot_ids() {
        assert!(control.snapshot(snap).is_none(), "its snapshot deleted");
    }
    testbed::delete(&api, "dropped").await;
    testbed::wait_gone(&api, "dropped").await;

    // The destination's roleArn removed: eu-west-1 is reached in this
    // account from then on. A copy is made here, and the one in the other
    // account is retired there, through the role the status recorded.
    let spec = json!({"source": {"region": SOURCE_REGION, "imageId": source},
                      "destinations": [
                          {"region": "eu-west-1", "roleArn": role, "externalId": "amicopy-test"}]});
    create(&api, "moved", spec).await;
    let ready = wait_for(&api, "moved", "Ready=True", is_ready).await;
    let before = control
        .image(&target_of(&ready, "eu-west-1").unwrap())
        .unwrap();
    assert_eq!(before.owner, OTHER);
    patch_spec(
        &api,
        "moved",
        json!({"destinations": [{"region": "eu-west-1"}]}),
    )
    .await;
    let moved = wait_for(&api, "moved", "copied here, retired there", |o| {
        is_ready(o)
            && o.status.as_ref().is_some_and(|s| s.retiring.is_empty())
            && target_of(o, "eu-west-1").is_some_and(|id| id != before.id)
    })
    .await;
    let after = control
        .image(&target_of(&moved, "eu-west-1").unwrap())
        .unwrap();
    assert_eq!(
        after.owner,
        ec2peer::ACCOUNT,
        "the new copy is in this account"
    );
    assert!(
        control.image(&before.id).is_none(),
        "the copy in the old account is deregistered; calls: {:?}",
        control.calls()
    );
    for snap in before.snapshot_ids() {
        assert!(control.snapshot(snap).is_none(), "its snapshot deleted");
    }
    testbed::delete(&api, "moved").await;
    testbed::wait_gone(&api, "moved").await;
    assert!(
        control.image(&after.id).is_none(),
        "deleted with the object"
    );
    op.stop().await;
}

/// Against moto (which models DescribeImages filters and launch
/// permissions): a selector picks the newest matching image and follows a
/// newer one; the copy is shared with an account.
#[tokio::test]
async fn moto_selector_and_sharing() {
    let peer = Peer {
        env: PeerEnv::start(ec2peer::Peer::Moto).await,
    };
    let (api, op) = operator(&peer, "moto-selector").await;
    let family = ec2peer::unique("moto-golden");
    let seed = |n: u32| {
        let client = peer.ec2(SOURCE_REGION);
        let name = format!("{family}-{n}");
        async move {
            ec2peer::seed_image(&client, SOURCE_REGION, &name, &[])
                .await
                .image_id
        }
    };
    let first = seed(1).await;
    let obj = create(
        &api,
        "follow",
        json!({"source": {"region": SOURCE_REGION, "selector": {"name": format!("{family}-*")}},
               "destinations": [{"region": "eu-west-1"}],
               "sharing": {"accounts": [ACCOUNT]}}),
    )
    .await;
    let uid = obj.uid().unwrap();
    let v1 = wait_for(&api, "follow", "the first image copied and shared", |o| {
        is_ready(o)
            && o.status.as_ref().is_some_and(|s| {
                s.source_image_id.as_deref() == Some(first.as_str())
                    && s.destinations[0].shared_with.len() == 1
            })
    })
    .await;
    let copy = target_of(&v1, "eu-west-1").unwrap();
    let perms = peer
        .ec2("eu-west-1")
        .describe_image_attribute()
        .image_id(&copy)
        .attribute(aws_sdk_ec2::types::ImageAttributeName::LaunchPermission)
        .send()
        .await
        .unwrap();
    let users: Vec<_> = perms
        .launch_permissions()
        .iter()
        .filter_map(|p| p.user_id())
        .collect();
    assert_eq!(users, vec![ACCOUNT], "moto holds the launch permission");

    // moto dates images to the second: the next build is a second newer.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = seed(2).await;
    let v2 = wait_for(
        &api,
        "follow",
        "the newer image copied, the old copy retired",
        |o| {
            is_ready(o)
                && o.status.as_ref().is_some_and(|s| {
                    s.source_image_id.as_deref() == Some(second.as_str()) && s.retiring.is_empty()
                })
        },
    )
    .await;
    assert_eq!(
        peer.owned_ids("eu-west-1", &uid).await,
        vec![target_of(&v2, "eu-west-1").unwrap()]
    );
    op.stop().await;
}
