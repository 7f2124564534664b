//! `AmiCopyPolicy`: what the cluster admin allows the AmiCopies of a set of
//! namespaces to do with the operator's one AWS identity. The same rules run
//! in two places, with one meaning: in kube-apiserver, as the chart's
//! ValidatingAdmissionPolicy (CEL), and here, at every reconcile, which is
//! the guarantee (objects admitted before a policy changed, clusters without
//! the admission policy).
//!
//! A value is allowed by a list of patterns when one of them is the value
//! itself, `*`, or a prefix ending in `*` (`eu-*`,
//! `arn:aws:iam::210987654321:role/*`).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::api::{AmiCopySpec, Destination, Sharing};
use crate::ec2::account_of;

/// The KMS pattern that allows the keys of the destination's own account:
/// key IDs and aliases (which EC2 resolves in that account) and key ARNs of
/// that account. Without a role, that is the operator's account.
pub const DESTINATION_ACCOUNT_KEYS: &str = "destination-account";

/// What the AmiCopies of the namespaces it selects may do with the
/// operator's AWS identity. An AmiCopy must satisfy every policy that
/// selects its namespace; in a namespace no policy selects, the operator
/// allows same-account copies only (any region, keys of that account,
/// nothing shared).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "amicopy.dev",
    version = "v1alpha1",
    kind = "AmiCopyPolicy",
    plural = "amicopypolicies",
    singular = "amicopypolicy",
    shortname = "amicp",
    category = "aws",
    printcolumn = r#"{"name":"Regions","type":"string","jsonPath":".spec.regions"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AmiCopyPolicySpec {
    /// The namespaces this policy governs, by their labels (`matchLabels`
    /// and `matchExpressions`); every namespace when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// Who may own a source image: account IDs, `self` (the operator's own
    /// account) or `amazon`. Checked on `spec.source.selector.owners` at
    /// admission, and on the owner EC2 reports for the source at every
    /// reconcile.
    #[serde(default = "only_self")]
    pub source_owners: Vec<String>,

    /// Destination regions.
    #[serde(default = "any")]
    pub regions: Vec<String>,

    /// Roles of other accounts that destinations may copy through
    /// (`roleArn`); none by default: copies stay in the operator's account.
    #[serde(default)]
    pub roles: Vec<RoleRule>,

    /// KMS keys destinations may encrypt with (`kmsKeyId` as written).
    /// `destination-account` allows key IDs, aliases and key ARNs of the
    /// destination's own account.
    #[serde(default = "destination_account_keys")]
    pub kms_keys: Vec<String>,

    /// With whom copies may be shared.
    #[serde(default)]
    pub sharing: SharingRules,

    /// The most destinations one AmiCopy may have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_destinations: Option<i32>,
}

/// A role destinations may copy through.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoleRule {
    /// The role's ARN, or a pattern of ARNs.
    pub arn: String,
    /// Destinations using this role must give an `externalId`.
    #[serde(default)]
    pub require_external_id: bool,
}

/// With whom copies may be shared; nothing by default.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SharingRules {
    /// AWS accounts (`spec.sharing.accounts`).
    #[serde(default)]
    pub accounts: Vec<String>,
    /// Organization ARNs (`spec.sharing.organizationArns`).
    #[serde(default)]
    pub organizations: Vec<String>,
    /// Organizational unit ARNs (`spec.sharing.organizationalUnitArns`).
    #[serde(default)]
    pub organizational_units: Vec<String>,
    /// Whether the snapshots of a shared copy may be shared too.
    #[serde(default)]
    pub snapshots: bool,
    /// Whether copies may be made public.
    #[serde(default)]
    pub public: bool,
}

fn only_self() -> Vec<String> {
    vec!["self".into()]
}

fn any() -> Vec<String> {
    vec!["*".into()]
}

fn destination_account_keys() -> Vec<String> {
    vec![DESTINATION_ACCOUNT_KEYS.into()]
}

impl Default for AmiCopyPolicySpec {
    /// Same-account copies into any region, with any key of that account;
    /// nothing shared, nothing public, no roles.
    fn default() -> Self {
        Self {
            namespace_selector: None,
            source_owners: only_self(),
            regions: any(),
            roles: Vec::new(),
            kms_keys: destination_account_keys(),
            sharing: SharingRules::default(),
            max_destinations: None,
        }
    }
}

/// Whether `patterns` allow `value`.
pub fn allows(patterns: &[String], value: &str) -> bool {
    patterns.iter().any(|p| {
        p == value
            || p.strip_suffix('*')
                .is_some_and(|prefix| value.starts_with(prefix))
    })
}

/// Whether `selector` selects a namespace with these labels (none: all).
pub fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    let by_label = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expression = selector.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let listed = value.is_some_and(|v| e.values.iter().flatten().any(|x| x == v));
        match e.operator.as_str() {
            "In" => listed,
            "NotIn" => !listed,
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    by_label && by_expression
}

/// One part of an object a policy does not allow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    /// The policy's name (`default` for the built-in one).
    pub policy: String,
    /// The policy field that refuses it (`regions`, `sharing.accounts`...).
    pub rule: &'static str,
    /// The value refused.
    pub value: String,
    /// The destination region it concerns, if it concerns one.
    pub region: Option<String>,
}

impl Denial {
    pub fn message(&self) -> String {
        format!(
            "AmiCopyPolicy {} does not allow {} {:?}",
            self.policy, self.rule, self.value
        )
    }
}

/// A policy, by name, as the operator applies it.
#[derive(Clone, Debug, PartialEq)]
pub struct Governing {
    pub name: String,
    pub spec: AmiCopyPolicySpec,
}

impl Governing {
    /// The built-in policy of a namespace no policy selects.
    pub fn default_policy() -> Self {
        Self {
            name: "default".into(),
            spec: AmiCopyPolicySpec::default(),
        }
    }

    /// Whether applying this policy needs the operator's own account: for
    /// `self` among the source owners, and for the key ARNs of
    /// `destination-account` without a role.
    pub fn needs_own_account(&self) -> bool {
        self.spec.source_owners.iter().any(|o| o == "self")
            || self
                .spec
                .kms_keys
                .iter()
                .any(|k| k == DESTINATION_ACCOUNT_KEYS)
    }

    /// A policy that allows everything: for tests of everything else.
    #[cfg(test)]
    pub fn trust_all() -> Self {
        let all = || vec!["*".to_owned()];
        Self {
            name: "trust-all".into(),
            spec: AmiCopyPolicySpec {
                namespace_selector: None,
                source_owners: all(),
                regions: all(),
                roles: vec![RoleRule {
                    arn: "*".into(),
                    require_external_id: false,
                }],
                kms_keys: all(),
                sharing: SharingRules {
                    accounts: all(),
                    organizations: all(),
                    organizational_units: all(),
                    snapshots: true,
                    public: true,
                },
                max_destinations: None,
            },
        }
    }

    /// What in `spec` this policy refuses, but the source's owner (known
    /// only from EC2: see [`Governing::source_owner`]); `own` is the
    /// operator's account, when known.
    pub fn check(&self, spec: &AmiCopySpec, own: Option<&str>) -> Vec<Denial> {
        let p = &self.spec;
        let mut out = Vec::new();
        let mut deny = |rule, value: &str, region: Option<&str>| {
            out.push(Denial {
                policy: self.name.clone(),
                rule,
                value: value.to_owned(),
                region: region.map(str::to_owned),
            });
        };
        if let Some(owners) = spec.source.selector.as_ref().map(|s| &s.owners) {
            let owners: Vec<&str> = if owners.is_empty() {
                vec!["self"]
            } else {
                owners.iter().map(String::as_str).collect()
            };
            for owner in owners.into_iter().filter(|o| !allows(&p.source_owners, o)) {
                deny("sourceOwners", owner, None);
            }
        }
        if let Some(max) = p.max_destinations
            && spec.destinations.len() > usize::try_from(max).unwrap_or(0)
        {
            deny(
                "maxDestinations",
                &spec.destinations.len().to_string(),
                None,
            );
        }
        for d in &spec.destinations {
            for (rule, value) in self.destination(spec, d, own) {
                deny(rule, &value, Some(&d.region));
            }
        }
        if let Some(sharing) = &spec.sharing {
            for (rule, value) in self.sharing(sharing) {
                deny(rule, &value, None);
            }
        }
        out
    }

    /// What this policy refuses in one destination.
    fn destination(
        &self,
        spec: &AmiCopySpec,
        d: &Destination,
        own: Option<&str>,
    ) -> Vec<(&'static str, String)> {
        let p = &self.spec;
        let mut out = Vec::new();
        if !allows(&p.regions, &d.region) {
            out.push(("regions", d.region.clone()));
        }
        if let Some(role) = &d.role_arn {
            match p
                .roles
                .iter()
                .find(|r| allows(std::slice::from_ref(&r.arn), role))
            {
                None => out.push(("roles", role.clone())),
                Some(r) if r.require_external_id && d.external_id.is_none() => {
                    out.push(("roles.requireExternalId", role.clone()));
                }
                Some(_) => {}
            }
        }
        if let Some(key) = &d.kms_key_id
            && spec.encryption_for(d) == Some(true)
            && !self.allows_key(key, d.role_arn.as_deref(), own)
        {
            out.push(("kmsKeys", key.clone()));
        }
        out
    }

    /// Key IDs and aliases are the destination account's; a key ARN is
    /// when it names the role's account, or without a role, the operator's
    /// (which admission cannot know: there, any key ARN passes this test).
    fn allows_key(&self, key: &str, role_arn: Option<&str>, own: Option<&str>) -> bool {
        let account = match role_arn {
            Some(role) => account_of(role),
            None => own,
        };
        let own = self
            .spec
            .kms_keys
            .iter()
            .any(|k| k == DESTINATION_ACCOUNT_KEYS)
            && (!key.starts_with("arn:") || account.is_some() && account == account_of(key));
        own || allows(&self.spec.kms_keys, key)
    }

    /// What this policy refuses in `spec.sharing`.
    pub fn sharing(&self, s: &Sharing) -> Vec<(&'static str, String)> {
        let r = &self.spec.sharing;
        let mut out = Vec::new();
        let lists = [
            ("sharing.accounts", &s.accounts, &r.accounts),
            (
                "sharing.organizations",
                &s.organization_arns,
                &r.organizations,
            ),
            (
                "sharing.organizationalUnits",
                &s.organizational_unit_arns,
                &r.organizational_units,
            ),
        ];
        for (rule, wanted, allowed) in lists {
            for v in wanted.iter().filter(|v| !allows(allowed, v)) {
                out.push((rule, v.clone()));
            }
        }
        if s.snapshots == Some(true) && !r.snapshots {
            out.push(("sharing.snapshots", "true".into()));
        }
        if s.public == Some(true) && !r.public {
            out.push(("sharing.public", "true".into()));
        }
        out
    }

    /// Whether the owner EC2 reports for the source (and its alias, such as
    /// `amazon`) is allowed; `own` is the operator's account.
    pub fn source_owner(&self, owner: &str, alias: Option<&str>, own: Option<&str>) -> bool {
        let owners = &self.spec.source_owners;
        allows(owners, owner)
            || alias.is_some_and(|a| allows(owners, a))
            || (own == Some(owner) && allows(owners, "self"))
    }
}

/// What the policies governing an object make of it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Judgement {
    /// Destinations refused, by region, and why: no EC2 call is made there.
    pub blocked: BTreeMap<String, String>,
    /// A refusal of the whole object (source owner, too many destinations):
    /// no copy starts.
    pub global: Option<String>,
    /// The sharing the policies allow of what the spec asks.
    pub sharing: Option<Sharing>,
    /// Every refusal, for the condition and the Event.
    pub denials: Vec<Denial>,
}

impl Judgement {
    /// One message for every refusal.
    pub fn message(&self) -> Option<String> {
        let all: Vec<String> = self.denials.iter().map(Denial::message).collect();
        (!all.is_empty()).then(|| all.join("; "))
    }
}

/// Applies `governing` to `spec`, whose source EC2 described as `source`
/// (owner and alias), for an operator whose account is `own`.
pub fn judge(
    governing: &[Governing],
    spec: &AmiCopySpec,
    source: Option<(&str, Option<&str>)>,
    own: Option<&str>,
) -> Judgement {
    let mut denials: Vec<Denial> = governing.iter().flat_map(|g| g.check(spec, own)).collect();
    if let Some((owner, alias)) = source {
        for g in governing
            .iter()
            .filter(|g| !g.source_owner(owner, alias, own))
        {
            denials.push(Denial {
                policy: g.name.clone(),
                rule: "sourceOwners",
                value: owner.to_owned(),
                region: None,
            });
        }
    }
    let mut blocked: BTreeMap<String, String> = BTreeMap::new();
    let mut global = Vec::new();
    for d in &denials {
        match (&d.region, d.rule) {
            (Some(region), _) => {
                let entry = blocked.entry(region.clone()).or_default();
                if !entry.is_empty() {
                    entry.push_str("; ");
                }
                entry.push_str(&d.message());
            }
            (None, "sourceOwners" | "maxDestinations") => global.push(d.message()),
            (None, _) => {}
        }
    }
    Judgement {
        blocked,
        global: (!global.is_empty()).then(|| global.join("; ")),
        sharing: spec.sharing.as_ref().map(|s| allowed_sharing(s, &denials)),
        denials,
    }
}

/// The sharing `spec` asks for, less what `denials` refuse.
fn allowed_sharing(sharing: &Sharing, denials: &[Denial]) -> Sharing {
    let ok = |rule: &str, v: &str| !denials.iter().any(|d| d.rule == rule && d.value == v);
    let keep = |rule: &'static str, values: &[String]| -> Vec<String> {
        values.iter().filter(|v| ok(rule, v)).cloned().collect()
    };
    Sharing {
        accounts: keep("sharing.accounts", &sharing.accounts),
        organization_arns: keep("sharing.organizations", &sharing.organization_arns),
        organizational_unit_arns: keep(
            "sharing.organizationalUnits",
            &sharing.organizational_unit_arns,
        ),
        snapshots: sharing
            .snapshots
            .filter(|_| ok("sharing.snapshots", "true")),
        public: sharing.public.filter(|_| ok("sharing.public", "true")),
    }
}

#[cfg(test)]
mod tests;
