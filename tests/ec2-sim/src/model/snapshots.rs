//! Snapshots: creating, describing and deleting them, and finding the ones a
//! caller may use.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::permissions::Permission;
use super::query::{
    Filter, Page, among, check_page, matches_filters, named_ids, paginate, resolve_owners,
    tag_filter_values,
};
use super::tags::{TagSpec, Tags, tags_for};
use super::{Ctx, State, check_description, is_hex_id};
use crate::wire::{ApiError, ApiResult};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotState {
    Pending,
    Completed,
    Error,
}

impl SnapshotState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Completed => "completed",
            Self::Error => "error",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub region: String,
    pub owner: String,
    pub volume_id: String,
    pub volume_size: i64,
    pub description: String,
    pub state: SnapshotState,
    #[serde(with = "time::serde::rfc3339")]
    pub start_time: OffsetDateTime,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
    pub tags: Tags,
    pub create_volume_permissions: Vec<Permission>,
    pub completion_duration_minutes: Option<i64>,
}

impl Snapshot {
    pub fn usable_by(&self, account: &str) -> bool {
        self.owner == account
            || self.create_volume_permissions.iter().any(|p| match p {
                Permission::UserId(id) => id == account,
                Permission::Group(g) => g == "all",
                _ => false,
            })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotQuery {
    pub snapshot_ids: Vec<String>,
    pub owners: Vec<String>,
    pub restorable_by: Vec<String>,
    pub filters: Vec<Filter>,
    pub page: Page,
}

fn not_found_snapshot(id: &str) -> ApiError {
    ApiError::client(
        "InvalidSnapshot.NotFound",
        format!("The snapshot '{id}' does not exist."),
    )
}

pub fn check_snapshot_id(id: &str) -> ApiResult<()> {
    if is_hex_id(id, "snap-") {
        Ok(())
    } else {
        Err(ApiError::client(
            "InvalidSnapshotID.Malformed",
            format!("Invalid id: \"{id}\" (expecting \"snap-...\")"),
        ))
    }
}

/// The values a filter named `name` matches on `snapshot`, whose tags it
/// sees as `tags`.
fn snapshot_filter_values(snapshot: &Snapshot, tags: &Tags, name: &str) -> Option<Vec<String>> {
    let one = |v: &str| Some(vec![v.to_string()]);
    if let Some(values) = tag_filter_values(tags, name) {
        return Some(values);
    }
    match name {
        "snapshot-id" => one(&snapshot.id),
        "owner-id" => one(&snapshot.owner),
        "status" => one(snapshot.state.as_str()),
        "volume-id" => one(&snapshot.volume_id),
        "volume-size" => one(&snapshot.volume_size.to_string()),
        "description" => one(&snapshot.description),
        "encrypted" => one(&snapshot.encrypted.to_string()),
        "kms-key-id" => Some(snapshot.kms_key_id.clone().into_iter().collect()),
        _ => None,
    }
}

impl State {
    /// The snapshot `id` in the caller's region, if the caller may use it
    /// and it is known to calls by now.
    pub(super) fn usable_snapshot(&self, ctx: &Ctx, id: &str) -> ApiResult<&Snapshot> {
        check_snapshot_id(id)?;
        self.snapshots
            .get(id)
            .filter(|s| s.region == ctx.region() && s.usable_by(ctx.account()))
            .filter(|_| self.propagated(id, ctx.now))
            .ok_or_else(|| not_found_snapshot(id))
    }

    pub(super) fn owned_snapshot_mut(&mut self, ctx: &Ctx, id: &str) -> ApiResult<&mut Snapshot> {
        self.usable_snapshot(ctx, id)?;
        let snapshot = self.snapshots.get_mut(id).expect("checked above");
        if snapshot.owner != ctx.account() {
            return Err(ApiError::client(
                "AuthFailure",
                format!("Not authorized for snapshot:{id}"),
            ));
        }
        Ok(snapshot)
    }

    pub fn create_snapshot(
        &mut self,
        ctx: &Ctx,
        volume_id: &str,
        description: Option<String>,
        tag_specs: &[TagSpec],
    ) -> ApiResult<&Snapshot> {
        let volume = self
            .volumes
            .get(volume_id)
            .filter(|v| v.region == ctx.region() && v.owner == ctx.account())
            .ok_or_else(|| {
                ApiError::client(
                    "InvalidVolume.NotFound",
                    format!("The volume '{volume_id}' does not exist."),
                )
            })?
            .clone();
        check_description(description.as_deref())?;
        let tags = tags_for(tag_specs, &["snapshot"], "snapshot")?;
        let id = self.new_id("snap");
        self.propagate(ctx, &id);
        let snapshot = Snapshot {
            id: id.clone(),
            region: volume.region,
            owner: volume.owner,
            volume_id: volume.id,
            volume_size: volume.size,
            description: description.unwrap_or_default(),
            state: SnapshotState::Completed,
            start_time: ctx.now,
            encrypted: volume.encrypted,
            kms_key_id: volume.kms_key_id,
            tags,
            create_volume_permissions: Vec::new(),
            completion_duration_minutes: None,
        };
        Ok(self.snapshots.entry(id).or_insert(snapshot))
    }

    pub fn describe_snapshots(
        &self,
        ctx: &Ctx,
        query: &SnapshotQuery,
    ) -> ApiResult<(Vec<&Snapshot>, Option<String>)> {
        if !query.snapshot_ids.is_empty() && query.page != Page::default() {
            return Err(ApiError::client(
                "InvalidParameterCombination",
                "The parameter SnapshotIds cannot be used with the parameter MaxResults or NextToken",
            ));
        }
        check_page(&query.page, 1..=1000)?;
        for id in &query.snapshot_ids {
            self.usable_snapshot(ctx, id)?;
        }
        let owners = resolve_owners(&query.owners, ctx.account());
        let restorable_by = resolve_owners(&query.restorable_by, ctx.account());
        // Snapshots are narrowed by ID only: the operator looks them up by
        // tag just when it cleans up.
        let named = named_ids(&query.snapshot_ids, &query.filters, "snapshot-id");
        let mut selected = Vec::new();
        for (id, snapshot) in among(&self.snapshots, named.as_ref()) {
            if snapshot.region != ctx.region()
                || !snapshot.usable_by(ctx.account())
                || !self.propagated(id, ctx.now)
            {
                continue;
            }
            if !query.snapshot_ids.is_empty() && !query.snapshot_ids.contains(id) {
                continue;
            }
            if !owners.is_empty() && !owners.contains(&snapshot.owner) {
                continue;
            }
            if !restorable_by.is_empty() && !restorable_by.iter().any(|a| snapshot.usable_by(a)) {
                continue;
            }
            let tags = self.filter_tags(id, &snapshot.tags, ctx.now);
            let values = |s: &Snapshot, name: &str| snapshot_filter_values(s, tags, name);
            if !matches_filters(snapshot, &query.filters, values)? {
                continue;
            }
            selected.push((id, snapshot));
        }
        paginate(selected, &query.page)
    }

    pub fn delete_snapshot(&mut self, ctx: &Ctx, id: &str) -> ApiResult<()> {
        self.owned_snapshot_mut(ctx, id)?;
        if let Some(image) = self
            .images
            .values()
            .find(|i| i.snapshot_ids().any(|s| s == id))
        {
            return Err(ApiError::client(
                "InvalidSnapshot.InUse",
                format!("The snapshot {id} is currently in use by {}", image.id),
            ));
        }
        self.snapshots.remove(id);
        Ok(())
    }
}
