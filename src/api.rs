//! The `AmiCopy` custom resource (`amicopy.dev/v1alpha1`).
//!
//! These types are the single source of truth for the CRD: `ami-copy-operator
//! crd` prints the YAML committed under `crds/`. Doc comments on fields become
//! `kubectl explain` text, so they are written for users.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// API group of every resource this operator serves.
pub const GROUP: &str = "amicopy.dev";
/// Finalizer that guards the deletion of target images.
pub const FINALIZER: &str = "amicopy.dev/cleanup";
/// Tag naming the owning object as `<namespace>/<name>`.
pub const OWNER_TAG: &str = "amicopy.dev/owner";
/// Tag carrying the owning object's UID; nothing without it is ever modified.
pub const UID_TAG: &str = "amicopy.dev/uid";
/// Tag recording the source image a target was copied from.
pub const SOURCE_TAG: &str = "amicopy.dev/source-image";
/// Annotation listing source AMI IDs whose copies are kept whatever `retain` says.
pub const PINNED_ANNOTATION: &str = "amicopy.dev/pinned-sources";
/// Tags under this prefix are reserved for the operator.
pub const RESERVED_TAG_PREFIX: &str = "amicopy.dev/";
/// Annotation that, set to `"true"`, stops every EC2 call for the object.
pub const PAUSED_ANNOTATION: &str = "amicopy.dev/paused";

/// Regions of every AWS partition: commercial (`eu-west-1`), China
/// (`cn-north-1`), GovCloud (`us-gov-west-1`), the ISO partitions
/// (`us-iso-east-1`, `us-isob-east-1`, `eu-isoe-west-1`, `us-isof-south-1`)
/// and the European Sovereign Cloud (`eusc-de-east-1`).
const REGION_RULE: &str = "self.matches('^[a-z]{2,4}(-gov|-iso[a-z]?)?(-[a-z]+)+-[0-9]{1,2}$')";

/// Longest `spec.name`: EC2 allows 128 characters and the operator appends
/// `-` and the 21-character source image ID (see [`crate::plan::target_name`]).
pub const MAX_NAME_BASE: usize = 106;

/// AmiCopy copies one source AMI into one or more destination regions and
/// keeps the copies in step with the source.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "amicopy.dev",
    version = "v1alpha1",
    kind = "AmiCopy",
    plural = "amicopies",
    singular = "amicopy",
    shortname = "amic",
    category = "aws",
    namespaced,
    status = "AmiCopyStatus",
    printcolumn = r#"{"name":"Source","type":"string","description":"The source AMI the current copies are made from","jsonPath":".status.sourceImageId"}"#,
    printcolumn = r#"{"name":"Available","type":"string","description":"Destinations whose current copy is available, out of all destinations","jsonPath":".status.available"}"#,
    printcolumn = r#"{"name":"Status","type":"string","description":"Reason of the Ready condition","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("self.destinations.all(d, !has(d.kmsKeyId) || (has(d.encrypted) ? d.encrypted : (has(self.encrypted) && self.encrypted)))")
        .message("kmsKeyId needs encryption: set encrypted: true on that destination or spec.encrypted: true")
        .field_path(".destinations"),
    validation = Rule::new("!(has(self.deprecateAfter) && has(self.deprecationTime))")
        .message("give deprecateAfter or deprecationTime, not both")
)]
#[serde(rename_all = "camelCase")]
pub struct AmiCopySpec {
    /// The AMI to copy.
    pub source: Source,

    /// Regions to copy the source AMI into, one entry per region (1 to 100).
    /// (Server-side apply merges it by `region`: two field managers each
    /// keep their own destinations.)
    #[schemars(length(min = 1, max = 100))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["region"]))]
    #[x_kube(
        validation = Rule::new("self.all(d, self.exists_one(e, e.region == d.region))")
            .message("destinations must name each region only once")
    )]
    pub destinations: Vec<Destination>,

    /// Base of the target AMI names. The operator appends `-<source image ID>`
    /// so that copies of successive sources never collide. Defaults to the
    /// source AMI's name. 3 to 106 characters: letters, digits, spaces and
    /// ( ) [ ] . / - ' @ _
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 106))]
    #[x_kube(validation = Rule::new(r#"self.matches('^[A-Za-z0-9()\\[\\] ./\'@_-]+$')"#).message("name may contain only letters, digits, spaces and ( ) [ ] . / - ' @ _"))]
    pub name: Option<String>,

    /// Description of the target AMIs (at most 255 characters). Defaults to
    /// one that names the source image and region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub description: Option<String>,

    /// Encrypt the target snapshots in every destination that does not say
    /// otherwise. Unset keeps the source's encryption state (EC2's default);
    /// an encrypted source can never be copied to an unencrypted target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,

    /// Copy the source AMI's user-defined tags to the target AMIs (EC2's
    /// CopyImageTags). Defaults to false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_image_tags: Option<bool>,

    /// Tags applied to the target AMIs and their snapshots (at most 40). Keys
    /// may not start with `aws:` or `amicopy.dev/`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 40))]
    #[x_kube(
        validation = Rule::new("self.all(k, !k.startsWith('aws:') && !k.startsWith('amicopy.dev/'))")
            .message("tag keys may not start with 'aws:' (reserved by AWS) or 'amicopy.dev/' (reserved by the operator)"),
        validation = Rule::new("self.all(k, size(k) >= 1 && size(k) <= 128 && size(self[k]) <= 256)")
            .message("tag keys must be 1 to 128 characters and values at most 256")
    )]
    pub tags: BTreeMap<String, String>,

    /// What happens to the target AMIs when this object is deleted, a
    /// destination is removed, or a newer source replaces them: `Delete`
    /// (default) deregisters them and deletes their snapshots; `Retain` leaves
    /// them in place and stops managing them.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// How many generations of copies to keep per destination: 1 (default)
    /// keeps only the copy of the current source; 3 also keeps the copies of
    /// the two previous sources. Older ones are retired once the newest copy
    /// is available. A generation whose source AMI is listed in the
    /// annotation `amicopy.dev/pinned-sources` (comma-separated) is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<i32>", range(min = 1, max = 10))]
    pub retain: Option<u32>,

    /// Who may launch the copies (EC2 launch permissions), applied to every
    /// copy once it is available; removing an entry removes the permission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharing: Option<Sharing>,

    /// Deprecate each copy this long after EC2 created it (EC2's
    /// EnableImageDeprecation), e.g. `2160h` or `90d`. Not with
    /// `deprecationTime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(m|h|d|w))+$')").message("deprecateAfter is a duration such as 720h, 90d or 12w"))]
    pub deprecate_after: Option<String>,

    /// Deprecate every copy at this time (RFC 3339, e.g.
    /// `2027-06-30T00:00:00Z`). Not with `deprecateAfter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\\\\.[0-9]+)?)?(Z|[+-][0-9]{2}:[0-9]{2})$')").message("deprecationTime is an RFC 3339 time such as 2027-06-30T00:00:00Z"))]
    pub deprecation_time: Option<String>,

    /// Time-based copy: the minutes EC2 may take to complete each copy
    /// (EC2's SnapshotCopyCompletionDurationMinutes), 15 to 2880 in steps
    /// of 15. Unset: a standard copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 15, max = 2880))]
    #[x_kube(validation = Rule::new("self % 15 == 0").message("snapshotCopyCompletionDurationMinutes must be a multiple of 15"))]
    pub snapshot_copy_completion_duration_minutes: Option<i64>,

    /// Publish the IDs of the current copies once every destination's copy
    /// of the current source is available, so that whoever launches them
    /// never sees half a rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Publish>,

    /// Turn on EC2 deregistration protection (without cooldown) on the
    /// copies of the current source. The operator lifts it itself right
    /// before it retires a copy or cleans up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protect: Option<bool>,

    /// How older copies are retired: only once nothing uses them (default),
    /// and by deregistering (default) or disabling them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retirement: Option<RetirementPolicy>,
}

/// Where the current copies' IDs are published.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Publish {
    /// A ConfigMap in this object's namespace, owned by it, with one key
    /// per destination region holding the current copy's ID and the key
    /// `source` holding the source AMI's ID. A ConfigMap of that name that
    /// this object does not own is never overwritten.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<PublishConfigMap>,

    /// An SSM parameter written in each destination's region (and
    /// account), of type `String` with data type `aws:ec2:image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssm_parameter: Option<PublishSsmParameter>,
}

/// The ConfigMap the IDs are published to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PublishConfigMap {
    /// Name of the ConfigMap, in this object's namespace.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')").message("configMap.name must be a DNS subdomain name, e.g. golden-ami-ids"))]
    pub name: String,
}

/// The SSM parameter the IDs are published to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PublishSsmParameter {
    /// Full name of the parameter, e.g.
    /// `/amicopy/team-a/golden/{region}`: `{region}` is replaced by each
    /// destination's region, `{namespace}` and `{name}` by this object's.
    /// The operator writes only under `<its parameter prefix><namespace>/`
    /// (by default `/amicopy/<namespace>/`); a name elsewhere is refused
    /// (Degraded `PublishDenied`).
    #[schemars(length(min = 2, max = 1011))]
    #[x_kube(
        validation = Rule::new("self.matches('^/[A-Za-z0-9_.{}/-]+$')").message("ssmParameter.name is a full parameter name such as /amicopy/team-a/golden/{region}: letters, digits, _ . - / and the placeholders {region}, {namespace}, {name}"),
        validation = Rule::new("!self.lowerAscii().startsWith('/aws') && !self.lowerAscii().startsWith('/ssm')").message("SSM reserves parameter names starting with aws or ssm")
    )]
    pub name: String,
}

/// How older copies are retired.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RetirementPolicy {
    /// Keep an older copy while something in its region and account uses
    /// it: the `$Default` or `$Latest` version of a launch template, or an
    /// instance that is pending, running, stopping or stopped. Default
    /// true; the copy is listed under `status.retiring` with what uses it
    /// and retired once nothing does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_in_use: Option<bool>,

    /// Also keep a copy launched within this long (EC2's
    /// `lastLaunchedTime`, which EC2 reports up to 24 hours late), e.g.
    /// `168h` or `30d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(m|h|d|w))+$')").message("lastLaunchedWithin is a duration such as 168h, 30d or 4w"))]
    pub last_launched_within: Option<String>,

    /// `Deregister` (default): deregister the copy and, with `deletionPolicy:
    /// Delete`, delete its snapshots. `Disable`: disable it (EC2's
    /// DisableImage); it keeps its snapshots and can be enabled again.
    #[serde(default)]
    pub action: RetirementAction,
}

/// What retiring an older copy does.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum RetirementAction {
    /// Deregister the copy (and delete its snapshots under `deletionPolicy: Delete`).
    #[default]
    Deregister,
    /// Disable the copy: it keeps its snapshots and can be enabled again.
    Disable,
}

impl AmiCopySpec {
    /// Whether an older copy that something uses is kept.
    pub fn keeps_in_use(&self) -> bool {
        self.retirement
            .as_ref()
            .and_then(|r| r.keep_in_use)
            .unwrap_or(true)
    }

    /// How older copies are retired.
    pub fn retirement_action(&self) -> RetirementAction {
        self.retirement
            .as_ref()
            .map(|r| r.action)
            .unwrap_or_default()
    }
}

/// Launch permissions for the copies.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Sharing {
    /// AWS account IDs (12 digits) that may launch the copies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), inner(length(max = 12)))]
    #[x_kube(validation = Rule::new("self.all(a, a.matches('^[0-9]{12}$'))").message("accounts must be 12-digit AWS account IDs"))]
    pub accounts: Vec<String>,

    /// AWS Organizations ARNs, e.g.
    /// `arn:aws:organizations::111122223333:organization/o-abcde12345`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20), inner(length(max = 128)))]
    #[x_kube(validation = Rule::new("self.all(a, a.matches('^arn:aws[a-z-]*:organizations::[0-9]{12}:organization/o-[a-z0-9]{10,32}$'))").message("organizationArns must look like arn:aws:organizations::111122223333:organization/o-abcde12345"))]
    pub organization_arns: Vec<String>,

    /// Organizational unit ARNs, e.g.
    /// `arn:aws:organizations::111122223333:ou/o-abcde12345/ou-ab12-cdef3456`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20), inner(length(max = 160)))]
    #[x_kube(validation = Rule::new("self.all(a, a.matches('^arn:aws[a-z-]*:organizations::[0-9]{12}:ou/o-[a-z0-9]{10,32}/ou-[a-z0-9]{4,32}-[a-z0-9]{8,32}$'))").message("organizationalUnitArns must look like arn:aws:organizations::111122223333:ou/o-abcde12345/ou-ab12-cdef3456"))]
    pub organizational_unit_arns: Vec<String>,

    /// Make the copies public. Refused (Degraded `PublicSharingNotAllowed`)
    /// unless the operator runs with `--allow-public-images`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public: Option<bool>,

    /// Also let `accounts` create volumes from the copies' snapshots
    /// (createVolumePermission), which they need to copy the AMI themselves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<bool>,
}

/// Where the source AMI lives: a fixed image, or the most recent image that
/// matches a selector.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.imageId) != has(self.selector)")
        .message("give exactly one of source.imageId or source.selector")
)]
pub struct Source {
    /// AWS region of the source AMI, e.g. `us-east-1`.
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(REGION_RULE).message("region must look like an AWS region, e.g. us-east-1"))]
    pub region: String,

    /// ID of the source AMI: `ami-` followed by 8 or 17 lowercase hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 21))]
    #[x_kube(validation = Rule::new("self.matches('^ami-([0-9a-f]{8}|[0-9a-f]{17})$')").message("imageId must be ami- followed by 8 or 17 lowercase hex digits, e.g. ami-0123456789abcdef0"))]
    pub image_id: Option<String>,

    /// Follow the most recent available AMI in `region` that matches. The
    /// operator resolves it again every `--source-refresh-interval`; a newer
    /// match is copied to every destination like a changed `imageId`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<SourceSelector>,
}

/// Which AMIs a source selector matches.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.name) || has(self.tags)")
        .message("a selector needs a name pattern or tags")
)]
pub struct SourceSelector {
    /// Owners of the AMIs: account IDs, `self` or `amazon` (default: `self`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10), inner(length(max = 16)))]
    #[x_kube(validation = Rule::new("self.all(o, o.matches('^([0-9]{12}|self|amazon|aws-marketplace)$'))").message("owners are 12-digit account IDs, self, amazon or aws-marketplace"))]
    pub owners: Vec<String>,

    /// AMI name pattern; `*` and `?` are wildcards, e.g. `golden-base-*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub name: Option<String>,

    /// Tags the AMI must carry (all of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 10))]
    pub tags: Option<BTreeMap<String, String>>,
}

impl Source {
    /// The source image the current copies are made from: the fixed one, or
    /// the one the selector resolved to.
    pub fn effective_image_id<'a>(&'a self, status: Option<&'a AmiCopyStatus>) -> Option<&'a str> {
        match &self.image_id {
            Some(id) => Some(id),
            None => status?
                .resolved_source
                .as_ref()
                .map(|r| r.image_id.as_str()),
        }
    }
}

/// One destination region and its encryption settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.kmsKeyId) || !self.kmsKeyId.startsWith('arn:') || self.kmsKeyId.contains(':kms:' + self.region + ':')")
        .message("kmsKeyId is a KMS key ARN of another region: KMS keys are regional, use a key in the destination's region"),
    validation = Rule::new("!has(self.externalId) || has(self.roleArn)")
        .message("externalId goes with roleArn")
)]
pub struct Destination {
    /// AWS region to copy into, e.g. `eu-west-1`.
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(REGION_RULE).message("region must look like an AWS region, e.g. eu-west-1"))]
    pub region: String,

    /// Encrypt the target snapshots in this region. Overrides
    /// `spec.encrypted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,

    /// KMS key for the target snapshots in this region: a key ID, key ARN,
    /// alias name (`alias/...`) or alias ARN. Needs encryption on. An ARN
    /// must be in this destination's region. Unset uses the account's default
    /// EBS key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^(arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:(key|alias)/.+|alias/.+|[0-9a-f-]{36}|mrk-[0-9a-f]{32})$')").message("kmsKeyId must be a KMS key ID, key ARN, alias/NAME or alias ARN"))]
    pub kms_key_id: Option<String>,
    /// IAM role to assume for this destination, so that the copy is made in
    /// the role's account (cross-account copies). The source AMI and its
    /// snapshots must be shared with that account, and any KMS key of the
    /// source with it too. The copy is tracked, tagged and cleaned up there
    /// like any other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]+$')").message("roleArn must be an IAM role ARN such as arn:aws:iam::444455556666:role/ami-copier"))]
    pub role_arn: Option<String>,

    /// External ID the role's trust policy asks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 1224))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9+=,.@:/_-]+$')").message("externalId may contain letters, digits and + = , . @ : / _ -"))]
    pub external_id: Option<String>,
}

/// What happens to target AMIs this operator no longer needs.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum DeletionPolicy {
    /// Deregister the AMI and delete its snapshots.
    #[default]
    Delete,
    /// Leave the AMI and its snapshots; remove the operator's ownership tag.
    Retain,
}

/// Observed state of an AmiCopy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AmiCopyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The source AMI the current copies are made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_image_id: Option<String>,

    /// What `spec.source.selector` resolved to, and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_source: Option<ResolvedSource>,

    /// Destinations whose current copy is available, out of all, e.g. `2/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available: Option<String>,

    /// The current copy in each destination region.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["region"]))]
    pub destinations: Vec<TargetStatus>,

    /// Older copies (of a previous source, or in a region no longer listed)
    /// that are retired once the current copies are available.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retiring: Vec<TargetStatus>,

    /// Older copies kept by `spec.retain` or pinned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub generations: Vec<TargetStatus>,

    /// Keys of `spec.tags` last applied to the copies; a key removed from
    /// `spec.tags` is removed from the copies, other tags are never touched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tag_keys: Vec<String>,

    /// What `spec.publish` last published, and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<Published>,

    /// `Ready`, `Progressing`, `Degraded`, `Reconciling`, `Stalled`, and
    /// `Paused` while the object is paused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// A publication of the current copies' IDs.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Published {
    /// The source AMI whose copies were published.
    pub source_image_id: String,
    /// The published copy of each destination region.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub images: BTreeMap<String, String>,
    /// When they were published (RFC 3339).
    pub at: String,
    /// The ConfigMap written, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<String>,
    /// The SSM parameters written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssm_parameters: Vec<PublishedParameter>,
}

/// One SSM parameter written.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PublishedParameter {
    /// Region of the parameter.
    pub region: String,
    /// Its full name.
    pub name: String,
    /// The value written: the region's copy.
    pub image_id: String,
    /// Role the parameter was written through (cross-account destinations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
    /// External ID the role was assumed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
}

/// The image a source selector matched.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedSource {
    /// The most recent matching AMI.
    pub image_id: String,
    /// Its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When the selector was resolved (RFC 3339).
    pub resolved_at: String,
}

/// One target AMI.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TargetStatus {
    /// Destination region.
    pub region: String,

    /// ID of the target AMI, recorded as soon as EC2 returns it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,

    /// `pending`, `available` or `failed` as EC2 reports them (or another EC2
    /// image state, such as `deregistered`), `waiting` while the copy cannot
    /// start yet (source pending, EC2 busy), `queued` while it waits for a
    /// copy slot (the operator's per-region limits, EC2's copy quota), `error`
    /// when it cannot start at all until the spec or the source changes.
    #[schemars(with = "String")]
    pub state: TargetState,

    /// Source AMI this target is (being) copied from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_image_id: Option<String>,

    /// Whether EC2 produced encrypted snapshots (what EC2 reports, not what
    /// was asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,

    /// KMS key of the target snapshots, as EC2 reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<String>,

    /// Stable reason for a state that needs attention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,

    /// EC2's state reason or the operator's explanation.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,

    /// Role the copy was made through (cross-account destinations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,

    /// External ID the role was assumed with, kept so that a copy whose
    /// destination was removed from the spec can still be retired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,

    /// Launch permissions applied: `account:<id>`, `organization:<arn>`,
    /// `ou:<arn>`, `public`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_with: Vec<String>,

    /// When EC2 deprecates this copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deprecation_time: Option<String>,

    /// EC2's deregistration protection of this copy, as EC2 reports it
    /// (`enabled-without-cooldown`, ...); absent when off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deregistration_protection: Option<String>,

    /// What keeps this older copy from being retired: launch template
    /// versions and instances in its region and account, or a recent
    /// launch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub used_by: Vec<String>,

    /// How many times a copy to this region was started for this source after
    /// its target went missing; part of the copy's idempotency token.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(with = "i32", range(min = 0))]
    pub attempt: u32,

    /// When the operator decided to start this copy (RFC 3339), kept until
    /// EC2 returns the copy's image ID: a copy whose start was never
    /// confirmed (the operator stopped in between) is looked for in its
    /// region for a while, even if the destination is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned_at: Option<String>,

    /// Snapshots of this deregistered copy that are not deleted yet; the
    /// operator retries until they are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots_to_delete: Vec<String>,

    /// The object's `metadata.generation` when this copy was first planned;
    /// part of the copy's idempotency token, so that a destination removed
    /// and added back gets a fresh copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
}

/// State of a target image: EC2's image states and the operator's own.
/// Serialized as its lowercase name; a state EC2 reports that is not listed
/// here is kept as EC2 wrote it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TargetState {
    /// EC2 is copying.
    Pending,
    /// The copy is done and can be launched.
    Available,
    /// EC2 gave up on the copy.
    Failed,
    /// The copy cannot start yet (source pending, EC2 busy or throttling).
    Waiting,
    /// Waiting for a copy slot (per-region copy limits, EC2's copy quota).
    Queued,
    /// The copy cannot start at all until the spec or the source changes.
    Error,
    /// Any other state EC2 reports (`invalid`, `deregistered`, ...).
    Other(String),
}

impl TargetState {
    pub fn as_str(&self) -> &str {
        match self {
            TargetState::Pending => "pending",
            TargetState::Available => "available",
            TargetState::Failed => "failed",
            TargetState::Waiting => "waiting",
            TargetState::Queued => "queued",
            TargetState::Error => "error",
            TargetState::Other(s) => s,
        }
    }

    /// A copy on its way: started, queued for a slot, or waiting to start.
    pub fn is_underway(&self) -> bool {
        matches!(
            self,
            TargetState::Pending | TargetState::Queued | TargetState::Waiting
        )
    }

    /// No copy was started: it waits for a slot, for EC2, or for a change.
    pub fn is_unstarted(&self) -> bool {
        matches!(
            self,
            TargetState::Queued | TargetState::Waiting | TargetState::Error
        )
    }
}

/// EC2 answered without a state; nothing is known yet.
impl Default for TargetState {
    fn default() -> Self {
        TargetState::Other(String::new())
    }
}

impl From<&str> for TargetState {
    fn from(s: &str) -> Self {
        match s {
            "pending" => TargetState::Pending,
            "available" => TargetState::Available,
            "failed" => TargetState::Failed,
            "waiting" => TargetState::Waiting,
            "queued" => TargetState::Queued,
            "error" => TargetState::Error,
            other => TargetState::Other(other.to_owned()),
        }
    }
}

impl std::fmt::Display for TargetState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for TargetState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for TargetState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        Ok(TargetState::from(s.as_ref()))
    }
}

impl AmiCopyStatus {
    /// Every target the status records: current, retiring, and kept
    /// generations.
    pub fn targets(&self) -> impl Iterator<Item = &TargetStatus> {
        self.destinations
            .iter()
            .chain(&self.retiring)
            .chain(&self.generations)
    }

    pub fn targets_mut(&mut self) -> impl Iterator<Item = &mut TargetStatus> {
        self.destinations
            .iter_mut()
            .chain(&mut self.retiring)
            .chain(&mut self.generations)
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl AmiCopySpec {
    /// Whether snapshots in `dest` should be encrypted: the destination's own
    /// setting, else the spec-wide one, else unset (keep the source's state).
    pub fn encryption_for(&self, dest: &Destination) -> Option<bool> {
        dest.encrypted.or(self.encrypted)
    }
}
