//! Property 4: deletion is complete and safe. Copies pending, available and
//! failed all go, images and snapshots; the finalizer stays while anything
//! is left; a region that keeps failing holds up only its own clean-up;
//! many objects deleted at once behave the same; a snapshot of another owner
//! is never deleted.

use std::time::Duration;

use ami_copy_operator::AmiCopy;
use ami_copy_operator::api::{FINALIZER, UID_TAG};
use aws_sdk_ec2::types::Tag;
use ec2_sim::{FaultKind, FaultRule, Trigger};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::json;

use super::harness::{self, Launch, leaks};
use crate::ec2peer;
use crate::testbed::{self, is_ready, wait_for, wait_gone};

const A: &str = "eu-west-1";
const F: &str = "ap-southeast-2";
const P: &str = "us-west-2";

fn state_in(obj: &AmiCopy, region: &str) -> Option<String> {
    obj.status
        .as_ref()?
        .destinations
        .iter()
        .find(|d| d.region == region && d.image_id.is_some())
        .map(|d| d.state.to_string())
}

#[tokio::test]
async fn deleting_pending_available_and_failed_copies_leaves_nothing() {
    let kube = testbed::kube().await;
    let ns = testbed::namespace(&kube, "delete-mixed").await;
    let api: Api<AmiCopy> = Api::namespaced(kube, &ns);
    let sim = harness::simulator(40, Duration::from_secs(3600)).await;
    let launch = Launch::new(&ns, &sim.endpoint());
    let mut op = launch.spawn();
    let source = harness::seed_source(&sim, "mixed");
    sim.add_fault(FaultRule::new(FaultKind::copy_failure(), Trigger::Always).in_region(F));

    // One object whose copies are available in A, failed in F and pending
    // in P at the same time.
    harness::create(&api, "mixed", harness::spec(&source, &[A, F])).await;
    wait_for(&api, "mixed", "both copies started", |o| {
        state_in(o, A).is_some() && state_in(o, F).is_some()
    })
    .await;
    sim.finish_copies();
    wait_for(&api, "mixed", "available in A, failed in F", |o| {
        state_in(o, A).as_deref() == Some("available")
            && state_in(o, F).as_deref() == Some("failed")
    })
    .await;
    api.patch(
        "mixed",
        &Default::default(),
        &kube::api::Patch::Merge(
            json!({"spec": {"destinations": [{"region": A}, {"region": F}, {"region": P}]}}),
        ),
    )
    .await
    .unwrap();
    let mixed = wait_for(&api, "mixed", "pending in P", |o| {
        state_in(o, P).as_deref() == Some("pending")
    })
    .await;
    assert_eq!(copy_count(&sim), 3);

    // DeleteSnapshot throttled: cleanup cannot finish, the finalizer stays.
    sim.add_fault(
        FaultRule::new(FaultKind::Throttle, Trigger::Always).for_action("DeleteSnapshot"),
    );
    testbed::delete(&api, "mixed").await;
    harness::until("cleanup tried to delete a snapshot", || async {
        sim.calls()
            .iter()
            .any(|c| c.action == "DeleteSnapshot" && c.outcome == "RequestLimitExceeded")
    })
    .await;
    assert_held(&api, "mixed", "still there while snapshots remain").await;
    assert!(
        !harness::copy_snapshots(&sim).is_empty(),
        "snapshots remain while the finalizer is held"
    );

    sim.clear_faults();
    wait_gone(&api, "mixed").await;
    assert_eq!(leaks(&sim, &Default::default()), Vec::<String>::new());
    assert!(harness::owned_by(&sim, &mixed.uid().unwrap()).is_empty());
    op.assert_alive();
    op.kill().await;
}

#[tokio::test]
async fn a_region_that_keeps_failing_holds_up_only_its_own_cleanup() {
    let harness::Bed { sim, api, launch } =
        harness::bed("delete-one-down", 43, Duration::from_millis(300)).await;
    let mut op = launch.spawn();
    let source = harness::seed_source(&sim, "one-down");
    harness::create(&api, "one-down", harness::spec(&source, &[A, F, P])).await;
    let ready = wait_for(&api, "one-down", "Ready=True", is_ready).await;
    let uid = ready.uid().unwrap();
    assert_eq!(
        harness::owned_by(&sim, &uid).keys().collect::<Vec<_>>(),
        [F, A, P]
    );

    // F sorts first; every call there fails while the object is deleted.
    sim.add_fault(FaultRule::new(FaultKind::InternalError, Trigger::Always).in_region(F));
    testbed::delete(&api, "one-down").await;
    harness::until("A and P cleaned up while F fails", || async {
        harness::owned_by(&sim, &uid).keys().collect::<Vec<_>>() == [F]
    })
    .await;
    assert_held(&api, "one-down", "still there while F holds a copy").await;
    assert!(
        sim.calls()
            .iter()
            .any(|c| c.region == F && c.outcome == "InternalError"),
        "cleanup tried F"
    );

    sim.clear_faults();
    wait_gone(&api, "one-down").await;
    assert_eq!(leaks(&sim, &Default::default()), Vec::<String>::new());
    op.assert_alive();
    op.kill().await;
}

/// The object is still there, kept by the finalizer.
async fn assert_held(api: &Api<AmiCopy>, name: &str, why: &str) {
    let held = api.get(name).await.expect(why);
    assert!(held.finalizers().iter().any(|f| f == FINALIZER), "{why}");
}

fn copy_count(sim: &ec2_sim::Simulator) -> usize {
    harness::copies(sim).len()
}

#[tokio::test]
async fn deleting_many_at_once_leaves_nothing() {
    const N: usize = 12;
    let kube = testbed::kube().await;
    let ns = testbed::namespace(&kube, "delete-many").await;
    let api: Api<AmiCopy> = Api::namespaced(kube, &ns);
    let sim = harness::simulator(41, Duration::from_millis(300)).await;
    let launch = Launch::new(&ns, &sim.endpoint());
    let mut op = launch.spawn();
    for i in 0..N {
        let source = harness::seed_source(&sim, &format!("many-{i}"));
        harness::create(&api, &format!("many-{i}"), harness::spec(&source, &[A, F])).await;
    }
    for i in 0..N {
        wait_for(&api, &format!("many-{i}"), "Ready=True", is_ready).await;
    }
    assert_eq!(copy_count(&sim), 2 * N);
    // Half still pending when the collection goes.
    sim.set_copy_duration(Duration::from_secs(3600));
    for i in 0..N / 2 {
        let source = harness::seed_source(&sim, &format!("many-next-{i}"));
        api.patch(
            &format!("many-{i}"),
            &Default::default(),
            &kube::api::Patch::Merge(json!({"spec": {"source": {"imageId": source}}})),
        )
        .await
        .unwrap();
    }
    harness::until("the new copies started", || async {
        copy_count(&sim) == 3 * N
    })
    .await;

    api.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .expect("DeleteCollection");
    harness::until("every object gone", || async {
        api.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    })
    .await;
    assert_eq!(leaks(&sim, &Default::default()), Vec::<String>::new());
    op.assert_alive();
    op.kill().await;
}

#[tokio::test]
async fn a_snapshot_of_another_owner_is_never_deleted() {
    let kube = testbed::kube().await;
    let ns = testbed::namespace(&kube, "delete-foreign").await;
    let api: Api<AmiCopy> = Api::namespaced(kube, &ns);
    let sim = harness::simulator(42, Duration::from_millis(300)).await;
    let launch = Launch::new(&ns, &sim.endpoint());
    let mut op = launch.spawn();
    let source = harness::seed_source(&sim, "foreign-snap");
    harness::create(&api, "owner", harness::spec(&source, &[A])).await;
    let ready = wait_for(&api, "owner", "Ready=True", is_ready).await;
    let target = ready.status.unwrap().destinations[0]
        .image_id
        .clone()
        .unwrap();
    let snapshot = sim
        .image(&target)
        .unwrap()
        .snapshot_ids()
        .next()
        .unwrap()
        .to_owned();

    // Someone hands the target's snapshot to another object.
    ec2peer::client(&sim.endpoint(), A)
        .create_tags()
        .resources(&snapshot)
        .tags(Tag::builder().key(UID_TAG).value("another-object").build())
        .send()
        .await
        .expect("retag the snapshot");
    testbed::delete(&api, "owner").await;
    wait_gone(&api, "owner").await;
    assert!(
        sim.image(&target).is_none(),
        "the owned image is deregistered"
    );
    let kept = sim
        .snapshot(&snapshot)
        .expect("the foreign snapshot is kept");
    assert_eq!(
        kept.tags.get(UID_TAG).map(String::as_str),
        Some("another-object")
    );
    op.assert_alive();
    op.kill().await;
}
