//! Property 6: a bounded soak. Objects are created, get new sources and new
//! destinations, and are deleted, continuously, under the EC2 fault mix;
//! once everything settles, the simulator holds exactly the copies the live
//! objects list and nothing of the deleted ones, and the operator's memory
//! has not grown out of bounds.

use std::collections::BTreeSet;
use std::time::Duration;

use ami_copy_operator::AmiCopy;
use kube::api::{Api, ListParams};
use serde_json::json;

use super::ec2_faults::fault_mix;
use super::harness::{self, Launch, leaks};
use crate::testbed::{self, is_ready, wait_for, wait_gone};

const NAMES: usize = 6;
const ROUNDS: u64 = 60;
const REGION_SETS: [&[&str]; 3] = [
    &["eu-west-1", "ap-southeast-2"],
    &["eu-west-1"],
    &["us-west-2", "eu-central-1"],
];

#[tokio::test]
async fn soak_under_faults_ends_with_exactly_the_listed_copies() {
    let kube = testbed::kube().await;
    let ns = testbed::namespace(&kube, "soak").await;
    let api: Api<AmiCopy> = Api::namespaced(kube, &ns);
    let sim = harness::simulator(60, Duration::from_millis(400)).await;
    let launch = Launch::new(&ns, &sim.endpoint());
    let mut op = launch.spawn();
    op.metrics().await;
    let rss_start = op.rss_kib();
    fault_mix(&sim, 1.0);

    // A fixed pseudo-random walk: the same run every time.
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let (mut created, mut changed, mut deleted) = (0, 0, 0);
    for round in 0..ROUNDS {
        let name = format!("soak-{}", next(NAMES as u64));
        let regions = REGION_SETS[next(REGION_SETS.len() as u64) as usize];
        match (api.get_opt(&name).await.unwrap(), next(3)) {
            (None, _) => {
                let source = harness::seed_source(&sim, &format!("{name}-{round}"));
                harness::create(&api, &name, harness::spec(&source, regions)).await;
                created += 1;
            }
            // Being deleted: leave it.
            (Some(o), _) if o.metadata.deletion_timestamp.is_some() => {}
            (Some(_), 0) => {
                testbed::delete(&api, &name).await;
                deleted += 1;
            }
            (Some(_), 1) => {
                let source = harness::seed_source(&sim, &format!("{name}-{round}"));
                patch(&api, &name, json!({"source": {"imageId": source}})).await;
                changed += 1;
            }
            (Some(_), _) => {
                let d: Vec<_> = regions.iter().map(|r| json!({"region": r})).collect();
                patch(&api, &name, json!({"destinations": d})).await;
                changed += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    op.assert_alive();
    let injected = harness::injected(&sim);
    sim.clear_faults();

    // Settle: deleted objects gone, live ones Ready with nothing retiring.
    let mut live = Vec::new();
    for o in api.list(&ListParams::default()).await.unwrap().items {
        let name = o.metadata.name.clone().unwrap();
        if o.metadata.deletion_timestamp.is_some() {
            wait_gone(&api, &name).await;
            continue;
        }
        live.push(
            wait_for(&api, &name, "Ready with nothing retiring", |o| {
                is_ready(o) && o.status.as_ref().is_some_and(|s| s.retiring.is_empty())
            })
            .await,
        );
    }
    let listed = harness::listed(&live);
    let held: BTreeSet<String> = harness::copies(&sim).into_iter().map(|i| i.id).collect();
    assert_eq!(
        held, listed,
        "the simulator holds exactly what status lists"
    );
    assert_eq!(leaks(&sim, &listed), Vec::<String>::new());

    let rss_end = op.rss_kib();
    let m = op.metrics().await;
    eprintln!(
        "soak: {ROUNDS} rounds ({created} creates, {changed} changes, {deleted} deletes), \
         {} live objects with {} copies; {} reconciles, {} EC2 requests, injected {injected:?}; \
         RSS {rss_start} KiB -> {rss_end} KiB",
        live.len(),
        listed.len(),
        m.reconciles(),
        harness::total_calls(&sim),
    );
    assert!(
        rss_end <= rss_start * 2 + 64 * 1024,
        "RSS grew from {rss_start} KiB to {rss_end} KiB"
    );
    op.kill().await;
}

async fn patch(api: &Api<AmiCopy>, name: &str, spec: serde_json::Value) {
    api.patch(
        name,
        &Default::default(),
        &kube::api::Patch::Merge(json!({"spec": spec})),
    )
    .await
    .expect("patch the spec");
}
