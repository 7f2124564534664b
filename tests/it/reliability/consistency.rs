//! Property 8: EC2 as it really behaves. New images, snapshots and tags
//! reach DescribeImages late (propagation lag), and a call can be applied
//! with its reply lost. Nothing is copied twice, nothing leaks, and a copy
//! the listing does not show yet is looked for, not taken as gone.

use std::time::Duration;

use ec2_sim::{FaultKind, FaultRule, Trigger};
use kube::ResourceExt;
use serde_json::json;

use super::harness::{self, assert_one_copy_per_region, leaks, owned_by};
use crate::testbed::{self, is_ready, wait_for, wait_gone};

const REGIONS: [&str; 2] = ["eu-west-1", "us-west-2"];

/// Deleted right after its copies started, while EC2 does not list them yet
/// (nor their tags): the finalizer looks for the recorded copies until EC2
/// returns them, and deletes them.
#[tokio::test]
async fn deleting_right_after_the_copies_start_under_lag_leaves_nothing() {
    let bed = harness::bed("lag-delete", 81, Duration::from_secs(5)).await;
    bed.sim.set_propagation_lag(Duration::from_secs(2));
    let mut op = bed.launch.spawn();
    let source = harness::seed_source(&bed.sim, "lag-delete");
    let obj = harness::create(&bed.api, "early", harness::spec(&source, &REGIONS)).await;
    let uid = obj.uid().unwrap();
    wait_for(&bed.api, "early", "both copies recorded", |o| {
        o.status.as_ref().is_some_and(|s| {
            s.destinations.len() == 2 && s.destinations.iter().all(|d| d.image_id.is_some())
        })
    })
    .await;
    testbed::delete(&bed.api, "early").await;
    wait_gone(&bed.api, "early").await;
    assert!(
        owned_by(&bed.sim, &uid).is_empty(),
        "copies left: {:?}",
        owned_by(&bed.sim, &uid)
    );
    assert_eq!(leaks(&bed.sim, &Default::default()), Vec::<String>::new());
    op.assert_alive();
    op.kill().await;
}

/// CopyImage, CreateTags, DeregisterImage and DeleteSnapshot applied with
/// their replies lost, while EC2 lists new images half a second late: one
/// copy per region, the old generation retired with its snapshots, nothing
/// left after the object is deleted.
#[tokio::test]
async fn replies_lost_after_the_action_copy_once_and_leak_nothing() {
    let bed = harness::bed("lost-replies", 82, Duration::from_millis(600)).await;
    bed.sim.set_deregistered_visibility(Duration::from_secs(2));
    bed.sim.set_propagation_lag(Duration::from_millis(500));
    for action in [
        "CopyImage",
        "CreateTags",
        "DeregisterImage",
        "DeleteSnapshot",
    ] {
        for kind in [FaultKind::DropConnection, FaultKind::InternalError] {
            let rule = FaultRule::new(kind, Trigger::Next { count: 2 }).for_action(action);
            bed.sim.add_fault(rule.after_action());
        }
    }
    let mut op = bed.launch.spawn();
    let first = harness::seed_source(&bed.sim, "lost-1");
    let obj = harness::create(&bed.api, "lossy", harness::spec(&first, &REGIONS)).await;
    let uid = obj.uid().unwrap();
    wait_for(&bed.api, "lossy", "Ready=True", is_ready).await;
    assert_one_copy_per_region(&bed.sim, &uid, &REGIONS);

    let second = harness::seed_source(&bed.sim, "lost-2");
    let patch = json!({"spec": {"source": {"imageId": second}}});
    bed.api
        .patch(
            "lossy",
            &Default::default(),
            &kube::api::Patch::Merge(patch),
        )
        .await
        .expect("a new source");
    let done = wait_for(
        &bed.api,
        "lossy",
        "the new source ready, nothing retiring",
        |o| {
            is_ready(o)
                && o.status.as_ref().is_some_and(|s| {
                    s.retiring.is_empty() && s.source_image_id.as_deref() == Some(second.as_str())
                })
        },
    )
    .await;
    assert_one_copy_per_region(&bed.sim, &uid, &REGIONS);
    assert_eq!(
        leaks(&bed.sim, &harness::listed(&[done])),
        Vec::<String>::new()
    );
    let lost = harness::injected(&bed.sim);
    assert!(
        bed.sim
            .calls()
            .iter()
            .any(|c| c.outcome.starts_with("applied:")),
        "replies were lost after the action: {lost:?}"
    );

    testbed::delete(&bed.api, "lossy").await;
    wait_gone(&bed.api, "lossy").await;
    assert_eq!(leaks(&bed.sim, &Default::default()), Vec::<String>::new());
    op.assert_alive();
    op.kill().await;
}
