//! Which account each region is reached in: the one rule for EC2 calls and
//! for what the status records.

use std::collections::BTreeMap;

use crate::api::{AmiCopySpec, AmiCopyStatus, TargetStatus};
use crate::ec2::Scope;

/// Where EC2 calls for each region of one object go: the destination's role
/// (another account), or for a region no longer listed, the role (and
/// external ID) its copies were made through; this account otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scopes(BTreeMap<String, Scope>);

impl Scopes {
    pub fn new(spec: &AmiCopySpec, status: Option<&AmiCopyStatus>) -> Self {
        let mut scopes = BTreeMap::new();
        for t in status.into_iter().flat_map(AmiCopyStatus::targets) {
            if let Some(role) = &t.role_arn {
                let scope = Scope::through(&t.region, Some(role), t.external_id.as_deref());
                scopes.insert(t.region.clone(), scope);
            }
        }
        for d in &spec.destinations {
            let scope = Scope::through(&d.region, d.role_arn.as_deref(), d.external_id.as_deref());
            scopes.insert(d.region.clone(), scope);
        }
        Self(scopes)
    }

    /// The same scopes, their calls through roles named after the object
    /// `namespace/name` in STS.
    pub fn on_behalf_of(self, namespace: &str, name: &str) -> Self {
        Self(
            self.0
                .into_iter()
                .map(|(r, s)| (r, s.on_behalf_of(namespace, name)))
                .collect(),
        )
    }

    /// The scope of `region`.
    pub fn of(&self, region: &str) -> Scope {
        self.0
            .get(region)
            .cloned()
            .unwrap_or_else(|| Scope::region(region))
    }

    /// Records on a status entry the role its region is reached through.
    pub fn record(&self, target: &mut TargetStatus) {
        let scope = self.of(&target.region);
        target.role_arn = scope.role_arn().map(str::to_owned);
        target.external_id = scope.external_id().map(str::to_owned);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::api::AmiCopy;

    #[test]
    fn a_region_dropped_from_the_spec_is_reached_through_its_recorded_role() {
        const ROLE: &str = "arn:aws:iam::210987654321:role/amicopy";
        let mut obj: AmiCopy = serde_json::from_value(json!({
            "apiVersion": "amicopy.dev/v1alpha1", "kind": "AmiCopy",
            "metadata": {"name": "a", "namespace": "ns"},
            "spec": {"source": {"region": "us-east-1", "imageId": "ami-00000000000000001"},
                     "destinations": [{"region": "us-west-2"}]},
        }))
        .unwrap();
        obj.status = Some(AmiCopyStatus {
            retiring: vec![TargetStatus {
                region: "eu-west-1".into(),
                image_id: Some("ami-0000000000000000a".into()),
                role_arn: Some(ROLE.into()),
                external_id: Some("amicopy-test".into()),
                ..TargetStatus::default()
            }],
            ..AmiCopyStatus::default()
        });
        let scopes = Scopes::new(&obj.spec, obj.status.as_ref());
        assert_eq!(
            scopes.of("eu-west-1"),
            Scope::through("eu-west-1", Some(ROLE), Some("amicopy-test"))
        );
        assert_eq!(scopes.of("us-west-2"), Scope::region("us-west-2"));
        assert_eq!(
            scopes.of("eu-west-1").to_string(),
            "eu-west-1 account 210987654321",
            "logs name a scope by region and account, never by role or external ID"
        );
    }
}
