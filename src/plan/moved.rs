//! Copies left in another account. When a destination's `roleArn` changes
//! to a role of another account, its region is reached there from then on;
//! the copies the status recorded through the old role stay in the old
//! account, and are retired (or, with `Retain`, released) there, through
//! the role and external ID they were made with.

use std::collections::BTreeSet;

use super::{Action, Draft, Input};
use crate::api::{AmiCopySpec, AmiCopyStatus, DeletionPolicy, TargetStatus};
use crate::ec2::{Scope, account_of};

/// Whether `t`, recorded through its role, is in another account than the
/// one its region is reached in now. Two roles of one account reach the
/// same images; the operator's own account (no role) is never known to be
/// another role's, so it counts as different, and the images the new
/// account holds as current are kept out (see [`retire`]).
fn is_moved(spec: &AmiCopySpec, t: &TargetStatus) -> bool {
    let Some(dest) = spec.destinations.iter().find(|d| d.region == t.region) else {
        return false;
    };
    match (t.role_arn.as_deref(), dest.role_arn.as_deref()) {
        (None, None) => false,
        (Some(old), Some(new)) => old != new && account_of(old) != account_of(new),
        _ => true,
    }
}

/// The last status without its copies in another account, and those copies.
pub fn split(spec: &AmiCopySpec, prev: &AmiCopyStatus) -> (AmiCopyStatus, Vec<TargetStatus>) {
    let mut kept = prev.clone();
    let mut moved = Vec::new();
    for list in [
        &mut kept.destinations,
        &mut kept.generations,
        &mut kept.retiring,
    ] {
        let (away, here): (Vec<_>, Vec<_>) = std::mem::take(list)
            .into_iter()
            .partition(|t| t.image_id.is_some() && is_moved(spec, t));
        *list = here;
        moved.extend(away);
    }
    (kept, moved)
}

/// Retires the copies in another account, but any the region's current
/// account holds as its own (`held`: the same images, reached through a
/// role of the same account); their entries stay among those retiring, with
/// the role they are reached through, until they are gone.
pub fn retire(
    input: &Input,
    moved: Vec<TargetStatus>,
    held: &BTreeSet<&str>,
    draft: &mut Draft,
) -> Vec<TargetStatus> {
    let mut retiring = Vec::new();
    for t in moved {
        let Some(image_id) = t.image_id.clone() else {
            continue;
        };
        if held.contains(image_id.as_str()) {
            continue;
        }
        let through = t
            .role_arn
            .clone()
            .unwrap_or_else(|| "the operator's own account".into());
        draft.actions.push(Action::RetireMoved {
            scope: Scope::through(&t.region, t.role_arn.as_deref(), t.external_id.as_deref()),
            image_id,
            snapshot_ids: t.snapshots_to_delete.clone(),
            release: input.spec.deletion_policy == DeletionPolicy::Retain,
            young: super::recent(t.planned_at.as_deref(), input.now, input.meta.listing_grace),
        });
        retiring.push(TargetStatus {
            message: format!(
                "in the account reached through {through}, before the destination's roleArn changed; retired there"
            ),
            ..t
        });
    }
    retiring
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const A: &str = "arn:aws:iam::111111111111:role/copier";
    const A2: &str = "arn:aws:iam::111111111111:role/other-copier";
    const B: &str = "arn:aws:iam::222222222222:role/copier";

    fn entry(region: &str, image: &str, role: Option<&str>) -> TargetStatus {
        TargetStatus {
            region: region.into(),
            image_id: Some(image.into()),
            role_arn: role.map(str::to_owned),
            ..TargetStatus::default()
        }
    }

    #[test]
    fn only_copies_recorded_in_another_account_than_their_regions_are_moved() {
        let spec: AmiCopySpec = serde_json::from_value(json!({
            "source": {"region": "us-east-1", "imageId": "ami-12345678"},
            "destinations": [
                {"region": "eu-west-1", "roleArn": A2},
                {"region": "us-west-2"},
                {"region": "ap-southeast-2", "roleArn": A}],
        }))
        .unwrap();
        let prev = AmiCopyStatus {
            destinations: vec![
                // Another role of the same account: the same images.
                entry("eu-west-1", "ami-1", Some(A)),
                // A role's account, now this one.
                entry("us-west-2", "ami-2", Some(B)),
                // This account, now a role's.
                entry("ap-southeast-2", "ami-3", None),
            ],
            // A region no longer listed is retired as such, not as moved.
            retiring: vec![entry("sa-east-1", "ami-4", Some(B))],
            generations: vec![entry("eu-west-1", "ami-5", Some(B))],
            ..AmiCopyStatus::default()
        };
        let (kept, moved) = split(&spec, &prev);
        let ids = |ts: &[TargetStatus]| -> Vec<String> {
            ts.iter().filter_map(|t| t.image_id.clone()).collect()
        };
        assert_eq!(ids(&moved), ["ami-2", "ami-3", "ami-5"]);
        assert_eq!(ids(&kept.destinations), ["ami-1"]);
        assert_eq!(ids(&kept.retiring), ["ami-4"]);
        assert!(kept.generations.is_empty());
    }
}
