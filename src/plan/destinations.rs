//! Each destination: the copy that is current there (followed and kept in
//! line), or why none can start, or the copy to start.

use super::ownership::{self, Ownership};
use super::source::Verdict;
use super::{Action, Claim, Draft, Input, Note, target_name, upkeep::upkeep};
use crate::api::{Destination, SOURCE_TAG, TargetState, TargetStatus};
use crate::ec2::{CopyRequest, ImageInfo};
use crate::plan::{TokenInputs, client_token};
use crate::status::{self, reason};

/// The status of one destination; the actions and notes it needs go into
/// `draft`.
pub fn plan(
    input: &Input,
    verdict: &Verdict,
    dest: &Destination,
    draft: &mut Draft,
) -> TargetStatus {
    let region = dest.region.as_str();
    let last = input
        .prev
        .destinations
        .iter()
        .find(|d| d.region == region && d.source_image_id.as_deref() == Some(input.source_id));
    if let Some(why) = input.blocked.get(region) {
        return refused(input, region, last, why);
    }
    if let Some(e) = input.observed.unreachable.get(region) {
        return status::region_problem(region, dest.role_arn.as_deref(), input.source_id, e);
    }
    let attempt = last.map_or(0, |d| d.attempt);
    // A destination new to the status (added, added back, or a new source)
    // starts at this generation; the status keeps what it recorded, and a
    // copy recorded without one keeps the token it was made with.
    let generation = match last {
        Some(l) if l.generation.is_some() || l.image_id.is_some() => l.generation,
        _ => input.meta.generation,
    };
    let mut ts = if let Some(img) = current(input, region, last) {
        follow(input, region, img, last, attempt, draft)
    } else if let Some(young) = last.filter(|l| not_listed_yet(input, l)) {
        // EC2 lists a new copy late: not found is no proof it is gone.
        TargetStatus {
            message: "started; EC2 does not list it yet".into(),
            ..young.clone()
        }
    } else {
        let attempt = attempt + u32::from(gone(input, region, last, draft));
        match verdict.image {
            None => waiting_for_source(input, verdict, region, attempt),
            Some(src) => start(input, dest, src, last, (attempt, generation), draft),
        }
    };
    ts.generation = generation;
    ts
}

/// The current target: an owned copy of this source, preferring the one the
/// status names, then available over pending over failed. EC2 lists new
/// images with a delay: a recorded image missing from the tag query but
/// found by ID (and ours) is still the target.
fn current<'a>(
    input: &Input<'a>,
    region: &str,
    last: Option<&TargetStatus>,
) -> Option<&'a ImageInfo> {
    let recorded_id = last.and_then(|d| d.image_id.as_deref());
    let owned = input
        .owned
        .get(region)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let rank = |i: &ImageInfo| match i.state {
        TargetState::Available => 0,
        TargetState::Pending => 1,
        _ => 2,
    };
    let best = owned
        .iter()
        .copied()
        .filter(|i| {
            !input.source_id.is_empty()
                && i.tags.get(SOURCE_TAG).map(String::as_str) == Some(input.source_id)
        })
        .min_by_key(|i| (Some(i.id.as_str()) != recorded_id, rank(i), i.id.clone()));
    best.or_else(|| {
        input
            .observed
            .recorded
            .get(recorded_id?)?
            .as_ref()
            .filter(|i| ownership::check(Some(i), &input.meta.uid) == Ownership::Ours)
    })
}

/// A status entry for an image EC2 reported.
pub fn target_status(
    region: &str,
    img: &ImageInfo,
    source_image_id: &str,
    attempt: u32,
) -> TargetStatus {
    let failed = img.state != TargetState::Available && img.state != TargetState::Pending;
    TargetStatus {
        region: region.to_owned(),
        image_id: Some(img.id.clone()),
        state: img.state.clone(),
        source_image_id: Some(source_image_id.to_owned()),
        encrypted: img.encrypted(),
        kms_key_id: img.kms_key_id().map(str::to_owned),
        reason: failed.then(|| reason::COPY_FAILED.to_owned()),
        message: if failed {
            img.state_reason
                .clone()
                .unwrap_or_else(|| format!("EC2 reports the copy as {}", img.state))
        } else {
            String::new()
        },
        deprecation_time: img.deprecation_time.clone(),
        deregistration_protection: img
            .protected()
            .then(|| img.deregistration_protection.clone())
            .flatten(),
        used_by: Vec::new(),
        shared_with: Vec::new(),
        role_arn: None,
        external_id: None,
        attempt,
        planned_at: None,
        snapshots_to_delete: Vec::new(),
        generation: None,
    }
}

pub fn rfc3339(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> String {
    t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Follows the current copy: news of its state, snapshots to claim once it
/// is available, and its upkeep.
fn follow(
    input: &Input,
    region: &str,
    img: &ImageInfo,
    last: Option<&TargetStatus>,
    attempt: u32,
    draft: &mut Draft,
) -> TargetStatus {
    let mut ts = target_status(region, img, input.source_id, attempt);
    if let Some(l) = input.last_entry(&img.id) {
        ts.shared_with = l.shared_with.clone();
        // When the copy started: until the listing grace has passed, EC2
        // missing it (after a restart, say) means "not listed yet".
        ts.planned_at = l.planned_at.clone();
    }
    let was = last.map(|d| &d.state);
    if img.state == TargetState::Available && was != Some(&TargetState::Available) {
        let message = format!("{} is available in {region}", img.id);
        draft
            .notes
            .push(Note::normal(reason::COPY_AVAILABLE, region, message));
        let snapshot_ids: Vec<String> = img
            .snapshots
            .iter()
            .map(|s| s.id.clone())
            .filter(|id| !input.source_snapshots.contains(id.as_str()))
            .collect();
        // Copies EC2 tagged on creation have tagged snapshots already.
        let tagged = input.observed.tagged_by_ec2.contains(&img.id);
        if !snapshot_ids.is_empty() && !tagged {
            draft.claims.push(Claim {
                region: region.into(),
                image_id: img.id.clone(),
                snapshot_ids,
                tags: input.tags.clone(),
            });
        }
    }
    if ts.reason.is_some() && was != Some(&ts.state) {
        let message = format!("{} in {region}: {}", img.id, ts.message);
        draft
            .notes
            .push(Note::warning(reason::COPY_FAILED, region, message));
    }
    upkeep(input, region, img, &mut ts, &mut draft.actions);
    // Only the copies of the current source: older ones are on their way
    // out, and their protection is lifted right before they go.
    if input.spec.protect == Some(true) && img.state == TargetState::Available && !img.protected() {
        draft.actions.push(Action::Protect {
            region: region.into(),
            image_id: img.id.clone(),
        });
    }
    ts
}

/// A copy recorded as started, younger than the listing grace, that EC2
/// does not return yet.
fn not_listed_yet(input: &Input, last: &TargetStatus) -> bool {
    let grace = input.meta.listing_grace;
    last.image_id.is_some()
        && last.state == TargetState::Pending
        && super::recent(last.planned_at.as_deref(), input.now, grace)
}

/// Whether the copy the status recorded is gone (deregistered out of band),
/// so that the next copy needs a new token: EC2 would answer the old one
/// with the old image. A recorded image someone else owns is left alone.
fn gone(input: &Input, region: &str, last: Option<&TargetStatus>, draft: &mut Draft) -> bool {
    let Some(id) = last.and_then(|d| d.image_id.as_deref()) else {
        return false;
    };
    match input.observed.recorded.get(id) {
        Some(Some(img)) if ownership::check(Some(img), &input.meta.uid) != Ownership::Ours => {
            let message = format!(
                "status named {id} in {region}, which this object does not own; it is left untouched"
            );
            draft.notes.push(Note::warning(
                reason::FOREIGN_IMAGE_IGNORED,
                region,
                message,
            ));
            false
        }
        _ if last.is_some_and(|d| d.state != TargetState::Error) => {
            let message = format!("{id} in {region} no longer exists; copying again");
            draft
                .notes
                .push(Note::warning(reason::TARGET_MISSING, region, message));
            true
        }
        _ => false,
    }
}

/// A destination a policy refuses: no EC2 call is made for it. A copy it
/// already has stays as the status last saw it, neither followed nor
/// retired.
fn refused(input: &Input, region: &str, last: Option<&TargetStatus>, why: &str) -> TargetStatus {
    let mut ts = last.cloned().unwrap_or_else(|| TargetStatus {
        region: region.to_owned(),
        state: TargetState::Error,
        source_image_id: Some(input.source_id.to_owned()),
        ..TargetStatus::default()
    });
    if ts.image_id.is_none() {
        ts.state = TargetState::Error;
    }
    ts.reason = Some(reason::POLICY_DENIED.into());
    ts.message = why.to_owned();
    ts
}

/// A destination that cannot start a copy, and why.
fn blocked(
    input: &Input,
    region: &str,
    state: TargetState,
    why: &str,
    message: String,
    attempt: u32,
) -> TargetStatus {
    TargetStatus {
        region: region.to_owned(),
        state,
        source_image_id: Some(input.source_id.to_owned()),
        reason: Some(why.to_owned()),
        message,
        attempt,
        ..TargetStatus::default()
    }
}

/// No source image to copy: the object's problem, or waiting for EC2.
fn waiting_for_source(
    input: &Input,
    verdict: &Verdict,
    region: &str,
    attempt: u32,
) -> TargetStatus {
    if let Some((why, message)) = &verdict.problem {
        return blocked(
            input,
            region,
            TargetState::Error,
            why,
            message.clone(),
            attempt,
        );
    }
    let message = match &input.observed.source {
        Some(Err(e)) => format!(
            "EC2 in {} did not answer about the source ({}); retrying",
            input.spec.source.region, e.code
        ),
        _ => "reading the source image".into(),
    };
    blocked(
        input,
        region,
        TargetState::Waiting,
        reason::WAITING,
        message,
        attempt,
    )
}

/// Why the source cannot be copied to `dest` at all, if it cannot.
fn precondition(
    input: &Input,
    dest: &Destination,
    src: &ImageInfo,
) -> Option<(&'static str, String)> {
    let enc = input.spec.encryption_for(dest);
    if src.instance_store() && enc == Some(true) {
        return Some((
            reason::ENCRYPTION_INSTANCE_STORE,
            "the source is instance-store-backed: it has no snapshots, so its copies cannot be encrypted; remove encrypted: true for this destination".into(),
        ));
    }
    if src.encrypted() == Some(true) && enc == Some(false) {
        return Some((
            reason::ENCRYPTION_DOWNGRADE,
            "the source's snapshots are encrypted and EC2 cannot make an unencrypted copy of an encrypted snapshot; set encrypted: true (or leave it unset) for this destination".into(),
        ));
    }
    None
}

/// The copy to start, unless the source or the spec rules it out.
fn start(
    input: &Input,
    dest: &Destination,
    src: &ImageInfo,
    last: Option<&TargetStatus>,
    (attempt, generation): (u32, Option<i64>),
    draft: &mut Draft,
) -> TargetStatus {
    let region = dest.region.as_str();
    if src.state != TargetState::Available {
        let state = if src.state == TargetState::Pending {
            TargetState::Waiting
        } else {
            TargetState::Error
        };
        let message = format!(
            "the source image is {}; copies start when it is available",
            src.state
        );
        let why = reason::SOURCE_NOT_AVAILABLE;
        return blocked(input, region, state, why, message, attempt);
    }
    if let Some((why, message)) = precondition(input, dest, src) {
        return blocked(input, region, TargetState::Error, why, message, attempt);
    }
    // A copy EC2 rejected stays rejected until the spec changes.
    let same_generation = input.prev.observed_generation == input.meta.generation
        && input.prev.source_image_id.as_deref() == Some(input.source_id);
    if let Some(last) =
        last.filter(|d| d.state == TargetState::Error && d.image_id.is_none() && same_generation)
    {
        return last.clone();
    }
    let request = copy_request(input, dest, src, (attempt, generation));
    draft.actions.push(Action::Copy {
        region: region.into(),
        request,
    });
    // An earlier decision whose copy was never confirmed keeps its time, so
    // that the time it is looked for does not grow with each retry.
    let planned_at = last
        .filter(|l| l.image_id.is_none())
        .and_then(|l| l.planned_at.clone())
        .unwrap_or_else(|| rfc3339(input.now));
    TargetStatus {
        region: region.into(),
        state: TargetState::Pending,
        source_image_id: Some(input.source_id.into()),
        attempt,
        planned_at: Some(planned_at),
        ..TargetStatus::default()
    }
}

/// Everything CopyImage is called with for `dest`.
fn copy_request(
    input: &Input,
    dest: &Destination,
    src: &ImageInfo,
    (attempt, generation): (u32, Option<i64>),
) -> CopyRequest {
    let (spec, meta, source_id) = (input.spec, input.meta, input.source_id);
    let encrypted = spec.encryption_for(dest);
    let kms = if encrypted == Some(true) {
        dest.kms_key_id.clone()
    } else {
        None
    };
    let base = spec
        .name
        .clone()
        .or_else(|| src.name.clone())
        .unwrap_or_else(|| format!("{}-{}", meta.namespace, meta.name));
    CopyRequest {
        source_region: spec.source.region.clone(),
        source_image_id: source_id.to_owned(),
        name: target_name(&base, source_id),
        description: spec.description.clone().unwrap_or_else(|| {
            format!(
                "Copy of {source_id} from {}, managed by AmiCopy {}/{}",
                spec.source.region, meta.namespace, meta.name
            )
        }),
        encrypted,
        client_token: client_token(&TokenInputs {
            uid: &meta.uid,
            region: &dest.region,
            source_region: &spec.source.region,
            source_image_id: source_id,
            encrypted,
            kms: kms.as_deref(),
            attempt,
            generation,
        }),
        kms_key_id: kms,
        copy_image_tags: spec.copy_image_tags.unwrap_or(false),
        tags: input.tags.clone(),
        completion_minutes: spec.snapshot_copy_completion_duration_minutes,
    }
}
