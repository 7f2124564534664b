//! The operator end to end: a real kube-apiserver, the operator in-process,
//! and an EC2 peer. Assertions are on what the EC2 peer holds (read back
//! through the EC2 API), not on the operator's own claims.

use std::collections::BTreeMap;
use std::time::Duration;

use ami_copy_operator::AmiCopy;
use ami_copy_operator::api::{TargetState, UID_TAG};
use aws_sdk_ec2::Client as Ec2Client;
use aws_sdk_ec2::types::{Filter, Image};
use ec2_sim::{FaultKind, FaultRule, SeedImage, Trigger};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::ec2peer::{self, PeerEnv};
use crate::reliability::harness::{condition_of, until};
use crate::testbed::{self, Operator, condition, is_ready, wait_for, wait_gone};

const SOURCE_REGION: &str = "us-east-1";

/// The operator tests' view of an EC2 peer, read through the EC2 API so the
/// same assertions hold for moto and the simulator.
pub(crate) struct Peer {
    pub(crate) env: PeerEnv,
}

impl Peer {
    pub(crate) async fn sim() -> Self {
        let mut config = ec2peer::sim_config();
        // Long enough for `pending` to be seen in status.
        config.copy_duration = Duration::from_millis(1500);
        Self::with_sim(config).await
    }

    /// The EC2 simulator with `config`.
    pub(crate) async fn with_sim(config: ec2_sim::SimConfig) -> Self {
        Self {
            env: PeerEnv::with_sim(config).await,
        }
    }

    pub(crate) async fn moto() -> Self {
        Self {
            env: PeerEnv::start(ec2peer::Peer::Moto).await,
        }
    }

    pub(crate) fn control(&self) -> &ec2_sim::Control {
        self.env.sim()
    }

    pub(crate) fn ec2(&self, region: &str) -> Ec2Client {
        self.env.client(region)
    }

    pub(crate) async fn seed_source(&self, name: &str) -> String {
        ec2peer::seed_image(
            &self.ec2(SOURCE_REGION),
            SOURCE_REGION,
            &ec2peer::unique(name),
            &[],
        )
        .await
        .image_id
    }

    /// Images in `region` carrying `amicopy.dev/uid=<uid>`.
    pub(crate) async fn owned(&self, region: &str, uid: &str) -> Vec<Image> {
        self.ec2(region)
            .describe_images()
            .owners("self")
            .filters(
                Filter::builder()
                    .name(format!("tag:{UID_TAG}"))
                    .values(uid)
                    .build(),
            )
            .send()
            .await
            .expect("DescribeImages")
            .images()
            .to_vec()
    }

    pub(crate) async fn owned_ids(&self, region: &str, uid: &str) -> Vec<String> {
        let images = self.owned(region, uid).await;
        images
            .iter()
            .filter_map(|i| i.image_id().map(str::to_owned))
            .collect()
    }

    pub(crate) async fn image(&self, region: &str, id: &str) -> Option<Image> {
        ec2peer::describe_image(&self.ec2(region), id).await
    }

    /// A snapshot's tags, read through the EC2 API; `None` when it is gone.
    pub(crate) async fn snapshot_tags(
        &self,
        region: &str,
        id: &str,
    ) -> Option<BTreeMap<String, String>> {
        let out = self
            .ec2(region)
            .describe_snapshots()
            .filters(Filter::builder().name("snapshot-id").values(id).build())
            .send()
            .await
            .expect("DescribeSnapshots");
        out.snapshots().first().map(|sn| {
            sn.tags()
                .iter()
                .map(|t| {
                    let key = t.key().unwrap_or_default().to_owned();
                    (key, t.value().unwrap_or_default().to_owned())
                })
                .collect()
        })
    }

    pub(crate) async fn snapshot_exists(&self, region: &str, id: &str) -> bool {
        let out = self
            .ec2(region)
            .describe_snapshots()
            .filters(Filter::builder().name("snapshot-id").values(id).build())
            .send()
            .await
            .expect("DescribeSnapshots");
        !out.snapshots().is_empty()
    }
}

pub(crate) fn snapshot_ids(img: &Image) -> Vec<String> {
    img.block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs()?.snapshot_id().map(str::to_owned))
        .collect()
}

pub(crate) fn tags(img: &Image) -> BTreeMap<String, String> {
    img.tags()
        .iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_owned(),
                t.value().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

pub(crate) async fn create(api: &Api<AmiCopy>, name: &str, spec: serde_json::Value) -> AmiCopy {
    let obj: AmiCopy = serde_json::from_value(json!({
        "apiVersion": "amicopy.dev/v1alpha1",
        "kind": "AmiCopy",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("a valid AmiCopy");
    api.create(&PostParams::default(), &obj)
        .await
        .expect("create the AmiCopy")
}

/// Patches the spec the way `kubectl apply` would (another field manager).
pub(crate) async fn patch_spec(api: &Api<AmiCopy>, name: &str, spec: serde_json::Value) {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": spec})),
    )
    .await
    .expect("patch the spec");
}

pub(crate) fn target_of(obj: &AmiCopy, region: &str) -> Option<String> {
    obj.status
        .as_ref()?
        .destinations
        .iter()
        .find(|d| d.region == region)?
        .image_id
        .clone()
}

pub(crate) struct Setup {
    pub(crate) kube: Client,
    pub(crate) api: Api<AmiCopy>,
    pub(crate) peer: Peer,
    pub(crate) operator: Operator,
}

pub(crate) async fn setup(peer: Peer, prefix: &str) -> Setup {
    let kube = testbed::kube().await;
    let ns = testbed::namespace(&kube, prefix).await;
    let operator = Operator::start(&kube, &ns, peer.env.endpoint()).await;
    Setup {
        api: Api::namespaced(kube.clone(), &ns),
        kube,
        peer,
        operator,
    }
}

/// The main job: two destination regions, copies appear in each region of the
/// peer, status goes pending → available, Ready=True for the current
/// generation; then deletion deregisters both and deletes their snapshots.
async fn copy_two_regions_then_delete(peer: Peer, expect_pending: bool) {
    copy_two_regions_then_delete_with(setup(peer, "two-regions").await, expect_pending).await;
}

/// The same cycle with an operator set up by the caller (e.g. running as the
/// Helm chart's ServiceAccount).
pub(crate) async fn copy_two_regions_then_delete_with(s: Setup, expect_pending: bool) {
    let source = s.peer.seed_source("golden").await;
    let obj = create(
        &s.api,
        "golden",
        json!({"source": {"region": SOURCE_REGION, "imageId": source},
               "destinations": [{"region": "eu-west-1"}, {"region": "ap-southeast-2"}],
               "tags": {"team": "platform"}}),
    )
    .await;
    let uid = obj.uid().unwrap();

    if expect_pending {
        let pending = wait_for(&s.api, "golden", "both targets recorded as pending", |o| {
            o.status.as_ref().is_some_and(|st| {
                st.destinations.len() == 2
                    && st
                        .destinations
                        .iter()
                        .all(|d| d.image_id.is_some() && d.state == TargetState::Pending)
            })
        })
        .await;
        assert_eq!(
            condition(&pending, "Progressing").unwrap(),
            ("True".into(), "CopyPending".into())
        );
        assert_eq!(
            condition(&pending, "Ready").unwrap(),
            ("False".into(), "CopyPending".into())
        );
    }
    let ready = wait_for(&s.api, "golden", "Ready=True", is_ready).await;
    let status = ready.status.clone().unwrap();
    assert_eq!(status.available.as_deref(), Some("2/2"));
    assert_eq!(status.source_image_id.as_deref(), Some(source.as_str()));
    assert_eq!(condition(&ready, "Degraded").unwrap().0, "False");

    let mut snapshots = Vec::new();
    for region in ["eu-west-1", "ap-southeast-2"] {
        let id = target_of(&ready, region).expect("target recorded");
        let owned = s.peer.owned(region, &uid).await;
        assert_eq!(owned.len(), 1, "exactly one target in {region}");
        let img = &owned[0];
        assert_eq!(
            img.image_id(),
            Some(id.as_str()),
            "status names the peer's image in {region}"
        );
        assert_eq!(img.state().map(|s| s.as_str()), Some("available"));
        let t = tags(img);
        assert_eq!(t.get("team").map(String::as_str), Some("platform"));
        assert_eq!(t.get("amicopy.dev/source-image"), Some(&source));
        assert!(
            img.name().unwrap().ends_with(&source),
            "name carries the source ID"
        );
        for snap in snapshot_ids(img) {
            assert!(s.peer.snapshot_exists(region, &snap).await);
            snapshots.push((region, snap));
        }
    }
    assert!(!snapshots.is_empty());
    assert!(
        s.peer.image(SOURCE_REGION, &source).await.is_some(),
        "the source is untouched"
    );

    testbed::delete(&s.api, "golden").await;
    wait_gone(&s.api, "golden").await;
    for region in ["eu-west-1", "ap-southeast-2"] {
        assert!(
            s.peer.owned(region, &uid).await.is_empty(),
            "targets in {region} deregistered"
        );
    }
    for (region, snap) in snapshots {
        assert!(
            !s.peer.snapshot_exists(region, &snap).await,
            "snapshot {snap} in {region} deleted"
        );
    }
    assert!(
        s.peer.image(SOURCE_REGION, &source).await.is_some(),
        "the source survives the deletion"
    );
    s.operator.stop().await;
}

#[tokio::test]
async fn sim_copy_two_regions_then_delete() {
    copy_two_regions_then_delete(Peer::sim().await, true).await;
}

#[tokio::test]
async fn moto_copy_two_regions_then_delete() {
    // moto makes copies available at once, so `pending` is rarely observable.
    copy_two_regions_then_delete(Peer::moto().await, false).await;
}

#[tokio::test]
async fn sim_per_region_kms_keys_are_used_and_reported() {
    let s = setup(Peer::sim().await, "kms").await;
    let source = s.peer.seed_source("kms-source").await;
    let key = |r: &str| {
        format!(
            "arn:aws:kms:{r}:123456789012:key/0000aaaa-1111-2222-3333-{}",
            if r == "eu-west-1" {
                "444455556666"
            } else {
                "777788889999"
            }
        )
    };
    create(
        &s.api,
        "kms",
        json!({"source": {"region": SOURCE_REGION, "imageId": source},
               "destinations": [
                   {"region": "eu-west-1", "encrypted": true, "kmsKeyId": key("eu-west-1")},
                   {"region": "ap-southeast-2", "encrypted": true, "kmsKeyId": key("ap-southeast-2")}]}),
    )
    .await;
    let ready = wait_for(&s.api, "kms", "Ready=True", is_ready).await;
    let control = s.peer.control();
    for d in &ready.status.unwrap().destinations {
        assert_eq!(d.encrypted, Some(true));
        assert_eq!(
            d.kms_key_id.as_deref(),
            Some(key(&d.region).as_str()),
            "status reports EC2's key"
        );
        let img = control
            .image(d.image_id.as_deref().unwrap())
            .expect("image in the peer");
        for snap in img.snapshot_ids() {
            let snap = control.snapshot(snap).unwrap();
            assert!(snap.encrypted);
            assert_eq!(snap.kms_key_id.as_deref(), Some(key(&d.region).as_str()));
        }
    }
    s.operator.stop().await;
}

#[tokio::test]
async fn sim_source_change_copies_then_retires_old_targets() {
    source_change_copies_then_retires_old_targets(Peer::sim().await, true).await;
}

#[tokio::test]
async fn moto_source_change_copies_then_retires_old_targets() {
    source_change_copies_then_retires_old_targets(Peer::moto().await, false).await;
}

/// A new source: copied beside the old copy (seen pending where the peer
/// models copy time), then the old copy and its snapshots are retired.
async fn source_change_copies_then_retires_old_targets(peer: Peer, expect_pending: bool) {
    let s = setup(peer, "source-change").await;
    let first = s.peer.seed_source("gen-1").await;
    let second = s.peer.seed_source("gen-2").await;
    let obj = create(&s.api, "rolling", json!({"source": {"region": SOURCE_REGION, "imageId": first}, "destinations": [{"region": "eu-west-1"}]})).await;
    let uid = obj.uid().unwrap();
    let v1 = wait_for(&s.api, "rolling", "first copy ready", is_ready).await;
    let old = target_of(&v1, "eu-west-1").unwrap();
    let old_image = s
        .peer
        .image("eu-west-1", &old)
        .await
        .expect("the first copy");
    let old_snaps = snapshot_ids(&old_image);
    assert!(!old_snaps.is_empty());

    patch_spec(
        &s.api,
        "rolling",
        json!({"source": {"region": SOURCE_REGION, "imageId": second}}),
    )
    .await;
    if expect_pending {
        let both = wait_for(&s.api, "rolling", "new copy pending beside the old", |o| {
            o.status.as_ref().is_some_and(|st| {
                st.source_image_id.as_deref() == Some(second.as_str())
                    && st
                        .destinations
                        .iter()
                        .any(|d| d.image_id.is_some() && d.state == TargetState::Pending)
                    && st
                        .retiring
                        .iter()
                        .any(|r| r.image_id.as_deref() == Some(old.as_str()))
            })
        })
        .await;
        assert!(
            s.peer.image("eu-west-1", &old).await.is_some(),
            "old copy kept while the new one is pending"
        );
        assert_ne!(target_of(&both, "eu-west-1").unwrap(), old);
    }

    let done = wait_for(&s.api, "rolling", "new copy ready and old retired", |o| {
        is_ready(o)
            && o.status.as_ref().is_some_and(|st| {
                st.retiring.is_empty() && st.source_image_id.as_deref() == Some(second.as_str())
            })
    })
    .await;
    let new = target_of(&done, "eu-west-1").unwrap();
    assert_ne!(new, old);
    assert_eq!(s.peer.owned_ids("eu-west-1", &uid).await, vec![new.clone()]);
    assert!(
        s.peer.image("eu-west-1", &old).await.is_none(),
        "old copy deregistered"
    );
    for snap in &old_snaps {
        assert!(
            !s.peer.snapshot_exists("eu-west-1", snap).await,
            "old snapshot {snap} deleted"
        );
    }
    s.operator.stop().await;
}

#[tokio::test]
async fn sim_removed_destination_is_retired() {
    removed_destination_is_retired(Peer::sim().await).await;
}

#[tokio::test]
async fn moto_removed_destination_is_retired() {
    removed_destination_is_retired(Peer::moto().await).await;
}

async fn removed_destination_is_retired(peer: Peer) {
    let s = setup(peer, "remove-dest").await;
    let source = s.peer.seed_source("remove-dest").await;
    let obj = create(&s.api, "shrink", json!({"source": {"region": SOURCE_REGION, "imageId": source}, "destinations": [{"region": "eu-west-1"}, {"region": "eu-central-1"}]})).await;
    let uid = obj.uid().unwrap();
    let ready = wait_for(&s.api, "shrink", "Ready=True", is_ready).await;
    let gone = target_of(&ready, "eu-central-1").unwrap();
    api_replace_destinations(&s.api, "shrink", json!([{"region": "eu-west-1"}])).await;
    wait_for(
        &s.api,
        "shrink",
        "one destination left, nothing retiring",
        |o| {
            is_ready(o)
                && o.status
                    .as_ref()
                    .is_some_and(|st| st.destinations.len() == 1 && st.retiring.is_empty())
        },
    )
    .await;
    assert!(s.peer.owned("eu-central-1", &uid).await.is_empty());
    assert!(s.peer.image("eu-central-1", &gone).await.is_none());
    assert_eq!(
        s.peer.owned("eu-west-1", &uid).await.len(),
        1,
        "the other destination is untouched"
    );
    s.operator.stop().await;
}

/// EC2 will not delete the snapshots of a copy retired from a region removed
/// from the spec: the status keeps the copy, deregistered, with the
/// snapshots still to delete (and so the region), until a later pass
/// deletes them.
#[tokio::test]
async fn sim_snapshots_a_retired_copy_left_are_deleted_later() {
    let s = setup(Peer::sim().await, "snap-left").await;
    let source = s.peer.seed_source("snap-left").await;
    create(&s.api, "shrink", json!({"source": {"region": SOURCE_REGION, "imageId": source}, "destinations": [{"region": "eu-west-1"}, {"region": "eu-central-1"}]})).await;
    let ready = wait_for(&s.api, "shrink", "Ready=True", is_ready).await;
    let gone = target_of(&ready, "eu-central-1").unwrap();
    let image = s.peer.image("eu-central-1", &gone).await.expect("the copy");
    let snaps = snapshot_ids(&image);
    assert!(!snaps.is_empty());
    s.peer.control().add_fault(FaultRule {
        region: Some("eu-central-1".into()),
        action: Some("DeleteSnapshot".into()),
        ..FaultRule::new(FaultKind::InternalError, Trigger::Always)
    });
    api_replace_destinations(&s.api, "shrink", json!([{"region": "eu-west-1"}])).await;
    let left = wait_for(
        &s.api,
        "shrink",
        "a deregistered copy with snapshots to delete",
        |o| {
            o.status.as_ref().is_some_and(|st| {
                // Deregistered: the entry written ahead of the
                // deregistration names the snapshots already.
                st.retiring.iter().any(|r| {
                    r.region == "eu-central-1"
                        && r.state.as_str() == "deregistered"
                        && !r.snapshots_to_delete.is_empty()
                })
            })
        },
    )
    .await;
    let entry = &left.status.as_ref().unwrap().retiring[0];
    assert_eq!(entry.snapshots_to_delete, snaps);
    assert!(s.peer.image("eu-central-1", &gone).await.is_none());
    assert!(s.peer.snapshot_exists("eu-central-1", &snaps[0]).await);

    s.peer.control().clear_faults();
    wait_for(&s.api, "shrink", "nothing left to retire", |o| {
        is_ready(o) && o.status.as_ref().is_some_and(|st| st.retiring.is_empty())
    })
    .await;
    for snap in &snaps {
        assert!(
            !s.peer.snapshot_exists("eu-central-1", snap).await,
            "{snap} deleted"
        );
    }
    s.operator.stop().await;
}

async fn api_replace_destinations(api: &Api<AmiCopy>, name: &str, destinations: serde_json::Value) {
    // A JSON merge patch replaces lists whole, as `kubectl apply` of a
    // shorter list would.
    patch_spec(api, name, json!({"destinations": destinations})).await;
}

#[tokio::test]
async fn sim_target_deregistered_out_of_band_is_copied_again() {
    target_deregistered_out_of_band_is_copied_again(Peer::sim().await).await;
}

#[tokio::test]
async fn moto_target_deregistered_out_of_band_is_copied_again() {
    target_deregistered_out_of_band_is_copied_again(Peer::moto().await).await;
}

async fn target_deregistered_out_of_band_is_copied_again(peer: Peer) {
    let s = setup(peer, "drift").await;
    let source = s.peer.seed_source("drift").await;
    let obj = create(&s.api, "drift", json!({"source": {"region": SOURCE_REGION, "imageId": source}, "destinations": [{"region": "eu-west-1"}]})).await;
    let uid = obj.uid().unwrap();
    let ready = wait_for(&s.api, "drift", "Ready=True", is_ready).await;
    let first = target_of(&ready, "eu-west-1").unwrap();
    s.peer
        .ec2("eu-west-1")
        .deregister_image()
        .image_id(&first)
        .send()
        .await
        .expect("deregister out of band");

    let again = wait_for(&s.api, "drift", "a new copy, ready", |o| {
        is_ready(o) && target_of(o, "eu-west-1").is_some_and(|id| id != first)
    })
    .await;
    let second = target_of(&again, "eu-west-1").unwrap();
    assert_eq!(
        s.peer.owned_ids("eu-west-1", &uid).await,
        vec![second.clone()]
    );
    let events = events_for(&s.kube, s.api.namespace().unwrap(), "drift").await;
    assert!(
        events.iter().any(|(reason, _)| reason == "TargetMissing"),
        "an Event says so: {events:?}"
    );
    s.operator.stop().await;
}

/// `Retain`: the copy and its snapshots stay, without the operator's tags,
/// so that nothing of the operator's can delete them later.
#[tokio::test]
async fn sim_retain_policy_keeps_targets_untagged() {
    retain_policy_keeps_targets_untagged(Peer::sim().await).await;
}

#[tokio::test]
async fn moto_retain_policy_keeps_targets_untagged() {
    retain_policy_keeps_targets_untagged(Peer::moto().await).await;
}

async fn retain_policy_keeps_targets_untagged(peer: Peer) {
    let s = setup(peer, "retain").await;
    let source = s.peer.seed_source("retain").await;
    let obj = create(&s.api, "keep", json!({"source": {"region": SOURCE_REGION, "imageId": source}, "destinations": [{"region": "eu-west-1"}], "deletionPolicy": "Retain", "tags": {"team": "platform"}})).await;
    let uid = obj.uid().unwrap();
    let ready = wait_for(&s.api, "keep", "Ready=True", is_ready).await;
    let target = target_of(&ready, "eu-west-1").unwrap();
    testbed::delete(&s.api, "keep").await;
    wait_gone(&s.api, "keep").await;
    let img = s
        .peer
        .image("eu-west-1", &target)
        .await
        .expect("target kept");
    assert_eq!(img.state().map(|s| s.as_str()), Some("available"));
    assert!(s.peer.owned("eu-west-1", &uid).await.is_empty());
    let kept = tags(&img);
    assert!(
        kept.keys().all(|k| !k.starts_with("amicopy.dev/")),
        "no ownership tag left: {kept:?}"
    );
    assert_eq!(kept.get("team").map(String::as_str), Some("platform"));
    for snap in snapshot_ids(&img) {
        let tags = s
            .peer
            .snapshot_tags("eu-west-1", &snap)
            .await
            .expect("snapshot kept");
        assert!(
            tags.keys().all(|k| !k.starts_with("amicopy.dev/")),
            "{snap}: {tags:?}"
        );
    }
    s.operator.stop().await;
}

#[tokio::test]
async fn sim_failed_copy_is_degraded_with_ec2s_reason() {
    let s = setup(Peer::sim().await, "failed").await;
    let source = s.peer.seed_source("failed").await;
    s.peer.control().add_fault(
        FaultRule::new(
            FaultKind::CopyFailure {
                code: "Client.InternalError".into(),
                message: "snapshot copy failed: checksum mismatch".into(),
            },
            Trigger::Always,
        )
        .in_region("ap-southeast-2"),
    );
    create(&s.api, "broken", json!({"source": {"region": SOURCE_REGION, "imageId": source}, "destinations": [{"region": "eu-west-1"}, {"region": "ap-southeast-2"}]})).await;
    let degraded = wait_for(&s.api, "broken", "Degraded=True", |o| {
        condition(o, "Degraded").is_some_and(|(st, _)| st == "True")
            && o.status.as_ref().is_some_and(|st| {
                st.destinations
                    .iter()
                    .any(|d| d.region == "eu-west-1" && d.state == TargetState::Available)
            })
    })
    .await;
    assert_eq!(condition(&degraded, "Degraded").unwrap().1, "CopyFailed");
    assert_eq!(condition(&degraded, "Ready").unwrap().0, "False");
    let failed = degraded
        .status
        .as_ref()
        .unwrap()
        .destinations
        .iter()
        .find(|d| d.region == "ap-southeast-2")
        .unwrap();
    assert_eq!(failed.state, TargetState::Failed);
    assert!(
        failed.message.contains("checksum mismatch"),
        "EC2's reason is shown: {}",
        failed.message
    );
    let msg = degraded
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap()
        .message
        .clone();
    assert!(msg.contains("checksum mismatch"), "{msg}");
    s.operator.stop().await;
}

#[tokio::test]
async fn sim_foreign_image_named_in_status_is_untouched() {
    foreign_image_named_in_status_is_untouched(Peer::sim().await).await;
}

#[tokio::test]
async fn moto_foreign_image_named_in_status_is_untouched() {
    foreign_image_named_in_status_is_untouched(Peer::moto().await).await;
}

/// A status pointed at someone else's image never gets it deleted.
async fn foreign_image_named_in_status_is_untouched(peer: Peer) {
    let s = setup(peer, "foreign").await;
    let source = s.peer.seed_source("foreign-source").await;
    let foreign = ec2peer::seed_image(
        &s.peer.ec2("eu-west-1"),
        "eu-west-1",
        &ec2peer::unique("someone-elses"),
        &[],
    )
    .await
    .image_id;
    create(&s.api, "victim", json!({"source": {"region": SOURCE_REGION, "imageId": source}, "destinations": [{"region": "eu-west-1"}]})).await;
    wait_for(&s.api, "victim", "Ready=True", is_ready).await;

    // Point status at the foreign image, as a confused writer might.
    let status = json!({"status": {"destinations": [{"region": "eu-west-1", "imageId": foreign, "state": "available", "sourceImageId": source}]}});
    s.api
        .patch_status("victim", &PatchParams::apply("intruder").force(), &Patch::Apply(json!({"apiVersion": "amicopy.dev/v1alpha1", "kind": "AmiCopy", "status": status["status"]})))
        .await
        .expect("patch status");
    testbed::delete(&s.api, "victim").await;
    wait_gone(&s.api, "victim").await;
    let img = s
        .peer
        .image("eu-west-1", &foreign)
        .await
        .expect("the foreign image still exists");
    assert_eq!(img.state().map(|s| s.as_str()), Some("available"));
    for snap in snapshot_ids(&img) {
        assert!(
            s.peer.snapshot_exists("eu-west-1", &snap).await,
            "its snapshot {snap} too"
        );
    }
    s.operator.stop().await;
}

/// Someone copies one of this object's copies with its tags (CopyImageTags):
/// the new image carries every `amicopy.dev/*` tag, but EC2 says it was
/// copied from our copy, not from the source. After a restart (the operator
/// lists by tag again) it is neither retired as a duplicate nor deleted with
/// the object.
#[tokio::test]
async fn sim_a_copy_of_our_copy_with_its_tags_is_never_touched() {
    let s = setup(Peer::sim().await, "decoy").await;
    let ns = s.api.namespace().unwrap().to_owned();
    let source = s.peer.seed_source("decoy").await;
    let obj = create(&s.api, "orig", json!({"source": {"region": SOURCE_REGION, "imageId": source}, "destinations": [{"region": "eu-west-1"}]})).await;
    let uid = obj.uid().unwrap();
    let ready = wait_for(&s.api, "orig", "Ready=True", is_ready).await;
    let ours = target_of(&ready, "eu-west-1").unwrap();
    s.operator.stop().await;

    let decoy = s
        .peer
        .ec2("eu-west-1")
        .copy_image()
        .source_region("eu-west-1")
        .source_image_id(&ours)
        .name(ec2peer::unique("decoy"))
        .copy_image_tags(true)
        .send()
        .await
        .expect("CopyImage of our copy")
        .image_id()
        .expect("an image ID")
        .to_owned();
    s.peer.control().finish_copies();
    let copied = s.peer.image("eu-west-1", &decoy).await.expect("the decoy");
    assert_eq!(
        tags(&copied).get(UID_TAG),
        Some(&uid),
        "it carries our UID tag"
    );
    assert_eq!(copied.source_image_id(), Some(ours.as_str()));

    let operator = Operator::start(&s.kube, &ns, s.peer.env.endpoint()).await;
    until(
        "an Event ForeignImageIgnored naming the copy of our copy",
        || async {
            let events = events_for(&s.kube, &ns, "orig").await;
            events
                .iter()
                .any(|(r, note)| r == "ForeignImageIgnored" && note.contains(&decoy))
        },
    )
    .await;
    testbed::delete(&s.api, "orig").await;
    wait_gone(&s.api, "orig").await;
    let kept = s
        .peer
        .control()
        .image(&decoy)
        .expect("the decoy still exists");
    assert_eq!(kept.state.as_str(), "available");
    assert!(
        kept.snapshot_ids()
            .all(|sn| s.peer.control().snapshot(sn).is_some())
    );
    assert!(
        s.peer.image("eu-west-1", &ours).await.is_none(),
        "our own copy is deregistered"
    );
    operator.stop().await;
}

/// A destination whose role STS refuses to assume: the destination says so
/// (`CredentialsUnavailable`, naming the role), the other destination is
/// copied; deleting the object reports the blocked clean-up instead of
/// hanging silently, and goes on once the role can be assumed.
#[tokio::test]
async fn sim_a_role_sts_refuses_is_shown_and_blocks_deletion_visibly() {
    const ROLE: &str = "arn:aws:iam::210987654321:role/not-yet-trusted";
    let s = setup(Peer::sim().await, "no-creds").await;
    let ns = s.api.namespace().unwrap().to_owned();
    let source = s.peer.seed_source("no-creds").await;
    create(&s.api, "blocked", json!({"source": {"region": SOURCE_REGION, "imageId": source},
        "destinations": [{"region": "eu-west-1"},
                         {"region": "eu-central-1", "roleArn": ROLE, "externalId": "amicopy-test"}]})).await;
    let shown = wait_for(&s.api, "blocked", "Degraded=CredentialsUnavailable", |o| {
        condition_of(o, "Degraded").is_some_and(|(_, reason, _)| reason == "CredentialsUnavailable")
            && o.status.as_ref().is_some_and(|st| {
                st.destinations
                    .iter()
                    .any(|d| d.region == "eu-west-1" && d.state == TargetState::Available)
            })
    })
    .await;
    let refused = shown
        .status
        .as_ref()
        .and_then(|st| st.destinations.iter().find(|d| d.region == "eu-central-1"))
        .expect("the destination with the role");
    assert_eq!(refused.state, TargetState::Error);
    assert!(
        refused.message.contains(ROLE) && refused.message.contains("eu-central-1"),
        "{}",
        refused.message
    );
    let copied = target_of(&shown, "eu-west-1").unwrap();

    testbed::delete(&s.api, "blocked").await;
    wait_for(&s.api, "blocked", "Degraded=CleanupBlocked", |o| {
        condition_of(o, "Degraded").is_some_and(|(_, reason, message)| {
            reason == "CleanupBlocked" && message.contains("eu-central-1")
        })
    })
    .await;
    until("an Event CleanupBlocked", || async {
        events_for(&s.kube, &ns, "blocked")
            .await
            .iter()
            .any(|(r, _)| r == "CleanupBlocked")
    })
    .await;
    assert!(
        s.peer.image("eu-west-1", &copied).await.is_none(),
        "the reachable region is cleaned meanwhile"
    );

    s.peer.control().update_config(|c| {
        c.roles.insert(ROLE.into(), Some("amicopy-test".into()));
    });
    wait_gone(&s.api, "blocked").await;
    s.operator.stop().await;
}

#[tokio::test]
async fn sim_encryption_downgrade_is_refused_without_a_copy() {
    let s = setup(Peer::sim().await, "downgrade").await;
    let source = s.peer.control().seed_image(SeedImage {
        region: SOURCE_REGION.into(),
        name: "encrypted-source".into(),
        encrypted: true,
        ..SeedImage::default()
    });
    let obj = create(&s.api, "down", json!({"source": {"region": SOURCE_REGION, "imageId": source}, "destinations": [{"region": "eu-west-1", "encrypted": false}]})).await;
    let degraded = wait_for(&s.api, "down", "Degraded=True", |o| {
        condition(o, "Degraded").is_some_and(|(st, _)| st == "True")
    })
    .await;
    assert_eq!(
        condition(&degraded, "Degraded").unwrap().1,
        "EncryptionDowngradeNotSupported"
    );
    assert!(
        s.peer
            .owned("eu-west-1", &obj.uid().unwrap())
            .await
            .is_empty()
    );
    assert_eq!(
        s.peer.control().call_count("CopyImage", "eu-west-1"),
        0,
        "no CopyImage was sent"
    );
    s.operator.stop().await;
}

#[tokio::test]
async fn sim_missing_source_is_degraded() {
    let s = setup(Peer::sim().await, "no-source").await;
    create(&s.api, "nothing", json!({"source": {"region": SOURCE_REGION, "imageId": "ami-0000000000000dead"}, "destinations": [{"region": "eu-west-1"}]})).await;
    let degraded = wait_for(&s.api, "nothing", "Degraded=True", |o| {
        condition(o, "Degraded").is_some_and(|(st, _)| st == "True")
    })
    .await;
    assert_eq!(
        condition(&degraded, "Degraded").unwrap().1,
        "SourceNotFound"
    );
    assert_eq!(s.peer.control().call_count("CopyImage", "eu-west-1"), 0);
    s.operator.stop().await;
}

/// Events recorded for an object: (reason, note).
pub(crate) async fn events_for(kube: &Client, ns: &str, name: &str) -> Vec<(String, String)> {
    use k8s_openapi::api::events::v1::Event;
    let api: Api<Event> = Api::namespaced(kube.clone(), ns);
    api.list(&Default::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

/// Copy admission: with one copy allowed in flight per region, four objects
/// copying into the same region queue (status `queued`), start one after the
/// other as slots free, and all end Ready; EC2 never sees more copies than
/// the limit (the simulator's own limit is 1 too and is never hit).
#[tokio::test]
async fn sim_copies_beyond_the_region_limit_are_queued() {
    let mut config = ec2peer::sim_config();
    config.copy_duration = Duration::from_millis(600);
    config.concurrent_copy_limit = 1;
    let peer = Peer::with_sim(config).await;
    let kube = testbed::kube().await;
    let ns = testbed::namespace(&kube, "queued").await;
    let operator =
        Operator::start_with(&kube, &ns, peer.env.endpoint(), |c| c.dest_copy_limit = 1).await;
    let api: Api<AmiCopy> = Api::namespaced(kube.clone(), &ns);
    let source = peer.seed_source("queued").await;
    let names = ["queue-1", "queue-2", "queue-3", "queue-4"];
    for name in names {
        let spec = json!({"source": {"region": SOURCE_REGION, "imageId": source}, "destinations": [{"region": "eu-west-1"}], "name": name});
        create(&api, name, spec).await;
    }
    let seen_queued = futures::future::select_all(names.map(|n| {
        Box::pin(wait_for(&api, n, "a queued destination", |o| {
            o.status.as_ref().is_some_and(|s| {
                s.destinations
                    .iter()
                    .any(|d| d.state == TargetState::Queued)
            })
        }))
    }))
    .await
    .0;
    let queued = seen_queued.status.unwrap().destinations[0].clone();
    assert_eq!(queued.reason.as_deref(), Some("CopyQueued"));
    assert!(
        queued
            .message
            .contains("at most 1 copies in flight to eu-west-1"),
        "{}",
        queued.message
    );
    for name in names {
        wait_for(&api, name, "Ready=True", is_ready).await;
    }
    let calls = peer.control().calls();
    let copies: Vec<_> = calls.iter().filter(|c| c.action == "CopyImage").collect();
    assert_eq!(copies.iter().map(|c| c.count).sum::<u64>(), 4, "{copies:?}");
    assert!(
        copies.iter().all(|c| c.outcome == "ok"),
        "EC2's own limit was never hit: {copies:?}"
    );
    operator.stop().await;
}
