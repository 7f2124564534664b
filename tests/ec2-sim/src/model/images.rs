//! Images: registering, describing, disabling and deregistering them, and
//! the attributes their owner may change.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::copies::CopyTask;
use super::permissions::Permission;
use super::protection::{DeregistrationProtection, check_deregistrable};
use super::query::{
    Filter, Page, among, check_page, is_literal, matches_filters, named_ids, paginate,
    resolve_owners, tag_filter_values,
};
use super::tags::{TagSpec, Tags, tags_for};
use super::{Ctx, State, check_description, is_hex_id};
use crate::wire::{ApiError, ApiResult};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageState {
    Pending,
    Available,
    Failed,
    Disabled,
    /// Only for the while DescribeImages still returns a deregistered image.
    Deregistered,
}

impl ImageState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Available => "available",
            Self::Failed => "failed",
            Self::Disabled => "disabled",
            Self::Deregistered => "deregistered",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateReason {
    pub code: String,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EbsDevice {
    pub snapshot_id: Option<String>,
    pub volume_size: i64,
    pub delete_on_termination: bool,
    pub volume_type: String,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDevice {
    pub device_name: String,
    pub virtual_name: Option<String>,
    pub ebs: Option<EbsDevice>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSource {
    pub image_id: String,
    pub region: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub id: String,
    pub region: String,
    pub owner: String,
    pub name: String,
    pub description: Option<String>,
    pub state: ImageState,
    pub state_reason: Option<StateReason>,
    #[serde(with = "time::serde::rfc3339")]
    pub creation_date: OffsetDateTime,
    pub architecture: String,
    pub virtualization_type: String,
    pub root_device_type: String,
    pub root_device_name: Option<String>,
    pub image_location: String,
    pub block_devices: Vec<BlockDevice>,
    pub tags: Tags,
    pub launch_permissions: Vec<Permission>,
    pub billing_products: Vec<String>,
    pub ena_support: bool,
    pub source: Option<ImageSource>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub deprecation_time: Option<OffsetDateTime>,
    pub copy: Option<CopyTask>,
    #[serde(default)]
    pub deregistration_protection: DeregistrationProtection,
    /// When RunInstances last launched from it. EC2 reports a launch some
    /// 24 hours late; the simulator reports it at once, so that a test need
    /// not wait a day for what it would then see.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_launched_time: Option<OffsetDateTime>,
}

impl Image {
    pub fn is_public(&self) -> bool {
        self.launch_permissions
            .contains(&Permission::Group("all".to_string()))
    }

    pub fn is_ebs(&self) -> bool {
        self.root_device_type == "ebs"
    }

    pub fn snapshot_ids(&self) -> impl Iterator<Item = &str> {
        self.block_devices
            .iter()
            .filter_map(|d| d.ebs.as_ref()?.snapshot_id.as_deref())
    }

    /// Whether `account` may see and launch (and so copy) this image.
    pub fn usable_by(&self, account: &str) -> bool {
        self.owner == account
            || self.is_public()
            || self
                .launch_permissions
                .contains(&Permission::UserId(account.to_string()))
    }

    pub fn is_deprecated(&self, now: OffsetDateTime) -> bool {
        self.deprecation_time.is_some_and(|t| t <= now)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageQuery {
    pub image_ids: Vec<String>,
    pub owners: Vec<String>,
    pub executable_by: Vec<String>,
    pub filters: Vec<Filter>,
    pub include_deprecated: bool,
    /// Disabled images are left out unless asked for, by ID too.
    pub include_disabled: bool,
    pub page: Page,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EbsRequest {
    pub snapshot_id: Option<String>,
    pub volume_size: Option<i64>,
    pub delete_on_termination: Option<bool>,
    pub volume_type: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceRequest {
    pub device_name: String,
    pub virtual_name: Option<String>,
    pub no_device: bool,
    pub ebs: Option<EbsRequest>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegisterImage {
    pub name: String,
    pub description: Option<String>,
    pub image_location: Option<String>,
    pub architecture: Option<String>,
    pub virtualization_type: Option<String>,
    pub root_device_name: Option<String>,
    pub block_devices: Vec<DeviceRequest>,
    pub billing_products: Vec<String>,
    pub ena_support: bool,
    pub tag_specs: Vec<TagSpec>,
}

/// Outcome of one snapshot deletion during `DeregisterImage`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotDeletion {
    pub snapshot_id: String,
    pub return_code: &'static str,
}

fn not_found_image(ids: &[&str]) -> ApiError {
    let message = match ids {
        [one] => format!("The image id '[{one}]' does not exist"),
        many => format!("The image ids '[{}]' do not exist", many.join(", ")),
    };
    ApiError::client("InvalidAMIID.NotFound", message)
}

pub fn check_image_id(id: &str) -> ApiResult<()> {
    if is_hex_id(id, "ami-") {
        Ok(())
    } else {
        Err(ApiError::client(
            "InvalidAMIID.Malformed",
            format!("Invalid id: \"{id}\" (expecting \"ami-...\")"),
        ))
    }
}

/// AMI names: 3 to 128 characters from a restricted set.
pub fn check_image_name(name: &str) -> ApiResult<()> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(c);
    let len = name.chars().count();
    if !(3..=128).contains(&len) {
        return Err(ApiError::client(
            "InvalidAMIName.Malformed",
            format!(
                "AMI names must be between 3 and 128 characters long, and may contain letters, numbers, '(', ')', '.', '-', '/' and '_': {name}"
            ),
        ));
    }
    if let Some(bad) = name.chars().find(|c| !allowed(*c)) {
        return Err(ApiError::client(
            "InvalidAMIName.Malformed",
            format!(
                "Character sets beyond ASCII are not supported, and '{bad}' is not allowed in AMI names: {name}"
            ),
        ));
    }
    Ok(())
}

/// The values a filter named `name` matches on `image`, whose tags it sees
/// as `tags`.
fn image_filter_values(image: &Image, tags: &Tags, name: &str) -> Option<Vec<String>> {
    let one = |v: &str| Some(vec![v.to_string()]);
    if let Some(values) = tag_filter_values(tags, name) {
        return Some(values);
    }
    let ebs = || image.block_devices.iter().filter_map(|d| d.ebs.as_ref());
    match name {
        "image-id" => one(&image.id),
        "name" => one(&image.name),
        "state" => one(image.state.as_str()),
        "owner-id" => one(&image.owner),
        "description" => Some(image.description.clone().into_iter().collect()),
        "architecture" => one(&image.architecture),
        "virtualization-type" => one(&image.virtualization_type),
        "root-device-type" => one(&image.root_device_type),
        "root-device-name" => Some(image.root_device_name.clone().into_iter().collect()),
        "image-type" => one("machine"),
        "is-public" => one(&image.is_public().to_string()),
        "manifest-location" => one(&image.image_location),
        "source-image-id" => Some(image.source.iter().map(|s| s.image_id.clone()).collect()),
        "source-image-region" => Some(image.source.iter().map(|s| s.region.clone()).collect()),
        "block-device-mapping.snapshot-id" => {
            Some(ebs().filter_map(|e| e.snapshot_id.clone()).collect())
        }
        "block-device-mapping.encrypted" => Some(ebs().map(|e| e.encrypted.to_string()).collect()),
        "block-device-mapping.volume-type" => Some(ebs().map(|e| e.volume_type.clone()).collect()),
        "product-code" => Some(image.billing_products.clone()),
        _ => None,
    }
}

impl State {
    /// Every new image goes through here, so that the indexes know of it.
    pub(super) fn insert_image(&mut self, image: Image) {
        if let Some(task) = &image.copy {
            self.copying.insert((task.ready_at, image.id.clone()));
            *self
                .copies_in_flight
                .entry((image.region.clone(), image.owner.clone()))
                .or_default() += 1;
        }
        self.index_tags(&image.id, &image.tags);
        self.images.insert(image.id.clone(), image);
    }

    fn remove_image(&mut self, id: &str) -> Option<Image> {
        let image = self.images.remove(id)?;
        if let Some(task) = &image.copy {
            self.copy_done(task.ready_at, &image.id, &image.region, &image.owner);
        }
        self.unindex_tags(id, &image.tags);
        Some(image)
    }

    /// The image `id` in `region`, if the caller may use it and it is known
    /// to calls by now.
    pub(super) fn usable_image(&self, ctx: &Ctx, region: &str, id: &str) -> ApiResult<&Image> {
        check_image_id(id)?;
        self.images
            .get(id)
            .filter(|i| i.region == region && i.usable_by(ctx.account()))
            .filter(|_| self.propagated(id, ctx.now))
            .ok_or_else(|| not_found_image(&[id]))
    }

    pub(super) fn owned_image_mut(&mut self, ctx: &Ctx, id: &str) -> ApiResult<&mut Image> {
        self.usable_image(ctx, ctx.region(), id)?;
        let image = self.images.get_mut(id).expect("checked above");
        if image.owner != ctx.account() {
            return Err(ApiError::client(
                "AuthFailure",
                format!("Not authorized for image:{id}"),
            ));
        }
        Ok(image)
    }

    /// The image in `region` of `account` that already carries `name`.
    fn image_named(&self, region: &str, account: &str, name: &str) -> Option<&Image> {
        self.images
            .values()
            .find(|i| i.region == region && i.owner == account && i.name == name)
    }

    pub(super) fn check_name_free(&self, ctx: &Ctx, name: &str) -> ApiResult<()> {
        check_image_name(name)?;
        match self.image_named(ctx.region(), ctx.account(), name) {
            Some(other) => Err(ApiError::client(
                "InvalidAMIName.Duplicate",
                format!("AMI name {name} is already in use by AMI {}", other.id),
            )),
            None => Ok(()),
        }
    }

    /// The most images `query` can select when it names them: by
    /// `ImageIds`, or by an `image-id` or `tag:` filter without wildcards.
    /// `None` when any image may match.
    fn image_candidates<'a>(&'a self, query: &'a ImageQuery) -> Option<BTreeSet<&'a str>> {
        let mut narrowest = named_ids(&query.image_ids, &query.filters, "image-id");
        if !query.image_ids.is_empty() {
            return narrowest;
        }
        for filter in &query.filters {
            let Some(key) = filter.name.strip_prefix("tag:") else {
                continue;
            };
            if !filter.values.iter().all(|v| is_literal(v)) {
                continue;
            }
            let ids: BTreeSet<&str> = filter
                .values
                .iter()
                .filter_map(|v| self.images_by_tag.get(&(key.to_string(), v.clone())))
                .flatten()
                .map(String::as_str)
                // The index holds tags as they are; a tag filter may still
                // see what they were.
                .chain(self.tags_in_flight())
                .collect();
            if narrowest.as_ref().is_none_or(|n| ids.len() < n.len()) {
                narrowest = Some(ids);
            }
        }
        narrowest
    }

    pub fn register_image(&mut self, ctx: &Ctx, req: RegisterImage) -> ApiResult<String> {
        self.check_name_free(ctx, &req.name)?;
        check_description(req.description.as_deref())?;
        let tags = tags_for(&req.tag_specs, &["image"], "image")?;
        let mut block_devices = Vec::new();
        for device in &req.block_devices {
            if device.no_device {
                continue;
            }
            let ebs = match &device.ebs {
                None => None,
                Some(ebs) => Some(self.registered_ebs(ctx, ebs)?),
            };
            block_devices.push(BlockDevice {
                device_name: device.device_name.clone(),
                virtual_name: device.virtual_name.clone(),
                ebs,
            });
        }
        let (root_device_type, image_location) = match &req.image_location {
            Some(location) => ("instance-store", location.clone()),
            None => {
                let root = req
                    .root_device_name
                    .as_deref()
                    .ok_or_else(|| ApiError::missing("RootDeviceName"))?;
                let has_root = block_devices.iter().any(|d| {
                    d.device_name == root && d.ebs.as_ref().is_some_and(|e| e.snapshot_id.is_some())
                });
                if !has_root {
                    return Err(ApiError::client(
                        "InvalidBlockDeviceMapping",
                        format!(
                            "The root device {root} needs an EBS snapshot in the block device mapping"
                        ),
                    ));
                }
                ("ebs", format!("{}/{}", ctx.account(), req.name))
            }
        };
        let id = self.new_id("ami");
        let image = Image {
            id: id.clone(),
            region: ctx.region().to_string(),
            owner: ctx.account().to_string(),
            name: req.name,
            description: req.description,
            state: ImageState::Available,
            state_reason: None,
            creation_date: ctx.now,
            architecture: req.architecture.unwrap_or_else(|| "i386".to_string()),
            virtualization_type: req
                .virtualization_type
                .unwrap_or_else(|| "paravirtual".to_string()),
            root_device_type: root_device_type.to_string(),
            root_device_name: req.root_device_name,
            image_location,
            block_devices,
            tags,
            launch_permissions: Vec::new(),
            billing_products: req.billing_products,
            ena_support: req.ena_support,
            source: None,
            deprecation_time: None,
            copy: None,
            deregistration_protection: DeregistrationProtection::Disabled,
            last_launched_time: None,
        };
        self.insert_image(image);
        self.propagate(ctx, &id);
        Ok(id)
    }

    /// An EBS device to register; it takes its size (unless given) and its
    /// encryption from the snapshot it names.
    fn registered_ebs(&self, ctx: &Ctx, ebs: &EbsRequest) -> ApiResult<EbsDevice> {
        let snapshot = match &ebs.snapshot_id {
            Some(id) => Some(self.usable_snapshot(ctx, id)?),
            None => None,
        };
        let volume_size = ebs
            .volume_size
            .or(snapshot.map(|s| s.volume_size))
            .ok_or_else(|| ApiError::missing("BlockDeviceMapping.Ebs.VolumeSize"))?;
        Ok(EbsDevice {
            snapshot_id: ebs.snapshot_id.clone(),
            volume_size,
            delete_on_termination: ebs.delete_on_termination.unwrap_or(true),
            volume_type: ebs.volume_type.clone().unwrap_or_else(|| "gp2".to_string()),
            encrypted: snapshot.is_some_and(|s| s.encrypted),
            kms_key_id: snapshot.and_then(|s| s.kms_key_id.clone()),
        })
    }

    pub fn describe_images(
        &self,
        ctx: &Ctx,
        query: &ImageQuery,
    ) -> ApiResult<(Vec<&Image>, Option<String>)> {
        if !query.image_ids.is_empty() && query.page != Page::default() {
            return Err(ApiError::client(
                "InvalidParameterCombination",
                "The parameter ImageIds cannot be used with the parameter MaxResults or NextToken",
            ));
        }
        check_page(&query.page, 1..=1000)?;
        for id in &query.image_ids {
            check_image_id(id)?;
        }
        let missing: Vec<&str> = query
            .image_ids
            .iter()
            .map(String::as_str)
            .filter(|id| {
                self.usable_image(ctx, ctx.region(), id).is_err()
                    && !self.deregistered.contains(*id)
            })
            .collect();
        if !missing.is_empty() {
            return Err(not_found_image(&missing));
        }
        let selection = Selection::new(*ctx, query);
        let candidates = self.image_candidates(query);
        let live =
            among(&self.images, candidates.as_ref()).filter(|(id, _)| self.propagated(id, ctx.now));
        // A recently deregistered image is returned only to a query that
        // names it, by ImageIds or an image-id filter.
        let named = named_ids(&query.image_ids, &query.filters, "image-id");
        let names_ids =
            !query.image_ids.is_empty() || query.filters.iter().any(|f| f.name == "image-id");
        let buried = self
            .recently_deregistered(named.as_ref(), ctx.now)
            .filter(|_| names_ids);
        let mut selected = Vec::new();
        for (id, image) in live.chain(buried) {
            if selection.admits(image, self.filter_tags(id, &image.tags, ctx.now))? {
                selected.push((id, image));
            }
        }
        // Pages follow ID order; the deregistered images came last.
        selected.sort_by_key(|(id, _)| *id);
        paginate(selected, &query.page)
    }

    pub fn deregister_image(
        &mut self,
        ctx: &Ctx,
        id: &str,
        delete_snapshots: bool,
    ) -> ApiResult<Vec<SnapshotDeletion>> {
        check_image_id(id)?;
        if self.deregistered.contains(id) {
            return Err(ApiError::client(
                "InvalidAMIID.Unavailable",
                format!("The image id '[{id}]' is no longer available"),
            ));
        }
        check_deregistrable(self.owned_image_mut(ctx, id)?, ctx.now)?;
        let image = self.remove_image(id).expect("checked above");
        self.deregistered.insert(id.to_string());
        let mut deletions = Vec::new();
        for snapshot_id in image.snapshot_ids() {
            let still_used = self
                .images
                .values()
                .any(|i| i.snapshot_ids().any(|s| s == snapshot_id));
            let copy_in_flight = image.copy.is_some();
            if copy_in_flight && !still_used {
                // The copy never finished: its half-made snapshots go with it.
                self.snapshots.remove(snapshot_id);
                continue;
            }
            if !delete_snapshots {
                continue;
            }
            let return_code = match self.snapshots.get(snapshot_id) {
                None => "client-error",
                Some(s) if s.owner != ctx.account() => "missing-permissions",
                Some(_) if still_used => "skipped",
                Some(_) => {
                    self.snapshots.remove(snapshot_id);
                    "success"
                }
            };
            deletions.push(SnapshotDeletion {
                snapshot_id: snapshot_id.to_string(),
                return_code,
            });
        }
        self.bury(ctx, image);
        Ok(deletions)
    }

    pub fn image(&self, ctx: &Ctx, id: &str) -> ApiResult<&Image> {
        self.usable_image(ctx, ctx.region(), id)
    }

    pub fn modify_description(
        &mut self,
        ctx: &Ctx,
        id: &str,
        description: String,
    ) -> ApiResult<()> {
        check_description(Some(&description))?;
        self.owned_image_mut(ctx, id)?.description = Some(description);
        Ok(())
    }

    pub fn enable_image_deprecation(
        &mut self,
        ctx: &Ctx,
        id: &str,
        at: OffsetDateTime,
    ) -> ApiResult<()> {
        // EC2 rounds to the nearest minute.
        let seconds = at.unix_timestamp();
        let rounded = (seconds + 30).div_euclid(60) * 60;
        let at = OffsetDateTime::from_unix_timestamp(rounded).expect("in range");
        if at <= ctx.now {
            return Err(ApiError::invalid_value(
                "DeprecateAt",
                &crate::wire::timestamp(at),
                "The deprecation time must be in the future.",
            ));
        }
        if at > ctx.now + time::Duration::days(365 * 10) {
            return Err(ApiError::invalid_value(
                "DeprecateAt",
                &crate::wire::timestamp(at),
                "The deprecation time can be at most 10 years away.",
            ));
        }
        self.owned_image_mut(ctx, id)?.deprecation_time = Some(at);
        Ok(())
    }

    /// DisableImage: only an available image of the caller's; it can no
    /// longer be launched and is private from then on (EC2 removes every
    /// launch permission, and EnableImage does not bring them back). Its
    /// snapshots stay.
    pub fn disable_image(&mut self, ctx: &Ctx, id: &str) -> ApiResult<()> {
        let image = self.owned_image_mut(ctx, id)?;
        check_state(image, ImageState::Available, "disabled")?;
        image.state = ImageState::Disabled;
        image.launch_permissions.clear();
        Ok(())
    }

    /// EnableImage: a disabled image of the caller's is available again.
    pub fn enable_image(&mut self, ctx: &Ctx, id: &str) -> ApiResult<()> {
        let image = self.owned_image_mut(ctx, id)?;
        check_state(image, ImageState::Disabled, "enabled")?;
        image.state = ImageState::Available;
        Ok(())
    }
}

/// Refuses a state change that needs `image` to be in `state` first.
fn check_state(image: &Image, state: ImageState, becoming: &str) -> ApiResult<()> {
    if image.state == state {
        return Ok(());
    }
    Err(ApiError::client(
        "IncorrectState",
        format!(
            "Image {} is in state {}; only {} images can be {becoming}.",
            image.id,
            image.state.as_str(),
            state.as_str()
        ),
    ))
}

/// A DescribeImages query, with its owner lists resolved for the caller.
struct Selection<'a> {
    ctx: Ctx<'a>,
    query: &'a ImageQuery,
    owners: Vec<String>,
    executable_by: Vec<String>,
}

impl<'a> Selection<'a> {
    fn new(ctx: Ctx<'a>, query: &'a ImageQuery) -> Self {
        Self {
            owners: resolve_owners(&query.owners, ctx.account()),
            executable_by: resolve_owners(&query.executable_by, ctx.account()),
            ctx,
            query,
        }
    }

    /// Whether the query returns `image`, whose tags its filters see as
    /// `tags`.
    fn admits(&self, image: &Image, tags: &Tags) -> ApiResult<bool> {
        let (account, query) = (self.ctx.account(), self.query);
        if image.region != self.ctx.region() || !image.usable_by(account) {
            return Ok(false);
        }
        if !query.image_ids.is_empty() && !query.image_ids.contains(&image.id) {
            return Ok(false);
        }
        if !self.owners.is_empty() && !self.owners.contains(&image.owner) {
            return Ok(false);
        }
        let executable = |who: &String| {
            (who == "all" && image.is_public())
                || image
                    .launch_permissions
                    .contains(&Permission::UserId(who.clone()))
                || (who == account && image.is_public())
        };
        if !self.executable_by.is_empty() && !self.executable_by.iter().any(executable) {
            return Ok(false);
        }
        if image.state == ImageState::Disabled && !query.include_disabled {
            return Ok(false);
        }
        if query.image_ids.is_empty()
            && !query.include_deprecated
            && image.owner != account
            && image.is_deprecated(self.ctx.now)
        {
            return Ok(false);
        }
        matches_filters(image, &query.filters, |image, name| {
            image_filter_values(image, tags, name)
        })
    }
}
