//! Property 1: exactly one copy per (object, destination, source) across
//! crashes. The operator runs as a process and is SIGKILLed at points pinned
//! by the simulator (a long latency on the call that follows the one of
//! interest), then restarted.

use std::time::Duration;

use ami_copy_operator::AmiCopy;
use ec2_sim::{FaultKind, FaultRule, Simulator, Trigger};
use kube::ResourceExt;

use super::harness::{self, Bed, assert_one_copy_per_region, leaks};
use crate::testbed::{self, is_ready, wait_for, wait_gone};

const A: &str = "eu-west-1";
const B: &str = "ap-southeast-2";

/// Longer than any test waits, shorter than the SDK's attempt timeout: the
/// call hangs until the process is killed.
fn hang(action: &str, region: &str) -> FaultRule {
    FaultRule::new(
        FaultKind::Latency {
            delay: Duration::from_secs(15),
        },
        Trigger::Always,
    )
    .for_action(action)
    .in_region(region)
}

async fn bed(prefix: &str, seed: u64) -> Bed {
    harness::bed(prefix, seed, Duration::from_millis(500)).await
}

async fn wait_calls(sim: &Simulator, action: &str, region: &str, n: u64) {
    harness::until(&format!("{n} {action} in {region}"), || async {
        sim.call_count(action, region) >= n
    })
    .await;
}

fn recorded_targets(obj: &AmiCopy) -> Vec<String> {
    obj.status
        .iter()
        .flat_map(|s| &s.destinations)
        .filter_map(|d| d.image_id.clone())
        .collect()
}

/// After the restart: Ready, one copy per destination, and after deletion
/// nothing left in the simulator.
async fn converge_then_delete(b: &Bed, name: &str, uid: &str) {
    let mut op = b.launch.spawn();
    let ready = wait_for(&b.api, name, "Ready=True after the restart", is_ready).await;
    assert_one_copy_per_region(&b.sim, uid, &[A, B]);
    let live = harness::listed(std::slice::from_ref(&ready));
    assert_eq!(leaks(&b.sim, &live), Vec::<String>::new());
    testbed::delete(&b.api, name).await;
    wait_gone(&b.api, name).await;
    assert_eq!(
        leaks(&b.sim, &Default::default()),
        Vec::<String>::new(),
        "nothing left after deletion"
    );
    op.assert_alive();
    op.kill().await;
}

#[tokio::test]
async fn sigkill_after_first_copy_before_status_write() {
    let b = bed("crash-first", 11).await;
    let source = harness::seed_source(&b.sim, "crash-first");
    // CopyImage in A starts the copy, and its reply hangs, so the status
    // (written after every action) does not record it yet.
    b.sim.add_fault(hang("CopyImage", A).after_action());
    let op = b.launch.spawn();
    let obj = harness::create(&b.api, "first", harness::spec(&source, &[A, B])).await;
    let uid = obj.uid().unwrap();
    wait_calls(&b.sim, "CopyImage", A, 1).await;
    op.kill().await;

    let seen = b.api.get("first").await.unwrap();
    assert!(
        recorded_targets(&seen).is_empty(),
        "killed before any target was recorded: {:?}",
        seen.status
    );
    assert_eq!(b.sim.call_count("CopyImage", B), 0, "B not started yet");
    assert_eq!(harness::owned_by(&b.sim, &uid)[A].len(), 1);

    b.sim.clear_faults();
    converge_then_delete(&b, "first", &uid).await;
    assert_eq!(
        b.sim.call_count("CopyImage", A),
        1,
        "the copy in A was adopted, not started again"
    );
}

#[tokio::test]
async fn sigkill_after_every_copy_before_status_write() {
    let b = bed("crash-every", 12).await;
    let source = harness::seed_source(&b.sim, "crash-every");
    b.sim.add_fault(hang("CopyImage", B).after_action());
    let op = b.launch.spawn();
    let obj = harness::create(&b.api, "every", harness::spec(&source, &[A, B])).await;
    let uid = obj.uid().unwrap();
    wait_calls(&b.sim, "CopyImage", B, 1).await;
    op.kill().await;

    let seen = b.api.get("every").await.unwrap();
    assert!(recorded_targets(&seen).is_empty(), "{:?}", seen.status);
    assert_one_copy_per_region(&b.sim, &uid, &[A, B]);

    b.sim.clear_faults();
    converge_then_delete(&b, "every", &uid).await;
    for region in [A, B] {
        assert_eq!(b.sim.call_count("CopyImage", region), 1, "{region}");
    }
}

#[tokio::test]
async fn sigkill_between_destinations_with_a_copy_in_flight() {
    let b = bed("crash-between", 13).await;
    let source = harness::seed_source(&b.sim, "crash-between");
    // A is started and tagged; B's CopyImage is refused (throttled) until
    // the kill, so the process dies with A recorded nowhere but in EC2 and
    // B retrying.
    b.sim.add_fault(
        FaultRule::new(FaultKind::Throttle, Trigger::Always)
            .for_action("CopyImage")
            .in_region(B),
    );
    let op = b.launch.spawn();
    let obj = harness::create(&b.api, "between", harness::spec(&source, &[A, B])).await;
    let uid = obj.uid().unwrap();
    wait_calls(&b.sim, "CopyImage", B, 1).await;
    op.kill().await;
    assert_eq!(harness::owned_by(&b.sim, &uid).get(B), None);

    b.sim.clear_faults();
    converge_then_delete(&b, "between", &uid).await;
    assert_eq!(b.sim.call_count("CopyImage", A), 1);
}

#[tokio::test]
async fn sigkill_during_deletion_finishes_cleanup_on_restart() {
    let b = bed("crash-delete", 14).await;
    let source = harness::seed_source(&b.sim, "crash-delete");
    let op = b.launch.spawn();
    let obj = harness::create(&b.api, "doomed", harness::spec(&source, &[A, B])).await;
    let uid = obj.uid().unwrap();
    wait_for(&b.api, "doomed", "Ready=True", is_ready).await;

    // Cleanup works on both regions at once: in each, deregister, then
    // delete the snapshots. In A, DeleteSnapshot hangs; in B, DeregisterImage
    // does. Once A's image is deregistered nothing else changes until the
    // kill: A's snapshot and B's image and snapshot stay.
    b.sim.add_fault(hang("DeleteSnapshot", A));
    b.sim.add_fault(hang("DeregisterImage", B));
    testbed::delete(&b.api, "doomed").await;
    harness::until("A's image deregistered", || async {
        b.sim.call_count("DeregisterImage", A) >= 1
    })
    .await;
    op.kill().await;

    let held = b
        .api
        .get("doomed")
        .await
        .expect("the object is still there");
    assert!(held.metadata.deletion_timestamp.is_some());
    assert!(
        held.finalizers()
            .iter()
            .any(|f| f == ami_copy_operator::api::FINALIZER),
        "the finalizer stays until cleanup is complete"
    );
    let owned = harness::owned_by(&b.sim, &uid);
    assert_eq!(
        owned.keys().collect::<Vec<_>>(),
        [B],
        "A cleaned, B not: {owned:?}"
    );
    let left_snapshots = harness::copy_snapshots(&b.sim).len();
    assert_eq!(left_snapshots, 2, "both copies' snapshots are still there");

    b.sim.clear_faults();
    let mut op = b.launch.spawn();
    wait_gone(&b.api, "doomed").await;
    assert_eq!(
        leaks(&b.sim, &Default::default()),
        Vec::<String>::new(),
        "the restarted operator finished the cleanup"
    );
    op.assert_alive();
    op.kill().await;
}
