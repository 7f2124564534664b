use std::time::Duration;

use time::macros::datetime;

use super::*;

const ME: &str = "111111111111";
const OTHER: &str = "222222222222";
const T0: OffsetDateTime = datetime!(2025-01-01 00:00 UTC);
const COPY: Duration = Duration::from_secs(60);

fn config() -> SimConfig {
    SimConfig {
        default_account: ME.to_string(),
        ..SimConfig::default()
    }
}

struct World {
    config: SimConfig,
    state: State,
}

fn caller(account: &str, region: &str) -> Caller {
    Caller {
        account: account.to_string(),
        region: region.to_string(),
    }
}

impl World {
    fn new() -> Self {
        Self {
            config: config(),
            state: State::new(7),
        }
    }

    fn seed(&mut self, seed: SeedImage) -> String {
        self.state.seed_image(&self.config, seed, T0)
    }

    fn copy_as(&mut self, account: &str, region: &str, req: CopyImage) -> ApiResult<String> {
        let caller = caller(account, region);
        let ctx = Ctx {
            config: &self.config,
            caller: &caller,
            now: T0,
        };
        self.state.copy_image(&ctx, req, COPY, &mut || None)
    }

    fn copy(&mut self, region: &str, req: CopyImage) -> ApiResult<String> {
        self.copy_as(ME, region, req)
    }

    fn describe(&self, region: &str, query: ImageQuery) -> ApiResult<Vec<String>> {
        let caller = caller(ME, region);
        let ctx = Ctx {
            config: &self.config,
            caller: &caller,
            now: T0,
        };
        let (images, _) = self.state.describe_images(&ctx, &query)?;
        Ok(images.iter().map(|i| i.id.clone()).collect())
    }

    fn image(&self, id: &str) -> &Image {
        &self.state.images[id]
    }

    fn root(&self, id: &str) -> &EbsDevice {
        self.image(id).block_devices[0].ebs.as_ref().unwrap()
    }
}

fn copy_of(source: &str, name: &str) -> CopyImage {
    CopyImage {
        source_region: "us-east-1".to_string(),
        source_image_id: source.to_string(),
        name: name.to_string(),
        ..CopyImage::default()
    }
}

#[test]
fn a_copy_is_pending_in_the_destination_then_available() {
    let mut w = World::new();
    let src = w.seed(SeedImage::new("us-east-1", "base"));
    let id = w.copy("eu-west-1", copy_of(&src, "base-copy")).unwrap();
    let copy = w.image(&id);
    assert_eq!(copy.region, "eu-west-1");
    assert_eq!(copy.state, ImageState::Pending);
    assert_eq!(
        copy.source,
        Some(ImageSource {
            image_id: src.clone(),
            region: "us-east-1".to_string()
        })
    );
    let snap = w.root(&id).snapshot_id.clone().unwrap();
    assert_ne!(Some(&snap), w.root(&src).snapshot_id.as_ref());
    assert_eq!(w.state.snapshots[&snap].state, SnapshotState::Pending);
    assert_eq!(w.state.snapshots[&snap].region, "eu-west-1");

    w.state.tick(T0 + COPY - Duration::from_secs(1));
    assert_eq!(w.image(&id).state, ImageState::Pending);
    w.state.tick(T0 + COPY);
    assert_eq!(w.image(&id).state, ImageState::Available);
    assert_eq!(w.state.snapshots[&snap].state, SnapshotState::Completed);
}

#[test]
fn a_doomed_copy_ends_failed_with_a_reason() {
    let mut w = World::new();
    let src = w.seed(SeedImage::new("us-east-1", "base"));
    let caller = caller(ME, "eu-west-1");
    let ctx = Ctx {
        config: &w.config,
        caller: &caller,
        now: T0,
    };
    let reason = StateReason {
        code: "Server.InternalError".to_string(),
        message: "boom".to_string(),
    };
    let id = w
        .state
        .copy_image(&ctx, copy_of(&src, "doomed"), COPY, &mut || {
            Some(reason.clone())
        })
        .unwrap();
    w.state.tick(T0 + COPY);
    let image = w.image(&id);
    assert_eq!(image.state, ImageState::Failed);
    assert_eq!(image.state_reason, Some(reason));
    let snap = w.root(&id).snapshot_id.clone().unwrap();
    assert_eq!(w.state.snapshots[&snap].state, SnapshotState::Error);
}

#[test]
fn client_tokens_replay_and_detect_mismatches() {
    let mut w = World::new();
    let src = w.seed(SeedImage::new("us-east-1", "base"));
    let req = CopyImage {
        client_token: Some("tok".to_string()),
        ..copy_of(&src, "idem")
    };
    let first = w.copy("eu-west-1", req.clone()).unwrap();
    assert_eq!(w.copy("eu-west-1", req.clone()).unwrap(), first);
    w.state.tick(T0 + COPY);
    assert_eq!(
        w.copy("eu-west-1", req.clone()).unwrap(),
        first,
        "after completion"
    );
    assert_eq!(w.state.images.len(), 2);

    let changed = CopyImage {
        description: Some("different".to_string()),
        ..req.clone()
    };
    let err = w.copy("eu-west-1", changed).unwrap_err();
    assert_eq!(err.code, "IdempotentParameterMismatch");

    // The same token in another region is a different request.
    let other = w.copy("eu-west-2", req).unwrap();
    assert_ne!(other, first);
}

#[test]
fn names_must_be_well_formed_and_unique_per_region_and_account() {
    let mut w = World::new();
    let src = w.seed(SeedImage::new("us-east-1", "base"));
    w.copy("eu-west-1", copy_of(&src, "taken")).unwrap();
    let err = w.copy("eu-west-1", copy_of(&src, "taken")).unwrap_err();
    assert_eq!(err.code, "InvalidAMIName.Duplicate");
    w.copy("eu-west-2", copy_of(&src, "taken")).unwrap();
    for bad in ["ab", "has*star", &"x".repeat(129), "ünïcode"] {
        let err = w.copy("eu-west-1", copy_of(&src, bad)).unwrap_err();
        assert_eq!(err.code, "InvalidAMIName.Malformed", "{bad}");
    }
    w.copy("eu-west-1", copy_of(&src, "ok (v1.2) [x]/y-z_@'"))
        .unwrap();
}

#[test]
fn missing_and_malformed_sources() {
    let mut w = World::new();
    let err = w
        .copy("eu-west-1", copy_of("ami-0123456789abcdef0", "x-1"))
        .unwrap_err();
    assert_eq!(err.code, "InvalidAMIID.NotFound");
    let err = w
        .copy("eu-west-1", copy_of("ami-nothex", "x-1"))
        .unwrap_err();
    assert_eq!(err.code, "InvalidAMIID.Malformed");
    let src = w.seed(SeedImage::new("us-west-2", "elsewhere"));
    let err = w.copy("eu-west-1", copy_of(&src, "x-1")).unwrap_err();
    assert_eq!(err.code, "InvalidAMIID.NotFound", "wrong source region");
}

#[test]
fn encryption_rules() {
    let mut w = World::new();
    let plain = w.seed(SeedImage::new("us-east-1", "plain"));
    let encrypted = w.seed(SeedImage {
        encrypted: true,
        ..SeedImage::new("us-east-1", "sealed")
    });
    let source_key = w.root(&encrypted).kms_key_id.clone().unwrap();

    let id = w.copy("eu-west-1", copy_of(&plain, "copy-1")).unwrap();
    assert!(!w.root(&id).encrypted);
    assert_eq!(w.root(&id).kms_key_id, None);

    let id = w
        .copy(
            "eu-west-1",
            CopyImage {
                encrypted: Some(true),
                ..copy_of(&plain, "copy-2")
            },
        )
        .unwrap();
    assert!(w.root(&id).encrypted);
    assert_eq!(
        w.root(&id).kms_key_id.as_deref(),
        Some(default_ebs_key(ME, "eu-west-1").as_str())
    );

    let id = w
        .copy(
            "eu-west-1",
            CopyImage {
                encrypted: Some(true),
                kms_key_id: Some("alias/aws/ebs".to_string()),
                ..copy_of(&plain, "copy-3")
            },
        )
        .unwrap();
    assert_eq!(
        w.root(&id).kms_key_id.as_deref(),
        Some(default_ebs_key(ME, "eu-west-1").as_str())
    );

    let key = "1234abcd-12ab-34cd-56ef-1234567890ab";
    let id = w
        .copy(
            "eu-west-1",
            CopyImage {
                encrypted: Some(true),
                kms_key_id: Some(key.to_string()),
                ..copy_of(&encrypted, "copy-4")
            },
        )
        .unwrap();
    assert_eq!(
        w.root(&id).kms_key_id.as_deref(),
        Some(format!("arn:aws:kms:eu-west-1:{ME}:key/{key}").as_str())
    );
    let snap = w.root(&id).snapshot_id.clone().unwrap();
    assert!(w.state.snapshots[&snap].encrypted);

    // An encrypted source stays encrypted even when asked otherwise; within
    // its region it keeps its key, elsewhere it gets the destination's default.
    let id = w
        .copy(
            "us-east-1",
            CopyImage {
                encrypted: Some(false),
                ..copy_of(&encrypted, "copy-5")
            },
        )
        .unwrap();
    assert!(w.root(&id).encrypted);
    assert_eq!(w.root(&id).kms_key_id.as_ref(), Some(&source_key));
    let id = w.copy("eu-west-1", copy_of(&encrypted, "copy-6")).unwrap();
    assert_eq!(
        w.root(&id).kms_key_id.as_deref(),
        Some(default_ebs_key(ME, "eu-west-1").as_str())
    );

    w.config
        .encryption_by_default
        .push(crate::config::AccountRegion::new(ME, "eu-west-2"));
    let id = w.copy("eu-west-2", copy_of(&plain, "copy-7")).unwrap();
    assert!(w.root(&id).encrypted, "encryption by default");

    let err = w
        .copy(
            "eu-west-1",
            CopyImage {
                encrypted: Some(true),
                kms_key_id: Some(format!("arn:aws:kms:us-east-1:{ME}:key/{key}")),
                ..copy_of(&plain, "copy-8")
            },
        )
        .unwrap_err();
    assert_eq!(err.code, "InvalidParameterValue");
    assert!(err.message.contains("us-east-1"), "{}", err.message);

    let err = w
        .copy(
            "eu-west-1",
            CopyImage {
                kms_key_id: Some(key.to_string()),
                ..copy_of(&plain, "copy-9")
            },
        )
        .unwrap_err();
    assert_eq!(err.code, "InvalidParameterDependency");

    let store = w.seed(SeedImage {
        root_device_type: "instance-store".to_string(),
        image_location: Some("bucket/manifest.xml".to_string()),
        ..SeedImage::new("us-east-1", "store")
    });
    let err = w
        .copy(
            "eu-west-1",
            CopyImage {
                encrypted: Some(true),
                ..copy_of(&store, "copy-10")
            },
        )
        .unwrap_err();
    assert_eq!(err.code, "InvalidParameterCombination");
    let id = w.copy("eu-west-1", copy_of(&store, "copy-11")).unwrap();
    assert_eq!(w.image(&id).root_device_type, "instance-store");
}

#[test]
fn sharing_decides_who_may_copy() {
    let mut w = World::new();
    let private = w.seed(SeedImage {
        owner: Some(OTHER.to_string()),
        ..SeedImage::new("us-east-1", "theirs")
    });
    let err = w
        .copy("eu-west-1", copy_of(&private, "mine-1"))
        .unwrap_err();
    assert_eq!(err.code, "InvalidAMIID.NotFound");

    let shared = w.seed(SeedImage {
        owner: Some(OTHER.to_string()),
        launch_permissions: vec![Permission::UserId(ME.to_string())],
        ..SeedImage::new("us-east-1", "shared")
    });
    let id = w.copy("eu-west-1", copy_of(&shared, "mine-2")).unwrap();
    assert_eq!(w.image(&id).owner, ME);

    let billed = w.seed(SeedImage {
        owner: Some(OTHER.to_string()),
        launch_permissions: vec![Permission::Group("all".to_string())],
        billing_products: vec!["bp-6ba54002".to_string()],
        ..SeedImage::new("us-east-1", "billed")
    });
    let err = w.copy("eu-west-1", copy_of(&billed, "mine-3")).unwrap_err();
    assert_eq!(err.code, "InvalidRequest");
    w.copy_as(OTHER, "eu-west-1", copy_of(&billed, "theirs-3"))
        .unwrap();
}

#[test]
fn paravirtual_images_need_a_region_that_runs_them() {
    let mut w = World::new();
    w.config.regions_without_paravirtual = vec!["eu-north-1".to_string()];
    let pv = w.seed(SeedImage {
        virtualization_type: "paravirtual".to_string(),
        ..SeedImage::new("us-east-1", "pv")
    });
    let err = w.copy("eu-north-1", copy_of(&pv, "pv-1")).unwrap_err();
    assert_eq!(err.code, "UnsupportedOperation");
    w.copy("eu-west-1", copy_of(&pv, "pv-1")).unwrap();
}

#[test]
fn concurrent_copies_are_limited_per_destination() {
    let mut w = World::new();
    w.config.concurrent_copy_limit = 2;
    let src = w.seed(SeedImage::new("us-east-1", "base"));
    w.copy("eu-west-1", copy_of(&src, "n-1")).unwrap();
    w.copy("eu-west-1", copy_of(&src, "n-2")).unwrap();
    let err = w.copy("eu-west-1", copy_of(&src, "n-3")).unwrap_err();
    assert_eq!(err.code, "ResourceLimitExceeded");
    w.copy("eu-west-2", copy_of(&src, "n-3")).unwrap();
    w.state.tick(T0 + COPY);
    w.copy("eu-west-1", copy_of(&src, "n-3")).unwrap();
}

#[test]
fn copies_get_tags_from_specifications_and_the_source() {
    let mut w = World::new();
    let src = w.seed(SeedImage {
        tags: [("team", "a"), ("keep", "src")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into(),
        ..SeedImage::new("us-east-1", "tagged")
    });
    let spec = |resource: &str, k: &str, v: &str| TagSpec {
        resource_type: resource.to_string(),
        tags: vec![(k.to_string(), v.to_string())],
    };
    let id = w
        .copy(
            "eu-west-1",
            CopyImage {
                copy_image_tags: true,
                tag_specs: vec![spec("image", "team", "b"), spec("snapshot", "s", "1")],
                ..copy_of(&src, "tags-1")
            },
        )
        .unwrap();
    let tags = &w.image(&id).tags;
    assert_eq!(tags["team"], "b", "specifications win over copied tags");
    assert_eq!(tags["keep"], "src");
    assert!(!tags.contains_key("s"));
    let snap = w.root(&id).snapshot_id.clone().unwrap();
    assert_eq!(w.state.snapshots[&snap].tags["s"], "1");

    let id = w.copy("eu-west-1", copy_of(&src, "tags-2")).unwrap();
    assert!(w.image(&id).tags.is_empty(), "no tags unless asked");

    let err = w
        .copy(
            "eu-west-1",
            CopyImage {
                tag_specs: vec![spec("volume", "a", "b")],
                ..copy_of(&src, "tags-3")
            },
        )
        .unwrap_err();
    assert_eq!(err.code, "InvalidParameterValue");
}

#[test]
fn describe_by_id_filters_owners_and_pages() {
    let mut w = World::new();
    let a = w.seed(SeedImage {
        tags: [("app".to_string(), "web".to_string())].into(),
        ..SeedImage::new("us-east-1", "web-2025-01")
    });
    let b = w.seed(SeedImage::new("us-east-1", "db-2025-01"));
    let theirs = w.seed(SeedImage {
        owner: Some(OTHER.to_string()),
        launch_permissions: vec![Permission::Group("all".to_string())],
        ..SeedImage::new("us-east-1", "public-web")
    });
    w.seed(SeedImage::new("eu-west-1", "web-elsewhere"));

    let by_ids = ImageQuery {
        image_ids: vec![a.clone(), b.clone()],
        ..ImageQuery::default()
    };
    assert_eq!(w.describe("us-east-1", by_ids.clone()).unwrap().len(), 2);
    assert_eq!(
        w.describe("eu-west-1", by_ids).unwrap_err().code,
        "InvalidAMIID.NotFound"
    );
    let with_missing = ImageQuery {
        image_ids: vec![a.clone(), "ami-0000000000000000f".to_string()],
        ..ImageQuery::default()
    };
    let err = w.describe("us-east-1", with_missing).unwrap_err();
    assert!(err.message.contains("ami-0000000000000000f"));

    let filter = |name: &str, value: &str| Filter {
        name: name.to_string(),
        values: vec![value.to_string()],
    };
    let q = |filters: Vec<Filter>, owners: &[&str]| ImageQuery {
        filters,
        owners: owners.iter().map(|o| o.to_string()).collect(),
        ..ImageQuery::default()
    };
    let mut web = w
        .describe("us-east-1", q(vec![filter("name", "*web*")], &[]))
        .unwrap();
    web.sort();
    let mut expected = vec![a.clone(), theirs.clone()];
    expected.sort();
    assert_eq!(web, expected);
    assert_eq!(
        w.describe("us-east-1", q(vec![filter("name", "*web*")], &["self"]))
            .unwrap(),
        [a.as_str()]
    );
    assert_eq!(
        w.describe("us-east-1", q(vec![filter("tag:app", "w?b")], &[]))
            .unwrap(),
        [a.as_str()]
    );
    assert_eq!(
        w.describe("us-east-1", q(vec![filter("tag-key", "app")], &[]))
            .unwrap(),
        [a.as_str()]
    );
    assert_eq!(
        w.describe(
            "us-east-1",
            q(
                vec![filter("state", "available"), filter("owner-id", OTHER)],
                &[]
            )
        )
        .unwrap(),
        [theirs.as_str()]
    );
    assert_eq!(
        w.describe("us-east-1", q(vec![filter("bogus", "x")], &[]))
            .unwrap_err()
            .code,
        "InvalidParameterValue"
    );

    let caller = caller(ME, "us-east-1");
    let ctx = Ctx {
        config: &w.config,
        caller: &caller,
        now: T0,
    };
    let mut seen = Vec::new();
    let mut page = Page {
        max_results: Some(2),
        next_token: None,
    };
    loop {
        let query = ImageQuery {
            page: page.clone(),
            ..ImageQuery::default()
        };
        let (images, next) = w.state.describe_images(&ctx, &query).unwrap();
        assert!(images.len() <= 2);
        seen.extend(images.iter().map(|i| i.id.clone()));
        match next {
            Some(token) => page.next_token = Some(token),
            None => break,
        }
    }
    assert_eq!(seen.len(), 3);
    let err = w
        .describe(
            "us-east-1",
            ImageQuery {
                image_ids: vec![a],
                page: Page {
                    max_results: Some(5),
                    next_token: None,
                },
                ..ImageQuery::default()
            },
        )
        .unwrap_err();
    assert_eq!(err.code, "InvalidParameterCombination");
}

#[test]
fn deregistering_hides_images_and_releases_snapshots() {
    let mut w = World::new();
    let src = w.seed(SeedImage::new("us-east-1", "base"));
    let snap = w.root(&src).snapshot_id.clone().unwrap();
    let caller = caller(ME, "us-east-1");
    let ctx = Ctx {
        config: &w.config,
        caller: &caller,
        now: T0,
    };
    let err = w.state.delete_snapshot(&ctx, &snap).unwrap_err();
    assert_eq!(err.code, "InvalidSnapshot.InUse");

    assert!(
        w.state
            .deregister_image(&ctx, &src, false)
            .unwrap()
            .is_empty()
    );
    let ids = ImageQuery {
        image_ids: vec![src.clone()],
        ..ImageQuery::default()
    };
    assert_eq!(w.state.describe_images(&ctx, &ids).unwrap().0.len(), 0);
    let err = w.state.deregister_image(&ctx, &src, false).unwrap_err();
    assert_eq!(err.code, "InvalidAMIID.Unavailable");
    w.state.delete_snapshot(&ctx, &snap).unwrap();
    let err = w.state.delete_snapshot(&ctx, &snap).unwrap_err();
    assert_eq!(err.code, "InvalidSnapshot.NotFound");
}

#[test]
fn deregistering_can_take_snapshots_along_and_stops_copies() {
    let mut w = World::new();
    let src = w.seed(SeedImage::new("us-east-1", "base"));
    let snap = w.root(&src).snapshot_id.clone().unwrap();
    let copy = w.copy("us-east-1", copy_of(&src, "pending")).unwrap();
    let copy_snap = w.root(&copy).snapshot_id.clone().unwrap();
    let caller = caller(ME, "us-east-1");
    let ctx = Ctx {
        config: &w.config,
        caller: &caller,
        now: T0,
    };
    w.state.deregister_image(&ctx, &copy, false).unwrap();
    assert!(!w.state.snapshots.contains_key(&copy_snap));
    w.state.tick(T0 + COPY);
    assert!(!w.state.images.contains_key(&copy));

    let deleted = w.state.deregister_image(&ctx, &src, true).unwrap();
    assert_eq!(
        deleted,
        [SnapshotDeletion {
            snapshot_id: snap.clone(),
            return_code: "success"
        }]
    );
    assert!(!w.state.snapshots.contains_key(&snap));
}

/// A snapshot of a new 8 GiB volume, made through the API.
fn snapshot_of_new_volume(state: &mut State, ctx: &Ctx) -> String {
    let volume = state
        .create_volume(
            ctx,
            CreateVolume {
                availability_zone: format!("{}a", ctx.region()),
                size: Some(8),
                ..CreateVolume::default()
            },
        )
        .unwrap()
        .id
        .clone();
    state
        .create_snapshot(ctx, &volume, Some("seed".to_string()), &[])
        .unwrap()
        .id
        .clone()
}

/// A request to register an EBS image whose root is `snapshot`.
fn registration_of(snapshot: &str) -> RegisterImage {
    RegisterImage {
        name: "registered".to_string(),
        root_device_name: Some("/dev/xvda".to_string()),
        block_devices: vec![DeviceRequest {
            device_name: "/dev/xvda".to_string(),
            ebs: Some(EbsRequest {
                snapshot_id: Some(snapshot.to_string()),
                ..EbsRequest::default()
            }),
            ..DeviceRequest::default()
        }],
        ..RegisterImage::default()
    }
}

#[test]
fn seeding_through_the_api_matches_ec2_defaults() {
    let mut w = World::new();
    let caller = caller(ME, "us-east-1");
    let ctx = Ctx {
        config: &w.config,
        caller: &caller,
        now: T0,
    };
    let err = w
        .state
        .create_volume(
            &ctx,
            CreateVolume {
                availability_zone: "eu-west-1a".to_string(),
                size: Some(8),
                ..CreateVolume::default()
            },
        )
        .unwrap_err();
    assert_eq!(err.code, "InvalidZone.NotFound");
    let snap = snapshot_of_new_volume(&mut w.state, &ctx);
    let req = registration_of(&snap);
    let id = w.state.register_image(&ctx, req.clone()).unwrap();
    let image = &w.state.images[&id];
    assert_eq!(image.architecture, "i386");
    assert_eq!(image.virtualization_type, "paravirtual");
    assert_eq!(image.root_device_type, "ebs");
    let ebs = image.block_devices[0].ebs.as_ref().unwrap();
    assert_eq!(ebs.volume_size, 8);
    assert_eq!(ebs.snapshot_id.as_ref(), Some(&snap));
    let err = w.state.register_image(&ctx, req).unwrap_err();
    assert_eq!(err.code, "InvalidAMIName.Duplicate");
}

#[test]
fn wildcards() {
    assert!(wildcard("*", ""));
    assert!(wildcard("a*c", "abbbc"));
    assert!(wildcard("a?c", "abc"));
    assert!(!wildcard("a?c", "ac"));
    assert!(wildcard("*web*", "my-web-image"));
    assert!(!wildcard("web", "web2"));
    assert!(wildcard(r"a\*", "a*"));
    assert!(!wildcard(r"a\*", "ab"));
}

#[test]
fn kms_keys_resolve_to_arns_in_the_destination() {
    let arn = resolve_kms_key("alias/team", ME, "eu-west-1").unwrap();
    assert!(arn.starts_with(&format!("arn:aws:kms:eu-west-1:{ME}:key/")));
    assert_eq!(arn, resolve_kms_key("alias/team", ME, "eu-west-1").unwrap());
    let alias_arn = format!("arn:aws:kms:eu-west-1:{ME}:alias/team");
    assert_eq!(resolve_kms_key(&alias_arn, ME, "eu-west-1").unwrap(), arn);
    assert_eq!(
        resolve_kms_key("mrk-1234", ME, "eu-west-1").unwrap(),
        format!("arn:aws:kms:eu-west-1:{ME}:key/mrk-1234")
    );
    assert!(resolve_kms_key("not a key", ME, "eu-west-1").is_err());
}

#[test]
fn deprecation_rounds_to_the_minute_and_must_be_ahead() {
    let mut w = World::new();
    let src = w.seed(SeedImage::new("us-east-1", "base"));
    let caller = caller(ME, "us-east-1");
    let ctx = Ctx {
        config: &w.config,
        caller: &caller,
        now: T0,
    };
    let err = w
        .state
        .enable_image_deprecation(&ctx, &src, T0 - time::Duration::hours(1))
        .unwrap_err();
    assert_eq!(err.code, "InvalidParameterValue");
    w.state
        .enable_image_deprecation(&ctx, &src, datetime!(2025-02-01 10:20:31 UTC))
        .unwrap();
    assert_eq!(
        w.image(&src).deprecation_time,
        Some(datetime!(2025-02-01 10:21 UTC))
    );
}

#[test]
fn tag_filters_follow_tag_changes_and_deregistration() {
    let mut w = World::new();
    let a = w.seed(SeedImage {
        tags: [("owner".to_string(), "x".to_string())].into(),
        ..SeedImage::new("us-east-1", "a")
    });
    let b = w.seed(SeedImage::new("us-east-1", "b"));
    let by_tag = |w: &World, name: &str, value: &str| {
        w.describe(
            "us-east-1",
            ImageQuery {
                filters: vec![Filter {
                    name: name.to_string(),
                    values: vec![value.to_string()],
                }],
                ..ImageQuery::default()
            },
        )
        .unwrap()
    };
    assert_eq!(by_tag(&w, "tag:owner", "x"), [a.as_str()]);

    let caller = caller(ME, "us-east-1");
    let ctx = Ctx {
        config: &w.config,
        caller: &caller,
        now: T0,
    };
    let x = [("owner".to_string(), "x".to_string())];
    w.state
        .create_tags(&ctx, std::slice::from_ref(&b), &x)
        .unwrap();
    let mut both = vec![a.clone(), b.clone()];
    both.sort();
    assert_eq!(by_tag(&w, "tag:owner", "x"), both);
    assert_eq!(by_tag(&w, "tag:owner", "?"), both, "wildcards still match");

    w.state
        .delete_tags(
            &ctx,
            std::slice::from_ref(&a),
            &[("owner".to_string(), None)],
        )
        .unwrap();
    assert_eq!(by_tag(&w, "tag:owner", "x"), [b.as_str()]);
    let y = [("owner".to_string(), "y".to_string())];
    w.state
        .create_tags(&ctx, std::slice::from_ref(&b), &y)
        .unwrap();
    assert!(
        by_tag(&w, "tag:owner", "x").is_empty(),
        "the old value is gone"
    );
    assert_eq!(by_tag(&w, "tag:owner", "y"), [b.as_str()]);
    w.state.deregister_image(&ctx, &b, true).unwrap();
    assert!(by_tag(&w, "tag:owner", "y").is_empty());
    assert_eq!(by_tag(&w, "image-id", &a), [a.as_str()]);
    assert!(by_tag(&w, "image-id", &b).is_empty());
}

#[test]
fn a_deregistered_copy_frees_its_slot() {
    let mut w = World::new();
    w.config.concurrent_copy_limit = 1;
    let src = w.seed(SeedImage::new("us-east-1", "base"));
    let first = w.copy("eu-west-1", copy_of(&src, "n-1")).unwrap();
    let err = w.copy("eu-west-1", copy_of(&src, "n-2")).unwrap_err();
    assert_eq!(err.code, "ResourceLimitExceeded");
    let caller = caller(ME, "eu-west-1");
    let ctx = Ctx {
        config: &w.config,
        caller: &caller,
        now: T0,
    };
    w.state.deregister_image(&ctx, &first, false).unwrap();
    let second = w.copy("eu-west-1", copy_of(&src, "n-2")).unwrap();
    w.state.tick(T0 + COPY);
    assert_eq!(w.image(&second).state, ImageState::Available);
}

const LAG: Duration = Duration::from_secs(10);

fn at<'a>(config: &'a SimConfig, caller: &'a Caller, now: OffsetDateTime) -> Ctx<'a> {
    Ctx {
        config,
        caller,
        now,
    }
}

fn by_ids(ids: &[&str]) -> ImageQuery {
    ImageQuery {
        image_ids: ids.iter().map(|id| id.to_string()).collect(),
        ..ImageQuery::default()
    }
}

fn filtered(name: &str, value: &str) -> ImageQuery {
    ImageQuery {
        filters: vec![Filter {
            name: name.to_string(),
            values: vec![value.to_string()],
        }],
        ..ImageQuery::default()
    }
}

/// The IDs `query` returns in `region` at `now`, or the error code.
fn described(
    w: &World,
    region: &str,
    now: OffsetDateTime,
    query: &ImageQuery,
) -> Result<Vec<String>, String> {
    let caller = caller(ME, region);
    let (images, _) = w
        .state
        .describe_images(&at(&w.config, &caller, now), query)
        .map_err(|e| e.code)?;
    Ok(images.iter().map(|i| i.id.clone()).collect())
}

fn snapshots_described(
    w: &World,
    now: OffsetDateTime,
    query: SnapshotQuery,
) -> Result<Vec<String>, String> {
    let caller = caller(ME, "us-east-1");
    let (snapshots, _) = w
        .state
        .describe_snapshots(&at(&w.config, &caller, now), &query)
        .map_err(|e| e.code)?;
    Ok(snapshots.iter().map(|s| s.id.clone()).collect())
}

#[test]
fn a_new_copy_and_its_snapshot_are_unknown_until_they_propagate() {
    let mut w = World::new();
    w.config.propagation_lag = LAG;
    let src = w.seed(SeedImage::new("us-east-1", "base"));
    let copy = w.copy("us-east-1", copy_of(&src, "fresh")).unwrap();
    let snap = w.root(&copy).snapshot_id.clone().unwrap();
    let soon = T0 + LAG - Duration::from_secs(1);

    let not_found = Err("InvalidAMIID.NotFound".to_string());
    assert_eq!(
        described(&w, "us-east-1", soon, &by_ids(&[&copy])),
        not_found
    );
    assert_eq!(
        described(&w, "us-east-1", soon, &filtered("image-id", &copy)),
        Ok(vec![])
    );
    assert_eq!(
        described(&w, "us-east-1", soon, &ImageQuery::default()),
        Ok(vec![src.clone()]),
        "listings leave it out too"
    );
    let snap_ids = SnapshotQuery {
        snapshot_ids: vec![snap.clone()],
        ..SnapshotQuery::default()
    };
    assert_eq!(
        snapshots_described(&w, soon, snap_ids.clone()),
        Err("InvalidSnapshot.NotFound".to_string())
    );
    let snap_filter = SnapshotQuery {
        filters: vec![Filter {
            name: "snapshot-id".to_string(),
            values: vec![snap.clone()],
        }],
        ..SnapshotQuery::default()
    };
    assert_eq!(
        snapshots_described(&w, soon, snap_filter.clone()),
        Ok(vec![])
    );

    let me = caller(ME, "us-east-1");
    let ctx = at(&w.config, &me, soon);
    let tag = [("k".to_string(), "v".to_string())];
    let image_calls: [(&str, ApiResult<()>); 6] = [
        (
            "CreateTags",
            w.state.create_tags(&ctx, std::slice::from_ref(&copy), &tag),
        ),
        (
            "DeleteTags",
            w.state.delete_tags(&ctx, std::slice::from_ref(&copy), &[]),
        ),
        (
            "ModifyImageAttribute",
            w.state.modify_description(&ctx, &copy, "d".to_string()),
        ),
        (
            "ModifyImageAttribute",
            w.state.modify_launch_permission(
                &ctx,
                &copy,
                &PermissionChange {
                    add: vec![Permission::UserId(OTHER.to_string())],
                    remove: vec![],
                },
            ),
        ),
        (
            "EnableImageDeprecation",
            w.state
                .enable_image_deprecation(&ctx, &copy, T0 + time::Duration::days(1)),
        ),
        (
            "DeregisterImage",
            w.state.deregister_image(&ctx, &copy, false).map(|_| ()),
        ),
    ];
    for (action, result) in image_calls {
        assert_eq!(
            result.unwrap_err().code,
            "InvalidAMIID.NotFound",
            "{action}"
        );
    }
    let snapshot_calls = [
        (
            "CreateTags",
            w.state.create_tags(&ctx, std::slice::from_ref(&snap), &tag),
        ),
        ("DeleteSnapshot", w.state.delete_snapshot(&ctx, &snap)),
        (
            "ModifySnapshotAttribute",
            w.state.modify_create_volume_permission(
                &ctx,
                &snap,
                &PermissionChange {
                    add: vec![Permission::UserId(OTHER.to_string())],
                    remove: vec![],
                },
            ),
        ),
    ];
    for (action, result) in snapshot_calls {
        assert_eq!(
            result.unwrap_err().code,
            "InvalidSnapshot.NotFound",
            "{action}"
        );
    }

    let later = T0 + LAG;
    assert_eq!(
        described(&w, "us-east-1", later, &by_ids(&[&copy])),
        Ok(vec![copy.clone()])
    );
    assert_eq!(
        described(&w, "us-east-1", later, &filtered("image-id", &copy)),
        Ok(vec![copy.clone()])
    );
    assert_eq!(
        snapshots_described(&w, later, snap_ids),
        Ok(vec![snap.clone()])
    );
    assert_eq!(snapshots_described(&w, later, snap_filter), Ok(vec![snap]));
    let ctx = at(&w.config, &me, later);
    w.state.create_tags(&ctx, &[copy], &tag).unwrap();
}

#[test]
fn registered_images_and_created_snapshots_propagate_too() {
    let mut w = World::new();
    w.config.propagation_lag = LAG;
    let me = caller(ME, "us-east-1");
    let ctx = at(&w.config, &me, T0);
    let req = registration_of(&snapshot_of_new_volume(&mut w.state, &ctx));
    let err = w.state.register_image(&ctx, req.clone()).unwrap_err();
    assert_eq!(
        err.code, "InvalidSnapshot.NotFound",
        "the snapshot is not known yet"
    );

    let ctx = at(&w.config, &me, T0 + LAG);
    let image = w.state.register_image(&ctx, req).unwrap();
    let err = w
        .state
        .copy_image(&ctx, copy_of(&image, "too-soon"), COPY, &mut || None)
        .unwrap_err();
    assert_eq!(
        err.code, "InvalidAMIID.NotFound",
        "a copy from it waits too"
    );
    let ctx = at(&w.config, &me, T0 + LAG * 2);
    w.state
        .copy_image(&ctx, copy_of(&image, "in-time"), COPY, &mut || None)
        .unwrap();
}

#[test]
fn tag_filters_see_tag_changes_after_the_lag() {
    let mut w = World::new();
    w.config.propagation_lag = LAG;
    let a = w.seed(SeedImage {
        tags: [("owner".to_string(), "x".to_string())].into(),
        ..SeedImage::new("us-east-1", "a")
    });
    let b = w.seed(SeedImage::new("us-east-1", "b"));
    let me = caller(ME, "us-east-1");
    let owner = |v: &str| [("owner".to_string(), v.to_string())];
    let second = Duration::from_secs(1);
    w.state
        .create_tags(
            &at(&w.config, &me, T0),
            std::slice::from_ref(&b),
            &owner("x"),
        )
        .unwrap();
    w.state
        .delete_tags(
            &at(&w.config, &me, T0 + second),
            std::slice::from_ref(&a),
            &[("owner".to_string(), None)],
        )
        .unwrap();
    w.state
        .create_tags(
            &at(&w.config, &me, T0 + second * 2),
            std::slice::from_ref(&b),
            &owner("y"),
        )
        .unwrap();

    let tagged = |w: &World, after: Duration, name: &str, value: &str| {
        described(w, "us-east-1", T0 + after, &filtered(name, value)).unwrap()
    };
    assert_eq!(
        tagged(&w, second * 5, "tag:owner", "x"),
        [a.as_str()],
        "the old tags still match"
    );
    assert_eq!(tagged(&w, second * 5, "tag-key", "owner"), [a.as_str()]);
    assert!(tagged(&w, second * 5, "tag:owner", "y").is_empty());
    assert_eq!(
        described(&w, "us-east-1", T0 + second * 5, &by_ids(&[&b])).unwrap(),
        [b.as_str()],
        "the image itself is listed"
    );
    assert_eq!(w.image(&b).tags["owner"], "y", "and carries its tags");
    let mut both = vec![a.clone(), b.clone()];
    both.sort();
    assert_eq!(tagged(&w, LAG, "tag:owner", "x"), both);
    assert_eq!(
        tagged(&w, LAG + second, "tag:owner", "x"),
        [b.as_str()],
        "the removal lands"
    );
    w.state.tick(T0 + LAG + second * 2);
    assert!(tagged(&w, LAG + second * 2, "tag:owner", "x").is_empty());
    assert_eq!(tagged(&w, LAG + second * 2, "tag:owner", "y"), [b]);
}

#[test]
fn snapshot_tag_filters_lag_too() {
    let mut w = World::new();
    w.config.propagation_lag = LAG;
    let src = w.seed(SeedImage::new("us-east-1", "base"));
    let snap = w.root(&src).snapshot_id.clone().unwrap();
    let me = caller(ME, "us-east-1");
    let tag = [("team".to_string(), "a".to_string())];
    w.state
        .create_tags(&at(&w.config, &me, T0), std::slice::from_ref(&snap), &tag)
        .unwrap();
    let by_tag = SnapshotQuery {
        filters: vec![Filter {
            name: "tag:team".to_string(),
            values: vec!["a".to_string()],
        }],
        ..SnapshotQuery::default()
    };
    assert_eq!(snapshots_described(&w, T0, by_tag.clone()), Ok(vec![]));
    assert_eq!(snapshots_described(&w, T0 + LAG, by_tag), Ok(vec![snap]));
}

#[test]
fn a_change_made_without_lag_overtakes_one_still_in_flight() {
    let mut w = World::new();
    w.config.propagation_lag = LAG;
    let a = w.seed(SeedImage::new("us-east-1", "a"));
    let me = caller(ME, "us-east-1");
    let owner = |v: &str| [("owner".to_string(), v.to_string())];
    w.state
        .create_tags(
            &at(&w.config, &me, T0),
            std::slice::from_ref(&a),
            &owner("x"),
        )
        .unwrap();
    w.config.propagation_lag = Duration::ZERO;
    w.state
        .create_tags(
            &at(&w.config, &me, T0),
            std::slice::from_ref(&a),
            &owner("y"),
        )
        .unwrap();
    let now = described(&w, "us-east-1", T0, &filtered("tag:owner", "y")).unwrap();
    assert_eq!(now, [a.as_str()]);
    let later = described(&w, "us-east-1", T0 + LAG, &filtered("tag:owner", "x")).unwrap();
    assert!(later.is_empty(), "the older change never resurfaces");
}

#[test]
fn a_deregistered_image_is_described_by_id_for_a_while() {
    let mut w = World::new();
    let keep = Duration::from_secs(30);
    w.config.deregistered_visibility = keep;
    let a = w.seed(SeedImage {
        tags: [("owner".to_string(), "x".to_string())].into(),
        ..SeedImage::new("us-east-1", "a")
    });
    let me = caller(ME, "us-east-1");
    w.state
        .deregister_image(&at(&w.config, &me, T0), &a, false)
        .unwrap();
    assert!(!w.state.images.contains_key(&a));

    let soon = T0 + keep - Duration::from_secs(1);
    let ctx = at(&w.config, &me, soon);
    let (images, _) = w.state.describe_images(&ctx, &by_ids(&[&a])).unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].state, ImageState::Deregistered);
    assert_eq!(images[0].state.as_str(), "deregistered");
    assert_eq!(
        described(&w, "us-east-1", soon, &filtered("image-id", &a)),
        Ok(vec![a.clone()])
    );
    let deregistered_only = ImageQuery {
        filters: vec![
            Filter {
                name: "image-id".to_string(),
                values: vec![a.clone()],
            },
            Filter {
                name: "state".to_string(),
                values: vec!["available".to_string()],
            },
        ],
        ..ImageQuery::default()
    };
    assert_eq!(
        described(&w, "us-east-1", soon, &deregistered_only),
        Ok(vec![])
    );
    assert_eq!(
        described(&w, "us-east-1", soon, &filtered("tag:owner", "x")),
        Ok(vec![])
    );
    let mine = ImageQuery {
        owners: vec!["self".to_string()],
        ..ImageQuery::default()
    };
    assert_eq!(described(&w, "us-east-1", soon, &mine), Ok(vec![]));
    assert_eq!(
        described(&w, "eu-west-1", soon, &filtered("image-id", &a)),
        Ok(vec![])
    );
    let err = w.state.deregister_image(&ctx, &a, false).unwrap_err();
    assert_eq!(err.code, "InvalidAMIID.Unavailable");
    let err = w
        .state
        .modify_description(&ctx, &a, "d".to_string())
        .unwrap_err();
    assert_eq!(err.code, "InvalidAMIID.NotFound");

    w.state.tick(T0 + keep);
    assert_eq!(
        described(&w, "us-east-1", T0 + keep, &by_ids(&[&a])),
        Ok(vec![])
    );
}
