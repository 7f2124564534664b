//! Publishing the current copies' IDs (`spec.publish`): only once every
//! destination's copy of the current source is available, so that a
//! consumer never reads half a rollout; and withdrawing the SSM parameters
//! the spec no longer asks for.

use std::collections::{BTreeMap, BTreeSet};

use super::Input;
use super::destinations::rfc3339;
use crate::api::{AmiCopyStatus, Published, PublishedParameter, TargetState, TargetStatus};

/// What to publish, and what to withdraw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publication {
    /// What the status records once it is done: `None` when nothing is
    /// published any more.
    pub record: Option<Published>,
    /// The ConfigMap to write: its name and data.
    pub config_map: Option<(String, BTreeMap<String, String>)>,
    /// The ConfigMap is one this object wrote before (the last publication
    /// names it): it is written over without being read first.
    pub config_map_written: bool,
    /// The SSM parameters to write.
    pub parameters: Vec<PublishedParameter>,
    /// Parameters written before that are no longer wanted: deleted while
    /// they still hold one of `ours`.
    pub stale: Vec<PublishedParameter>,
    /// The image IDs this object recorded: a parameter holding one of them
    /// (or nothing) is this object's to overwrite or delete; one holding
    /// anything else is someone else's and is never touched.
    pub ours: BTreeSet<String>,
}

/// The key of the source AMI's ID in the ConfigMap.
pub const SOURCE_KEY: &str = "source";

/// The publication this pass needs, if any; `Err` with the reason when the
/// spec asks for a parameter outside the namespace's prefix.
pub fn plan(input: &Input, destinations: &[TargetStatus]) -> Result<Option<Publication>, String> {
    let prev = input.prev.published.as_ref();
    let spec = input.spec.publish.as_ref();
    let want = match spec {
        Some(publish) => {
            let Some(images) = ready(input, destinations) else {
                return Ok(None);
            };
            let parameters = match &publish.ssm_parameter {
                Some(p) => parameters(input, &p.name, &images)?,
                None => Vec::new(),
            };
            Some(Published {
                source_image_id: input.source_id.to_owned(),
                images,
                at: rfc3339(input.now),
                config_map: publish.config_map.as_ref().map(|c| c.name.clone()),
                ssm_parameters: parameters,
            })
        }
        None => None,
    };
    let same = |a: &Published, b: &Published| {
        a.source_image_id == b.source_image_id
            && a.images == b.images
            && a.config_map == b.config_map
            && a.ssm_parameters == b.ssm_parameters
    };
    match (&want, prev) {
        (None, None) => return Ok(None),
        (Some(w), Some(p)) if same(w, p) => return Ok(None),
        _ => {}
    }
    let kept = |p: &PublishedParameter| {
        want.as_ref().is_some_and(|w| {
            w.ssm_parameters
                .iter()
                .any(|n| n.region == p.region && n.name == p.name)
        })
    };
    let stale = prev
        .map(|p| {
            p.ssm_parameters
                .iter()
                .filter(|p| !kept(p))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let config_map = want.as_ref().and_then(|w| {
        let mut data = w.images.clone();
        data.insert(SOURCE_KEY.into(), w.source_image_id.clone());
        Some((w.config_map.clone()?, data))
    });
    let mut ours = own_images(input.prev);
    ours.extend(destinations.iter().filter_map(|t| t.image_id.clone()));
    let config_map_written = match (&config_map, prev) {
        (Some((name, _)), Some(p)) => p.config_map.as_ref() == Some(name),
        _ => false,
    };
    Ok(Some(Publication {
        config_map_written,
        parameters: want
            .as_ref()
            .map(|w| w.ssm_parameters.clone())
            .unwrap_or_default(),
        record: want,
        config_map,
        stale,
        ours,
    }))
}

/// The image IDs a status names as this object's: the copies it records,
/// and those it published.
pub fn own_images(status: &AmiCopyStatus) -> BTreeSet<String> {
    let published = status.published.iter().flat_map(|p| p.images.values());
    status
        .targets()
        .filter_map(|t| t.image_id.as_ref())
        .chain(published)
        .cloned()
        .collect()
}

/// The current copy of every destination the policies allow, by region,
/// once each is available; `None` before.
fn ready(input: &Input, destinations: &[TargetStatus]) -> Option<BTreeMap<String, String>> {
    if input.source_id.is_empty() {
        return None;
    }
    let mut images = BTreeMap::new();
    for d in destinations {
        if input.blocked.contains_key(&d.region) {
            continue;
        }
        let current = d.source_image_id.as_deref() == Some(input.source_id);
        match (&d.image_id, &d.state) {
            (Some(id), TargetState::Available) if current => {
                images.insert(d.region.clone(), id.clone());
            }
            _ => return None,
        }
    }
    (!images.is_empty()).then_some(images)
}

/// The parameter of each region, named from the template; `Err` when a
/// name falls outside `<prefix><namespace>/`.
fn parameters(
    input: &Input,
    template: &str,
    images: &BTreeMap<String, String>,
) -> Result<Vec<PublishedParameter>, String> {
    let meta = input.meta;
    let allowed = format!("{}{}/", meta.ssm_prefix, meta.namespace);
    images
        .iter()
        .map(|(region, image_id)| {
            let name = template
                .replace("{region}", region)
                .replace("{namespace}", &meta.namespace)
                .replace("{name}", &meta.name);
            if !name.starts_with(&allowed) || name.contains("//") || name.contains("{") {
                return Err(format!(
                    "SSM parameter {name} is outside {allowed}, where this namespace may publish"
                ));
            }
            let dest = input.spec.destinations.iter().find(|d| &d.region == region);
            Ok(PublishedParameter {
                region: region.clone(),
                name,
                image_id: image_id.clone(),
                role_arn: dest.and_then(|d| d.role_arn.clone()),
                external_id: dest.and_then(|d| d.external_id.clone()),
            })
        })
        .collect()
}
