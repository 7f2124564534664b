//! Condition types, stable reasons, and the condition builders.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::TargetStatus;
use crate::ec2::Ec2Error;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// Stable condition and destination reasons. They are part of the API:
/// alerting and the Argo CD health check match on them.
pub mod reason {
    pub const AVAILABLE: &str = "Available";
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
    pub const INVALID_NAME: &str = "InvalidName";
    pub const MARKETPLACE: &str = "MarketplaceImageNotCopyable";
    pub const PARAVIRTUAL: &str = "ParavirtualNotSupported";
    pub const SNAPSHOT_NOT_SHARED: &str = "SnapshotNotShared";
    pub const COPY_QUOTA: &str = "CopyQuotaReached";
    pub const COPY_REJECTED: &str = "CopyRejected";
    pub const REGION_UNAVAILABLE: &str = "RegionUnavailable";
    pub const PUBLIC_NOT_ALLOWED: &str = "PublicSharingNotAllowed";
    /// The object cannot be read as an AmiCopy (a CRD without validation, a
    /// status written by another tool); it is left alone until it changes.
    pub const INVALID_SPEC: &str = "InvalidSpec";
}

/// Destination states the operator adds to EC2's own image states.
pub mod state {
    pub const PENDING: &str = "pending";
    pub const AVAILABLE: &str = "available";
    pub const FAILED: &str = "failed";
    /// The copy cannot start yet (source pending, throttled, quota).
    pub const WAITING: &str = "waiting";
    /// Waiting for a copy slot (per-region copy limits).
    pub const QUEUED: &str = "queued";
    /// The copy cannot start at all until the spec or the source changes.
    pub const ERROR: &str = "error";
}

/// Reason and advice for an EC2 rejection of `CopyImage` (or of reading the
/// source), so the user knows what to do.
pub fn copy_error(err: &Ec2Error) -> (&'static str, String) {
    let code = err.code.as_str();
    let msg = err.message.to_ascii_lowercase();
    let (reason, advice) = match code {
        "AuthFailure" | "UnauthorizedOperation" | "AccessDenied" | "Blocked" => (
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
pub fn region_problem(region: &str, source_image_id: &str, e: &Ec2Error) -> TargetStatus {
    let (st, why, message) = if e.is_transient() {
        (
            state::WAITING,
            reason::WAITING,
            format!("EC2 in {region} did not answer ({}); retrying", e.code),
        )
    } else {
        (
            state::ERROR,
            reason::REGION_UNAVAILABLE,
            format!(
                "EC2 in {region} refused the operator (EC2 {}: {}): check the region's name, that it is enabled for this account (opt-in regions), and the operator's permissions there",
                e.code, e.message
            ),
        )
    };
    TargetStatus {
        region: region.to_owned(),
        state: st.to_owned(),
        source_image_id: Some(source_image_id.to_owned()),
        reason: Some(why.to_owned()),
        message,
        ..TargetStatus::default()
    }
}

/// A copy that is on its way: started, queued for a slot, or waiting to start.
pub fn is_underway(state: &str) -> bool {
    matches!(state, state::PENDING | state::QUEUED | state::WAITING)
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

/// Ready, Progressing and Degraded from the per-destination states.
pub fn conditions(
    previous: &[Condition],
    destinations: &[TargetStatus],
    retiring: &[TargetStatus],
    global: Option<(&'static str, String)>,
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    let in_state = |s: &str| -> Vec<&str> {
        destinations
            .iter()
            .filter(|d| d.state == s)
            .map(|d| d.region.as_str())
            .collect()
    };
    let pending = in_state(state::PENDING);
    let waiting = in_state(state::WAITING);
    let queued = in_state(state::QUEUED);
    let problems: Vec<&TargetStatus> = destinations
        .iter()
        .filter(|d| d.state != state::AVAILABLE && !is_underway(&d.state))
        .collect();
    let degraded: Option<(&str, String)> = match global {
        Some((r, m)) => Some((r, m)),
        None => problems.first().map(|first| {
            let msg = problems
                .iter()
                .map(|d| format!("{}: {}", d.region, d.message))
                .collect::<Vec<_>>()
                .join("; ");
            (first.reason.as_deref().unwrap_or(reason::COPY_FAILED), msg)
        }),
    };
    let all_available =
        !destinations.is_empty() && destinations.iter().all(|d| d.state == state::AVAILABLE);

    let ready = if all_available {
        condition(
            previous,
            READY,
            true,
            reason::AVAILABLE,
            format!(
                "{} of {} copies available",
                destinations.len(),
                destinations.len()
            ),
            generation,
            now,
        )
    } else {
        let (r, m) = match &degraded {
            Some((r, m)) => (*r, m.clone()),
            None if !pending.is_empty() => (
                reason::COPY_PENDING,
                format!("copy pending in {}", pending.join(", ")),
            ),
            None if !queued.is_empty() => (
                reason::COPY_QUEUED,
                format!("queued for a copy slot in {}", queued.join(", ")),
            ),
            None => (
                reason::WAITING,
                format!("waiting to copy to {}", waiting.join(", ")),
            ),
        };
        condition(previous, READY, false, r, m, generation, now)
    };

    let busy =
        !pending.is_empty() || !waiting.is_empty() || !queued.is_empty() || !retiring.is_empty();
    let progressing = if busy {
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
        if !retiring.is_empty() {
            let ids: Vec<&str> = retiring
                .iter()
                .filter_map(|r| r.image_id.as_deref())
                .collect();
            parts.push(format!("retiring {}", ids.join(", ")));
        }
        let r = if !pending.is_empty() {
            reason::COPY_PENDING
        } else if !queued.is_empty() {
            reason::COPY_QUEUED
        } else {
            reason::WAITING
        };
        condition(
            previous,
            PROGRESSING,
            true,
            r,
            parts.join("; "),
            generation,
            now,
        )
    } else {
        condition(
            previous,
            PROGRESSING,
            false,
            reason::COMPLETE,
            "no copy in progress".into(),
            generation,
            now,
        )
    };

    let degraded = match degraded {
        Some((r, m)) => condition(previous, DEGRADED, true, r, m, generation, now),
        None => condition(
            previous,
            DEGRADED,
            false,
            reason::AS_EXPECTED,
            "nothing needs attention".into(),
            generation,
            now,
        ),
    };
    vec![ready, progressing, degraded]
}
