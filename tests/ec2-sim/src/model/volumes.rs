//! Volumes, which exist here only to be snapshotted.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::kms::{default_ebs_key, resolve_kms_key};
use super::tags::{TagSpec, Tags, tags_for};
use super::{Ctx, State};
use crate::wire::{ApiError, ApiResult};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub id: String,
    pub region: String,
    pub owner: String,
    pub availability_zone: String,
    pub size: i64,
    pub volume_type: String,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
    pub snapshot_id: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub create_time: OffsetDateTime,
    pub tags: Tags,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CreateVolume {
    pub availability_zone: String,
    pub size: Option<i64>,
    pub snapshot_id: Option<String>,
    pub volume_type: Option<String>,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
    pub tag_specs: Vec<TagSpec>,
}

impl State {
    pub fn create_volume(&mut self, ctx: &Ctx, req: CreateVolume) -> ApiResult<&Volume> {
        let zone_ok = req
            .availability_zone
            .strip_prefix(ctx.region())
            .is_some_and(|z| z.len() == 1 && ('a'..='f').any(|c| z.starts_with(c)));
        if !zone_ok {
            return Err(ApiError::client(
                "InvalidZone.NotFound",
                format!(
                    "The zone '{}' does not exist in region {}.",
                    req.availability_zone,
                    ctx.region()
                ),
            ));
        }
        let from_snapshot = match &req.snapshot_id {
            Some(id) => Some(self.usable_snapshot(ctx, id)?.clone()),
            None => None,
        };
        let size = match (req.size, &from_snapshot) {
            (Some(size), _) => size,
            (None, Some(s)) => s.volume_size,
            (None, None) => return Err(ApiError::missing("Size")),
        };
        if !(1..=65536).contains(&size) {
            return Err(ApiError::invalid_value(
                "size",
                &size.to_string(),
                "Volume size must be between 1 and 65536 GiB.",
            ));
        }
        let encrypted = req.encrypted
            || from_snapshot.as_ref().is_some_and(|s| s.encrypted)
            || ctx.config.encrypts_by_default(ctx.account(), ctx.region());
        let kms_key_id = match (&req.kms_key_id, encrypted) {
            (Some(_), false) => {
                return Err(ApiError::client(
                    "InvalidParameterDependency",
                    "The parameter KmsKeyId requires the parameter Encrypted to be set.",
                ));
            }
            (Some(key), true) => Some(resolve_kms_key(key, ctx.account(), ctx.region())?),
            (None, true) => Some(
                from_snapshot
                    .as_ref()
                    .and_then(|s| s.kms_key_id.clone())
                    .unwrap_or_else(|| default_ebs_key(ctx.account(), ctx.region())),
            ),
            (None, false) => None,
        };
        let tags = tags_for(&req.tag_specs, &["volume"], "volume")?;
        let id = self.new_id("vol");
        let volume = Volume {
            id: id.clone(),
            region: ctx.region().to_string(),
            owner: ctx.account().to_string(),
            availability_zone: req.availability_zone,
            size,
            volume_type: req.volume_type.unwrap_or_else(|| "gp2".to_string()),
            encrypted,
            kms_key_id,
            snapshot_id: req.snapshot_id,
            create_time: ctx.now,
            tags,
        };
        Ok(self.volumes.entry(id).or_insert(volume))
    }
}
