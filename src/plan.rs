//! The pure decision logic: from the spec, the last status and what EC2
//! reports, the next actions and the status to show. No client, no I/O.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use sha2::{Digest, Sha256};

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::api::{
    AmiCopySpec, AmiCopyStatus, DeletionPolicy, Destination, MAX_NAME_BASE, OWNER_TAG,
    ResolvedSource, SOURCE_TAG, TargetStatus, UID_TAG,
};
use crate::ec2::{CopyRequest, Ec2Error, ImageInfo, Permission};
use crate::status::{self, reason, state};

/// Identity of the object being reconciled.
#[derive(Clone, Debug)]
pub struct Meta {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub generation: Option<i64>,
    /// Source AMI IDs whose copies are kept whatever `retain` says (the
    /// `amicopy.dev/pinned-sources` annotation).
    pub pinned: BTreeSet<String>,
    /// The operator allows `sharing.public` (`--allow-public-images`).
    pub allow_public: bool,
}

/// What EC2 reported for one reconcile.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The source image: `Ok(None)` when EC2 says it does not exist, `Err`
    /// when EC2 refused to tell (access denied, ...).
    pub source: Option<Result<Option<ImageInfo>, Ec2Error>>,
    /// Per region, every image this object owns (by its UID tag).
    pub owned: BTreeMap<String, Vec<ImageInfo>>,
    /// Images named in the last status but absent from `owned`, looked up by
    /// ID: `None` when EC2 no longer has them.
    pub recorded: BTreeMap<String, Option<ImageInfo>>,
    /// Regions EC2 could not be asked about, and why: nothing is copied or
    /// retired there this time.
    pub unreachable: BTreeMap<String, Ec2Error>,
    /// What `spec.source.selector` resolved to (`None` with a selector: no
    /// image matches). Without a selector, `spec.source.imageId` is the source.
    pub resolved: Option<ResolvedSource>,
}

impl Observed {
    /// The first error worth retrying soon (throttling, 5xx, timeouts).
    pub fn transient_error(&self) -> Option<&Ec2Error> {
        let source = match &self.source {
            Some(Err(e)) => Some(e),
            _ => None,
        };
        source
            .into_iter()
            .chain(self.unreachable.values())
            .find(|e| e.is_transient())
    }
}

/// One side effect for the reconciler to perform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start a copy; its image ID goes into `status.destinations[index]`.
    Copy {
        index: usize,
        region: String,
        request: CopyRequest,
    },
    /// Make sure an owned image (and its snapshots) carry these tags.
    TagImage {
        region: String,
        image_id: String,
        resource_ids: Vec<String>,
        tags: BTreeMap<String, String>,
    },
    /// Remove tag keys that `spec.tags` no longer lists.
    Untag {
        region: String,
        resource_ids: Vec<String>,
        keys: Vec<String>,
    },
    /// Bring an available copy's launch permissions (and its snapshots'
    /// createVolumePermission) to `want`, from what status says was applied.
    Share {
        region: String,
        image_id: String,
        snapshot_ids: Vec<String>,
        add: Vec<String>,
        remove: Vec<String>,
        want: Vec<String>,
    },
    /// Deprecate an available copy at `at` (RFC 3339).
    Deprecate {
        region: String,
        image_id: String,
        at: String,
    },
    /// Tag the snapshots of an owned, available image that lack the
    /// ownership tags (peers that ignore TagSpecifications on copy).
    ClaimSnapshots {
        region: String,
        image_id: String,
        snapshot_ids: Vec<String>,
        tags: BTreeMap<String, String>,
    },
    /// Deregister an owned image and delete its owned snapshots.
    Retire { region: String, image: ImageInfo },
    /// `Retain`: leave an image in place, remove the ownership tags.
    Release { region: String, image: ImageInfo },
}

/// A Kubernetes Event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    /// Region the note is about; empty for the object as a whole.
    pub region: String,
    pub message: String,
}

/// One note per kind of news: notes with the same reason (copies started,
/// copies available, ...) become one Event whose message names every
/// region, in the order they came. Thousands of objects whose copies all
/// turn available at once then cost one Event each, not one per region.
pub fn merge_notes(notes: &[Note]) -> Vec<Note> {
    let mut merged: Vec<Note> = Vec::new();
    for note in notes {
        match merged
            .iter_mut()
            .find(|m| m.reason == note.reason && m.warning == note.warning)
        {
            Some(m) => {
                if m.region != note.region {
                    m.region.clear();
                }
                m.message = format!("{}; {}", m.message, note.message);
            }
            None => merged.push(note.clone()),
        }
    }
    merged
}

/// The planner's answer.
#[derive(Clone, Debug)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub status: AmiCopyStatus,
    pub notes: Vec<Note>,
    /// Something is in flight: look again soon.
    pub busy: bool,
    /// A problem of the whole object (the source), not of one destination.
    pub global: Option<(&'static str, String)>,
}

impl Action {
    /// The region the action is about.
    pub fn region(&self) -> &str {
        match self {
            Action::Copy { region, .. }
            | Action::TagImage { region, .. }
            | Action::Untag { region, .. }
            | Action::Share { region, .. }
            | Action::Deprecate { region, .. }
            | Action::ClaimSnapshots { region, .. }
            | Action::Retire { region, .. }
            | Action::Release { region, .. } => region,
        }
    }
}

impl Plan {
    /// Fills in `available` and the conditions from the destination states;
    /// called again after the actions changed them.
    pub fn summarize(&mut self, previous: &[Condition], generation: Option<i64>, now: &Time) {
        let s = &mut self.status;
        let available = s
            .destinations
            .iter()
            .filter(|d| d.state == state::AVAILABLE)
            .count();
        s.available = Some(format!("{available}/{}", s.destinations.len()));
        s.conditions = status::conditions(
            previous,
            &s.destinations,
            &s.retiring,
            self.global.clone(),
            generation,
            now,
        );
        self.busy |=
            s.destinations.iter().any(|d| status::is_underway(&d.state)) || !s.retiring.is_empty();
    }
}

/// Tags every target image and snapshot carries: ownership plus the user's.
pub fn desired_tags(
    spec: &AmiCopySpec,
    meta: &Meta,
    source_image_id: &str,
) -> BTreeMap<String, String> {
    let mut tags = spec.tags.clone();
    tags.insert(
        OWNER_TAG.into(),
        format!("{}/{}", meta.namespace, meta.name),
    );
    tags.insert(UID_TAG.into(), meta.uid.clone());
    tags.insert(SOURCE_TAG.into(), source_image_id.into());
    tags
}

/// Target AMI name: `<base>-<source image ID>`. AMI names are unique per
/// region and account; the suffix keeps the copies of an old and a new source
/// apart while both exist.
pub fn target_name(base: &str, source_image_id: &str) -> String {
    let base: String = base.chars().take(MAX_NAME_BASE).collect();
    format!("{base}-{source_image_id}")
}

/// The idempotency token of a copy: the same object, region, source,
/// encryption and attempt always yield the same token, so a retry after a
/// crash or a lost response returns the copy already started.
pub fn client_token(
    uid: &str,
    region: &str,
    source_region: &str,
    source_image_id: &str,
    encrypted: Option<bool>,
    kms: Option<&str>,
    attempt: u32,
) -> String {
    let mut h = Sha256::new();
    for part in [
        uid,
        region,
        source_region,
        source_image_id,
        &format!("{encrypted:?}"),
        kms.unwrap_or(""),
        &attempt.to_string(),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

fn target_status(
    region: &str,
    img: &ImageInfo,
    source_image_id: &str,
    attempt: u32,
) -> TargetStatus {
    let failed = img.state != state::AVAILABLE && img.state != state::PENDING;
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
        shared_with: Vec::new(),
        role_arn: None,
        external_id: None,
        attempt,
    }
}

fn blocked(
    region: &str,
    source_image_id: &str,
    st: &str,
    why: &str,
    message: String,
    attempt: u32,
) -> TargetStatus {
    TargetStatus {
        region: region.to_owned(),
        state: st.to_owned(),
        source_image_id: Some(source_image_id.to_owned()),
        reason: Some(why.to_owned()),
        message,
        attempt,
        ..TargetStatus::default()
    }
}

/// Why the source cannot be copied to `dest` at all, if it cannot.
fn precondition(
    spec: &AmiCopySpec,
    dest: &Destination,
    src: &ImageInfo,
) -> Option<(&'static str, String)> {
    let enc = spec.encryption_for(dest);
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

/// Launch permissions `spec.sharing` asks for, as status lists them, and
/// whether public sharing was asked for but is not allowed.
fn wanted_permissions(spec: &AmiCopySpec, meta: &Meta) -> (BTreeSet<String>, bool) {
    let Some(sharing) = &spec.sharing else {
        return (BTreeSet::new(), false);
    };
    let mut want: BTreeSet<String> = sharing
        .accounts
        .iter()
        .map(|a| Permission::Account(a.clone()))
        .chain(
            sharing
                .organization_arns
                .iter()
                .map(|a| Permission::Organization(a.clone())),
        )
        .chain(
            sharing
                .organizational_unit_arns
                .iter()
                .map(|a| Permission::OrganizationalUnit(a.clone())),
        )
        .map(|p| p.key())
        .collect();
    if sharing.snapshots == Some(true) {
        want.extend(
            sharing
                .accounts
                .iter()
                .map(|a| format!("{VOLUME_PREFIX}{a}")),
        );
    }
    let public = sharing.public == Some(true);
    if public && meta.allow_public {
        want.insert(Permission::Public.key());
    }
    (want, public && !meta.allow_public)
}

/// Status entries for createVolumePermission on a copy's snapshots.
pub const VOLUME_PREFIX: &str = "volume:";

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

/// Keeps an owned copy in line with the spec: its tags (and its snapshots'),
/// and once available its launch permissions and deprecation.
#[allow(clippy::too_many_arguments)]
fn upkeep(
    spec: &AmiCopySpec,
    meta: &Meta,
    region: &str,
    img: &ImageInfo,
    source_snapshots: &BTreeSet<&str>,
    removed_tags: &[String],
    now: &Time,
    ts: &mut TargetStatus,
    actions: &mut Vec<Action>,
) {
    let from = img.tags.get(SOURCE_TAG).cloned().unwrap_or_default();
    let tags = desired_tags(spec, meta, &from);
    let mut resource_ids = vec![img.id.clone()];
    resource_ids.extend(
        img.snapshots
            .iter()
            .map(|s| s.id.clone())
            .filter(|id| !source_snapshots.contains(id.as_str())),
    );
    if tags.iter().any(|(k, v)| img.tags.get(k) != Some(v)) {
        actions.push(Action::TagImage {
            region: region.into(),
            image_id: img.id.clone(),
            resource_ids: resource_ids.clone(),
            tags,
        });
    }
    let stale: Vec<String> = removed_tags
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
    if img.state != state::AVAILABLE {
        return;
    }
    let (want, _) = wanted_permissions(spec, meta);
    let have: BTreeSet<String> = ts.shared_with.iter().cloned().collect();
    if want != have {
        actions.push(Action::Share {
            region: region.into(),
            image_id: img.id.clone(),
            snapshot_ids: resource_ids[1..].to_vec(),
            add: want.difference(&have).cloned().collect(),
            remove: have.difference(&want).cloned().collect(),
            want: want.into_iter().collect(),
        });
    }
    ts.deprecation_time = img.deprecation_time.clone();
    if let Some(at) = wanted_deprecation(spec, img.creation_date.as_deref(), now)
        && !img
            .deprecation_time
            .as_deref()
            .is_some_and(|d| same_minute(d, at))
    {
        actions.push(Action::Deprecate {
            region: region.into(),
            image_id: img.id.clone(),
            at: at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        });
    }
}

/// The last status entry for an image, wherever it was listed.
fn last_entry<'a>(prev: &'a AmiCopyStatus, id: &str) -> Option<&'a TargetStatus> {
    prev.destinations
        .iter()
        .chain(&prev.generations)
        .chain(&prev.retiring)
        .find(|t| t.image_id.as_deref() == Some(id))
}

/// Decides what to do next. `now` stamps changed conditions.
pub fn plan(
    spec: &AmiCopySpec,
    meta: &Meta,
    previous: Option<&AmiCopyStatus>,
    observed: &Observed,
    now: &Time,
) -> Plan {
    let prev = previous.cloned().unwrap_or_default();
    let source_id = match (&spec.source.image_id, &observed.resolved) {
        (Some(id), _) => id.as_str(),
        (None, Some(r)) => r.image_id.as_str(),
        (None, None) => "",
    };
    let tags = desired_tags(spec, meta, source_id);
    let mut actions = Vec::new();
    let mut notes = Vec::new();
    let mut destinations = Vec::new();
    let mut global: Option<(&'static str, String)> = None;
    // Images kept as the current target of some destination.
    let mut current_ids = BTreeSet::new();
    let same_generation = prev.observed_generation == meta.generation
        && prev.source_image_id.as_deref() == Some(source_id);
    let tag_keys: Vec<String> = spec.tags.keys().cloned().collect();
    let removed_tags: Vec<String> = prev
        .tag_keys
        .iter()
        .filter(|k| !spec.tags.contains_key(*k))
        .cloned()
        .collect();

    let source = match &observed.source {
        _ if source_id.is_empty() => {
            global = Some((
                reason::SOURCE_NOT_FOUND,
                format!(
                    "no available AMI in {} matches spec.source.selector: check its owners, name pattern and tags",
                    spec.source.region
                ),
            ));
            None
        }
        Some(Ok(Some(img))) => Some(img),
        Some(Ok(None)) => {
            global = Some((
                reason::SOURCE_NOT_FOUND,
                format!(
                    "source {source_id} not found in {}: check spec.source, and that an AMI of another account is shared with this one",
                    spec.source.region
                ),
            ));
            None
        }
        Some(Err(e)) if e.is_transient() => None,
        Some(Err(e)) if status::region_refused(e) => {
            global = Some((
                reason::REGION_UNAVAILABLE,
                format!(
                    "EC2 in the source region {} refused the operator (EC2 {}: {}): check spec.source.region and that the region is enabled for this account",
                    spec.source.region, e.code, e.message
                ),
            ));
            None
        }
        Some(Err(e)) => {
            global = Some(status::copy_error(e));
            None
        }
        None => None,
    };
    let source_snaps: BTreeSet<&str> = source
        .map(|s| s.snapshots.iter().map(|x| x.id.as_str()).collect())
        .unwrap_or_default();
    if wanted_permissions(spec, meta).1 && global.is_none() {
        global = Some((
            reason::PUBLIC_NOT_ALLOWED,
            "sharing.public is set, but the operator does not make images public unless started with --allow-public-images; the other permissions are applied".into(),
        ));
    }

    for dest in &spec.destinations {
        let region = dest.region.as_str();
        if let Some(e) = observed.unreachable.get(region) {
            destinations.push(status::region_problem(region, source_id, e));
            continue;
        }
        let owned = observed
            .owned
            .get(region)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let last = prev
            .destinations
            .iter()
            .find(|d| d.region == region && d.source_image_id.as_deref() == Some(source_id));
        let mut attempt = last.map_or(0, |d| d.attempt);
        let recorded_id = last.and_then(|d| d.image_id.as_deref());

        // The current target: an owned copy of this source, preferring the
        // one the status names, then available over pending over failed.
        let mut candidates: Vec<&ImageInfo> = owned
            .iter()
            .filter(|i| {
                !source_id.is_empty()
                    && i.tags.get(SOURCE_TAG).map(String::as_str) == Some(source_id)
            })
            .collect();
        let rank = |i: &ImageInfo| match i.state.as_str() {
            state::AVAILABLE => 0,
            state::PENDING => 1,
            _ => 2,
        };
        candidates.sort_by_key(|i| (Some(i.id.as_str()) != recorded_id, rank(i), i.id.clone()));
        // EC2 lists new images with a delay: a recorded image missing from
        // the tag query but found by ID (and ours) is still the target.
        let late = recorded_id
            .and_then(|id| observed.recorded.get(id))
            .and_then(Option::as_ref)
            .filter(|i| i.owned_by(&meta.uid));
        let current = candidates.first().copied().or(late);

        if let Some(img) = current {
            current_ids.insert(img.id.clone());
            let mut ts = target_status(region, img, source_id, attempt);
            if let Some(l) = last_entry(&prev, &img.id) {
                ts.shared_with = l.shared_with.clone();
            }
            let was = last.map(|d| d.state.as_str());
            if img.state == state::AVAILABLE && was != Some(state::AVAILABLE) {
                notes.push(Note {
                    warning: false,
                    reason: "CopyAvailable",
                    region: region.to_string(),
                    message: format!("{} is available in {region}", img.id),
                });
                let snapshot_ids: Vec<String> = img
                    .snapshots
                    .iter()
                    .map(|s| s.id.clone())
                    .filter(|id| !source_snaps.contains(id.as_str()))
                    .collect();
                if !snapshot_ids.is_empty() {
                    actions.push(Action::ClaimSnapshots {
                        region: region.into(),
                        image_id: img.id.clone(),
                        snapshot_ids,
                        tags: tags.clone(),
                    });
                }
            }
            if ts.reason.is_some() && was != Some(ts.state.as_str()) {
                notes.push(Note {
                    warning: true,
                    reason: "CopyFailed",
                    region: region.to_string(),
                    message: format!("{} in {region}: {}", img.id, ts.message),
                });
            }
            upkeep(
                spec,
                meta,
                region,
                img,
                &source_snaps,
                &removed_tags,
                now,
                &mut ts,
                &mut actions,
            );
            destinations.push(ts);
            continue;
        }

        if let Some(id) = recorded_id {
            match observed.recorded.get(id) {
                Some(Some(foreign)) if !foreign.owned_by(&meta.uid) => notes.push(Note {
                    warning: true,
                    reason: "ForeignImageIgnored",
                    region: region.to_string(),
                    message: format!("status named {id} in {region}, which this object does not own; it is left untouched"),
                }),
                // Gone (deregistered out of band): copy again under a new
                // token, since EC2 would answer the old one with the old image.
                _ if last.is_some_and(|d| d.state != state::ERROR) => {
                    attempt += 1;
                    notes.push(Note {
                        warning: true,
                        reason: "TargetMissing",
                        region: region.to_string(),
                        message: format!("{id} in {region} no longer exists; copying again"),
                    });
                }
                _ => {}
            }
        }

        let Some(src) = source else {
            let waiting = match &observed.source {
                Some(Err(e)) => format!(
                    "EC2 in {} did not answer about the source ({}); retrying",
                    spec.source.region, e.code
                ),
                _ => "reading the source image".into(),
            };
            let (why, msg) = global.clone().unwrap_or((reason::WAITING, waiting));
            let st = if global.is_some() {
                state::ERROR
            } else {
                state::WAITING
            };
            destinations.push(blocked(region, source_id, st, why, msg, attempt));
            continue;
        };
        if src.state != state::AVAILABLE {
            let st = if src.state == state::PENDING {
                state::WAITING
            } else {
                state::ERROR
            };
            let msg = format!(
                "the source image is {}; copies start when it is available",
                src.state
            );
            destinations.push(blocked(
                region,
                source_id,
                st,
                reason::SOURCE_NOT_AVAILABLE,
                msg,
                attempt,
            ));
            continue;
        }
        if let Some((why, msg)) = precondition(spec, dest, src) {
            destinations.push(blocked(region, source_id, state::ERROR, why, msg, attempt));
            continue;
        }
        // A copy EC2 rejected stays rejected until the spec changes.
        if let Some(last) =
            last.filter(|d| d.state == state::ERROR && d.image_id.is_none() && same_generation)
        {
            destinations.push(last.clone());
            continue;
        }
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
        let request = CopyRequest {
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
            kms_key_id: kms.clone(),
            copy_image_tags: spec.copy_image_tags.unwrap_or(false),
            client_token: client_token(
                &meta.uid,
                region,
                &spec.source.region,
                source_id,
                encrypted,
                kms.as_deref(),
                attempt,
            ),
            tags: tags.clone(),
            completion_minutes: spec.snapshot_copy_completion_duration_minutes,
        };
        actions.push(Action::Copy {
            index: destinations.len(),
            region: region.into(),
            request,
        });
        destinations.push(TargetStatus {
            region: region.into(),
            state: state::PENDING.into(),
            source_image_id: Some(source_id.into()),
            attempt,
            ..TargetStatus::default()
        });
    }

    // Everything else this object owns: duplicates are retired at once,
    // everything in regions no longer listed too; older generations stay
    // until the current copy in their region is available, then the newest
    // `retain - 1` (and pinned ones) are kept and the rest retired.
    let mut retiring = Vec::new();
    let mut generations = Vec::new();
    let keep_older = spec.retain.unwrap_or(1).saturating_sub(1) as usize;
    for (region, images) in &observed.owned {
        let current_available = destinations
            .iter()
            .any(|d| &d.region == region && d.state == state::AVAILABLE);
        let listed = spec.destinations.iter().any(|d| &d.region == region);
        let mut older: Vec<&ImageInfo> = images
            .iter()
            .filter(|i| !current_ids.contains(&i.id))
            .collect();
        // Newest first (EC2's creation dates sort as text).
        older.sort_by(|a, b| b.creation_date.cmp(&a.creation_date).then(a.id.cmp(&b.id)));
        let mut kept = 0;
        for img in older {
            let from = img.tags.get(SOURCE_TAG).cloned().unwrap_or_default();
            let duplicate = !source_id.is_empty() && from == source_id;
            let mut ts = target_status(region, img, &from, 0);
            if let Some(l) = last_entry(&prev, &img.id) {
                ts.shared_with = l.shared_with.clone();
            }
            let pinned = meta.pinned.contains(&from);
            if listed && !duplicate && current_available && (pinned || kept < keep_older) {
                kept += usize::from(!pinned);
                ts.message = if pinned {
                    format!("kept: its source {from} is pinned")
                } else {
                    "kept by spec.retain".into()
                };
                upkeep(
                    spec,
                    meta,
                    region,
                    img,
                    &source_snaps,
                    &removed_tags,
                    now,
                    &mut ts,
                    &mut actions,
                );
                generations.push(ts);
            } else if duplicate || !listed || current_available {
                ts.message = if duplicate {
                    "duplicate copy of the current source".into()
                } else if !listed {
                    "region removed from spec.destinations".into()
                } else {
                    "replaced by a copy of the current source".into()
                };
                let action = match spec.deletion_policy {
                    DeletionPolicy::Delete => Action::Retire {
                        region: region.clone(),
                        image: img.clone(),
                    },
                    DeletionPolicy::Retain => Action::Release {
                        region: region.clone(),
                        image: img.clone(),
                    },
                };
                actions.push(action);
                retiring.push(ts);
            } else {
                ts.message = "kept until the copy of the current source is available".into();
                retiring.push(ts);
            }
        }
    }

    // Which account each entry lives in: the destination's role, or for a
    // region no longer listed, the role the copy was made through.
    for t in destinations
        .iter_mut()
        .chain(&mut retiring)
        .chain(&mut generations)
    {
        (t.role_arn, t.external_id) = match spec.destinations.iter().find(|d| d.region == t.region)
        {
            Some(d) => (d.role_arn.clone(), d.external_id.clone()),
            None => t
                .image_id
                .as_deref()
                .and_then(|id| last_entry(&prev, id))
                .map(|l| (l.role_arn.clone(), l.external_id.clone()))
                .unwrap_or_default(),
        };
    }
    let status = AmiCopyStatus {
        observed_generation: meta.generation,
        source_image_id: (!source_id.is_empty()).then(|| source_id.into()),
        resolved_source: observed.resolved.clone(),
        available: None,
        destinations,
        retiring,
        generations,
        tag_keys,
        conditions: Vec::new(),
    };
    let mut plan = Plan {
        actions,
        status,
        notes,
        busy: false,
        global,
    };
    plan.summarize(&prev.conditions, meta.generation, now);
    plan
}

/// Regions where this object may own images: listed now, or named in status.
pub fn regions_of_interest(
    spec: &AmiCopySpec,
    previous: Option<&AmiCopyStatus>,
) -> BTreeSet<String> {
    let mut regions: BTreeSet<String> =
        spec.destinations.iter().map(|d| d.region.clone()).collect();
    if let Some(p) = previous {
        regions.extend(
            p.destinations
                .iter()
                .chain(&p.retiring)
                .chain(&p.generations)
                .map(|d| d.region.clone()),
        );
    }
    regions
}

/// Image IDs the last status names that the tag query did not return: they
/// are looked up by ID (late listing, deregistration, or a foreign image).
pub fn recorded_to_check(
    previous: Option<&AmiCopyStatus>,
    owned: &BTreeMap<String, Vec<ImageInfo>>,
) -> Vec<(String, String)> {
    let Some(p) = previous else { return Vec::new() };
    p.destinations
        .iter()
        .filter_map(|d| Some((d.region.clone(), d.image_id.clone()?)))
        .filter(|(region, id)| {
            !owned
                .get(region)
                .is_some_and(|imgs| imgs.iter().any(|i| &i.id == id))
        })
        .collect()
}

#[cfg(test)]
mod tests;
