//! Condition types, every stable reason (of conditions, destinations and
//! Events), and the condition builders.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{TargetState, TargetStatus};
use crate::ec2::{Ec2Error, ErrorKind};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
/// kstatus' "abnormal-true" pair, read by Flux, kpt and cli-utils:
/// `Reconciling` mirrors `Progressing` (InProgress) and `Stalled` mirrors
/// `Degraded` (Failed).
pub const RECONCILING: &str = "Reconciling";
pub const STALLED: &str = "Stalled";
/// Condition type present while the object is paused.
pub const PAUSED: &str = "Paused";

/// Stable condition and destination reasons. They are part of the API:
/// alerting and the Argo CD health check match on them.
pub mod reason {
    pub const AVAILABLE: &str = "Available";
    /// The object was just seen; nothing is known of EC2 yet.
    pub const OBSERVED: &str = "Observed";
    pub const COPY_PENDING: &str = "CopyPending";
    pub const WAITING: &str = "Waiting";
    pub const COPY_QUEUED: &str = "CopyQueued";
    pub const COMPLETE: &str = "Complete";
    pub const AS_EXPECTED: &str = "AsExpected";
    pub const SOURCE_NOT_FOUND: &str = "SourceNotFound";
    pub const SOURCE_NOT_AVAILABLE: &str = "SourceNotAvailable";
    pub const COPY_FAILED: &str = "CopyFailed";
    pub const ACCESS_DENIED: &str = "AccessDenied";
    pub const ENCRYPTION_DOWNGRADE: &str = "EncryptionDowngradeNotSupported";
    pub const ENCRYPTION_INSTANCE_STORE: &str = "EncryptionNotSupportedForInstanceStore";
    pub const INVALID_KMS_KEY: &str = "InvalidKmsKey";
    pub const DUPLICATE_NAME: &str = "DuplicateName";
    /// An AmiCopyPolicy refuses part of the object (the condition's message
    /// names the policy, the rule and the value).
    pub const POLICY_DENIED: &str = "PolicyDenied";
    pub const INVALID_NAME: &str = "InvalidName";
    pub const MARKETPLACE: &str = "MarketplaceImageNotCopyable";
    pub const PARAVIRTUAL: &str = "ParavirtualNotSupported";
    pub const SNAPSHOT_NOT_SHARED: &str = "SnapshotNotShared";
    pub const COPY_QUOTA: &str = "CopyQuotaReached";
    pub const COPY_REJECTED: &str = "CopyRejected";
    pub const REGION_UNAVAILABLE: &str = "RegionUnavailable";
    pub const PUBLIC_NOT_ALLOWED: &str = "PublicSharingNotAllowed";
    /// The operator has no credentials for a region or role: none found,
    /// expired, or STS refused to assume the role.
    pub const CREDENTIALS_UNAVAILABLE: &str = "CredentialsUnavailable";
    /// The finalizer cannot finish: what is left where, and why.
    pub const CLEANUP_BLOCKED: &str = "CleanupBlocked";
    /// The object cannot be read as an AmiCopy (a CRD without validation, a
    /// status written by another tool); it is left alone until it changes.
    pub const INVALID_SPEC: &str = "InvalidSpec";

    // Reasons of Events only.
    pub const COPY_STARTED: &str = "CopyStarted";
    pub const COPY_AVAILABLE: &str = "CopyAvailable";
    pub const TARGET_MISSING: &str = "TargetMissing";
    pub const FOREIGN_IMAGE_IGNORED: &str = "ForeignImageIgnored";
    pub const SHARED: &str = "Shared";
    pub const DEPRECATED: &str = "Deprecated";
    pub const DEREGISTERED: &str = "Deregistered";
    pub const RETAINED: &str = "Retained";
    /// An older copy is kept because something uses it.
    pub const RETIREMENT_BLOCKED: &str = "RetirementBlocked";
    /// An older copy was disabled (`retirement.action: Disable`).
    pub const DISABLED: &str = "Disabled";
    /// Deregistration protection was turned on for a current copy.
    pub const PROTECTED: &str = "Protected";
    /// The current copies' IDs were published.
    pub const PUBLISHED: &str = "Published";
    /// `spec.publish` names an SSM parameter the namespace may not write.
    pub const PUBLISH_DENIED: &str = "PublishDenied";
    /// The ConfigMap or an SSM parameter to publish to is someone else's.
    pub const PUBLISH_CONFLICT: &str = "PublishConflict";
    /// The object is paused (`amicopy.dev/paused: "true"`).
    pub const PAUSED: &str = "Paused";
}

/// Reason and advice for an EC2 rejection of `CopyImage` (or of reading the
/// source), so the user knows what to do.
pub fn copy_error(err: &Ec2Error) -> (&'static str, String) {
    let code = err.code.as_str();
    let msg = err.message.to_ascii_lowercase();
    let (reason, advice) = match code {
        _ if err.kind == ErrorKind::Credentials => (
            reason::CREDENTIALS_UNAVAILABLE,
            "the operator has no credentials here: check its IAM role (IRSA or Pod Identity), and for a destination with a roleArn, that the role exists, trusts the operator's role and accepts the externalId",
        ),
        // What the first call into a region meets when the region is not
        // enabled for the account (or does not exist).
        "AuthFailure" | "OptInRequired" => (
            reason::REGION_UNAVAILABLE,
            "check the region's name, that it is enabled for this account (opt-in regions), and the operator's permissions there",
        ),
        "UnauthorizedOperation" | "AccessDenied" | "Blocked" => (
            reason::ACCESS_DENIED,
            "grant the operator's IAM role the EC2 (and KMS) permissions in docs/iam.md",
        ),
        "InvalidAMIID.NotFound" | "InvalidAMIID.Unavailable" | "InvalidAMIID.Malformed" => (
            reason::SOURCE_NOT_FOUND,
            "check spec.source; an AMI of another account must be shared with this one",
        ),
        "InvalidAMIName.Duplicate" => (
            reason::DUPLICATE_NAME,
            "an AMI with this name already exists in the region: set spec.name to another base",
        ),
        "InvalidAMIName.Malformed" => (reason::INVALID_NAME, "fix spec.name"),
        "InvalidSnapshot.NotFound" => (
            reason::SNAPSHOT_NOT_SHARED,
            "the source's snapshots must be shared with this account (createVolumePermission)",
        ),
        "ResourceLimitExceeded" => (
            reason::COPY_QUOTA,
            "too many copies in flight in this region; the operator retries later",
        ),
        _ if code.contains("KMS") || code.contains("Kms") || msg.contains("kms") => (
            reason::INVALID_KMS_KEY,
            "use a KMS key in the destination region that the operator may use (and that is shared for cross-account copies)",
        ),
        _ if msg.contains("billing product") || msg.contains("marketplace") => (
            reason::MARKETPLACE,
            "Marketplace AMIs cannot be copied across accounts: launch an instance and create an AMI from it",
        ),
        _ if msg.contains("paravirtual") => (
            reason::PARAVIRTUAL,
            "this region does not support paravirtual AMIs: remove it or use an HVM source",
        ),
        _ => (reason::COPY_REJECTED, "see EC2's message"),
    };
    (
        reason,
        format!("{advice} (EC2 {}: {})", err.code, err.message),
    )
}

/// EC2's answer for a region that does not exist for this account (unknown
/// to the endpoint, or an opt-in region not enabled).
pub fn region_refused(e: &Ec2Error) -> bool {
    matches!(e.code.as_str(), "AuthFailure" | "OptInRequired")
}

/// A destination whose region EC2 could not be asked about: waiting when
/// the error is worth retrying, else an error that names what to check.
pub fn region_problem(
    region: &str,
    role_arn: Option<&str>,
    source_image_id: &str,
    e: &Ec2Error,
) -> TargetStatus {
    let through = role_arn
        .map(|r| format!(" through {r}"))
        .unwrap_or_default();
    let (state, why, message) = match e.kind {
        _ if e.is_transient() => (
            TargetState::Waiting,
            reason::WAITING,
            format!("EC2 in {region} did not answer ({}); retrying", e.code),
        ),
        ErrorKind::Credentials => {
            let (why, advice) = copy_error(e);
            let message = format!("no credentials for {region}{through}: {advice}");
            (TargetState::Error, why, message)
        }
        _ => (
            TargetState::Error,
            reason::REGION_UNAVAILABLE,
            format!(
                "EC2 in {region} refused the operator (EC2 {}: {}): check the region's name, that it is enabled for this account (opt-in regions), and the operator's permissions there",
                e.code, e.message
            ),
        ),
    };
    TargetStatus {
        region: region.to_owned(),
        state,
        source_image_id: Some(source_image_id.to_owned()),
        reason: Some(why.to_owned()),
        message,
        ..TargetStatus::default()
    }
}

/// Builds a condition, keeping the previous transition time when the status
/// of that condition did not change.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_owned();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// What the conditions are built from: the destinations, the copies being
/// retired, and a problem of the whole object.
pub struct Summary<'a> {
    pub destinations: &'a [TargetStatus],
    pub retiring: &'a [TargetStatus],
    pub global: Option<(&'static str, String)>,
}

/// Where each condition came from before, and what to stamp it with.
struct Stamp<'a> {
    previous: &'a [Condition],
    generation: Option<i64>,
    now: &'a Time,
}

impl Stamp<'_> {
    fn condition(&self, type_: &str, status: bool, reason: &str, message: String) -> Condition {
        condition(
            self.previous,
            type_,
            status,
            reason,
            message,
            self.generation,
            self.now,
        )
    }
}

impl Summary<'_> {
    fn regions_in(&self, state: TargetState) -> Vec<&str> {
        self.destinations
            .iter()
            .filter(|d| d.state == state)
            .map(|d| d.region.as_str())
            .collect()
    }

    /// The problem to show: the object's own, else every destination that
    /// is neither available nor on its way, under the first one's reason.
    fn problem(&self) -> Option<(&str, String)> {
        if let Some(global) = &self.global {
            return Some(global.clone());
        }
        let problems: Vec<&TargetStatus> = self
            .destinations
            .iter()
            .filter(|d| d.state != TargetState::Available && !d.state.is_underway())
            .collect();
        let first = problems.first()?;
        let message = problems
            .iter()
            .map(|d| format!("{}: {}", d.region, d.message))
            .collect::<Vec<_>>()
            .join("; ");
        Some((
            first.reason.as_deref().unwrap_or(reason::COPY_FAILED),
            message,
        ))
    }

    /// What is under way, each part naming its regions, and the reason of
    /// the most advanced part; `None` when nothing is.
    fn progress(&self) -> Option<(&'static str, String)> {
        let pending = self.regions_in(TargetState::Pending);
        let queued = self.regions_in(TargetState::Queued);
        let waiting = self.regions_in(TargetState::Waiting);
        let mut parts = Vec::new();
        if !pending.is_empty() {
            parts.push(format!("copy pending in {}", pending.join(", ")));
        }
        if !queued.is_empty() {
            parts.push(format!("queued for a copy slot in {}", queued.join(", ")));
        }
        if !waiting.is_empty() {
            parts.push(format!("waiting to copy to {}", waiting.join(", ")));
        }
        // A copy kept while something uses it is no work in progress: the
        // rollout is done, and kstatus and Argo CD should say so.
        let ids: Vec<&str> = self
            .retiring
            .iter()
            .filter(|r| r.used_by.is_empty())
            .filter_map(|r| r.image_id.as_deref())
            .collect();
        if !ids.is_empty() {
            parts.push(format!("retiring {}", ids.join(", ")));
        }
        if parts.is_empty() {
            return None;
        }
        let reason = if !pending.is_empty() {
            reason::COPY_PENDING
        } else if !queued.is_empty() {
            reason::COPY_QUEUED
        } else {
            reason::WAITING
        };
        Some((reason, parts.join("; ")))
    }

    /// Why the object is not ready, when it has no problem: the first of
    /// copying, queued and waiting.
    fn not_ready(&self) -> (&'static str, String) {
        let pending = self.regions_in(TargetState::Pending);
        let queued = self.regions_in(TargetState::Queued);
        if !pending.is_empty() {
            (
                reason::COPY_PENDING,
                format!("copy pending in {}", pending.join(", ")),
            )
        } else if !queued.is_empty() {
            (
                reason::COPY_QUEUED,
                format!("queued for a copy slot in {}", queued.join(", ")),
            )
        } else {
            let waiting = self.regions_in(TargetState::Waiting);
            (
                reason::WAITING,
                format!("waiting to copy to {}", waiting.join(", ")),
            )
        }
    }
}

/// Ready, Progressing and Degraded from the per-destination states.
pub fn conditions(
    summary: &Summary,
    previous: &[Condition],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    let stamp = Stamp {
        previous,
        generation,
        now,
    };
    let problem = summary.problem();
    let all = summary.destinations.len();
    let all_available = all > 0
        && summary
            .destinations
            .iter()
            .all(|d| d.state == TargetState::Available);
    let ready = if all_available {
        let message = format!("{all} of {all} copies available");
        stamp.condition(READY, true, reason::AVAILABLE, message)
    } else {
        let (r, m) = problem.clone().unwrap_or_else(|| summary.not_ready());
        stamp.condition(READY, false, r, m)
    };
    let progressing = match summary.progress() {
        Some((r, m)) => stamp.condition(PROGRESSING, true, r, m),
        None => stamp.condition(
            PROGRESSING,
            false,
            reason::COMPLETE,
            "no copy in progress".into(),
        ),
    };
    let degraded = match problem {
        Some((r, m)) => stamp.condition(DEGRADED, true, r, m),
        None => stamp.condition(
            DEGRADED,
            false,
            reason::AS_EXPECTED,
            "nothing needs attention".into(),
        ),
    };
    let reconciling = Condition {
        type_: RECONCILING.into(),
        ..progressing.clone()
    };
    let stalled = Condition {
        type_: STALLED.into(),
        ..degraded.clone()
    };
    vec![ready, progressing, degraded, reconciling, stalled]
}

/// The status of an object seen for the first time, written before the
/// operator asks EC2 anything: kstatus reads an object without conditions
/// as done.
pub fn first(generation: Option<i64>, now: &Time) -> Vec<Condition> {
    let stamp = Stamp {
        previous: &[],
        generation,
        now,
    };
    let message = || "reading the source and the destinations".to_owned();
    vec![
        stamp.condition(READY, false, reason::OBSERVED, message()),
        stamp.condition(PROGRESSING, true, reason::OBSERVED, message()),
        stamp.condition(DEGRADED, false, reason::OBSERVED, message()),
        stamp.condition(RECONCILING, true, reason::OBSERVED, message()),
        stamp.condition(STALLED, false, reason::OBSERVED, message()),
    ]
}
