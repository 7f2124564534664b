//! Property 7: the chaos soak. Objects are created, changed (new source,
//! destinations added and removed, tags and sharing edited) and deleted
//! continuously, against the simulator with EC2's propagation lag, faults
//! before and after the action, throttling, and the operator SIGKILLed at
//! random; decoys sit in every region: images of nobody, and copies of the
//! operator's own copies made with their tags (CopyImageTags). At the end,
//! against what the simulator holds: every live object has exactly one
//! available copy of its current source per destination, nothing of a deleted
//! object remains, no decoy was touched, and every finalizer is gone.
//!
//! The test command runs a short soak; `AMICOPY_CHAOS_ROUNDS=N` runs a
//! longer one (docs/reliability.md has the command and its figures).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ami_copy_operator::AmiCopy;
use ami_copy_operator::api::UID_TAG;
use ec2_sim::{FaultKind, FaultRule, Image, SeedImage, Simulator, Trigger};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

use super::ec2_faults::fault_mix;
use super::harness::{self, Launch, OperatorProcess};
use crate::ec2peer;
use crate::testbed::{self, is_ready, wait_for, wait_gone};

const REGIONS: [&str; 3] = ["eu-west-1", "ap-southeast-2", "us-west-2"];
const NAMES: u64 = 5;
const SHORT_ROUNDS: u64 = 40;

/// A fixed pseudo-random walk (xorshift): the same run every time.
struct Walk(u64);

impl Walk {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    fn regions(&mut self) -> Vec<&'static str> {
        let picked: Vec<_> = REGIONS
            .iter()
            .copied()
            .filter(|_| self.next(2) == 0)
            .collect();
        if picked.is_empty() {
            vec![REGIONS[self.next(REGIONS.len() as u64) as usize]]
        } else {
            picked
        }
    }
}

/// What the run did, for the report.
#[derive(Debug, Default)]
struct Tally {
    creates: u64,
    sources: u64,
    destinations: u64,
    tags: u64,
    sharing: u64,
    deletes: u64,
    kills: u64,
    decoys: u64,
}

/// An image the operator must never touch, as it was made.
struct Decoy {
    id: String,
    region: String,
    tags: BTreeMap<String, String>,
}

struct Chaos {
    sim: Simulator,
    api: Api<AmiCopy>,
    launch: Launch,
    /// `None` only between a SIGKILL and the restart.
    op: Option<OperatorProcess>,
    walk: Walk,
    tally: Tally,
    decoys: Vec<Decoy>,
    /// Source images seeded for the objects.
    sources: BTreeSet<String>,
    /// UIDs of every object deleted during the run.
    deleted: BTreeSet<String>,
}

#[tokio::test]
async fn chaos_soak_keeps_every_invariant() {
    let long: Option<u64> = std::env::var("AMICOPY_CHAOS_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok());
    let rounds = long.unwrap_or(SHORT_ROUNDS);
    let kube = testbed::kube().await;
    let ns = testbed::namespace(&kube, "chaos").await;
    let sim = harness::simulator(70, Duration::from_millis(400)).await;
    let launch = Launch::new(&ns, &sim.endpoint());
    let op = Some(launch.spawn());
    let mut chaos = Chaos {
        api: Api::namespaced(kube, &ns),
        op,
        launch,
        walk: Walk(0x9e37_79b9_7f4a_7c15),
        tally: Tally::default(),
        decoys: Vec::new(),
        sources: BTreeSet::new(),
        deleted: BTreeSet::new(),
        sim,
    };
    chaos.seed_foreign_decoys();
    chaos.unleash();
    let started = std::time::Instant::now();
    for round in 0..rounds {
        chaos.step(round).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let injected = harness::injected(&chaos.sim);
    chaos.sim.clear_faults();
    let live = chaos.settle().await;
    let copies = chaos.check(&live);
    eprintln!(
        "chaos: {rounds} rounds in {:.0} s: {:?}; {} live objects, {copies} copies; \
         {} EC2 requests, injected {injected:?}",
        started.elapsed().as_secs_f64(),
        chaos.tally,
        live.len(),
        harness::total_calls(&chaos.sim),
    );
    if let Some(op) = chaos.op.take() {
        op.kill().await;
    }
}

impl Chaos {
    /// An image of nobody in every region, and one carrying a UID tag but
    /// no source tag.
    fn seed_foreign_decoys(&mut self) {
        for region in REGIONS {
            for tags in [
                BTreeMap::new(),
                BTreeMap::from([(UID_TAG.to_string(), "someone".to_string())]),
            ] {
                let id = self.sim.seed_image(SeedImage {
                    tags: tags.clone(),
                    ..SeedImage::new(region, ec2peer::unique("decoy"))
                });
                self.decoys.push(Decoy {
                    id,
                    region: region.into(),
                    tags,
                });
                self.tally.decoys += 1;
            }
        }
    }

    /// EC2's propagation lag, the fault mix before the action (about 10 %
    /// of calls fail), lost replies after it (10 %), and throttling.
    fn unleash(&self) {
        self.sim.set_propagation_lag(Duration::from_millis(300));
        self.sim.set_deregistered_visibility(Duration::from_secs(2));
        fault_mix(&self.sim, 0.6);
        for kind in [FaultKind::DropConnection, FaultKind::InternalError] {
            let after = FaultRule::new(kind, Trigger::Fraction { probability: 0.05 });
            self.sim.add_fault(after.after_action());
        }
        self.sim.add_fault(FaultRule::new(
            FaultKind::Throttle,
            Trigger::RateLimit {
                per_second: 40.0,
                burst: 20,
            },
        ));
    }

    async fn step(&mut self, round: u64) {
        if self.walk.next(12) == 0 {
            if let Some(op) = self.op.take() {
                op.kill().await;
            }
            self.op = Some(self.launch.spawn());
            self.tally.kills += 1;
        }
        let name = format!("chaos-{}", self.walk.next(NAMES));
        let existing = self.api.get_opt(&name).await.expect("read the AmiCopy");
        match existing {
            None => self.create(&name, round).await,
            Some(o) if o.metadata.deletion_timestamp.is_some() => {}
            Some(o) => self.change(&o, round).await,
        }
    }

    fn seed_source(&mut self, name: &str, round: u64) -> String {
        let id = harness::seed_source(&self.sim, &format!("{name}-{round}"));
        self.sources.insert(id.clone());
        id
    }

    async fn create(&mut self, name: &str, round: u64) {
        let source = self.seed_source(name, round);
        let regions = self.walk.regions();
        harness::create(&self.api, name, harness::spec(&source, &regions)).await;
        self.tally.creates += 1;
    }

    async fn change(&mut self, obj: &AmiCopy, round: u64) {
        let name = obj.name_any();
        let spec = match self.walk.next(6) {
            0 => {
                self.deleted.insert(obj.uid().expect("a UID"));
                testbed::delete(&self.api, &name).await;
                self.tally.deletes += 1;
                return;
            }
            1 => {
                self.tally.sources += 1;
                let source = self.seed_source(&name, round);
                json!({"source": {"imageId": source}})
            }
            2 => {
                self.tally.destinations += 1;
                let regions: Vec<_> = self
                    .walk
                    .regions()
                    .into_iter()
                    .map(|r| json!({"region": r}))
                    .collect();
                json!({"destinations": regions})
            }
            3 => {
                self.tally.tags += 1;
                json!({"tags": {"team": format!("t{}", self.walk.next(3)), "round": round.to_string()}})
            }
            4 => {
                self.tally.sharing += 1;
                let accounts = ["111122223333", "444455556666"];
                let pick = accounts[self.walk.next(2) as usize];
                json!({"sharing": {"accounts": [pick], "snapshots": self.walk.next(2) == 0}})
            }
            _ => return self.copy_a_copy(obj).await,
        };
        let patch = Patch::Merge(json!({ "spec": spec }));
        self.api
            .patch(&name, &PatchParams::default(), &patch)
            .await
            .expect("patch the spec");
    }

    /// Someone copies one of the object's available copies with its tags.
    async fn copy_a_copy(&mut self, obj: &AmiCopy) {
        let Some(target) = obj.status.as_ref().and_then(|s| {
            s.destinations
                .iter()
                .find(|d| d.state == ami_copy_operator::api::TargetState::Available)
        }) else {
            return;
        };
        let (Some(ours), region) = (target.image_id.clone(), target.region.clone()) else {
            return;
        };
        // Under the fault mix the call may fail, or succeed with its reply
        // lost; `check` knows a copy of a copy by its source either way.
        let copied = ec2peer::client(&self.sim.endpoint(), &region)
            .copy_image()
            .source_region(&region)
            .source_image_id(&ours)
            .name(ec2peer::unique("decoy-copy"))
            .copy_image_tags(true)
            .send()
            .await;
        let Some(id) = copied.ok().and_then(|o| o.image_id().map(str::to_owned)) else {
            return;
        };
        let tags = self.sim.image(&id).map(|i| i.tags).unwrap_or_default();
        self.decoys.push(Decoy { id, region, tags });
        self.tally.decoys += 1;
    }

    /// Every object deleted during the run is gone; every live one is Ready
    /// with nothing retiring.
    async fn settle(&mut self) -> Vec<AmiCopy> {
        let mut live = Vec::new();
        let objects = self.api.list(&ListParams::default()).await.unwrap();
        for o in objects.items {
            let name = o.name_any();
            if o.metadata.deletion_timestamp.is_some() {
                wait_gone(&self.api, &name).await;
                continue;
            }
            let settled = wait_for(&self.api, &name, "Ready with nothing retiring", |o| {
                is_ready(o) && o.status.as_ref().is_some_and(|s| s.retiring.is_empty())
            })
            .await;
            live.push(settled);
        }
        if let Some(op) = self.op.as_mut() {
            op.assert_alive();
        }
        live
    }

    /// The invariants, against what the simulator holds; the number of
    /// copies the live objects hold.
    fn check(&self, live: &[AmiCopy]) -> usize {
        // Copies of the seeded sources are the objects'; every other copy is
        // a copy of a copy, a decoy, whether its ID came back or not.
        let (copies, copied_copies): (Vec<Image>, Vec<Image>) =
            harness::copies(&self.sim).into_iter().partition(|i| {
                i.source
                    .as_ref()
                    .is_some_and(|s| self.sources.contains(&s.image_id))
            });
        let mut decoys: BTreeSet<String> = self
            .decoys
            .iter()
            .map(|d| d.id.clone())
            .chain(copied_copies.iter().map(|i| i.id.clone()))
            .collect();
        let decoy_snapshots: Vec<String> = decoys
            .iter()
            .filter_map(|id| self.sim.image(id))
            .flat_map(|i| i.snapshot_ids().map(str::to_owned).collect::<Vec<_>>())
            .collect();
        decoys.extend(decoy_snapshots);
        let mut held = 0;
        for obj in live {
            held += one_available_copy_per_destination(obj, &copies);
        }
        let leftovers: Vec<&Image> = copies
            .iter()
            .filter(|i| {
                i.tags
                    .get(UID_TAG)
                    .is_some_and(|u| self.deleted.contains(u))
            })
            .collect();
        assert!(
            leftovers.is_empty(),
            "copies of deleted objects: {leftovers:?}"
        );
        let listed = harness::listed(live);
        let strays: Vec<String> = harness::leaks(&self.sim, &listed)
            .into_iter()
            .filter(|p| !decoys.iter().any(|d| p.contains(d.as_str())))
            .collect();
        assert!(strays.is_empty(), "{strays:?}");
        for decoy in &self.decoys {
            let image = self.sim.image(&decoy.id).unwrap_or_else(|| {
                panic!("decoy {} in {} was deregistered", decoy.id, decoy.region)
            });
            assert_eq!(image.state.as_str(), "available", "decoy {}", decoy.id);
            assert_eq!(image.tags, decoy.tags, "decoy {}'s tags", decoy.id);
            assert!(
                image.snapshot_ids().all(|s| self.sim.snapshot(s).is_some()),
                "decoy {}'s snapshots",
                decoy.id
            );
        }
        held
    }
}

/// Exactly one copy of the object's current source, available, in each of
/// its destinations, and none anywhere else; returns how many it holds.
fn one_available_copy_per_destination(obj: &AmiCopy, copies: &[Image]) -> usize {
    let uid = obj.uid().expect("a UID");
    let status = obj.status.as_ref().expect("a status");
    let source = status.source_image_id.as_deref().expect("a source");
    let mine: Vec<&Image> = copies
        .iter()
        .filter(|i| i.tags.get(UID_TAG) == Some(&uid))
        .collect();
    let want: BTreeSet<&str> = obj
        .spec
        .destinations
        .iter()
        .map(|d| d.region.as_str())
        .collect();
    let have: BTreeSet<&str> = mine.iter().map(|i| i.region.as_str()).collect();
    assert_eq!(have, want, "{}: regions holding copies", obj.name_any());
    for region in want {
        let here: Vec<&&Image> = mine.iter().filter(|i| i.region == region).collect();
        assert_eq!(here.len(), 1, "{} in {region}: {here:?}", obj.name_any());
        let copy = here[0];
        assert_eq!(copy.state.as_str(), "available");
        assert_eq!(
            copy.source.as_ref().map(|s| s.image_id.as_str()),
            Some(source),
            "{} in {region} is a copy of the current source",
            obj.name_any()
        );
    }
    mine.len()
}
