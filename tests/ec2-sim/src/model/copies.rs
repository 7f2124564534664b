//! Image copies: starting one (with ClientToken idempotency, encryption and
//! the concurrent-copy limit) and completing it when its time comes.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::images::{BlockDevice, EbsDevice, Image, ImageSource, ImageState, StateReason};
use super::kms::{default_ebs_key, resolve_kms_key};
use super::protection::DeregistrationProtection;
use super::snapshots::{Snapshot, SnapshotState};
use super::tags::{TagSpec, Tags, merge_tags, tags_for};
use super::{Ctx, State, check_description};
use crate::wire::{ApiError, ApiResult};

/// A copy in flight: when it ends, and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyTask {
    #[serde(with = "time::serde::rfc3339")]
    pub ready_at: OffsetDateTime,
    pub failure: Option<StateReason>,
}

/// The parameters of `CopyImage`; equality decides ClientToken replays.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyImage {
    pub source_region: String,
    pub source_image_id: String,
    pub name: String,
    pub description: Option<String>,
    pub encrypted: Option<bool>,
    pub kms_key_id: Option<String>,
    pub client_token: Option<String>,
    pub copy_image_tags: bool,
    pub tag_specs: Vec<TagSpec>,
    pub snapshot_copy_completion_minutes: Option<i64>,
}

/// A ClientToken counts only in the account and region it was used in.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct TokenKey {
    account: String,
    region: String,
    token: String,
}

impl State {
    /// Copies running, in every region and account.
    pub fn copies_running(&self) -> usize {
        self.copying.len()
    }

    /// Copies running in `region` for `account`.
    fn copies_in_flight(&self, region: &str, account: &str) -> usize {
        self.copies_in_flight
            .get(&(region.to_string(), account.to_string()))
            .copied()
            .unwrap_or(0)
    }

    pub(super) fn copy_done(
        &mut self,
        ready_at: OffsetDateTime,
        id: &str,
        region: &str,
        owner: &str,
    ) {
        self.copying.remove(&(ready_at, id.to_string()));
        if let Some(n) = self
            .copies_in_flight
            .get_mut(&(region.to_string(), owner.to_string()))
        {
            *n = n.saturating_sub(1);
        }
    }

    /// Makes every running copy due at `now` (and so complete on the next
    /// tick).
    pub fn finish_copies(&mut self, now: OffsetDateTime) {
        for (_, id) in std::mem::take(&mut self.copying) {
            if let Some(task) = self.images.get_mut(&id).and_then(|i| i.copy.as_mut()) {
                task.ready_at = now;
            }
            self.copying.insert((now, id));
        }
        self.tick(now);
    }

    /// Completes the copies whose time has come, and lets every call see
    /// what has propagated by now.
    pub fn tick(&mut self, now: OffsetDateTime) {
        self.settle(now);
        let due: Vec<(OffsetDateTime, String)> = self
            .copying
            .iter()
            .take_while(|(ready_at, _)| *ready_at <= now)
            .cloned()
            .collect();
        for (ready_at, id) in due {
            let image = self
                .images
                .get_mut(&id)
                .expect("a running copy is an image");
            let task = image.copy.take().expect("a running copy has a task");
            let (region, owner) = (image.region.clone(), image.owner.clone());
            self.copy_done(ready_at, &id, &region, &owner);
            let image = self
                .images
                .get_mut(&id)
                .expect("a running copy is an image");
            let snapshot_state = match task.failure {
                None => {
                    image.state = ImageState::Available;
                    SnapshotState::Completed
                }
                Some(reason) => {
                    image.state = ImageState::Failed;
                    image.state_reason = Some(reason);
                    SnapshotState::Error
                }
            };
            let snapshot_ids: Vec<String> = image.snapshot_ids().map(str::to_string).collect();
            for snapshot_id in snapshot_ids {
                if let Some(s) = self.snapshots.get_mut(&snapshot_id) {
                    s.state = snapshot_state;
                }
            }
        }
    }

    /// Starts a copy into the caller's region. `failure` is asked once, only
    /// when a new copy really starts, whether that copy is doomed.
    pub fn copy_image(
        &mut self,
        ctx: &Ctx,
        req: CopyImage,
        copy_duration: std::time::Duration,
        failure: &mut dyn FnMut() -> Option<StateReason>,
    ) -> ApiResult<String> {
        let token_key = req.client_token.as_ref().map(|token| TokenKey {
            account: ctx.account().to_string(),
            region: ctx.region().to_string(),
            token: token.clone(),
        });
        let fingerprint = CopyImage {
            client_token: None,
            ..req.clone()
        };
        if let Some(key) = &token_key
            && let Some(image_id) = self.replayed_copy(key, &fingerprint)?
        {
            return Ok(image_id);
        }
        let plan = self.plan_copy(ctx, &req)?;
        self.admit_copy(ctx)?;
        let id = self.start_copy(ctx, &plan, ctx.now + copy_duration, failure);
        if let Some(key) = token_key {
            self.tokens.insert(key, (fingerprint, id.clone()));
        }
        Ok(id)
    }

    /// The image an earlier request with this ClientToken started, if any;
    /// an error when that request asked for something else.
    fn replayed_copy(&self, key: &TokenKey, fingerprint: &CopyImage) -> ApiResult<Option<String>> {
        match self.tokens.get(key) {
            None => Ok(None),
            Some((earlier, image_id)) if earlier == fingerprint => Ok(Some(image_id.clone())),
            Some(_) => Err(ApiError::client(
                "IdempotentParameterMismatch",
                format!(
                    "Arguments on this idempotent request are inconsistent with arguments used in previous request(s) with client token {}.",
                    key.token
                ),
            )),
        }
    }

    /// Checks a copy request against its source and settles what the copy
    /// carries. The order of the checks decides which error a request with
    /// several faults gets.
    fn plan_copy<'a>(&self, ctx: &Ctx, req: &'a CopyImage) -> ApiResult<CopyPlan<'a>> {
        if !ctx.config.is_region(&req.source_region) {
            return Err(ApiError::invalid_value(
                "SourceRegion",
                &req.source_region,
                "Unknown region.",
            ));
        }
        let source = self
            .usable_image(ctx, &req.source_region, &req.source_image_id)?
            .clone();
        check_description(req.description.as_deref())?;
        self.check_name_free(ctx, &req.name)?;
        check_copyable(ctx, &source)?;
        check_completion_minutes(req.snapshot_copy_completion_minutes)?;
        let encryption = CopyEncryption::resolve(ctx, req, &source)?;
        let (image_tags, snapshot_tags) = copy_tags(req, &source)?;
        Ok(CopyPlan {
            req,
            source,
            encryption,
            image_tags,
            snapshot_tags,
        })
    }

    /// Refuses a copy beyond the caller's concurrent-copy limit in its region.
    fn admit_copy(&self, ctx: &Ctx) -> ApiResult<()> {
        let in_flight = self.copies_in_flight(ctx.region(), ctx.account());
        if in_flight >= ctx.config.concurrent_copy_limit {
            return Err(ApiError::client(
                "ResourceLimitExceeded",
                format!(
                    "You have reached the limit of {} concurrent AMI copies in {}; wait for some to complete.",
                    ctx.config.concurrent_copy_limit,
                    ctx.region()
                ),
            ));
        }
        Ok(())
    }

    /// Creates the pending image, and its snapshots, that `tick` completes
    /// at `ready_at`.
    fn start_copy(
        &mut self,
        ctx: &Ctx,
        plan: &CopyPlan,
        ready_at: OffsetDateTime,
        failure: &mut dyn FnMut() -> Option<StateReason>,
    ) -> String {
        let (req, source) = (plan.req, &plan.source);
        let id = self.new_id("ami");
        let block_devices = source
            .block_devices
            .iter()
            .map(|device| self.copy_block_device(ctx, plan, &id, device))
            .collect();
        let image_location = if source.is_ebs() {
            format!("{}/{}", ctx.account(), req.name)
        } else {
            source.image_location.clone()
        };
        let image = Image {
            id: id.clone(),
            region: ctx.region().to_string(),
            owner: ctx.account().to_string(),
            name: req.name.clone(),
            description: req.description.clone(),
            state: ImageState::Pending,
            state_reason: None,
            creation_date: ctx.now,
            architecture: source.architecture.clone(),
            virtualization_type: source.virtualization_type.clone(),
            root_device_type: source.root_device_type.clone(),
            root_device_name: source.root_device_name.clone(),
            image_location,
            block_devices,
            tags: plan.image_tags.clone(),
            launch_permissions: Vec::new(),
            billing_products: source.billing_products.clone(),
            ena_support: source.ena_support,
            source: Some(ImageSource {
                image_id: source.id.clone(),
                region: source.region.clone(),
            }),
            deprecation_time: None,
            copy: Some(CopyTask {
                ready_at,
                failure: failure(),
            }),
            // A copy starts unprotected and never launched, whatever its
            // source: neither is copied (CopyImage has no such parameter).
            deregistration_protection: DeregistrationProtection::Disabled,
            last_launched_time: None,
        };
        self.insert_image(image);
        self.propagate(ctx, &id);
        id
    }

    /// One device of the copy of `image_id`, with the encryption the plan
    /// decided; an EBS snapshot behind it is copied too.
    fn copy_block_device(
        &mut self,
        ctx: &Ctx,
        plan: &CopyPlan,
        image_id: &str,
        device: &BlockDevice,
    ) -> BlockDevice {
        let ebs = device.ebs.as_ref().map(|ebs| {
            let encrypted = ebs.encrypted || plan.encryption.all;
            let same_region = plan.source.region == ctx.region();
            let kms_key_id = encrypted.then(|| {
                plan.encryption
                    .key_for(ctx, ebs.kms_key_id.as_ref(), same_region)
            });
            let mut copied = EbsDevice {
                encrypted,
                kms_key_id,
                ..ebs.clone()
            };
            copied.snapshot_id = ebs.snapshot_id.as_ref().map(|source_snapshot| {
                self.copy_snapshot(ctx, plan, image_id, source_snapshot, &copied)
            });
            copied
        });
        BlockDevice {
            ebs,
            ..device.clone()
        }
    }

    /// A pending copy of `source_snapshot` for the image `image_id`, whose
    /// volume will be `volume`.
    fn copy_snapshot(
        &mut self,
        ctx: &Ctx,
        plan: &CopyPlan,
        image_id: &str,
        source_snapshot: &str,
        volume: &EbsDevice,
    ) -> String {
        let snapshot_id = self.new_id("snap");
        let description = format!(
            "Copied for DestinationAmi {image_id} from SourceAmi {} for SourceSnapshot {source_snapshot}. Task created on {}.",
            plan.source.id,
            ctx.now.unix_timestamp()
        );
        self.snapshots.insert(
            snapshot_id.clone(),
            Snapshot {
                id: snapshot_id.clone(),
                region: ctx.region().to_string(),
                owner: ctx.account().to_string(),
                volume_id: "vol-ffffffff".to_string(),
                volume_size: volume.volume_size,
                description,
                state: SnapshotState::Pending,
                start_time: ctx.now,
                encrypted: volume.encrypted,
                kms_key_id: volume.kms_key_id.clone(),
                tags: plan.snapshot_tags.clone(),
                create_volume_permissions: Vec::new(),
                completion_duration_minutes: plan.req.snapshot_copy_completion_minutes,
            },
        );
        self.propagate(ctx, &snapshot_id);
        snapshot_id
    }
}

/// What a valid `CopyImage` request copies, and how.
struct CopyPlan<'a> {
    req: &'a CopyImage,
    source: Image,
    encryption: CopyEncryption,
    image_tags: Tags,
    snapshot_tags: Tags,
}

/// How the EBS volumes of a copy are encrypted.
struct CopyEncryption {
    /// Encrypt every volume, not only those encrypted at the source: the
    /// request asks for it, or the account encrypts new volumes by default.
    all: bool,
    /// The key the request names, as an ARN.
    requested_key: Option<String>,
}

impl CopyEncryption {
    fn resolve(ctx: &Ctx, req: &CopyImage, source: &Image) -> ApiResult<Self> {
        let wants_encryption = req.encrypted == Some(true);
        if !source.is_ebs() && (wants_encryption || req.kms_key_id.is_some()) {
            return Err(ApiError::client(
                "InvalidParameterCombination",
                format!(
                    "Image {} is instance store-backed; encryption applies only to EBS-backed images.",
                    source.id
                ),
            ));
        }
        let requested_key = match &req.kms_key_id {
            Some(_) if !wants_encryption => {
                return Err(ApiError::client(
                    "InvalidParameterDependency",
                    "The parameter KmsKeyId requires the parameter Encrypted to be set.",
                ));
            }
            Some(key) => Some(resolve_kms_key(key, ctx.account(), ctx.region())?),
            None => None,
        };
        Ok(Self {
            all: wants_encryption || ctx.config.encrypts_by_default(ctx.account(), ctx.region()),
            requested_key,
        })
    }

    /// The key an encrypted volume of the copy gets: the requested one, else
    /// the source volume's own key when the copy stays in its region (a key
    /// belongs to one region), else the account's default key.
    fn key_for(&self, ctx: &Ctx, source_key: Option<&String>, same_region: bool) -> String {
        self.requested_key
            .clone()
            .or_else(|| source_key.cloned().filter(|_| same_region))
            .unwrap_or_else(|| default_ebs_key(ctx.account(), ctx.region()))
    }
}

/// Whether the caller's region can take a copy of `source` at all.
fn check_copyable(ctx: &Ctx, source: &Image) -> ApiResult<()> {
    if source.state != ImageState::Available {
        return Err(ApiError::client(
            "IncorrectState",
            format!(
                "Image {} is in state {}; only available images can be copied.",
                source.id,
                source.state.as_str()
            ),
        ));
    }
    if source.owner != ctx.account() && !source.billing_products.is_empty() {
        return Err(ApiError::client(
            "InvalidRequest",
            format!(
                "Image {} has billing products and was shared by another account; such images cannot be copied.",
                source.id
            ),
        ));
    }
    if source.virtualization_type == "paravirtual" && !ctx.config.supports_paravirtual(ctx.region())
    {
        return Err(ApiError::client(
            "UnsupportedOperation",
            format!(
                "Paravirtual images are not supported in {}: {} cannot be copied there.",
                ctx.region(),
                source.id
            ),
        ));
    }
    Ok(())
}

fn check_completion_minutes(minutes: Option<i64>) -> ApiResult<()> {
    match minutes {
        Some(minutes) if !(15..=2880).contains(&minutes) || minutes % 15 != 0 => {
            Err(ApiError::invalid_value(
                "SnapshotCopyCompletionDurationMinutes",
                &minutes.to_string(),
                "Must be a multiple of 15 between 15 and 2880.",
            ))
        }
        _ => Ok(()),
    }
}

/// The copy's image tags (the source's user tags when asked for, with the
/// request's tags winning) and its snapshot tags.
fn copy_tags(req: &CopyImage, source: &Image) -> ApiResult<(Tags, Tags)> {
    let mut image_tags = Tags::new();
    if req.copy_image_tags {
        image_tags.extend(
            source
                .tags
                .iter()
                .filter(|(k, _)| !k.starts_with("aws:"))
                .map(|(k, v)| (k.clone(), v.clone())),
        );
    }
    merge_tags(
        &mut image_tags,
        tags_for(&req.tag_specs, &["image", "snapshot"], "image")?,
    )?;
    let snapshot_tags = tags_for(&req.tag_specs, &["image", "snapshot"], "snapshot")?;
    Ok((image_tags, snapshot_tags))
}
