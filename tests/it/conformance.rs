//! EC2 conformance: the same scenarios, through aws-sdk-ec2, against moto
//! and the simulator. What moto does not model runs against the simulator
//! only (`sim_only_*`). docs/testing.md lists where moto and EC2 differ.

use std::fmt::Debug;
use std::time::{Duration, SystemTime};

use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::primitives::DateTime;
use aws_sdk_ec2::types::{
    Filter, Image, ImageAttributeName, ImageState, LaunchPermission, LaunchPermissionModifications,
    ResourceType, Tag, TagSpecification,
};
use ec2_sim::{FaultKind, FaultRule, Permission, SeedImage, Trigger};

use crate::ec2peer::{
    ACCOUNT, ClientOptions, Peer, PeerEnv, describe_image, error_code, seed_image, unique,
    wait_for_state,
};

const SOURCE: &str = "us-east-1";
const DEST: &str = "eu-west-1";
const OTHER_ACCOUNT: &str = "210987654321";
const WAIT: Duration = Duration::from_secs(20);

/// Runs each scenario against both peers: `<scenario>::moto` and `<scenario>::sim`.
macro_rules! against_both {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use crate::ec2peer::Peer;

            #[tokio::test]
            async fn moto() {
                super::$scenario(Peer::Moto).await;
            }

            #[tokio::test]
            async fn sim() {
                super::$scenario(Peer::Sim).await;
            }
        }
    )*};
}

against_both!(
    seeded_image_is_described,
    copy_lands_in_the_destination_region,
    describe_filters_by_tag_name_state_and_owner,
    tags_are_created_and_deleted,
    deregistered_image_disappears,
    snapshot_in_use_cannot_be_deleted,
    bad_ids_have_ec2_error_codes,
    launch_permissions_round_trip,
    disabled_image_is_enabled_again,
    images_in_use_name_launch_templates_and_live_instances,
);

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

fn tag(key: &str, value: &str) -> Tag {
    Tag::builder().key(key).value(value).build()
}

fn tags_of(image: &Image) -> Vec<(String, String)> {
    let mut tags: Vec<(String, String)> = image
        .tags()
        .iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_string(),
                t.value().unwrap_or_default().to_string(),
            )
        })
        .collect();
    tags.sort();
    tags
}

fn root_snapshot(image: &Image) -> String {
    image
        .block_device_mappings()
        .iter()
        .find_map(|m| m.ebs()?.snapshot_id())
        .expect("an EBS-backed image has a root snapshot")
        .to_string()
}

async fn ids_matching(client: &Client, filters: Vec<Filter>, owners: &[&str]) -> Vec<String> {
    let mut request = client.describe_images().set_filters(Some(filters));
    for owner in owners {
        request = request.owners(*owner);
    }
    let mut ids: Vec<String> = request
        .send()
        .await
        .expect("DescribeImages")
        .images()
        .iter()
        .filter_map(|i| i.image_id().map(str::to_string))
        .collect();
    ids.sort();
    ids
}

/// The error code of a call that must fail.
fn failure_code<T: Debug, E: ProvideErrorMetadata + Debug, R: Debug>(
    result: Result<T, SdkError<E, R>>,
) -> Option<String> {
    error_code(&result.expect_err("the call fails"))
}

async fn copy(client: &Client, source_id: &str, name: &str) -> String {
    client
        .copy_image()
        .source_region(SOURCE)
        .source_image_id(source_id)
        .name(name)
        .send()
        .await
        .expect("CopyImage")
        .image_id()
        .expect("image id")
        .to_string()
}

async fn seeded_image_is_described(peer: Peer) {
    let env = PeerEnv::start(peer).await;
    let ec2 = env.client(SOURCE);
    let name = unique("seeded");
    let seeded = seed_image(&ec2, SOURCE, &name, &[("suite", "conformance")]).await;
    let image = describe_image(&ec2, &seeded.image_id)
        .await
        .expect("the image is described");
    assert_eq!(image.image_id(), Some(seeded.image_id.as_str()));
    assert_eq!(image.name(), Some(name.as_str()));
    assert_eq!(image.description(), Some(format!("seeded {name}").as_str()));
    assert_eq!(image.state(), Some(&ImageState::Available));
    assert_eq!(image.owner_id(), Some(ACCOUNT));
    assert_eq!(image.public(), Some(false));
    assert_eq!(
        tags_of(&image),
        [("suite".to_string(), "conformance".to_string())]
    );
    // Both report a root snapshot that DescribeSnapshots knows.
    let snapshot = root_snapshot(&image);
    let out = ec2
        .describe_snapshots()
        .snapshot_ids(&snapshot)
        .send()
        .await
        .expect("DescribeSnapshots");
    assert_eq!(out.snapshots().len(), 1);
    assert_eq!(out.snapshots()[0].owner_id(), Some(ACCOUNT));
    // And the snapshot the test made exists too.
    let out = ec2
        .describe_snapshots()
        .snapshot_ids(&seeded.snapshot_id)
        .send()
        .await
        .expect("DescribeSnapshots");
    assert_eq!(out.snapshots().len(), 1);
    assert_eq!(
        out.snapshots()[0].volume_id(),
        Some(seeded.volume_id.as_str())
    );
}

async fn copy_lands_in_the_destination_region(peer: Peer) {
    let env = PeerEnv::start(peer).await;
    let source = env.client(SOURCE);
    let dest = env.client(DEST);
    let seeded = seed_image(&source, SOURCE, &unique("src"), &[]).await;
    let name = unique("copy");
    let copy_id = dest
        .copy_image()
        .source_region(SOURCE)
        .source_image_id(&seeded.image_id)
        .name(&name)
        .description("copied by the conformance suite")
        .send()
        .await
        .expect("CopyImage")
        .image_id()
        .expect("image id")
        .to_string();
    assert_ne!(copy_id, seeded.image_id);
    assert!(copy_id.starts_with("ami-"), "{copy_id}");

    let image = wait_for_state(&dest, &copy_id, "available", WAIT).await;
    assert_eq!(image.name(), Some(name.as_str()));
    assert_eq!(image.description(), Some("copied by the conformance suite"));
    assert_eq!(image.owner_id(), Some(ACCOUNT));
    assert_ne!(root_snapshot(&image), seeded.snapshot_id);

    // The copy lives in the destination only.
    let err = source
        .describe_images()
        .image_ids(&copy_id)
        .send()
        .await
        .expect_err("the copy is not in the source region");
    assert_eq!(error_code(&err).as_deref(), Some("InvalidAMIID.NotFound"));
    let err = dest
        .describe_images()
        .image_ids(&seeded.image_id)
        .send()
        .await
        .expect_err("the source is not in the destination region");
    assert_eq!(error_code(&err).as_deref(), Some("InvalidAMIID.NotFound"));
}

async fn describe_filters_by_tag_name_state_and_owner(peer: Peer) {
    let env = PeerEnv::start(peer).await;
    let ec2 = env.client(SOURCE);
    let run = unique("run");
    let web_name = format!("{run}-web");
    let db_name = format!("{run}-db");
    let web = seed_image(&ec2, SOURCE, &web_name, &[("run", &run), ("role", "web")]).await;
    let db = seed_image(&ec2, SOURCE, &db_name, &[("run", &run), ("role", "db")]).await;
    let mut both = vec![web.image_id.clone(), db.image_id.clone()];
    both.sort();

    assert_eq!(
        ids_matching(&ec2, vec![filter("tag:run", &run)], &[]).await,
        both
    );
    assert_eq!(
        ids_matching(
            &ec2,
            vec![filter("tag:run", &run), filter("tag:role", "web")],
            &[]
        )
        .await,
        [web.image_id.as_str()]
    );
    assert_eq!(
        ids_matching(&ec2, vec![filter("name", &format!("{run}-d?"))], &[]).await,
        [db.image_id.as_str()]
    );
    assert_eq!(
        ids_matching(&ec2, vec![filter("name", &format!("{run}-*"))], &[]).await,
        both
    );
    assert_eq!(
        ids_matching(&ec2, vec![filter("image-id", &web.image_id)], &[]).await,
        [web.image_id.as_str()]
    );
    assert_eq!(
        ids_matching(
            &ec2,
            vec![filter("tag:run", &run), filter("state", "available")],
            &["self"]
        )
        .await,
        both
    );
    assert_eq!(
        ids_matching(&ec2, vec![filter("tag:run", &run)], &[ACCOUNT]).await,
        both
    );
    assert!(
        ids_matching(&ec2, vec![filter("tag:run", &run)], &[OTHER_ACCOUNT])
            .await
            .is_empty()
    );
    assert!(
        ids_matching(
            &ec2,
            vec![filter("tag:run", &run), filter("state", "pending")],
            &[]
        )
        .await
        .is_empty()
    );
    assert!(
        ids_matching(&ec2, vec![filter("tag-key", "run")], &["self"])
            .await
            .contains(&web.image_id)
    );
    // Nothing leaks across regions.
    assert!(
        ids_matching(&env.client(DEST), vec![filter("tag:run", &run)], &[])
            .await
            .is_empty()
    );
}

async fn tags_are_created_and_deleted(peer: Peer) {
    let env = PeerEnv::start(peer).await;
    let ec2 = env.client(SOURCE);
    let seeded = seed_image(&ec2, SOURCE, &unique("tags"), &[]).await;
    ec2.create_tags()
        .resources(&seeded.image_id)
        .resources(&seeded.snapshot_id)
        .tags(tag("team", "imaging"))
        .tags(tag("stage", "test"))
        .send()
        .await
        .expect("CreateTags");
    let image = describe_image(&ec2, &seeded.image_id).await.unwrap();
    assert_eq!(
        tags_of(&image),
        [
            ("stage".to_string(), "test".to_string()),
            ("team".to_string(), "imaging".to_string())
        ]
    );
    let snapshots = ec2
        .describe_snapshots()
        .filters(filter("tag:team", "imaging"))
        .filters(filter("snapshot-id", &seeded.snapshot_id))
        .send()
        .await
        .expect("DescribeSnapshots");
    assert_eq!(snapshots.snapshots().len(), 1);

    // Overwrite a value, delete by key, and a delete with the wrong value
    // leaves the tag alone.
    ec2.create_tags()
        .resources(&seeded.image_id)
        .tags(tag("team", "platform"))
        .send()
        .await
        .expect("CreateTags");
    ec2.delete_tags()
        .resources(&seeded.image_id)
        .tags(Tag::builder().key("stage").build())
        .send()
        .await
        .expect("DeleteTags");
    ec2.delete_tags()
        .resources(&seeded.image_id)
        .tags(tag("team", "not-the-value"))
        .send()
        .await
        .expect("DeleteTags");
    let image = describe_image(&ec2, &seeded.image_id).await.unwrap();
    assert_eq!(
        tags_of(&image),
        [("team".to_string(), "platform".to_string())]
    );
    ec2.delete_tags()
        .resources(&seeded.image_id)
        .tags(tag("team", "platform"))
        .send()
        .await
        .expect("DeleteTags");
    let image = describe_image(&ec2, &seeded.image_id).await.unwrap();
    assert!(tags_of(&image).is_empty());
}

async fn deregistered_image_disappears(peer: Peer) {
    let env = PeerEnv::start(peer).await;
    let ec2 = env.client(SOURCE);
    let run = unique("dereg");
    let seeded = seed_image(&ec2, SOURCE, &run, &[("run", &run)]).await;
    ec2.deregister_image()
        .image_id(&seeded.image_id)
        .send()
        .await
        .expect("DeregisterImage");
    // By id: an empty list, not an error (EC2 too, for a while after).
    let out = ec2
        .describe_images()
        .image_ids(&seeded.image_id)
        .send()
        .await
        .expect("DescribeImages of a deregistered id");
    assert!(out.images().is_empty(), "{:?}", out.images());
    assert!(
        ids_matching(&ec2, vec![filter("tag:run", &run)], &[])
            .await
            .is_empty()
    );
    let err = ec2
        .deregister_image()
        .image_id(&seeded.image_id)
        .send()
        .await
        .expect_err("a second deregistration fails");
    assert_eq!(
        error_code(&err).as_deref(),
        Some("InvalidAMIID.Unavailable")
    );
}

async fn snapshot_in_use_cannot_be_deleted(peer: Peer) {
    let env = PeerEnv::start(peer).await;
    let ec2 = env.client(SOURCE);
    let seeded = seed_image(&ec2, SOURCE, &unique("inuse"), &[]).await;
    let image = describe_image(&ec2, &seeded.image_id).await.unwrap();
    let snapshot = root_snapshot(&image);
    let err = ec2
        .delete_snapshot()
        .snapshot_id(&snapshot)
        .send()
        .await
        .expect_err("the image still uses its snapshot");
    assert_eq!(error_code(&err).as_deref(), Some("InvalidSnapshot.InUse"));

    ec2.deregister_image()
        .image_id(&seeded.image_id)
        .send()
        .await
        .expect("DeregisterImage");
    ec2.delete_snapshot()
        .snapshot_id(&snapshot)
        .send()
        .await
        .expect("DeleteSnapshot once the image is gone");
    let err = ec2
        .delete_snapshot()
        .snapshot_id(&snapshot)
        .send()
        .await
        .expect_err("already deleted");
    assert_eq!(
        error_code(&err).as_deref(),
        Some("InvalidSnapshot.NotFound")
    );
    let err = ec2
        .describe_snapshots()
        .snapshot_ids(&snapshot)
        .send()
        .await
        .expect_err("deleted snapshots are not described");
    assert_eq!(
        error_code(&err).as_deref(),
        Some("InvalidSnapshot.NotFound")
    );
}

async fn bad_ids_have_ec2_error_codes(peer: Peer) {
    let env = PeerEnv::start(peer).await;
    let ec2 = env.client(DEST);
    let missing = "ami-0123456789abcdef0";

    let r = ec2.describe_images().image_ids(missing).send().await;
    assert_eq!(failure_code(r).as_deref(), Some("InvalidAMIID.NotFound"));
    let r = ec2.describe_images().image_ids("bogus").send().await;
    assert_eq!(failure_code(r).as_deref(), Some("InvalidAMIID.Malformed"));
    let r = ec2
        .copy_image()
        .source_region(SOURCE)
        .source_image_id(missing)
        .name(unique("nope"))
        .send()
        .await;
    assert_eq!(failure_code(r).as_deref(), Some("InvalidAMIID.NotFound"));
    let r = ec2
        .copy_image()
        .source_region(SOURCE)
        .source_image_id("bogus")
        .name(unique("nope"))
        .send()
        .await;
    assert_eq!(failure_code(r).as_deref(), Some("InvalidAMIID.Malformed"));
    let r = ec2.deregister_image().image_id(missing).send().await;
    assert_eq!(failure_code(r).as_deref(), Some("InvalidAMIID.NotFound"));
    let r = ec2
        .describe_snapshots()
        .snapshot_ids("snap-0123456789abcdef0")
        .send()
        .await;
    assert_eq!(failure_code(r).as_deref(), Some("InvalidSnapshot.NotFound"));
    let r = ec2
        .delete_snapshot()
        .snapshot_id("snap-0123456789abcdef0")
        .send()
        .await;
    assert_eq!(failure_code(r).as_deref(), Some("InvalidSnapshot.NotFound"));
}

async fn launch_permissions_round_trip(peer: Peer) {
    let env = PeerEnv::start(peer).await;
    let ec2 = env.client(SOURCE);
    let seeded = seed_image(&ec2, SOURCE, &unique("perm"), &[]).await;
    let grant = |p: LaunchPermission| LaunchPermissionModifications::builder().add(p).build();
    let revoke = |p: LaunchPermission| LaunchPermissionModifications::builder().remove(p).build();
    let user = LaunchPermission::builder().user_id(OTHER_ACCOUNT).build();
    let everyone = LaunchPermission::builder()
        .group(aws_sdk_ec2::types::PermissionGroup::All)
        .build();
    let modify = |change| {
        ec2.modify_image_attribute()
            .image_id(&seeded.image_id)
            .launch_permission(change)
            .send()
    };
    modify(grant(user.clone()))
        .await
        .expect("share with a user");
    let users =
        |out: &aws_sdk_ec2::operation::describe_image_attribute::DescribeImageAttributeOutput| {
            out.launch_permissions()
                .iter()
                .filter_map(|p| p.user_id().map(str::to_string))
                .collect::<Vec<_>>()
        };
    let attribute = ec2
        .describe_image_attribute()
        .image_id(&seeded.image_id)
        .attribute(ImageAttributeName::LaunchPermission)
        .send()
        .await
        .expect("DescribeImageAttribute");
    assert_eq!(users(&attribute), [OTHER_ACCOUNT]);

    modify(grant(everyone.clone())).await.expect("make public");
    let image = describe_image(&ec2, &seeded.image_id).await.unwrap();
    assert_eq!(image.public(), Some(true));
    modify(revoke(everyone)).await.expect("make private");
    modify(revoke(user)).await.expect("unshare");
    let image = describe_image(&ec2, &seeded.image_id).await.unwrap();
    assert_eq!(image.public(), Some(false));
    let attribute = ec2
        .describe_image_attribute()
        .image_id(&seeded.image_id)
        .attribute(ImageAttributeName::LaunchPermission)
        .send()
        .await
        .expect("DescribeImageAttribute");
    assert!(users(&attribute).is_empty());

    let err = modify(grant(LaunchPermission::builder().user_id("12345").build()))
        .await
        .expect_err("user ids have 12 digits");
    assert_eq!(
        error_code(&err).as_deref(),
        Some("InvalidAMIAttributeItemValue")
    );
}

// ---- Simulator only: behaviour moto does not model. ----

async fn sim_env() -> PeerEnv {
    PeerEnv::start(Peer::Sim).await
}

#[tokio::test]
async fn sim_only_copy_is_pending_then_available() {
    let env = sim_env().await;
    env.sim().set_copy_duration(Duration::from_secs(3600));
    let source = env.client(SOURCE);
    let dest = env.client(DEST);
    let seeded = seed_image(&source, SOURCE, &unique("src"), &[]).await;
    let copy_id = copy(&dest, &seeded.image_id, &unique("copy")).await;

    let image = describe_image(&dest, &copy_id).await.unwrap();
    assert_eq!(image.state(), Some(&ImageState::Pending));
    assert_eq!(image.source_image_id(), Some(seeded.image_id.as_str()));
    assert_eq!(image.source_image_region(), Some(SOURCE));
    let snapshot = root_snapshot(&image);
    let status = |ec2: Client, id: String| async move {
        ec2.describe_snapshots()
            .snapshot_ids(id)
            .send()
            .await
            .unwrap()
            .snapshots()[0]
            .state()
            .map(|s| s.as_str().to_string())
    };
    assert_eq!(
        status(dest.clone(), snapshot.clone()).await.as_deref(),
        Some("pending")
    );

    env.sim().advance(Duration::from_secs(3600));
    let image = describe_image(&dest, &copy_id).await.unwrap();
    assert_eq!(image.state(), Some(&ImageState::Available));
    assert_eq!(status(dest, snapshot).await.as_deref(), Some("completed"));
    assert_eq!(env.sim().call_count("CopyImage", DEST), 1);
    assert_eq!(env.sim().call_count("CopyImage", SOURCE), 0);
}

#[tokio::test]
async fn sim_only_failed_copy_has_a_state_reason() {
    let env = sim_env().await;
    env.sim().add_fault(
        FaultRule::new(FaultKind::copy_failure(), Trigger::Next { count: 1 }).in_region(DEST),
    );
    let source = env.client(SOURCE);
    let dest = env.client(DEST);
    let seeded = seed_image(&source, SOURCE, &unique("src"), &[]).await;
    let doomed = copy(&dest, &seeded.image_id, &unique("doomed")).await;
    let fine = copy(&dest, &seeded.image_id, &unique("fine")).await;
    env.sim().finish_copies();

    let image = describe_image(&dest, &doomed).await.unwrap();
    assert_eq!(image.state(), Some(&ImageState::Failed));
    let reason = image.state_reason().expect("a failed image says why");
    assert_eq!(reason.code(), Some("Server.InternalError"));
    assert!(reason.message().is_some());
    let image = describe_image(&dest, &fine).await.unwrap();
    assert_eq!(image.state(), Some(&ImageState::Available));
}

#[tokio::test]
async fn sim_only_client_token_makes_copy_idempotent() {
    let env = sim_env().await;
    let source = env.client(SOURCE);
    let dest = env.client(DEST);
    let seeded = seed_image(&source, SOURCE, &unique("src"), &[]).await;
    let name = unique("idem");
    let request = |name: String| {
        dest.copy_image()
            .source_region(SOURCE)
            .source_image_id(&seeded.image_id)
            .name(name)
            .client_token("uid-1234/eu-west-1")
            .send()
    };
    let first = request(name.clone()).await.unwrap().image_id.unwrap();
    let again = request(name.clone()).await.unwrap().image_id.unwrap();
    assert_eq!(first, again);
    env.sim().finish_copies();
    let after = request(name).await.unwrap().image_id.unwrap();
    assert_eq!(first, after, "still the same copy after it completed");

    let err = request(unique("other-name"))
        .await
        .expect_err("same token, different parameters");
    assert_eq!(
        error_code(&err).as_deref(),
        Some("IdempotentParameterMismatch")
    );
    let copies = ids_matching(
        &dest,
        vec![filter("source-image-id", &seeded.image_id)],
        &[],
    )
    .await;
    assert_eq!(copies, [first]);
}

#[tokio::test]
async fn sim_only_names_are_checked() {
    let env = sim_env().await;
    let source = env.client(SOURCE);
    let dest = env.client(DEST);
    let seeded = seed_image(&source, SOURCE, &unique("src"), &[]).await;
    let name = unique("dup");
    copy(&dest, &seeded.image_id, &name).await;
    for (bad, expected) in [
        (name.as_str(), "InvalidAMIName.Duplicate"),
        ("ab", "InvalidAMIName.Malformed"),
        ("no*stars", "InvalidAMIName.Malformed"),
    ] {
        let err = dest
            .copy_image()
            .source_region(SOURCE)
            .source_image_id(&seeded.image_id)
            .name(bad)
            .send()
            .await
            .expect_err(bad);
        assert_eq!(error_code(&err).as_deref(), Some(expected), "{bad}");
    }
}

#[tokio::test]
async fn sim_only_encryption_on_copy() {
    let env = sim_env().await;
    let source = env.client(SOURCE);
    let dest = env.client(DEST);
    let seeded = seed_image(&source, SOURCE, &unique("src"), &[]).await;

    let copy_id = dest
        .copy_image()
        .source_region(SOURCE)
        .source_image_id(&seeded.image_id)
        .name(unique("enc"))
        .encrypted(true)
        .kms_key_id("alias/aws/ebs")
        .send()
        .await
        .unwrap()
        .image_id
        .unwrap();
    let image = describe_image(&dest, &copy_id).await.unwrap();
    let ebs = image.block_device_mappings()[0].ebs().unwrap();
    assert_eq!(ebs.encrypted(), Some(true));
    let key = ebs.kms_key_id().expect("the key is reported");
    assert!(
        key.starts_with(&format!("arn:aws:kms:{DEST}:{ACCOUNT}:key/")),
        "{key}"
    );
    let snapshot = dest
        .describe_snapshots()
        .snapshot_ids(root_snapshot(&image))
        .send()
        .await
        .unwrap();
    assert_eq!(snapshot.snapshots()[0].encrypted(), Some(true));
    assert_eq!(snapshot.snapshots()[0].kms_key_id(), Some(key));

    let plain = copy(&dest, &seeded.image_id, &unique("plain")).await;
    let image = describe_image(&dest, &plain).await.unwrap();
    assert_eq!(
        image.block_device_mappings()[0].ebs().unwrap().encrypted(),
        Some(false)
    );

    let err = dest
        .copy_image()
        .source_region(SOURCE)
        .source_image_id(&seeded.image_id)
        .name(unique("wrong-key"))
        .encrypted(true)
        .kms_key_id(format!(
            "arn:aws:kms:{SOURCE}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
        ))
        .send()
        .await
        .expect_err("a key from another region");
    assert_eq!(error_code(&err).as_deref(), Some("InvalidParameterValue"));
    let message = err
        .as_service_error()
        .and_then(|e| e.message().map(str::to_string));
    assert!(message.unwrap_or_default().contains(SOURCE));

    env.sim()
        .set_encryption_by_default(ACCOUNT, "eu-west-2", true);
    let by_default = copy(&env.client("eu-west-2"), &seeded.image_id, &unique("dflt")).await;
    let image = describe_image(&env.client("eu-west-2"), &by_default)
        .await
        .unwrap();
    assert_eq!(
        image.block_device_mappings()[0].ebs().unwrap().encrypted(),
        Some(true)
    );
}

#[tokio::test]
async fn sim_only_unusual_sources() {
    let env = sim_env().await;
    let dest = env.client(DEST);
    let sim = env.sim();
    let store = sim.seed_image(SeedImage {
        root_device_type: "instance-store".to_string(),
        image_location: Some("my-bucket/image.manifest.xml".to_string()),
        ..SeedImage::new(SOURCE, unique("store"))
    });
    let err = dest
        .copy_image()
        .source_region(SOURCE)
        .source_image_id(&store)
        .name(unique("store-copy"))
        .encrypted(true)
        .send()
        .await
        .expect_err("instance store images cannot be encrypted");
    assert_eq!(
        error_code(&err).as_deref(),
        Some("InvalidParameterCombination")
    );

    let private = sim.seed_image(SeedImage {
        owner: Some(OTHER_ACCOUNT.to_string()),
        ..SeedImage::new(SOURCE, unique("theirs"))
    });
    let err = dest
        .copy_image()
        .source_region(SOURCE)
        .source_image_id(&private)
        .name(unique("x"))
        .send()
        .await
        .expect_err("not shared with us");
    assert_eq!(error_code(&err).as_deref(), Some("InvalidAMIID.NotFound"));

    let shared = sim.seed_image(SeedImage {
        owner: Some(OTHER_ACCOUNT.to_string()),
        launch_permissions: vec![Permission::UserId(ACCOUNT.to_string())],
        encrypted: true,
        ..SeedImage::new(SOURCE, unique("shared"))
    });
    let copy_id = copy(&dest, &shared, &unique("ours")).await;
    assert_eq!(sim.image(&copy_id).unwrap().owner, ACCOUNT);

    let billed = sim.seed_image(SeedImage {
        owner: Some(OTHER_ACCOUNT.to_string()),
        launch_permissions: vec![Permission::Group("all".to_string())],
        billing_products: vec!["bp-6ba54002".to_string()],
        ..SeedImage::new(SOURCE, unique("billed"))
    });
    let err = dest
        .copy_image()
        .source_region(SOURCE)
        .source_image_id(&billed)
        .name(unique("x"))
        .send()
        .await
        .expect_err("billing products stay with their account");
    assert_eq!(error_code(&err).as_deref(), Some("InvalidRequest"));
}

#[tokio::test]
async fn sim_only_tags_on_copy() {
    let env = sim_env().await;
    let source = env.client(SOURCE);
    let dest = env.client(DEST);
    let seeded = seed_image(
        &source,
        SOURCE,
        &unique("src"),
        &[("team", "imaging"), ("os", "linux")],
    )
    .await;
    let spec = |resource: ResourceType, key: &str, value: &str| {
        TagSpecification::builder()
            .resource_type(resource)
            .tags(tag(key, value))
            .build()
    };
    let copy_id = dest
        .copy_image()
        .source_region(SOURCE)
        .source_image_id(&seeded.image_id)
        .name(unique("tagged"))
        .copy_image_tags(true)
        .tag_specifications(spec(ResourceType::Image, "team", "copier"))
        .tag_specifications(spec(ResourceType::Snapshot, "owner", "amicopy"))
        .send()
        .await
        .unwrap()
        .image_id
        .unwrap();
    let image = describe_image(&dest, &copy_id).await.unwrap();
    assert_eq!(
        tags_of(&image),
        [
            ("os".to_string(), "linux".to_string()),
            ("team".to_string(), "copier".to_string())
        ]
    );
    let snapshots = dest
        .describe_snapshots()
        .filters(filter("tag:owner", "amicopy"))
        .send()
        .await
        .unwrap();
    assert_eq!(snapshots.snapshots().len(), 1);
    assert_eq!(
        snapshots.snapshots()[0].snapshot_id(),
        Some(root_snapshot(&image).as_str())
    );

    let plain = copy(&dest, &seeded.image_id, &unique("untagged")).await;
    let image = describe_image(&dest, &plain).await.unwrap();
    assert!(
        tags_of(&image).is_empty(),
        "tags are copied only on request"
    );
}

#[tokio::test]
async fn sim_only_concurrent_copy_limit() {
    let env = sim_env().await;
    env.sim().set_copy_duration(Duration::from_secs(3600));
    env.sim().set_concurrent_copy_limit(2);
    let source = env.client(SOURCE);
    let dest = env.client(DEST);
    let seeded = seed_image(&source, SOURCE, &unique("src"), &[]).await;
    copy(&dest, &seeded.image_id, &unique("a")).await;
    copy(&dest, &seeded.image_id, &unique("b")).await;
    let err = dest
        .copy_image()
        .source_region(SOURCE)
        .source_image_id(&seeded.image_id)
        .name(unique("c"))
        .send()
        .await
        .expect_err("over the limit");
    assert_eq!(error_code(&err).as_deref(), Some("ResourceLimitExceeded"));
    copy(&env.client("eu-west-2"), &seeded.image_id, &unique("c")).await;
    env.sim().finish_copies();
    copy(&dest, &seeded.image_id, &unique("c")).await;
}

#[tokio::test]
async fn sim_only_throttling_is_retried_by_the_sdk() {
    let env = sim_env().await;
    let sim = env.sim();
    sim.add_fault(
        FaultRule::new(FaultKind::Throttle, Trigger::Next { count: 2 })
            .in_region(DEST)
            .for_action("DescribeImages"),
    );
    let out = env
        .client(DEST)
        .describe_images()
        .owners("self")
        .send()
        .await
        .expect("three attempts get through two throttles");
    assert!(out.images().is_empty());
    assert_eq!(sim.call_count("DescribeImages", DEST), 3);
    let throttled = sim
        .calls()
        .into_iter()
        .find(|c| c.action == "DescribeImages" && c.outcome == "RequestLimitExceeded")
        .map(|c| c.count);
    assert_eq!(throttled, Some(2));

    sim.add_fault(FaultRule::new(FaultKind::Throttle, Trigger::Always).in_region(DEST));
    let once = ClientOptions {
        max_attempts: 1,
        ..ClientOptions::default()
    };
    let err = env
        .client_with(DEST, &once)
        .describe_images()
        .owners("self")
        .send()
        .await
        .expect_err("throttled");
    assert_eq!(error_code(&err).as_deref(), Some("RequestLimitExceeded"));
    env.client(SOURCE)
        .describe_images()
        .owners("self")
        .send()
        .await
        .expect("other regions are not throttled");
}

#[tokio::test]
async fn sim_only_server_errors_latency_and_dropped_connections() {
    let env = sim_env().await;
    let sim = env.sim();
    let once = ClientOptions {
        max_attempts: 1,
        ..ClientOptions::default()
    };
    let ec2 = env.client_with(SOURCE, &once);
    for (kind, code) in [
        (FaultKind::InternalError, "InternalError"),
        (FaultKind::Unavailable, "Unavailable"),
    ] {
        sim.add_fault(FaultRule::new(kind, Trigger::Next { count: 1 }));
        let err = ec2
            .describe_images()
            .owners("self")
            .send()
            .await
            .expect_err(code);
        assert_eq!(error_code(&err).as_deref(), Some(code));
    }

    sim.add_fault(FaultRule::new(
        FaultKind::DropConnection,
        Trigger::Next { count: 1 },
    ));
    let err = ec2
        .describe_images()
        .owners("self")
        .send()
        .await
        .expect_err("no answer");
    assert!(err.as_service_error().is_none(), "{err:?}");
    sim.add_fault(FaultRule::new(
        FaultKind::DropConnection,
        Trigger::Next { count: 1 },
    ));
    env.client(SOURCE)
        .describe_images()
        .owners("self")
        .send()
        .await
        .expect("the SDK retries a dropped connection");

    sim.add_fault(FaultRule::new(
        FaultKind::Latency {
            delay: Duration::from_millis(300),
        },
        Trigger::Next { count: 1 },
    ));
    let started = std::time::Instant::now();
    ec2.describe_images().owners("self").send().await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn sim_only_requests_are_authenticated() {
    let env = sim_env().await;
    let wrong_secret = ClientOptions {
        secret_access_key: "not-the-secret".to_string(),
        max_attempts: 1,
        ..ClientOptions::default()
    };
    let err = env
        .client_with(SOURCE, &wrong_secret)
        .describe_images()
        .send()
        .await
        .expect_err("bad signature");
    assert_eq!(error_code(&err).as_deref(), Some("SignatureDoesNotMatch"));
    let err = crate::ec2peer::client(env.endpoint(), "xx-nowhere-1")
        .describe_images()
        .send()
        .await
        .expect_err("unknown region");
    assert_eq!(error_code(&err).as_deref(), Some("AuthFailure"));
}

#[tokio::test]
async fn sim_only_pagination_and_id_restrictions() {
    let env = sim_env().await;
    let ec2 = env.client(SOURCE);
    let run = unique("page");
    for i in 0..5 {
        seed_image(&ec2, SOURCE, &format!("{run}-{i}"), &[("run", &run)]).await;
    }
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut token = None;
    loop {
        let out = ec2
            .describe_images()
            .filters(filter("tag:run", &run))
            .max_results(2)
            .set_next_token(token)
            .send()
            .await
            .unwrap();
        pages += 1;
        seen.extend(out.images().iter().filter_map(|i| i.image_id.clone()));
        token = out.next_token;
        if token.is_none() {
            break;
        }
    }
    assert_eq!((seen.len(), pages), (5, 3));
    let err = ec2
        .describe_images()
        .image_ids(&seen[0])
        .max_results(5)
        .send()
        .await
        .expect_err("ImageIds and MaxResults do not mix");
    assert_eq!(
        error_code(&err).as_deref(),
        Some("InvalidParameterCombination")
    );
    let err = ec2
        .describe_images()
        .image_ids(&seen[0])
        .image_ids("ami-0123456789abcdef0")
        .send()
        .await
        .expect_err("one missing id fails the call");
    assert_eq!(error_code(&err).as_deref(), Some("InvalidAMIID.NotFound"));
}

#[tokio::test]
async fn sim_only_deregistration_details() {
    let env = sim_env().await;
    env.sim().set_copy_duration(Duration::from_secs(3600));
    let source = env.client(SOURCE);
    let dest = env.client(DEST);
    let seeded = seed_image(&source, SOURCE, &unique("src"), &[]).await;

    // Deregistering a copy in flight stops it and drops its snapshot.
    let copy_id = copy(&dest, &seeded.image_id, &unique("stopped")).await;
    let copy_snapshot = root_snapshot(&describe_image(&dest, &copy_id).await.unwrap());
    dest.deregister_image()
        .image_id(&copy_id)
        .send()
        .await
        .unwrap();
    env.sim().finish_copies();
    assert!(describe_image(&dest, &copy_id).await.is_none());
    let err = dest
        .describe_snapshots()
        .snapshot_ids(&copy_snapshot)
        .send()
        .await
        .expect_err("the half-made snapshot is gone");
    assert_eq!(
        error_code(&err).as_deref(),
        Some("InvalidSnapshot.NotFound")
    );

    // DeleteAssociatedSnapshots takes the snapshots along.
    let out = source
        .deregister_image()
        .image_id(&seeded.image_id)
        .delete_associated_snapshots(true)
        .send()
        .await
        .unwrap();
    let results = out.delete_snapshot_results();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].snapshot_id(), Some(seeded.snapshot_id.as_str()));
    assert_eq!(
        results[0].return_code().map(|c| c.as_str()),
        Some("success")
    );
    let err = source
        .describe_snapshots()
        .snapshot_ids(&seeded.snapshot_id)
        .send()
        .await
        .expect_err("deleted with the image");
    assert_eq!(
        error_code(&err).as_deref(),
        Some("InvalidSnapshot.NotFound")
    );
}

#[tokio::test]
async fn sim_only_deprecation_and_description() {
    let env = sim_env().await;
    let ec2 = env.client(SOURCE);
    let seeded = seed_image(&ec2, SOURCE, &unique("old"), &[]).await;
    let at = SystemTime::now() + Duration::from_secs(7 * 24 * 3600);
    ec2.enable_image_deprecation()
        .image_id(&seeded.image_id)
        .deprecate_at(DateTime::from(at))
        .send()
        .await
        .expect("EnableImageDeprecation");
    let image = describe_image(&ec2, &seeded.image_id).await.unwrap();
    let when = image.deprecation_time().expect("deprecation time is shown");
    assert!(when.ends_with(":00.000Z"), "rounded to the minute: {when}");

    ec2.modify_image_attribute()
        .image_id(&seeded.image_id)
        .description(
            aws_sdk_ec2::types::AttributeValue::builder()
                .value("new words")
                .build(),
        )
        .send()
        .await
        .expect("ModifyImageAttribute description");
    let out = ec2
        .describe_image_attribute()
        .image_id(&seeded.image_id)
        .attribute(ImageAttributeName::Description)
        .send()
        .await
        .unwrap();
    assert_eq!(out.description().and_then(|d| d.value()), Some("new words"));
}

/// DisableImage makes an image `disabled` (still described with
/// IncludeDisabled), EnableImage makes it `available` again.
async fn disabled_image_is_enabled_again(peer: Peer) {
    let env = PeerEnv::start(peer).await;
    let ec2 = env.client(SOURCE);
    let seeded = seed_image(&ec2, SOURCE, &unique("disable"), &[]).await;
    ec2.disable_image()
        .image_id(&seeded.image_id)
        .send()
        .await
        .expect("DisableImage");
    let out = ec2
        .describe_images()
        .image_ids(&seeded.image_id)
        .include_disabled(true)
        .send()
        .await
        .expect("DescribeImages");
    assert_eq!(out.images()[0].state(), Some(&ImageState::Disabled));
    ec2.enable_image()
        .image_id(&seeded.image_id)
        .send()
        .await
        .expect("EnableImage");
    let image = describe_image(&ec2, &seeded.image_id)
        .await
        .expect("described");
    assert_eq!(image.state(), Some(&ImageState::Available));
}

/// The operator's look-up of what uses its copies (`Ec2::images_in_use`):
/// the `$Default`/`$Latest` launch template versions and the live instances
/// of each image, and nothing once they move on. moto ignores the look-up's
/// `image-id` filter on launch template versions; the operator matches the
/// images again itself, so the answer is the same.
async fn images_in_use_name_launch_templates_and_live_instances(peer: Peer) {
    use ami_copy_operator::ec2::{AwsEc2, Ec2, Scope};
    use aws_sdk_ec2::types::{InstanceType, RequestLaunchTemplateData};

    let env = PeerEnv::start(peer).await;
    let ec2 = env.client(SOURCE);
    let [a, b, c] = [
        seed_image(&ec2, SOURCE, &unique("in-use-a"), &[]).await,
        seed_image(&ec2, SOURCE, &unique("in-use-b"), &[]).await,
        seed_image(&ec2, SOURCE, &unique("in-use-c"), &[]).await,
    ]
    .map(|s| s.image_id);
    let template = ec2
        .create_launch_template()
        .launch_template_name(unique("in-use"))
        .launch_template_data(RequestLaunchTemplateData::builder().image_id(&a).build())
        .send()
        .await
        .expect("CreateLaunchTemplate")
        .launch_template()
        .and_then(|t| t.launch_template_id())
        .expect("a launch template ID")
        .to_owned();
    let instance = ec2
        .run_instances()
        .image_id(&b)
        .instance_type(InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .expect("RunInstances")
        .instances()[0]
        .instance_id()
        .expect("an instance ID")
        .to_owned();
    let operator = AwsEc2::new(
        crate::testbed::sdk_config().await,
        Some(env.endpoint().to_owned()),
        std::sync::Arc::default(),
    );
    let scope = Scope::region(SOURCE);
    let ids = [a.clone(), b.clone(), c.clone()];
    let users = operator.images_in_use(&scope, &ids).await.expect("look-up");
    assert_eq!(
        users.get(&a),
        Some(&vec![format!("launch template {template} ($Default)")])
    );
    assert_eq!(
        users.get(&b),
        Some(&vec![format!("instance {instance} (running)")])
    );
    assert_eq!(users.get(&c), None, "nothing uses it");

    // The template's new default version uses c; the instance is gone.
    ec2.create_launch_template_version()
        .launch_template_id(&template)
        .launch_template_data(RequestLaunchTemplateData::builder().image_id(&c).build())
        .send()
        .await
        .expect("CreateLaunchTemplateVersion");
    ec2.modify_launch_template()
        .launch_template_id(&template)
        .default_version("2")
        .send()
        .await
        .expect("ModifyLaunchTemplate");
    ec2.terminate_instances()
        .instance_ids(&instance)
        .send()
        .await
        .expect("TerminateInstances");
    let users = operator.images_in_use(&scope, &ids).await.expect("look-up");
    assert_eq!(users.get(&a), None);
    assert_eq!(users.get(&b), None, "a terminated instance uses nothing");
    assert_eq!(
        users.get(&c),
        Some(&vec![format!("launch template {template} ($Default)")])
    );
    ec2.delete_launch_template()
        .launch_template_id(&template)
        .send()
        .await
        .expect("DeleteLaunchTemplate");
}

/// Deregistration protection: DeregisterImage is refused while it is on,
/// and works once it is off (without cooldown). moto does not model it.
#[tokio::test]
async fn sim_only_deregistration_protection() {
    let env = sim_env().await;
    let ec2 = env.client(SOURCE);
    let seeded = seed_image(&ec2, SOURCE, &unique("protected"), &[]).await;
    let id = seeded.image_id;
    ec2.enable_image_deregistration_protection()
        .image_id(&id)
        .send()
        .await
        .expect("EnableImageDeregistrationProtection");
    let image = describe_image(&ec2, &id).await.expect("described");
    assert_eq!(
        image.deregistration_protection(),
        Some("enabled-without-cooldown")
    );
    let refused = failure_code(ec2.deregister_image().image_id(&id).send().await);
    assert_eq!(refused.as_deref(), Some("OperationNotPermitted"));
    ec2.disable_image_deregistration_protection()
        .image_id(&id)
        .send()
        .await
        .expect("DisableImageDeregistrationProtection");
    ec2.deregister_image()
        .image_id(&id)
        .send()
        .await
        .expect("DeregisterImage once unprotected");
}
