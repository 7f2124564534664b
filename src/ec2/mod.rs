//! The EC2 seam: the handful of EC2 calls the operator makes, behind a small
//! trait ([`Ec2`]), with the aws-sdk-ec2 implementation in [`aws`].
//!
//! Everything above this module sees plain Rust values ([`ImageInfo`],
//! [`Ec2Error`]), so the planner and most of the reconciler are tested with an
//! in-memory fake and the SDK is exercised against real EC2 API peers.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;

use crate::api::{TargetState, UID_TAG};

mod aws;

pub use aws::AwsEc2;

/// What the operator needs to know about an AMI.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageInfo {
    pub id: String,
    pub name: Option<String>,
    /// EC2's image state: `pending`, `available`, `failed`, `invalid`, ...
    pub state: TargetState,
    /// EC2's StateReason message, if any.
    pub state_reason: Option<String>,
    pub owner_id: Option<String>,
    /// The owner's alias, for images of AWS (`amazon`) and the Marketplace.
    pub owner_alias: Option<String>,
    /// `ebs` or `instance-store`.
    pub root_device_type: Option<String>,
    /// `hvm` or `paravirtual`.
    pub virtualization_type: Option<String>,
    pub snapshots: Vec<SnapshotRef>,
    pub tags: BTreeMap<String, String>,
    /// Marketplace product codes: such images cannot be copied across accounts.
    pub product_codes: Vec<String>,
    /// When EC2 created the image (RFC 3339).
    pub creation_date: Option<String>,
    /// When EC2 deprecates the image (RFC 3339), if set.
    pub deprecation_time: Option<String>,
    /// For a copy, the image it was copied from, as EC2 reports it (EC2
    /// does; some peers do not).
    pub source_image_id: Option<String>,
    /// EC2's deregistration protection: `disabled`,
    /// `enabled-without-cooldown`, `enabled-with-cooldown`, or `disabled-until
    /// <time>` during a cooldown; `None` when EC2 does not say.
    pub deregistration_protection: Option<String>,
    /// When an instance was last launched from the image (EC2 reports it up
    /// to 24 hours late).
    pub last_launched_time: Option<String>,
}

impl ImageInfo {
    pub fn encrypted(&self) -> Option<bool> {
        if self.snapshots.is_empty() {
            None
        } else {
            Some(self.snapshots.iter().any(|s| s.encrypted))
        }
    }

    pub fn kms_key_id(&self) -> Option<&str> {
        self.snapshots.iter().find_map(|s| s.kms_key_id.as_deref())
    }

    pub fn instance_store(&self) -> bool {
        self.root_device_type.as_deref() == Some("instance-store")
    }

    /// Deregistration protection is on (or in its cooldown): EC2 refuses to
    /// deregister the image.
    pub fn protected(&self) -> bool {
        self.deregistration_protection
            .as_deref()
            .is_some_and(|p| p != "disabled" && !p.is_empty())
    }

    pub fn owned_by(&self, uid: &str) -> bool {
        self.tags.get(UID_TAG).map(String::as_str) == Some(uid)
    }
}

/// An EBS snapshot behind an image's block device mapping.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotRef {
    pub id: String,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
}

/// A snapshot and its tags.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: String,
    pub tags: BTreeMap<String, String>,
}

/// Where EC2 calls go: a region of this account, or a region of another
/// account reached through an IAM role.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope {
    pub region: String,
    pub role: Option<Role>,
}

/// An IAM role of another account, the external ID its trust policy asks
/// for, and the STS session name that tells the other account's CloudTrail
/// which object asked.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Role {
    pub arn: String,
    pub external_id: Option<String>,
    pub session: Option<String>,
}

/// The account an ARN names (`arn:<partition>:<service>:<region>:<account>:...`).
pub fn account_of(arn: &str) -> Option<&str> {
    arn.split(':').nth(4).filter(|a| !a.is_empty())
}

/// Session name of the operator's own calls through a role (none made for
/// an object).
pub const OPERATOR_SESSION: &str = "ami-copy-operator";

/// The STS session name of the calls made for the object `namespace/name`:
/// `amicopy.<namespace>.<name>`, cut to STS's 64 characters (object names
/// are DNS labels and subdomains, all of whose characters STS allows).
pub fn session_name(namespace: &str, name: &str) -> String {
    format!("amicopy.{namespace}.{name}")
        .chars()
        .take(64)
        .collect()
}

impl Scope {
    /// A region of the operator's own account.
    pub fn region(region: impl Into<String>) -> Self {
        Self {
            region: region.into(),
            role: None,
        }
    }

    /// A region reached through `role_arn` when there is one, else a region
    /// of the operator's own account.
    pub fn through(region: &str, role_arn: Option<&str>, external_id: Option<&str>) -> Self {
        Self {
            region: region.to_owned(),
            role: role_arn.map(|arn| Role {
                arn: arn.to_owned(),
                external_id: external_id.map(str::to_owned),
                session: None,
            }),
        }
    }

    /// The same scope, its calls through a role named after the object
    /// `namespace/name` in STS (see [`session_name`]).
    pub fn on_behalf_of(mut self, namespace: &str, name: &str) -> Self {
        if let Some(role) = &mut self.role {
            role.session = Some(session_name(namespace, name));
        }
        self
    }

    pub fn role_arn(&self) -> Option<&str> {
        self.role.as_ref().map(|r| r.arn.as_str())
    }

    pub fn external_id(&self) -> Option<&str> {
        self.role.as_ref().and_then(|r| r.external_id.as_deref())
    }
}

/// `region`, or `region account <account ID>` for a role: how logs,
/// metrics and status messages name a scope. Never the role's ARN nor its
/// external ID, which a tenant chose and telemetry must not spread.
impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.region)?;
        if let Some(role) = &self.role {
            let account = account_of(&role.arn).unwrap_or("unknown");
            write!(f, " account {account}")?;
        }
        Ok(())
    }
}

/// A launch permission on an image.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    Account(String),
    Organization(String),
    OrganizationalUnit(String),
    Public,
}

impl Permission {
    /// How status lists it: `account:<id>`, `organization:<arn>`, `ou:<arn>`, `public`.
    pub fn key(&self) -> String {
        match self {
            Permission::Account(id) => format!("account:{id}"),
            Permission::Organization(arn) => format!("organization:{arn}"),
            Permission::OrganizationalUnit(arn) => format!("ou:{arn}"),
            Permission::Public => "public".into(),
        }
    }
}

/// One permission a copy grants: to launch the image, or (for an account)
/// to create volumes from its snapshots.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Grant {
    Launch(Permission),
    CreateVolume(String),
}

impl Grant {
    /// How `status.destinations[].sharedWith` lists it: a launch
    /// permission's key, or `volume:<account>`.
    pub fn key(&self) -> String {
        match self {
            Grant::Launch(p) => p.key(),
            Grant::CreateVolume(account) => format!("volume:{account}"),
        }
    }

    /// The grant a status key names; `None` for a key no version of the
    /// operator writes.
    pub fn from_key(key: &str) -> Option<Self> {
        let (kind, value) = key.split_once(':').unwrap_or((key, ""));
        let launch = |p| Some(Grant::Launch(p));
        match kind {
            "account" => launch(Permission::Account(value.into())),
            "organization" => launch(Permission::Organization(value.into())),
            "ou" => launch(Permission::OrganizationalUnit(value.into())),
            "public" => launch(Permission::Public),
            "volume" => Some(Grant::CreateVolume(value.into())),
            _ => None,
        }
    }
}

/// Which images a source selector asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageQuery {
    pub owners: Vec<String>,
    pub name: Option<String>,
    pub tags: BTreeMap<String, String>,
}

/// Everything `CopyImage` is called with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyRequest {
    pub source_region: String,
    pub source_image_id: String,
    pub name: String,
    pub description: String,
    pub encrypted: Option<bool>,
    pub kms_key_id: Option<String>,
    pub copy_image_tags: bool,
    pub client_token: String,
    /// Tags for the new image and its snapshots (ownership tags included).
    pub tags: BTreeMap<String, String>,
    /// Time-based copy: minutes EC2 may take.
    pub completion_minutes: Option<i64>,
}

/// How an EC2 error should be handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The resource does not exist (or is not visible to this account).
    NotFound,
    /// Throttling: slow down and retry.
    Throttled,
    /// 5xx, timeouts, dropped connections: retry with backoff.
    Transient,
    /// EC2 refused the request; retrying the same request will not help.
    Rejected,
    /// No credentials for the call (none found, expired, AssumeRole
    /// refused): worth showing, and retrying, since they may come back.
    Credentials,
}

/// The code of an [`Ec2Error`] for a call that found no credentials.
pub const CREDENTIALS_UNAVAILABLE: &str = "CredentialsUnavailable";

/// An EC2 error reduced to what the operator acts on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("EC2 {code}: {message}")]
pub struct Ec2Error {
    pub kind: ErrorKind,
    pub code: String,
    pub message: String,
}

impl Ec2Error {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        let code = code.into();
        Self {
            kind: classify(&code),
            code,
            message: message.into(),
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }

    /// Throttling, 5xx, timeouts: worth retrying soon.
    pub fn is_transient(&self) -> bool {
        matches!(self.kind, ErrorKind::Throttled | ErrorKind::Transient)
    }
}

/// Maps an EC2 error code to how it is handled.
pub fn classify(code: &str) -> ErrorKind {
    match code {
        // EC2 answers RequestExpired for expired temporary credentials (and
        // for a clock far off): either way it needs someone to look.
        CREDENTIALS_UNAVAILABLE | "RequestExpired" => ErrorKind::Credentials,
        c if c.ends_with(".NotFound")
            || c == "InvalidAMIID.Unavailable"
            || c == "ParameterNotFound" =>
        {
            ErrorKind::NotFound
        }
        "RequestLimitExceeded" | "Throttling" | "ThrottlingException" | "ResourceLimitExceeded" => {
            ErrorKind::Throttled
        }
        "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable"
        | "RequestTimeout" | "Dispatch" | "Timeout" | "Response" => ErrorKind::Transient,
        _ => ErrorKind::Rejected,
    }
}

/// IDs per batched DescribeImages call (EC2 allows 200 filter values).
/// How EC2 reports deregistration protection turned on by the operator.
pub const PROTECTION_ON: &str = "enabled-without-cooldown";

pub const MAX_IDS_PER_CALL: usize = 100;

/// The EC2 calls the operator makes. Every method acts in one scope: one
/// region of one account.
pub trait Ec2: Send + Sync + 'static {
    /// One image by ID; `None` when EC2 says it does not exist.
    fn describe_image(
        &self,
        scope: &Scope,
        image_id: &str,
    ) -> impl Future<Output = Result<Option<ImageInfo>, Ec2Error>> + Send;

    /// The images among `image_ids` that exist (one call, for batches of up
    /// to [`MAX_IDS_PER_CALL`] IDs); missing ones are left out, not an error.
    fn describe_images_by_ids(
        &self,
        scope: &Scope,
        image_ids: &[String],
    ) -> impl Future<Output = Result<Vec<ImageInfo>, Ec2Error>> + Send;

    /// One image by ID, read fresh, if this scope's account owns it; `None`
    /// when EC2 does not return it to this account (not listed yet, gone,
    /// or someone else's).
    fn owned_image(
        &self,
        scope: &Scope,
        image_id: &str,
    ) -> impl Future<Output = Result<Option<ImageInfo>, Ec2Error>> + Send;

    /// Images owned by this account that carry `amicopy.dev/uid=<uid>`.
    fn owned_images(
        &self,
        scope: &Scope,
        uid: &str,
    ) -> impl Future<Output = Result<Vec<ImageInfo>, Ec2Error>> + Send;

    /// Starts a copy into the scope's region; returns the new image ID.
    fn copy_image(
        &self,
        scope: &Scope,
        req: &CopyRequest,
    ) -> impl Future<Output = Result<String, Ec2Error>> + Send;

    fn create_tags(
        &self,
        scope: &Scope,
        resource_ids: &[String],
        tags: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<(), Ec2Error>> + Send;

    fn delete_tags(
        &self,
        scope: &Scope,
        resource_ids: &[String],
        keys: &[String],
    ) -> impl Future<Output = Result<(), Ec2Error>> + Send;

    /// Deregisters an image (stopping a pending copy).
    fn deregister_image(
        &self,
        scope: &Scope,
        image_id: &str,
    ) -> impl Future<Output = Result<(), Ec2Error>> + Send;

    /// The given snapshots that exist, with their tags.
    fn describe_snapshots(
        &self,
        scope: &Scope,
        snapshot_ids: &[String],
    ) -> impl Future<Output = Result<Vec<SnapshotInfo>, Ec2Error>> + Send;

    /// Snapshots owned by this account that carry `amicopy.dev/uid=<uid>`.
    fn owned_snapshots(
        &self,
        scope: &Scope,
        uid: &str,
    ) -> impl Future<Output = Result<Vec<SnapshotInfo>, Ec2Error>> + Send;

    fn delete_snapshot(
        &self,
        scope: &Scope,
        snapshot_id: &str,
    ) -> impl Future<Output = Result<(), Ec2Error>> + Send;

    /// Adds and removes launch permissions (ModifyImageAttribute).
    fn set_launch_permissions(
        &self,
        scope: &Scope,
        image_id: &str,
        add: &[Permission],
        remove: &[Permission],
    ) -> impl Future<Output = Result<(), Ec2Error>> + Send;

    /// Adds and removes createVolumePermission for accounts on a snapshot.
    fn set_snapshot_permissions(
        &self,
        scope: &Scope,
        snapshot_id: &str,
        add: &[String],
        remove: &[String],
    ) -> impl Future<Output = Result<(), Ec2Error>> + Send;

    /// Deprecates an image at `at` (RFC 3339).
    fn deprecate_image(
        &self,
        scope: &Scope,
        image_id: &str,
        at: &str,
    ) -> impl Future<Output = Result<(), Ec2Error>> + Send;

    /// The account of the operator's own credentials (STS
    /// GetCallerIdentity), once known; `None` while STS does not answer.
    fn own_account(&self) -> impl Future<Output = Option<String>> + Send;

    /// Turns deregistration protection on (without cooldown) or off.
    fn set_deregistration_protection(
        &self,
        scope: &Scope,
        image_id: &str,
        on: bool,
    ) -> impl Future<Output = Result<(), Ec2Error>> + Send;

    /// Disables an image (EC2's DisableImage): it can no longer be launched
    /// and is not listed, but keeps its snapshots and can be enabled again.
    fn disable_image(
        &self,
        scope: &Scope,
        image_id: &str,
    ) -> impl Future<Output = Result<(), Ec2Error>> + Send;

    /// What uses each of `image_ids` in the scope: the `$Default` and
    /// `$Latest` versions of launch templates, and instances that are
    /// pending, running, stopping or stopped. One look-up per kind for all
    /// the images (a page per 1,000 results); images nothing uses are absent.
    fn images_in_use(
        &self,
        scope: &Scope,
        image_ids: &[String],
    ) -> impl Future<Output = Result<BTreeMap<String, Vec<String>>, Ec2Error>> + Send;

    /// The value of an SSM parameter; `None` when it does not exist.
    fn get_parameter(
        &self,
        scope: &Scope,
        name: &str,
    ) -> impl Future<Output = Result<Option<String>, Ec2Error>> + Send;

    /// Writes an SSM parameter holding an AMI ID (type `String`, data type
    /// `aws:ec2:image`), overwriting its value.
    fn put_parameter(
        &self,
        scope: &Scope,
        name: &str,
        image_id: &str,
    ) -> impl Future<Output = Result<(), Ec2Error>> + Send;

    /// Deletes an SSM parameter; one that does not exist is no error.
    fn delete_parameter(
        &self,
        scope: &Scope,
        name: &str,
    ) -> impl Future<Output = Result<(), Ec2Error>> + Send;

    /// Available images matching `query` (all pages).
    fn find_images(
        &self,
        scope: &Scope,
        query: &ImageQuery,
    ) -> impl Future<Output = Result<Vec<ImageInfo>, Ec2Error>> + Send;
}

/// Every EC2 operation [`AwsEc2`] calls: exactly the `ec2:` actions of the
/// IAM policy in `docs/iam-policy.json` (unit tests hold both to this list).
pub const OPERATIONS: &[&str] = &[
    "CopyImage",
    "CreateTags",
    "DeleteSnapshot",
    "DeleteTags",
    "DeregisterImage",
    "DescribeImages",
    "DescribeInstances",
    "DescribeLaunchTemplateVersions",
    "DescribeSnapshots",
    "DisableImage",
    "DisableImageDeregistrationProtection",
    "EnableImageDeprecation",
    "EnableImageDeregistrationProtection",
    "ModifyImageAttribute",
    "ModifySnapshotAttribute",
];

/// The SSM calls the operator makes (publishing), for metrics and the IAM
/// policy's `ssm:` statement.
pub const SSM_OPERATIONS: &[&str] = &["DeleteParameter", "GetParameter", "PutParameter"];

#[cfg(test)]
pub(crate) mod fake;

#[cfg(test)]
mod session_tests {
    use super::*;

    #[test]
    fn a_role_session_names_the_object_within_stss_limits() {
        assert_eq!(session_name("team-a", "golden"), "amicopy.team-a.golden");
        let long = session_name(&"n".repeat(63), &"x".repeat(253));
        assert_eq!(long.len(), 64);
        assert!(long.starts_with("amicopy.nnn"));
        let scope = Scope::through(
            "eu-west-1",
            Some("arn:aws:iam::210987654321:role/r"),
            Some("x"),
        )
        .on_behalf_of("team-a", "golden");
        assert_eq!(
            scope.role.unwrap().session.as_deref(),
            Some("amicopy.team-a.golden")
        );
        let own = Scope::region("eu-west-1").on_behalf_of("team-a", "golden");
        assert_eq!(own, Scope::region("eu-west-1"), "no role, no session");
    }
}
