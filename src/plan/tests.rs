//! Table-style tests of the planner: an in-memory picture of EC2 in, actions
//! and status out.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::*;
use crate::api::{
    AmiCopySpec, DeletionPolicy, Destination, OWNER_TAG, SOURCE_TAG, Source, TargetState,
    TargetStatus, UID_TAG,
};
use crate::ec2::{ImageInfo, SnapshotRef};
use crate::status::{DEGRADED, PROGRESSING, READY, reason};

const SRC: &str = "ami-0123456789abcdef0";
const NEW_SRC: &str = "ami-0fedcba9876543210";
const UID: &str = "5f0c7c3e-1111-2222-3333-444455556666";

fn now() -> Time {
    Time(Timestamp::from_second(1_800_000_000).unwrap())
}

fn meta(generation: i64) -> Meta {
    Meta {
        governing: vec![crate::policy::Governing::trust_all()],
        namespace: "images".into(),
        name: "golden".into(),
        uid: UID.into(),
        generation: Some(generation),
        pinned: BTreeSet::new(),
        allow_public: false,
        listing_grace: std::time::Duration::from_secs(60),
        ssm_prefix: "/amicopy/".into(),
    }
}

fn dest(region: &str) -> Destination {
    Destination {
        region: region.into(),
        encrypted: None,
        kms_key_id: None,
        role_arn: None,
        external_id: None,
    }
}

fn spec(source: &str, regions: &[&str]) -> AmiCopySpec {
    AmiCopySpec {
        source: Source {
            region: "us-east-1".into(),
            image_id: Some(source.into()),
            selector: None,
        },
        destinations: regions.iter().map(|r| dest(r)).collect(),
        name: None,
        description: None,
        encrypted: None,
        copy_image_tags: None,
        tags: BTreeMap::from([("team".into(), "platform".into())]),
        deletion_policy: DeletionPolicy::Delete,
        retain: None,
        sharing: None,
        deprecate_after: None,
        deprecation_time: None,
        snapshot_copy_completion_duration_minutes: None,
        publish: None,
        protect: None,
        retirement: None,
    }
}

fn source_image(encrypted: bool) -> ImageInfo {
    ImageInfo {
        id: SRC.into(),
        name: Some("golden-base".into()),
        state: "available".into(),
        root_device_type: Some("ebs".into()),
        snapshots: vec![SnapshotRef {
            id: "snap-source".into(),
            encrypted,
            kms_key_id: None,
        }],
        ..ImageInfo::default()
    }
}

/// An image this object owns, copied from `source`.
fn target(id: &str, source: &str, state: &str) -> ImageInfo {
    ImageInfo {
        id: id.into(),
        state: state.into(),
        root_device_type: Some("ebs".into()),
        snapshots: vec![SnapshotRef {
            id: format!("snap-{id}"),
            encrypted: false,
            kms_key_id: None,
        }],
        tags: desired_tags(&spec(source, &[]), &meta(1), source),
        ..ImageInfo::default()
    }
}

fn observed(source: Option<ImageInfo>, owned: &[(&str, Vec<ImageInfo>)]) -> Observed {
    Observed {
        source: Some(Ok(source)),
        owned: owned
            .iter()
            .map(|(r, imgs)| (r.to_string(), imgs.clone()))
            .collect(),
        recorded: BTreeMap::new(),
        unreachable: BTreeMap::new(),
        resolved: None,
        own_account: None,
        tagged_by_ec2: BTreeSet::new(),
    }
}

fn cond<'a>(p: &'a Plan, t: &str) -> (&'a str, &'a str) {
    let c = p
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .expect("condition present");
    (c.status.as_str(), c.reason.as_str())
}

fn copies(p: &Plan) -> Vec<&CopyRequest> {
    p.actions
        .iter()
        .filter_map(|a| {
            if let Action::Copy { request, .. } = a {
                Some(request)
            } else {
                None
            }
        })
        .collect()
}

fn retired(p: &Plan) -> Vec<&str> {
    p.actions
        .iter()
        .filter_map(|a| {
            if let Action::Retire { image, .. } = a {
                Some(image.id.as_str())
            } else {
                None
            }
        })
        .collect()
}

/// The plan, with its status summarized as `record` does when no action
/// changed it.
fn planned(
    spec: &AmiCopySpec,
    meta: &Meta,
    prev: Option<&AmiCopyStatus>,
    obs: &Observed,
    now: &Time,
) -> Plan {
    let mut p = plan(spec, meta, prev, obs, now);
    let previous = prev.map(|s| s.conditions.as_slice()).unwrap_or_default();
    record::summarize(&mut p.status, p.global.clone(), previous, now);
    p
}

fn run(spec: &AmiCopySpec, prev: Option<&AmiCopyStatus>, obs: &Observed) -> Plan {
    planned(spec, &meta(1), prev, obs, &now())
}

/// Whether the object looks again soon, as `record` says with no outcome.
fn busy(p: &Plan) -> bool {
    record(p.clone(), Vec::new(), &[], &now()).busy
}

#[test]
fn fresh_object_copies_into_every_region_with_ownership_tags() {
    let s = spec(SRC, &["eu-west-1", "ap-southeast-2"]);
    let p = run(&s, None, &observed(Some(source_image(false)), &[]));
    let reqs = copies(&p);
    assert_eq!(reqs.len(), 2);
    for r in &reqs {
        assert_eq!(r.source_region, "us-east-1");
        assert_eq!(r.source_image_id, SRC);
        assert_eq!(r.name, format!("golden-base-{SRC}"));
        assert_eq!(r.tags.get(UID_TAG).map(String::as_str), Some(UID));
        assert_eq!(
            r.tags.get(OWNER_TAG).map(String::as_str),
            Some("images/golden")
        );
        assert_eq!(r.tags.get("team").map(String::as_str), Some("platform"));
        assert_eq!(r.encrypted, None);
        assert!(!r.copy_image_tags);
        assert_eq!(r.client_token.len(), 64);
    }
    assert_ne!(reqs[0].client_token, reqs[1].client_token);
    assert!(
        p.status
            .destinations
            .iter()
            .all(|d| d.state == TargetState::Pending && d.image_id.is_none())
    );
    assert_eq!(cond(&p, READY), ("False", "CopyPending"));
    assert_eq!(cond(&p, PROGRESSING), ("True", "CopyPending"));
    assert_eq!(cond(&p, DEGRADED), ("False", "AsExpected"));
    assert_eq!(p.status.available.as_deref(), Some("0/2"));
    assert!(busy(&p));
}

#[test]
fn client_token_is_deterministic_and_covers_every_input() {
    let base = TokenInputs {
        uid: UID,
        region: "eu-west-1",
        source_region: "us-east-1",
        source_image_id: SRC,
        encrypted: None,
        kms: None,
        attempt: 0,
        generation: Some(1),
    };
    assert_eq!(client_token(&base), client_token(&base.clone()));
    let variants = [
        TokenInputs {
            uid: "other-uid",
            ..base.clone()
        },
        TokenInputs {
            region: "eu-west-2",
            ..base.clone()
        },
        TokenInputs {
            source_region: "us-east-2",
            ..base.clone()
        },
        TokenInputs {
            source_image_id: NEW_SRC,
            ..base.clone()
        },
        TokenInputs {
            encrypted: Some(true),
            ..base.clone()
        },
        TokenInputs {
            encrypted: Some(true),
            kms: Some("alias/x"),
            ..base.clone()
        },
        TokenInputs {
            attempt: 1,
            ..base.clone()
        },
        TokenInputs {
            generation: Some(2),
            ..base.clone()
        },
        TokenInputs {
            generation: None,
            ..base.clone()
        },
    ];
    for v in variants {
        let token = client_token(&v);
        assert_ne!(token, client_token(&base), "{v:?}");
        assert!(token.len() <= 64, "EC2 allows 64 characters");
    }
}

#[test]
fn a_destination_added_back_later_gets_a_fresh_token() {
    let s = spec(SRC, &["eu-west-1"]);
    let obs = observed(Some(source_image(false)), &[]);
    let first = planned(&s, &meta(1), None, &obs, &now());
    assert_eq!(first.status.destinations[0].generation, Some(1));
    // Pending at generation 1 and recorded: later passes keep its token.
    let mut prev = first.status.clone();
    prev.destinations[0].image_id = Some("ami-00000000000000042".into());
    let later = planned(&s, &meta(2), Some(&prev), &obs, &now());
    assert_eq!(later.status.destinations[0].generation, Some(1));
    // Removed at generation 2, added back at generation 3: a new token.
    let again = planned(&s, &meta(3), None, &obs, &now());
    assert_ne!(
        copies(&again)[0].client_token,
        copies(&first)[0].client_token
    );
    // A copy recorded before the status kept generations keeps its token.
    let mut legacy = prev.clone();
    legacy.destinations[0].generation = None;
    legacy.destinations[0].image_id = None;
    legacy.destinations[0].state = TargetState::Waiting;
    let resumed = planned(&s, &meta(5), Some(&legacy), &obs, &now());
    assert_eq!(resumed.status.destinations[0].generation, Some(5));
}

#[test]
fn pending_target_is_followed_not_copied_again() {
    let s = spec(SRC, &["eu-west-1"]);
    let p = run(
        &s,
        None,
        &observed(
            Some(source_image(false)),
            &[(
                "eu-west-1",
                vec![target("ami-00000000000000001", SRC, "pending")],
            )],
        ),
    );
    assert!(copies(&p).is_empty());
    assert_eq!(
        p.status.destinations[0].image_id.as_deref(),
        Some("ami-00000000000000001")
    );
    assert_eq!(p.status.destinations[0].state, TargetState::Pending);
    assert!(busy(&p));
}

/// A copy available in eu-west-1 (ami-…1) and one in ap-southeast-2 (ami-…2).
fn available_in_both() -> Observed {
    observed(
        Some(source_image(false)),
        &[
            (
                "eu-west-1",
                vec![target("ami-00000000000000001", SRC, "available")],
            ),
            (
                "ap-southeast-2",
                vec![target("ami-00000000000000002", SRC, "available")],
            ),
        ],
    )
}

#[test]
fn available_everywhere_is_ready_and_claims_snapshots_once() {
    let s = spec(SRC, &["eu-west-1", "ap-southeast-2"]);
    let obs = available_in_both();
    let first = run(&s, None, &obs);
    assert_eq!(cond(&first, READY), ("True", "Available"));
    assert_eq!(cond(&first, PROGRESSING), ("False", "Complete"));
    assert_eq!(first.status.available.as_deref(), Some("2/2"));
    let claims = first.claims.len();
    assert_eq!(claims, 2);
    assert!(first.notes.iter().all(|n| n.reason == "CopyAvailable"));
    assert!(!busy(&first));

    // Steady state: nothing to do, nothing changes.
    let again = run(&s, Some(&first.status), &obs);
    assert!(again.actions.is_empty(), "{:?}", again.actions);
    assert!(again.notes.is_empty());
    assert_eq!(again.status, first.status);
}

#[test]
fn snapshots_of_the_source_are_never_claimed() {
    let s = spec(SRC, &["eu-west-1"]);
    let mut img = target("ami-00000000000000001", SRC, "available");
    img.snapshots.push(SnapshotRef {
        id: "snap-source".into(),
        ..SnapshotRef::default()
    });
    let p = run(
        &s,
        None,
        &observed(Some(source_image(false)), &[("eu-west-1", vec![img])]),
    );
    let Some(Claim { snapshot_ids, .. }) = p.claims.first() else {
        panic!("no claim")
    };
    assert_eq!(
        snapshot_ids,
        &vec!["snap-ami-00000000000000001".to_string()]
    );
}

#[test]
fn failed_copy_is_degraded_with_ec2s_reason() {
    let s = spec(SRC, &["eu-west-1"]);
    let mut img = target("ami-00000000000000001", SRC, "failed");
    img.state_reason = Some("Client.InternalError: snapshot copy failed".into());
    let p = run(
        &s,
        None,
        &observed(Some(source_image(false)), &[("eu-west-1", vec![img])]),
    );
    assert_eq!(cond(&p, DEGRADED), ("True", "CopyFailed"));
    assert_eq!(cond(&p, READY), ("False", "CopyFailed"));
    assert!(
        p.status.destinations[0]
            .message
            .contains("snapshot copy failed")
    );
    assert!(copies(&p).is_empty());
    assert!(
        p.notes
            .iter()
            .any(|n| n.warning && n.reason == "CopyFailed")
    );
}

#[test]
fn source_problems_block_copies_with_a_reason() {
    let s = spec(SRC, &["eu-west-1"]);
    let p = run(&s, None, &observed(None, &[]));
    assert!(copies(&p).is_empty());
    assert_eq!(cond(&p, DEGRADED), ("True", "SourceNotFound"));
    assert_eq!(p.status.destinations[0].state, TargetState::Error);

    let mut pending = source_image(false);
    pending.state = "pending".into();
    let p = run(&s, None, &observed(Some(pending), &[]));
    assert!(copies(&p).is_empty());
    assert_eq!(p.status.destinations[0].state, TargetState::Waiting);
    assert_eq!(cond(&p, DEGRADED).0, "False");

    let denied = Observed {
        source: Some(Err(Ec2Error::new("UnauthorizedOperation", "not allowed"))),
        ..Observed::default()
    };
    let p = run(&s, None, &denied);
    assert_eq!(cond(&p, DEGRADED), ("True", "AccessDenied"));
}

/// Source encrypted, source instance-store, `spec.encrypted`, the
/// destination's `encrypted`, its `kmsKeyId`, and the refusal expected (if any).
type EncryptionCase = (
    bool,
    bool,
    Option<bool>,
    Option<bool>,
    Option<&'static str>,
    Option<&'static str>,
);

#[test]
fn encryption_rules() {
    let cases: &[EncryptionCase] = &[
        (false, false, None, None, None, None),
        (false, false, None, Some(true), Some("alias/k"), None),
        (false, false, Some(true), None, None, None),
        (true, false, None, None, None, None),
        (true, false, None, Some(true), None, None),
        (
            true,
            false,
            None,
            Some(false),
            None,
            Some("EncryptionDowngradeNotSupported"),
        ),
        (
            true,
            false,
            Some(false),
            None,
            None,
            Some("EncryptionDowngradeNotSupported"),
        ),
        (true, false, Some(false), Some(true), None, None),
        (
            false,
            true,
            None,
            Some(true),
            None,
            Some("EncryptionNotSupportedForInstanceStore"),
        ),
        (false, true, None, None, None, None),
    ];
    for &(src_enc, instance_store, wide, per_dest, kms, want) in cases {
        let mut s = spec(SRC, &["eu-west-1"]);
        s.encrypted = wide;
        s.destinations[0].encrypted = per_dest;
        s.destinations[0].kms_key_id = kms.map(String::from);
        let mut src = source_image(src_enc);
        if instance_store {
            src.root_device_type = Some("instance-store".into());
            src.snapshots.clear();
        }
        let p = run(&s, None, &observed(Some(src), &[]));
        let case = format!("{src_enc} {instance_store} {wide:?} {per_dest:?} {kms:?}");
        match want {
            Some(reason) => {
                assert!(copies(&p).is_empty(), "{case}");
                assert_eq!(cond(&p, DEGRADED), ("True", reason), "{case}");
            }
            None => {
                let reqs = copies(&p);
                assert_eq!(reqs.len(), 1, "{case}");
                assert_eq!(reqs[0].encrypted, per_dest.or(wide), "{case}");
                assert_eq!(reqs[0].kms_key_id.as_deref(), kms, "{case}");
            }
        }
    }
}

#[test]
fn source_change_copies_first_then_retires_the_old_generation() {
    let old = target("ami-00000000000000001", SRC, "available");
    let first = run(
        &spec(SRC, &["eu-west-1"]),
        None,
        &observed(
            Some(source_image(false)),
            &[("eu-west-1", vec![old.clone()])],
        ),
    );

    let s = spec(NEW_SRC, &["eu-west-1"]);
    let mut new_src = source_image(false);
    new_src.id = NEW_SRC.into();
    let p = planned(
        &s,
        &meta(2),
        Some(&first.status),
        &observed(Some(new_src.clone()), &[("eu-west-1", vec![old.clone()])]),
        &now(),
    );
    assert_eq!(copies(&p).len(), 1);
    assert_eq!(copies(&p)[0].name, format!("golden-base-{NEW_SRC}"));
    assert!(
        retired(&p).is_empty(),
        "the old copy stays while the new one is pending"
    );
    assert_eq!(p.status.retiring.len(), 1);
    assert_eq!(
        p.status.retiring[0].image_id.as_deref(),
        Some("ami-00000000000000001")
    );

    let new = target("ami-00000000000000002", NEW_SRC, "pending");
    let p = planned(
        &s,
        &meta(2),
        Some(&p.status),
        &observed(
            Some(new_src.clone()),
            &[("eu-west-1", vec![old.clone(), new])],
        ),
        &now(),
    );
    assert!(copies(&p).is_empty());
    assert!(retired(&p).is_empty());

    let new = target("ami-00000000000000002", NEW_SRC, "available");
    let p = planned(
        &s,
        &meta(2),
        Some(&p.status),
        &observed(
            Some(new_src.clone()),
            &[("eu-west-1", vec![old.clone(), new.clone()])],
        ),
        &now(),
    );
    assert_eq!(retired(&p), vec!["ami-00000000000000001"]);
    assert_eq!(
        p.status.destinations[0].image_id.as_deref(),
        Some("ami-00000000000000002")
    );

    let mut retain = s.clone();
    retain.deletion_policy = DeletionPolicy::Retain;
    let p = planned(
        &retain,
        &meta(2),
        Some(&p.status),
        &observed(Some(new_src), &[("eu-west-1", vec![old, new])]),
        &now(),
    );
    assert!(retired(&p).is_empty());
    assert!(p.actions.iter().any(
        |a| matches!(a, Action::Release { image, .. } if image.id == "ami-00000000000000001")
    ));
}

#[test]
fn removed_destination_is_retired_at_once() {
    let s = spec(SRC, &["eu-west-1"]);
    let prev = AmiCopyStatus {
        destinations: vec![TargetStatus {
            region: "ap-southeast-2".into(),
            image_id: Some("ami-00000000000000002".into()),
            state: "available".into(),
            source_image_id: Some(SRC.into()),
            ..TargetStatus::default()
        }],
        ..AmiCopyStatus::default()
    };
    assert!(regions_of_interest(&s, Some(&prev)).contains("ap-southeast-2"));
    let obs = observed(
        Some(source_image(false)),
        &[
            ("eu-west-1", vec![]),
            (
                "ap-southeast-2",
                vec![target("ami-00000000000000002", SRC, "available")],
            ),
        ],
    );
    let p = run(&s, Some(&prev), &obs);
    assert_eq!(retired(&p), vec!["ami-00000000000000002"]);
    assert_eq!(p.status.destinations.len(), 1);
    assert_eq!(
        p.status.retiring[0].snapshots_to_delete,
        ["snap-ami-00000000000000002"],
        "the status names its snapshots before the image is deregistered"
    );
}

#[test]
fn the_status_records_the_role_and_external_id_of_each_copy() {
    let mut s = spec(SRC, &["eu-west-1", "ap-southeast-2"]);
    s.destinations[0].role_arn = Some("arn:aws:iam::210987654321:role/amicopy".into());
    s.destinations[0].external_id = Some("amicopy-test".into());
    let obs = available_in_both();
    let p = run(&s, None, &obs);
    let recorded: Vec<_> = p
        .status
        .destinations
        .iter()
        .map(|d| {
            (
                d.region.as_str(),
                d.role_arn.as_deref(),
                d.external_id.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        recorded,
        [
            (
                "eu-west-1",
                Some("arn:aws:iam::210987654321:role/amicopy"),
                Some("amicopy-test")
            ),
            ("ap-southeast-2", None, None),
        ]
    );
}

#[test]
fn an_image_with_this_objects_tags_copied_from_elsewhere_is_never_touched() {
    let s = spec(SRC, &["eu-west-1"]);
    let mut ours = target("ami-00000000000000001", SRC, "available");
    ours.source_image_id = Some(SRC.into());
    // A copy of our copy, tags and all (CopyImageTags): EC2 names our copy
    // as its source.
    let mut decoy = target("ami-0000000000000000d", SRC, "available");
    decoy.source_image_id = Some("ami-00000000000000001".into());
    let p = run(
        &s,
        None,
        &observed(
            Some(source_image(false)),
            &[("eu-west-1", vec![ours, decoy])],
        ),
    );
    assert_eq!(
        p.status.destinations[0].image_id.as_deref(),
        Some("ami-00000000000000001")
    );
    assert!(retired(&p).is_empty(), "{:?}", p.actions);
    assert!(p.status.retiring.is_empty());
    assert!(
        p.actions.iter().all(|a| !matches!(a, Action::TagImage { image_id, .. } | Action::Share(Sharing { image_id, .. }) if image_id == "ami-0000000000000000d")),
        "{:?}",
        p.actions
    );
    let ignored: Vec<&Note> = p
        .notes
        .iter()
        .filter(|n| n.reason == reason::FOREIGN_IMAGE_IGNORED)
        .collect();
    assert_eq!(ignored.len(), 1, "{:?}", p.notes);
    assert!(ignored[0].message.contains("ami-0000000000000000d"));
}

#[test]
fn duplicates_of_the_current_source_are_retired() {
    let s = spec(SRC, &["eu-west-1"]);
    let obs = observed(
        Some(source_image(false)),
        &[(
            "eu-west-1",
            vec![
                target("ami-00000000000000001", SRC, "available"),
                target("ami-00000000000000009", SRC, "available"),
            ],
        )],
    );
    let p = run(&s, None, &obs);
    assert_eq!(
        p.status.destinations[0].image_id.as_deref(),
        Some("ami-00000000000000001")
    );
    assert_eq!(retired(&p), vec!["ami-00000000000000009"]);
}

#[test]
fn target_deregistered_out_of_band_is_copied_again_under_a_new_token() {
    let s = spec(SRC, &["eu-west-1"]);
    let prev = run(
        &s,
        None,
        &observed(
            Some(source_image(false)),
            &[(
                "eu-west-1",
                vec![target("ami-00000000000000001", SRC, "available")],
            )],
        ),
    )
    .status;
    let mut obs = observed(Some(source_image(false)), &[("eu-west-1", vec![])]);
    assert_eq!(
        recorded_to_check(Some(&prev), &obs.owned),
        vec![("eu-west-1".to_string(), "ami-00000000000000001".to_string())]
    );
    obs.recorded.insert("ami-00000000000000001".into(), None);
    let p = run(&s, Some(&prev), &obs);
    let reqs = copies(&p);
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        reqs[0].client_token,
        client_token(&TokenInputs {
            uid: UID,
            region: "eu-west-1",
            source_region: "us-east-1",
            source_image_id: SRC,
            encrypted: None,
            kms: None,
            attempt: 1,
            generation: Some(1),
        })
    );
    assert_eq!(p.status.destinations[0].attempt, 1);
    assert!(p.notes.iter().any(|n| n.reason == "TargetMissing"));
}

#[test]
fn late_listed_target_found_by_id_is_not_copied_again() {
    let s = spec(SRC, &["eu-west-1"]);
    let prev = AmiCopyStatus {
        destinations: vec![TargetStatus {
            region: "eu-west-1".into(),
            image_id: Some("ami-00000000000000001".into()),
            state: "pending".into(),
            source_image_id: Some(SRC.into()),
            ..TargetStatus::default()
        }],
        ..AmiCopyStatus::default()
    };
    let mut obs = observed(Some(source_image(false)), &[("eu-west-1", vec![])]);
    obs.recorded.insert(
        "ami-00000000000000001".into(),
        Some(target("ami-00000000000000001", SRC, "pending")),
    );
    let p = run(&s, Some(&prev), &obs);
    assert!(copies(&p).is_empty());
    assert_eq!(
        p.status.destinations[0].image_id.as_deref(),
        Some("ami-00000000000000001")
    );
}

#[test]
fn foreign_image_named_in_status_is_never_touched() {
    let s = spec(SRC, &["eu-west-1"]);
    let prev = AmiCopyStatus {
        destinations: vec![TargetStatus {
            region: "eu-west-1".into(),
            image_id: Some("ami-0000000000000f00d".into()),
            state: "available".into(),
            source_image_id: Some(SRC.into()),
            ..TargetStatus::default()
        }],
        ..AmiCopyStatus::default()
    };
    let foreign = ImageInfo {
        id: "ami-0000000000000f00d".into(),
        state: "available".into(),
        ..ImageInfo::default()
    };
    let mut obs = observed(Some(source_image(false)), &[("eu-west-1", vec![])]);
    obs.recorded.insert(foreign.id.clone(), Some(foreign));
    let p = run(&s, Some(&prev), &obs);
    assert!(retired(&p).is_empty());
    assert!(!p.actions.iter().any(
        |a| matches!(a, Action::TagImage { image_id, .. } if image_id == "ami-0000000000000f00d")
    ));
    assert_eq!(
        copies(&p).len(),
        1,
        "the destination gets a copy of its own"
    );
    assert!(p.notes.iter().any(|n| n.reason == "ForeignImageIgnored"));
}

#[test]
fn changed_user_tags_are_applied_to_the_target() {
    let mut s = spec(SRC, &["eu-west-1"]);
    s.tags.insert("team".into(), "security".into());
    let p = run(
        &s,
        None,
        &observed(
            Some(source_image(false)),
            &[(
                "eu-west-1",
                vec![target("ami-00000000000000001", SRC, "available")],
            )],
        ),
    );
    assert!(p.actions.iter().any(|a| matches!(a, Action::TagImage { tags, .. } if tags.get("team").map(String::as_str) == Some("security"))));
}

#[test]
fn rejected_copy_waits_for_a_spec_change() {
    let s = spec(SRC, &["eu-west-1"]);
    let prev = AmiCopyStatus {
        observed_generation: Some(1),
        source_image_id: Some(SRC.into()),
        destinations: vec![TargetStatus {
            region: "eu-west-1".into(),
            state: "error".into(),
            source_image_id: Some(SRC.into()),
            reason: Some("DuplicateName".into()),
            message: "taken".into(),
            ..TargetStatus::default()
        }],
        ..AmiCopyStatus::default()
    };
    let obs = observed(Some(source_image(false)), &[("eu-west-1", vec![])]);
    let p = planned(&s, &meta(1), Some(&prev), &obs, &now());
    assert!(copies(&p).is_empty());
    assert_eq!(cond(&p, DEGRADED), ("True", "DuplicateName"));
    let p = planned(&s, &meta(2), Some(&prev), &obs, &now());
    assert_eq!(copies(&p).len(), 1);
}

#[test]
fn names_leave_room_for_the_source_suffix() {
    let long = "x".repeat(200);
    let name = target_name(&long, SRC);
    assert_eq!(name.len(), 128);
    assert!(name.ends_with(SRC));
    let mut s = spec(SRC, &["eu-west-1"]);
    s.name = Some("custom".into());
    let p = run(&s, None, &observed(Some(source_image(false)), &[]));
    assert_eq!(copies(&p)[0].name, format!("custom-{SRC}"));
}

#[test]
fn unchanged_conditions_keep_their_transition_time() {
    let s = spec(SRC, &["eu-west-1"]);
    let obs = observed(
        Some(source_image(false)),
        &[(
            "eu-west-1",
            vec![target("ami-00000000000000001", SRC, "available")],
        )],
    );
    let first = run(&s, None, &obs);
    let later = Time(Timestamp::from_second(1_800_000_600).unwrap());
    let again = planned(&s, &meta(1), Some(&first.status), &obs, &later);
    assert_eq!(again.status.conditions, first.status.conditions);
}

#[test]
fn a_region_ec2_cannot_be_asked_about_is_reported_on_its_destination_only() {
    let s = spec(SRC, &["eu-west-1", "zz-nowhere-1", "ap-south-1"]);
    let mut obs = observed(
        Some(source_image(false)),
        &[("eu-west-1", vec![]), ("ap-south-1", vec![])],
    );
    obs.unreachable.insert(
        "zz-nowhere-1".into(),
        Ec2Error::new("AuthFailure", "region not enabled"),
    );
    obs.unreachable.insert(
        "ap-south-1".into(),
        Ec2Error::new("Unavailable", "try later"),
    );
    let p = run(&s, None, &obs);
    let copied: Vec<&str> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Copy { region, .. } => Some(region.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(copied, vec!["eu-west-1"]);
    let by_region = |r: &str| {
        p.status
            .destinations
            .iter()
            .find(|d| d.region == r)
            .unwrap()
            .clone()
    };
    let refused = by_region("zz-nowhere-1");
    assert_eq!(
        (refused.state.as_str(), refused.reason.as_deref()),
        ("error", Some("RegionUnavailable"))
    );
    assert!(
        refused.message.contains("enabled for this account"),
        "{}",
        refused.message
    );
    let busy = by_region("ap-south-1");
    assert_eq!(busy.state, TargetState::Waiting);
    assert_eq!(cond(&p, DEGRADED), ("True", "RegionUnavailable"));
    assert_eq!(
        obs.transient_error().map(|e| e.code.as_str()),
        Some("Unavailable")
    );
}

#[test]
fn a_source_ec2_did_not_answer_about_waits_without_degrading() {
    let s = spec(SRC, &["eu-west-1"]);
    let obs = Observed {
        source: Some(Err(Ec2Error::new("RequestLimitExceeded", "slow down"))),
        ..Observed::default()
    };
    let p = run(&s, None, &obs);
    assert!(copies(&p).is_empty());
    assert_eq!(p.status.destinations[0].state, TargetState::Waiting);
    assert!(
        p.status.destinations[0]
            .message
            .contains("RequestLimitExceeded")
    );
    assert_eq!(cond(&p, DEGRADED).0, "False");
    assert!(obs.transient_error().is_some());
}

#[test]
fn a_source_region_ec2_refuses_is_named_as_such() {
    let mut s = spec(SRC, &["eu-west-1"]);
    s.source.region = "xx-fake-1".into();
    let obs = Observed {
        source: Some(Err(Ec2Error::new("AuthFailure", "unknown region"))),
        ..Observed::default()
    };
    let p = run(&s, None, &obs);
    assert_eq!(cond(&p, DEGRADED), ("True", "RegionUnavailable"));
    assert!(
        p.status.destinations[0].message.contains("xx-fake-1"),
        "{}",
        p.status.destinations[0].message
    );
}

fn available_target_created(id: &str, source: &str, created: &str) -> ImageInfo {
    ImageInfo {
        creation_date: Some(created.into()),
        ..target(id, source, "available")
    }
}

fn shares(p: &Plan) -> Vec<(Vec<String>, Vec<String>)> {
    p.actions
        .iter()
        .filter_map(|a| match a {
            Action::Share(Sharing { add, remove, .. }) => {
                let keys = |g: &[Grant]| g.iter().map(Grant::key).collect();
                Some((keys(add), keys(remove)))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn sharing_is_applied_once_and_removals_follow_the_spec() {
    let mut s = spec(SRC, &["eu-west-1"]);
    s.sharing = Some(crate::api::Sharing {
        accounts: vec!["111122223333".into()],
        organization_arns: vec![
            "arn:aws:organizations::111122223333:organization/o-abcde12345".into(),
        ],
        organizational_unit_arns: vec![],
        public: None,
        snapshots: Some(true),
    });
    let obs = observed(
        Some(source_image(false)),
        &[(
            "eu-west-1",
            vec![target("ami-00000000000000001", SRC, "available")],
        )],
    );
    let first = run(&s, None, &obs);
    assert_eq!(
        shares(&first),
        vec![(
            vec![
                "account:111122223333".to_string(),
                "organization:arn:aws:organizations::111122223333:organization/o-abcde12345"
                    .to_string(),
                "volume:111122223333".to_string(),
            ],
            vec![]
        )]
    );
    // Once the executor recorded what it applied, nothing more to do.
    let mut applied = first.status.clone();
    applied.destinations[0].shared_with = shares(&first)[0].0.clone();
    let again = run(&s, Some(&applied), &obs);
    assert!(shares(&again).is_empty(), "{:?}", again.actions);
    assert_eq!(
        again.status.destinations[0].shared_with,
        applied.destinations[0].shared_with
    );

    // An account removed from the spec is removed from the copy and its snapshots.
    s.sharing.as_mut().unwrap().accounts.clear();
    let removed = run(&s, Some(&applied), &obs);
    assert_eq!(
        shares(&removed),
        vec![(
            vec![],
            vec![
                "account:111122223333".to_string(),
                "volume:111122223333".to_string()
            ]
        )]
    );

    // A pending copy is not shared yet.
    let pending = observed(
        Some(source_image(false)),
        &[(
            "eu-west-1",
            vec![target("ami-00000000000000001", SRC, "pending")],
        )],
    );
    assert!(shares(&run(&s, None, &pending)).is_empty());
}

#[test]
fn public_sharing_needs_the_operator_flag() {
    let mut s = spec(SRC, &["eu-west-1"]);
    s.sharing = Some(crate::api::Sharing {
        public: Some(true),
        ..Default::default()
    });
    let obs = observed(
        Some(source_image(false)),
        &[(
            "eu-west-1",
            vec![target("ami-00000000000000001", SRC, "available")],
        )],
    );
    let refused = run(&s, None, &obs);
    assert!(shares(&refused).is_empty());
    assert_eq!(
        cond(&refused, DEGRADED),
        ("True", "PublicSharingNotAllowed")
    );
    let mut allowed = meta(1);
    allowed.allow_public = true;
    let p = planned(&s, &allowed, None, &obs, &now());
    assert_eq!(shares(&p), vec![(vec!["public".to_string()], vec![])]);
    assert_eq!(cond(&p, DEGRADED).0, "False");
}

fn deprecations(p: &Plan) -> Vec<String> {
    p.actions
        .iter()
        .filter_map(|a| match a {
            Action::Deprecate { at, .. } => Some(at.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn deprecation_follows_creation_time_or_a_fixed_time() {
    let mut s = spec(SRC, &["eu-west-1"]);
    s.deprecate_after = Some("30d".into());
    let img = available_target_created("ami-00000000000000001", SRC, "2027-01-01T00:00:00.000Z");
    let obs = observed(
        Some(source_image(false)),
        &[("eu-west-1", vec![img.clone()])],
    );
    assert_eq!(
        deprecations(&run(&s, None, &obs)),
        vec!["2027-01-31T00:00:00Z".to_string()]
    );

    // Already deprecated at that minute: nothing to do.
    let done = ImageInfo {
        deprecation_time: Some("2027-01-31T00:00:00.000Z".into()),
        ..img.clone()
    };
    let p = run(
        &s,
        None,
        &observed(Some(source_image(false)), &[("eu-west-1", vec![done])]),
    );
    assert!(deprecations(&p).is_empty());
    assert_eq!(
        p.status.destinations[0].deprecation_time.as_deref(),
        Some("2027-01-31T00:00:00.000Z")
    );

    // A fixed time in the past deprecates at once (EC2 refuses past times).
    s.deprecate_after = None;
    s.deprecation_time = Some("2020-01-01T00:00:00Z".into());
    let at = deprecations(&run(&s, None, &obs));
    assert_eq!(at.len(), 1);
    assert!(at[0].as_str() > "2027", "clamped to just after now: {at:?}");
}

#[test]
fn retain_keeps_the_newest_older_generations_and_pinned_ones() {
    let mut s = spec(SRC, &["eu-west-1"]);
    s.retain = Some(2);
    let current =
        available_target_created("ami-00000000000000003", SRC, "2027-03-01T00:00:00.000Z");
    let older = available_target_created(
        "ami-00000000000000002",
        "ami-0000000000000bbbb",
        "2027-02-01T00:00:00.000Z",
    );
    let oldest = available_target_created(
        "ami-00000000000000001",
        "ami-0000000000000aaaa",
        "2027-01-01T00:00:00.000Z",
    );
    let obs = observed(
        Some(source_image(false)),
        &[(
            "eu-west-1",
            vec![oldest.clone(), current.clone(), older.clone()],
        )],
    );
    let p = run(&s, None, &obs);
    let kept: Vec<_> = p
        .status
        .generations
        .iter()
        .filter_map(|g| g.image_id.clone())
        .collect();
    assert_eq!(kept, vec!["ami-00000000000000002".to_string()]);
    assert_eq!(retired(&p), vec!["ami-00000000000000001"]);

    let mut pinning = meta(1);
    pinning.pinned.insert("ami-0000000000000aaaa".into());
    let p = planned(&s, &pinning, None, &obs, &now());
    assert!(retired(&p).is_empty());
    assert_eq!(p.status.generations.len(), 2);

    // While the newest copy is pending, nothing old goes.
    let pending = ImageInfo {
        state: "pending".into(),
        ..current
    };
    let p = run(
        &s,
        None,
        &observed(
            Some(source_image(false)),
            &[("eu-west-1", vec![oldest, pending, older])],
        ),
    );
    assert!(retired(&p).is_empty());
}

#[test]
fn a_tag_key_dropped_from_the_spec_is_removed_and_others_left_alone() {
    let mut s = spec(SRC, &["eu-west-1"]);
    let mut img = target("ami-00000000000000001", SRC, "available");
    img.tags.insert("env".into(), "prod".into());
    img.tags.insert("cost-center".into(), "42".into());
    // A status that lists the operator's own keys (written by hand, or by
    // anyone who may write the status) never makes it drop them.
    let prev = AmiCopyStatus {
        tag_keys: vec![
            "env".into(),
            "team".into(),
            UID_TAG.into(),
            OWNER_TAG.into(),
            SOURCE_TAG.into(),
        ],
        ..AmiCopyStatus::default()
    };
    s.tags.remove("env");
    let p = run(
        &s,
        Some(&prev),
        &observed(Some(source_image(false)), &[("eu-west-1", vec![img])]),
    );
    let untag: Vec<_> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Untag {
                resource_ids, keys, ..
            } => Some((resource_ids.clone(), keys.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        untag,
        vec![(
            vec![
                "ami-00000000000000001".to_string(),
                "snap-ami-00000000000000001".to_string()
            ],
            vec!["env".to_string()]
        )],
        "cost-center was never the operator's"
    );
    assert_eq!(p.status.tag_keys, vec!["team".to_string()]);
}

#[test]
fn a_selector_copies_what_it_resolved_to() {
    let mut s = spec(SRC, &["eu-west-1"]);
    s.source.image_id = None;
    s.source.selector = Some(crate::api::SourceSelector {
        name: Some("golden-*".into()),
        ..Default::default()
    });
    s.snapshot_copy_completion_duration_minutes = Some(60);
    let mut obs = observed(Some(source_image(false)), &[]);
    obs.resolved = Some(ResolvedSource {
        image_id: SRC.into(),
        name: Some("golden-base".into()),
        resolved_at: "2027-01-01T00:00:00Z".into(),
    });
    let p = run(&s, None, &obs);
    assert_eq!(copies(&p)[0].source_image_id, SRC);
    assert_eq!(copies(&p)[0].completion_minutes, Some(60));
    assert_eq!(p.status.resolved_source, obs.resolved);
    assert_eq!(p.status.source_image_id.as_deref(), Some(SRC));

    obs.resolved = None;
    let p = run(&s, None, &obs);
    assert!(copies(&p).is_empty());
    assert_eq!(cond(&p, DEGRADED), ("True", "SourceNotFound"));
    assert!(p.status.destinations[0].message.contains("selector"));
}

#[test]
fn notes_of_one_reason_become_one_event_naming_every_region() {
    let note = |reason: &'static str, region: &str, warning: bool| Note {
        warning,
        reason,
        region: region.into(),
        message: format!("{reason} in {region}"),
    };
    let merged = merge_notes(&[
        note("CopyAvailable", "eu-west-1", false),
        note("CopyFailed", "us-west-2", true),
        note("CopyAvailable", "ap-southeast-2", false),
        note("Shared", "eu-west-1", false),
    ]);
    assert_eq!(
        merged,
        [
            Note {
                warning: false,
                reason: "CopyAvailable",
                region: String::new(),
                message: "CopyAvailable in eu-west-1; CopyAvailable in ap-southeast-2".into(),
            },
            note("CopyFailed", "us-west-2", true),
            note("Shared", "eu-west-1", false),
        ]
    );
    assert_eq!(
        merge_notes(&[note("Deprecated", "eu-west-1", false)]),
        [note("Deprecated", "eu-west-1", false)],
        "a single note is left as it is"
    );
}

#[test]
fn snapshots_a_deregistered_copy_left_are_deleted_until_none_is_left() {
    let s = spec(SRC, &["eu-west-1"]);
    let prev = AmiCopyStatus {
        retiring: vec![TargetStatus {
            region: "ap-south-1".into(),
            image_id: Some("ami-0000000000000000a".into()),
            state: TargetState::Other("deregistered".into()),
            snapshots_to_delete: vec!["snap-left".into()],
            ..TargetStatus::default()
        }],
        ..AmiCopyStatus::default()
    };
    assert!(regions_of_interest(&s, Some(&prev)).contains("ap-south-1"));
    let obs = observed(Some(source_image(false)), &[("ap-south-1", vec![])]);
    let p = run(&s, Some(&prev), &obs);
    assert_eq!(p.status.retiring, prev.retiring, "kept until deleted");
    assert!(p.actions.contains(&Action::DeleteSnapshots {
        region: "ap-south-1".into(),
        image_id: "ami-0000000000000000a".into(),
        snapshot_ids: vec!["snap-left".into()],
    }));
    let done = record(
        p,
        vec![Outcome::Retirement {
            region: "ap-south-1".into(),
            image_id: "ami-0000000000000000a".into(),
            step: Retirement::SnapshotsDeleted { left: Vec::new() },
        }],
        &[],
        &now(),
    );
    assert!(done.status.retiring.is_empty());
}

#[test]
fn a_removed_region_whose_copy_may_have_started_is_looked_at_until_ec2_lists_it() {
    // The operator decided to copy to ap-south-1 and stopped before the
    // image ID came back; then ap-south-1 left the spec.
    let s = spec(SRC, &["eu-west-1"]);
    let decided = Time(Timestamp::from_second(1_800_000_000 - 30).unwrap());
    let prev = AmiCopyStatus {
        destinations: vec![TargetStatus {
            region: "ap-south-1".into(),
            state: TargetState::Pending,
            source_image_id: Some(SRC.into()),
            planned_at: Some(destinations::rfc3339(&decided)),
            ..TargetStatus::default()
        }],
        ..AmiCopyStatus::default()
    };
    let nothing_listed = observed(Some(source_image(false)), &[("ap-south-1", vec![])]);
    let p = run(&s, Some(&prev), &nothing_listed);
    assert_eq!(p.status.retiring.len(), 1, "kept while EC2 may not list it");
    assert!(regions_of_interest(&s, Some(&p.status)).contains("ap-south-1"));
    assert!(busy(&p));

    // Listed now: retired like any copy in a region no longer listed.
    let copy = target("ami-0000000000000000c", SRC, "pending");
    let listed = observed(Some(source_image(false)), &[("ap-south-1", vec![copy])]);
    let p = run(&s, Some(&prev), &listed);
    assert_eq!(retired(&p), ["ami-0000000000000000c"]);

    // Past the grace with nothing listed: no copy was started.
    let later = Time(Timestamp::from_second(1_800_000_000 + 60).unwrap());
    let p = planned(&s, &meta(1), Some(&prev), &nothing_listed, &later);
    assert!(p.status.retiring.is_empty(), "{:?}", p.status.retiring);

    // A queued or refused copy never started: nothing to look for.
    for state in [TargetState::Queued, TargetState::Error] {
        let mut never = prev.clone();
        never.destinations[0].state = state;
        assert!(
            run(&s, Some(&never), &nothing_listed)
                .status
                .retiring
                .is_empty()
        );
    }
}

#[test]
fn a_new_copy_records_when_it_was_decided_and_keeps_it_across_retries() {
    let s = spec(SRC, &["eu-west-1"]);
    let obs = observed(Some(source_image(false)), &[]);
    let first = run(&s, None, &obs);
    let decided = first.status.destinations[0].planned_at.clone();
    assert_eq!(decided.as_deref(), Some("2027-01-15T08:00:00Z"));
    let mut waiting = first.status.clone();
    waiting.destinations[0].state = TargetState::Waiting;
    let later = Time(Timestamp::from_second(1_800_000_100).unwrap());
    let retry = planned(&s, &meta(1), Some(&waiting), &obs, &later);
    assert_eq!(retry.status.destinations[0].planned_at, decided);
}

#[test]
fn entries_of_a_region_ec2_did_not_answer_about_are_kept() {
    // ap-south-1 left the spec; EC2 there does not answer this time.
    let s = spec(SRC, &["eu-west-1"]);
    let entry = |id: &str, state: TargetState| TargetStatus {
        region: "ap-south-1".into(),
        image_id: Some(id.into()),
        state,
        source_image_id: Some(SRC.into()),
        ..TargetStatus::default()
    };
    let prev = AmiCopyStatus {
        destinations: vec![entry("ami-0000000000000000a", TargetState::Available)],
        generations: vec![entry("ami-0000000000000000b", TargetState::Available)],
        ..AmiCopyStatus::default()
    };
    let mut obs = observed(Some(source_image(false)), &[]);
    obs.unreachable.insert(
        "ap-south-1".into(),
        crate::ec2::Ec2Error::new("InternalError", "try again"),
    );
    let p = run(&s, Some(&prev), &obs);
    let kept: Vec<_> = p
        .status
        .retiring
        .iter()
        .map(|t| t.image_id.clone())
        .collect();
    assert_eq!(kept, [Some("ami-0000000000000000a".to_string())]);
    assert_eq!(p.status.generations.len(), 1);
    assert!(regions_of_interest(&s, Some(&p.status)).contains("ap-south-1"));
    assert!(retired(&p).is_empty(), "nothing is done there this time");
}

#[test]
fn a_new_copy_ec2_does_not_list_yet_in_a_removed_region_is_kept() {
    let s = spec(SRC, &["eu-west-1"]);
    let decided = Time(Timestamp::from_second(1_800_000_000 - 5).unwrap());
    let prev = AmiCopyStatus {
        destinations: vec![TargetStatus {
            region: "ap-south-1".into(),
            image_id: Some("ami-0000000000000000a".into()),
            state: TargetState::Pending,
            source_image_id: Some(SRC.into()),
            planned_at: Some(destinations::rfc3339(&decided)),
            ..TargetStatus::default()
        }],
        ..AmiCopyStatus::default()
    };
    let mut obs = observed(Some(source_image(false)), &[("ap-south-1", vec![])]);
    obs.recorded.insert("ami-0000000000000000a".into(), None);
    let p = run(&s, Some(&prev), &obs);
    assert_eq!(p.status.retiring.len(), 1, "not taken as gone");
}

#[test]
fn a_young_copy_ec2_does_not_return_yet_is_not_copied_again() {
    let s = spec(SRC, &["eu-west-1"]);
    let decided = Time(Timestamp::from_second(1_800_000_000 - 5).unwrap());
    let prev = AmiCopyStatus {
        observed_generation: Some(1),
        source_image_id: Some(SRC.into()),
        destinations: vec![TargetStatus {
            region: "eu-west-1".into(),
            image_id: Some("ami-0000000000000000a".into()),
            state: TargetState::Pending,
            source_image_id: Some(SRC.into()),
            planned_at: Some(destinations::rfc3339(&decided)),
            ..TargetStatus::default()
        }],
        ..AmiCopyStatus::default()
    };
    let mut obs = observed(Some(source_image(false)), &[("eu-west-1", vec![])]);
    obs.recorded.insert("ami-0000000000000000a".into(), None);
    let p = run(&s, Some(&prev), &obs);
    assert!(copies(&p).is_empty(), "{:?}", p.actions);
    let d = &p.status.destinations[0];
    assert_eq!(d.image_id.as_deref(), Some("ami-0000000000000000a"));
    assert_eq!(d.state, TargetState::Pending);
    assert!(!p.notes.iter().any(|n| n.reason == reason::TARGET_MISSING));

    // Past the grace, not found is gone: copied again under a new token.
    let later = Time(Timestamp::from_second(1_800_000_000 + 120).unwrap());
    let p = planned(&s, &meta(1), Some(&prev), &obs, &later);
    assert_eq!(copies(&p).len(), 1);
}

#[test]
fn a_copy_of_the_previous_source_ec2_does_not_list_yet_is_not_forgotten() {
    // The source changed a moment after the copy of the old one started.
    let s = spec(NEW_SRC, &["eu-west-1"]);
    let decided = Time(Timestamp::from_second(1_800_000_000 - 1).unwrap());
    let prev = AmiCopyStatus {
        source_image_id: Some(SRC.into()),
        destinations: vec![TargetStatus {
            region: "eu-west-1".into(),
            image_id: Some("ami-0000000000000000a".into()),
            state: TargetState::Pending,
            source_image_id: Some(SRC.into()),
            planned_at: Some(destinations::rfc3339(&decided)),
            ..TargetStatus::default()
        }],
        ..AmiCopyStatus::default()
    };
    let mut source = source_image(false);
    source.id = NEW_SRC.into();
    let p = run(
        &s,
        Some(&prev),
        &observed(Some(source), &[("eu-west-1", vec![])]),
    );
    assert_eq!(copies(&p).len(), 1, "the new source is copied");
    let kept: Vec<_> = p
        .status
        .retiring
        .iter()
        .map(|t| t.image_id.clone())
        .collect();
    assert_eq!(kept, [Some("ami-0000000000000000a".to_string())]);
}

#[test]
fn a_time_kept_to_the_second_is_recent_for_the_whole_window() {
    let at = "2027-01-15T08:00:00Z";
    let now = |ms: i64| Time(Timestamp::from_millisecond(1_800_000_000_000 + ms).unwrap());
    let window = std::time::Duration::from_secs(3);
    // The copy started at 08:00:00.900, kept as 08:00:00.
    assert!(super::recent(Some(at), &now(3_800), window));
    assert!(!super::recent(Some(at), &now(4_100), window));
    assert!(!super::recent(None, &now(0), window));
}

fn publications(p: &Plan) -> Vec<&publish::Publication> {
    p.actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish(p) => Some(p.as_ref()),
            _ => None,
        })
        .collect()
}

fn publishing(regions: &[&str], parameter: &str) -> AmiCopySpec {
    let mut s = spec(SRC, regions);
    s.publish = Some(crate::api::Publish {
        config_map: Some(crate::api::PublishConfigMap {
            name: "golden-ids".into(),
        }),
        ssm_parameter: Some(crate::api::PublishSsmParameter {
            name: parameter.into(),
        }),
    });
    s
}

#[test]
fn ids_are_published_only_once_every_destination_is_available() {
    let s = publishing(
        &["eu-west-1", "ap-southeast-2"],
        "/amicopy/images/golden/{region}",
    );
    let a = target("ami-00000000000000001", SRC, "available");
    let b = target("ami-00000000000000002", SRC, "pending");
    let one = observed(
        Some(source_image(false)),
        &[("eu-west-1", vec![a.clone()]), ("ap-southeast-2", vec![b])],
    );
    let p = run(&s, None, &one);
    assert!(publications(&p).is_empty(), "one of two is still pending");

    let b = target("ami-00000000000000002", SRC, "available");
    let both = observed(
        Some(source_image(false)),
        &[("eu-west-1", vec![a.clone()]), ("ap-southeast-2", vec![b])],
    );
    let p = run(&s, Some(&p.status), &both);
    let publication = publications(&p);
    let [publication] = publication.as_slice() else {
        panic!("one publication: {publication:?}")
    };
    let (name, data) = publication.config_map.clone().expect("a ConfigMap");
    assert_eq!(name, "golden-ids");
    assert_eq!(
        data,
        BTreeMap::from([
            ("ap-southeast-2".into(), "ami-00000000000000002".into()),
            ("eu-west-1".into(), "ami-00000000000000001".into()),
            ("source".into(), SRC.into()),
        ])
    );
    let names: Vec<(&str, &str)> = publication
        .parameters
        .iter()
        .map(|p| (p.name.as_str(), p.image_id.as_str()))
        .collect();
    assert_eq!(
        names,
        vec![
            (
                "/amicopy/images/golden/ap-southeast-2",
                "ami-00000000000000002"
            ),
            ("/amicopy/images/golden/eu-west-1", "ami-00000000000000001"),
        ]
    );
    assert!(publication.ours.contains("ami-00000000000000001"));
    assert!(!publication.ours.contains(SRC), "the source is not a copy");
    assert!(!publication.config_map_written, "created, not written over");
    // Published: one Event names the copies, instead of CopyAvailable too.
    let done = record(
        p.clone(),
        vec![Outcome::Published(publication.record.clone())],
        &[],
        &now(),
    );
    let reasons: Vec<&str> = done.notes.iter().map(|n| n.reason).collect();
    assert_eq!(reasons, vec![reason::PUBLISHED]);

    // Recorded: nothing more to publish while nothing changes.
    let mut status = p.status.clone();
    status.published = publication.record.clone();
    let p = run(&s, Some(&status), &both);
    assert!(publications(&p).is_empty(), "{:?}", p.actions);
}

#[test]
fn a_parameter_outside_the_namespaces_prefix_is_refused() {
    for name in [
        "/amicopy/other-team/golden",
        "/golden/{region}",
        "/amicopy/images/{nope}",
    ] {
        let s = publishing(&["eu-west-1"], name);
        let a = target("ami-00000000000000001", SRC, "available");
        let p = run(
            &s,
            None,
            &observed(Some(source_image(false)), &[("eu-west-1", vec![a])]),
        );
        assert!(publications(&p).is_empty(), "{name}");
        assert_eq!(
            cond(&p, DEGRADED),
            ("True", reason::PUBLISH_DENIED),
            "{name}"
        );
    }
}

#[test]
fn the_old_generation_waits_for_the_new_one_to_be_published() {
    let mut s = publishing(&["eu-west-1"], "/amicopy/images/golden");
    s.source.image_id = Some(NEW_SRC.into());
    let mut new_src = source_image(false);
    new_src.id = NEW_SRC.into();
    let old = target("ami-00000000000000001", SRC, "available");
    let new = target("ami-00000000000000002", NEW_SRC, "available");
    let obs = observed(Some(new_src), &[("eu-west-1", vec![old, new])]);
    let before = AmiCopyStatus {
        published: Some(crate::api::Published {
            source_image_id: SRC.into(),
            images: BTreeMap::from([("eu-west-1".into(), "ami-00000000000000001".into())]),
            at: "2026-01-01T00:00:00Z".into(),
            config_map: Some("golden-ids".into()),
            ssm_parameters: Vec::new(),
        }),
        ..AmiCopyStatus::default()
    };
    let p = run(&s, Some(&before), &obs);
    assert!(retired(&p).is_empty(), "consumers still read the old ID");
    assert_eq!(publications(&p).len(), 1);
    let mut after = p.status.clone();
    after.published = publications(&p)[0].record.clone();
    let p = run(&s, Some(&after), &obs);
    assert_eq!(retired(&p), vec!["ami-00000000000000001"]);
}

#[test]
fn dropping_publish_withdraws_the_parameters_written() {
    let s = spec(SRC, &["eu-west-1"]);
    let a = target("ami-00000000000000001", SRC, "available");
    let parameter = crate::api::PublishedParameter {
        region: "eu-west-1".into(),
        name: "/amicopy/images/golden".into(),
        image_id: a.id.clone(),
        role_arn: None,
        external_id: None,
    };
    let before = AmiCopyStatus {
        published: Some(crate::api::Published {
            source_image_id: SRC.into(),
            images: BTreeMap::from([("eu-west-1".into(), a.id.clone())]),
            at: "2026-01-01T00:00:00Z".into(),
            config_map: None,
            ssm_parameters: vec![parameter.clone()],
        }),
        ..AmiCopyStatus::default()
    };
    let p = run(
        &s,
        Some(&before),
        &observed(Some(source_image(false)), &[("eu-west-1", vec![a])]),
    );
    let publication = publications(&p);
    assert_eq!(publication.len(), 1);
    assert_eq!(publication[0].stale, vec![parameter]);
    assert!(publication[0].record.is_none() && publication[0].parameters.is_empty());
}

#[test]
fn protection_is_asked_for_the_current_available_copies_only() {
    let mut s = spec(NEW_SRC, &["eu-west-1"]);
    s.protect = Some(true);
    let mut new_src = source_image(false);
    new_src.id = NEW_SRC.into();
    let old = target("ami-00000000000000001", SRC, "available");
    let new = target("ami-00000000000000002", NEW_SRC, "available");
    let protects = |p: &Plan| -> Vec<String> {
        p.actions
            .iter()
            .filter_map(|a| match a {
                Action::Protect { image_id, .. } => Some(image_id.clone()),
                _ => None,
            })
            .collect()
    };
    let p = run(
        &s,
        None,
        &observed(
            Some(new_src.clone()),
            &[("eu-west-1", vec![old.clone(), new.clone()])],
        ),
    );
    assert_eq!(protects(&p), vec!["ami-00000000000000002"]);

    let mut protected = new.clone();
    protected.deregistration_protection = Some("enabled-without-cooldown".into());
    let p = run(
        &s,
        None,
        &observed(
            Some(new_src.clone()),
            &[("eu-west-1", vec![old, protected])],
        ),
    );
    assert!(protects(&p).is_empty());
    assert_eq!(
        p.status.destinations[0]
            .deregistration_protection
            .as_deref(),
        Some("enabled-without-cooldown")
    );

    let mut pending = new;
    pending.state = "pending".into();
    let p = run(
        &s,
        None,
        &observed(Some(new_src), &[("eu-west-1", vec![pending])]),
    );
    assert!(protects(&p).is_empty(), "not before it is available");
}

#[test]
fn retirement_says_how_and_disabled_copies_are_retired_already() {
    let mut s = spec(NEW_SRC, &["eu-west-1"]);
    s.retirement = Some(crate::api::RetirementPolicy {
        keep_in_use: None,
        last_launched_within: Some("7d".into()),
        action: crate::api::RetirementAction::Disable,
    });
    let mut new_src = source_image(false);
    new_src.id = NEW_SRC.into();
    let old = target("ami-00000000000000001", SRC, "available");
    let mut gone = target("ami-00000000000000003", SRC, "available");
    gone.state = "disabled".into();
    let new = target("ami-00000000000000002", NEW_SRC, "available");
    let p = run(
        &s,
        None,
        &observed(Some(new_src), &[("eu-west-1", vec![old, gone, new])]),
    );
    let hows: Vec<(&str, &Retiring)> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Retire { image, how, .. } => Some((image.id.as_str(), how)),
            _ => None,
        })
        .collect();
    let week_before = now()
        .0
        .checked_sub(SignedDuration::from_hours(24 * 7))
        .unwrap();
    assert_eq!(
        hows,
        vec![(
            "ami-00000000000000001",
            &Retiring {
                disable: true,
                keep_in_use: true,
                launched_after: Some(week_before.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()),
            }
        )],
        "the disabled copy is not retired again"
    );
}

#[test]
fn a_copy_kept_in_use_is_not_busy_and_is_looked_at_on_its_own_schedule() {
    let mut s = spec(NEW_SRC, &["eu-west-1"]);
    s.source.image_id = Some(NEW_SRC.into());
    let mut new_src = source_image(false);
    new_src.id = NEW_SRC.into();
    let old = target("ami-00000000000000001", SRC, "available");
    let new = target("ami-00000000000000002", NEW_SRC, "available");
    let obs = observed(Some(new_src), &[("eu-west-1", vec![old, new])]);
    let p = run(&s, None, &obs);
    let users = vec!["instance i-0123456789abcdef0 (running)".to_string()];
    let outcome = Outcome::Retirement {
        region: "eu-west-1".into(),
        image_id: "ami-00000000000000001".into(),
        step: Retirement::InUse {
            users: users.clone(),
        },
    };
    let blocked = |r: &Recorded| {
        r.notes
            .iter()
            .filter(|n| n.reason == reason::RETIREMENT_BLOCKED)
            .count()
    };
    let recorded = record(p, vec![outcome.clone()], &[], &now());
    let entry = &recorded.status.retiring[0];
    assert_eq!(entry.used_by, users);
    assert_eq!(entry.reason.as_deref(), Some(reason::RETIREMENT_BLOCKED));
    assert_eq!(blocked(&recorded), 1);

    // The next look finds the same users: no second Event, and the look
    // after that on the in-use schedule.
    let p = run(&s, Some(&recorded.status), &obs);
    assert_eq!(p.status.retiring[0].used_by, users);
    let again = record(p, vec![outcome], &[], &now());
    assert_eq!(blocked(&again), 0);
    assert!(!again.busy, "not looked at at the pace of copies in flight");
    let config = crate::config::Config::default();
    let wait = requeue::after(&config, &s, &again.status, again.busy, &now());
    assert_eq!(wait, config.in_use_recheck_interval);
}

#[test]
fn copies_ec2_tagged_on_creation_need_no_snapshot_claim() {
    let s = spec(SRC, &["eu-west-1", "ap-southeast-2"]);
    let mut obs = available_in_both();
    obs.tagged_by_ec2 = BTreeSet::from(["ami-00000000000000001".to_string()]);
    let p = run(&s, None, &obs);
    let claimed: Vec<&str> = p.claims.iter().map(|c| c.image_id.as_str()).collect();
    assert_eq!(
        claimed,
        vec!["ami-00000000000000002"],
        "only the copy the operator tagged"
    );
}

#[test]
fn only_regions_the_status_names_a_copy_in_are_listed() {
    assert!(
        regions_to_list(None).is_empty(),
        "a new object lists nothing"
    );
    let status = AmiCopyStatus {
        destinations: vec![TargetStatus {
            region: "eu-west-1".into(),
            state: TargetState::Pending,
            planned_at: Some("2026-01-01T00:00:00Z".into()),
            ..TargetStatus::default()
        }],
        retiring: vec![TargetStatus {
            region: "ap-south-1".into(),
            image_id: Some("ami-00000000000000001".into()),
            ..TargetStatus::default()
        }],
        ..AmiCopyStatus::default()
    };
    assert_eq!(
        regions_to_list(Some(&status)),
        BTreeSet::from(["ap-south-1".to_string(), "eu-west-1".to_string()]),
        "a copy only planned is looked for too"
    );
}
