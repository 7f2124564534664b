//! What tells whether an image is in use before it goes away: deregistration
//! protection, disabled images, launch templates and instances.

use std::time::Duration;

use time::macros::datetime;

use super::*;

const ME: &str = "111111111111";
const OTHER: &str = "222222222222";
const REGION: &str = "us-east-1";
const T0: OffsetDateTime = datetime!(2025-01-01 00:00 UTC);

struct World {
    config: SimConfig,
    state: State,
}

impl World {
    fn new() -> Self {
        Self {
            config: SimConfig {
                default_account: ME.to_string(),
                ..SimConfig::default()
            },
            state: State::new(11),
        }
    }

    /// An image of mine in `REGION`, shared with `OTHER`.
    fn seed(&mut self, name: &str) -> String {
        let seed = SeedImage {
            launch_permissions: vec![Permission::UserId(OTHER.to_string())],
            ..SeedImage::new(REGION, name)
        };
        self.state.seed_image(&self.config, seed, T0)
    }

    fn image(&self, id: &str) -> &Image {
        &self.state.images[id]
    }
}

fn caller(account: &str) -> Caller {
    Caller {
        account: account.to_string(),
        region: REGION.to_string(),
    }
}

fn at<'a>(config: &'a SimConfig, caller: &'a Caller, now: OffsetDateTime) -> Ctx<'a> {
    Ctx {
        config,
        caller,
        now,
    }
}

/// The IDs DescribeImages returns to `account` at `now`, or the error code.
fn described(
    w: &World,
    account: &str,
    now: OffsetDateTime,
    query: &ImageQuery,
) -> Result<Vec<String>, String> {
    let who = caller(account);
    let (images, _) = w
        .state
        .describe_images(&at(&w.config, &who, now), query)
        .map_err(|e| e.code)?;
    Ok(images.iter().map(|i| i.id.clone()).collect())
}

fn by_id(id: &str) -> ImageQuery {
    ImageQuery {
        image_ids: vec![id.to_string()],
        ..ImageQuery::default()
    }
}

fn code<T>(result: ApiResult<T>) -> String {
    match result {
        Ok(_) => "ok".to_string(),
        Err(e) => e.code,
    }
}

fn filter(name: &str, values: &[&str]) -> Filter {
    Filter {
        name: name.to_string(),
        values: values.iter().map(|v| v.to_string()).collect(),
    }
}

#[test]
fn protection_blocks_deregistration_until_disabled() {
    let mut w = World::new();
    let id = w.seed("guarded");
    let (me, other) = (caller(ME), caller(OTHER));
    let ctx = at(&w.config, &me, T0);
    let protection = |w: &World| w.image(&id).deregistration_protection.describe(T0);
    assert_eq!(protection(&w), "disabled");

    w.state
        .enable_deregistration_protection(&ctx, &id, false)
        .unwrap();
    assert_eq!(protection(&w), "enabled-without-cooldown");
    let err = w.state.deregister_image(&ctx, &id, true).unwrap_err();
    assert_eq!(err.code, "OperationNotPermitted");
    assert!(err.message.contains("Deregistration protection is enabled"));
    assert!(w.state.images.contains_key(&id), "nothing changed");
    assert_eq!(w.state.snapshots.len(), 1, "its snapshot neither");

    let theirs = at(&w.config, &other, T0);
    let only_the_owner = [
        code(w.state.enable_deregistration_protection(&theirs, &id, true)),
        code(w.state.disable_deregistration_protection(&theirs, &id)),
    ];
    assert_eq!(only_the_owner, ["AuthFailure", "AuthFailure"]);
    let unknown = "ami-0123456789abcdef0";
    assert_eq!(
        code(w.state.disable_deregistration_protection(&ctx, unknown)),
        "InvalidAMIID.NotFound"
    );

    w.state
        .disable_deregistration_protection(&ctx, &id)
        .unwrap();
    assert_eq!(protection(&w), "disabled", "no cooldown asked for");
    w.state.deregister_image(&ctx, &id, false).unwrap();
    assert!(!w.state.images.contains_key(&id));
}

#[test]
fn a_cooldown_keeps_protection_for_a_day_after_disabling() {
    let mut w = World::new();
    let id = w.seed("cooled");
    let me = caller(ME);
    w.state
        .enable_deregistration_protection(&at(&w.config, &me, T0), &id, true)
        .unwrap();
    assert_eq!(
        w.image(&id).deregistration_protection.describe(T0),
        "enabled-with-cooldown"
    );
    let disabled_at = T0 + Duration::from_secs(3600);
    w.state
        .disable_deregistration_protection(&at(&w.config, &me, disabled_at), &id)
        .unwrap();
    let protection = w.image(&id).deregistration_protection;
    assert_eq!(
        protection.describe(disabled_at),
        "disabled-until 2025-01-02T01:00:00.000Z"
    );

    let almost = disabled_at + COOLDOWN - time::Duration::SECOND;
    // Disabling again during the cooldown does not restart it.
    w.state
        .disable_deregistration_protection(&at(&w.config, &me, almost), &id)
        .unwrap();
    let err = w
        .state
        .deregister_image(&at(&w.config, &me, almost), &id, false)
        .unwrap_err();
    assert_eq!(err.code, "OperationNotPermitted");
    assert!(err.message.contains("2025-01-02T01:00:00.000Z"), "{err}");

    let over = disabled_at + COOLDOWN;
    assert_eq!(
        w.image(&id).deregistration_protection.describe(over),
        "disabled"
    );
    w.state
        .deregister_image(&at(&w.config, &me, over), &id, false)
        .unwrap();
}

#[test]
fn a_disabled_image_is_hidden_unless_asked_for_and_made_private() {
    let mut w = World::new();
    let id = w.seed("retired");
    let kept = w.seed("kept");
    let me = caller(ME);
    let ctx = at(&w.config, &me, T0);
    assert_eq!(
        code(
            w.state
                .disable_image(&at(&w.config, &caller(OTHER), T0), &id)
        ),
        "AuthFailure",
        "only the owner"
    );
    w.state.disable_image(&ctx, &id).unwrap();
    assert_eq!(w.image(&id).state, ImageState::Disabled);
    assert!(w.image(&id).launch_permissions.is_empty());
    assert_eq!(w.state.snapshots.len(), 2, "its snapshot stays");

    let mine = ImageQuery {
        owners: vec!["self".to_string()],
        ..ImageQuery::default()
    };
    assert_eq!(described(&w, ME, T0, &mine), Ok(vec![kept.clone()]));
    assert_eq!(
        described(&w, ME, T0, &by_id(&id)),
        Ok(vec![]),
        "by ID too, without IncludeDisabled"
    );
    let with_disabled = |q: ImageQuery| ImageQuery {
        include_disabled: true,
        ..q
    };
    let mut both = vec![id.clone(), kept.clone()];
    both.sort();
    assert_eq!(
        described(&w, ME, T0, &with_disabled(mine.clone())),
        Ok(both)
    );
    assert_eq!(
        described(&w, ME, T0, &with_disabled(by_id(&id))),
        Ok(vec![id.clone()])
    );
    assert_eq!(
        described(&w, OTHER, T0, &with_disabled(by_id(&id))),
        Err("InvalidAMIID.NotFound".to_string()),
        "no longer shared"
    );
    assert_eq!(code(w.state.disable_image(&ctx, &id)), "IncorrectState");
    let launch = RunInstances {
        image_id: id.clone(),
        min_count: 1,
        max_count: 1,
        instance_type: None,
    };
    assert_eq!(
        code(w.state.run_instances(&ctx, launch)),
        "InvalidAMIID.Unavailable"
    );

    w.state.enable_image(&ctx, &id).unwrap();
    assert_eq!(w.image(&id).state, ImageState::Available);
    assert_eq!(described(&w, ME, T0, &by_id(&id)), Ok(vec![id.clone()]));
    assert_eq!(
        described(&w, OTHER, T0, &by_id(&id)),
        Err("InvalidAMIID.NotFound".to_string()),
        "sharing does not come back"
    );
    assert_eq!(code(w.state.enable_image(&ctx, &id)), "IncorrectState");

    w.state.disable_image(&ctx, &id).unwrap();
    w.state.deregister_image(&ctx, &id, false).unwrap();
    assert!(
        !w.state.images.contains_key(&id),
        "disabled images deregister"
    );
}

fn launch(image_id: &str, count: i64) -> RunInstances {
    RunInstances {
        image_id: image_id.to_string(),
        min_count: 1,
        max_count: count,
        instance_type: Some("t3.micro".to_string()),
    }
}

#[test]
fn run_instances_records_the_last_launch_on_the_image() {
    let mut w = World::new();
    let id = w.seed("launched");
    assert_eq!(w.image(&id).last_launched_time, None);
    let (me, other) = (caller(ME), caller(OTHER));
    let first = T0 + Duration::from_secs(5);
    let instances = w
        .state
        .run_instances(&at(&w.config, &me, first), launch(&id, 2))
        .unwrap();
    assert_eq!(instances.len(), 2);
    assert_eq!(instances[0].reservation_id, instances[1].reservation_id);
    for (index, instance) in instances.iter().enumerate() {
        assert!(is_hex_id(&instance.id, "i-") && instance.id.len() == 19);
        assert_eq!(instance.state, InstanceState::Running);
        assert_eq!(
            (instance.image_id.as_str(), instance.launch_time),
            (id.as_str(), first)
        );
        assert_eq!(instance.ami_launch_index, index as i64);
    }
    assert_eq!(w.image(&id).last_launched_time, Some(first));

    let later = first + Duration::from_secs(60);
    w.state
        .run_instances(&at(&w.config, &other, later), launch(&id, 1))
        .unwrap();
    assert_eq!(
        w.image(&id).last_launched_time,
        Some(later),
        "a launch from the shared image counts too"
    );

    let private = w
        .state
        .seed_image(&w.config, SeedImage::new(REGION, "private"), T0);
    let ctx = at(&w.config, &other, later);
    assert_eq!(
        code(w.state.run_instances(&ctx, launch(&private, 1))),
        "InvalidAMIID.NotFound"
    );
    let ctx = at(&w.config, &me, later);
    let too_few = RunInstances {
        min_count: 3,
        ..launch(&id, 2)
    };
    assert_eq!(
        code(w.state.run_instances(&ctx, too_few)),
        "InvalidParameterValue"
    );
    assert_eq!(w.image(&private).last_launched_time, None);
}

/// The IDs DescribeInstances returns to me, or the error code.
fn instances_described(w: &World, query: &InstanceQuery) -> Result<Vec<String>, String> {
    let me = caller(ME);
    let (instances, _) = w
        .state
        .describe_instances(&at(&w.config, &me, T0), query)
        .map_err(|e| e.code)?;
    Ok(instances.iter().map(|i| i.id.clone()).collect())
}

fn filtered_instances(filters: Vec<Filter>) -> InstanceQuery {
    InstanceQuery {
        filters,
        ..InstanceQuery::default()
    }
}

#[test]
fn instances_change_state_and_filter_by_image_and_state() {
    let mut w = World::new();
    let (a, b) = (w.seed("image-a"), w.seed("image-b"));
    let me = caller(ME);
    let ctx = at(&w.config, &me, T0);
    let ids =
        |instances: Vec<Instance>| -> Vec<String> { instances.into_iter().map(|i| i.id).collect() };
    let from_a = ids(w.state.run_instances(&ctx, launch(&a, 2)).unwrap());
    let from_b = ids(w.state.run_instances(&ctx, launch(&b, 1)).unwrap());
    let (stopped, terminated) = (from_a[0].clone(), from_b[0].clone());

    let changes = w
        .state
        .change_instance_states(&ctx, std::slice::from_ref(&stopped), InstanceState::Stopped)
        .unwrap();
    assert_eq!(
        (changes[0].previous, changes[0].current),
        (InstanceState::Running, InstanceState::Stopped)
    );
    w.state
        .change_instance_states(
            &ctx,
            std::slice::from_ref(&terminated),
            InstanceState::Terminated,
        )
        .unwrap();
    let both = [stopped.clone(), terminated.clone()];
    let err = w
        .state
        .change_instance_states(&ctx, &both, InstanceState::Running)
        .unwrap_err();
    assert_eq!(err.code, "IncorrectInstanceState");
    assert_eq!(
        w.state.instances[&stopped].state,
        InstanceState::Stopped,
        "all or nothing"
    );
    let unknown = ["i-0123456789abcdef0".to_string()];
    assert_eq!(
        code(
            w.state
                .change_instance_states(&ctx, &unknown, InstanceState::Stopped)
        ),
        "InvalidInstanceID.NotFound"
    );
    let other = caller(OTHER);
    assert_eq!(
        code(w.state.change_instance_states(
            &at(&w.config, &other, T0),
            std::slice::from_ref(&stopped),
            InstanceState::Terminated
        )),
        "InvalidInstanceID.NotFound",
        "another account's instance"
    );

    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let by = |filters| instances_described(&w, &filtered_instances(filters)).unwrap();
    assert_eq!(by(vec![filter("image-id", &[&a])]), sorted(from_a.clone()));
    assert_eq!(
        by(vec![filter("image-id", &[&a, &b])]).len(),
        3,
        "several values, any may match"
    );
    assert_eq!(
        by(vec![filter("instance-state-name", &["running", "stopped"])]),
        sorted(vec![from_a[0].clone(), from_a[1].clone()])
    );
    assert_eq!(
        by(vec![filter("instance-state-name", &["terminated"])]),
        [terminated],
        "terminated instances stay described"
    );
    assert_eq!(
        by(vec![
            filter("image-id", &[&a]),
            filter("instance-state-name", &["running"]),
        ]),
        [from_a[1].clone()]
    );
    let named = InstanceQuery {
        instance_ids: vec![stopped.clone()],
        ..InstanceQuery::default()
    };
    assert_eq!(instances_described(&w, &named), Ok(vec![stopped.clone()]));
    let named_and_paged = InstanceQuery {
        page: Page {
            max_results: Some(5),
            next_token: None,
        },
        ..named
    };
    assert_eq!(
        instances_described(&w, &named_and_paged),
        Err("InvalidParameterCombination".to_string())
    );
    let who = caller(OTHER);
    let (theirs, _) = w
        .state
        .describe_instances(&at(&w.config, &who, T0), &InstanceQuery::default())
        .unwrap();
    assert!(theirs.is_empty(), "instances belong to one account");
}

#[test]
fn instances_are_paged_in_id_order() {
    let mut w = World::new();
    let a = w.seed("many");
    let me = caller(ME);
    w.state
        .run_instances(&at(&w.config, &me, T0), launch(&a, 7))
        .unwrap();
    let page = |max, token: Option<String>| InstanceQuery {
        page: Page {
            max_results: Some(max),
            next_token: token,
        },
        ..InstanceQuery::default()
    };
    let ctx = at(&w.config, &me, T0);
    let (first, token) = w.state.describe_instances(&ctx, &page(5, None)).unwrap();
    assert_eq!(first.len(), 5);
    let (rest, end) = w.state.describe_instances(&ctx, &page(5, token)).unwrap();
    assert_eq!((rest.len(), end), (2, None));
    let paged: Vec<&String> = first.iter().chain(&rest).map(|i| &i.id).collect();
    let all: Vec<&String> = w.state.instances.keys().collect();
    assert_eq!(paged, all);
    assert_eq!(
        code(w.state.describe_instances(&ctx, &page(4, None))),
        "InvalidParameterValue",
        "MaxResults is 5 to 1000"
    );
}

/// Launch template versions as (template name, version number, default).
fn versions(
    w: &World,
    account: &str,
    query: &VersionQuery,
) -> Result<Vec<(String, i64, bool)>, String> {
    let who = caller(account);
    let (views, _) = w
        .state
        .describe_launch_template_versions(&at(&w.config, &who, T0), query)
        .map_err(|e| e.code)?;
    Ok(views
        .iter()
        .map(|v| (v.template.name.clone(), v.version.number, v.is_default()))
        .collect())
}

fn across(specs: &[VersionSpec], filters: Vec<Filter>) -> VersionQuery {
    VersionQuery {
        versions: specs.to_vec(),
        filters,
        ..VersionQuery::default()
    }
}

fn v(name: &str, number: i64, default: bool) -> (String, i64, bool) {
    (name.to_string(), number, default)
}

/// Templates `web` (v1 from `a`, default; v2 from `b`), `batch` (v1 from
/// `b`) and `bare` (v1 without an image), created in that order.
fn templates(w: &mut World, a: &str, b: &str) -> [String; 3] {
    let me = caller(ME);
    let ctx = at(&w.config, &me, T0);
    let mut create = |name: &str, image: Option<&str>| {
        let req = CreateLaunchTemplate {
            name: name.to_string(),
            version_description: None,
            image_id: image.map(str::to_string),
        };
        w.state
            .create_launch_template(&ctx, req)
            .unwrap()
            .id
            .clone()
    };
    let ids = [
        create("web", Some(a)),
        create("batch", Some(b)),
        create("bare", None),
    ];
    let second = CreateLaunchTemplateVersion {
        template: TemplateRef::Name("web".to_string()),
        source_version: None,
        version_description: Some("newer".to_string()),
        image_id: Some(b.to_string()),
    };
    let created = w
        .state
        .create_launch_template_version(&ctx, second)
        .unwrap();
    assert_eq!((created.version.number, created.is_default()), (2, false));
    ids
}

/// `rows` in the order DescribeLaunchTemplateVersions lists them: by
/// template ID, then version.
fn in_page_order(
    ids: &[String; 3],
    mut rows: Vec<(String, i64, bool)>,
) -> Vec<(String, i64, bool)> {
    let id_of = |name: &str| match name {
        "web" => &ids[0],
        "batch" => &ids[1],
        _ => &ids[2],
    };
    rows.sort_by(|x, y| (id_of(&x.0), x.1).cmp(&(id_of(&y.0), y.1)));
    rows
}

#[test]
fn latest_and_default_versions_of_every_template() {
    let mut w = World::new();
    let (a, b) = (w.seed("image-a"), w.seed("image-b"));
    let ids = templates(&mut w, &a, &b);
    for id in &ids {
        assert!(is_hex_id(id, "lt-") && id.len() == 20, "{id}");
    }
    let (latest, default) = (VersionSpec::Latest, VersionSpec::Default);

    assert_eq!(
        versions(&w, ME, &across(&[latest], vec![])),
        Ok(in_page_order(
            &ids,
            vec![v("web", 2, false), v("batch", 1, true), v("bare", 1, true)]
        ))
    );
    assert_eq!(
        versions(&w, ME, &across(&[default], vec![])),
        Ok(in_page_order(
            &ids,
            vec![v("web", 1, true), v("batch", 1, true), v("bare", 1, true)]
        ))
    );
    let both = in_page_order(
        &ids,
        vec![
            v("web", 1, true),
            v("web", 2, false),
            v("batch", 1, true),
            v("bare", 1, true),
        ],
    );
    assert_eq!(
        versions(&w, ME, &across(&[latest, default], vec![])),
        Ok(both.clone()),
        "a version both latest and default is listed once"
    );
    assert_eq!(
        versions(
            &w,
            ME,
            &across(&[latest, default], vec![filter("image-id", &[&a])])
        ),
        Ok(vec![v("web", 1, true)])
    );
    assert_eq!(
        versions(
            &w,
            ME,
            &across(&[latest, default], vec![filter("image-id", &[&a, &b])])
        ),
        Ok(in_page_order(
            &ids,
            vec![v("web", 1, true), v("web", 2, false), v("batch", 1, true)]
        )),
        "several values, any may match; a version without an image matches none"
    );
    assert_eq!(versions(&w, OTHER, &across(&[latest], vec![])), Ok(vec![]));

    // Page through all four, one at a time.
    let me = caller(ME);
    let ctx = at(&w.config, &me, T0);
    let mut token = None;
    let mut paged = Vec::new();
    loop {
        let query = VersionQuery {
            page: Page {
                max_results: Some(1),
                next_token: token,
            },
            ..across(&[latest, default], vec![])
        };
        let (views, next) = w
            .state
            .describe_launch_template_versions(&ctx, &query)
            .unwrap();
        assert_eq!(views.len(), 1);
        paged.extend(
            views
                .iter()
                .map(|v| (v.template.name.clone(), v.version.number, v.is_default())),
        );
        token = next;
        if token.is_none() {
            break;
        }
    }
    assert_eq!(paged, both);

    assert_eq!(
        versions(&w, ME, &across(&[VersionSpec::Number(1)], vec![])),
        Err("InvalidParameterValue".to_string()),
        "numbers need a template"
    );
    assert_eq!(
        versions(&w, ME, &VersionQuery::default()),
        Err("MissingParameter".to_string())
    );
    let too_many = VersionQuery {
        page: Page {
            max_results: Some(201),
            next_token: None,
        },
        ..across(&[latest], vec![])
    };
    assert_eq!(
        versions(&w, ME, &too_many),
        Err("InvalidParameterValue".to_string())
    );
}

#[test]
fn one_template_versions_defaults_and_deletion() {
    let mut w = World::new();
    let (a, b) = (w.seed("image-a"), w.seed("image-b"));
    let ids = templates(&mut w, &a, &b);
    let web = TemplateRef::Id(ids[0].clone());
    let of_web = |specs: &[VersionSpec]| VersionQuery {
        template: Some(web.clone()),
        versions: specs.to_vec(),
        ..VersionQuery::default()
    };
    assert_eq!(
        versions(&w, ME, &of_web(&[])),
        Ok(vec![v("web", 1, true), v("web", 2, false)]),
        "no versions given: all of them"
    );
    assert_eq!(
        versions(&w, ME, &of_web(&[VersionSpec::Number(9)])),
        Err("InvalidLaunchTemplateId.VersionNotFound".to_string())
    );

    let me = caller(ME);
    let ctx = at(&w.config, &me, T0);
    let template = w
        .state
        .modify_launch_template(&ctx, &web, Some(VersionSpec::Number(2)))
        .unwrap();
    assert_eq!(
        (template.default_version, template.latest_version()),
        (2, 2)
    );
    assert_eq!(
        code(
            w.state
                .modify_launch_template(&ctx, &web, Some(VersionSpec::Number(3)))
        ),
        "InvalidLaunchTemplateId.VersionNotFound"
    );
    let from_first = CreateLaunchTemplateVersion {
        template: TemplateRef::Name("web".to_string()),
        source_version: Some(VersionSpec::Number(1)),
        version_description: None,
        image_id: None,
    };
    let third = w
        .state
        .create_launch_template_version(&ctx, from_first)
        .unwrap();
    assert_eq!(third.version.number, 3);
    assert_eq!(
        third.version.image_id.as_deref(),
        Some(a.as_str()),
        "from its source"
    );
    assert_eq!(
        versions(
            &w,
            ME,
            &of_web(&[VersionSpec::Default, VersionSpec::Latest])
        ),
        Ok(vec![v("web", 2, true), v("web", 3, false)])
    );

    let taken = CreateLaunchTemplate {
        name: "web".to_string(),
        ..CreateLaunchTemplate::default()
    };
    assert_eq!(
        code(w.state.create_launch_template(&ctx, taken.clone())),
        "InvalidLaunchTemplateName.AlreadyExistsException"
    );
    let elsewhere = Caller {
        region: "eu-west-1".to_string(),
        ..caller(ME)
    };
    w.state
        .create_launch_template(&at(&w.config, &elsewhere, T0), taken)
        .expect("names are per region");
    let bad_name = CreateLaunchTemplate {
        name: "no spaces".to_string(),
        ..CreateLaunchTemplate::default()
    };
    assert_eq!(
        code(w.state.create_launch_template(&ctx, bad_name)),
        "InvalidLaunchTemplateName.MalformedException"
    );

    let deleted = w
        .state
        .delete_launch_template(&ctx, &TemplateRef::Name("web".to_string()))
        .unwrap();
    assert_eq!(deleted.id, ids[0]);
    assert_eq!(
        versions(&w, ME, &of_web(&[])),
        Err("InvalidLaunchTemplateId.NotFound".to_string())
    );
    let by_name = VersionQuery {
        template: Some(TemplateRef::Name("web".to_string())),
        ..VersionQuery::default()
    };
    assert_eq!(
        versions(&w, ME, &by_name),
        Err("InvalidLaunchTemplateName.NotFoundException".to_string())
    );
    let malformed = VersionQuery {
        template: Some(TemplateRef::Id("lt-nothex".to_string())),
        ..VersionQuery::default()
    };
    assert_eq!(
        versions(&w, ME, &malformed),
        Err("InvalidLaunchTemplateId.Malformed".to_string())
    );
}
