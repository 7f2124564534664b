//! Property 2: faults from EC2. Throttling, 500s, 503s, latency and dropped
//! connections on a sizeable fraction of every call; several objects still
//! converge, nothing is duplicated, and the number of calls stays within a
//! bound derived from the number of reconciles.

use std::time::Duration;

use ami_copy_operator::AmiCopy;
use ec2_sim::{FaultKind, FaultRule, Simulator, Trigger};
use kube::ResourceExt;
use kube::api::Api;

use super::harness::{self, Launch, assert_one_copy_per_region, leaks};
use crate::testbed::{self, is_ready, wait_for, wait_gone};

const REGIONS: [&str; 3] = ["eu-west-1", "ap-southeast-2", "us-west-2"];
const OBJECTS: usize = 6;

/// The fault mix, each on its own fraction of every call (any action, any
/// region). At `scale` 1 about one call in six fails outright and more are
/// slow.
pub fn fault_mix(sim: &Simulator, scale: f64) {
    let rules = [
        (FaultKind::Throttle, 0.05),
        (FaultKind::InternalError, 0.04),
        (FaultKind::Unavailable, 0.04),
        (FaultKind::DropConnection, 0.03),
        (
            FaultKind::Latency {
                delay: Duration::from_millis(150),
            },
            0.15,
        ),
    ];
    for (kind, p) in rules {
        sim.add_fault(FaultRule::new(
            kind,
            Trigger::Fraction {
                probability: p * scale,
            },
        ));
    }
}

/// EC2 operations one reconcile may make with `regions` destinations and no
/// deletion: the source, the owned images and the recorded ones per region,
/// and per region at most a copy, its tags, the snapshot lookup and claim,
/// a retag and a retirement (describe snapshots, deregister, delete one
/// snapshot).
pub fn calls_per_reconcile(regions: u64) -> u64 {
    1 + regions * (2 + 5 + 3)
}

#[tokio::test]
async fn ec2_faults_converge_without_duplicates_and_bounded_calls() {
    let kube = testbed::kube().await;
    let ns = testbed::namespace(&kube, "ec2-faults").await;
    let api: Api<AmiCopy> = Api::namespaced(kube, &ns);
    let sim = harness::simulator(20, Duration::from_millis(500)).await;
    let launch = Launch::new(&ns, &sim.endpoint());
    let mut op = launch.spawn();
    fault_mix(&sim, 2.0);

    let mut uids = Vec::new();
    for i in 0..OBJECTS {
        let source = harness::seed_source(&sim, &format!("faulty-{i}"));
        let obj = harness::create(
            &api,
            &format!("faulty-{i}"),
            harness::spec(&source, &REGIONS),
        )
        .await;
        uids.push(obj.uid().unwrap());
    }
    let mut ready = Vec::new();
    for i in 0..OBJECTS {
        ready.push(wait_for(&api, &format!("faulty-{i}"), "Ready=True", is_ready).await);
    }
    for uid in &uids {
        assert_one_copy_per_region(&sim, uid, &REGIONS);
    }
    assert_eq!(leaks(&sim, &harness::listed(&ready)), Vec::<String>::new());

    let m = op.metrics().await;
    let (reconciles, ops, calls) = (m.reconciles(), m.ec2_calls(), harness::total_calls(&sim));
    let injected = harness::injected(&sim);
    eprintln!(
        "ec2 faults: {OBJECTS} objects x {} regions ready; {reconciles} reconciles, \
         {ops} EC2 operations, {calls} requests at the simulator, injected {injected:?}",
        REGIONS.len()
    );
    // About 30 % of requests fail; a copy costs few requests now (no tag
    // or snapshot calls on a peer that tags on creation), so some 50 to 60
    // requests see 15 to 20 failures.
    assert!(
        injected.values().sum::<u64>() >= 10,
        "faults were injected: {injected:?}"
    );
    // The SDK makes at most 3 attempts per operation (structural); each
    // reconcile makes at most `calls_per_reconcile` operations (structural).
    // Measured bounds, twice what runs on this machine showed: 1.3-1.4
    // requests per operation, 2.2-2.9 operations per reconcile, 36-44
    // reconciles for the six objects (docs/reliability.md).
    assert!(calls <= 3 * ops, "{calls} requests for {ops} operations");
    assert!(
        ops <= reconciles * calls_per_reconcile(REGIONS.len() as u64),
        "{ops} operations in {reconciles} reconciles"
    );
    assert!(
        calls * 10 <= ops * 28,
        "{calls} requests for {ops} operations: more than twice the measured 1.4"
    );
    assert!(
        ops <= reconciles * 6,
        "{ops} operations in {reconciles} reconciles: more than twice the measured 2.9"
    );
    assert!(
        reconciles <= (OBJECTS as u64) * 15,
        "{reconciles} reconciles for {OBJECTS} objects: more than twice the measured 44"
    );

    // Deletion under the same faults leaves nothing behind.
    for i in 0..OBJECTS {
        testbed::delete(&api, &format!("faulty-{i}")).await;
    }
    for i in 0..OBJECTS {
        wait_gone(&api, &format!("faulty-{i}")).await;
    }
    assert_eq!(leaks(&sim, &Default::default()), Vec::<String>::new());
    op.assert_alive();
    op.kill().await;
}
