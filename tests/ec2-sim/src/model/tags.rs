//! Tags on images, snapshots and volumes, and the index that finds images
//! by tag.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Ctx, State};
use crate::wire::{ApiError, ApiResult};

pub type Tags = BTreeMap<String, String>;

/// Tags requested for one resource type (`TagSpecification.N`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagSpec {
    pub resource_type: String,
    pub tags: Vec<(String, String)>,
}

fn check_tags<'a>(tags: impl IntoIterator<Item = (&'a String, &'a String)>) -> ApiResult<()> {
    for (key, value) in tags {
        if key.is_empty() || key.chars().count() > 128 {
            return Err(ApiError::invalid_value(
                "tag:key",
                key,
                "Tag keys must be between 1 and 128 characters.",
            ));
        }
        if key.to_ascii_lowercase().starts_with("aws:") {
            return Err(ApiError::invalid_value(
                "tag:key",
                key,
                "Tag keys starting with 'aws:' are reserved for internal use",
            ));
        }
        if value.chars().count() > 256 {
            return Err(ApiError::invalid_value(
                "tag:value",
                value,
                "Tag values may be at most 256 characters.",
            ));
        }
    }
    Ok(())
}

pub(super) fn merge_tags(
    target: &mut Tags,
    new: impl IntoIterator<Item = (String, String)>,
) -> ApiResult<()> {
    let mut merged = target.clone();
    merged.extend(new);
    check_tags(&merged)?;
    if merged.len() > 50 {
        return Err(ApiError::client(
            "TagLimitExceeded",
            "The maximum number of tags per resource (50) has been reached.",
        ));
    }
    *target = merged;
    Ok(())
}

/// Tags for `resource_type` from TagSpecifications, rejecting other types.
pub(super) fn tags_for(
    specs: &[TagSpec],
    allowed: &[&str],
    resource_type: &str,
) -> ApiResult<Tags> {
    let mut tags = Tags::new();
    for spec in specs {
        if !allowed.contains(&spec.resource_type.as_str()) {
            return Err(ApiError::invalid_value(
                "ResourceType",
                &spec.resource_type,
                "This resource type is not taggable on this operation.",
            ));
        }
        if spec.resource_type == resource_type {
            tags.extend(spec.tags.iter().cloned());
        }
    }
    check_tags(&tags)?;
    Ok(tags)
}

impl State {
    pub(super) fn index_tags(&mut self, id: &str, tags: &Tags) {
        for (key, value) in tags {
            self.images_by_tag
                .entry((key.clone(), value.clone()))
                .or_default()
                .insert(id.to_string());
        }
    }

    pub(super) fn unindex_tags(&mut self, id: &str, tags: &Tags) {
        for (key, value) in tags {
            let entry = (key.clone(), value.clone());
            if let Some(ids) = self.images_by_tag.get_mut(&entry) {
                ids.remove(id);
                if ids.is_empty() {
                    self.images_by_tag.remove(&entry);
                }
            }
        }
    }

    fn tags_mut(&mut self, ctx: &Ctx, resource_id: &str) -> ApiResult<&mut Tags> {
        let prefix = resource_id.split_once('-').map(|(p, _)| p);
        match prefix {
            Some("ami") => Ok(&mut self.owned_image_mut(ctx, resource_id)?.tags),
            Some("snap") => Ok(&mut self.owned_snapshot_mut(ctx, resource_id)?.tags),
            Some("vol") => self
                .volumes
                .get_mut(resource_id)
                .filter(|v| v.region == ctx.region() && v.owner == ctx.account())
                .map(|v| &mut v.tags)
                .ok_or_else(|| {
                    ApiError::client(
                        "InvalidVolume.NotFound",
                        format!("The volume '{resource_id}' does not exist."),
                    )
                }),
            _ => Err(ApiError::client(
                "InvalidID",
                format!("The ID '{resource_id}' is not valid"),
            )),
        }
    }

    pub fn create_tags(
        &mut self,
        ctx: &Ctx,
        resource_ids: &[String],
        tags: &[(String, String)],
    ) -> ApiResult<()> {
        // Validate every resource first: EC2 tags all or nothing.
        for id in resource_ids {
            let mut current = self.tags_mut(ctx, id)?.clone();
            merge_tags(&mut current, tags.iter().cloned())?;
        }
        for id in resource_ids {
            self.retag(ctx, id, |target| merge_tags(target, tags.iter().cloned()))?;
        }
        Ok(())
    }

    /// Removes tags; a `None` value removes the key whatever its value, and
    /// no tags at all removes every user tag.
    pub fn delete_tags(
        &mut self,
        ctx: &Ctx,
        resource_ids: &[String],
        tags: &[(String, Option<String>)],
    ) -> ApiResult<()> {
        for id in resource_ids {
            self.tags_mut(ctx, id)?;
        }
        for id in resource_ids {
            self.retag(ctx, id, |target| {
                if tags.is_empty() {
                    target.retain(|k, _| k.starts_with("aws:"));
                }
                for (key, value) in tags {
                    if value.as_ref().is_none_or(|v| target.get(key) == Some(v)) {
                        target.remove(key);
                    }
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Changes one resource's tags, keeping the image tag index in step and
    /// the change from tag filters for the propagation lag.
    fn retag(
        &mut self,
        ctx: &Ctx,
        id: &str,
        change: impl FnOnce(&mut Tags) -> ApiResult<()>,
    ) -> ApiResult<()> {
        let target = self.tags_mut(ctx, id)?;
        let before = target.clone();
        let outcome = change(target);
        let after = target.clone();
        if self.images.contains_key(id) {
            self.unindex_tags(id, &before);
            self.index_tags(id, &after);
        }
        self.lag_tags(ctx, id, &before, &after);
        outcome
    }
}
