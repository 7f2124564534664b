//! One function per EC2 action: decode the parameters, apply the model,
//! encode the response.

use time::OffsetDateTime;

use crate::config::SimConfig;
use crate::model::{
    Caller, CopyImage, CreateVolume, Ctx, DeviceRequest, EbsRequest, Filter, Image, ImageQuery,
    Page, Permission, PermissionChange, RegisterImage, Snapshot, SnapshotQuery, State, StateReason,
    TagSpec,
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
        page: page(params)?,
    };
    let (images, next) = state.describe_images(ctx, &query)?;
    x.list("imagesSet", &images, |x, image| write_image(x, image));
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

pub fn write_image(x: &mut Xml, image: &Image) {
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
