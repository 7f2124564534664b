//! One function per EC2 action: decode the parameters, apply the model,
//! encode the response.

use std::collections::HashMap;

use time::OffsetDateTime;

use crate::config::SimConfig;
use crate::model::{
    Caller, CopyImage, CreateLaunchTemplate, CreateLaunchTemplateVersion, CreateVolume, Ctx,
    DeviceRequest, EbsRequest, Filter, Image, ImageQuery, Instance, InstanceQuery, InstanceState,
    LaunchTemplate, Page, Permission, PermissionChange, RegisterImage, RunInstances, Snapshot,
    SnapshotQuery, State, StateReason, TagSpec, TemplateRef, VersionQuery, VersionSpec,
    VersionView,
};
use crate::wire::{ApiError, ApiResult, Params, Xml, parse_timestamp, timestamp};

/// Everything an action may touch.
pub struct Env<'a> {
    pub config: &'a SimConfig,
    pub state: &'a mut State,
    pub caller: &'a Caller,
    pub now: OffsetDateTime,
    pub request_id: &'a str,
    /// Asked when a copy starts whether it is to fail.
    pub copy_failure: &'a mut dyn FnMut() -> Option<StateReason>,
}

pub fn dispatch(action: &str, params: &Params, env: Env) -> ApiResult<String> {
    let Env {
        config,
        state,
        caller,
        now,
        request_id,
        copy_failure,
    } = env;
    let ctx = Ctx {
        config,
        caller,
        now,
    };
    let mut xml = Xml::response(action, request_id);
    let x = &mut xml;
    match action {
        "CreateVolume" => create_volume(state, &ctx, params, x)?,
        "CreateSnapshot" => create_snapshot(state, &ctx, params, x)?,
        "RegisterImage" => {
            let id = state.register_image(&ctx, register_request(params)?)?;
            x.field("imageId", id);
        }
        "CopyImage" => {
            let id = state.copy_image(
                &ctx,
                copy_request(params)?,
                config.copy_duration,
                copy_failure,
            )?;
            x.field("imageId", id);
        }
        "DescribeImages" => describe_images(state, &ctx, params, x)?,
        "DeregisterImage" => {
            let id = params.required("ImageId")?;
            let delete = params.bool("DeleteAssociatedSnapshots")?.unwrap_or(false);
            let deletions = state.deregister_image(&ctx, id, delete)?;
            x.field("return", true);
            if delete {
                x.list("deleteSnapshotResultSet", &deletions, |x, d| {
                    x.field("snapshotId", &d.snapshot_id)
                        .field("returnCode", d.return_code);
                });
            }
        }
        "DescribeSnapshots" => describe_snapshots(state, &ctx, params, x)?,
        "DeleteSnapshot" => {
            state.delete_snapshot(&ctx, params.required("SnapshotId")?)?;
            x.field("return", true);
        }
        "CreateTags" => {
            let tags = tag_list(params, "Tag")
                .into_iter()
                .map(|(k, v)| (k, v.unwrap_or_default()))
                .collect::<Vec<_>>();
            state.create_tags(&ctx, &resource_ids(params)?, &tags)?;
            x.field("return", true);
        }
        "DeleteTags" => {
            state.delete_tags(&ctx, &resource_ids(params)?, &tag_list(params, "Tag"))?;
            x.field("return", true);
        }
        "ModifyImageAttribute" => modify_image_attribute(state, &ctx, params, x)?,
        "DescribeImageAttribute" => describe_image_attribute(state, &ctx, params, x)?,
        "ModifySnapshotAttribute" => {
            let id = params.required("SnapshotId")?;
            let attribute = params.get("Attribute").unwrap_or("createVolumePermission");
            if attribute != "createVolumePermission" {
                return Err(ApiError::invalid_value(
                    "Attribute",
                    attribute,
                    "Only createVolumePermission can be modified.",
                ));
            }
            let change = permission_change(params, "CreateVolumePermission")?;
            state.modify_create_volume_permission(&ctx, id, &change)?;
            x.field("return", true);
        }
        "EnableImageDeprecation" => {
            let id = params.required("ImageId")?;
            let at = parse_timestamp("DeprecateAt", params.required("DeprecateAt")?)?;
            state.enable_image_deprecation(&ctx, id, at)?;
            x.field("return", true);
        }
        "EnableImageDeregistrationProtection" => {
            let id = params.required("ImageId")?;
            let with_cooldown = params.bool("WithCooldown")?.unwrap_or(false);
            state.enable_deregistration_protection(&ctx, id, with_cooldown)?;
            x.field("return", true);
        }
        "DisableImageDeregistrationProtection" => {
            state.disable_deregistration_protection(&ctx, params.required("ImageId")?)?;
            x.field("return", true);
        }
        "DisableImage" => {
            state.disable_image(&ctx, params.required("ImageId")?)?;
            x.field("return", true);
        }
        "EnableImage" => {
            state.enable_image(&ctx, params.required("ImageId")?)?;
            x.field("return", true);
        }
        "CreateLaunchTemplate" => create_launch_template(state, &ctx, params, x)?,
        "CreateLaunchTemplateVersion" => create_launch_template_version(state, &ctx, params, x)?,
        "ModifyLaunchTemplate" => {
            let default = params
                .get("SetDefaultVersion")
                .map(|v| VersionSpec::parse("SetDefaultVersion", v))
                .transpose()?;
            let template = state.modify_launch_template(&ctx, &named_template(params)?, default)?;
            write_launch_template(x, template);
        }
        "DeleteLaunchTemplate" => {
            let template = state.delete_launch_template(&ctx, &named_template(params)?)?;
            write_launch_template(x, &template);
        }
        "DescribeLaunchTemplateVersions" => {
            describe_launch_template_versions(state, &ctx, params, x)?;
        }
        "RunInstances" => run_instances(state, &ctx, params, x)?,
        "StartInstances" => change_instance_states(state, &ctx, params, x, InstanceState::Running)?,
        "StopInstances" => change_instance_states(state, &ctx, params, x, InstanceState::Stopped)?,
        "TerminateInstances" => {
            change_instance_states(state, &ctx, params, x, InstanceState::Terminated)?;
        }
        "DescribeInstances" => describe_instances(state, &ctx, params, x)?,
        other => {
            return Err(ApiError::client(
                "InvalidAction",
                format!("The action {other} is not valid for this web service."),
            ));
        }
    }
    Ok(xml.finish())
}

fn tag_specs(params: &Params) -> Vec<TagSpec> {
    params
        .members("TagSpecification")
        .iter()
        .map(|spec| TagSpec {
            resource_type: spec.string("ResourceType").unwrap_or_default(),
            tags: tag_list(spec, "Tag")
                .into_iter()
                .map(|(k, v)| (k, v.unwrap_or_default()))
                .collect(),
        })
        .collect()
}

fn tag_list(params: &Params, prefix: &str) -> Vec<(String, Option<String>)> {
    params
        .members(prefix)
        .iter()
        .filter_map(|t| Some((t.string("Key")?, t.string("Value"))))
        .collect()
}

fn resource_ids(params: &Params) -> ApiResult<Vec<String>> {
    let ids = params.list("ResourceId");
    if ids.is_empty() {
        return Err(ApiError::missing("ResourceId"));
    }
    Ok(ids)
}

fn filters(params: &Params) -> Vec<Filter> {
    params
        .members("Filter")
        .iter()
        .map(|f| Filter {
            name: f.string("Name").unwrap_or_default(),
            values: f.list("Value"),
        })
        .collect()
}

fn page(params: &Params) -> ApiResult<Page> {
    Ok(Page {
        max_results: params.int("MaxResults")?,
        next_token: params.string("NextToken"),
    })
}

fn create_volume(state: &mut State, ctx: &Ctx, params: &Params, x: &mut Xml) -> ApiResult<()> {
    let req = CreateVolume {
        availability_zone: params.required("AvailabilityZone")?.to_string(),
        size: params.int("Size")?,
        snapshot_id: params.string("SnapshotId"),
        volume_type: params.string("VolumeType"),
        encrypted: params.bool("Encrypted")?.unwrap_or(false),
        kms_key_id: params.string("KmsKeyId"),
        tag_specs: tag_specs(params),
    };
    let v = state.create_volume(ctx, req)?;
    x.field("volumeId", &v.id)
        .field("size", v.size)
        .opt("snapshotId", v.snapshot_id.as_ref())
        .field("availabilityZone", &v.availability_zone)
        .field("status", "available")
        .field("createTime", timestamp(v.create_time))
        .field("volumeType", &v.volume_type)
        .field("encrypted", v.encrypted)
        .opt("kmsKeyId", v.kms_key_id.as_ref())
        .field("multiAttachEnabled", false);
    x.open("attachmentSet").close("attachmentSet");
    x.tags(&v.tags);
    Ok(())
}

fn create_snapshot(state: &mut State, ctx: &Ctx, params: &Params, x: &mut Xml) -> ApiResult<()> {
    let snapshot = state.create_snapshot(
        ctx,
        params.required("VolumeId")?,
        params.string("Description"),
        &tag_specs(params),
    )?;
    write_snapshot(x, snapshot);
    Ok(())
}

fn register_request(params: &Params) -> ApiResult<RegisterImage> {
    let block_devices = params
        .members("BlockDeviceMapping")
        .iter()
        .map(|d| {
            let ebs = d.nested("Ebs");
            Ok(DeviceRequest {
                device_name: d.string("DeviceName").unwrap_or_default(),
                virtual_name: d.string("VirtualName"),
                no_device: d.get("NoDevice").is_some(),
                ebs: if ebs.is_empty() {
                    None
                } else {
                    Some(EbsRequest {
                        snapshot_id: ebs.string("SnapshotId"),
                        volume_size: ebs.int("VolumeSize")?,
                        delete_on_termination: ebs.bool("DeleteOnTermination")?,
                        volume_type: ebs.string("VolumeType"),
                    })
                },
            })
        })
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(RegisterImage {
        name: params.required("Name")?.to_string(),
        description: params.string("Description"),
        image_location: params.string("ImageLocation"),
        architecture: params.string("Architecture"),
        virtualization_type: params.string("VirtualizationType"),
        root_device_name: params.string("RootDeviceName"),
        block_devices,
        billing_products: params.list("BillingProduct"),
        ena_support: params.bool("EnaSupport")?.unwrap_or(false),
        tag_specs: tag_specs(params),
    })
}

fn copy_request(params: &Params) -> ApiResult<CopyImage> {
    Ok(CopyImage {
        source_region: params.required("SourceRegion")?.to_string(),
        source_image_id: params.required("SourceImageId")?.to_string(),
        name: params.required("Name")?.to_string(),
        description: params.string("Description"),
        encrypted: params.bool("Encrypted")?,
        kms_key_id: params.string("KmsKeyId"),
        client_token: params.string("ClientToken"),
        copy_image_tags: params.bool("CopyImageTags")?.unwrap_or(false),
        tag_specs: tag_specs(params),
        snapshot_copy_completion_minutes: params.int("SnapshotCopyCompletionDurationMinutes")?,
    })
}

fn describe_images(state: &State, ctx: &Ctx, params: &Params, x: &mut Xml) -> ApiResult<()> {
    let query = ImageQuery {
        image_ids: params.list("ImageId"),
        owners: params.list("Owner"),
        executable_by: params.list("ExecutableBy"),
        filters: filters(params),
        include_deprecated: params.bool("IncludeDeprecated")?.unwrap_or(false),
        include_disabled: params.bool("IncludeDisabled")?.unwrap_or(false),
        page: page(params)?,
    };
    let (images, next) = state.describe_images(ctx, &query)?;
    x.list("imagesSet", &images, |x, image| {
        write_image(x, image, ctx.now)
    });
    x.opt("nextToken", next);
    Ok(())
}

fn describe_snapshots(state: &State, ctx: &Ctx, params: &Params, x: &mut Xml) -> ApiResult<()> {
    let query = SnapshotQuery {
        snapshot_ids: params.list("SnapshotId"),
        owners: params.list("Owner"),
        restorable_by: params.list("RestorableBy"),
        filters: filters(params),
        page: page(params)?,
    };
    let (snapshots, next) = state.describe_snapshots(ctx, &query)?;
    x.list("snapshotSet", &snapshots, |x, s| write_snapshot(x, s));
    x.opt("nextToken", next);
    Ok(())
}

/// Launch or create-volume permissions from either request form: the
/// structured `Prefix.Add.N.Field` lists, or `OperationType` with flat lists.
fn permission_change(params: &Params, prefix: &str) -> ApiResult<PermissionChange> {
    let structured = |which: &str| -> Vec<Permission> {
        params
            .nested(prefix)
            .members(which)
            .iter()
            .flat_map(|p| {
                [
                    p.string("UserId").map(Permission::UserId),
                    p.string("Group").map(Permission::Group),
                    p.string("OrganizationArn").map(Permission::OrganizationArn),
                    p.string("OrganizationalUnitArn")
                        .map(Permission::OrganizationalUnitArn),
                ]
            })
            .flatten()
            .collect()
    };
    let mut change = PermissionChange {
        add: structured("Add"),
        remove: structured("Remove"),
    };
    let flat: Vec<Permission> = params
        .list("UserId")
        .into_iter()
        .map(Permission::UserId)
        .chain(params.list("UserGroup").into_iter().map(Permission::Group))
        .chain(
            params
                .list("OrganizationArn")
                .into_iter()
                .map(Permission::OrganizationArn),
        )
        .chain(
            params
                .list("OrganizationalUnitArn")
                .into_iter()
                .map(Permission::OrganizationalUnitArn),
        )
        .collect();
    match params.get("OperationType") {
        Some("add") => change.add.extend(flat),
        Some("remove") => change.remove.extend(flat),
        Some(other) => {
            return Err(ApiError::invalid_value(
                "OperationType",
                other,
                "Must be add or remove.",
            ));
        }
        None if !flat.is_empty() => return Err(ApiError::missing("OperationType")),
        None => {}
    }
    Ok(change)
}

fn modify_image_attribute(
    state: &mut State,
    ctx: &Ctx,
    params: &Params,
    x: &mut Xml,
) -> ApiResult<()> {
    let id = params.required("ImageId")?;
    let description = params.string("Description.Value").or_else(|| {
        (params.get("Attribute") == Some("description"))
            .then(|| params.string("Value"))
            .flatten()
    });
    match (params.get("Attribute"), description) {
        (_, Some(description)) => state.modify_description(ctx, id, description)?,
        (None | Some("launchPermission"), None) => {
            let change = permission_change(params, "LaunchPermission")?;
            if change.add.is_empty() && change.remove.is_empty() {
                return Err(ApiError::missing("LaunchPermission"));
            }
            state.modify_launch_permission(ctx, id, &change)?;
        }
        (Some(other), None) => {
            return Err(ApiError::invalid_value(
                "Attribute",
                other,
                "Only description and launchPermission can be modified here.",
            ));
        }
    }
    x.field("return", true);
    Ok(())
}

fn describe_image_attribute(
    state: &State,
    ctx: &Ctx,
    params: &Params,
    x: &mut Xml,
) -> ApiResult<()> {
    let attribute = params.required("Attribute")?;
    let image = state.image(ctx, params.required("ImageId")?)?;
    x.field("imageId", &image.id);
    match attribute {
        "description" => {
            x.open("description");
            x.opt("value", image.description.as_ref());
            x.close("description");
        }
        "launchPermission" => {
            x.list("launchPermission", &image.launch_permissions, |x, p| {
                let (name, value) = match p {
                    Permission::UserId(v) => ("userId", v),
                    Permission::Group(v) => ("group", v),
                    Permission::OrganizationArn(v) => ("organizationArn", v),
                    Permission::OrganizationalUnitArn(v) => ("organizationalUnitArn", v),
                };
                x.field(name, value);
            });
        }
        "productCodes" => write_product_codes(x, image),
        "blockDeviceMapping" => write_block_devices(x, image),
        other => {
            return Err(ApiError::invalid_value(
                "attribute",
                other,
                "Unknown attribute.",
            ));
        }
    }
    Ok(())
}

fn write_product_codes(x: &mut Xml, image: &Image) {
    x.list("productCodes", &image.billing_products, |x, code| {
        x.field("productCode", code).field("type", "marketplace");
    });
}

fn write_block_devices(x: &mut Xml, image: &Image) {
    x.list("blockDeviceMapping", &image.block_devices, |x, d| {
        x.field("deviceName", &d.device_name);
        x.opt("virtualName", d.virtual_name.as_ref());
        if let Some(ebs) = &d.ebs {
            x.open("ebs")
                .opt("snapshotId", ebs.snapshot_id.as_ref())
                .field("volumeSize", ebs.volume_size)
                .field("deleteOnTermination", ebs.delete_on_termination)
                .field("volumeType", &ebs.volume_type)
                .field("encrypted", ebs.encrypted)
                .opt("kmsKeyId", ebs.kms_key_id.as_ref())
                .close("ebs");
        }
    });
}

/// `now` decides whether a deregistration-protection cooldown still runs.
pub fn write_image(x: &mut Xml, image: &Image, now: OffsetDateTime) {
    x.field("imageId", &image.id)
        .field("imageLocation", &image.image_location)
        .field("imageState", image.state.as_str())
        .field("imageOwnerId", &image.owner)
        .field("creationDate", timestamp(image.creation_date))
        .field("isPublic", image.is_public())
        .field("architecture", &image.architecture)
        .field("imageType", "machine")
        .field("name", &image.name)
        .opt("description", image.description.as_ref())
        .field("rootDeviceType", &image.root_device_type)
        .opt("rootDeviceName", image.root_device_name.as_ref())
        .field("virtualizationType", &image.virtualization_type)
        .field("hypervisor", "xen")
        .field("enaSupport", image.ena_support)
        .field("platformDetails", "Linux/UNIX")
        .field("usageOperation", "RunInstances");
    write_block_devices(x, image);
    write_product_codes(x, image);
    x.tags(&image.tags);
    if let Some(reason) = &image.state_reason {
        x.open("stateReason")
            .field("code", &reason.code)
            .field("message", &reason.message)
            .close("stateReason");
    }
    if let Some(source) = &image.source {
        x.field("sourceImageId", &source.image_id)
            .field("sourceImageRegion", &source.region);
    }
    x.opt("deprecationTime", image.deprecation_time.map(timestamp));
    x.field(
        "deregistrationProtection",
        image.deregistration_protection.describe(now),
    );
    x.opt("lastLaunchedTime", image.last_launched_time.map(timestamp));
}

pub fn write_snapshot(x: &mut Xml, s: &Snapshot) {
    let progress = match s.state {
        crate::model::SnapshotState::Completed => "100%",
        _ => "0%",
    };
    x.field("snapshotId", &s.id)
        .field("volumeId", &s.volume_id)
        .field("status", s.state.as_str())
        .field("startTime", timestamp(s.start_time))
        .field("progress", progress)
        .field("ownerId", &s.owner)
        .field("volumeSize", s.volume_size)
        .field("description", &s.description)
        .field("encrypted", s.encrypted)
        .opt("kmsKeyId", s.kms_key_id.as_ref())
        .field("storageTier", "standard")
        .opt("completionDurationMinutes", s.completion_duration_minutes);
    x.tags(&s.tags);
}

/// The launch template a call names, if it names one; by ID or by name,
/// not both.
fn template_ref(params: &Params) -> ApiResult<Option<TemplateRef>> {
    match (
        params.string("LaunchTemplateId"),
        params.string("LaunchTemplateName"),
    ) {
        (Some(_), Some(_)) => Err(ApiError::client(
            "InvalidParameterCombination",
            "Specify either LaunchTemplateId or LaunchTemplateName, not both.",
        )),
        (Some(id), None) => Ok(Some(TemplateRef::Id(id))),
        (None, Some(name)) => Ok(Some(TemplateRef::Name(name))),
        (None, None) => Ok(None),
    }
}

fn named_template(params: &Params) -> ApiResult<TemplateRef> {
    template_ref(params)?.ok_or_else(|| ApiError::missing("LaunchTemplateId or LaunchTemplateName"))
}

fn create_launch_template(
    state: &mut State,
    ctx: &Ctx,
    params: &Params,
    x: &mut Xml,
) -> ApiResult<()> {
    let req = CreateLaunchTemplate {
        name: params.required("LaunchTemplateName")?.to_string(),
        version_description: params.string("VersionDescription"),
        image_id: params.string("LaunchTemplateData.ImageId"),
    };
    write_launch_template(x, state.create_launch_template(ctx, req)?);
    Ok(())
}

fn create_launch_template_version(
    state: &mut State,
    ctx: &Ctx,
    params: &Params,
    x: &mut Xml,
) -> ApiResult<()> {
    let req = CreateLaunchTemplateVersion {
        template: named_template(params)?,
        source_version: params
            .get("SourceVersion")
            .map(|v| VersionSpec::parse("SourceVersion", v))
            .transpose()?,
        version_description: params.string("VersionDescription"),
        image_id: params.string("LaunchTemplateData.ImageId"),
    };
    let version = state.create_launch_template_version(ctx, req)?;
    x.open("launchTemplateVersion");
    write_launch_template_version(x, &version);
    x.close("launchTemplateVersion");
    Ok(())
}

fn describe_launch_template_versions(
    state: &State,
    ctx: &Ctx,
    params: &Params,
    x: &mut Xml,
) -> ApiResult<()> {
    let query = VersionQuery {
        template: template_ref(params)?,
        versions: params
            .list("LaunchTemplateVersion")
            .iter()
            .map(|v| VersionSpec::parse("LaunchTemplateVersion", v))
            .collect::<ApiResult<_>>()?,
        filters: filters(params),
        page: page(params)?,
    };
    let (versions, next) = state.describe_launch_template_versions(ctx, &query)?;
    x.list("launchTemplateVersionSet", &versions, |x, v| {
        write_launch_template_version(x, v);
    });
    x.opt("nextToken", next);
    Ok(())
}

fn created_by(account: &str) -> String {
    format!("arn:aws:iam::{account}:root")
}

fn write_launch_template(x: &mut Xml, t: &LaunchTemplate) {
    x.open("launchTemplate")
        .field("launchTemplateId", &t.id)
        .field("launchTemplateName", &t.name)
        .field("createTime", timestamp(t.create_time))
        .field("createdBy", created_by(&t.owner))
        .field("defaultVersionNumber", t.default_version)
        .field("latestVersionNumber", t.latest_version())
        .close("launchTemplate");
}

fn write_launch_template_version(x: &mut Xml, v: &VersionView) {
    x.field("launchTemplateId", &v.template.id)
        .field("launchTemplateName", &v.template.name)
        .field("versionNumber", v.version.number)
        .opt("versionDescription", v.version.description.as_ref())
        .field("createTime", timestamp(v.version.create_time))
        .field("createdBy", created_by(&v.template.owner))
        .field("defaultVersion", v.is_default())
        .open("launchTemplateData")
        .opt("imageId", v.version.image_id.as_ref())
        .close("launchTemplateData");
}

fn run_instances(state: &mut State, ctx: &Ctx, params: &Params, x: &mut Xml) -> ApiResult<()> {
    let count = |name: &str| params.int(name)?.ok_or_else(|| ApiError::missing(name));
    let req = RunInstances {
        image_id: params.required("ImageId")?.to_string(),
        min_count: count("MinCount")?,
        max_count: count("MaxCount")?,
        instance_type: params.string("InstanceType"),
    };
    let instances = state.run_instances(ctx, req)?;
    let reservation_id = instances
        .first()
        .map(|i| i.reservation_id.clone())
        .unwrap_or_default();
    x.field("reservationId", reservation_id)
        .field("ownerId", ctx.account());
    x.open("groupSet").close("groupSet");
    x.list("instancesSet", &instances, write_instance);
    Ok(())
}

fn change_instance_states(
    state: &mut State,
    ctx: &Ctx,
    params: &Params,
    x: &mut Xml,
    target: InstanceState,
) -> ApiResult<()> {
    let changes = state.change_instance_states(ctx, &params.list("InstanceId"), target)?;
    x.list("instancesSet", &changes, |x, change| {
        x.field("instanceId", &change.instance_id);
        write_instance_state(x, "currentState", change.current);
        write_instance_state(x, "previousState", change.previous);
    });
    Ok(())
}

fn describe_instances(state: &State, ctx: &Ctx, params: &Params, x: &mut Xml) -> ApiResult<()> {
    let query = InstanceQuery {
        instance_ids: params.list("InstanceId"),
        filters: filters(params),
        page: page(params)?,
    };
    let (instances, next) = state.describe_instances(ctx, &query)?;
    // A page's instances grouped by reservation, in the order they come;
    // a reservation split by a page boundary shows on both pages.
    let mut reservations: Vec<Vec<&Instance>> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for instance in instances {
        match index.get(instance.reservation_id.as_str()) {
            Some(&i) => reservations[i].push(instance),
            None => {
                index.insert(&instance.reservation_id, reservations.len());
                reservations.push(vec![instance]);
            }
        }
    }
    x.list("reservationSet", &reservations, |x, instances| {
        if let Some(first) = instances.first() {
            x.field("reservationId", &first.reservation_id)
                .field("ownerId", &first.owner);
        }
        x.open("groupSet").close("groupSet");
        x.list("instancesSet", instances, |x, i| write_instance(x, i));
    });
    x.opt("nextToken", next);
    Ok(())
}

fn write_instance_state(x: &mut Xml, name: &str, state: InstanceState) {
    x.open(name)
        .field("code", state.code())
        .field("name", state.as_str())
        .close(name);
}

fn write_instance(x: &mut Xml, i: &Instance) {
    x.field("instanceId", &i.id).field("imageId", &i.image_id);
    write_instance_state(x, "instanceState", i.state);
    x.field("instanceType", &i.instance_type)
        .field("launchTime", timestamp(i.launch_time))
        .field("amiLaunchIndex", i.ami_launch_index);
}
