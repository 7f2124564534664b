//! Keeping a copy that exists in line with the spec: its tags (and its
//! snapshots'), and once available its permissions and deprecation.

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::{Action, Input, Meta, Sharing, desired_tags};
use crate::api::{AmiCopySpec, SOURCE_TAG, TargetState, TargetStatus};
use crate::ec2::{Grant, ImageInfo, Permission};

/// The actions that bring `img` in line with the spec; `ts` learns the
/// deprecation time EC2 reports.
pub fn upkeep(
    input: &Input,
    region: &str,
    img: &ImageInfo,
    ts: &mut TargetStatus,
    actions: &mut Vec<Action>,
) {
    let from = img.tags.get(SOURCE_TAG).cloned().unwrap_or_default();
    let tags = desired_tags(input.spec, input.meta, &from);
    let mut resource_ids = vec![img.id.clone()];
    resource_ids.extend(
        img.snapshots
            .iter()
            .map(|s| s.id.clone())
            .filter(|id| !input.source_snapshots.contains(id.as_str())),
    );
    if tags.iter().any(|(k, v)| img.tags.get(k) != Some(v)) {
        actions.push(Action::TagImage {
            region: region.into(),
            image_id: img.id.clone(),
            resource_ids: resource_ids.clone(),
            tags,
        });
    }
    let stale: Vec<String> = input
        .removed_tags
        .iter()
        .filter(|k| img.tags.contains_key(*k))
        .cloned()
        .collect();
    if !stale.is_empty() {
        actions.push(Action::Untag {
            region: region.into(),
            resource_ids: resource_ids.clone(),
            keys: stale,
        });
    }
    if img.state != TargetState::Available {
        return;
    }
    actions.extend(share(input, region, img, &resource_ids[1..], ts));
    ts.deprecation_time = img.deprecation_time.clone();
    actions.extend(deprecate(input, region, img));
}

/// Permissions to add and remove, from what the status says was applied.
fn share(
    input: &Input,
    region: &str,
    img: &ImageInfo,
    snapshot_ids: &[String],
    ts: &TargetStatus,
) -> Option<Action> {
    let (want, _) = wanted_grants(input.spec, input.meta);
    let applied: BTreeSet<&str> = ts.shared_with.iter().map(String::as_str).collect();
    let wanted: Vec<String> = want.iter().map(Grant::key).collect();
    if applied == wanted.iter().map(String::as_str).collect() {
        return None;
    }
    let have: BTreeSet<Grant> = applied.iter().filter_map(|k| Grant::from_key(k)).collect();
    Some(Action::Share(Sharing {
        region: region.into(),
        image_id: img.id.clone(),
        snapshot_ids: snapshot_ids.to_vec(),
        add: want.difference(&have).cloned().collect(),
        remove: have.difference(&want).cloned().collect(),
        want: want.into_iter().collect(),
    }))
}

fn deprecate(input: &Input, region: &str, img: &ImageInfo) -> Option<Action> {
    let at = wanted_deprecation(input.spec, img.creation_date.as_deref(), input.now)?;
    let set = img
        .deprecation_time
        .as_deref()
        .is_some_and(|d| same_minute(d, at));
    (!set).then(|| Action::Deprecate {
        region: region.into(),
        image_id: img.id.clone(),
        at: super::destinations::rfc3339(&Time(at)),
    })
}

/// Permissions `spec.sharing` asks for, and whether public sharing was asked
/// for but is not allowed.
pub fn wanted_grants(spec: &AmiCopySpec, meta: &Meta) -> (BTreeSet<Grant>, bool) {
    let Some(sharing) = &spec.sharing else {
        return (BTreeSet::new(), false);
    };
    let launch = |p| Grant::Launch(p);
    let mut want: BTreeSet<Grant> = sharing
        .accounts
        .iter()
        .map(|a| launch(Permission::Account(a.clone())))
        .chain(
            sharing
                .organization_arns
                .iter()
                .map(|a| launch(Permission::Organization(a.clone()))),
        )
        .chain(
            sharing
                .organizational_unit_arns
                .iter()
                .map(|a| launch(Permission::OrganizationalUnit(a.clone()))),
        )
        .collect();
    if sharing.snapshots == Some(true) {
        want.extend(sharing.accounts.iter().cloned().map(Grant::CreateVolume));
    }
    let public = sharing.public == Some(true);
    if public && meta.allow_public {
        want.insert(launch(Permission::Public));
    }
    (want, public && !meta.allow_public)
}

/// When a copy created at `created` should be deprecated, if the spec asks.
fn wanted_deprecation(spec: &AmiCopySpec, created: Option<&str>, now: &Time) -> Option<Timestamp> {
    let at = match (&spec.deprecation_time, &spec.deprecate_after) {
        (Some(at), _) => at.parse::<Timestamp>().ok()?,
        (None, Some(after)) => {
            let after = SignedDuration::try_from(humantime::parse_duration(after).ok()?).ok()?;
            created?
                .parse::<Timestamp>()
                .ok()?
                .checked_add(after)
                .ok()?
        }
        (None, None) => return None,
    };
    // EC2 refuses a time in the past; deprecate at once instead.
    let soon = now.0.checked_add(SignedDuration::from_mins(1)).ok()?;
    Some(at.max(soon))
}

/// The same minute (EC2 keeps deprecation times to the minute).
fn same_minute(a: &str, b: Timestamp) -> bool {
    a.parse::<Timestamp>()
        .is_ok_and(|a| a.as_second() / 60 == b.as_second() / 60)
}
